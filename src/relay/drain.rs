//! What a peer's str0m state has to say after an input: datagrams go to the
//! outbox (a push leg's to its own socket), RTP from a sender is collected
//! for forwarding, and its events (connected, ICE lost, closed) update the
//! peer and reach its owner.

use std::time::Instant;

use str0m::net::Protocol;
use str0m::rtp::RtpPacket;
use str0m::{Event, IceConnectionState, Output};

use super::handle::PeerEvent;
use super::outbox::Outbox;
use super::peer::Peer;
use crate::metrics::metrics;

/// Polls `peer` until its next timeout: datagrams go to `out`, RTP from a
/// sender to `forward`. A dead or failed peer gets a wake-up now, so the
/// loop frees it.
pub(super) fn drain(peer: &mut Peer, out: &mut Outbox, forward: &mut Vec<RtpPacket>) {
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
                let tcp = t.proto == Protocol::Tcp;
                if t.contents.first().is_some_and(|b| *b >= 20) {
                    peer.media_to = Some(t.destination);
                    peer.media_over_tcp = tcp;
                }
                if let Some(own) = &peer.own_socket {
                    if let Err(e) = own.send(t.destination, &t.contents) {
                        // Only this leg is lost with its socket.
                        tracing::debug!(peer = peer.id, error = %e, "push socket send failed");
                        peer.rtc.disconnect();
                    }
                } else if tcp {
                    out.push_tcp(t.destination, t.contents.into());
                } else {
                    out.push(t.destination, t.contents.into());
                }
            }
            Ok(Output::Event(ev)) => on_event(peer, ev, forward),
            Err(e) => {
                tracing::debug!(peer = peer.id, error = %e, "peer poll error");
                peer.rtc.disconnect();
                peer.next_timeout = Instant::now();
                return;
            }
        }
    }
}

fn on_event(peer: &mut Peer, ev: Event, forward: &mut Vec<RtpPacket>) {
    match ev {
        Event::Connected => on_connected(peer),
        // ICE lost, or the remote said goodbye: the loop frees the peer and
        // tells the owner.
        Event::IceConnectionStateChange(IceConnectionState::Disconnected) | Event::Closed
            if peer.closing_since.is_none() =>
        {
            peer.rtc.disconnect();
        }
        Event::RtpPacket(pkt) if peer.is_sender() && peer.closing_since.is_none() => {
            peer.last_media = Instant::now();
            forward.push(pkt);
        }
        _ => {}
    }
}

fn on_connected(peer: &mut Peer) {
    peer.connected = true;
    peer.last_media = Instant::now();
    let role = peer.role_name();
    tracing::info!(
        peer = peer.id,
        role,
        stream = %peer.stream,
        ms = peer.created.elapsed().as_millis() as u64,
        "peer connected"
    );
    let _ = peer.events.send(PeerEvent::Connected(peer.id));
    let m = metrics();
    m.peers_connected.with_label_values(&[role]).inc();
    let transport = if peer.media_over_tcp { "tcp" } else { "udp" };
    m.peers_transport.with_label_values(&[transport]).inc();
    m.handshake_seconds
        .observe(peer.created.elapsed().as_secs_f64());
}
