//! WHIP ingest (RFC 9725) and WHEP playback sessions: WebRTC peers whose
//! offer and answer travel in one HTTP request instead of over the
//! WebSocket. A session starts and ends its stream (or its receiver leg)
//! through the same orchestration as a WebSocket client — registry
//! reservations, `Signalling::start_stream`/`end_stream`, relay commands —
//! so it shares the streams, limits, events and counts. Owns the bounded
//! table of live sessions and, per session, the task that hears its peer
//! close. The HTTP side (`http::whip`) maps requests and errors onto it.

mod sdp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use str0m::change::SdpOffer;
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::registry::{ReceiverSlot, Refused, Registry};
use crate::relay::{negotiated_opus_pt, Command, PeerEvent, PeerId};
use crate::signalling::messages::check_sender_sdp;
use crate::signalling::Signalling;
use crate::sync::lock;

pub use sdp::valid_stream_name;

/// What a session does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// WHIP: it sends a stream.
    Publish,
    /// WHEP: it receives one.
    Play,
}

/// One live session.
struct Session {
    kind: Kind,
    stream: Arc<str>,
    peer: PeerId,
    /// A player's place among the stream's receivers, held while it lives.
    _receiver: Option<ReceiverSlot>,
}

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The SDP does not parse, or str0m cannot answer it.
    #[error("{0}")]
    BadSdp(String),
    /// The SDP parses but offers nothing we can relay (no Opus audio).
    #[error("{0}")]
    Unacceptable(String),
    #[error("invalid stream name: use 1 to 64 letters, digits, '-' or '_' (and not \"latest\")")]
    BadName,
    /// A registry limit, or the name is taken.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// WHEP `latest` while no stream is live.
    #[error("no stream is live yet")]
    NoLiveStream,
    #[error("too many WHIP/WHEP sessions (the limit is {0})")]
    TooManySessions(usize),
    /// The relay is overloaded or stopped.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

/// A started session: its id (for the session URL), its stream, and our
/// SDP answer.
pub struct Started {
    pub id: String,
    pub stream: Arc<str>,
    pub answer: String,
}

/// The live WHIP and WHEP sessions.
pub struct Sessions {
    ctx: Arc<Signalling>,
    table: Mutex<HashMap<String, Session>>,
    /// At most this many sessions at once.
    max: usize,
}

impl Sessions {
    /// A table for at most as many sessions as the server may have streams
    /// and receivers.
    pub fn new(ctx: Arc<Signalling>) -> Arc<Self> {
        let max = ctx.limits.streams.saturating_add(ctx.limits.receivers);
        Arc::new(Sessions {
            ctx,
            table: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// WHIP: starts a stream from a sender's SDP offer, named `name` when
    /// given (else `stream_<random>`), exactly as a WebSocket
    /// `start_sending` + `webrtc_offer` does.
    pub fn publish(
        self: &Arc<Self>,
        name: Option<&str>,
        offer: &str,
    ) -> Result<Started, SessionError> {
        SdpOffer::from_sdp_string(offer)
            .map_err(|e| SessionError::BadSdp(format!("invalid SDP offer: {e}")))?;
        check_sender_sdp(offer).map_err(SessionError::Unacceptable)?;
        self.check_room()?;
        let registry = &self.ctx.registry;
        let max = self.ctx.limits.streams;
        let (stream, slot) = match name {
            Some(name) if !valid_stream_name(name) => return Err(SessionError::BadName),
            Some(name) => {
                let stream: Arc<str> = name.into();
                (
                    stream.clone(),
                    registry.try_reserve_named_stream(max, stream)?,
                )
            }
            None => (Registry::new_stream_id(), registry.try_reserve_stream(max)?),
        };
        let (rtc, answer) = self
            .ctx
            .answer_sender(offer)
            .map_err(SessionError::Unacceptable)?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let peer = self
            .ctx
            .start_stream(slot, &stream, rtc, events_tx)
            .map_err(|e| match e.code() {
                "busy" => SessionError::Busy(e.to_string()),
                _ => SessionError::Internal(e.to_string()),
            })?;
        let session = Session {
            kind: Kind::Publish,
            stream: stream.clone(),
            peer,
            _receiver: None,
        };
        let id = self.insert(session, events);
        tracing::info!(session = %id, stream = %stream, peer, "WHIP session started");
        Ok(Started { id, stream, answer })
    }

    /// WHEP: adds a receiver of `requested` (a stream id, or `latest` for
    /// the newest stream) from a player's offer, exactly as a WebSocket
    /// `start_receiving` does, except that the player offers and we answer.
    pub fn play(self: &Arc<Self>, requested: &str, offer: &str) -> Result<Started, SessionError> {
        let sdp = SdpOffer::from_sdp_string(offer)
            .map_err(|e| SessionError::BadSdp(format!("invalid SDP offer: {e}")))?;
        let mid = sdp::audio_mid(offer).ok_or_else(|| {
            SessionError::Unacceptable("the offer has no audio m-line with an a=mid".into())
        })?;
        self.check_room()?;
        let stream = self.requested_stream(requested)?;
        let limits = &self.ctx.limits;
        let slot = self.ctx.registry.try_reserve_receiver(
            &stream,
            limits.receivers_per_stream,
            limits.receivers,
        )?;
        let relay = &self.ctx.relay;
        let (mut rtc, keys) = relay.new_receiver_rtc();
        let answer = rtc
            .sdp_api()
            .accept_offer(sdp)
            .map_err(|e| SessionError::Unacceptable(format!("cannot accept the SDP offer: {e}")))?;
        if negotiated_opus_pt(&rtc, mid).is_none() {
            return Err(SessionError::Unacceptable(
                "the offer does not receive Opus audio".into(),
            ));
        }
        let peer = relay.next_peer_id();
        let (events_tx, events) = mpsc::unbounded_channel();
        let command = Command::AddReceiver {
            peer,
            stream: stream.clone(),
            rtc: Box::new(rtc),
            keys,
            mid,
            events: events_tx,
            push: None,
        };
        relay
            .send(command)
            .map_err(|e| SessionError::Busy(e.to_string()))?;
        let session = Session {
            kind: Kind::Play,
            stream: stream.clone(),
            peer,
            _receiver: Some(slot),
        };
        let id = self.insert(session, events);
        tracing::info!(session = %id, stream = %stream, peer, "WHEP session started");
        Ok(Started {
            id,
            stream,
            answer: answer.to_sdp_string(),
        })
    }

    /// The live stream a WHEP request names (`latest`: the newest).
    fn requested_stream(&self, requested: &str) -> Result<Arc<str>, SessionError> {
        let registry = &self.ctx.registry;
        if requested == "latest" {
            return registry.newest().ok_or(SessionError::NoLiveStream);
        }
        registry
            .list()
            .into_iter()
            .find(|s| &**s == requested)
            .ok_or(SessionError::Refused(Refused::NoStream))
    }

    /// A 503 before any work when the table is full.
    fn check_room(&self) -> Result<(), SessionError> {
        if lock(&self.table).len() >= self.max {
            return Err(SessionError::TooManySessions(self.max));
        }
        Ok(())
    }

    /// Lists a started session and watches its peer: when the relay closes
    /// it (DELETE, idle sender, failed ICE/DTLS, stream ended), the session
    /// ends. The table may pass `max` by the few requests racing past
    /// [`check_room`](Self::check_room); every entry holds a registry place,
    /// which stays strictly bounded.
    fn insert(self: &Arc<Self>, session: Session, events: UnboundedReceiver<PeerEvent>) -> String {
        let id = new_session_id();
        lock(&self.table).insert(id.clone(), session);
        tokio::spawn(self.clone().watch(id.clone(), events));
        id
    }

    async fn watch(self: Arc<Self>, id: String, mut events: UnboundedReceiver<PeerEvent>) {
        while let Some(ev) = events.recv().await {
            if let PeerEvent::Closed(_, why) = ev {
                tracing::info!(session = %id, reason = why, "WHIP/WHEP peer closed");
                break;
            }
        }
        self.remove(&id, None);
    }

    /// DELETE: ends the session `id` of kind `kind`. False if there is none.
    pub fn end(&self, id: &str, kind: Kind) -> bool {
        let found = self.remove(id, Some(kind));
        if found {
            tracing::info!(session = %id, ?kind, "session deleted by its client");
        }
        found
    }

    /// Removes session `id` (only if of kind `kind`, when given) and ends
    /// what it does.
    fn remove(&self, id: &str, kind: Option<Kind>) -> bool {
        let session = {
            let mut table = lock(&self.table);
            match table.get(id) {
                Some(s) if kind.is_none_or(|k| k == s.kind) => table.remove(id),
                _ => None,
            }
        };
        let Some(session) = session else {
            return false;
        };
        match session.kind {
            Kind::Publish => self.ctx.end_stream(&session.stream),
            Kind::Play => {
                let _ = self
                    .ctx
                    .relay
                    .send(Command::ClosePeer { peer: session.peer });
            }
        }
        tracing::debug!(session = %id, peer = session.peer, "WHIP/WHEP session ended");
        true
    }
}

/// A session id: 128 random bits, so a session URL cannot be guessed.
fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
