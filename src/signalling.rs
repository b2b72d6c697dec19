//! Signalling: the JSON messages of the WebSocket protocol (see PROTOCOL.md)
//! and the state of one connection — idle, sending a stream, or receiving
//! one. It talks to the registry (streams, events) and hands negotiated peers
//! to the media relay.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::{Candidate, Rtc};
use tokio::sync::{broadcast, mpsc};

use crate::access::Permissions;
use crate::config::Limits;
use crate::metrics::metrics;
use crate::mp3::{self, Mp3Config};
use crate::registry::{CountGuard, Registry, StreamEvent};
use crate::relay::{self, Command, KeySlot, PeerEvent, PeerId, RelayHandle};

/// A client that does not take a message within this time is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What every connection needs.
pub struct Signalling {
    pub registry: Arc<Registry>,
    pub relay: RelayHandle,
    pub mp3: Mp3Config,
    pub limits: Limits,
}

// ---------------------------------------------------------------- messages

/// `{type: "offer"|"answer", sdp}`.
#[derive(Debug, Deserialize, Serialize)]
pub struct SessionDescription {
    #[serde(rename = "type")]
    pub kind: String,
    pub sdp: String,
}

#[derive(Debug, Deserialize)]
pub struct IceCandidateInit {
    #[serde(default)]
    pub candidate: Option<String>,
}

/// Messages a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    GetAvailableStreams,
    StartSending,
    WebrtcOffer {
        offer: SessionDescription,
    },
    StartReceiving {
        #[serde(default)]
        stream_id: Option<String>,
    },
    WebrtcAnswer {
        answer: SessionDescription,
    },
    IceCandidate {
        candidate: Option<IceCandidateInit>,
    },
    StopStream,
}

const CLIENT_TYPES: &[&str] = &[
    "get_available_streams",
    "start_sending",
    "webrtc_offer",
    "start_receiving",
    "webrtc_answer",
    "ice_candidate",
    "stop_stream",
];

/// Messages the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    AvailableStreams {
        streams: Vec<Arc<str>>,
    },
    SenderReady {
        connection_id: String,
        stream_id: Arc<str>,
    },
    WebrtcAnswer {
        answer: SessionDescription,
    },
    WebrtcOffer {
        offer: SessionDescription,
    },
    StreamAvailable {
        stream_id: Arc<str>,
    },
    StreamEnded {
        stream_id: Arc<str>,
    },
    Error {
        message: String,
        code: &'static str,
    },
}

/// Longest error message sent (they may quote parts of the bad input).
const MAX_ERROR_CHARS: usize = 300;

impl ServerMessage {
    fn error(code: &'static str, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.chars().count() > MAX_ERROR_CHARS {
            message = message.chars().take(MAX_ERROR_CHARS).collect::<String>() + "…";
        }
        ServerMessage::Error { message, code }
    }
}

/// Parses one text frame, with an error message a person can act on.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ServerMessage> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ServerMessage::error("bad_json", format!("malformed JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(ServerMessage::error(
            "bad_message",
            "a message must be a JSON object with a string field \"type\"",
        ));
    };
    let Some(kind) = obj.get("type").and_then(|t| t.as_str()) else {
        return Err(ServerMessage::error(
            "bad_message",
            "missing string field \"type\"",
        ));
    };
    if !CLIENT_TYPES.contains(&kind) {
        let shown: String = kind.chars().take(64).collect();
        return Err(ServerMessage::error(
            "unknown_type",
            format!("unknown message type \"{shown}\""),
        ));
    }
    let kind = kind.to_owned();
    serde_json::from_value(value).map_err(|e| {
        ServerMessage::error("bad_message", format!("invalid \"{kind}\" message: {e}"))
    })
}

/// Checks that an SDP offer from a sender can be relayed: it must carry an
/// audio m-line that offers Opus.
fn check_sender_sdp(sdp: &str) -> Result<(), String> {
    let lower = sdp.to_ascii_lowercase();
    if !lower.lines().any(|l| l.starts_with("m=audio")) {
        return Err("the offer has no audio track (m=audio)".into());
    }
    if !lower.contains("opus/48000") {
        return Err("the offer does not include the Opus codec".into());
    }
    Ok(())
}

// ------------------------------------------------------- connection state

enum Role {
    Idle,
    /// `sender_ready` was sent; waiting for the offer.
    SenderReady {
        stream: Arc<str>,
    },
    Sending {
        stream: Arc<str>,
        peer: PeerId,
    },
    /// We offered to receive `stream` and wait for the answer.
    Offering {
        stream: Arc<str>,
        peer: PeerId,
        rtc: Box<Rtc>,
        /// Where the relay will find this peer's SRTP keys.
        keys: KeySlot,
        pending: SdpPendingOffer,
        mid: Mid,
        _count: CountGuard,
    },
    Receiving {
        stream: Arc<str>,
        peer: PeerId,
        _count: CountGuard,
    },
}

struct Connection {
    id: String,
    ctx: Arc<Signalling>,
    role: Role,
    /// What this connection's token allows.
    allowed: Permissions,
    rate: RateLimit,
    peer_events: mpsc::UnboundedSender<PeerEvent>,
    out: Vec<ServerMessage>,
}

/// A token bucket: `per_sec` messages a second, bursts of twice that.
struct RateLimit {
    per_sec: u32,
    tokens: f64,
    last: Instant,
    last_warned: Option<Instant>,
}

enum Admit {
    Yes,
    /// Refused, and the client should be told (at most once a second).
    NoSayWhy,
    No,
}

impl RateLimit {
    fn new(per_sec: u32) -> Self {
        RateLimit {
            per_sec,
            tokens: f64::from(per_sec) * 2.0,
            last: Instant::now(),
            last_warned: None,
        }
    }

    fn take(&mut self, now: Instant) -> Admit {
        let rate = f64::from(self.per_sec);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admit::Yes;
        }
        if self
            .last_warned
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_warned = Some(now);
            Admit::NoSayWhy
        } else {
            Admit::No
        }
    }
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Serves one WebSocket client until it leaves or the server stops.
pub async fn serve(
    socket: WebSocket,
    ctx: Arc<Signalling>,
    max_message: usize,
    allowed: Permissions,
) {
    let n = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let _client = ctx.registry.client_guard();
    let (peer_tx, mut peer_rx) = mpsc::unbounded_channel();
    let mut events = ctx.registry.subscribe();
    let ctx_rate = ctx.limits.messages_per_sec;
    let mut conn = Connection {
        id: format!("conn_{n}"),
        ctx,
        role: Role::Idle,
        allowed,
        rate: RateLimit::new(ctx_rate),
        peer_events: peer_tx,
        out: Vec::new(),
    };
    tracing::debug!(conn = %conn.id, "websocket connected");
    let (mut sink, mut stream) = socket.split();
    conn.out.push(conn.available_streams());

    'serve: loop {
        for msg in conn.out.drain(..) {
            if !send(&mut sink, &msg).await {
                break 'serve;
            }
        }
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => conn.handle_text(&text),
                Some(Ok(Message::Binary(_))) => conn.error(
                    "bad_message",
                    "binary frames are not supported: send JSON text",
                ),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    let text = e.to_string();
                    if text.contains("too long") || text.contains("too big") {
                        tracing::info!(conn = %conn.id, error = %text, "oversized message, closing");
                        conn.error(
                            "message_too_large",
                            format!("message too large (the limit is {max_message} bytes); closing the connection"),
                        );
                        for msg in conn.out.drain(..) {
                            let _ = send(&mut sink, &msg).await;
                        }
                        let _ = sink.send(Message::Close(Some(CloseFrame {
                            code: 1009,
                            reason: Utf8Bytes::from_static("message too big"),
                        }))).await;
                        linger(&mut stream).await;
                    } else {
                        tracing::debug!(conn = %conn.id, error = %text, "websocket dropped");
                    }
                    break;
                }
            },
            ev = events.recv() => match ev {
                Ok(StreamEvent::Shutdown) => {
                    for stream_id in conn.ctx.registry.list() {
                        let _ = send(&mut sink, &ServerMessage::StreamEnded { stream_id }).await;
                    }
                    let _ = sink.send(Message::Close(Some(CloseFrame {
                        code: 1001,
                        reason: Utf8Bytes::from_static("server shutting down"),
                    }))).await;
                    break;
                }
                Ok(ev) => conn.handle_stream_event(ev),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    conn.out.push(conn.available_streams());
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            Some(ev) = peer_rx.recv() => conn.handle_peer_event(ev),
        }
    }
    conn.stop();
    tracing::debug!(conn = %conn.id, "websocket closed");
}

/// After we close a connection with unread input, read (and discard) what
/// the client still sends for a moment: closing a socket with unread data
/// resets it, and the reset can destroy the error and close frames we just
/// sent before the client reads them.
async fn linger<S>(stream: &mut S)
where
    S: futures_util::Stream + Unpin,
{
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(1);
    for _ in 0..256 {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    // The stream may give up at once after a protocol error: still leave the
    // client a moment to read our frames before the socket closes.
    tokio::time::sleep_until(deadline.min(start + Duration::from_millis(500))).await;
}

async fn send<S>(sink: &mut S, msg: &ServerMessage) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    let Ok(text) = serde_json::to_string(msg) else {
        return true;
    };
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(text.into()))).await,
        Ok(Ok(()))
    )
}

impl Connection {
    fn available_streams(&self) -> ServerMessage {
        ServerMessage::AvailableStreams {
            streams: self.ctx.registry.list(),
        }
    }

    fn error(&mut self, code: &'static str, message: impl Into<String>) {
        let msg = ServerMessage::error(code, message);
        let m = metrics();
        m.errors.with_label_values(&[code]).inc();
        if let Some(limit) = code.strip_prefix("limit_") {
            m.limit_hits.with_label_values(&[limit]).inc();
        }
        if let ServerMessage::Error { message, .. } = &msg {
            tracing::debug!(conn = %self.id, code, %message, "client error");
        }
        self.out.push(msg);
    }

    fn handle_text(&mut self, text: &str) {
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
        let msg = match parse_client_message(text) {
            Ok(m) => m,
            Err(e) => {
                if let ServerMessage::Error { code, .. } = &e {
                    metrics().errors.with_label_values(&[code]).inc();
                }
                self.out.push(e);
                return;
            }
        };
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
        });
        self.role = Role::SenderReady { stream };
    }

    fn sender_offer(&mut self, offer: SessionDescription) {
        let stream = match &self.role {
            Role::SenderReady { stream } => stream.clone(),
            Role::Sending { .. } => {
                return self.error(
                    "bad_state",
                    "this connection is already sending; send stop_stream first",
                )
            }
            _ => return self.error("bad_state", "send start_sending before webrtc_offer"),
        };
        if offer.kind != "offer" {
            return self.error("bad_sdp", "webrtc_offer.offer.type must be \"offer\"");
        }
        if let Err(e) = check_sender_sdp(&offer.sdp) {
            return self.error("bad_sdp", e);
        }
        let max = self.ctx.limits.streams;
        if self.ctx.registry.list().len() >= max {
            return self.error(
                "limit_streams",
                format!("the server already relays its maximum of {max} streams"),
            );
        }
        let started = Instant::now();
        let sdp = match SdpOffer::from_sdp_string(&offer.sdp) {
            Ok(s) => s,
            Err(e) => return self.error("bad_sdp", format!("invalid SDP offer: {e}")),
        };
        let relay = &self.ctx.relay;
        let mut rtc = relay.new_sender_rtc();
        let answer = match rtc.sdp_api().accept_offer(sdp) {
            Ok(a) => a,
            Err(e) => return self.error("bad_sdp", format!("cannot accept the SDP offer: {e}")),
        };
        let peer = relay.next_peer_id();
        let (sink, fanout) = match mp3::try_start(&stream, self.ctx.mp3.clone()) {
            Ok(v) => v,
            Err(e) => return self.error("internal", format!("cannot start the MP3 encoder: {e}")),
        };
        if let Err(e) = relay.send(Command::AddSender {
            peer,
            stream: stream.clone(),
            rtc: Box::new(rtc),
            events: self.peer_events.clone(),
            mp3: Some(sink),
        }) {
            return self.error("busy", e.to_string());
        }
        self.out.push(ServerMessage::WebrtcAnswer {
            answer: SessionDescription {
                kind: "answer".into(),
                sdp: answer.to_sdp_string(),
            },
        });
        metrics()
            .offer_answer_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            conn = %self.id,
            stream = %stream,
            peer,
            micros = started.elapsed().as_micros() as u64,
            "sender offer answered"
        );
        self.ctx.registry.add_stream(stream.clone(), fanout);
        self.role = Role::Sending { stream, peer };
    }

    fn start_receiving(&mut self, requested: Option<String>) {
        if !self.allowed.listen {
            return self.error("unauthorized", "listening needs a valid token");
        }
        let registry = self.ctx.registry.clone();
        let target: Arc<str> = match requested.as_deref() {
            Some(id) if !id.is_empty() => match registry.list().into_iter().find(|s| &**s == id) {
                Some(s) => s,
                None => {
                    let shown: String = id.chars().take(80).collect();
                    return self.error("unknown_stream", format!("no such stream: \"{shown}\""));
                }
            },
            _ => match registry.newest() {
                Some(s) => s,
                None => return self.error("no_stream", "No audio stream available"),
            },
        };
        match &self.role {
            Role::Offering { stream, .. } | Role::Receiving { stream, .. } if *stream == target => {
                // The cards ask twice for the same stream: one leg is enough.
                return;
            }
            Role::SenderReady { .. } | Role::Sending { .. } => {
                return self.error(
                    "bad_state",
                    "this connection is sending; send stop_stream first",
                );
            }
            _ => {}
        }
        self.stop();
        let limits = &self.ctx.limits;
        if registry.receivers() >= limits.receivers {
            let max = limits.receivers;
            return self.error(
                "limit_receivers",
                format!("the server already has its maximum of {max} receivers"),
            );
        }
        if registry.stream_receivers(&target) >= limits.receivers_per_stream {
            let max = limits.receivers_per_stream;
            return self.error(
                "limit_receivers_per_stream",
                format!("this stream already has its maximum of {max} receivers"),
            );
        }

        let relay = &self.ctx.relay;
        let (mut rtc, keys) = relay.new_receiver_rtc();
        let mut api = rtc.sdp_api();
        let mid = api.add_media(
            MediaKind::Audio,
            Direction::SendOnly,
            Some(target.to_string()),
            None,
            None,
        );
        let Some((offer, pending)) = api.apply() else {
            return self.error("internal", "could not create an offer");
        };
        let peer = relay.next_peer_id();
        self.out.push(ServerMessage::WebrtcOffer {
            offer: SessionDescription {
                kind: "offer".into(),
                sdp: offer.to_sdp_string(),
            },
        });
        tracing::debug!(conn = %self.id, stream = %target, peer, "offer sent to receiver");
        let count = self.ctx.registry.receiver_guard(&target);
        self.role = Role::Offering {
            stream: target,
            peer,
            rtc: Box::new(rtc),
            keys,
            pending,
            mid,
            _count: count,
        };
    }

    fn receiver_answer(&mut self, answer: SessionDescription) {
        if !matches!(self.role, Role::Offering { .. }) {
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
        let Role::Offering {
            stream,
            peer,
            mut rtc,
            keys,
            pending,
            mid,
            _count,
        } = std::mem::replace(&mut self.role, Role::Idle)
        else {
            return;
        };
        if let Err(e) = rtc.sdp_api().accept_answer(pending, sdp) {
            return self.error("bad_sdp", format!("cannot accept the SDP answer: {e}"));
        }
        if relay::negotiated_opus_pt(&rtc, mid).is_none() {
            return self.error("bad_sdp", "the answer does not accept Opus audio");
        }
        if let Err(e) = self.ctx.relay.send(Command::AddReceiver {
            peer,
            stream: stream.clone(),
            rtc,
            keys,
            mid,
            events: self.peer_events.clone(),
        }) {
            return self.error("busy", e.to_string());
        }
        tracing::info!(conn = %self.id, stream = %stream, peer, "receiver answer accepted");
        self.role = Role::Receiving {
            stream,
            peer,
            _count,
        };
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
        match &mut self.role {
            Role::Offering { rtc, .. } => rtc.add_remote_candidate(cand),
            Role::Sending { peer, .. } | Role::Receiving { peer, .. } => {
                let peer = *peer;
                if let Err(e) = self.ctx.relay.send(Command::RemoteCandidate {
                    peer,
                    candidate: cand,
                }) {
                    self.error("busy", e.to_string());
                }
            }
            _ => self.error("bad_state", "no peer connection to add the candidate to"),
        }
    }

    fn handle_stream_event(&mut self, ev: StreamEvent) {
        match ev {
            StreamEvent::Available(id) => self
                .out
                .push(ServerMessage::StreamAvailable { stream_id: id }),
            StreamEvent::Ended(id) => {
                if let Role::Offering { stream, .. } = &self.role {
                    if *stream == id {
                        self.role = Role::Idle;
                    }
                }
                self.out.push(ServerMessage::StreamEnded { stream_id: id })
            }
            StreamEvent::Shutdown => {}
        }
    }

    fn handle_peer_event(&mut self, ev: PeerEvent) {
        let PeerEvent::Closed(closed, why) = ev else {
            return;
        };
        match &self.role {
            Role::Sending { stream, peer } if *peer == closed => {
                let stream = stream.clone();
                tracing::info!(conn = %self.id, stream = %stream, reason = why, "sender peer closed");
                self.ctx.registry.end_stream(&stream);
                self.role = Role::Idle;
            }
            Role::Receiving { peer, .. } if *peer == closed => {
                self.role = Role::Idle;
            }
            _ => {}
        }
    }

    /// Ends whatever this connection is doing (`stop_stream`, or leaving).
    fn stop(&mut self) {
        match std::mem::replace(&mut self.role, Role::Idle) {
            Role::Idle | Role::SenderReady { .. } | Role::Offering { .. } => {}
            Role::Sending { stream, .. } => {
                self.ctx.registry.end_stream(&stream);
                let _ = self.ctx.relay.send(Command::EndStream { stream });
            }
            Role::Receiving { peer, .. } => {
                let _ = self.ctx.relay.send(Command::ClosePeer { peer });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_are_specific() {
        let e = |t: &str| match parse_client_message(t) {
            Err(ServerMessage::Error { code, message }) => (code, message),
            other => panic!("expected an error for {t}, got {other:?}"),
        };
        assert_eq!(e("{nope").0, "bad_json");
        assert_eq!(e("[1,2]").0, "bad_message");
        assert_eq!(e(r#"{"kind":"x"}"#).0, "bad_message");
        let (code, msg) = e(r#"{"type":"fly"}"#);
        assert_eq!(code, "unknown_type");
        assert!(msg.contains("fly"));
        let (code, msg) = e(r#"{"type":"webrtc_offer"}"#);
        assert_eq!(code, "bad_message");
        assert!(msg.contains("offer"), "{msg}");
    }

    #[test]
    fn parses_protocol_messages() {
        assert!(matches!(
            parse_client_message(r#"{"type":"start_receiving"}"#),
            Ok(ClientMessage::StartReceiving { stream_id: None })
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"start_receiving","stream_id":null}"#),
            Ok(ClientMessage::StartReceiving { stream_id: None })
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"start_receiving","stream_id":"stream_1"}"#),
            Ok(ClientMessage::StartReceiving { stream_id: Some(s) }) if s == "stream_1"
        ));
        assert!(matches!(
            parse_client_message(
                r#"{"type":"ice_candidate","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host","sdpMid":"0","sdpMLineIndex":0}}"#
            ),
            Ok(ClientMessage::IceCandidate { candidate: Some(_) })
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"stop_stream","extra":1}"#),
            Ok(ClientMessage::StopStream)
        ));
    }

    #[test]
    fn server_messages_serialize_as_protocol() {
        let m = ServerMessage::SenderReady {
            connection_id: "conn_1".into(),
            stream_id: "stream_a".into(),
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"sender_ready","connection_id":"conn_1","stream_id":"stream_a"}"#
        );
    }

    #[test]
    fn rate_limit_allows_bursts_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10);
        let admitted = (0..25).filter(|_| matches!(r.take(t0), Admit::Yes)).count();
        assert_eq!(admitted, 20, "a burst of twice the rate");
        assert!(matches!(r.take(t0), Admit::No), "told once, then silent");
        let later = t0 + Duration::from_millis(500);
        let admitted = (0..10)
            .filter(|_| matches!(r.take(later), Admit::Yes))
            .count();
        assert_eq!(admitted, 5, "refills at the rate");
    }

    #[test]
    fn sender_sdp_needs_audio_and_opus() {
        assert!(check_sender_sdp("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n").is_err());
        assert!(check_sender_sdp(
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n"
        )
        .is_err());
        assert!(check_sender_sdp(
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
        )
        .is_ok());
    }
}
