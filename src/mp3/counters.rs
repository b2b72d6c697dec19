//! The counters of one stream's MP3 pipeline (packets in, dropped, late,
//! corrupt; samples decoded, concealed, filled; encode errors; listeners cut),
//! shared by the relay's sink, the pipeline thread and status readers.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters; every field only ever grows.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    pub packets_in: AtomicU64,
    pub packets_dropped_queue_full: AtomicU64,
    pub packets_late: AtomicU64,
    pub packets_corrupt: AtomicU64,
    pub resyncs: AtomicU64,
    pub samples_decoded: AtomicU64,
    pub samples_plc: AtomicU64,
    pub samples_fec: AtomicU64,
    pub samples_silence: AtomicU64,
    pub encode_errors: AtomicU64,
    pub listeners_dropped_slow: AtomicU64,
}

/// Point-in-time copy of [`PipelineCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineCounts {
    pub packets_in: u64,
    pub packets_dropped_queue_full: u64,
    pub packets_late: u64,
    pub packets_corrupt: u64,
    pub resyncs: u64,
    pub samples_decoded: u64,
    pub samples_plc: u64,
    pub samples_fec: u64,
    pub samples_silence: u64,
    pub encode_errors: u64,
    pub listeners_dropped_slow: u64,
}

impl PipelineCounters {
    pub fn snapshot(&self) -> PipelineCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PipelineCounts {
            packets_in: l(&self.packets_in),
            packets_dropped_queue_full: l(&self.packets_dropped_queue_full),
            packets_late: l(&self.packets_late),
            packets_corrupt: l(&self.packets_corrupt),
            resyncs: l(&self.resyncs),
            samples_decoded: l(&self.samples_decoded),
            samples_plc: l(&self.samples_plc),
            samples_fec: l(&self.samples_fec),
            samples_silence: l(&self.samples_silence),
            encode_errors: l(&self.encode_errors),
            listeners_dropped_slow: l(&self.listeners_dropped_slow),
        }
    }
}

/// Adds `n` to one counter.
pub(crate) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}
