//! Opus side of the pipeline: owns the single `opus::Decoder` of a stream and
//! turns each packet plus the [`GapPlanner`]'s plan into a gapless PCM
//! timeline (decoded audio, FEC, PLC, digital silence). Corrupt payloads are
//! concealed and counted, never a panic.

use std::sync::Arc;

use super::counters::{bump, PipelineCounters};
use super::gap::{GapConfig, GapPlanner, GRANULE, SAMPLES_20MS};
use super::SAMPLE_RATE;

/// Largest Opus packet: 120 ms at 48 kHz.
const MAX_PACKET_SAMPLES: usize = 5760;
/// Silence is emitted in chunks of this size (100 ms).
const SILENCE_CHUNK: usize = 4800;
static ZEROS: [i16; SILENCE_CHUNK] = [0; SILENCE_CHUNK];

/// One stream's Opus decoder plus its timeline state.
pub struct OpusDecode {
    dec: opus::Decoder,
    planner: GapPlanner,
    pcm: Vec<i16>,
    last_duration: u64,
    counters: Arc<PipelineCounters>,
}

impl OpusDecode {
    pub(crate) fn new(counters: Arc<PipelineCounters>) -> Result<Self, opus::Error> {
        Ok(Self {
            dec: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)?,
            planner: GapPlanner::new(GapConfig::default()),
            pcm: vec![0; MAX_PACKET_SAMPLES],
            last_duration: SAMPLES_20MS,
            counters,
        })
    }

    /// Handles one packet: emits, in timeline order, the PCM for any hole
    /// before it and then its own audio. `emit` gets chunks of ≤ 120 ms.
    pub fn packet(
        &mut self,
        seq: u64,
        rtp_time: u64,
        payload: &[u8],
        emit: &mut dyn FnMut(&[i16]),
    ) {
        bump(&self.counters.packets_in, 1);
        let duration = opus::packet::get_nb_samples(payload, SAMPLE_RATE)
            .ok()
            .filter(|&n| n > 0 && n <= MAX_PACKET_SAMPLES)
            .map(|n| n as u64);
        let valid = duration.is_some();
        if !valid && !payload.is_empty() {
            bump(&self.counters.packets_corrupt, 1);
        }
        let duration = duration.unwrap_or(self.last_duration);

        let plan = self.planner.plan(seq, rtp_time, duration);
        if plan.drop {
            bump(&self.counters.packets_late, 1);
            return;
        }
        self.last_duration = duration;
        if plan.resync {
            bump(&self.counters.resyncs, 1);
            if let Err(err) = self.dec.reset_state() {
                tracing::debug!(error = %err, "opus reset_state failed");
            }
        }
        self.plc(plan.plc_samples, emit);
        self.silence(plan.silence_samples, emit);
        if plan.fec_samples > 0 {
            if valid {
                self.decode_into(payload, plan.fec_samples, true, emit);
            } else {
                self.plc(plan.fec_samples, emit);
            }
        }
        if valid {
            self.decode_into(payload, duration, false, emit);
        } else {
            self.plc(duration, emit);
        }
    }

    /// Decodes `payload` (or its FEC data) to exactly `samples` samples;
    /// falls back to PLC if libopus rejects it.
    fn decode_into(
        &mut self,
        payload: &[u8],
        samples: u64,
        fec: bool,
        emit: &mut dyn FnMut(&[i16]),
    ) {
        let n = samples as usize; // ≤ MAX_PACKET_SAMPLES, checked by caller
        match self.dec.decode(payload, &mut self.pcm[..n], fec) {
            Ok(got) => {
                let got = got.min(n);
                self.pcm[got..n].fill(0);
                emit(&self.pcm[..n]);
                if fec {
                    bump(&self.counters.samples_fec, samples);
                } else {
                    bump(&self.counters.samples_decoded, samples);
                }
            }
            Err(err) => {
                if !fec {
                    bump(&self.counters.packets_corrupt, 1);
                }
                tracing::trace!(error = %err, fec, "opus decode failed, concealing");
                self.plc(samples, emit);
            }
        }
    }

    /// Packet-loss concealment for `samples` (any remainder below 2.5 ms is
    /// zeros, since libopus only conceals whole 2.5 ms units).
    fn plc(&mut self, samples: u64, emit: &mut dyn FnMut(&[i16])) {
        let whole = samples - samples % GRANULE;
        let mut left = whole;
        while left > 0 {
            let n = left.min(SAMPLES_20MS) as usize;
            match self.dec.decode(&[], &mut self.pcm[..n], false) {
                Ok(got) => self.pcm[got.min(n)..n].fill(0),
                Err(_) => self.pcm[..n].fill(0),
            }
            emit(&self.pcm[..n]);
            left -= n as u64;
        }
        bump(&self.counters.samples_plc, whole);
        self.silence(samples - whole, emit);
    }

    fn silence(&mut self, samples: u64, emit: &mut dyn FnMut(&[i16])) {
        let mut left = samples;
        while left > 0 {
            let n = left.min(SILENCE_CHUNK as u64) as usize;
            emit(&ZEROS[..n]);
            left -= n as u64;
        }
        bump(&self.counters.samples_silence, samples);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dec: &mut OpusDecode, seq: u64, t: u64, payload: &[u8]) -> usize {
        let mut total = 0;
        dec.packet(seq, t, payload, &mut |pcm| total += pcm.len());
        total
    }

    #[test]
    fn corrupt_and_empty_payloads_are_concealed_without_panic() {
        let stats = Arc::new(PipelineCounters::default());
        let mut dec = OpusDecode::new(Arc::clone(&stats)).expect("decoder");
        let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)
            .expect("enc");
        let good = enc.encode_vec(&[0i16; 960], 400).expect("encode");
        assert_eq!(run(&mut dec, 0, 0, &good), 960);
        // Garbage TOC claiming a huge/invalid frame count.
        assert_eq!(run(&mut dec, 1, 960, &[0xFF, 0xFF, 0xFF, 0xFF, 0x01]), 960);
        assert_eq!(
            run(&mut dec, 2, 1920, &[]),
            960,
            "empty → PLC of last duration"
        );
        assert_eq!(
            run(&mut dec, 3, 2880, &[0x03]),
            960,
            "code-3 packet without count byte"
        );
        // Lost packet before a corrupt one: FEC falls back to PLC.
        assert_eq!(run(&mut dec, 5, 4800, &[0xFF, 0x00]), 1920);
        assert_eq!(run(&mut dec, 6, 5760, &good), 960);
        let s = stats.snapshot();
        assert!(s.packets_corrupt >= 3, "{s:?}");
        assert_eq!(s.packets_in, 6);
    }

    #[test]
    fn dtx_like_tiny_packets_decode_normally() {
        let stats = Arc::new(PipelineCounters::default());
        let mut dec = OpusDecode::new(Arc::clone(&stats)).expect("decoder");
        let mut enc =
            opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).expect("enc");
        enc.set_dtx(true).expect("dtx");
        let mut total = 0;
        for i in 0..50u64 {
            let p = enc.encode_vec(&[0i16; 960], 400).expect("encode");
            total += run(&mut dec, i, i * 960, &p);
        }
        assert_eq!(total, 50 * 960);
        assert_eq!(stats.snapshot().packets_corrupt, 0);
    }
}
