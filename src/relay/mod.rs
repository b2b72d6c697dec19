//! The media relay: owns the one UDP socket and every str0m peer, and drives
//! them all from one loop on a dedicated thread (sans-IO, as in str0m's chat
//! example, but routing each datagram by remote address — or, for a new peer's
//! first STUN check, by its ICE ufrag — instead of asking every peer).
//!
//! A sender peer's RTP packets are forwarded as they are (RTP mode, no
//! decoding) to every receiver peer of its stream, each receiver with its own
//! payload type, header-extension ids, SSRC and sequence space, and handed to
//! the stream's MP3 pipeline. How one packet reaches many receivers (one
//! header write and one SRTP protect each, on several threads for a large
//! stream) is in [`forward`]; the SRTP keys come from [`srtp`]. Signalling
//! builds the `Rtc` (so the SDP answer or offer leaves at once) and hands it
//! over with a [`Command`]; the relay reports back with [`PeerEvent`]s.

mod forward;
mod inbox;
mod outbox;
pub mod srtp;

pub use srtp::KeySlot;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use str0m::config::DtlsCert;
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionMap, RtpPacket, Ssrc};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::metrics;
use crate::mp3::PacketSink;
use outbox::Outbox;

/// Identifies one peer connection (one sender or one receiver leg).
pub type PeerId = u64;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
/// Bound on queued commands from signalling.
const COMMAND_CAPACITY: usize = 4096;
/// Datagrams read per wake-up before commands and timers get a turn.
const READ_BATCH: usize = 256;
/// Socket buffer size asked of the kernel (both directions).
const SOCKET_BUFFER: usize = 4 << 20;
/// How often idle and handshake timeouts are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// How long a closing peer may take to flush its RTCP BYE and DTLS close_notify.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// A receiver's first sequence number is random in `FIRST_SEQ_MIN ..
/// FIRST_SEQ_MIN + FIRST_SEQ_SPREAD`: below 2^16, so its first SRTP index has
/// a zero rollover counter (a browser cannot be told another one), but close
/// enough to the wrap that every receiver's counter rolls over within its
/// first 0.3-5 s. The rollover path is then exercised by every session (and
/// every test) instead of first after ~20 minutes of one.
const FIRST_SEQ_MIN: u16 = 0xff00;
const FIRST_SEQ_SPREAD: u16 = 0xf0;
/// Outgoing packets a receiver peer's str0m holds (its default is 50): str0m
/// sends a copy only while the peer's SRTP keys are not tapped yet, in the
/// same pass as it is written, and audio is never retransmitted.
const RECEIVER_SEND_BUFFER: usize = 8;

/// What the relay tells the connection that owns a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// ICE and DTLS completed: media flows.
    Connected(PeerId),
    /// The peer is gone (closed by us, by the remote, or failed); the reason is
    /// for logs and error messages.
    Closed(PeerId, &'static str),
}

pub type PeerEvents = UnboundedSender<PeerEvent>;

/// Requests from signalling to the relay.
pub enum Command {
    /// A negotiated sender peer; its stream starts with it.
    AddSender {
        peer: PeerId,
        stream: Arc<str>,
        rtc: Box<Rtc>,
        events: PeerEvents,
        mp3: Option<PacketSink>,
    },
    /// A negotiated receiver peer for a stream.
    AddReceiver {
        peer: PeerId,
        stream: Arc<str>,
        rtc: Box<Rtc>,
        /// Filled with its SRTP keys when its DTLS handshake completes.
        keys: KeySlot,
        /// The audio m-line we offered.
        mid: Mid,
        events: PeerEvents,
    },
    /// A trickled remote candidate.
    RemoteCandidate { peer: PeerId, candidate: Candidate },
    /// Close one peer (the client stopped or went away).
    ClosePeer { peer: PeerId },
    /// End a stream: close its sender and every receiver.
    EndStream { stream: Arc<str> },
    /// Close everything and stop the loop.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the media relay is overloaded, try again")]
    Busy,
    #[error("the media relay has stopped")]
    Stopped,
}

/// Cheap, cloneable access to the relay from async code.
#[derive(Clone)]
pub struct RelayHandle {
    commands: SyncSender<Command>,
    waker: Arc<Waker>,
    candidates: Arc<Vec<SocketAddr>>,
    cert: DtlsCert,
    next_peer: Arc<AtomicU64>,
}

impl RelayHandle {
    pub fn send(&self, cmd: Command) -> Result<(), RelayError> {
        match self.commands.try_send(cmd) {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(RelayError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(RelayError::Stopped),
        }
    }

    pub fn next_peer_id(&self) -> PeerId {
        self.next_peer.fetch_add(1, Ordering::Relaxed)
    }

    /// A new sender peer configured for this relay: RTP mode, ICE lite, Opus
    /// only, the shared DTLS certificate, and our host candidates. It answers
    /// the browser's offer with str0m's standard header extensions (the
    /// browser may use transport-cc feedback for its own send-rate control).
    pub fn new_sender_rtc(&self) -> Rtc {
        self.finish_rtc(Self::base_config())
    }

    /// A new receiver peer: as a sender, but trimmed for a leg that only ever
    /// sends one Opus stream. Its offer names just the audio-level and MID
    /// header extensions: without transport-cc, str0m keeps no per-packet
    /// send register (1000 records, ~90 KB per peer) and the browser sends no
    /// feedback reports 10-20 times a second. Nothing is retransmitted for
    /// Opus (browsers do not NACK audio), and the relay protects and sends
    /// forwarded packets itself, so the send buffer is kept small. The slot
    /// receives the peer's SRTP keys when its DTLS handshake completes.
    pub fn new_receiver_rtc(&self) -> (Rtc, KeySlot) {
        let mut exts = ExtensionMap::empty();
        exts.set(1, Extension::AudioLevel);
        exts.set(4, Extension::RtpMid);
        let config = Self::base_config()
            .set_extension_map(exts)
            .set_send_buffer_audio(RECEIVER_SEND_BUFFER)
            .set_dtls_cert(self.cert.clone());
        let (mut rtc, keys) = srtp::build_tapped(config, Instant::now());
        self.add_candidates(&mut rtc);
        (rtc, keys)
    }

    fn base_config() -> RtcConfig {
        Rtc::builder()
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
    }

    fn finish_rtc(&self, config: RtcConfig) -> Rtc {
        let mut rtc = config
            .set_dtls_cert(self.cert.clone())
            .build(Instant::now());
        self.add_candidates(&mut rtc);
        rtc
    }

    fn add_candidates(&self, rtc: &mut Rtc) {
        for addr in self.candidates.iter() {
            if let Ok(c) = Candidate::host(*addr, "udp") {
                rtc.add_local_candidate(c);
            }
        }
    }
}

pub struct RelayConfig {
    pub bind: SocketAddr,
    pub announce: Vec<SocketAddr>,
    pub sender_idle: Duration,
    pub handshake_timeout: Duration,
    /// Threads forwarding one packet of a large stream (0 = one per core, at most 4).
    pub forward_threads: usize,
}

/// Binds the media socket and starts the relay thread.
pub fn start(config: RelayConfig) -> std::io::Result<(RelayHandle, std::thread::JoinHandle<()>)> {
    let std_socket = std::net::UdpSocket::bind(config.bind)?;
    std_socket.set_nonblocking(true)?;
    set_buffer_sizes(&std_socket);
    if let Err(e) = inbox::enable_timestamps(std_socket.as_raw_fd()) {
        tracing::warn!(error = %e, "no kernel receive timestamps: latency is measured from our read");
    }
    let mut socket = UdpSocket::from_std(std_socket);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::sync_channel(COMMAND_CAPACITY);

    let provider = str0m::crypto::from_feature_flags();
    let cert = provider
        .dtls_provider
        .generate_certificate()
        .ok_or_else(|| std::io::Error::other("cannot generate a DTLS certificate"))?;

    let local_label = *config
        .announce
        .first()
        .ok_or_else(|| std::io::Error::other("no address to announce"))?;
    tracing::info!(bind = %config.bind, candidates = ?config.announce, "media relay listening (UDP)");

    let handle = RelayHandle {
        commands: tx,
        waker,
        candidates: Arc::new(config.announce.clone()),
        cert,
        next_peer: Arc::new(AtomicU64::new(1)),
    };
    let fd = socket.as_raw_fd();
    let relay = Relay {
        socket,
        early_stun: EarlyStun::default(),
        fd,
        out: Outbox::default(),
        timers: BinaryHeap::new(),
        poll,
        commands: rx,
        local_label,
        peers: HashMap::new(),
        by_addr: HashMap::new(),
        by_ufrag: HashMap::new(),
        streams: HashMap::new(),
        forward: Vec::new(),
        sender_idle: config.sender_idle,
        handshake_timeout: config.handshake_timeout,
        next_housekeeping: Instant::now() + HOUSEKEEPING,
        stats: Stats::default(),
        workers: forward::workers(config.forward_threads),
    };
    let thread = std::thread::Builder::new()
        .name("media-relay".into())
        .spawn(move || relay.run())?;
    Ok((handle, thread))
}

fn set_buffer_sizes(socket: &std::net::UdpSocket) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // The kernel caps the size; what it grants is good enough.
        let _ = set_socket_option(socket.as_raw_fd(), opt, SOCKET_BUFFER as libc::c_int);
    }
}

/// Sets one integer `SOL_SOCKET` option on `fd`.
fn set_socket_option(fd: RawFd, opt: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setsockopt on a valid fd with a pointer to a live c_int.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Sender,
    Receiver,
}

/// A receiver's outgoing leg: what its browser negotiated, where its own
/// sequence space starts, and its SRTP context once DTLS has keyed it.
struct Leg {
    ssrc: Ssrc,
    pt: Pt,
    /// Header extension ids the browser accepted: audio level, and MID with
    /// the m-line's value.
    audio_level_id: Option<u8>,
    mid_ext: Option<(u8, Mid)>,
    seq_base: u64,
    seq_offset: Option<i64>,
    keys: KeySlot,
    srtp: Option<srtp::SrtpTx>,
}

struct Peer {
    id: PeerId,
    /// Boxed as signalling built it: an `Rtc` is ~10 KB inline, and the peer
    /// map stores `Peer`s in its table. Inline, every table slot (used or not,
    /// up to twice the peer count) was that size, a resize briefly held two
    /// such tables, and moved every peer's 10 KB on the media thread.
    rtc: Box<Rtc>,
    role: Role,
    stream: Arc<str>,
    events: PeerEvents,
    created: Instant,
    next_timeout: Instant,
    /// The time of this peer's live entry in the timer heap.
    scheduled: Option<Instant>,
    connected: bool,
    /// `Rtc::close()` was called; the peer is flushing its goodbyes.
    closing_since: Option<Instant>,
    last_media: Instant,
    addrs: Vec<SocketAddr>,
    /// Where str0m last sent DTLS or RTCP: the nominated remote address.
    media_to: Option<SocketAddr>,
    ufrag: String,
    leg: Option<Leg>,
}

struct RelayStream {
    sender: Option<PeerId>,
    receivers: Vec<PeerId>,
    mp3: Option<PacketSink>,
}

/// Counts kept locally on the hot path and published to the metrics at
/// each housekeeping tick.
#[derive(Default)]
struct Stats {
    unrouted: u64,
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    /// Of `packets_out`, those str0m protected (the rest the relay did).
    by_str0m: u64,
    bytes_out: u64,
    published_sent: u64,
    published_dropped: u64,
}

impl Stats {
    fn publish(&mut self, out: &Outbox) {
        let m = metrics();
        m.rtp_packets_in
            .inc_by(std::mem::take(&mut self.packets_in));
        m.rtp_bytes_in.inc_by(std::mem::take(&mut self.bytes_in));
        let (out_total, by_str0m) = (
            std::mem::take(&mut self.packets_out),
            std::mem::take(&mut self.by_str0m),
        );
        m.rtp_packets_out.inc_by(out_total);
        m.rtp_protected
            .with_label_values(&["relay"])
            .inc_by(out_total - by_str0m);
        m.rtp_protected
            .with_label_values(&["str0m"])
            .inc_by(by_str0m);
        m.rtp_bytes_out.inc_by(std::mem::take(&mut self.bytes_out));
        m.udp_dropped
            .with_label_values(&["unrouted"])
            .inc_by(std::mem::take(&mut self.unrouted));
        m.udp_datagrams_sent
            .inc_by(out.sent.saturating_sub(self.published_sent));
        m.udp_dropped
            .with_label_values(&["send_failed"])
            .inc_by(out.dropped.saturating_sub(self.published_dropped));
        out.publish_latency();
        self.published_sent = out.sent;
        self.published_dropped = out.dropped;
    }
}

struct Relay {
    socket: UdpSocket,
    /// STUN checks that arrived before their peer (bounded, short-lived).
    early_stun: EarlyStun,
    fd: RawFd,
    /// Datagrams waiting for the next `sendmmsg`.
    out: Outbox,
    /// Peer wake-ups, earliest first. An entry is live only while it equals
    /// the peer's `scheduled` time; others are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    poll: Poll,
    commands: Receiver<Command>,
    /// The address str0m is told packets arrive on (our first host candidate).
    local_label: SocketAddr,
    peers: HashMap<PeerId, Peer>,
    by_addr: HashMap<SocketAddr, PeerId>,
    by_ufrag: HashMap<String, PeerId>,
    streams: HashMap<Arc<str>, RelayStream>,
    /// RTP packets from senders waiting to be forwarded (reused buffer).
    forward: Vec<RtpPacket>,
    sender_idle: Duration,
    handshake_timeout: Duration,
    next_housekeeping: Instant,
    stats: Stats,
    /// Threads one packet of a large stream may be forwarded on.
    workers: usize,
}

impl Relay {
    fn run(mut self) {
        crate::priority::for_media_relay();
        let mut events = Events::with_capacity(16);
        let mut buf = vec![0u8; 2048];
        let mut shutting_down: Option<Instant> = None;
        loop {
            // Commands from signalling.
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                        if shutting_down.is_none() {
                            shutting_down = Some(Instant::now());
                            self.close_all();
                        }
                        break;
                    }
                    Ok(cmd) => self.handle_command(cmd),
                    Err(TryRecvError::Empty) => break,
                }
            }

            let now = Instant::now();
            self.handle_timeouts(now);
            if now >= self.next_housekeeping {
                self.housekeeping(now);
                self.stats.publish(&self.out);
                self.next_housekeeping = now + HOUSEKEEPING;
            }
            self.reap(now);

            if let Some(t) = shutting_down {
                if self.peers.is_empty() || t.elapsed() > CLOSE_GRACE * 2 {
                    tracing::info!("media relay stopped");
                    return;
                }
            }

            if !self.out.is_empty() {
                self.out.flush(self.fd);
            }
            let deadline = self.next_deadline();
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(HOUSEKEEPING);
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::error!(error = %e, "media relay poll failed");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == SOCKET {
                    self.read_socket(&mut buf);
                }
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
            } => {
                let entry = self
                    .streams
                    .entry(stream.clone())
                    .or_insert_with(|| RelayStream {
                        sender: None,
                        receivers: Vec::new(),
                        mp3: None,
                    });
                entry.sender = Some(peer);
                entry.mp3 = mp3;
                self.insert_peer(peer, rtc, Role::Sender, stream, events, None);
            }
            Command::AddReceiver {
                peer,
                stream,
                mut rtc,
                keys,
                mid,
                events,
            } => {
                let Some(entry) = self.streams.get_mut(&stream) else {
                    let _ = events.send(PeerEvent::Closed(peer, "stream ended"));
                    return;
                };
                let Some(leg) = receiver_leg(&mut rtc, mid, keys) else {
                    let _ = events.send(PeerEvent::Closed(peer, "no Opus audio negotiated"));
                    return;
                };
                entry.receivers.push(peer);
                self.insert_peer(peer, rtc, Role::Receiver, stream, events, Some(leg));
            }
            Command::RemoteCandidate { peer, candidate } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.rtc.add_remote_candidate(candidate);
                    self.drain_peer(peer, None);
                }
            }
            Command::ClosePeer { peer } => self.close_peer(peer, "closed by client"),
            Command::EndStream { stream } => self.end_stream(&stream, "stream ended"),
            Command::Shutdown => {}
        }
    }

    fn insert_peer(
        &mut self,
        id: PeerId,
        mut rtc: Box<Rtc>,
        role: Role,
        stream: Arc<str>,
        events: PeerEvents,
        leg: Option<Leg>,
    ) {
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let early = self.early_stun.take(&ufrag);
        let now = Instant::now();
        self.by_ufrag.insert(ufrag.clone(), id);
        tracing::debug!(peer = id, ?role, stream = %stream, "peer added");
        self.peers.insert(
            id,
            Peer {
                id,
                rtc,
                role,
                stream,
                events,
                created: now,
                next_timeout: now,
                scheduled: None,
                connected: false,
                closing_since: None,
                last_media: now,
                addrs: Vec::new(),
                media_to: None,
                ufrag,
                leg,
            },
        );
        self.drain_peer(id, None);
        for (source, data) in early {
            self.handle_datagram(source, &data, now);
        }
    }

    /// Which peer a datagram from `source` belongs to.
    fn route(&mut self, source: SocketAddr, data: &[u8]) -> Option<PeerId> {
        if let Some(id) = self.by_addr.get(&source) {
            return Some(*id);
        }
        // Unknown address: only a STUN binding request naming one of our
        // ufrags can introduce it (RFC 7983: STUN starts with 0..=3).
        if data.first().is_some_and(|b| *b < 4) {
            let msg = str0m::ice::StunMessage::parse(data).ok()?;
            let (local, _remote) = msg.split_username()?;
            let Some(id) = self.by_ufrag.get(local).copied() else {
                // A browser often checks before its answer has reached us
                // (it answers and starts ICE at once): keep the check for a
                // moment and replay it when the peer arrives.
                self.early_stun.keep(local, source, data);
                return None;
            };
            let peer = self.peers.get_mut(&id)?;
            if peer.closing_since.is_none() && peer.addrs.len() < 8 {
                peer.addrs.push(source);
                self.by_addr.insert(source, id);
            }
            return Some(id);
        }
        None
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
        let Some(id) = self.route(source, data) else {
            self.stats.unrouted += 1;
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
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(result) = contained(peer, |p| p.rtc.handle_input(input)) else {
            return;
        };
        if let Err(e) = result {
            tracing::debug!(peer = id, error = %e, "peer input error");
            self.close_peer(id, "peer failed");
            return;
        }
        self.drain_peer(id, Some(arrived));
        self.out.flush(self.fd);
    }

    /// Polls one peer until it has nothing more to say, sending what it
    /// transmits and handling its events; then forwards any RTP it produced
    /// (which arrived at `arrived`, if known).
    fn drain_peer(&mut self, id: PeerId, arrived: Option<Instant>) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let (fd, out, forward) = (self.fd, &mut self.out, &mut self.forward);
        contained(peer, |p| drain(p, fd, out, forward));
        schedule(peer, &mut self.timers);
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
    }

    /// Sends one sender packet to every connected receiver of the stream and
    /// to its MP3 pipeline.
    fn forward_packet(&mut self, stream: &Arc<str>, pkt: RtpPacket, arrived: Instant) {
        let Some(entry) = self.streams.get(stream) else {
            return;
        };
        if let Some(mp3) = &entry.mp3 {
            mp3.push(*pkt.seq_no, pkt.time.numer(), pkt.payload.clone());
        }
        self.stats.packets_in += 1;
        self.stats.bytes_in += pkt.payload.len() as u64;
        let packet = forward::Packet::new(&pkt, arrived, Instant::now());
        let (fd, out) = (self.fd, &mut self.out);
        let chunks = forward::chunks_for(entry.receivers.len(), self.workers);
        let tally = if chunks > 1 {
            // Disjoint borrows of this stream's receivers, for the threads.
            let mut peers: Vec<&mut Peer> = self
                .peers
                .values_mut()
                .filter(|p| p.role == Role::Receiver && p.stream == *stream)
                .collect();
            forward::to_peers_parallel(&mut peers, chunks, &packet, fd, out)
        } else {
            let mut tally = forward::Tally::default();
            for id in &entry.receivers {
                if let Some(peer) = self.peers.get_mut(id) {
                    forward::to_peer(peer, &packet, fd, out, &mut tally);
                }
            }
            out.flush(fd);
            tally
        };
        self.stats.packets_out += tally.sent;
        self.stats.by_str0m += tally.by_str0m;
        self.stats.bytes_out += tally.sent * packet.payload_len() as u64;
        self.timers.extend(tally.timers);
        for id in tally.failed {
            self.close_peer(id, "peer failed");
        }
    }

    fn handle_timeouts(&mut self, now: Instant) {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            if peer.scheduled != Some(t) {
                continue; // superseded by an earlier entry
            }
            peer.scheduled = None;
            let Some(result) = contained(peer, |p| p.rtc.handle_input(Input::Timeout(now))) else {
                continue;
            };
            if let Err(e) = result {
                tracing::debug!(peer = id, error = %e, "peer timeout error");
                self.close_peer(id, "peer failed");
                continue;
            }
            self.drain_peer(id, None);
        }
        self.out.flush(self.fd);
    }

    fn housekeeping(&mut self, now: Instant) {
        let mut to_close = Vec::new();
        for p in self.peers.values() {
            if p.closing_since.is_some() {
                continue;
            }
            if !p.connected && now.duration_since(p.created) > self.handshake_timeout {
                to_close.push((p.id, "ICE/DTLS handshake timed out"));
            } else if p.role == Role::Sender
                && p.connected
                && now.duration_since(p.last_media) > self.sender_idle
            {
                to_close.push((p.id, "sender sent no audio"));
            }
        }
        for (id, why) in to_close {
            self.close_peer(id, why);
        }
    }

    fn next_deadline(&self) -> Instant {
        match self.timers.peek() {
            Some(Reverse((t, _))) => (*t).min(self.next_housekeeping),
            None => self.next_housekeeping,
        }
    }

    /// Starts closing a peer: RTCP BYE and DTLS close_notify go out, the
    /// owner is told, and a sender's stream ends with it.
    fn close_peer(&mut self, id: PeerId, why: &'static str) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.closing_since.is_some() {
            return;
        }
        peer.closing_since = Some(Instant::now());
        if peer.rtc.close().is_err() {
            peer.rtc.disconnect();
        }
        let (fd, out) = (self.fd, &mut self.out);
        contained(peer, |p| drain(p, fd, out, &mut Vec::new()));
        schedule(peer, &mut self.timers);
        let _ = peer.events.send(PeerEvent::Closed(id, why));
        metrics().peers_closed.with_label_values(&[why]).inc();
        tracing::info!(peer = id, role = ?peer.role, stream = %peer.stream, reason = why, "peer closed");
        let (role, stream) = (peer.role, peer.stream.clone());
        match role {
            Role::Sender => self.end_stream(&stream, why),
            Role::Receiver => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.receivers.retain(|r| *r != id);
                }
            }
        }
    }

    /// Ends a stream: its sender and all its receivers close, its MP3
    /// pipeline is flushed and dropped.
    fn end_stream(&mut self, stream: &Arc<str>, why: &'static str) {
        let Some(entry) = self.streams.remove(stream) else {
            return;
        };
        // Dropping the sink flushes the encoder and ends the MP3 listeners.
        let RelayStream {
            sender,
            receivers,
            mp3: _,
        } = entry;
        if let Some(s) = sender {
            self.close_peer(s, why);
        }
        for r in receivers {
            self.close_peer(r, "stream ended");
        }
    }

    fn close_all(&mut self) {
        let streams: Vec<Arc<str>> = self.streams.keys().cloned().collect();
        for s in streams {
            self.end_stream(&s, "server shutting down");
        }
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.close_peer(id, "server shutting down");
        }
    }

    /// Frees peers that are dead, or closing for longer than the grace time.
    fn reap(&mut self, now: Instant) {
        let dead: Vec<PeerId> = self
            .peers
            .values()
            .filter(|p| {
                !p.rtc.is_alive()
                    || p.closing_since
                        .is_some_and(|t| now.duration_since(t) > CLOSE_GRACE)
            })
            .map(|p| p.id)
            .collect();
        for id in dead {
            // A peer that died on its own is first closed properly.
            self.close_peer(id, "peer disconnected");
            if let Some(p) = self.peers.remove(&id) {
                for a in &p.addrs {
                    self.by_addr.remove(a);
                }
                self.by_ufrag.remove(&p.ufrag);
                tracing::debug!(peer = id, "peer freed");
            }
        }
    }
}

/// STUN binding requests for ufrags no peer has yet.
#[derive(Default)]
struct EarlyStun {
    items: std::collections::VecDeque<(Instant, String, SocketAddr, Vec<u8>)>,
}

impl EarlyStun {
    const MAX: usize = 256;
    const TTL: Duration = Duration::from_secs(3);

    fn keep(&mut self, ufrag: &str, source: SocketAddr, data: &[u8]) {
        let now = Instant::now();
        while self
            .items
            .front()
            .is_some_and(|(t, ..)| now.duration_since(*t) > Self::TTL)
        {
            self.items.pop_front();
        }
        if self.items.len() < Self::MAX && ufrag.len() <= 256 {
            self.items
                .push_back((now, ufrag.to_owned(), source, data.to_vec()));
        }
    }

    fn take(&mut self, ufrag: &str) -> Vec<(SocketAddr, Vec<u8>)> {
        if self.items.is_empty() || ufrag.is_empty() {
            return Vec::new();
        }
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.items)
            .into_iter()
            .partition(|(_, u, ..)| u == ufrag);
        self.items = rest.into();
        mine.into_iter()
            .map(|(_, _, src, data)| (src, data))
            .collect()
    }
}

/// Runs one call into a peer's str0m state. A panic in it (a bug reached by
/// some input) is contained to that peer: it is logged and the peer dropped,
/// while every other peer and stream goes on.
fn contained<T>(peer: &mut Peer, f: impl FnOnce(&mut Peer) -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *peer))) {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::error!(peer = peer.id, stream = %peer.stream, "panic inside a peer; dropping it");
            metrics().peers_closed.with_label_values(&["panic"]).inc();
            peer.rtc.disconnect();
            peer.next_timeout = Instant::now();
            None
        }
    }
}

/// Puts the peer's next wake-up in the timer heap unless an entry at or
/// before it is already there.
fn schedule(peer: &mut Peer, timers: &mut impl Extend<Reverse<(Instant, PeerId)>>) {
    if peer.scheduled.is_none_or(|s| peer.next_timeout < s) {
        peer.scheduled = Some(peer.next_timeout);
        timers.extend([Reverse((peer.next_timeout, peer.id))]);
    }
}

/// Polls a peer until its next timeout: datagrams go to the outbox, RTP from
/// a sender to `forward`.
fn drain(peer: &mut Peer, fd: RawFd, out: &mut Outbox, forward: &mut Vec<RtpPacket>) {
    loop {
        if !peer.rtc.is_alive() {
            peer.next_timeout = Instant::now();
            return;
        }
        match peer.rtc.poll_output() {
            Ok(Output::Timeout(t)) => {
                peer.next_timeout = t;
                return;
            }
            Ok(Output::Transmit(t)) => {
                // STUN (first byte < 20) answers any candidate pair; DTLS and
                // SRTCP go to the nominated one, where forwarded RTP goes too.
                if t.contents.first().is_some_and(|b| *b >= 20) {
                    peer.media_to = Some(t.destination);
                }
                out.push(fd, t.destination, t.contents.into());
            }
            Ok(Output::Event(ev)) => match ev {
                Event::Connected => {
                    peer.connected = true;
                    peer.last_media = Instant::now();
                    tracing::info!(
                        peer = peer.id,
                        role = ?peer.role,
                        stream = %peer.stream,
                        ms = peer.created.elapsed().as_millis() as u64,
                        "peer connected"
                    );
                    let _ = peer.events.send(PeerEvent::Connected(peer.id));
                    let m = metrics();
                    let role = match peer.role {
                        Role::Sender => "sender",
                        Role::Receiver => "receiver",
                    };
                    m.peers_connected.with_label_values(&[role]).inc();
                    m.handshake_seconds
                        .observe(peer.created.elapsed().as_secs_f64());
                }
                // ICE lost, or the remote said goodbye: the reaper tells the owner.
                Event::IceConnectionStateChange(IceConnectionState::Disconnected)
                | Event::Closed
                    if peer.closing_since.is_none() =>
                {
                    peer.rtc.disconnect();
                }
                Event::RtpPacket(pkt)
                    if peer.role == Role::Sender && peer.closing_since.is_none() =>
                {
                    peer.last_media = Instant::now();
                    forward.push(pkt);
                }
                _ => {}
            },
            Err(e) => {
                tracing::debug!(peer = peer.id, error = %e, "peer poll error");
                peer.rtc.disconnect();
                peer.next_timeout = Instant::now();
                return;
            }
        }
    }
}

/// The outgoing leg of a negotiated receiver peer: its audio m-line's SSRC and
/// the Opus payload type its browser accepted.
fn receiver_leg(rtc: &mut Rtc, mid: Mid, keys: KeySlot) -> Option<Leg> {
    let pt = negotiated_opus_pt(rtc, mid)?;
    let exts = rtc.media(mid)?.remote_extmap();
    let audio_level_id = exts.id_of(Extension::AudioLevel);
    let mid_ext = exts.id_of(Extension::RtpMid).map(|id| (id, mid));
    let ssrc = rtc.direct_api().stream_tx_by_mid(mid, None)?.ssrc();
    let seq_base = u64::from(FIRST_SEQ_MIN + rand::random::<u16>() % FIRST_SEQ_SPREAD);
    Some(Leg {
        ssrc,
        pt,
        audio_level_id,
        mid_ext,
        seq_base,
        seq_offset: None,
        keys,
        srtp: None,
    })
}

/// The Opus payload type negotiated on the audio m-line `mid`, if any.
pub fn negotiated_opus_pt(rtc: &Rtc, mid: Mid) -> Option<Pt> {
    let media = rtc.media(mid)?;
    if media.kind() != MediaKind::Audio {
        return None;
    }
    let pts = media.remote_pts();
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == Codec::Opus && pts.contains(&p.pt()))
        .map(|p| p.pt())
}
