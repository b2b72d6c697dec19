//! The ring of one stream's recent MP3 batches: numbered, covering the burst
//! a new listener gets plus every listener's allowed lag, updated under one
//! lock so that joining (taking the burst and a place) is atomic. It wakes
//! its readers (the writer thread through a condvar, async listeners through
//! a watch) and counts them; it knows nothing of sockets or HTTP. The ring
//! is format-neutral: MP3 and Ogg/Opus each have one per stream.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::watch;

use bytes::Bytes;

use super::batch::Batch;
use super::counters::{bump, PipelineCounters};
use super::fanout::Format;
use super::Mp3Config;
use crate::sync::lock;

/// Everything behind the ring's lock.
pub(super) struct Shared {
    /// Recent batches, oldest first: at least the burst window plus
    /// `queue_batches + 1` more, so a listener that lags by up to its limit
    /// still finds the batch it needs.
    pub(super) ring: VecDeque<Batch>,
    /// Sequence number of `ring[0]`.
    pub(super) first_seq: u64,
    /// Audio in the ring.
    ring_ns: u64,
    /// Set by [`Ring::close`]: readers get what is in the ring, then end.
    pub(super) closed: bool,
}

impl Shared {
    /// Sequence number the next published batch gets.
    pub(super) fn end_seq(&self) -> u64 {
        self.first_seq + self.ring.len() as u64
    }

    /// Batches (from the newest back) that make up the burst.
    fn burst_len(&self, burst_ns: u64) -> usize {
        let mut ns = 0;
        let mut n = 0;
        for b in self.ring.iter().rev() {
            if ns >= burst_ns {
                break;
            }
            ns += b.duration_ns;
            n += 1;
        }
        n
    }

    /// Sequence number of the first batch of the burst.
    pub(super) fn burst_start(&self, burst_ns: u64) -> u64 {
        self.end_seq() - self.burst_len(burst_ns) as u64
    }
}

/// What each listener gets before its first batch, made from that batch
/// (Ogg's per-listener header pages, numbered to precede it).
pub(crate) type Preamble = Arc<dyn Fn(&Batch) -> Bytes + Send + Sync>;

pub(super) struct Ring {
    pub(super) stream_id: String,
    pub(super) format: Format,
    /// `None` for formats whose listeners start right at a batch (MP3).
    pub(super) preamble: Option<Preamble>,
    pub(super) burst_ns: u64,
    /// Batches a listener may lag beyond its burst before it is cut.
    pub(super) queue_batches: usize,
    shared: Mutex<Shared>,
    /// Wakes the writer thread: a new batch, a new socket, or the end.
    wake: Condvar,
    /// Tells async listeners that the ring moved on (value: `end_seq`).
    published: watch::Sender<u64>,
    listeners: AtomicUsize,
    frames_published: AtomicU64,
    closed: AtomicBool,
    pub(super) counters: Arc<PipelineCounters>,
}

impl Ring {
    pub(super) fn new(
        stream_id: &str,
        format: Format,
        preamble: Option<Preamble>,
        config: &Mp3Config,
        counters: Arc<PipelineCounters>,
    ) -> Self {
        Self {
            stream_id: stream_id.to_owned(),
            format,
            preamble,
            burst_ns: u64::from(config.burst_ms) * 1_000_000,
            queue_batches: config.listener_queue_batches.max(1),
            shared: Mutex::new(Shared {
                ring: VecDeque::new(),
                first_seq: 0,
                ring_ns: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            published: watch::Sender::new(0),
            listeners: AtomicUsize::new(0),
            frames_published: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            counters,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// The condvar the writer thread waits on (with [`lock`](Self::lock)).
    pub(super) fn wake(&self) -> &Condvar {
        &self.wake
    }

    /// Wakes the writer thread for something outside the ring (a socket).
    /// Taking the lock first means a writer between its check and its wait
    /// cannot miss it.
    pub(super) fn wake_writer(&self) {
        drop(self.lock());
        self.wake.notify_all();
    }

    /// A new async reader's view: told of every publish from now on.
    pub(super) fn watch(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Publishes one batch to every reader.
    pub(super) fn publish(&self, batch: Batch) {
        let frames = u64::from(batch.frames);
        let mut s = self.lock();
        if s.closed {
            return;
        }
        s.ring_ns += batch.duration_ns;
        s.ring.push_back(batch);
        let keep = s.burst_len(self.burst_ns) + self.queue_batches + 1;
        while s.ring.len() > keep {
            if let Some(front) = s.ring.pop_front() {
                s.ring_ns -= front.duration_ns;
                s.first_seq += 1;
            }
        }
        let end = s.end_seq();
        drop(s);
        self.frames_published.fetch_add(frames, Ordering::Relaxed);
        self.wake.notify_all();
        self.published.send_replace(end);
    }

    /// Ends the stream: readers get what is queued, then end.
    pub(super) fn close(&self) {
        let mut s = self.lock();
        // Flag first: a listener that sees its body end also sees is_closed().
        self.closed.store(true, Ordering::Release);
        s.closed = true;
        let end = s.end_seq();
        drop(s);
        self.wake.notify_all();
        self.published.send_replace(end);
    }

    pub(super) fn listener_joined(&self) {
        self.listeners.fetch_add(1, Ordering::Relaxed);
    }

    /// One listener (of either kind) has gone.
    pub(super) fn listener_left(&self) {
        self.listeners.fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn listener_count(&self) -> usize {
        self.listeners.load(Ordering::Relaxed)
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(super) fn frames_published(&self) -> u64 {
        self.frames_published.load(Ordering::Relaxed)
    }

    /// Counts and logs a listener cut for lagging by `lagged` batches.
    pub(super) fn dropped_slow(&self, lagged: u64) {
        bump(&self.counters.listeners_dropped_slow, 1);
        let metrics = crate::metrics::metrics();
        match self.format {
            Format::Mp3 => metrics.mp3_listeners_dropped_slow.inc(),
            Format::Ogg => metrics.ogg_listeners_dropped_slow.inc(),
        }
        tracing::warn!(
            stream_id = %self.stream_id,
            format = self.format.name(),
            lagged_batches = lagged,
            "listener too slow, dropping"
        );
    }

    /// The preamble of a listener whose first batch is `first`, if this
    /// format has one.
    pub(super) fn preamble_for(&self, first: &Batch) -> Option<Bytes> {
        self.preamble.as_ref().map(|make| make(first))
    }
}
