//! Fan-out of one stream's MP3 to many HTTP listeners: owns [`Batcher`]
//! (whole frames → ~200 ms batches), [`Fanout`] (a ring of numbered batches
//! covering the burst and every listener's allowed lag, updated under one
//! lock so joining is atomic) and [`Listener`] (burst, then live batches, as
//! an async HTTP body stream). Listeners whose sockets were handed over after
//! the response head are written by the stream's writer thread
//! (`writer.rs`) from the same ring.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use super::frames::Mp3Frame;
use super::Mp3Config;

/// Target audio duration of one published batch. Each batch is one write
/// per listener; on loopback most of a write's cost is per write (waking the
/// reader), so 200 ms batches cost less than 100 ms ones (measured in
/// `docs/benchmarks.md`) while keeping gaps far below what players buffer.
pub const BATCH_NS: u64 = 200_000_000;

/// A group of whole MP3 frames, published as one refcounted buffer.
///
/// `framed` is the same bytes as one HTTP/1.1 chunk (`{len:x}\r\n` … `\r\n`),
/// built once and written as is to every chunked listener; `data` is a view
/// of the MP3 inside it.
#[derive(Clone, Debug)]
pub struct Batch {
    pub data: Bytes,
    pub framed: Bytes,
    pub frames: u32,
    pub duration_ns: u64,
}

impl Batch {
    pub fn new(data: &[u8], frames: u32, duration_ns: u64) -> Self {
        let head = format!("{:x}\r\n", data.len());
        let mut framed = BytesMut::with_capacity(head.len() + data.len() + 2);
        framed.extend_from_slice(head.as_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(b"\r\n");
        let framed = framed.freeze();
        Self {
            data: framed.slice(head.len()..head.len() + data.len()),
            framed,
            frames,
            duration_ns,
        }
    }
}

/// Groups whole frames until at least [`BATCH_NS`] of audio is pending.
#[derive(Debug, Default)]
pub struct Batcher {
    buf: BytesMut,
    frames: u32,
    duration_ns: u64,
}

impl Batcher {
    /// Adds a frame; returns a batch once ≥ 200 ms is pending.
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
        let batch = Batch::new(&self.buf, self.frames, self.duration_ns);
        self.buf.clear();
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
            let mut data = Vec::with_capacity(group.iter().map(|b| b.data.len()).sum());
            for b in group {
                data.extend_from_slice(&b.data);
            }
            Batch::new(
                &data,
                group.iter().map(|b| b.frames).sum(),
                group.iter().map(|b| b.duration_ns).sum(),
            )
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

/// Everything behind the [`Fanout`] lock.
pub(super) struct Shared {
    /// Recent batches, oldest first: at least the burst window plus
    /// `queue_batches + 1` more, so a listener that lags by up to its limit
    /// still finds the batch it needs.
    pub(super) ring: VecDeque<Batch>,
    /// Sequence number of `ring[0]`.
    pub(super) first_seq: u64,
    /// Audio in the ring.
    ring_ns: u64,
    /// Set by [`Fanout::close`]: listeners get what is in the ring, then end.
    pub(super) closed: bool,
    /// Sockets handed over, not yet taken by the writer thread.
    pub(super) incoming: Vec<Slot>,
    /// Whether the writer thread is running.
    pub(super) writer_running: bool,
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
    fn burst_start(&self, burst_ns: u64) -> u64 {
        self.end_seq() - self.burst_len(burst_ns) as u64
    }
}

/// One stream's MP3 distribution point. Created by [`super::start`].
pub struct Fanout {
    stream_id: String,
    burst_ns: u64,
    pub(super) queue_batches: usize,
    shared: Mutex<Shared>,
    /// Wakes the writer thread: a new batch, a new socket, or the end.
    pub(super) wake: Condvar,
    /// Tells async listeners that the ring moved on (value: `end_seq`).
    published: watch::Sender<u64>,
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
        Arc::new(Self {
            stream_id: stream_id.to_owned(),
            burst_ns: u64::from(config.burst_ms) * 1_000_000,
            queue_batches: config.listener_queue_batches.max(1),
            shared: Mutex::new(Shared {
                ring: VecDeque::new(),
                first_seq: 0,
                ring_ns: 0,
                closed: false,
                incoming: Vec::new(),
                writer_running: false,
            }),
            wake: Condvar::new(),
            published: watch::Sender::new(0),
            listeners: AtomicUsize::new(0),
            frames_published: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            stats,
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave `Shared` inconsistent
        // in a way that matters more than losing the stream; keep serving.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many batches one packet may publish at once (see [`coalesce`]).
    pub(crate) fn max_batches_per_packet(&self) -> usize {
        (self.queue_batches / 4).clamp(1, 8)
    }

    /// Publishes one batch to the ring and so to every listener.
    pub(crate) fn publish(&self, batch: Batch) {
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

    /// Ends the stream: listeners get what is queued, then their bodies end.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        // Flag first: a listener that sees its body end also sees is_closed().
        self.closed.store(true, Ordering::Release);
        s.closed = true;
        let end = s.end_seq();
        drop(s);
        self.wake.notify_all();
        self.published.send_replace(end);
    }

    /// A new async listener: the burst and its place in the ring, taken
    /// atomically.
    pub fn subscribe(self: &Arc<Self>) -> Listener {
        let s = self.lock();
        let start = s.burst_start(self.burst_ns);
        let mut burst = BytesMut::new();
        for b in s.ring.range((start - s.first_seq) as usize..) {
            burst.extend_from_slice(&b.data);
        }
        let next = s.end_seq();
        let rx = self.published.subscribe();
        self.listeners.fetch_add(1, Ordering::Relaxed);
        drop(s);
        Listener {
            burst: burst.freeze(),
            next,
            rx,
            guard: ListenerGuard(Arc::clone(self)),
        }
    }

    /// Hands a listener's socket (its response head already sent) to the
    /// stream's writer thread, which writes the burst, then live batches,
    /// and closes it at the end of the stream.
    pub fn attach(
        self: &Arc<Self>,
        socket: std::net::TcpStream,
        peer: std::net::SocketAddr,
        chunked: bool,
    ) -> io::Result<()> {
        socket.set_nonblocking(true)?;
        let mut s = self.lock();
        let start = s.burst_start(self.burst_ns);
        let allowance = (s.end_seq() - start) as usize + self.queue_batches;
        s.incoming.push(Slot {
            socket,
            peer,
            next: start,
            offset: 0,
            allowance: u32::try_from(allowance).unwrap_or(u32::MAX),
            chunked,
        });
        if !s.writer_running {
            let fanout = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("mp3w-{}", self.stream_id))
                .spawn(move || {
                    let _watch = crate::liveness::Liveness::process()
                        .watch_for_panic("an MP3 writer thread");
                    super::writer::run(fanout)
                });
            if let Err(err) = spawned {
                s.incoming.pop();
                return Err(err);
            }
            s.writer_running = true;
        }
        self.listeners.fetch_add(1, Ordering::Relaxed);
        drop(s);
        self.wake.notify_all();
        Ok(())
    }

    /// One listener (of either kind) has gone.
    pub(super) fn listener_left(&self) {
        self.listeners.fetch_sub(1, Ordering::Relaxed);
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

    /// Counts and logs a listener cut for lagging by `lagged` batches.
    pub(super) fn dropped_slow(&self, lagged: u64) {
        bump(&self.stats.listeners_dropped_slow, 1);
        crate::metrics::metrics().mp3_listeners_dropped_slow.inc();
        tracing::warn!(
            stream_id = %self.stream_id,
            lagged_batches = lagged,
            "mp3 listener too slow, dropping"
        );
    }
}

/// A listener socket owned by the writer thread: a few dozen bytes.
pub(super) struct Slot {
    pub(super) socket: std::net::TcpStream,
    pub(super) peer: std::net::SocketAddr,
    /// Sequence number of the batch being written.
    pub(super) next: u64,
    /// Bytes of that batch already written.
    pub(super) offset: u32,
    /// Batches this listener may be behind before it is cut (its burst
    /// plus `queue_batches`).
    pub(super) allowance: u32,
    /// HTTP/1.1 chunked body (else HTTP/1.0, ended by closing).
    pub(super) chunked: bool,
}

impl Slot {
    /// What of `batch` goes on this listener's wire.
    pub(super) fn body_of<'a>(&self, batch: &'a Batch) -> &'a Bytes {
        if self.chunked {
            &batch.framed
        } else {
            &batch.data
        }
    }
}

struct ListenerGuard(Arc<Fanout>);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.0.listener_left();
    }
}

/// One async HTTP listener of a [`Fanout`] (used where the socket cannot be
/// handed over, e.g. behind TLS). Counts in `listener_count` until dropped
/// (or until the stream from [`into_stream`](Self::into_stream) is dropped).
pub struct Listener {
    burst: Bytes,
    /// Sequence number of the next live batch.
    next: u64,
    rx: watch::Receiver<u64>,
    guard: ListenerGuard,
}

/// What an async listener does next.
enum Step {
    Send(Bytes),
    Wait,
    End,
    Lagged(u64),
}

impl Listener {
    /// The burst (whole frames, possibly empty) this listener starts with.
    pub fn burst(&self) -> &Bytes {
        &self.burst
    }

    fn step(&mut self) -> Step {
        let fanout = &self.guard.0;
        let s = fanout.lock();
        let end = s.end_seq();
        if self.next < s.first_seq || end - self.next > fanout.queue_batches as u64 {
            return Step::Lagged(end.saturating_sub(self.next));
        }
        if self.next < end {
            let batch = &s.ring[(self.next - s.first_seq) as usize];
            self.next += 1;
            return Step::Send(batch.data.clone());
        }
        if s.closed {
            Step::End
        } else {
            Step::Wait
        }
    }

    /// The HTTP body: burst, then live batches; ends after the stream ends;
    /// yields one `Err` (ending the response) if this listener lags by more
    /// than `listener_queue_batches`.
    pub fn into_stream(mut self) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
        let burst = std::mem::take(&mut self.burst);
        let first = (!burst.is_empty()).then_some(Ok(burst));
        let live = futures_util::stream::unfold(Some(self), |state| async move {
            let mut me = state?;
            loop {
                // Mark the current value seen before looking, so a publish
                // in between wakes `changed` below.
                me.rx.borrow_and_update();
                match me.step() {
                    Step::Send(data) => return Some((Ok(data), Some(me))),
                    Step::End => return None,
                    Step::Lagged(n) => {
                        me.guard.0.dropped_slow(n);
                        let err = io::Error::other("mp3 listener too slow");
                        return Some((Err(err), None));
                    }
                    Step::Wait => {
                        if me.rx.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
        });
        futures_util::stream::iter(first).chain(live)
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
        let mut data = frame().data.to_vec();
        data[4] = n;
        Batch::new(&data, 1, 24_000_000)
    }

    fn config(queue: usize, burst_ms: u32) -> Mp3Config {
        Mp3Config {
            burst_ms,
            listener_queue_batches: queue,
            ..Mp3Config::default()
        }
    }

    #[test]
    fn batcher_groups_200ms() {
        let mut b = Batcher::default();
        let f = frame();
        let mut out = Vec::new();
        for _ in 0..12 {
            out.extend(b.push(&f));
        }
        out.extend(b.flush());
        let frames: Vec<u32> = out.iter().map(|b| b.frames).collect();
        assert_eq!(frames, vec![9, 3], "9 × 24 ms ≥ 200 ms, remainder at flush");
        assert_eq!(out[0].data.len(), 9 * 384);
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
