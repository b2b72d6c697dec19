//! A client peer's transport to the relay: its own UDP socket, or one
//! ICE-TCP connection to the relay's HTTP port (RFC 6544, our side active),
//! where every packet travels behind a 2-byte length (RFC 4571).

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use str0m::net::Protocol;

/// What a peer was given to talk over.
pub enum Transport {
    Udp(std::net::UdpSocket),
    /// A connected stream to the relay's ICE-TCP candidate.
    Tcp(std::net::TcpStream),
}

impl Transport {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Transport::Udp(s) => s.local_addr(),
            Transport::Tcp(s) => s.local_addr(),
        }
    }
}

pub enum Link {
    Udp(UdpSocket),
    Tcp {
        stream: TcpStream,
        remote: SocketAddr,
        /// Bytes read, not yet a whole packet.
        inbox: Vec<u8>,
        /// Framed packets the kernel has not taken yet.
        outbox: Vec<u8>,
    },
}

impl Link {
    pub fn new(t: Transport, registry: &Registry, token: Token) -> io::Result<Link> {
        let mut link = match t {
            Transport::Udp(s) => Link::Udp(UdpSocket::from_std(s)),
            Transport::Tcp(s) => {
                let remote = s.peer_addr()?;
                s.set_nonblocking(true)?;
                Link::Tcp {
                    stream: TcpStream::from_std(s),
                    remote,
                    inbox: Vec::new(),
                    outbox: Vec::new(),
                }
            }
        };
        match &mut link {
            Link::Udp(s) => registry.register(s, token, Interest::READABLE)?,
            Link::Tcp { stream, .. } => {
                registry.register(stream, token, Interest::READABLE | Interest::WRITABLE)?
            }
        }
        Ok(link)
    }

    pub fn proto(&self) -> Protocol {
        match self {
            Link::Udp(_) => Protocol::Udp,
            Link::Tcp { .. } => Protocol::Tcp,
        }
    }

    /// Sends one packet (over TCP: queued behind its length, then written as
    /// far as the kernel takes it).
    pub fn send(&mut self, to: SocketAddr, packet: &[u8]) {
        match self {
            Link::Udp(s) => {
                let _ = s.send_to(packet, to);
            }
            Link::Tcp { outbox, .. } => {
                let Ok(len) = u16::try_from(packet.len()) else {
                    return;
                };
                outbox.extend_from_slice(&len.to_be_bytes());
                outbox.extend_from_slice(packet);
                let _ = self.flush();
            }
        }
    }

    /// Writes what a TCP link has queued.
    pub fn flush(&mut self) -> io::Result<()> {
        let Link::Tcp { stream, outbox, .. } = self else {
            return Ok(());
        };
        let mut done = 0;
        while done < outbox.len() {
            match stream.write(&outbox[done..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        outbox.drain(..done);
        Ok(())
    }

    /// The next packet into `buf`: its length and source. `WouldBlock` when
    /// none is ready; `UnexpectedEof` when the relay closed the connection.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (stream, remote, inbox) = match self {
            Link::Udp(s) => return s.recv_from(buf),
            Link::Tcp {
                stream,
                remote,
                inbox,
                ..
            } => (stream, *remote, inbox),
        };
        loop {
            if inbox.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([inbox[0], inbox[1]]));
                if inbox.len() >= 2 + len {
                    let n = len.min(buf.len());
                    buf[..n].copy_from_slice(&inbox[2..2 + n]);
                    inbox.drain(..2 + len);
                    return Ok((n, remote));
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => inbox.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e),
            }
        }
    }
}
