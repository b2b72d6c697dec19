//! The relay as seen from async code: the [`Command`]s signalling sends it,
//! the [`PeerEvent`]s it sends back, and the [`RelayHandle`] that carries
//! both and builds each peer's `Rtc` (so the SDP answer or offer leaves at
//! once, before the relay thread sees the peer).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use mio::Waker;
use str0m::change::SdpPendingOffer;
use str0m::config::DtlsCert;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::TcpType;
use str0m::rtp::{Extension, ExtensionMap};
use str0m::{Candidate, Rtc, RtcConfig};
use tokio::sync::mpsc::UnboundedSender;

use super::srtp::{self, KeySlot};
use crate::mp3::PacketSink;

/// Identifies one peer connection (one sender or one receiver leg).
pub type PeerId = u64;

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

/// The UDP socket of one push leg (see [`RelayHandle::new_push_rtc`]): the
/// far end sees each leg from its own address, so several legs to one far
/// end are told apart by their 5-tuples. The relay owns it from
/// [`Command::AddReceiver`] on and closes it when the leg is freed.
pub struct PushSocket(pub(super) std::net::UdpSocket, pub(super) SocketAddr);

impl PushSocket {
    /// The address the socket is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// Requests from signalling to the relay.
pub enum Command {
    /// A negotiated sender peer; its stream starts with it.
    AddSender {
        peer: PeerId,
        stream: Arc<str>,
        rtc: Box<Rtc>,
        events: PeerEvents,
        mp3: Option<PacketSink>,
        /// Feeds the stream's Ogg/Opus output.
        ogg: Option<PacketSink>,
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
        /// For a leg we dialed (a WHIP push), its own UDP socket; `None`
        /// for a client receiver, reached through the relay's socket.
        push: Option<PushSocket>,
    },
    /// A trickled remote candidate.
    RemoteCandidate { peer: PeerId, candidate: Candidate },
    /// Close one peer (the client stopped or went away).
    ClosePeer { peer: PeerId },
    /// End a stream: close its sender and every receiver.
    EndStream { stream: Arc<str> },
    /// An accepted TCP connection whose first bytes are an RFC 4571 framed
    /// STUN binding request: an ICE-TCP connection for the relay to own.
    IceTcp { stream: std::net::TcpStream },
    /// Close everything and stop the loop.
    Shutdown,
    /// Panics the relay thread outside any peer's containment: lets tests
    /// see what a dead relay thread does to the process. Unit tests only.
    #[cfg(test)]
    Crash,
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
    candidates: Arc<Vec<Candidate>>,
    cert: DtlsCert,
    next_peer: Arc<AtomicU64>,
    push_ip: PushIp,
}

/// Where push legs' sockets are bound (the relay socket's IP) and the IP
/// their host candidate names (the same, or the first announced one when
/// the relay listens on every address).
#[derive(Clone, Copy)]
pub(super) struct PushIp {
    pub bind: IpAddr,
    pub announce: IpAddr,
}

impl PushIp {
    /// Binds a push leg's socket (ephemeral port); the address its
    /// candidate names.
    fn bind(&self) -> std::io::Result<(std::net::UdpSocket, SocketAddr)> {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(self.bind, 0))?;
        socket.set_nonblocking(true)?;
        let port = socket.local_addr()?.port();
        let ip = if self.bind.is_unspecified() {
            self.announce
        } else {
            self.bind
        };
        Ok((socket, SocketAddr::new(ip, port)))
    }
}

impl RelayHandle {
    pub(super) fn new(
        commands: SyncSender<Command>,
        waker: Arc<Waker>,
        candidates: Vec<Candidate>,
        cert: DtlsCert,
        push_ip: PushIp,
    ) -> Self {
        RelayHandle {
            commands,
            waker,
            candidates: Arc::new(candidates),
            cert,
            next_peer: Arc::new(AtomicU64::new(1)),
            push_ip,
        }
    }

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
        RtcBuilder::new(&self.cert, &self.candidates).sender()
    }

    /// A new receiver peer: see [`RtcBuilder::receiver`]. The slot receives
    /// the peer's SRTP keys when its DTLS handshake completes.
    pub fn new_receiver_rtc(&self) -> (Rtc, KeySlot) {
        receiver_rtc(&self.cert, &self.candidates)
    }

    /// A new push peer (we publish a stream to a WHIP server): a receiver
    /// peer, but a full ICE agent, which as the offerer is the controlling
    /// one. Two ICE-lite agents (this relay and another voice-relay) would
    /// never check each other. The leg has a UDP socket of its own (bound
    /// to the relay socket's IP, an ephemeral port), its only candidate.
    pub fn new_push_rtc(&self) -> std::io::Result<(Rtc, KeySlot, PushSocket)> {
        let (socket, addr) = self.push_ip.bind()?;
        let candidate = Candidate::builder()
            .udp()
            .host(addr)
            .build()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let (rtc, keys) = RtcBuilder::new(&self.cert, &[candidate]).push();
        Ok((rtc, keys, PushSocket(socket, addr)))
    }
}

/// The offer of a leg we offer (a WebSocket receiver, a WHIP push): one
/// send-only Opus audio m-line, its media stream named after `stream`.
/// Returns the m-line's mid, the SDP, and what accepting the answer needs.
pub fn offer_audio(rtc: &mut Rtc, stream: &str) -> Option<(Mid, String, SdpPendingOffer)> {
    let mut api = rtc.sdp_api();
    let mid = api.add_media(
        MediaKind::Audio,
        Direction::SendOnly,
        Some(stream.to_owned()),
        None,
        None,
    );
    let (offer, pending) = api.apply()?;
    Some((mid, offer.to_sdp_string(), pending))
}

/// A receiver peer as the relay builds it (see [`RtcBuilder::receiver`]), for
/// `cert` and the host `candidates` (see [`host_candidates`]): also what the receiver-memory benchmark
/// (`bench/webrtc`) measures.
pub fn receiver_rtc(cert: &DtlsCert, candidates: &[Candidate]) -> (Rtc, KeySlot) {
    RtcBuilder::new(cert, candidates).receiver()
}

/// Our host candidates, in the order given: one UDP candidate per address
/// in `udp`, then a passive TCP candidate per address in `tcp`. str0m gives
/// a TCP host candidate a lower type preference (90) than a UDP one (126),
/// so a client that reaches us over UDP keeps using it.
pub fn host_candidates(udp: &[SocketAddr], tcp: &[SocketAddr]) -> Vec<Candidate> {
    let udp = udp
        .iter()
        .filter_map(|a| Candidate::builder().udp().host(*a).build().ok());
    let tcp = tcp.iter().filter_map(|a| {
        Candidate::builder()
            .tcp()
            .host(*a)
            .tcptype(TcpType::Passive)
            .build()
            .ok()
    });
    udp.chain(tcp).collect()
}

/// Builds the `Rtc` of one peer of this relay.
pub(super) struct RtcBuilder<'a> {
    cert: &'a DtlsCert,
    candidates: &'a [Candidate],
}

impl<'a> RtcBuilder<'a> {
    pub(super) fn new(cert: &'a DtlsCert, candidates: &'a [Candidate]) -> Self {
        RtcBuilder { cert, candidates }
    }

    fn base_config(&self) -> RtcConfig {
        Rtc::builder()
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            .set_dtls_cert(self.cert.clone())
    }

    /// The receiver's config (see [`receiver`](Self::receiver)).
    fn receiver_config(&self) -> RtcConfig {
        let mut exts = ExtensionMap::empty();
        exts.set(1, Extension::AudioLevel);
        exts.set(4, Extension::RtpMid);
        self.base_config()
            .set_extension_map(exts)
            .set_send_buffer_audio(RECEIVER_SEND_BUFFER)
    }

    pub(super) fn sender(&self) -> Rtc {
        let mut rtc = self.base_config().build(Instant::now());
        self.add_candidates(&mut rtc);
        rtc
    }

    /// As a sender, but trimmed for a leg that only ever sends one Opus
    /// stream. Its offer names just the audio-level and MID header
    /// extensions: without transport-cc, str0m keeps no per-packet send
    /// register (1000 records, ~90 KB per peer) and the browser sends no
    /// feedback reports 10-20 times a second. Nothing is retransmitted for
    /// Opus (browsers do not NACK audio), and the relay protects and sends
    /// forwarded packets itself, so the send buffer is kept small.
    pub(super) fn receiver(&self) -> (Rtc, KeySlot) {
        self.build_leg(self.receiver_config())
    }

    /// As a receiver, but a full ICE agent: see [`RelayHandle::new_push_rtc`].
    pub(super) fn push(&self) -> (Rtc, KeySlot) {
        self.build_leg(self.receiver_config().set_ice_lite(false))
    }

    fn build_leg(&self, config: RtcConfig) -> (Rtc, KeySlot) {
        let (mut rtc, keys) = srtp::build_tapped(config, Instant::now());
        self.add_candidates(&mut rtc);
        (rtc, keys)
    }

    fn add_candidates(&self, rtc: &mut Rtc) {
        for c in self.candidates {
            rtc.add_local_candidate(c.clone());
        }
    }
}
