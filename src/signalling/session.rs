//! The state machine of one WebSocket connection: idle, sending a stream, or
//! receiving one (offered, then live). Each input (a client message, a
//! stream event, a peer event, the answer deadline) moves it on and leaves
//! the replies in [`Session::out`]; the socket itself is `mod.rs`'s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::media::Mid;
use str0m::{Candidate, Rtc};

use super::messages::{
    check_sender_offer, parse_client_message, ClientMessage, ServerMessage, SessionDescription,
};
use super::rate_limit::{Admit, RateLimit};
use super::Signalling;
use crate::access::Permissions;
use crate::metrics::metrics;
use crate::registry::{ReceiverSlot, Refused, Registry, StreamEvent};
use crate::relay::{self, Command, KeySlot, PeerEvent, PeerEvents, PeerId};

/// What a connection is doing.
enum State {
    Idle,
    /// `sender_ready` was sent; waiting for the offer.
    SenderReady {
        stream: Arc<str>,
    },
    Sending {
        stream: Arc<str>,
        peer: PeerId,
    },
    /// We offered to receive a stream and wait for the answer.
    Offering(Box<Offer>),
    Receiving {
        stream: Arc<str>,
        peer: PeerId,
        _slot: ReceiverSlot,
    },
}

/// A receiver leg offered to the client, not yet answered.
struct Offer {
    stream: Arc<str>,
    peer: PeerId,
    rtc: Rtc,
    /// Where the relay will find this peer's SRTP keys.
    keys: KeySlot,
    pending: SdpPendingOffer,
    mid: Mid,
    /// Without an answer by then, the offer is withdrawn.
    deadline: Instant,
    slot: ReceiverSlot,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

pub(super) struct Session {
    pub(super) id: String,
    ctx: Arc<Signalling>,
    state: State,
    /// What this connection's token allows.
    allowed: Permissions,
    rate: RateLimit,
    peer_events: PeerEvents,
    /// Messages for the client, in order.
    pub(super) out: Vec<ServerMessage>,
}

impl Session {
    /// A new connection; its first message, `available_streams`, is waiting
    /// in `out`.
    pub(super) fn new(ctx: Arc<Signalling>, allowed: Permissions, peer_events: PeerEvents) -> Self {
        let n = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        let rate = RateLimit::new(ctx.limits.messages_per_sec);
        let mut session = Session {
            id: format!("conn_{n}"),
            ctx,
            state: State::Idle,
            allowed,
            rate,
            peer_events,
            out: Vec::new(),
        };
        session.out.push(session.available_streams());
        session
    }

    fn available_streams(&self) -> ServerMessage {
        ServerMessage::AvailableStreams {
            streams: self.ctx.registry.list(),
        }
    }

    /// Tells the client its request failed, counting it in the metrics.
    fn reject(&mut self, msg: ServerMessage) {
        if let ServerMessage::Error { code, message } = &msg {
            let m = metrics();
            m.errors.with_label_values(&[code]).inc();
            if let Some(limit) = code.strip_prefix("limit_") {
                m.limit_hits.with_label_values(&[limit]).inc();
            }
            tracing::debug!(conn = %self.id, code, %message, "client error");
        }
        self.out.push(msg);
    }

    fn error(&mut self, code: &'static str, message: impl Into<String>) {
        self.reject(ServerMessage::error(code, message));
    }

    fn refused(&mut self, why: Refused) {
        let code = match why {
            Refused::Streams(_) => "limit_streams",
            Refused::Receivers(_) => "limit_receivers",
            Refused::ReceiversPerStream(_) => "limit_receivers_per_stream",
            Refused::NoStream => "unknown_stream",
            Refused::NameTaken => "name_taken",
        };
        self.error(code, why.to_string());
    }

    /// One text frame from the client.
    pub(super) fn on_text(&mut self, text: &str) {
        match self.rate.take(Instant::now()) {
            Admit::Yes => {}
            Admit::No => {
                metrics()
                    .limit_hits
                    .with_label_values(&["messages_per_sec"])
                    .inc();
                return;
            }
            Admit::NoSayWhy => {
                let rate = self.rate.per_sec;
                return self.error(
                    "limit_messages_per_sec",
                    format!("too many messages (the limit is {rate} per second); message ignored"),
                );
            }
        }
        match parse_client_message(text) {
            Ok(msg) => self.on_message(msg),
            Err(e) => self.reject(e),
        }
    }

    pub(super) fn on_binary(&mut self) {
        self.error(
            "bad_message",
            "binary frames are not supported: send JSON text",
        );
    }

    /// A message larger than `max` bytes arrived; the connection closes.
    pub(super) fn on_oversized(&mut self, max: usize) {
        self.error(
            "message_too_large",
            format!("message too large (the limit is {max} bytes); closing the connection"),
        );
    }

    fn on_message(&mut self, msg: ClientMessage) {
        match msg {
            ClientMessage::GetAvailableStreams => self.out.push(self.available_streams()),
            ClientMessage::StartSending => self.start_sending(),
            ClientMessage::WebrtcOffer { offer } => self.sender_offer(offer),
            ClientMessage::StartReceiving { stream_id } => self.start_receiving(stream_id),
            ClientMessage::WebrtcAnswer { answer } => self.receiver_answer(answer),
            ClientMessage::IceCandidate { candidate } => {
                self.ice_candidate(candidate.and_then(|c| c.candidate))
            }
            ClientMessage::StopStream => self.stop(),
        }
    }

    fn start_sending(&mut self) {
        if !self.allowed.send {
            return self.error("unauthorized", "sending needs a valid send token");
        }
        self.stop();
        let stream = Registry::new_stream_id();
        self.out.push(ServerMessage::SenderReady {
            connection_id: self.id.clone(),
            stream_id: stream.clone(),
            ice_servers: self.ctx.ice_servers.issue_now(),
        });
        self.state = State::SenderReady { stream };
    }

    fn sender_offer(&mut self, offer: SessionDescription) {
        let stream = match &self.state {
            State::SenderReady { stream } => stream.clone(),
            State::Sending { .. } => {
                return self.error(
                    "bad_state",
                    "this connection is already sending; send stop_stream first",
                )
            }
            _ => return self.error("bad_state", "send start_sending before webrtc_offer"),
        };
        if let Err(e) = check_sender_offer(&offer) {
            return self.error("bad_sdp", e);
        }
        let slot = match self
            .ctx
            .registry
            .try_reserve_stream(self.ctx.limits.streams)
        {
            Ok(slot) => slot,
            Err(why) => return self.refused(why),
        };
        let started = Instant::now();
        let (rtc, answer) = match self.ctx.answer_sender(&offer.sdp) {
            Ok(negotiated) => negotiated,
            Err(e) => return self.error("bad_sdp", e),
        };
        let events = self.peer_events.clone();
        let peer = match self.ctx.start_stream(slot, &stream, rtc, events) {
            Ok(peer) => peer,
            Err(e) => return self.error(e.code(), e.to_string()),
        };
        self.out.push(ServerMessage::WebrtcAnswer {
            answer: SessionDescription::answer(answer),
        });
        let elapsed = started.elapsed();
        metrics()
            .offer_answer_seconds
            .observe(elapsed.as_secs_f64());
        let micros = elapsed.as_micros() as u64;
        tracing::info!(conn = %self.id, stream = %stream, peer, micros, "sender offer answered");
        self.state = State::Sending { stream, peer };
    }

    /// The live stream a `start_receiving` asks for (`None` or empty: the
    /// newest), or the error to answer.
    fn requested_stream(&self, requested: Option<&str>) -> Result<Arc<str>, ServerMessage> {
        let registry = &self.ctx.registry;
        match requested {
            Some(id) if !id.is_empty() => registry
                .list()
                .into_iter()
                .find(|s| &**s == id)
                .ok_or_else(|| {
                    let shown: String = id.chars().take(80).collect();
                    ServerMessage::error("unknown_stream", format!("no such stream: \"{shown}\""))
                }),
            _ => registry
                .newest()
                .ok_or_else(|| ServerMessage::error("no_stream", "No audio stream available")),
        }
    }

    fn start_receiving(&mut self, requested: Option<String>) {
        if !self.allowed.listen {
            return self.error("unauthorized", "listening needs a valid token");
        }
        let target = match self.requested_stream(requested.as_deref()) {
            Ok(target) => target,
            Err(e) => return self.reject(e),
        };
        match &self.state {
            State::Offering(offer) if offer.stream == target => return,
            // The cards ask twice for the same stream: one leg is enough.
            State::Receiving { stream, .. } if *stream == target => return,
            State::SenderReady { .. } | State::Sending { .. } => {
                return self.error(
                    "bad_state",
                    "this connection is sending; send stop_stream first",
                );
            }
            _ => {}
        }
        self.stop();
        let limits = &self.ctx.limits;
        let (per_stream, total) = (limits.receivers_per_stream, limits.receivers);
        let slot = match self
            .ctx
            .registry
            .try_reserve_receiver(&target, per_stream, total)
        {
            Ok(slot) => slot,
            Err(why) => return self.refused(why),
        };
        let Some((offer, sdp)) = self.offer_to_receiver(target, slot) else {
            return self.error("internal", "could not create an offer");
        };
        self.out.push(ServerMessage::WebrtcOffer {
            offer: SessionDescription::offer(sdp),
            ice_servers: self.ctx.ice_servers.issue_now(),
        });
        tracing::debug!(conn = %self.id, stream = %offer.stream, peer = offer.peer, "offer sent to receiver");
        self.state = State::Offering(offer);
    }

    /// A receiver peer for `stream` and the SDP offer it makes.
    fn offer_to_receiver(
        &self,
        stream: Arc<str>,
        slot: ReceiverSlot,
    ) -> Option<(Box<Offer>, String)> {
        let relay = &self.ctx.relay;
        let (mut rtc, keys) = relay.new_receiver_rtc();
        let (mid, sdp, pending) = relay::offer_audio(&mut rtc, &stream)?;
        let offer = Offer {
            stream,
            peer: relay.next_peer_id(),
            rtc,
            keys,
            pending,
            mid,
            deadline: Instant::now() + self.ctx.handshake_timeout,
            slot,
        };
        Some((Box::new(offer), sdp))
    }

    fn receiver_answer(&mut self, answer: SessionDescription) {
        if !matches!(self.state, State::Offering(_)) {
            return self.error(
                "bad_state",
                "no offer is waiting for an answer (send start_receiving first)",
            );
        }
        if answer.kind != "answer" {
            return self.error("bad_sdp", "webrtc_answer.answer.type must be \"answer\"");
        }
        let sdp = match SdpAnswer::from_sdp_string(&answer.sdp) {
            Ok(s) => s,
            Err(e) => return self.error("bad_sdp", format!("invalid SDP answer: {e}")),
        };
        let State::Offering(offer) = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        let (stream, peer) = (offer.stream.clone(), offer.peer);
        let slot = match self.add_receiver(*offer, sdp) {
            Ok(slot) => slot,
            Err((code, message)) => return self.error(code, message),
        };
        tracing::info!(conn = %self.id, stream = %stream, peer, "receiver answer accepted");
        self.state = State::Receiving {
            stream,
            peer,
            _slot: slot,
        };
    }

    /// Completes an offered leg with the client's answer and hands it to the
    /// relay; the leg's slot goes on counting it. Errors: code and message.
    fn add_receiver(
        &self,
        offer: Offer,
        answer: SdpAnswer,
    ) -> Result<ReceiverSlot, (&'static str, String)> {
        let Offer {
            stream,
            peer,
            mut rtc,
            keys,
            pending,
            mid,
            slot,
            ..
        } = offer;
        if let Err(e) = rtc.sdp_api().accept_answer(pending, answer) {
            return Err(("bad_sdp", format!("cannot accept the SDP answer: {e}")));
        }
        if relay::negotiated_opus_pt(&rtc, mid).is_none() {
            return Err(("bad_sdp", "the answer does not accept Opus audio".into()));
        }
        let command = Command::AddReceiver {
            peer,
            stream,
            rtc: Box::new(rtc),
            keys,
            mid,
            events: self.peer_events.clone(),
            push: None,
        };
        match self.ctx.relay.send(command) {
            Ok(()) => Ok(slot),
            Err(e) => Err(("busy", e.to_string())),
        }
    }

    fn ice_candidate(&mut self, candidate: Option<String>) {
        let Some(text) = candidate else { return };
        let text = text.trim();
        let text = text.strip_prefix("a=").unwrap_or(text);
        if text.is_empty() {
            return; // end of candidates
        }
        let cand = match Candidate::from_sdp_string(text) {
            Ok(c) => c,
            Err(e) => return self.error("bad_candidate", format!("invalid ICE candidate: {e}")),
        };
        let peer = match &mut self.state {
            State::Offering(offer) => return offer.rtc.add_remote_candidate(cand),
            State::Sending { peer, .. } | State::Receiving { peer, .. } => *peer,
            _ => return self.error("bad_state", "no peer connection to add the candidate to"),
        };
        let command = Command::RemoteCandidate {
            peer,
            candidate: cand,
        };
        if let Err(e) = self.ctx.relay.send(command) {
            self.error("busy", e.to_string());
        }
    }

    /// A stream started or ended somewhere: tell the client; an offer for an
    /// ended stream is withdrawn.
    pub(super) fn on_stream_event(&mut self, ev: StreamEvent) {
        match ev {
            StreamEvent::Available(id) => self
                .out
                .push(ServerMessage::StreamAvailable { stream_id: id }),
            StreamEvent::Ended(id) => {
                if matches!(&self.state, State::Offering(offer) if offer.stream == id) {
                    self.state = State::Idle;
                }
                self.out.push(ServerMessage::StreamEnded { stream_id: id })
            }
            StreamEvent::Shutdown => {}
        }
    }

    /// The client missed stream events: it gets the whole list again.
    pub(super) fn on_events_lost(&mut self) {
        self.out.push(self.available_streams());
    }

    /// The relay closed one of this connection's peers.
    pub(super) fn on_peer_event(&mut self, ev: PeerEvent) {
        let PeerEvent::Closed(closed, why) = ev else {
            return;
        };
        match &self.state {
            State::Sending { stream, peer } if *peer == closed => {
                let stream = stream.clone();
                tracing::info!(conn = %self.id, stream = %stream, reason = why, "sender peer closed");
                self.state = State::Idle;
                self.ctx.end_stream(&stream);
            }
            State::Receiving { peer, .. } if *peer == closed => {
                self.state = State::Idle;
            }
            _ => {}
        }
    }

    /// When [`on_deadline`](Self::on_deadline) is next due, if ever.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Offering(offer) => Some(offer.deadline),
            _ => None,
        }
    }

    /// An offer left unanswered past the handshake timeout is withdrawn: its
    /// peer and receiver slot are freed, and the client is told.
    pub(super) fn on_deadline(&mut self, now: Instant) {
        let State::Offering(offer) = &self.state else {
            return;
        };
        if now < offer.deadline {
            return;
        }
        tracing::info!(conn = %self.id, stream = %offer.stream, peer = offer.peer, "receiver never answered; offer withdrawn");
        self.state = State::Idle;
        let secs = self.ctx.handshake_timeout.as_secs_f64();
        self.error(
            "answer_timeout",
            format!("no webrtc_answer within {secs} s: the offer is withdrawn (send start_receiving again)"),
        );
    }

    /// Ends whatever this connection is doing (`stop_stream`, or leaving).
    pub(super) fn stop(&mut self) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle | State::SenderReady { .. } | State::Offering(_) => {}
            State::Sending { stream, .. } => self.ctx.end_stream(&stream),
            State::Receiving { peer, .. } => {
                let _ = self.ctx.relay.send(Command::ClosePeer { peer });
            }
        }
    }
}

#[cfg(test)]
mod tests;
