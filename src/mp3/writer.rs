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

use std::io::{self, IoSlice, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fanout::{Batch, Fanout, Slot};

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

/// What became of a slot after a write pass.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Everything published so far is written.
    CaughtUp,
    /// The socket is full; retry later.
    Blocked,
    /// Behind by more than its allowance: cut it.
    Slow(u64),
    /// The peer went away (or the socket failed).
    Gone,
}

pub(super) fn run(fanout: Arc<Fanout>) {
    RUNNING.fetch_add(1, Ordering::AcqRel);
    let mut slots: Vec<Slot> = Vec::new();
    let mut ring: Vec<Batch> = Vec::new();
    let mut seen_end = 0;
    let mut blocked = false;
    let mut closed_seen = false;
    let mut end_deadline: Option<Instant> = None;
    tracing::debug!(stream_id = fanout.stream_id(), "mp3 writer started");
    loop {
        // Wait for work, then take a cheap copy of the ring (refcounts).
        let (first_seq, closed) = {
            let mut s = fanout.lock();
            loop {
                let fresh =
                    !s.incoming.is_empty() || s.end_seq() != seen_end || (s.closed && !closed_seen);
                if fresh || (s.closed && slots.is_empty()) {
                    break;
                }
                if blocked {
                    let (guard, timeout) = fanout
                        .wake
                        .wait_timeout(s, RETRY)
                        .unwrap_or_else(|e| e.into_inner());
                    s = guard;
                    if timeout.timed_out() {
                        break;
                    }
                } else {
                    s = fanout.wake.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
            slots.append(&mut s.incoming);
            if s.closed && slots.is_empty() {
                s.writer_running = false;
                break;
            }
            closed_seen = s.closed;
            seen_end = s.end_seq();
            ring.clear();
            ring.extend(s.ring.iter().cloned());
            (s.first_seq, s.closed)
        };
        let end_seq = first_seq + ring.len() as u64;
        blocked = false;
        let mut i = 0;
        while i < slots.len() {
            let outcome = write_slot(&mut slots[i], &ring, first_seq, end_seq);
            match outcome {
                Outcome::CaughtUp if closed => finish(slots.swap_remove(i), &fanout),
                Outcome::CaughtUp => i += 1,
                Outcome::Blocked => {
                    blocked = true;
                    i += 1;
                }
                Outcome::Slow(lagged) => {
                    fanout.dropped_slow(lagged);
                    drop(slots.swap_remove(i));
                    fanout.listener_left();
                }
                Outcome::Gone => {
                    let slot = slots.swap_remove(i);
                    tracing::info!(stream_id = fanout.stream_id(), peer = %slot.peer, "mp3 listener left");
                    fanout.listener_left();
                }
            }
        }
        if closed {
            let deadline = *end_deadline.get_or_insert_with(|| Instant::now() + END_GRACE);
            if Instant::now() >= deadline {
                for slot in slots.drain(..) {
                    tracing::info!(stream_id = fanout.stream_id(), peer = %slot.peer, "mp3 listener cut at stream end: not reading");
                    fanout.listener_left();
                }
            }
        }
    }
    RUNNING.fetch_sub(1, Ordering::AcqRel);
    tracing::debug!(stream_id = fanout.stream_id(), "mp3 writer finished");
}

/// The stream has ended and this listener has everything: end its body.
fn finish(slot: Slot, fanout: &Fanout) {
    if slot.chunked {
        // Best effort: five bytes into a socket that just took everything.
        let _ = (&slot.socket).write(LAST_CHUNK);
    }
    let _ = slot.socket.shutdown(Shutdown::Write);
    fanout.listener_left();
}

/// Writes as much of `ring[slot.next..]` to the slot's socket as it takes.
fn write_slot(slot: &mut Slot, ring: &[Batch], first_seq: u64, end_seq: u64) -> Outcome {
    loop {
        if slot.next < first_seq || end_seq - slot.next > u64::from(slot.allowance) {
            return Outcome::Slow(end_seq.saturating_sub(slot.next));
        }
        if slot.next == end_seq {
            return Outcome::CaughtUp;
        }
        let pending = &ring[(slot.next - first_seq) as usize..];
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        let mut total = 0;
        for (k, batch) in pending.iter().take(MAX_IOV).enumerate() {
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
            Ok(0) => return Outcome::Gone,
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Outcome::Gone,
        };
        advance(slot, pending, written);
        if written < total {
            return Outcome::Blocked;
        }
    }
}

/// Moves the slot's position on by `written` bytes.
fn advance(slot: &mut Slot, pending: &[Batch], mut written: usize) {
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
        }
    }

    #[test]
    fn writes_chunked_batches_in_order() {
        let (mut client, server) = pair();
        let ring: Vec<Batch> = (0..3).map(|n| batch(n, 5)).collect();
        let mut s = slot(server, true, 8);
        assert_eq!(write_slot(&mut s, &ring, 10, 13), Outcome::CaughtUp);
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
        assert_eq!(write_slot(&mut s, &big[..20], 10, 30), Outcome::Blocked);
        assert!(s.next < 30);
        // The ring moved on past the allowance.
        assert!(matches!(write_slot(&mut s, &big, 10, 50), Outcome::Slow(_)));
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
            if outcome == Outcome::Gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            s.next = 10;
            outcome = write_slot(&mut s, &ring[..1], 10, 11);
        }
        assert_eq!(outcome, Outcome::Gone);
    }
}
