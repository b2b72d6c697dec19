//! The recent Opus packets of one stream, [`History`]: what an idle MP3
//! output keeps instead of decoding (a few seconds, bounded in stream time
//! and in packets), so that the first listener's burst can be made at once,
//! and whether it still holds the stream's first packet.

use std::collections::VecDeque;

use super::OpusPacket;

/// Fewest 48 kHz samples an Opus packet carries (2.5 ms): what bounds the
/// packet count of a span.
const MIN_PACKET_SAMPLES: u64 = 120;

/// A stream's last `span` of Opus packets (by RTP time), oldest first.
pub(crate) struct History {
    packets: VecDeque<OpusPacket>,
    /// Stream time kept, in 48 kHz samples.
    span: u64,
    /// Most packets kept (the span in the shortest packets Opus has).
    max_packets: usize,
    /// Nothing has been dropped yet: the first packet is the stream's first.
    from_start: bool,
}

impl History {
    /// Keeps the last `span_ms` of stream time.
    pub(crate) fn new(span_ms: u64) -> Self {
        let span = span_ms * u64::from(super::SAMPLE_RATE) / 1000;
        Self {
            packets: VecDeque::new(),
            span,
            max_packets: (span / MIN_PACKET_SAMPLES).max(1) as usize,
            from_start: true,
        }
    }

    /// Adds the newest packet, dropping those older than the span (and the
    /// oldest beyond the packet bound; after a far timestamp jump either way,
    /// everything before it).
    pub(crate) fn push(&mut self, packet: OpusPacket) {
        let newest = packet.rtp_time;
        self.packets.push_back(packet);
        while let Some(front) = self.packets.front() {
            let old = newest.saturating_sub(front.rtp_time) > self.span
                || front.rtp_time.saturating_sub(newest) > self.span
                || self.packets.len() > self.max_packets;
            if !old {
                break;
            }
            self.packets.pop_front();
            self.from_start = false;
        }
    }

    /// A copy of what is kept (the payloads are shared), oldest first.
    pub(crate) fn snapshot(&self) -> Vec<OpusPacket> {
        self.packets.iter().cloned().collect()
    }

    /// Whether the oldest packet kept is the stream's first (or none came yet).
    pub(crate) fn holds_start(&self) -> bool {
        self.from_start
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.packets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn packet(seq: u64, rtp_time: u64) -> OpusPacket {
        OpusPacket {
            seq,
            rtp_time,
            payload: Arc::from(&[0xf8u8, seq as u8][..]),
        }
    }

    fn seqs(h: &History) -> Vec<u64> {
        h.snapshot().iter().map(|p| p.seq).collect()
    }

    #[test]
    fn keeps_the_last_span_of_stream_time() {
        let mut h = History::new(100); // 4800 samples: five 20 ms packets + the newest
        for i in 0..5 {
            h.push(packet(i, i * 960));
        }
        assert!(h.holds_start());
        assert_eq!(seqs(&h), vec![0, 1, 2, 3, 4]);
        h.push(packet(5, 5 * 960));
        assert_eq!(
            seqs(&h),
            vec![0, 1, 2, 3, 4, 5],
            "exactly 100 ms back is kept"
        );
        assert!(h.holds_start());
        h.push(packet(6, 6 * 960));
        assert_eq!(seqs(&h), vec![1, 2, 3, 4, 5, 6]);
        assert!(!h.holds_start(), "the stream's first packet is gone");
        // A 60 s pause (DTX or a restart) leaves only what follows it.
        h.push(packet(7, 6 * 960 + 60 * 48_000));
        assert_eq!(seqs(&h), vec![7]);
    }

    #[test]
    fn a_backward_jump_drops_what_came_before_it() {
        let mut h = History::new(1000);
        for i in 0..10 {
            h.push(packet(i, 1_000_000 + i * 960));
        }
        h.push(packet(10, 0));
        assert_eq!(seqs(&h), vec![10]);
    }

    #[test]
    fn packet_count_is_bounded_even_with_a_frozen_clock() {
        let mut h = History::new(100); // 4800 samples → at most 40 packets
        for i in 0..1000 {
            h.push(packet(i, 0));
        }
        assert_eq!(h.len(), 40);
        assert_eq!(seqs(&h)[0], 960);
        assert!(!h.holds_start());
    }

    #[test]
    fn snapshot_shares_payloads() {
        let mut h = History::new(1000);
        h.push(packet(1, 0));
        let a = h.snapshot();
        let b = h.snapshot();
        assert!(Arc::ptr_eq(&a[0].payload, &b[0].payload));
    }
}
