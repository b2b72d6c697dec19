//! Outgoing datagrams of the relay, batched: one `sendmmsg(2)` call sends up
//! to [`BATCH`] datagrams, so forwarding one packet to a thousand receivers
//! costs a few dozen syscalls instead of a thousand.
//!
//! Packets a peer sends over ICE-TCP are only collected here (in order, with
//! their destination), for the relay thread to write to their connections
//! after the datagrams went.
//!
//! A forwarded copy carries the instant its sender packet arrived; when the
//! kernel takes the copy, the time since then is the latency the relay added,
//! recorded in a thread-local histogram merged into `/metrics`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Instant;

use prometheus::local::LocalHistogram;
use socket2::SockAddr;

use crate::metrics::metrics;

/// Datagrams per `sendmmsg` call.
pub const BATCH: usize = 64;
/// Bound on queued datagrams; beyond it the oldest batch is flushed at once.
const MAX_QUEUED: usize = 4 * BATCH;

/// Datagrams queued for one socket, sent in batches by [`Outbox::flush`].
pub struct Outbox {
    fd: RawFd,
    queue: Vec<Datagram>,
    /// Packets for ICE-TCP connections, by remote address.
    tcp: Vec<(SocketAddr, Vec<u8>)>,
    /// Relay-added latency of forwarded copies (merged on `publish` / drop).
    latency: LocalHistogram,
    /// Datagrams the kernel refused (buffer full or an unreachable peer).
    pub dropped: u64,
    /// Datagrams sent.
    pub sent: u64,
    /// `sendmmsg` calls made.
    pub calls: u64,
}

struct Datagram {
    to: SocketAddr,
    data: Vec<u8>,
    /// For a forwarded copy: when its sender packet reached our socket.
    arrived: Option<Instant>,
}

impl Outbox {
    /// An empty outbox for the socket `fd` (which outlives it).
    pub fn new(fd: RawFd) -> Self {
        Outbox {
            fd,
            queue: Vec::new(),
            tcp: Vec::new(),
            latency: metrics().forward_latency.local(),
            dropped: 0,
            sent: 0,
            calls: 0,
        }
    }

    /// An empty outbox on the same socket as this one.
    pub fn sibling(&self) -> Outbox {
        Outbox::new(self.fd)
    }

    /// Queues a datagram of str0m's (STUN, DTLS, SRTCP).
    pub fn push(&mut self, to: SocketAddr, data: Vec<u8>) {
        self.enqueue(to, data, None);
    }

    /// Queues a forwarded copy of a sender packet that arrived at `arrived`.
    pub fn push_forward(&mut self, to: SocketAddr, data: Vec<u8>, arrived: Instant) {
        self.enqueue(to, data, Some(arrived));
    }

    /// Queues a packet for the ICE-TCP connection from `to`.
    pub fn push_tcp(&mut self, to: SocketAddr, data: Vec<u8>) {
        self.tcp.push((to, data));
    }

    /// Moves the queued ICE-TCP packets into `into` (which is empty).
    pub fn take_tcp(&mut self, into: &mut Vec<(SocketAddr, Vec<u8>)>) {
        std::mem::swap(&mut self.tcp, into);
    }

    fn enqueue(&mut self, to: SocketAddr, data: Vec<u8>, arrived: Option<Instant>) {
        self.queue.push(Datagram { to, data, arrived });
        if self.queue.len() >= MAX_QUEUED {
            self.flush();
        }
    }

    /// Merges the latency observations into the shared histogram.
    pub fn publish_latency(&self) {
        self.latency.flush();
    }

    /// Adds the counters of another (flushed) outbox on the same socket,
    /// and takes its ICE-TCP packets.
    pub fn absorb(&mut self, mut other: Outbox) {
        self.tcp.append(&mut other.tcp);
        self.sent += other.sent;
        self.dropped += other.dropped;
        self.calls += other.calls;
    }

    /// Takes the queued datagrams instead of sending them.
    #[cfg(test)]
    pub fn take_queued(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.queue.drain(..).map(|d| (d.to, d.data)).collect()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Sends everything queued. Datagrams the kernel will not take now are
    /// dropped (UDP: the receiver's jitter buffer copes; nothing queues up).
    pub fn flush(&mut self) {
        let mut start = 0;
        while start < self.queue.len() {
            let end = (start + BATCH).min(self.queue.len());
            match send_batch(self.fd, &self.queue[start..end]) {
                Ok(0) => {
                    self.dropped += 1;
                    start += 1;
                }
                Ok(n) => {
                    let now = Instant::now();
                    for d in &self.queue[start..start + n] {
                        if let Some(t) = d.arrived {
                            self.latency
                                .observe(now.saturating_duration_since(t).as_secs_f64());
                        }
                    }
                    self.sent += n as u64;
                    start += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The first datagram of the batch failed (EAGAIN, or an
                    // error about that one destination): drop it, go on.
                    tracing::trace!(error = %e, to = %self.queue[start].to, "udp send failed");
                    self.dropped += 1;
                    start += 1;
                }
            }
            self.calls += 1;
        }
        self.queue.clear();
    }
}

/// One `sendmmsg` call for up to [`BATCH`] datagrams; returns how many went.
fn send_batch(fd: RawFd, items: &[Datagram]) -> io::Result<usize> {
    let n = items.len().min(BATCH);
    let addrs: Vec<SockAddr> = items[..n].iter().map(|d| SockAddr::from(d.to)).collect();
    // SAFETY: zeroed iovec / mmsghdr are valid "empty" values; every pointer
    // stored below points into `items`, `addrs` or `iovs`, all of which
    // outlive the sendmmsg call, with their true lengths.
    unsafe {
        let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
        let mut msgs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        for (i, (Datagram { data, .. }, addr)) in items[..n].iter().zip(&addrs).enumerate() {
            iovs[i].iov_base = data.as_ptr() as *mut libc::c_void;
            iovs[i].iov_len = data.len();
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = addr.len();
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
        }
        // The flags are `c_int` on glibc and `c_uint` on musl: `as _` fits both.
        let r = libc::sendmmsg(
            fd,
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT as _,
        );
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn sends_batches_larger_than_one_call() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut out = Outbox::new(tx.as_raw_fd());
        let total = BATCH * 2 + 7;
        for i in 0..total {
            out.push(to, vec![(i % 251) as u8; 1 + i % 100]);
        }
        out.flush();
        assert!(out.is_empty());
        assert_eq!(out.sent as usize, total);
        assert_eq!(out.calls, 3);
        let mut buf = [0u8; 256];
        for i in 0..total {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(n, 1 + i % 100, "datagram {i} in order and whole");
            assert!(buf[..n].iter().all(|b| *b == (i % 251) as u8));
        }
    }
}
