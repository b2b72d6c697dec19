//! The relay loop: one thread drives every sans-IO peer (as in str0m's chat
//! example). Each wake-up takes signalling's commands, the peers' due timers
//! and the sockets' datagrams (the relay's, and each push leg's own), feeds
//! each to the one peer it concerns, and forwards the RTP a sender produced.
//! A peer's life (added, connected, closing, freed) is run here; what a
//! peer is lives in [`super::peer`], how a datagram finds its peer in
//! [`super::routing`], how a packet reaches many receivers in
//! [`super::forward`], and the ICE-TCP connections in `ice_tcp`.

mod ice_tcp;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpPacket;
use str0m::{Input, Rtc};

use super::counters::RelayCounters;
use super::drain::drain;
use super::forward::{self, ForwardPool, ForwardedPacket};
use super::handle::{Command, PeerEvent, PeerEvents, PeerId};
use super::inbox;
use super::leg::Leg;
use super::leg_socket::{self, LegSocket};
use super::outbox::Outbox;
use super::peer::{Expiry, Peer, PeerKind, Peers, Timeouts, CLOSE_GRACE};
use super::routing::Routes;
use super::tcp::{TcpConns, FIRST_TOKEN};
use super::timers::Timers;
use crate::metrics::metrics;
use crate::mp3::PacketSink;

pub(super) const SOCKET: Token = Token(0);
pub(super) const WAKER: Token = Token(1);
/// Datagrams read per wake-up before commands and timers get a turn.
const READ_BATCH: usize = 256;
/// How often the counters are published to the metrics (and the longest
/// the loop sleeps).
const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// Why a stream's receivers (push legs included) close when it ends.
pub const STREAM_ENDED: &str = "stream ended";

/// The peers of one stream.
struct StreamPeers {
    sender: Option<PeerId>,
    receivers: Vec<PeerId>,
    mp3: Option<PacketSink>,
    /// The stream's Ogg/Opus pager.
    ogg: Option<PacketSink>,
}

pub(super) struct Relay {
    socket: UdpSocket,
    fd: RawFd,
    poll: Poll,
    commands: Receiver<Command>,
    /// Datagrams waiting for the next `sendmmsg`.
    out: Outbox,
    timers: Timers,
    /// The address str0m is told packets arrive on (our first host candidate).
    local_label: SocketAddr,
    peers: Peers,
    routes: Routes,
    streams: HashMap<Arc<str>, StreamPeers>,
    /// RTP packets from senders waiting to be forwarded (reused buffer).
    forward: Vec<RtpPacket>,
    limits: Timeouts,
    next_housekeeping: Instant,
    counters: RelayCounters,
    pool: ForwardPool,
    /// ICE-TCP connections handed over by the HTTP listener.
    tcp: TcpConns,
    /// The address str0m is told ICE-TCP packets arrive on (our first TCP
    /// candidate); `None` when no TCP candidate is offered.
    tcp_label: Option<SocketAddr>,
    /// Reused buffers: packets read from a connection, packets to write.
    tcp_packets: Vec<Vec<u8>>,
    tcp_sends: Vec<(SocketAddr, Vec<u8>)>,
    /// Push legs' own sockets: whose each poll token is.
    leg_sockets: HashMap<Token, PeerId>,
    next_leg_token: usize,
}

/// Where the relay is reached: the address str0m is told UDP datagrams
/// arrive on (our first host candidate), and the same for ICE-TCP.
pub(super) struct Labels {
    pub udp: SocketAddr,
    pub tcp: Option<SocketAddr>,
}

impl Relay {
    pub fn new(
        socket: UdpSocket,
        poll: Poll,
        commands: Receiver<Command>,
        labels: Labels,
        limits: Timeouts,
        forward_threads: usize,
    ) -> Self {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        Relay {
            socket,
            fd,
            poll,
            commands,
            out: Outbox::new(fd),
            timers: Timers::default(),
            local_label: labels.udp,
            peers: Peers::default(),
            routes: Routes::default(),
            streams: HashMap::new(),
            forward: Vec::new(),
            limits,
            next_housekeeping: Instant::now() + HOUSEKEEPING,
            counters: RelayCounters::default(),
            pool: ForwardPool::new(forward::workers(forward_threads)),
            tcp: TcpConns::default(),
            tcp_label: labels.tcp,
            tcp_packets: Vec::new(),
            tcp_sends: Vec::new(),
            leg_sockets: HashMap::new(),
            next_leg_token: 0,
        }
    }

    /// Runs until shut down (`Ok`) or the socket's poll fails (`Err`), on
    /// the thread that made this relay (its forwarding threads share that
    /// thread's priority).
    pub fn run(mut self) -> std::io::Result<()> {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 2048];
        let mut shutting_down: Option<Instant> = None;
        loop {
            if self.take_commands() && shutting_down.is_none() {
                shutting_down = Some(Instant::now());
                self.close_all();
            }
            let now = Instant::now();
            self.handle_timers(now);
            if now >= self.next_housekeeping {
                self.expire_tcp(now);
                self.counters.publish(&self.out);
                self.next_housekeeping = now + HOUSEKEEPING;
            }
            if let Some(t) = shutting_down {
                if self.peers.is_empty() || t.elapsed() > CLOSE_GRACE * 2 {
                    tracing::info!("media relay stopped");
                    return Ok(());
                }
            }
            self.flush_out();
            let wait = self
                .next_deadline()
                .saturating_duration_since(Instant::now())
                .min(HOUSEKEEPING);
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::error!(error = %e, "media relay poll failed");
                    return Err(e);
                }
            }
            // The UDP socket first: ICE-TCP connections never hold up its datagrams.
            if events.iter().any(|ev| ev.token() == SOCKET) {
                self.read_socket(&mut buf);
            }
            for ev in events.iter() {
                if ev.token().0 >= leg_socket::FIRST_TOKEN {
                    self.read_leg_socket(ev.token(), &mut buf);
                } else if ev.token().0 >= FIRST_TOKEN {
                    let readable = ev.is_readable() || ev.is_read_closed();
                    self.on_tcp_event(ev.token(), readable, ev.is_writable());
                }
            }
        }
    }

    /// Sends what peers queued: the UDP datagrams, then the ICE-TCP packets.
    fn flush_out(&mut self) {
        self.out.flush();
        self.send_tcp();
    }

    /// Handles the queued commands; true if the relay is to shut down.
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return true,
                Ok(cmd) => self.handle_command(cmd),
                Err(TryRecvError::Empty) => return false,
            }
        }
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::AddSender {
                peer,
                stream,
                rtc,
                events,
                mp3,
                ogg,
            } => self.add_sender(peer, stream, rtc, events, [mp3, ogg]),
            Command::AddReceiver {
                peer,
                stream,
                mut rtc,
                keys,
                mid,
                events,
                push,
            } => {
                let Some(entry) = self.streams.get_mut(&stream) else {
                    let _ = events.send(PeerEvent::Closed(peer, STREAM_ENDED));
                    return;
                };
                let Some(leg) = Leg::negotiated(&mut rtc, mid, keys) else {
                    let _ = events.send(PeerEvent::Closed(peer, "no Opus audio negotiated"));
                    return;
                };
                let Some(push) = push else {
                    entry.receivers.push(peer);
                    self.insert_peer(peer, rtc, PeerKind::Receiver(leg), stream, events, None);
                    return;
                };
                let token = Token(leg_socket::FIRST_TOKEN + self.next_leg_token);
                self.next_leg_token += 1;
                match LegSocket::register(push, self.poll.registry(), token) {
                    Ok(own) => {
                        entry.receivers.push(peer);
                        self.leg_sockets.insert(token, peer);
                        let kind = PeerKind::Push(leg);
                        self.insert_peer(peer, rtc, kind, stream, events, Some(own));
                    }
                    Err(e) => {
                        tracing::warn!(peer, error = %e, "cannot poll a push leg's socket");
                        let _ = events.send(PeerEvent::Closed(peer, "socket error"));
                    }
                }
            }
            Command::RemoteCandidate { peer, candidate } => {
                if let Some(p) = self.peers.get_mut(peer) {
                    p.rtc.add_remote_candidate(candidate);
                    self.drain_peer(peer, None);
                }
            }
            Command::ClosePeer { peer } => self.close_peer(peer, "closed by client"),
            Command::EndStream { stream } => self.end_stream(&stream, STREAM_ENDED),
            Command::IceTcp { stream } => self.add_tcp(stream),
            Command::Shutdown => {}
            #[cfg(test)]
            Command::Crash => panic!("relay thread crash asked by a test"),
        }
    }

    fn add_sender(
        &mut self,
        peer: PeerId,
        stream: Arc<str>,
        rtc: Box<Rtc>,
        events: PeerEvents,
        [mp3, ogg]: [Option<PacketSink>; 2],
    ) {
        let entry = self
            .streams
            .entry(stream.clone())
            .or_insert_with(|| StreamPeers {
                sender: None,
                receivers: Vec::new(),
                mp3: None,
                ogg: None,
            });
        entry.sender = Some(peer);
        entry.mp3 = mp3;
        entry.ogg = ogg;
        self.insert_peer(peer, rtc, PeerKind::Sender, stream, events, None);
    }

    fn insert_peer(
        &mut self,
        id: PeerId,
        mut rtc: Box<Rtc>,
        kind: PeerKind,
        stream: Arc<str>,
        events: PeerEvents,
        own_socket: Option<LegSocket>,
    ) {
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let mut peer = Peer::new(id, rtc, kind, stream, events, ufrag, self.limits);
        peer.own_socket = own_socket;
        tracing::debug!(peer = id, role = peer.role_name(), stream = %peer.stream, "peer added");
        // A push leg's datagrams come on its own socket: no route to it here.
        let early = match peer.own_socket {
            Some(_) => Vec::new(),
            None => self.routes.add(&peer),
        };
        let ufrag = peer.ufrag.clone();
        self.peers.insert(peer);
        self.drain_peer(id, None);
        let now = Instant::now();
        for (source, data) in early {
            self.handle_datagram(source, &data, now);
        }
        self.bind_waiting_tcp(&ufrag, id);
    }

    /// Reads a push leg's socket: every datagram is that leg's.
    fn read_leg_socket(&mut self, token: Token, buf: &mut [u8]) {
        let Some(id) = self.leg_sockets.get(&token).copied() else {
            return;
        };
        for _ in 0..READ_BATCH {
            let Some(own) = self.peers.get_mut(id).and_then(|p| p.own_socket.as_ref()) else {
                return;
            };
            let label = own.label;
            let (n, source) = match own.recv(buf) {
                Ok(v) => v,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(peer = id, error = %e, "push socket receive error");
                    continue;
                }
            };
            let Ok(contents) = buf[..n].try_into() else {
                continue;
            };
            let now = Instant::now();
            let input = Input::Receive(
                now,
                Receive {
                    proto: Protocol::Udp,
                    source,
                    destination: label,
                    contents,
                },
            );
            self.input(id, input, Some(now));
            self.flush_out();
        }
        if let Some(own) = self.peers.get_mut(id).and_then(|p| p.own_socket.as_mut()) {
            own.rearm(self.poll.registry());
        }
    }

    fn read_socket(&mut self, buf: &mut [u8]) {
        for _ in 0..READ_BATCH {
            let (n, source, arrived) = match inbox::recv(self.fd, buf) {
                Ok(v) => v,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors surface here on Linux; they concern one remote only.
                    tracing::debug!(error = %e, "udp receive error");
                    continue;
                }
            };
            self.handle_datagram(source, &buf[..n], arrived);
        }
        // More may be waiting: make sure we come back without sleeping.
        let _ = self
            .poll
            .registry()
            .reregister(&mut self.socket, SOCKET, Interest::READABLE);
    }

    /// Hands one datagram, which reached the socket at `arrived`, to the peer
    /// it belongs to.
    fn handle_datagram(&mut self, source: SocketAddr, data: &[u8], arrived: Instant) {
        let Some(id) = self.routes.route(source, data, &mut self.peers) else {
            self.counters.unrouted += 1;
            return;
        };
        let Ok(contents) = data.try_into() else {
            return;
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local_label,
                contents,
            },
        );
        self.input(id, input, Some(arrived));
        self.flush_out();
    }

    /// Feeds one input to a peer, then drains it (a failed peer is closed).
    fn input(&mut self, id: PeerId, input: Input, arrived: Option<Instant>) {
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        match peer.contained(|p| p.rtc.handle_input(input)) {
            Some(Ok(())) => self.drain_peer(id, arrived),
            Some(Err(e)) => {
                tracing::debug!(peer = id, error = %e, "peer input error");
                self.close_peer(id, "peer failed");
            }
            // A contained panic: the peer is dead; its wake-up frees it.
            None => self.drain_peer(id, None),
        }
    }

    /// Polls one peer until it has nothing more to say, sending what it
    /// transmits and handling its events; then forwards any RTP it produced
    /// (which arrived at `arrived`, if known).
    fn drain_peer(&mut self, id: PeerId, arrived: Option<Instant>) {
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        let (out, forward) = (&mut self.out, &mut self.forward);
        peer.contained(|p| drain(p, out, forward));
        peer.schedule(&mut self.timers);
        if self.forward.is_empty() {
            return;
        }
        let stream = peer.stream.clone();
        let mut packets = std::mem::take(&mut self.forward);
        for pkt in packets.drain(..) {
            let at = arrived.unwrap_or(pkt.timestamp);
            self.forward_packet(&stream, pkt, at);
        }
        self.forward = packets;
        self.send_tcp();
    }

    /// Sends one sender packet to every connected receiver of the stream and
    /// to its MP3 pipeline and Ogg pager (a bounded channel send each).
    fn forward_packet(&mut self, stream: &Arc<str>, pkt: RtpPacket, arrived: Instant) {
        let Some(entry) = self.streams.get(stream) else {
            return;
        };
        if let Some(mp3) = &entry.mp3 {
            mp3.push(*pkt.seq_no, pkt.time.numer(), pkt.payload.clone());
        }
        if let Some(ogg) = &entry.ogg {
            ogg.push(*pkt.seq_no, pkt.time.numer(), pkt.payload.clone());
        }
        self.counters.packets_in += 1;
        self.counters.bytes_in += pkt.payload.len() as u64;
        let packet = ForwardedPacket::new(&pkt, arrived, Instant::now());
        let chunks = self.pool.chunks_for(entry.receivers.len());
        let tally = if chunks > 1 {
            // Disjoint borrows of this stream's receivers, for the threads.
            let mut peers = self.peers.receivers_mut(stream);
            self.pool
                .forward(&mut peers, chunks, &packet, &mut self.out)
        } else {
            let mut tally = forward::Tally::default();
            for id in &entry.receivers {
                if let Some(peer) = self.peers.get_mut(*id) {
                    forward::to_peer(peer, &packet, &mut self.out, &mut tally);
                }
            }
            self.out.flush();
            tally
        };
        self.counters.packets_out += tally.sent;
        self.counters.by_str0m += tally.by_str0m;
        self.counters.bytes_out += tally.sent * packet.payload_len() as u64;
        self.timers.extend(tally.timers);
        for id in tally.failed {
            self.close_peer(id, "peer failed");
        }
    }

    /// Wakes every peer whose timer is due: frees or closes it if its
    /// deadline passed, else gives str0m its timeout.
    fn handle_timers(&mut self, now: Instant) {
        while let Some((at, id)) = self.timers.pop_due(now) {
            let Some(peer) = self.peers.get_mut(id) else {
                continue;
            };
            if !peer.take_wake(at) {
                continue; // superseded by an earlier entry
            }
            match peer.expiry(now) {
                Some(Expiry::Free) => self.free_peer(id),
                Some(Expiry::Close(why)) => self.close_peer(id, why),
                None => self.input(id, Input::Timeout(now), None),
            }
        }
        self.flush_out();
    }

    fn next_deadline(&self) -> Instant {
        match self.timers.next() {
            Some(t) => t.min(self.next_housekeeping),
            None => self.next_housekeeping,
        }
    }

    /// Starts closing a peer: RTCP BYE and DTLS close_notify go out, the
    /// owner is told, and a sender's stream ends with it.
    fn close_peer(&mut self, id: PeerId, why: &'static str) {
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        if peer.closing_since.is_some() {
            return;
        }
        peer.closing_since = Some(Instant::now());
        if peer.rtc.close().is_err() {
            peer.rtc.disconnect();
        }
        let out = &mut self.out;
        peer.contained(|p| drain(p, out, &mut Vec::new()));
        peer.schedule(&mut self.timers);
        let _ = peer.events.send(PeerEvent::Closed(id, why));
        metrics().peers_closed.with_label_values(&[why]).inc();
        tracing::info!(peer = id, role = peer.role_name(), stream = %peer.stream, reason = why, "peer closed");
        let stream = peer.stream.clone();
        if peer.is_sender() {
            self.end_stream(&stream, why);
        } else if let Some(s) = self.streams.get_mut(&stream) {
            s.receivers.retain(|r| *r != id);
        }
    }

    /// Frees a peer that is dead, or done closing; one that died on its own
    /// is first closed properly (its owner told).
    fn free_peer(&mut self, id: PeerId) {
        self.close_peer(id, "peer disconnected");
        if let Some(mut p) = self.peers.remove(id) {
            self.routes.remove(&p);
            if let Some(own) = p.own_socket.take() {
                self.leg_sockets.remove(&own.token);
                own.deregister(self.poll.registry());
            }
            self.close_tcp_of_peer(id);
            tracing::debug!(peer = id, "peer freed");
        }
    }

    /// Ends a stream: its sender and all its receivers close, its MP3
    /// pipeline is flushed and dropped.
    fn end_stream(&mut self, stream: &Arc<str>, why: &'static str) {
        let Some(entry) = self.streams.remove(stream) else {
            return;
        };
        // Dropping the sink flushes the encoder and ends the MP3 listeners.
        let StreamPeers {
            sender,
            receivers,
            mp3: _,
            ogg: _,
        } = entry;
        if let Some(s) = sender {
            self.close_peer(s, why);
        }
        for r in receivers {
            self.close_peer(r, STREAM_ENDED);
        }
    }

    fn close_all(&mut self) {
        let streams: Vec<Arc<str>> = self.streams.keys().cloned().collect();
        for s in streams {
            self.end_stream(&s, "server shutting down");
        }
        let ids = self.peers.ids();
        for id in ids {
            self.close_peer(id, "server shutting down");
        }
    }
}
