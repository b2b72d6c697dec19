//! One peer of the relay: its str0m `Rtc`, what it is (a stream's sender, or
//! a receiver with its outgoing [`Leg`], or a push: a receiver we dialed), where it is in its life (handshake,
//! connected, closing), and when it next needs the loop (its wake-up and its
//! deadline). Calls into its str0m state go through [`Peer::contained`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::Rtc;

use super::handle::{PeerEvents, PeerId};
use super::leg::Leg;
use super::leg_socket::LegSocket;
use crate::metrics::metrics;

/// How long a closing peer may take to flush its RTCP BYE and DTLS close_notify.
pub(super) const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// What a peer is to its stream.
pub(super) enum PeerKind {
    /// The stream's one sender: its RTP is forwarded.
    Sender,
    /// A receiver, with the leg forwarded copies are written for.
    Receiver(Leg),
    /// A receiver we dialed: the stream pushed to a WHIP server. It is fed
    /// as a receiver, but we are its offerer and its full, controlling ICE
    /// agent (the far end may be ICE lite, like this relay).
    Push(Leg),
}

/// The limits on a peer's life the loop enforces.
#[derive(Clone, Copy)]
pub(super) struct Timeouts {
    /// A peer without ICE+DTLS by then is dropped.
    pub handshake: Duration,
    /// A connected sender without RTP this long ends its stream.
    pub sender_idle: Duration,
}

/// What a peer's deadline asks of the loop when it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// Close it with this reason.
    Close(&'static str),
    /// Free it (it is dead, or done closing).
    Free,
}

pub(super) struct Peer {
    pub id: PeerId,
    /// Boxed as signalling built it: an `Rtc` is ~10 KB inline, and the peer
    /// map stores `Peer`s in its table. Inline, every table slot (used or not,
    /// up to twice the peer count) would be that size, a resize would briefly
    /// hold two such tables and move every peer's 10 KB on the media thread.
    pub rtc: Box<Rtc>,
    pub kind: PeerKind,
    pub stream: Arc<str>,
    pub events: PeerEvents,
    pub created: Instant,
    /// When str0m next wants a timeout.
    pub next_timeout: Instant,
    /// The time of this peer's live entry in the timer heap.
    scheduled: Option<Instant>,
    pub connected: bool,
    /// `Rtc::close()` was called; the peer is flushing its goodbyes.
    pub closing_since: Option<Instant>,
    pub last_media: Instant,
    pub addrs: Vec<SocketAddr>,
    /// Where str0m last sent DTLS or RTCP: the nominated remote address.
    pub media_to: Option<SocketAddr>,
    /// `media_to` is an ICE-TCP connection (else a UDP address).
    pub media_over_tcp: bool,
    pub ufrag: String,
    /// A push leg's own socket, which carries all its datagrams; `None`: the
    /// relay's socket (or an ICE-TCP connection).
    pub own_socket: Option<LegSocket>,
    limits: Timeouts,
}

impl Peer {
    pub fn new(
        id: PeerId,
        rtc: Box<Rtc>,
        kind: PeerKind,
        stream: Arc<str>,
        events: PeerEvents,
        ufrag: String,
        limits: Timeouts,
    ) -> Self {
        let now = Instant::now();
        Peer {
            id,
            rtc,
            kind,
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
            media_over_tcp: false,
            ufrag,
            own_socket: None,
            limits,
        }
    }

    pub fn is_sender(&self) -> bool {
        matches!(self.kind, PeerKind::Sender)
    }

    /// "sender" or "receiver", for logs and metrics.
    pub fn role_name(&self) -> &'static str {
        match self.kind {
            PeerKind::Sender => "sender",
            PeerKind::Receiver(_) => "receiver",
            PeerKind::Push(_) => "push",
        }
    }

    /// A receiver's leg, if this is a receiver.
    pub fn leg_mut(&mut self) -> Option<&mut Leg> {
        match &mut self.kind {
            PeerKind::Receiver(leg) | PeerKind::Push(leg) => Some(leg),
            PeerKind::Sender => None,
        }
    }

    /// Runs one call into the peer's str0m state. A panic in it (a bug
    /// reached by some input) is contained to this peer: it is logged and the
    /// peer dropped, while every other peer and stream goes on.
    pub fn contained<T>(&mut self, f: impl FnOnce(&mut Peer) -> T) -> Option<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *self))) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::error!(peer = self.id, stream = %self.stream, "panic inside a peer; dropping it");
                metrics().peers_closed.with_label_values(&["panic"]).inc();
                self.rtc.disconnect();
                self.next_timeout = Instant::now();
                None
            }
        }
    }

    /// When this peer's life must next be checked: the end of its close
    /// grace, of its handshake, or of a sender's allowed silence.
    pub fn deadline(&self) -> Option<Instant> {
        if let Some(t) = self.closing_since {
            Some(t + CLOSE_GRACE)
        } else if !self.connected {
            Some(self.created + self.limits.handshake)
        } else if self.is_sender() {
            Some(self.last_media + self.limits.sender_idle)
        } else {
            None
        }
    }

    /// What is due for this peer at `now`, if anything besides its str0m
    /// timeout: freeing a dead or closed peer, or closing one whose
    /// handshake or sender silence lasted too long.
    pub fn expiry(&self, now: Instant) -> Option<Expiry> {
        if !self.rtc.is_alive() {
            return Some(Expiry::Free);
        }
        if self.deadline().is_none_or(|d| now < d) {
            return None;
        }
        Some(match (self.closing_since, self.connected) {
            (Some(_), _) => Expiry::Free,
            (None, false) => Expiry::Close("ICE/DTLS handshake timed out"),
            (None, true) => Expiry::Close("sender sent no audio"),
        })
    }

    /// Puts the peer's next wake-up (its str0m timeout, or its deadline if
    /// earlier) in `timers`, unless an entry at or before it is there.
    pub fn schedule(&mut self, timers: &mut impl Extend<(Instant, PeerId)>) {
        let wake = match self.deadline() {
            Some(d) => d.min(self.next_timeout),
            None => self.next_timeout,
        };
        if self.scheduled.is_none_or(|s| wake < s) {
            self.scheduled = Some(wake);
            timers.extend([(wake, self.id)]);
        }
    }

    /// Whether a timer entry at `at` is this peer's live one; if so it is
    /// consumed (the peer has no live entry until scheduled again).
    pub fn take_wake(&mut self, at: Instant) -> bool {
        if self.scheduled != Some(at) {
            return false;
        }
        self.scheduled = None;
        true
    }
}

/// Every peer of the relay, grouped by stream name, so that one stream's
/// receivers can be borrowed together (to forward on several threads)
/// without looking at other streams' peers. A group may hold the closing
/// peers of an ended stream beside a new stream of the same name; a
/// closing peer is skipped by the forward path.
#[derive(Default)]
pub(super) struct Peers {
    by_stream: HashMap<Arc<str>, HashMap<PeerId, Peer>>,
    stream_of: HashMap<PeerId, Arc<str>>,
}

impl Peers {
    pub fn insert(&mut self, peer: Peer) {
        self.stream_of.insert(peer.id, peer.stream.clone());
        self.by_stream
            .entry(peer.stream.clone())
            .or_default()
            .insert(peer.id, peer);
    }

    pub fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        let stream = self.stream_of.get(&id)?;
        self.by_stream.get_mut(stream)?.get_mut(&id)
    }

    pub fn remove(&mut self, id: PeerId) -> Option<Peer> {
        let stream = self.stream_of.remove(&id)?;
        let group = self.by_stream.get_mut(&stream)?;
        let peer = group.remove(&id);
        if group.is_empty() {
            self.by_stream.remove(&stream);
        }
        peer
    }

    pub fn is_empty(&self) -> bool {
        self.stream_of.is_empty()
    }

    pub fn ids(&self) -> Vec<PeerId> {
        self.stream_of.keys().copied().collect()
    }

    /// The receivers of `stream`, each borrowed once.
    pub fn receivers_mut(&mut self, stream: &str) -> Vec<&mut Peer> {
        match self.by_stream.get_mut(stream) {
            Some(group) => group.values_mut().filter(|p| !p.is_sender()).collect(),
            None => Vec::new(),
        }
    }
}

/// Peers for unit tests: a fresh `Rtc` (no media), and for a receiver a leg
/// with made-up ids.
#[cfg(test)]
impl Peer {
    pub const TEST_LIMITS: Timeouts = Timeouts {
        handshake: Duration::from_secs(15),
        sender_idle: Duration::from_secs(20),
    };

    pub fn for_test(id: PeerId, stream: &str, sender: bool) -> Peer {
        let rtc = Rtc::builder().build(Instant::now());
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let kind = if sender {
            PeerKind::Sender
        } else {
            PeerKind::Receiver(Leg {
                ssrc: 1.into(),
                pt: 111.into(),
                audio_level_id: None,
                mid_ext: None,
                seq: super::leg::SeqMap::new(0xff00),
                keys: Default::default(),
                srtp: None,
            })
        };
        let ufrag = format!("ufrag{id}");
        Peer::new(
            id,
            Box::new(rtc),
            kind,
            stream.into(),
            events,
            ufrag,
            Self::TEST_LIMITS,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Timeouts = Peer::TEST_LIMITS;

    fn peer(id: PeerId, stream: &str, sender: bool) -> Peer {
        Peer::for_test(id, stream, sender)
    }

    #[test]
    fn deadlines_close_and_free_a_peer_by_its_state() {
        let mut p = peer(1, "a", true);
        let t0 = p.created;
        assert_eq!(p.deadline(), Some(t0 + LIMITS.handshake));
        assert_eq!(p.expiry(t0 + Duration::from_secs(14)), None);
        assert_eq!(
            p.expiry(t0 + LIMITS.handshake),
            Some(Expiry::Close("ICE/DTLS handshake timed out"))
        );
        p.connected = true;
        p.last_media = t0 + Duration::from_secs(5);
        assert_eq!(p.expiry(t0 + Duration::from_secs(24)), None);
        assert_eq!(
            p.expiry(t0 + Duration::from_secs(25)),
            Some(Expiry::Close("sender sent no audio"))
        );
        p.closing_since = Some(t0 + Duration::from_secs(30));
        assert_eq!(p.expiry(t0 + Duration::from_secs(30)), None);
        assert_eq!(
            p.expiry(t0 + Duration::from_secs(30) + CLOSE_GRACE),
            Some(Expiry::Free)
        );

        let mut r = peer(2, "a", false);
        r.connected = true;
        assert_eq!(
            r.deadline(),
            None,
            "a connected receiver lives on str0m's timers"
        );
        r.rtc.disconnect();
        assert_eq!(
            r.expiry(r.created),
            Some(Expiry::Free),
            "a dead peer is freed at once"
        );
    }

    #[test]
    fn a_peer_keeps_one_live_timer_at_its_earliest_wake_up() {
        let mut timers: Vec<(Instant, PeerId)> = Vec::new();
        let mut p = peer(1, "a", true);
        let t0 = p.created;
        p.next_timeout = t0 + Duration::from_secs(60);
        p.schedule(&mut timers);
        assert_eq!(
            timers,
            vec![(t0 + LIMITS.handshake, 1)],
            "the deadline is earlier"
        );
        p.next_timeout = t0 + Duration::from_secs(1);
        p.schedule(&mut timers);
        p.next_timeout = t0 + Duration::from_secs(2);
        p.schedule(&mut timers);
        assert_eq!(timers.len(), 2, "a later wake-up adds no entry");
        assert!(!p.take_wake(t0 + LIMITS.handshake), "superseded");
        assert!(p.take_wake(t0 + Duration::from_secs(1)));
        assert!(!p.take_wake(t0 + Duration::from_secs(1)), "taken once");
    }

    #[test]
    fn a_streams_receivers_are_borrowed_without_others() {
        let mut peers = Peers::default();
        peers.insert(peer(1, "a", true));
        peers.insert(peer(2, "a", false));
        peers.insert(peer(3, "b", false));
        peers.insert(peer(4, "a", false));
        let mut ids: Vec<PeerId> = peers.receivers_mut("a").iter().map(|p| p.id).collect();
        ids.sort();
        assert_eq!(ids, vec![2, 4]);
        assert!(peers.receivers_mut("c").is_empty());
        assert_eq!(peers.remove(3).map(|p| p.id), Some(3));
        assert!(peers.get_mut(3).is_none());
        assert!(peers.receivers_mut("b").is_empty());
        assert_eq!(peers.get_mut(4).map(|p| p.id), Some(4));
        for id in [1, 2, 4] {
            peers.remove(id);
        }
        assert!(peers.is_empty());
    }
}
