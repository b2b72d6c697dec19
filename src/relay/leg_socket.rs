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
