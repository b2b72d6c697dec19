//! Fan-out of one stream's MP3 to many HTTP listeners: owns [`Batcher`]
//! (whole frames → ~100 ms batches), [`Fanout`] (burst ring + broadcast
//! channel, updated under one lock so subscribing is atomic) and [`Listener`]
//! (burst, then live batches, as an HTTP body stream).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::broadcast;

use super::frames::Mp3Frame;
use super::Mp3Config;

/// Target audio duration of one published batch.
pub const BATCH_NS: u64 = 100_000_000;

/// A group of whole MP3 frames, published as one refcounted buffer.
#[derive(Clone, Debug)]
pub struct Batch {
    pub data: Bytes,
    pub frames: u32,
    pub duration_ns: u64,
}

/// Groups whole frames until at least [`BATCH_NS`] of audio is pending.
#[derive(Debug, Default)]
pub struct Batcher {
    buf: BytesMut,
    frames: u32,
    duration_ns: u64,
}

impl Batcher {
    /// Adds a frame; returns a batch once ≥ 100 ms is pending.
    pub fn push(&mut self, frame: &Mp3Frame) -> Option<Batch> {
        self.buf.extend_from_slice(&frame.data);
        self.frames += 1;
        self.duration_ns += frame.header.duration_ns();
        (self.duration_ns >= BATCH_NS).then(|| self.take())
    }

    /// The pending remainder (end of stream), if any.
    pub fn flush(&mut self) -> Option<Batch> {
        (self.frames > 0).then(|| self.take())
    }

    fn take(&mut self) -> Batch {
        let batch = Batch {
            data: self.buf.split().freeze(),
            frames: self.frames,
            duration_ns: self.duration_ns,
        };
        self.frames = 0;
        self.duration_ns = 0;
        batch
    }
}

/// Merges `batches` (in order) into at most `max_groups` batches.
///
/// One packet normally yields zero or one batch, but a long filled gap (up to
/// 10 s of PLC/silence) yields up to ~100 at once; publishing those one by one
/// would push every listener past its lag limit, so they are sent as a few
/// larger batches instead.
pub fn coalesce(batches: Vec<Batch>, max_groups: usize) -> Vec<Batch> {
    let max_groups = max_groups.max(1);
    if batches.len() <= max_groups {
        return batches;
    }
    let per_group = batches.len().div_ceil(max_groups);
    batches
        .chunks(per_group)
        .map(|group| {
            let mut data = BytesMut::with_capacity(group.iter().map(|b| b.data.len()).sum());
            for b in group {
                data.extend_from_slice(&b.data);
            }
            Batch {
                data: data.freeze(),
                frames: group.iter().map(|b| b.frames).sum(),
                duration_ns: group.iter().map(|b| b.duration_ns).sum(),
            }
        })
        .collect()
}

/// Counters shared by the pipeline thread, the sink and status readers.
#[derive(Debug, Default)]
pub struct Stats {
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

/// Point-in-time copy of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
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

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
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

pub(crate) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

struct Shared {
    /// Most recent batches covering at least `burst_ns` (when available).
    ring: VecDeque<Batch>,
    ring_ns: u64,
    /// `None` once closed: receivers drain what is queued, then end.
    tx: Option<broadcast::Sender<Bytes>>,
}

/// One stream's MP3 distribution point. Created by [`super::start`].
pub struct Fanout {
    stream_id: String,
    burst_ns: u64,
    queue_batches: usize,
    shared: Mutex<Shared>,
    listeners: AtomicUsize,
    frames_published: AtomicU64,
    closed: AtomicBool,
    pub(crate) stats: Arc<Stats>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("stream_id", &self.stream_id)
            .field("listeners", &self.listener_count())
            .field("frames_published", &self.frames_published())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Fanout {
    pub(crate) fn new(stream_id: &str, config: &Mp3Config, stats: Arc<Stats>) -> Arc<Self> {
        let queue_batches = config.listener_queue_batches.max(1);
        let (tx, _) = broadcast::channel(queue_batches);
        Arc::new(Self {
            stream_id: stream_id.to_owned(),
            burst_ns: u64::from(config.burst_ms) * 1_000_000,
            queue_batches,
            shared: Mutex::new(Shared {
                ring: VecDeque::new(),
                ring_ns: 0,
                tx: Some(tx),
            }),
            listeners: AtomicUsize::new(0),
            frames_published: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            stats,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave `Shared` inconsistent
        // in a way that matters more than losing the stream; keep serving.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many batches one packet may publish at once (see [`coalesce`]).
    pub(crate) fn max_batches_per_packet(&self) -> usize {
        (self.queue_batches / 4).clamp(1, 8)
    }

    /// Publishes one batch to the burst ring and all live listeners.
    pub(crate) fn publish(&self, batch: Batch) {
        let frames = u64::from(batch.frames);
        let mut s = self.lock();
        let Some(tx) = s.tx.clone() else { return };
        s.ring_ns += batch.duration_ns;
        s.ring.push_back(batch.clone());
        while let Some(front) = s.ring.front() {
            if s.ring_ns - front.duration_ns < self.burst_ns {
                break;
            }
            s.ring_ns -= front.duration_ns;
            s.ring.pop_front();
        }
        // Err only means "no listener right now".
        let _ = tx.send(batch.data);
        self.frames_published.fetch_add(frames, Ordering::Relaxed);
    }

    /// Ends the stream: listeners get what is queued, then their bodies end.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        // Flag first: a listener that sees its body end also sees is_closed().
        self.closed.store(true, Ordering::Release);
        s.tx = None;
    }

    /// A new listener: the burst and the live receiver, taken atomically.
    pub fn subscribe(self: &Arc<Self>) -> Listener {
        let s = self.lock();
        let total: usize = s.ring.iter().map(|b| b.data.len()).sum();
        let mut burst = BytesMut::with_capacity(total);
        for b in &s.ring {
            burst.extend_from_slice(&b.data);
        }
        let rx = s.tx.as_ref().map(broadcast::Sender::subscribe);
        self.listeners.fetch_add(1, Ordering::Relaxed);
        drop(s);
        Listener {
            burst: burst.freeze(),
            rx,
            guard: ListenerGuard(Arc::clone(self)),
        }
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn frames_published(&self) -> u64 {
        self.frames_published.load(Ordering::Relaxed)
    }

    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// Counters of the whole pipeline (packets, concealment, listeners).
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
}

struct ListenerGuard(Arc<Fanout>);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One HTTP listener of a [`Fanout`]. Counts in `listener_count` until dropped
/// (or until the stream from [`into_stream`](Self::into_stream) is dropped).
pub struct Listener {
    burst: Bytes,
    rx: Option<broadcast::Receiver<Bytes>>,
    guard: ListenerGuard,
}

enum Phase {
    Burst,
    Live,
    Done,
}

struct BodyState {
    phase: Phase,
    burst: Bytes,
    rx: Option<broadcast::Receiver<Bytes>>,
    guard: ListenerGuard,
}

impl Listener {
    /// The burst (whole frames, possibly empty) this listener starts with.
    pub fn burst(&self) -> &Bytes {
        &self.burst
    }

    /// The HTTP body: burst, then live batches; ends after the stream ends;
    /// yields one `Err` (ending the response) if this listener lags by more
    /// than `listener_queue_batches`.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
        let state = BodyState {
            phase: Phase::Burst,
            burst: self.burst,
            rx: self.rx,
            guard: self.guard,
        };
        futures_util::stream::unfold(state, |mut st| async move {
            loop {
                match st.phase {
                    Phase::Burst => {
                        st.phase = Phase::Live;
                        if !st.burst.is_empty() {
                            let burst = std::mem::take(&mut st.burst);
                            return Some((Ok(burst), st));
                        }
                    }
                    Phase::Live => {
                        let rx = st.rx.as_mut()?;
                        let lagged = match rx.recv().await {
                            Ok(data) => {
                                // Unread batches including this one.
                                let backlog = rx.len() + 1;
                                if backlog <= st.guard.0.queue_batches {
                                    return Some((Ok(data), st));
                                }
                                backlog as u64
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                            Err(broadcast::error::RecvError::Lagged(n)) => n,
                        };
                        st.phase = Phase::Done;
                        st.rx = None;
                        let fanout = &st.guard.0;
                        bump(&fanout.stats.listeners_dropped_slow, 1);
                        crate::metrics::metrics().mp3_listeners_dropped_slow.inc();
                        tracing::warn!(
                            stream_id = %fanout.stream_id,
                            lagged_batches = lagged,
                            "mp3 listener too slow, dropping"
                        );
                        let err = io::Error::other("mp3 listener too slow");
                        return Some((Err(err), st));
                    }
                    Phase::Done => return None,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp3::frames::parse_header;
    use futures_util::StreamExt;

    fn frame() -> Mp3Frame {
        let header = parse_header([0xFF, 0xFB, 0x94, 0xC4]).expect("header");
        let mut data = vec![0u8; header.frame_len];
        data[..4].copy_from_slice(&[0xFF, 0xFB, 0x94, 0xC4]);
        Mp3Frame {
            data: Bytes::from(data),
            header,
        }
    }

    /// A numbered batch: its first payload byte after the header is `n`.
    fn batch(n: u8) -> Batch {
        let mut data = BytesMut::from(&frame().data[..]);
        data[4] = n;
        Batch {
            data: data.freeze(),
            frames: 1,
            duration_ns: 24_000_000,
        }
    }

    fn config(queue: usize, burst_ms: u32) -> Mp3Config {
        Mp3Config {
            burst_ms,
            listener_queue_batches: queue,
            ..Mp3Config::default()
        }
    }

    #[test]
    fn batcher_groups_100ms() {
        let mut b = Batcher::default();
        let f = frame();
        let mut out = Vec::new();
        for _ in 0..12 {
            out.extend(b.push(&f));
        }
        out.extend(b.flush());
        let frames: Vec<u32> = out.iter().map(|b| b.frames).collect();
        assert_eq!(
            frames,
            vec![5, 5, 2],
            "5 × 24 ms ≥ 100 ms, remainder at flush"
        );
        assert_eq!(out[0].data.len(), 5 * 384);
        assert!(b.flush().is_none());
    }

    #[test]
    fn coalesce_bounds_batches_per_packet() {
        let many: Vec<Batch> = (0..100).map(batch).collect();
        let all: Vec<u8> = many.iter().flat_map(|b| b.data.to_vec()).collect();
        let merged = coalesce(many, 8);
        assert_eq!(merged.len(), 8);
        let joined: Vec<u8> = merged.iter().flat_map(|b| b.data.to_vec()).collect();
        assert_eq!(joined, all, "order and bytes preserved");
        assert_eq!(merged.iter().map(|b| b.frames).sum::<u32>(), 100);
        assert_eq!(
            merged.iter().map(|b| b.duration_ns).sum::<u64>(),
            100 * 24_000_000
        );
        let few: Vec<Batch> = (0..3).map(batch).collect();
        assert_eq!(coalesce(few, 8).len(), 3, "untouched when small");
        assert_eq!(coalesce((0..5).map(batch).collect(), 0).len(), 1);
    }

    #[test]
    fn burst_covers_last_burst_ms_and_subscribe_is_gapless() {
        let fan = Fanout::new("t", &config(64, 100), Arc::default());
        for n in 0..10 {
            fan.publish(batch(n));
        }
        let l = fan.subscribe();
        // 24 ms batches, burst 100 ms → the last 5 (120 ms ≥ 100 ms, 96 ms < 100).
        let ids: Vec<u8> = l.burst().chunks(384).map(|c| c[4]).collect();
        assert_eq!(ids, vec![5, 6, 7, 8, 9]);
        assert_eq!(fan.listener_count(), 1);
        fan.publish(batch(10));
        fan.close();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let items: Vec<_> = rt.block_on(l.into_stream().collect::<Vec<_>>());
        let bytes: Vec<u8> = items
            .into_iter()
            .flat_map(|r| r.expect("ok").to_vec())
            .collect();
        let ids: Vec<u8> = bytes.chunks(384).map(|c| c[4]).collect();
        assert_eq!(ids, vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(fan.listener_count(), 0, "dropped stream decrements");
        assert!(fan.is_closed());
        assert_eq!(fan.frames_published(), 11);
    }

    #[tokio::test]
    async fn slow_listener_is_dropped_fast_one_gets_everything() {
        let queue = 4;
        let fan = Fanout::new("t", &config(queue, 0), Arc::default());
        let slow = fan.subscribe().into_stream();
        let mut fast = Box::pin(fan.subscribe().into_stream());
        assert_eq!(fan.listener_count(), 2);
        let total = 3 * queue as u8 + 5;
        let mut got = Vec::new();
        for n in 0..total {
            fan.publish(batch(n));
            let item = fast.next().await.expect("item").expect("ok");
            got.push(item[4]);
        }
        fan.close();
        assert!(fast.next().await.is_none(), "fast listener ends cleanly");
        assert_eq!(got, (0..total).collect::<Vec<_>>());

        let items: Vec<_> = slow.collect().await;
        assert_eq!(items.len(), 1, "slow listener gets exactly one error");
        let err = items.into_iter().next().expect("one").expect_err("error");
        assert_eq!(err.kind(), io::ErrorKind::Other);
        assert_eq!(fan.stats().listeners_dropped_slow, 1);
        assert_eq!(fan.listener_count(), 0);
    }

    #[tokio::test]
    async fn backlog_over_limit_errors_even_below_channel_capacity() {
        // 5 rounds up to a channel of 8; the listener must still be cut at 5.
        let fan = Fanout::new("t", &config(5, 0), Arc::default());
        let mut l = Box::pin(fan.subscribe().into_stream());
        for n in 0..5 {
            fan.publish(batch(n));
        }
        assert_eq!(l.next().await.expect("item").expect("ok")[4], 0);
        for n in 5..7 {
            fan.publish(batch(n));
        }
        // 6 unread > 5: cut.
        assert!(l.next().await.expect("item").is_err());
        assert!(l.next().await.is_none());
    }

    #[tokio::test]
    async fn subscribe_after_close_gets_burst_then_end() {
        let fan = Fanout::new("t", &config(8, 1000), Arc::default());
        fan.publish(batch(1));
        fan.close();
        fan.publish(batch(2)); // ignored after close
        let items: Vec<_> = fan.subscribe().into_stream().collect().await;
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].as_ref().expect("ok")[4], 1);
    }
}
