//! Which peer a datagram belongs to: by its source address once a STUN check
//! has introduced that address, else by the ICE ufrag a STUN
//! binding request names (an ICE-TCP connection is named once, by its first
//! check). Checks that arrive before their peer (a browser starts ICE as soon
//! as it answers) are kept a moment in [`EarlyStun`] and replayed.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::handle::PeerId;
use super::peer::{Peer, Peers};

/// Remote addresses one peer may be reached from.
const MAX_ADDRS_PER_PEER: usize = 8;

#[derive(Default)]
pub(super) struct Routes {
    by_addr: HashMap<SocketAddr, PeerId>,
    by_ufrag: HashMap<String, PeerId>,
    /// STUN checks that arrived before their peer (bounded, short-lived).
    early_stun: EarlyStun,
}

impl Routes {
    /// Routes the peer's ufrag to it; returns the STUN checks that arrived
    /// for it early, to be handled now.
    pub fn add(&mut self, peer: &Peer) -> Vec<(SocketAddr, Vec<u8>)> {
        self.by_ufrag.insert(peer.ufrag.clone(), peer.id);
        self.early_stun.take(&peer.ufrag)
    }

    /// Forgets every route to a freed peer.
    pub fn remove(&mut self, peer: &Peer) {
        for a in &peer.addrs {
            self.by_addr.remove(a);
        }
        self.by_ufrag.remove(&peer.ufrag);
    }

    /// The peer whose local ufrag is `ufrag`.
    pub fn peer_of_ufrag(&self, ufrag: &str) -> Option<PeerId> {
        self.by_ufrag.get(ufrag).copied()
    }

    /// Which peer a datagram from `source` belongs to. A STUN binding request
    /// from an unknown address naming a peer's ufrag adds that address to the
    /// peer (unless it is closing or has enough).
    pub fn route(&mut self, source: SocketAddr, data: &[u8], peers: &mut Peers) -> Option<PeerId> {
        if let Some(id) = self.by_addr.get(&source) {
            return Some(*id);
        }
        // Unknown address: only a STUN binding request naming one of our
        // ufrags can introduce it (RFC 7983: STUN starts with 0..=3).
        if data.first().is_none_or(|b| *b >= 4) {
            return None;
        }
        let msg = str0m::ice::StunMessage::parse(data).ok()?;
        let (local, _remote) = msg.split_username()?;
        let Some(id) = self.by_ufrag.get(local).copied() else {
            // A browser often checks before its answer has reached us (it
            // answers and starts ICE at once): keep the check for a moment
            // and replay it when the peer arrives.
            self.early_stun.keep(local, source, data);
            return None;
        };
        let peer = peers.get_mut(id)?;
        if peer.closing_since.is_none() && peer.addrs.len() < MAX_ADDRS_PER_PEER {
            peer.addrs.push(source);
            self.by_addr.insert(source, id);
        }
        Some(id)
    }
}

/// The local ufrag (ours) a STUN binding request names, if `data` is one.
pub(super) fn stun_ufrag(data: &[u8]) -> Option<String> {
    let msg = str0m::ice::StunMessage::parse(data).ok()?;
    if !msg.is_binding_request() {
        return None;
    }
    let (local, _remote) = msg.split_username()?;
    Some(local.to_owned())
}

/// STUN binding requests for ufrags no peer has yet.
#[derive(Default)]
struct EarlyStun {
    items: VecDeque<(Instant, String, SocketAddr, Vec<u8>)>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::ice::TransId;

    /// A STUN binding request to our `local` ufrag, as a browser sends it.
    fn check(local: &str) -> Vec<u8> {
        let username = format!("{local}:browser");
        let msg = str0m::ice::StunMessage::binding_request(
            &username,
            TransId::new(),
            true,
            1,
            100,
            false,
        );
        let mut buf = vec![0u8; 512];
        let n = msg
            .to_bytes(Some(b"pw"), &mut buf, |_, _| [0u8; 20])
            .unwrap();
        buf.truncate(n);
        buf
    }

    fn from(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_check_introduces_an_address_and_early_checks_wait_for_their_peer() {
        let (mut routes, mut peers) = (Routes::default(), Peers::default());
        let rtp = [0x80u8, 111, 0, 1];
        // Before the peer: nothing routes, the check is kept.
        let first = check("ufrag7");
        assert_eq!(routes.route(from(1), &first, &mut peers), None);
        assert_eq!(routes.route(from(1), &rtp, &mut peers), None);
        let peer = Peer::for_test(7, "s", true);
        let early = routes.add(&peer);
        peers.insert(peer);
        assert_eq!(
            early,
            vec![(from(1), first)],
            "replayed when the peer comes"
        );
        // Its check names the peer and introduces the address.
        assert_eq!(routes.route(from(1), &check("ufrag7"), &mut peers), Some(7));
        assert_eq!(routes.route(from(1), &rtp, &mut peers), Some(7));
        assert_eq!(
            routes.route(from(2), &rtp, &mut peers),
            None,
            "unknown address"
        );
        assert_eq!(routes.route(from(2), &check("other"), &mut peers), None);
        // A peer is reached from a bounded number of addresses.
        for port in 3..20 {
            assert_eq!(
                routes.route(from(port), &check("ufrag7"), &mut peers),
                Some(7)
            );
        }
        let learned = peers.get_mut(7).map(|p| p.addrs.len());
        assert_eq!(learned, Some(MAX_ADDRS_PER_PEER));
        // Freed: no route is left.
        let peer = peers.remove(7).unwrap();
        routes.remove(&peer);
        assert_eq!(routes.route(from(1), &rtp, &mut peers), None);
    }

    #[test]
    fn the_ufrag_of_a_binding_request_only() {
        assert_eq!(stun_ufrag(&check("abc")).as_deref(), Some("abc"));
        assert_eq!(stun_ufrag(&[0x80, 111, 0, 1]), None);
        assert_eq!(stun_ufrag(&[0u8; 20]), None);
    }
}
