//! The ring of one stream's recent MP3 batches: numbered, covering the burst
//! a new listener gets plus every listener's allowed lag, updated under one
//! lock so that joining (taking the burst and a place) is atomic. It wakes
//! its readers (the writer thread through a condvar, async listeners through
//! a watch) and counts them; it knows nothing of sockets or HTTP. The ring
//! is format-neutral: MP3 and Ogg/Opus each have one per stream.
//!
//! It also owns the ring's [`Supply`]: whether a pipeline is filling it. A
//! lazy ring (MP3, Ogg) starts idle; the first listener to join an idle ring turns
//! it to warming and is told to start the pipeline; listeners that join
//! before the pipeline's first publish take their burst when it comes. The
//! pipeline turns an unlistened ring idle again under the same lock, so a
//! listener never holds a place in a ring that is being emptied.

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
    /// Whether a pipeline fills the ring.
    pub(super) supply: Supply,
    /// Sequence number of the batch that starts with the stream's first
    /// packet, while the stream is young enough for a burst from its start.
    start_seq: Option<u64>,
    /// Where the listeners that joined while the ring was warming start,
    /// and the end of the ring then: their burst, taken from the
    /// pipeline's first publish however late they read it.
    pub(super) warm: (u64, u64),
}

/// Whether a pipeline fills a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Supply {
    /// No pipeline; the ring is empty. The first listener starts one.
    Idle,
    /// A pipeline is starting: its first publish gives waiting listeners
    /// their burst.
    Warming,
    /// Listeners take their burst when they join.
    Running,
}

/// How much recent audio a new listener gets at once: whole batches, back
/// from the newest, until both minimums are reached (or the ring's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Burst {
    pub ns: u64,
    pub bytes: u64,
}

/// A stream younger than this gives a new listener everything from its
/// first packet, so an announcement a speaker is told to play just after it
/// starts keeps its first words.
pub(crate) const FIRST_WORDS_NS: u64 = 3_000_000_000;

/// Where a joining listener starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Join {
    /// At this batch (its burst's first).
    At(u64),
    /// When the pipeline publishes; `start` says this listener must start it.
    Pending { start: bool },
}

impl Shared {
    /// Sequence number the next published batch gets.
    pub(super) fn end_seq(&self) -> u64 {
        self.first_seq + self.ring.len() as u64
    }

    /// Where a listener that joined while the ring was warming starts, and
    /// the end its allowance counts from: the burst of the pipeline's first
    /// publish once the ring runs (however late the listener reads); nothing
    /// once the ring closed without running; `None` while it still warms.
    pub(super) fn pending_start(&self) -> Option<(u64, u64)> {
        match self.supply {
            Supply::Running => Some(self.warm),
            _ if self.closed => Some((self.end_seq(), self.end_seq())),
            _ => None,
        }
    }

    /// Batches (from the newest back) that make up the burst: enough for
    /// `burst`, or everything since the stream's first packet while it is
    /// younger than [`FIRST_WORDS_NS`].
    fn burst_len(&self, burst: Burst) -> usize {
        let (mut ns, mut bytes, mut n) = (0, 0, 0);
        for b in self.ring.iter().rev() {
            if ns >= burst.ns && bytes >= burst.bytes {
                break;
            }
            ns += b.duration_ns;
            bytes += b.data.len() as u64;
            n += 1;
        }
        n.max(self.first_words_len().unwrap_or(0))
    }

    /// Batches since the stream's first packet, if that is in the ring and
    /// no longer ago than [`FIRST_WORDS_NS`].
    fn first_words_len(&self) -> Option<usize> {
        let start = self.start_seq.filter(|&s| s >= self.first_seq)?;
        let n = (self.end_seq() - start) as usize;
        let ns: u64 = self.ring.iter().rev().take(n).map(|b| b.duration_ns).sum();
        (ns <= FIRST_WORDS_NS).then_some(n)
    }

    /// Sequence number of the first batch of the burst.
    pub(super) fn burst_start(&self, burst: Burst) -> u64 {
        self.end_seq() - self.burst_len(burst) as u64
    }

    /// Adds one batch.
    fn push(&mut self, batch: Batch) {
        self.ring_ns += batch.duration_ns;
        self.ring.push_back(batch);
    }

    /// Drops the oldest batches beyond the burst and `queue_batches + 1`.
    fn trim(&mut self, burst: Burst, queue_batches: usize) {
        let keep = self.burst_len(burst) + queue_batches + 1;
        while self.ring.len() > keep {
            if let Some(front) = self.ring.pop_front() {
                self.ring_ns -= front.duration_ns;
                self.first_seq += 1;
            }
        }
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
    pub(super) burst: Burst,
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
    /// A ring of `format`; `supply` is [`Supply::Idle`] for a lazy one
    /// (its first listener starts the pipeline), else [`Supply::Running`].
    pub(super) fn new(
        stream_id: &str,
        format: Format,
        preamble: Option<Preamble>,
        config: &Mp3Config,
        supply: Supply,
        counters: Arc<PipelineCounters>,
    ) -> Self {
        Self {
            stream_id: stream_id.to_owned(),
            format,
            preamble,
            burst: config.burst(),
            queue_batches: config.listener_queue_batches.max(1),
            shared: Mutex::new(Shared {
                ring: VecDeque::new(),
                first_seq: 0,
                ring_ns: 0,
                closed: false,
                supply,
                start_seq: None,
                warm: (0, 0),
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
        s.push(batch);
        s.trim(self.burst, self.queue_batches);
        self.published(s, frames);
    }

    /// A starting pipeline's first publish: the batches it made from the
    /// stream's recent history (`from_start`: from its first packet), all
    /// at once; the ring runs from now on and listeners that were waiting
    /// take their burst from them.
    pub(super) fn publish_warm(&self, batches: Vec<Batch>, from_start: bool) {
        let frames = batches.iter().map(|b| u64::from(b.frames)).sum();
        let mut s = self.lock();
        if s.closed {
            return;
        }
        s.supply = Supply::Running;
        s.start_seq = from_start.then(|| s.end_seq());
        for batch in batches {
            s.push(batch);
        }
        s.trim(self.burst, self.queue_batches);
        s.warm = (s.burst_start(self.burst), s.end_seq());
        self.published(s, frames);
    }

    /// Wakes every reader after a publish.
    fn published(&self, s: MutexGuard<'_, Shared>, frames: u64) {
        let end = s.end_seq();
        drop(s);
        self.frames_published.fetch_add(frames, Ordering::Relaxed);
        self.wake.notify_all();
        self.published.send_replace(end);
    }

    /// Joins one listener (counted from now): where it starts. Called under
    /// the ring's lock, so the count and the place change together.
    pub(super) fn join(&self, s: &mut Shared) -> Join {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        match s.supply {
            Supply::Running => Join::At(s.burst_start(self.burst)),
            Supply::Warming => Join::Pending { start: false },
            Supply::Idle if s.closed => Join::Pending { start: false },
            Supply::Idle => {
                s.supply = Supply::Warming;
                Join::Pending { start: true }
            }
        }
    }

    /// Turns the ring idle (empty, no pipeline) if nobody listens. Batch
    /// numbers go on from where they were.
    pub(super) fn try_idle(&self) -> bool {
        let mut s = self.lock();
        if self.listener_count() > 0 || s.closed {
            return false;
        }
        s.supply = Supply::Idle;
        s.start_seq = None;
        s.first_seq = s.end_seq();
        s.ring.clear();
        s.ring_ns = 0;
        true
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp3::batch::tests::batch;

    /// A ring of 24 ms, 384-byte batches with this burst.
    fn ring(burst_ms: u32, burst_bytes: u32, supply: Supply) -> Ring {
        let config = Mp3Config {
            burst_ms,
            burst_bytes,
            listener_queue_batches: 4,
            ..Mp3Config::default()
        };
        Ring::new("t", Format::Mp3, None, &config, supply, Arc::default())
    }

    fn burst_len(r: &Ring) -> u64 {
        let s = r.lock();
        s.end_seq() - s.burst_start(r.burst)
    }

    #[test]
    fn burst_takes_both_the_bytes_and_the_time_floor() {
        // Not from the start (no warm-up marked it): plain bursts only.
        let r = ring(100, 3000, Supply::Running);
        for n in 0..200 {
            r.publish(batch(n));
        }
        assert_eq!(
            burst_len(&r),
            8,
            "3000 bytes = 8 × 384 (5 would cover 100 ms)"
        );
        let r = ring(500, 384, Supply::Running);
        for n in 0..200 {
            r.publish(batch(n));
        }
        assert_eq!(
            burst_len(&r),
            21,
            "500 ms = 21 × 24 ms (1 would cover the bytes)"
        );
        let r = ring(0, 0, Supply::Running);
        r.publish(batch(1));
        assert_eq!(burst_len(&r), 0);
        // The ring keeps the burst plus every listener's lag.
        assert_eq!(r.lock().ring.len(), 1);
    }

    #[test]
    fn a_young_stream_bursts_from_its_first_packet() {
        let r = ring(0, 384, Supply::Warming);
        // Warm-up from the stream's start: 10 batches of 24 ms.
        r.publish_warm((0..10).map(batch).collect(), true);
        assert_eq!(burst_len(&r), 10, "everything since the first packet");
        // Up to FIRST_WORDS_NS (3 s = 125 batches) the start stays in the burst.
        for n in 10..125 {
            r.publish(batch(n as u8));
        }
        assert_eq!(burst_len(&r), 125);
        assert_eq!(r.lock().first_seq, 0, "kept in the ring");
        r.publish(batch(0));
        assert_eq!(burst_len(&r), 1, "older than 3 s: the plain burst");
        assert!(r.lock().ring.len() <= 1 + 4 + 1);

        // A warm-up from a history that lost its start never does this.
        let r = ring(0, 384, Supply::Warming);
        r.publish_warm((0..10).map(batch).collect(), false);
        assert_eq!(burst_len(&r), 1);
    }

    #[test]
    fn the_first_listener_of_an_idle_ring_starts_it_and_the_rest_wait() {
        let r = ring(100, 0, Supply::Idle);
        let mut s = r.lock();
        assert_eq!(r.join(&mut s), Join::Pending { start: true });
        assert_eq!(s.supply, Supply::Warming);
        assert_eq!(r.join(&mut s), Join::Pending { start: false });
        drop(s);
        assert_eq!(r.listener_count(), 2);
        assert!(!r.try_idle(), "listeners hold it");
        r.publish_warm((0..10).map(batch).collect(), false);
        let mut s = r.lock();
        assert_eq!(s.supply, Supply::Running);
        assert_eq!(r.join(&mut s), Join::At(10 - 5), "100 ms: 5 batches");
        drop(s);
        r.listener_left();
        r.listener_left();
        r.listener_left();
        assert!(r.try_idle());
        let mut s = r.lock();
        assert_eq!((s.supply, s.ring.len(), s.first_seq), (Supply::Idle, 0, 10));
        assert_eq!(
            r.join(&mut s),
            Join::Pending { start: true },
            "numbers go on"
        );
        drop(s);
        r.listener_left();
        r.close();
        assert!(!r.try_idle(), "a closed ring stays closed");
        let mut s = r.lock();
        s.supply = Supply::Idle;
        assert_eq!(
            r.join(&mut s),
            Join::Pending { start: false },
            "a closed idle ring is never started"
        );
    }
}
