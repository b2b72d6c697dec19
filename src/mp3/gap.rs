//! Pure timeline arithmetic: owns [`GapPlanner`], which decides from extended
//! RTP sequence numbers and timestamps (48 kHz) how to fill a hole before each
//! packet (FEC, PLC, digital silence), which packets to drop as late or
//! duplicate, and when to resync. No libopus here, so it is unit-tested alone.

/// Opus decoders only accept frame sizes in multiples of 2.5 ms (120 samples
/// at 48 kHz) for PLC/FEC; anything below that granule is filled with zeros.
pub const GRANULE: u64 = 120;
/// 20 ms at 48 kHz.
pub const SAMPLES_20MS: u64 = 960;

/// Tunables, all in 48 kHz samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GapConfig {
    /// A hole of at most this many packets (of the current packet's
    /// duration), with a sequence-number gap, is concealed entirely (FEC + PLC).
    pub conceal_max_packets: u64,
    /// In longer holes, PLC covers at most this much before silence takes over.
    pub plc_max_samples: u64,
    /// Holes longer than this (in either direction) mean the sender restarted:
    /// resync without filling.
    pub max_fill_samples: u64,
}

impl Default for GapConfig {
    fn default() -> Self {
        Self {
            conceal_max_packets: 3,
            plc_max_samples: 3 * SAMPLES_20MS, // 60 ms
            max_fill_samples: 10 * 48_000,     // 10 s
        }
    }
}

/// What to do before/with one packet. Fill order: `plc_samples`, then
/// `silence_samples`, then `fec_samples`, then the packet itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Late or duplicate packet: do not decode it at all.
    pub drop: bool,
    /// Timeline discontinuity (sender restart): reset the decoder, no filler.
    pub resync: bool,
    pub plc_samples: u64,
    pub silence_samples: u64,
    /// Decode the *current* packet with `fec = true` into this many samples
    /// (recovers the lost packet just before it).
    pub fec_samples: u64,
}

impl Plan {
    /// Total filler samples inserted before the packet.
    pub fn fill_samples(&self) -> u64 {
        self.plc_samples + self.silence_samples + self.fec_samples
    }
}

/// Tracks the expected next RTP timestamp and sequence number of one stream.
#[derive(Clone, Debug, Default)]
pub struct GapPlanner {
    cfg: GapConfig,
    next_time: Option<u64>,
    next_seq: u64,
}

fn round_down(v: u64) -> u64 {
    v - v % GRANULE
}

impl GapPlanner {
    pub fn new(cfg: GapConfig) -> Self {
        Self {
            cfg,
            next_time: None,
            next_seq: 0,
        }
    }

    /// The RTP timestamp the next in-order packet should carry.
    pub fn next_expected_time(&self) -> Option<u64> {
        self.next_time
    }

    /// Plans one packet carrying `duration` samples at `rtp_time`.
    pub fn plan(&mut self, seq: u64, rtp_time: u64, duration: u64) -> Plan {
        let mut plan = Plan::default();
        if let Some(expected) = self.next_time {
            if rtp_time < expected {
                if expected - rtp_time <= self.cfg.max_fill_samples {
                    plan.drop = true;
                    return plan;
                }
                plan.resync = true; // timestamps jumped far backwards
            } else {
                let missing = rtp_time - expected;
                if missing > self.cfg.max_fill_samples {
                    plan.resync = true;
                } else if missing > 0 {
                    self.fill(&mut plan, seq, missing, duration);
                }
            }
        }
        self.next_time = Some(rtp_time.saturating_add(duration));
        self.next_seq = seq.saturating_add(1);
        plan
    }

    fn fill(&self, plan: &mut Plan, seq: u64, missing: u64, duration: u64) {
        let lost_packets = seq > self.next_seq;
        let conceal_max = self.cfg.conceal_max_packets * duration.max(GRANULE);
        if lost_packets && missing <= conceal_max {
            // Short loss: the last missing frame from in-band FEC, the rest PLC.
            plan.fec_samples = round_down(missing.min(duration));
            let rest = missing - plan.fec_samples;
            plan.plc_samples = round_down(rest);
            plan.silence_samples = rest - plan.plc_samples;
        } else {
            // DTX silence or long loss: fade out with PLC, then zeros.
            plan.plc_samples = round_down(missing).min(round_down(self.cfg.plc_max_samples));
            plan.silence_samples = missing - plan.plc_samples;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planner() -> GapPlanner {
        GapPlanner::new(GapConfig::default())
    }

    #[test]
    fn in_order_packets_need_no_fill() {
        let mut p = planner();
        for i in 0..100u64 {
            let plan = p.plan(1000 + i, 5_000 + i * 960, 960);
            assert_eq!(plan, Plan::default(), "packet {i}");
        }
        assert_eq!(p.next_expected_time(), Some(5_000 + 100 * 960));
    }

    #[test]
    fn one_lost_packet_uses_fec_for_20ms() {
        let mut p = planner();
        p.plan(10, 0, 960);
        let plan = p.plan(12, 1920, 960);
        assert!(!plan.drop && !plan.resync);
        assert_eq!(plan.fec_samples, 960);
        assert_eq!(plan.plc_samples, 0);
        assert_eq!(plan.silence_samples, 0);
    }

    #[test]
    fn three_lost_packets_use_plc_then_fec() {
        let mut p = planner();
        p.plan(10, 0, 960);
        let plan = p.plan(14, 4 * 960, 960);
        assert_eq!(plan.plc_samples, 1920);
        assert_eq!(plan.fec_samples, 960);
        assert_eq!(plan.silence_samples, 0);
        assert_eq!(plan.fill_samples(), 3 * 960);
    }

    #[test]
    fn dtx_gap_with_contiguous_seq_is_filled() {
        let mut p = planner();
        p.plan(1, 0, 960);
        // DTX: next packet 400 ms later, sequence number contiguous.
        let plan = p.plan(2, 960 + 19_200, 960);
        assert_eq!(plan.fill_samples(), 19_200, "400 ms filled");
        assert_eq!(plan.fec_samples, 0);
        assert_eq!(plan.plc_samples, 2880);
        assert_eq!(plan.silence_samples, 19_200 - 2880);
        // Short contiguous-seq jump (no loss): PLC only, no FEC.
        let plan = p.plan(3, 960 + 19_200 + 960 + 960, 960);
        assert_eq!(
            (plan.plc_samples, plan.fec_samples, plan.silence_samples),
            (960, 0, 0)
        );
    }

    #[test]
    fn long_loss_is_plc_then_silence() {
        let mut p = planner();
        p.plan(1, 0, 960);
        let plan = p.plan(51, 50 * 960, 960); // 49 packets lost
        assert_eq!(plan.plc_samples, 2880);
        assert_eq!(plan.silence_samples, 49 * 960 - 2880);
        assert_eq!(plan.fec_samples, 0);
    }

    #[test]
    fn duplicate_and_late_packets_are_dropped() {
        let mut p = planner();
        p.plan(1, 0, 960);
        p.plan(2, 960, 960);
        assert!(p.plan(2, 960, 960).drop, "duplicate");
        assert!(p.plan(1, 0, 960).drop, "late");
        // State unchanged by dropped packets.
        assert_eq!(p.plan(3, 1920, 960), Plan::default());
    }

    #[test]
    fn reordered_packet_after_conceal_is_dropped() {
        let mut p = planner();
        p.plan(1, 0, 960);
        let plan = p.plan(3, 1920, 960);
        assert_eq!(plan.fec_samples, 960);
        assert!(p.plan(2, 960, 960).drop);
    }

    #[test]
    fn sixty_second_jump_resyncs_without_filler() {
        let mut p = planner();
        p.plan(1, 0, 960);
        let plan = p.plan(2, 960 + 60 * 48_000, 960);
        assert!(plan.resync && !plan.drop);
        assert_eq!(plan.fill_samples(), 0);
        assert_eq!(p.next_expected_time(), Some(1920 + 60 * 48_000));
        // A 10 s gap is still filled (the cap is inclusive).
        let t = 1920 + 60 * 48_000;
        let plan = p.plan(3, t + 480_000, 960);
        assert!(!plan.resync);
        assert_eq!(plan.fill_samples(), 480_000);
        // Far backwards jump is a restart too, not a late packet.
        let plan = p.plan(4, 0, 960);
        assert!(plan.resync && !plan.drop);
        assert_eq!(p.plan(5, 960, 960), Plan::default());
    }

    #[test]
    fn odd_sized_gap_keeps_total_exact() {
        let mut p = planner();
        p.plan(1, 0, 960);
        let plan = p.plan(3, 960 + 1000, 960); // not a multiple of 2.5 ms
        assert_eq!(plan.fill_samples(), 1000);
        assert_eq!(plan.fec_samples % GRANULE, 0);
        assert_eq!(plan.plc_samples % GRANULE, 0);
    }

    #[test]
    fn variable_packet_durations_and_high_seq() {
        let mut p = planner();
        let base_seq = u64::from(u16::MAX) * 3; // extended: no wrap handling needed
        let base_t = u64::from(u32::MAX) + 7;
        p.plan(base_seq, base_t, 1920); // 40 ms packet
        assert_eq!(p.plan(base_seq + 1, base_t + 1920, 480), Plan::default());
        let plan = p.plan(base_seq + 3, base_t + 1920 + 480 + 480, 480);
        assert_eq!(plan.fec_samples, 480);
        assert_eq!(plan.fill_samples(), 480);
    }
}
