//! Opus packets → Ogg audio pages of one logical stream: owns the timeline
//! (granule positions from the RTP timestamps, via the MP3 output's
//! [`GapPlanner`]: late packets dropped, holes filled with Opus silence
//! frames, far jumps taken as a resync, so granules never go back) and when a
//! page is complete (at most [`PAGE_SAMPLES`] of stream time, at most 255
//! segments). Each page is one [`Batch`], so every batch starts on a page.

use std::sync::Arc;

use crate::mp3::batch::Batch;
use crate::mp3::gap::{GapConfig, GapPlanner, SAMPLES_20MS};
use crate::mp3::pipeline::Output;
use crate::mp3::{OpusPacket, PipelineCounters, SAMPLE_RATE};

use super::header::PRE_SKIP;
use super::page::{segments_of, write_page, PageHeader, EOS, MAX_SEGMENTS};

/// Longest stream time one page spans (200 ms): pages go out every
/// 100–200 ms of audio, in step with the MP3 batches.
pub const PAGE_SAMPLES: u64 = 200 * SAMPLE_RATE as u64 / 1000;
/// Sequence number of the first audio page: the two header pages come first.
pub const FIRST_AUDIO_SEQ: u32 = 2;
/// Most samples one Opus packet may carry (120 ms).
const MAX_PACKET_SAMPLES: u64 = 5760;
/// A 20 ms CELT frame of silence (TOC: config 31, mono, one frame): what a
/// hole in the timeline is filled with, so sample counts follow granules.
const SILENCE_20MS: [u8; 3] = [0xf8, 0xff, 0xfe];

/// Builds the audio pages of one stream.
pub struct Pager {
    serial: u32,
    /// Sequence number of the next page.
    seq: u32,
    planner: GapPlanner,
    /// Granule position where the next packet starts (after the last packet
    /// taken and any hole since).
    granule: u64,
    /// Granule position after the last packet on the page being built.
    last_end: u64,
    /// Granule position of the last page written.
    page_granule: u64,
    /// Packets of the page being built, their lengths, and the lacing
    /// values they take.
    packets: Vec<u8>,
    lacing: Vec<usize>,
    segments: usize,
    counters: Arc<PipelineCounters>,
}

impl Pager {
    pub fn new(serial: u32, counters: Arc<PipelineCounters>) -> Self {
        let granule = u64::from(PRE_SKIP);
        Self {
            serial,
            seq: FIRST_AUDIO_SEQ,
            planner: GapPlanner::new(GapConfig::default()),
            granule,
            last_end: granule,
            page_granule: granule,
            packets: Vec::new(),
            lacing: Vec::new(),
            segments: 0,
            counters,
        }
    }

    /// Takes one RTP packet; completed pages go to `out`.
    pub fn push(&mut self, seq: u64, rtp_time: u64, payload: &[u8], out: &mut Vec<Batch>) {
        bump(&self.counters.packets_in);
        let duration = opus::packet::get_nb_samples(payload, SAMPLE_RATE)
            .ok()
            .map(|n| n as u64)
            .filter(|&n| n > 0 && n <= MAX_PACKET_SAMPLES);
        let Some(duration) = duration else {
            // Never pass on what a decoder would fail on.
            bump(&self.counters.packets_corrupt);
            return;
        };
        let plan = self.planner.plan(seq, rtp_time, duration);
        if plan.drop {
            bump(&self.counters.packets_late);
            return;
        }
        if plan.resync {
            bump(&self.counters.resyncs);
        }
        self.fill(plan.fill_samples(), out);
        self.add(payload, duration, out);
    }

    /// A hole of `samples`: whole 20 ms silence frames; a remainder (senders
    /// keep to 20 ms steps, so rare) only moves the granule on.
    fn fill(&mut self, samples: u64, out: &mut Vec<Batch>) {
        for _ in 0..samples / SAMPLES_20MS {
            self.add(&SILENCE_20MS, SAMPLES_20MS, out);
        }
        self.counters
            .samples_silence
            .fetch_add(samples, std::sync::atomic::Ordering::Relaxed);
        self.granule += samples % SAMPLES_20MS;
    }

    /// Adds one packet, first ending the page if it would not fit.
    fn add(&mut self, packet: &[u8], duration: u64, out: &mut Vec<Batch>) {
        let segments = segments_of(packet.len());
        let full = self.segments + segments > MAX_SEGMENTS
            || self.granule + duration - self.page_granule > PAGE_SAMPLES;
        if full && !self.lacing.is_empty() {
            self.flush(0, out);
        }
        self.granule += duration;
        self.last_end = self.granule;
        self.packets.extend_from_slice(packet);
        self.lacing.push(packet.len());
        self.segments += segments;
        if self.granule - self.page_granule >= PAGE_SAMPLES {
            self.flush(0, out);
        }
    }

    /// The end of the stream: the last packets, on a page marked EOS.
    pub fn finish(&mut self, out: &mut Vec<Batch>) {
        if !self.lacing.is_empty() {
            self.flush(EOS, out);
        }
    }

    /// Writes the pending packets as one page.
    fn flush(&mut self, flags: u8, out: &mut Vec<Batch>) {
        let mut packets = Vec::with_capacity(self.lacing.len());
        let mut rest = &self.packets[..];
        for &len in &self.lacing {
            let (packet, tail) = rest.split_at(len);
            packets.push(packet);
            rest = tail;
        }
        // The page's granule: the end of its last packet.
        let last_end = self.last_end;
        let header = PageHeader {
            flags,
            granule: last_end,
            serial: self.serial,
            seq: self.seq,
        };
        let mut page = Vec::with_capacity(27 + MAX_SEGMENTS + self.packets.len());
        write_page(&mut page, header, &packets);
        let span = last_end - self.page_granule;
        let duration_ns = span * 1_000_000_000 / u64::from(SAMPLE_RATE);
        out.push(Batch::new(&page, packets.len() as u32, duration_ns));
        self.seq = self.seq.wrapping_add(1);
        self.page_granule = last_end;
        self.packets.clear();
        self.lacing.clear();
        self.segments = 0;
    }
}

impl Output for Pager {
    fn packet(&mut self, packet: &OpusPacket, out: &mut Vec<Batch>) {
        self.push(packet.seq, packet.rtp_time, &packet.payload, out);
    }

    fn finish(mut self: Box<Self>, out: &mut Vec<Batch>) {
        Pager::finish(&mut self, out);
    }
}

fn bump(counter: &std::sync::atomic::AtomicU64) {
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ogg_opus::page::page_seq;

    /// A 20 ms CELT packet (config 31, mono, one frame) of `len` bytes.
    fn packet(len: usize) -> Vec<u8> {
        let mut p = vec![0x55u8; len];
        p[0] = 0xf8;
        p
    }

    fn granule(page: &[u8]) -> u64 {
        u64::from_le_bytes(page[6..14].try_into().expect("8"))
    }

    fn pager() -> (Pager, Arc<PipelineCounters>) {
        let counters = Arc::new(PipelineCounters::default());
        (Pager::new(9, Arc::clone(&counters)), counters)
    }

    /// Feeds `(seq, rtp_time)` packets of 20 ms; returns the pages.
    fn feed(p: &mut Pager, packets: impl IntoIterator<Item = (u64, u64)>) -> Vec<Batch> {
        let mut out = Vec::new();
        for (seq, time) in packets {
            p.push(seq, time, &packet(60), &mut out);
        }
        out
    }

    #[test]
    fn ten_packets_a_page_granules_from_rtp_plus_pre_skip() {
        let (mut p, _) = pager();
        let base = 1_000_000;
        let mut pages = feed(&mut p, (0..25).map(|i| (100 + i, base + i * 960)));
        p.finish(&mut pages);
        assert_eq!(pages.len(), 3);
        let seqs: Vec<_> = pages.iter().map(|b| page_seq(&b.data)).collect();
        assert_eq!(seqs, vec![Some(2), Some(3), Some(4)]);
        let granules: Vec<_> = pages.iter().map(|b| granule(&b.data)).collect();
        assert_eq!(granules, vec![3840 + 9600, 3840 + 19200, 3840 + 24000]);
        assert_eq!(pages[0].frames, 10);
        assert_eq!(pages[0].duration_ns, 200_000_000);
        assert_eq!(pages[2].data[5], EOS, "the last page ends the stream");
        assert_eq!(pages[0].data[5], 0);
        assert_eq!(pages[0].data[26], 10, "one segment per 60-byte packet");
    }

    #[test]
    fn a_hole_is_filled_with_silence_and_late_packets_are_dropped() {
        let (mut p, counters) = pager();
        // 0..5, then 5 packets lost (100 ms), then 10..20, then a late one.
        let times = (0..5).chain(10..20).map(|i| (i, i * 960));
        let mut pages = feed(&mut p, times);
        pages.extend(feed(&mut p, [(3, 3 * 960)]));
        p.finish(&mut pages);
        let counted: u32 = pages.iter().map(|b| b.frames).sum();
        assert_eq!(counted, 20, "15 packets and 5 silence frames");
        assert_eq!(granule(&pages.last().expect("page").data), 3840 + 20 * 960);
        let c = counters.snapshot();
        assert_eq!((c.packets_in, c.packets_late), (16, 1));
        assert_eq!(c.samples_silence, 5 * 960);
        assert!(pages
            .windows(2)
            .all(|w| granule(&w[0].data) < granule(&w[1].data)));
    }

    #[test]
    fn granules_never_go_back_and_pages_span_at_most_200_ms() {
        let (mut p, counters) = pager();
        // In order, a 30 s jump forward (resync), a 30 s jump back (resync),
        // a short hole with a 10 ms remainder, a duplicate.
        let mut times: Vec<(u64, u64)> = (0..30).map(|i| (i, i * 960)).collect();
        times.extend((30..40).map(|i| (i, 48_000 * 30 + i * 960)));
        times.extend((40..50).map(|i| (i, i * 960)));
        times.extend((50..60).map(|i| (i, i * 960 + 480)));
        times.push((59, 59 * 960 + 480));
        let mut pages = feed(&mut p, times);
        p.finish(&mut pages);
        let mut last = u64::from(PRE_SKIP);
        for page in &pages {
            let g = granule(&page.data);
            assert!(g > last, "granule {g} after {last}");
            assert!(g - last <= PAGE_SAMPLES, "page spans {} samples", g - last);
            assert_eq!(page.duration_ns, (g - last) * 1_000_000_000 / 48_000);
            last = g;
        }
        assert_eq!(counters.snapshot().resyncs, 2);
        assert_eq!(counters.snapshot().packets_late, 1);
        // 60 packets kept, 480 samples of hole not fillable by 20 ms frames.
        assert_eq!(last, 3840 + 60 * 960 + 480);
    }

    #[test]
    fn corrupt_packets_never_reach_a_page() {
        let (mut p, counters) = pager();
        let mut out = Vec::new();
        p.push(0, 0, &[], &mut out);
        // Code 3 (arbitrary frame count) without its count byte.
        p.push(1, 960, &[0xfb], &mut out);
        p.finish(&mut out);
        assert!(out.is_empty());
        assert_eq!(counters.snapshot().packets_corrupt, 2);
    }

    #[test]
    fn big_packets_split_pages_at_255_segments() {
        let (mut p, _) = pager();
        let mut out = Vec::new();
        // 2.5 ms packets (config 28) of 1000 bytes: 4 segments each.
        let mut big = vec![0u8; 1000];
        big[0] = 0xe0;
        for i in 0..200u64 {
            p.push(i, i * 120, &big, &mut out);
        }
        p.finish(&mut out);
        assert!(out.iter().all(|b| b.data[26] as usize <= MAX_SEGMENTS));
        assert_eq!(out[0].frames, 63, "63 × 4 = 252 segments; 64 would be 256");
        assert_eq!(out.iter().map(|b| b.frames).sum::<u32>(), 200);
    }
}
