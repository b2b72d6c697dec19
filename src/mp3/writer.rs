//! The writer thread of one stream (`mp3w-<stream_id>`): owns the sockets of
//! the listeners handed over by the HTTP layer after their response head, and
//! writes the shared ring's batches to each with non-blocking vectored
//! writes. Per listener it keeps only a [`Slot`] (socket, position, lag
//! allowance); the bytes are the refcounted batches every listener shares.
//!
//! A socket that cannot take more is simply retried on the next wake-up (the
//! next batch, ~200 ms later); one that falls further behind than its
//! allowance is cut. When the stream ends, what is queued is written, a
//! chunked body gets its last chunk, and the sockets are closed.
//!
//! Sockets reach the thread through the stream's [`Writer`] (its own lock;
//! the first one starts the thread); batches through the [`Ring`].

use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};

use super::batch::Batch;
use super::ring::{Join, Ring};
use crate::sync::{lock, wait, wait_timeout};

/// Retry interval for sockets that could not take everything, when no new
/// batch arrives sooner.
const RETRY: Duration = Duration::from_millis(50);
/// How long a stream's end waits for slow sockets to take what is queued.
const END_GRACE: Duration = Duration::from_secs(2);
/// Batches gathered into one `writev`.
const MAX_IOV: usize = 16;
/// The last chunk of a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Writer threads alive (so shutdown can let them finish).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Waits up to `limit` for every writer thread to finish its stream.
pub fn wait_idle(limit: Duration) {
    let deadline = Instant::now() + limit;
    while RUNNING.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A listener socket owned by the writer thread: a few dozen bytes.
struct Slot {
    socket: TcpStream,
    peer: SocketAddr,
    /// Sequence number of the batch being written.
    next: u64,
    /// Bytes of that batch already written.
    offset: u32,
    /// Batches this listener may be behind before it is cut (its burst
    /// plus `queue_batches`).
    allowance: u32,
    /// HTTP/1.1 chunked body (else HTTP/1.0, ended by closing).
    chunked: bool,
    /// Its format has a preamble it has not had yet.
    needs_preamble: bool,
    /// What is left to write of its preamble, before batch `next`.
    lead: Bytes,
    /// It joined before the pipeline's first publish: its place (and
    /// allowance) are taken then.
    pending: bool,
}

impl Slot {
    /// Before its first batch, takes this listener's preamble (made from
    /// that batch; framed as a chunk when chunked) as the bytes to write first.
    fn take_preamble(&mut self, ring: &Ring, batches: &[Batch], first_seq: u64) {
        if !self.needs_preamble || self.next < first_seq {
            return;
        }
        let Some(first) = batches.get((self.next - first_seq) as usize) else {
            return;
        };
        self.needs_preamble = false;
        let Some(preamble) = ring.preamble_for(first) else {
            return;
        };
        self.lead = if self.chunked {
            Batch::new(&preamble, 0, 0).framed
        } else {
            preamble
        };
    }

    /// What of `batch` goes on this listener's wire.
    fn body_of<'a>(&self, batch: &'a Batch) -> &'a bytes::Bytes {
        if self.chunked {
            &batch.framed
        } else {
            &batch.data
        }
    }
}

/// Sockets handed over, not yet taken by the writer thread.
#[derive(Default)]
struct Inbox {
    slots: Vec<Slot>,
    /// Whether the writer thread is running.
    running: bool,
}

/// One stream's way to its writer thread.
#[derive(Default)]
pub(super) struct Writer {
    inbox: Arc<Mutex<Inbox>>,
}

impl Writer {
    /// Queues a listener's socket for the writer thread (starting it if
    /// needed); it starts at the burst of `ring`. The `bool` says that this
    /// listener must start the ring's pipeline.
    pub(super) fn attach(
        &self,
        ring: &Arc<Ring>,
        socket: TcpStream,
        peer: SocketAddr,
        chunked: bool,
    ) -> io::Result<bool> {
        socket.set_nonblocking(true)?;
        self.ensure_thread(ring)?;
        let mut slot = Slot {
            socket,
            peer,
            next: 0,
            offset: 0,
            allowance: 0,
            chunked,
            needs_preamble: ring.preamble.is_some(),
            lead: Bytes::new(),
            pending: false,
        };
        // The ring's lock is never taken inside the inbox's (the thread
        // takes them the other way round).
        let start = {
            let mut s = ring.lock();
            match ring.join(&mut s) {
                Join::At(start) => {
                    slot.place(start, s.end_seq(), ring.queue_batches);
                    false
                }
                Join::Pending { start } => {
                    slot.pending = true;
                    start
                }
            }
        };
        let mut inbox = lock(&self.inbox);
        if inbox.running {
            inbox.slots.push(slot);
        } else {
            // The stream ended and its thread finished meanwhile.
            ring.listener_left();
        }
        drop(inbox);
        ring.wake_writer();
        Ok(start)
    }

    /// Starts the writer thread unless it runs.
    fn ensure_thread(&self, ring: &Arc<Ring>) -> io::Result<()> {
        let mut inbox = lock(&self.inbox);
        if inbox.running {
            return Ok(());
        }
        let (thread_ring, thread_inbox) = (Arc::clone(ring), Arc::clone(&self.inbox));
        std::thread::Builder::new()
            .name(format!("mp3w-{}", ring.stream_id))
            .spawn(move || {
                let _watch =
                    crate::liveness::Liveness::process().watch_for_panic("an MP3 writer thread");
                run(thread_ring, thread_inbox)
            })?;
        inbox.running = true;
        Ok(())
    }
}

impl Slot {
    /// Starts this listener at batch `start`, allowed to lag its burst
    /// (up to `end`) plus `queue_batches`.
    fn place(&mut self, start: u64, end: u64, queue_batches: usize) {
        let allowance = (end - start) as usize + queue_batches;
        self.next = start;
        self.allowance = u32::try_from(allowance).unwrap_or(u32::MAX);
        self.pending = false;
    }
}

/// What became of a slot after a write pass.
#[derive(Debug, PartialEq, Eq)]
enum WriteOutcome {
    /// Everything published so far is written.
    CaughtUp,
    /// The socket is full; retry later.
    Blocked,
    /// Behind by more than its allowance: cut it.
    Slow(u64),
    /// The peer went away (or the socket failed).
    Gone,
}

/// What one write pass works from.
struct Pass {
    /// Sequence number of the first batch copied.
    first_seq: u64,
    /// The stream has ended.
    closed: bool,
    /// Where listeners that joined while the ring warmed start, and the end
    /// their allowance counts from, once known.
    pending: Option<(u64, u64)>,
}

/// The writer thread's state.
struct Thread {
    ring: Arc<Ring>,
    inbox: Arc<Mutex<Inbox>>,
    slots: Vec<Slot>,
    /// A cheap copy (refcounts) of the ring's batches.
    batches: Vec<Batch>,
    /// The ring's `end_seq` when last copied.
    seen_end: u64,
    /// Some socket could not take everything: retry soon.
    blocked: bool,
    closed_seen: bool,
    /// When the stream has ended: the time slow sockets are cut.
    end_deadline: Option<Instant>,
}

fn run(ring: Arc<Ring>, inbox: Arc<Mutex<Inbox>>) {
    RUNNING.fetch_add(1, Ordering::AcqRel);
    tracing::debug!(stream_id = %ring.stream_id, "mp3 writer started");
    let mut thread = Thread {
        ring,
        inbox,
        slots: Vec::new(),
        batches: Vec::new(),
        seen_end: 0,
        blocked: false,
        closed_seen: false,
        end_deadline: None,
    };
    while let Some(pass) = thread.wait_for_work() {
        thread.write_pass(pass.first_seq, pass.closed, pass.pending);
        if pass.closed {
            thread.cut_at_end();
        }
    }
    RUNNING.fetch_sub(1, Ordering::AcqRel);
    tracing::debug!(stream_id = %thread.ring.stream_id, "mp3 writer finished");
}

impl Thread {
    /// Waits for a new batch, a new socket, the end, or (when blocked) the
    /// retry time; takes the new sockets and a copy of the ring. Returns
    /// the first sequence number, whether the stream has ended and where a
    /// listener that joined while the ring warmed starts (and the end its
    /// allowance counts from), once that is known; or `None` when the
    /// thread is done (ended, every socket finished).
    fn wait_for_work(&mut self) -> Option<Pass> {
        let mut s = self.ring.lock();
        loop {
            let arrived = !lock(&self.inbox).slots.is_empty();
            let fresh = arrived || s.end_seq() != self.seen_end || (s.closed && !self.closed_seen);
            if fresh || (s.closed && self.slots.is_empty()) {
                break;
            }
            if !self.blocked {
                s = wait(self.ring.wake(), s);
                continue;
            }
            let (guard, timeout) = wait_timeout(self.ring.wake(), s, RETRY);
            s = guard;
            if timeout.timed_out() {
                break;
            }
        }
        let mut inbox = lock(&self.inbox);
        self.slots.append(&mut inbox.slots);
        if s.closed && self.slots.is_empty() {
            inbox.running = false;
            return None;
        }
        self.closed_seen = s.closed;
        self.seen_end = s.end_seq();
        self.batches.clear();
        self.batches.extend(s.ring.iter().cloned());
        Some(Pass {
            first_seq: s.first_seq,
            closed: s.closed,
            pending: s.pending_start(),
        })
    }

    /// Writes to every socket what it can take; finishes, cuts or drops
    /// sockets by their outcome.
    fn write_pass(&mut self, first_seq: u64, closed: bool, pending: Option<(u64, u64)>) {
        let end_seq = first_seq + self.batches.len() as u64;
        self.blocked = false;
        let mut i = 0;
        while i < self.slots.len() {
            if self.slots[i].pending {
                let Some((start, warm_end)) = pending else {
                    i += 1;
                    continue;
                };
                self.slots[i].place(start, warm_end, self.ring.queue_batches);
            }
            self.slots[i].take_preamble(&self.ring, &self.batches, first_seq);
            let outcome = write_slot(&mut self.slots[i], &self.batches, first_seq, end_seq);
            match outcome {
                WriteOutcome::CaughtUp if closed => finish(self.slots.swap_remove(i), &self.ring),
                WriteOutcome::CaughtUp => i += 1,
                WriteOutcome::Blocked => {
                    self.blocked = true;
                    i += 1;
                }
                WriteOutcome::Slow(lagged) => {
                    self.ring.dropped_slow(lagged);
                    drop(self.slots.swap_remove(i));
                    self.ring.listener_left();
                }
                WriteOutcome::Gone => {
                    let slot = self.slots.swap_remove(i);
                    tracing::info!(stream_id = %self.ring.stream_id, peer = %slot.peer, "listener left");
                    self.ring.listener_left();
                }
            }
        }
    }

    /// After the stream's end, sockets that have not taken everything within
    /// the grace time are cut.
    fn cut_at_end(&mut self) {
        let deadline = *self
            .end_deadline
            .get_or_insert_with(|| Instant::now() + END_GRACE);
        if Instant::now() < deadline {
            return;
        }
        for slot in self.slots.drain(..) {
            tracing::info!(stream_id = %self.ring.stream_id, peer = %slot.peer, "listener cut at stream end: not reading");
            self.ring.listener_left();
        }
    }
}

/// The stream has ended and this listener has everything: end its body.
fn finish(slot: Slot, ring: &Ring) {
    if slot.chunked {
        // Best effort: five bytes into a socket that just took everything.
        let _ = (&slot.socket).write(LAST_CHUNK);
    }
    let _ = slot.socket.shutdown(Shutdown::Write);
    ring.listener_left();
}

/// Writes as much of `ring[slot.next..]` to the slot's socket as it takes.
fn write_slot(slot: &mut Slot, ring: &[Batch], first_seq: u64, end_seq: u64) -> WriteOutcome {
    loop {
        if slot.next < first_seq || end_seq - slot.next > u64::from(slot.allowance) {
            return WriteOutcome::Slow(end_seq.saturating_sub(slot.next));
        }
        if slot.next == end_seq {
            return WriteOutcome::CaughtUp;
        }
        let pending = &ring[(slot.next - first_seq) as usize..];
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        let mut total = 0;
        if !slot.lead.is_empty() {
            iov[0] = IoSlice::new(&slot.lead);
            n = 1;
            total = slot.lead.len();
        }
        for (k, batch) in pending.iter().take(MAX_IOV - n).enumerate() {
            let bytes = slot.body_of(batch);
            let bytes = if k == 0 {
                &bytes[(slot.offset as usize).min(bytes.len())..]
            } else {
                &bytes[..]
            };
            iov[n] = IoSlice::new(bytes);
            n += 1;
            total += bytes.len();
        }
        let written = match (&slot.socket).write_vectored(&iov[..n]) {
            Ok(0) => return WriteOutcome::Gone,
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WriteOutcome::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return WriteOutcome::Gone,
        };
        let from_lead = written.min(slot.lead.len());
        slot.lead.advance(from_lead);
        advance(slot, pending, written - from_lead);
        if written < total {
            return WriteOutcome::Blocked;
        }
    }
}

/// Moves the slot's position on by `written` bytes.
fn advance(slot: &mut Slot, pending: &[Batch], mut written: usize) {
    if written == 0 {
        return;
    }
    for batch in pending {
        let len = slot.body_of(batch).len();
        let left = len - (slot.offset as usize).min(len);
        if written < left {
            slot.offset += written as u32;
            return;
        }
        written -= left;
        slot.next += 1;
        slot.offset = 0;
        if written == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    fn batch(n: u8, len: usize) -> Batch {
        Batch::new(&vec![n; len], 1, 24_000_000)
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        b.set_nonblocking(true).expect("nonblocking");
        (a, b)
    }

    fn slot(socket: TcpStream, chunked: bool, allowance: u32) -> Slot {
        let peer = socket.peer_addr().expect("peer");
        Slot {
            socket,
            peer,
            next: 10,
            offset: 0,
            allowance,
            chunked,
            needs_preamble: false,
            lead: Bytes::new(),
            pending: false,
        }
    }

    #[test]
    fn writes_chunked_batches_in_order() {
        let (mut client, server) = pair();
        let ring: Vec<Batch> = (0..3).map(|n| batch(n, 5)).collect();
        let mut s = slot(server, true, 8);
        assert_eq!(write_slot(&mut s, &ring, 10, 13), WriteOutcome::CaughtUp);
        assert_eq!(s.next, 13);
        drop(s);
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("read");
        assert_eq!(
            got,
            b"5\r\n\0\0\0\0\0\r\n5\r\n\x01\x01\x01\x01\x01\r\n5\r\n\x02\x02\x02\x02\x02\r\n"
        );
    }

    #[test]
    fn preamble_goes_first_even_when_written_in_pieces() {
        let (client, server) = pair();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .expect("sndbuf");
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(4096)
            .expect("rcvbuf");
        let lead: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let ring: Vec<Batch> = (0..3).map(|n| batch(n, 1000)).collect();
        let mut s = slot(server, false, 8);
        s.lead = Bytes::from(lead.clone());
        // Nobody reads yet: 64 KiB cannot fit in the socket buffers.
        assert_eq!(write_slot(&mut s, &ring, 10, 13), WriteOutcome::Blocked);
        assert!(!s.lead.is_empty() && s.next == 10, "still in the preamble");
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            (&client).read_to_end(&mut got).expect("read");
            got
        });
        while write_slot(&mut s, &ring, 10, 13) != WriteOutcome::CaughtUp {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(s.lead.is_empty());
        drop(s);
        let got = reader.join().expect("reader");
        let mut want = lead;
        for n in 0..3u8 {
            want.extend(std::iter::repeat_n(n, 1000));
        }
        assert_eq!(got.len(), want.len());
        assert!(got == want, "preamble, then the batches, in order");
    }

    #[test]
    fn advance_tracks_partial_writes() {
        let (_client, server) = pair();
        let ring: Vec<Batch> = (0..3).map(|n| batch(n, 10)).collect();
        let mut s = slot(server, false, 8);
        advance(&mut s, &ring, 4);
        assert_eq!((s.next, s.offset), (10, 4));
        advance(&mut s, &ring, 6 + 3);
        assert_eq!((s.next, s.offset), (11, 3));
        advance(&mut s, &ring[1..], 7 + 10);
        assert_eq!((s.next, s.offset), (13, 0));
    }

    #[test]
    fn stalled_reader_blocks_then_is_cut() {
        let (_client, server) = pair();
        // Tiny buffers so the socket fills quickly.
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .expect("sndbuf");
        let big: Vec<Batch> = (0..40).map(|n| batch(n, 16 * 1024)).collect();
        let mut s = slot(server, false, 30);
        assert_eq!(
            write_slot(&mut s, &big[..20], 10, 30),
            WriteOutcome::Blocked
        );
        assert!(s.next < 30);
        // The ring moved on past the allowance.
        assert!(matches!(
            write_slot(&mut s, &big, 10, 50),
            WriteOutcome::Slow(_)
        ));
    }

    #[test]
    fn closed_peer_is_gone() {
        let (client, server) = pair();
        drop(client);
        let ring: Vec<Batch> = (0..4).map(|n| batch(n, 1000)).collect();
        let mut s = slot(server, false, 8);
        // The first write may still succeed (the RST comes back after it).
        let mut outcome = write_slot(&mut s, &ring[..1], 10, 11);
        for _ in 0..50 {
            if outcome == WriteOutcome::Gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            s.next = 10;
            outcome = write_slot(&mut s, &ring[..1], 10, 11);
        }
        assert_eq!(outcome, WriteOutcome::Gone);
    }
}
