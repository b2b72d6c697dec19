//! A push leg's own UDP socket in the relay: registered in the relay's poll
//! under a token of its own, it carries everything of that one leg (its
//! STUN checks, DTLS, RTCP and forwarded SRTP copies) and every datagram
//! read from it belongs to that leg. It is closed when the leg is freed.

use std::io::{self, ErrorKind};
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::handle::PushSocket;

/// Poll tokens from here on are push legs' sockets (below: the relay socket,
/// its waker and the ICE-TCP connections).
pub(super) const FIRST_TOKEN: usize = usize::MAX / 2;

pub(super) struct LegSocket {
    socket: UdpSocket,
    pub token: Token,
    /// The address str0m is told datagrams arrive on: the leg's candidate.
    pub label: SocketAddr,
}

impl LegSocket {
    /// Takes over a push leg's socket and registers it under `token`.
    pub fn register(push: PushSocket, registry: &Registry, token: Token) -> io::Result<Self> {
        let PushSocket(socket, label) = push;
        let mut socket = UdpSocket::from_std(socket);
        registry.register(&mut socket, token, Interest::READABLE)?;
        Ok(LegSocket {
            socket,
            token,
            label,
        })
    }

    /// Sends one datagram. One the kernel will not take now is dropped, as
    /// on the relay socket; `Err` is a failed socket (its leg closes).
    pub fn send(&self, to: SocketAddr, data: &[u8]) -> io::Result<()> {
        loop {
            match self.socket.send_to(data, to) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one datagram; `WouldBlock` when there is none.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf)
    }

    /// Makes the poll report the socket again if it is still readable.
    pub fn rearm(&mut self, registry: &Registry) {
        let _ = registry.reregister(&mut self.socket, self.token, Interest::READABLE);
    }

    /// Leaves the poll; the socket closes when `self` is dropped.
    pub fn deregister(mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::Poll;

    #[test]
    fn a_leg_socket_carries_its_datagrams_both_ways_and_reports_an_empty_queue() {
        let poll = Poll::new().expect("poll");
        let std = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        std.set_nonblocking(true).expect("nonblocking");
        let addr = std.local_addr().expect("addr");
        let token = Token(FIRST_TOKEN);
        let own =
            LegSocket::register(PushSocket(std, addr), poll.registry(), token).expect("registered");
        assert_eq!((own.token, own.label), (token, addr));
        let far = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        far.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        own.send(far.local_addr().expect("addr"), b"check")
            .expect("sent");
        let mut buf = [0u8; 16];
        let (n, from) = far.recv_from(&mut buf).expect("received");
        assert_eq!(
            (&buf[..n], from),
            (&b"check"[..], addr),
            "from the leg's own port"
        );
        let mut buf = [0u8; 16];
        let empty = own.recv(&mut buf).map(|_| ()).unwrap_err();
        assert_eq!(empty.kind(), ErrorKind::WouldBlock);
        far.send_to(b"answer", addr).expect("sent");
        let mut got = own.recv(&mut buf);
        for _ in 0..1000 {
            if !matches!(&got, Err(e) if e.kind() == ErrorKind::WouldBlock) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            got = own.recv(&mut buf);
        }
        let (n, source) = got.expect("received");
        assert_eq!(
            (&buf[..n], source),
            (&b"answer"[..], far.local_addr().expect("addr"))
        );
        own.deregister(poll.registry());
    }
}
