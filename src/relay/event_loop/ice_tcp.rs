//! The relay loop's side of ICE-TCP: connections handed over by the HTTP
//! listener are taken into [`TcpConns`], their packets fed to the peer
//! their first STUN check names (`Receive { proto: Tcp }`), and each
//! `Transmit` over TCP written, framed, to the connection of its
//! destination. A connection that fails, lags or never finds its peer is
//! closed; a peer whose media went over a closed connection closes too.

use std::time::Instant;

use mio::Token;
use str0m::net::{Protocol, Receive};
use str0m::Input;

use super::Relay;
use crate::relay::handle::PeerId;
use crate::relay::routing;
use crate::relay::tcp::ConnState;

impl Relay {
    /// A connection the HTTP listener recognised as ICE-TCP.
    pub(super) fn add_tcp(&mut self, stream: std::net::TcpStream) {
        if self.tcp_label.is_none() {
            return; // no TCP candidate was offered: nothing may use one
        }
        if let Err(why) = self.tcp.add(self.poll.registry(), stream).map(drop) {
            tracing::info!(reason = why, "ICE-TCP connection refused");
            crate::metrics::metrics()
                .ice_tcp_closed
                .with_label_values(&[why])
                .inc();
        }
    }

    /// A readiness event of one ICE-TCP connection.
    pub(super) fn on_tcp_event(&mut self, token: Token, readable: bool, writable: bool) {
        if writable {
            if let Err(why) = self.tcp.writable(token) {
                self.close_tcp(token, why);
                return;
            }
        }
        if !readable {
            return;
        }
        let mut packets = std::mem::take(&mut self.tcp_packets);
        let read = self.tcp.read(token, &mut packets);
        for packet in packets.drain(..) {
            self.tcp_packet(token, &packet);
        }
        self.tcp_packets = packets;
        match read {
            Ok(true) => self.tcp.rearm(self.poll.registry(), token),
            Ok(false) => {}
            Err(why) => self.close_tcp(token, why),
        }
        self.flush_out();
    }

    /// One packet read from a connection: to its peer, or (the first)
    /// naming the peer by its ufrag.
    fn tcp_packet(&mut self, token: Token, packet: &[u8]) {
        match self.tcp.link(token) {
            Some(ConnState::Peer(id)) => {
                let id = *id;
                self.tcp_input(token, id, packet);
            }
            Some(ConnState::New) => {
                let Some(ufrag) = routing::stun_ufrag(packet) else {
                    self.close_tcp(token, "first packet not a STUN check");
                    return;
                };
                match self.routes.peer_of_ufrag(&ufrag) {
                    Some(id) => self.bind_tcp(token, id, packet),
                    None => self.tcp.wait(token, ufrag, packet),
                }
            }
            // Checks repeated while waiting for the peer: the first is kept.
            Some(ConnState::Waiting { .. }) | None => {}
        }
    }

    /// Makes the connection carry `id`'s packets, starting with `first`.
    fn bind_tcp(&mut self, token: Token, id: PeerId, first: &[u8]) {
        let usable = self
            .peers
            .get_mut(id)
            .is_some_and(|p| p.closing_since.is_none());
        if !usable {
            self.close_tcp(token, "peer closed");
        } else if !self.tcp.bind(token, id) {
            self.close_tcp(token, "too many connections for one peer");
        } else {
            self.tcp_input(token, id, first);
        }
    }

    /// A new peer: the connections that were waiting for its ufrag.
    pub(super) fn bind_waiting_tcp(&mut self, ufrag: &str, id: PeerId) {
        for (token, first) in self.tcp.take_waiting(ufrag) {
            self.bind_tcp(token, id, &first);
        }
    }

    fn tcp_input(&mut self, token: Token, id: PeerId, packet: &[u8]) {
        let (Some(source), Some(destination)) = (self.tcp.remote(token), self.tcp_label) else {
            return;
        };
        let Ok(contents) = packet.try_into() else {
            return;
        };
        let now = Instant::now();
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Tcp,
                source,
                destination,
                contents,
            },
        );
        self.input(id, input, Some(now));
    }

    /// Writes the packets peers sent over TCP (after the UDP datagrams
    /// went: a TCP connection never delays them).
    pub(super) fn send_tcp(&mut self) {
        self.out.take_tcp(&mut self.tcp_sends);
        let mut sends = std::mem::take(&mut self.tcp_sends);
        for (to, data) in sends.drain(..) {
            if let Err((token, why)) = self.tcp.send(to, &data) {
                self.close_tcp(token, why);
            }
        }
        self.tcp_sends = sends;
    }

    /// Closes a connection; a peer whose media went over it closes too.
    pub(super) fn close_tcp(&mut self, token: Token, why: &'static str) {
        let Some((remote, ConnState::Peer(id))) = self.tcp.close(self.poll.registry(), token, why)
        else {
            return;
        };
        let carried_media = self
            .peers
            .get_mut(id)
            .is_some_and(|p| p.media_over_tcp && p.media_to == Some(remote));
        if carried_media {
            let reason = if why.starts_with("too slow") {
                "TCP receiver too slow"
            } else {
                "ICE-TCP connection lost"
            };
            self.close_peer(id, reason);
        }
    }

    /// Closes the connections of a freed peer.
    pub(super) fn close_tcp_of_peer(&mut self, id: PeerId) {
        for token in self.tcp.of_peer(id) {
            self.close_tcp(token, "peer closed");
        }
    }

    /// Closes connections that waited too long for their peer.
    pub(super) fn expire_tcp(&mut self, now: Instant) {
        if self.tcp.len() == 0 {
            return;
        }
        for (token, why) in self.tcp.expired(now, self.limits.handshake) {
            self.close_tcp(token, why);
        }
    }
}
