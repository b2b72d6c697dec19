//! The relay's ICE-TCP connections (RFC 6544, our candidate passive; RFC
//! 4571 framing). The HTTP listener hands over each accepted connection
//! whose first bytes are a framed STUN binding request; from then on the
//! relay owns it like the UDP socket: registered in its poll, read into
//! packets, written from a bounded queue. A connection first names its
//! peer (by the ufrag of its first STUN check), or waits a moment for that
//! peer to reach the relay, then carries that peer's packets only.
//!
//! Bounds: at most [`MAX_PENDING`] connections without a peer, each closed
//! when its peer does not come; at most [`MAX_PER_PEER`] per peer; at most
//! [`MAX_QUEUED`] bytes waiting to be written, beyond which the connection
//! is too slow and is closed (the UDP fan-out never waits for it).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::framing::{write_frame, FrameReader};
use super::handle::PeerId;
use crate::metrics::metrics;

/// Tokens below this are the relay's own (socket, waker).
pub(super) const FIRST_TOKEN: usize = 2;
/// Connections not yet carrying a known peer's packets.
pub(super) const MAX_PENDING: usize = 256;
/// Connections one peer may use (a browser tries one per candidate pair).
const MAX_PER_PEER: usize = 8;
/// Bytes waiting to be written to one connection: with the kernel's send
/// buffer ([`SEND_BUFFER`], which Linux doubles), a few seconds of audio.
pub(super) const MAX_QUEUED: usize = 32 * 1024;
/// Send buffer asked of the kernel: small, so that a receiver that stops
/// reading fills our queue (and is dropped) within seconds, instead of the
/// kernel holding minutes of audio for it.
const SEND_BUFFER: usize = 16 * 1024;
/// How long a connection naming an unknown ufrag waits for that peer (its
/// answer and its first check may race to the relay).
pub(super) const WAIT_FOR_PEER: Duration = Duration::from_secs(3);
/// Reads per readiness event before others get a turn.
const READS_PER_EVENT: usize = 16;
const READ_CHUNK: usize = 16 * 1024;

/// Whose packets a connection carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Nothing read yet.
    New,
    /// Its first check names `ufrag`, which no peer has yet; the check is
    /// kept to be replayed.
    Waiting { ufrag: String, first: Vec<u8> },
    /// The packets of this peer.
    Peer(PeerId),
}

struct Conn {
    stream: TcpStream,
    remote: SocketAddr,
    reader: FrameReader,
    /// Framed packets not yet taken by the kernel.
    queued: Vec<u8>,
    link: ConnState,
    opened: Instant,
}

impl Conn {
    fn pending(&self) -> bool {
        !matches!(self.link, ConnState::Peer(_))
    }

    /// Writes what is queued until the kernel takes no more.
    fn flush(&mut self) -> Result<(), &'static str> {
        let mut written = 0;
        while written < self.queued.len() {
            match self.stream.write(&self.queued[written..]) {
                Ok(0) => return Err("write failed"),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err("write failed"),
            }
        }
        self.queued.drain(..written);
        Ok(())
    }
}

/// Every ICE-TCP connection of the relay, by poll token and by remote
/// address (str0m names a packet's destination by address).
#[derive(Default)]
pub(super) struct TcpConns {
    conns: HashMap<Token, Conn>,
    by_remote: HashMap<SocketAddr, Token>,
    next_token: usize,
    scratch: Vec<u8>,
}

impl TcpConns {
    /// Takes over an accepted connection; refused (and closed) beyond
    /// [`MAX_PENDING`] connections without a peer.
    pub fn add(
        &mut self,
        registry: &Registry,
        stream: std::net::TcpStream,
    ) -> Result<Token, &'static str> {
        let pending = self.conns.values().filter(|c| c.pending()).count();
        if pending >= MAX_PENDING {
            return Err("too many pending connections");
        }
        let remote = stream.peer_addr().map_err(|_| "connection already gone")?;
        stream.set_nonblocking(true).map_err(|_| "socket error")?;
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let mut stream = TcpStream::from_std(stream);
        let token = Token(FIRST_TOKEN + self.next_token);
        self.next_token += 1;
        registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|_| "socket error")?;
        self.by_remote.insert(remote, token);
        self.conns.insert(
            token,
            Conn {
                stream,
                remote,
                reader: FrameReader::default(),
                queued: Vec::new(),
                link: ConnState::New,
                opened: Instant::now(),
            },
        );
        metrics().ice_tcp_connections.inc();
        Ok(token)
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Reads what the connection has into whole packets (appended to
    /// `packets`); `Err` with the reason it must be closed. Returns true if
    /// it may have more to read (its turn ended first).
    pub fn read(&mut self, token: Token, packets: &mut Vec<Vec<u8>>) -> Result<bool, &'static str> {
        let Some(conn) = self.conns.get_mut(&token) else {
            return Ok(false);
        };
        self.scratch.resize(READ_CHUNK, 0);
        for _ in 0..READS_PER_EVENT {
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => return Err("closed by the client"),
                Ok(n) => conn.reader.extend(&self.scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err("read failed"),
            }
            loop {
                match conn.reader.next_frame() {
                    Ok(Some(packet)) => packets.push(packet.to_vec()),
                    Ok(None) => break,
                    Err(_) => return Err("frame too long"),
                }
            }
        }
        Ok(true)
    }

    /// Makes the poll report the connection again if it is still readable.
    pub fn rearm(&mut self, registry: &Registry, token: Token) {
        if let Some(conn) = self.conns.get_mut(&token) {
            let _ = registry.reregister(
                &mut conn.stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            );
        }
    }

    /// The connection can take more: writes its queue.
    pub fn writable(&mut self, token: Token) -> Result<(), &'static str> {
        match self.conns.get_mut(&token) {
            Some(conn) => conn.flush(),
            None => Ok(()),
        }
    }

    /// Frames and writes one packet to the connection from `to`. A packet
    /// for no connection is dropped; `Err` names a connection to close.
    pub fn send(&mut self, to: SocketAddr, packet: &[u8]) -> Result<(), (Token, &'static str)> {
        let Some(token) = self.by_remote.get(&to).copied() else {
            return Ok(());
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return Ok(());
        };
        if conn.queued.len() + 2 + packet.len() > MAX_QUEUED {
            return Err((token, "too slow: write queue full"));
        }
        if write_frame(&mut conn.queued, packet).is_none() {
            return Ok(());
        }
        conn.flush().map_err(|why| (token, why))
    }

    pub fn link(&self, token: Token) -> Option<&ConnState> {
        self.conns.get(&token).map(|c| &c.link)
    }

    pub fn remote(&self, token: Token) -> Option<SocketAddr> {
        self.conns.get(&token).map(|c| c.remote)
    }

    /// Makes the connection carry `peer`'s packets; false when the peer
    /// has its share of connections already.
    pub fn bind(&mut self, token: Token, peer: PeerId) -> bool {
        if self.of_peer(peer).len() >= MAX_PER_PEER {
            return false;
        }
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.link = ConnState::Peer(peer);
        }
        true
    }

    /// The connection's first check names `ufrag`, of no peer yet.
    pub fn wait(&mut self, token: Token, ufrag: String, first: &[u8]) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.link = ConnState::Waiting {
                ufrag,
                first: first.to_vec(),
            };
        }
    }

    /// The connections waiting for `ufrag`, with the check each kept.
    pub fn take_waiting(&mut self, ufrag: &str) -> Vec<(Token, Vec<u8>)> {
        let mut found = Vec::new();
        for (token, conn) in self.conns.iter_mut() {
            if matches!(&conn.link, ConnState::Waiting { ufrag: u, .. } if u == ufrag) {
                if let ConnState::Waiting { first, .. } =
                    std::mem::replace(&mut conn.link, ConnState::New)
                {
                    found.push((*token, first));
                }
            }
        }
        found
    }

    /// The connections carrying `peer`'s packets.
    pub fn of_peer(&self, peer: PeerId) -> Vec<Token> {
        self.conns
            .iter()
            .filter(|(_, c)| c.link == ConnState::Peer(peer))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Connections without a peer past their time: waiting longer than
    /// [`WAIT_FOR_PEER`] for an unknown ufrag, or silent past `handshake`.
    pub fn expired(&self, now: Instant, handshake: Duration) -> Vec<(Token, &'static str)> {
        self.conns
            .iter()
            .filter_map(|(token, c)| {
                let age = now.saturating_duration_since(c.opened);
                match c.link {
                    ConnState::Waiting { .. } if age >= WAIT_FOR_PEER => {
                        Some((*token, "unknown ufrag"))
                    }
                    ConnState::New if age >= handshake => Some((*token, "handshake timed out")),
                    _ => None,
                }
            })
            .collect()
    }

    /// Closes a connection (the reason counted); returns what it carried.
    pub fn close(
        &mut self,
        registry: &Registry,
        token: Token,
        why: &'static str,
    ) -> Option<(SocketAddr, ConnState)> {
        let mut conn = self.conns.remove(&token)?;
        self.by_remote.remove(&conn.remote);
        let _ = registry.deregister(&mut conn.stream);
        let m = metrics();
        m.ice_tcp_connections.dec();
        m.ice_tcp_closed.with_label_values(&[why]).inc();
        tracing::debug!(remote = %conn.remote, reason = why, "ICE-TCP connection closed");
        Some((conn.remote, conn.link))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    use mio::Poll;

    /// A connection accepted from `listener`, and its client end.
    fn accepted(listener: &TcpListener) -> (std::net::TcpStream, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (server, client)
    }

    #[test]
    fn connections_without_a_peer_are_capped() {
        let poll = Poll::new().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conns = TcpConns::default();
        let mut clients = Vec::new();
        let mut tokens = Vec::new();
        for _ in 0..MAX_PENDING {
            let (server, client) = accepted(&listener);
            tokens.push(conns.add(poll.registry(), server).unwrap());
            clients.push(client);
        }
        let (server, _client) = accepted(&listener);
        assert_eq!(
            conns.add(poll.registry(), server),
            Err("too many pending connections")
        );
        // One finds its peer: room for another.
        assert!(conns.bind(tokens[0], 7));
        let (server, _client) = accepted(&listener);
        assert!(conns.add(poll.registry(), server).is_ok());
        assert_eq!(conns.of_peer(7), vec![tokens[0]]);
        // A peer has a bounded share of connections.
        for t in &tokens[1..MAX_PER_PEER] {
            assert!(conns.bind(*t, 7));
        }
        assert!(!conns.bind(tokens[MAX_PER_PEER], 7));
    }

    #[test]
    fn packets_are_cut_from_reads_and_an_oversize_length_closes() {
        let poll = Poll::new().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conns = TcpConns::default();
        let (server, mut client) = accepted(&listener);
        let token = conns.add(poll.registry(), server).unwrap();
        let mut bytes = Vec::new();
        write_frame(&mut bytes, b"first").unwrap();
        write_frame(&mut bytes, b"second").unwrap();
        client.write_all(&bytes[..4]).unwrap();
        client.write_all(&bytes[4..]).unwrap();
        let mut packets = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        while packets.len() < 2 && Instant::now() < until {
            assert_eq!(conns.read(token, &mut packets), Ok(false));
        }
        assert_eq!(packets, vec![b"first".to_vec(), b"second".to_vec()]);
        client.write_all(&[0xff, 0xff, 0, 0]).unwrap();
        let mut result = Ok(false);
        while result == Ok(false) && Instant::now() < until {
            result = conns.read(token, &mut packets);
        }
        assert_eq!(result, Err("frame too long"));
        drop(client);
    }

    #[test]
    fn a_receiver_that_stops_reading_is_dropped_at_the_queue_bound() {
        let poll = Poll::new().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conns = TcpConns::default();
        let (server, client) = accepted(&listener);
        let remote = server.peer_addr().unwrap();
        let token = conns.add(poll.registry(), server).unwrap();
        assert!(conns.bind(token, 1));
        let packet = [0x80u8; 1000];
        let mut sent = 0usize;
        let refused = loop {
            match conns.send(remote, &packet) {
                Ok(()) => sent += packet.len(),
                Err(e) => break e,
            }
            // The kernel's buffers on both ends are finite: the queue fills.
            assert!(sent < 64 << 20, "never refused after {sent} bytes");
        };
        assert_eq!(refused, (token, "too slow: write queue full"));
        assert!(sent >= MAX_QUEUED, "{sent}");
        // A packet for no connection is dropped quietly.
        assert_eq!(conns.send("127.0.0.1:9".parse().unwrap(), &packet), Ok(()));
        drop(client);
    }
}
