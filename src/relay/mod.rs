//! The media relay: owns the one UDP socket and every str0m peer, and drives
//! them all from one loop on a dedicated thread (sans-IO, as in str0m's chat
//! example, but routing each datagram by remote address — or, for a new peer's
//! first STUN check, by its ICE ufrag — instead of asking every peer).
//!
//! A sender peer's RTP packets are forwarded as they are (RTP mode, no
//! decoding) to every receiver peer of its stream, each receiver with its own
//! payload type, header-extension ids, SSRC and sequence space (a WHIP push
//! leg is one of them, dialed by us as a full ICE agent), and handed to
//! the stream's MP3 pipeline. Signalling builds the `Rtc` (so the SDP answer
//! or offer leaves at once) and hands it over with a [`Command`]; the relay
//! reports back with [`PeerEvent`]s.
//!
//! A push leg sends and receives on a UDP socket of its own (see
//! [`PushSocket`]), so a far end told apart by address sees each leg apart.
//!
//! This file binds the socket and starts the thread. The parts:
//! - [`handle`]: commands, events, and the `Rtc` builders signalling uses;
//! - `event_loop`: the loop and each peer's life;
//! - `peer`, `leg`, `drain`: one peer, a receiver's outgoing leg (its
//!   sequence space), and what str0m says after an input;
//! - `routing`: which peer a datagram belongs to; `timers`: the wake-ups;
//! - `forward`: one packet to many receivers; [`srtp`]: their SRTP keys;
//! - `inbox`, `outbox`: the socket's syscalls; `leg_socket`: a push leg's
//!   own socket; `counters`: the metrics;
//! - `tcp`, `framing`: ICE-TCP connections (handed over by the HTTP
//!   listener, which shares their port) and their RFC 4571 framing.

mod counters;
mod drain;
mod event_loop;
mod forward;
mod framing;
mod handle;
mod inbox;
mod leg;
mod leg_socket;
mod outbox;
mod peer;
mod routing;
pub mod srtp;
mod tcp;
#[cfg(test)]
mod tests;
mod timers;

pub use event_loop::STREAM_ENDED;
pub use handle::{
    host_candidates, offer_audio, receiver_rtc, Command, PeerEvent, PeerEvents, PeerId, PushSocket,
    RelayError, RelayHandle,
};
pub use leg::negotiated_opus_pt;
pub use srtp::KeySlot;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use mio::net::UdpSocket;
use mio::{Interest, Poll, Waker};

use crate::liveness::Liveness;
use event_loop::{Labels, Relay, SOCKET, WAKER};
use peer::Timeouts;

/// Bound on queued commands from signalling.
const COMMAND_CAPACITY: usize = 4096;
/// Socket buffer size asked of the kernel (both directions).
const SOCKET_BUFFER: usize = 4 << 20;

pub struct RelayConfig {
    pub bind: SocketAddr,
    pub announce: Vec<SocketAddr>,
    /// Passive ICE-TCP candidates (the HTTP listener's port, which hands
    /// their connections over); empty for none.
    pub announce_tcp: Vec<SocketAddr>,
    pub sender_idle: Duration,
    pub handshake_timeout: Duration,
    /// Threads forwarding one packet of a large stream (0 = one per core, at most 4).
    pub forward_threads: usize,
    /// Told if the relay thread ends other than by [`Command::Shutdown`].
    pub liveness: Liveness,
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
    let labels = Labels {
        udp: local_label,
        tcp: config.announce_tcp.first().copied(),
    };
    tracing::info!(bind = %config.bind, candidates = ?config.announce, tcp_candidates = ?config.announce_tcp, "media relay listening (UDP, and ICE-TCP on the HTTP port)");

    let candidates = host_candidates(&config.announce, &config.announce_tcp);
    let push_ip = handle::PushIp {
        bind: config.bind.ip(),
        announce: local_label.ip(),
    };
    let handle = RelayHandle::new(tx, waker, candidates, cert, push_ip);
    let limits = Timeouts {
        handshake: config.handshake_timeout,
        sender_idle: config.sender_idle,
    };
    let (liveness, forward_threads) = (config.liveness, config.forward_threads);
    let thread = std::thread::Builder::new()
        .name("media-relay".into())
        .spawn(move || {
            let watch = liveness.watch("the media relay thread");
            // First: the forwarding threads the relay starts inherit it.
            crate::priority::for_media_relay();
            let relay = Relay::new(socket, poll, rx, labels, limits, forward_threads);
            match relay.run() {
                Ok(()) => watch.finish(),
                Err(e) => watch.fail(format!("the media relay stopped: {e}")),
            }
        })?;
    Ok((handle, thread))
}

/// A relay on a free 127.0.0.1 port (its thread idles until dropped
/// peers or commands come), for unit tests that build peers as the server
/// does.
#[cfg(test)]
pub(crate) fn start_for_test() -> RelayHandle {
    let (relay, _thread) = start(RelayConfig {
        bind: "127.0.0.1:0".parse().expect("addr"),
        announce: vec!["127.0.0.1:9".parse().expect("addr")],
        announce_tcp: vec!["127.0.0.1:9".parse().expect("addr")],
        sender_idle: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        forward_threads: 1,
        liveness: Liveness::default(),
    })
    .expect("relay");
    relay
}

fn set_buffer_sizes(socket: &std::net::UdpSocket) {
    // The kernel caps the size; what it grants is good enough.
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
}
