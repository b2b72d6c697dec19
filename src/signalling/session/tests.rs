//! The session's transitions, driven in process: a real registry and a real
//! relay (bound to 127.0.0.1), and str0m peers standing in for the browsers
//! (they only make and take SDP; no ICE happens).

use std::time::Duration;

use str0m::change::SdpOffer as ClientOffer;
use tokio::sync::mpsc;

use super::*;
use crate::config::Limits;
use crate::mp3::Mp3Config;
use crate::relay::{RelayConfig, RelayHandle};

const TIMEOUT: Duration = Duration::from_secs(3);

fn limits() -> Limits {
    Limits {
        streams: 4,
        receivers_per_stream: 2,
        receivers: 8,
        listeners_per_stream: 8,
        listeners: 8,
        connections_per_ip: 8,
        messages_per_sec: 1000,
    }
}

fn relay() -> RelayHandle {
    let (relay, _thread) = relay::start(RelayConfig {
        bind: "127.0.0.1:0".parse().expect("addr"),
        announce: vec!["127.0.0.1:9".parse().expect("addr")],
        announce_tcp: vec!["127.0.0.1:9".parse().expect("addr")],
        sender_idle: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        forward_threads: 1,
        liveness: crate::liveness::Liveness::default(),
    })
    .expect("relay");
    relay
}

fn server(limits: Limits) -> Arc<Signalling> {
    Arc::new(Signalling {
        registry: Arc::new(Registry::new()),
        relay: relay(),
        mp3: Mp3Config::default(),
        limits,
        handshake_timeout: TIMEOUT,
    })
}

/// A session and the relay's events about its peers.
struct Client {
    session: Session,
    peer_events: mpsc::UnboundedReceiver<PeerEvent>,
}

impl Client {
    fn new(ctx: &Arc<Signalling>) -> Self {
        let (tx, peer_events) = mpsc::unbounded_channel();
        let mut session = Session::new(ctx.clone(), Permissions::ALL, tx);
        let greeting = session.out.drain(..).collect::<Vec<_>>();
        assert!(matches!(
            greeting.as_slice(),
            [ServerMessage::AvailableStreams { .. }]
        ));
        Client {
            session,
            peer_events,
        }
    }

    /// Sends one message; returns the replies.
    fn send(&mut self, json: &str) -> Vec<ServerMessage> {
        self.session.on_text(json);
        self.session.out.drain(..).collect()
    }

    fn error_code(&mut self, json: &str) -> &'static str {
        match self.send(json).as_slice() {
            [ServerMessage::Error { code, .. }] => code,
            other => panic!("expected one error for {json}, got {other:?}"),
        }
    }

    /// start_sending and a real Opus offer: the stream id.
    fn start_stream(&mut self) -> Arc<str> {
        let stream = match self.send(r#"{"type":"start_sending"}"#).as_slice() {
            [ServerMessage::SenderReady { stream_id, .. }] => stream_id.clone(),
            other => panic!("expected sender_ready, got {other:?}"),
        };
        assert!(matches!(self.session.state, State::SenderReady { .. }));
        let offer = serde_json::json!({
            "type": "webrtc_offer",
            "offer": {"type": "offer", "sdp": browser_offer()},
        });
        let replies = self.send(&offer.to_string());
        assert!(
            matches!(replies.as_slice(), [ServerMessage::WebrtcAnswer { .. }]),
            "{replies:?}"
        );
        assert!(matches!(self.session.state, State::Sending { .. }));
        stream
    }

    /// start_receiving: the server's offer SDP.
    fn start_receiving(&mut self, stream: &str) -> String {
        let msg = serde_json::json!({"type": "start_receiving", "stream_id": stream});
        match self.send(&msg.to_string()).as_slice() {
            [ServerMessage::WebrtcOffer { offer }] => offer.sdp.clone(),
            other => panic!("expected webrtc_offer, got {other:?}"),
        }
    }

    fn answer(&mut self, offer: &str) -> Vec<ServerMessage> {
        let msg = serde_json::json!({
            "type": "webrtc_answer",
            "answer": {"type": "answer", "sdp": browser_answer(offer)},
        });
        self.send(&msg.to_string())
    }

    /// Waits for the relay to report one of this client's peers closed.
    fn closed_peer(&mut self) -> PeerId {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(PeerEvent::Closed(peer, _)) = self.peer_events.try_recv() {
                return peer;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the relay never closed the peer");
    }
}

/// A server with one live stream: the server, its sender and the stream.
fn with_live_stream() -> (Arc<Signalling>, Client, Arc<str>) {
    let ctx = server(limits());
    let mut tx = Client::new(&ctx);
    let stream = tx.start_stream();
    (ctx, tx, stream)
}

/// What a browser sending its microphone offers.
fn browser_offer() -> String {
    let mut rtc = Rtc::builder().build(Instant::now());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let (offer, _pending) = api.apply().expect("offer");
    offer.to_sdp_string()
}

/// What a browser answers to the server's receiver offer.
fn browser_answer(offer: &str) -> String {
    let mut rtc = Rtc::builder().build(Instant::now());
    let offer = ClientOffer::from_sdp_string(offer).expect("server offer parses");
    let answer = rtc.sdp_api().accept_offer(offer).expect("answer");
    answer.to_sdp_string()
}

#[test]
fn sender_goes_ready_sending_idle_and_its_stream_with_it() {
    let (ctx, mut tx, stream) = with_live_stream();
    assert_eq!(ctx.registry.list(), vec![stream.clone()]);
    assert_eq!(ctx.registry.senders(), 1);

    assert_eq!(tx.error_code(r#"{"type":"start_receiving"}"#), "bad_state");
    assert_eq!(
        tx.error_code(r#"{"type":"webrtc_offer","offer":{"type":"offer","sdp":"v=0"}}"#),
        "bad_state"
    );

    assert!(tx.send(r#"{"type":"stop_stream"}"#).is_empty());
    assert!(matches!(tx.session.state, State::Idle));
    assert!(ctx.registry.list().is_empty(), "ended in the registry");
    tx.closed_peer(); // and in the relay
    assert_eq!(ctx.registry.senders(), 0);
}

#[test]
fn a_sender_peer_closed_by_the_relay_ends_the_listing() {
    let (ctx, mut tx, stream) = with_live_stream();
    let State::Sending { peer, .. } = tx.session.state else {
        panic!("not sending");
    };
    tx.session
        .on_peer_event(PeerEvent::Closed(peer + 1000, "someone else"));
    assert_eq!(ctx.registry.list(), vec![stream]);
    tx.session
        .on_peer_event(PeerEvent::Closed(peer, "peer failed"));
    assert!(matches!(tx.session.state, State::Idle));
    assert!(ctx.registry.list().is_empty());
}

#[test]
fn receiver_goes_offering_receiving_idle_holding_one_slot() {
    let (ctx, _tx, stream) = with_live_stream();
    let mut rx = Client::new(&ctx);
    let offer = rx.start_receiving(&stream);
    assert!(matches!(rx.session.state, State::Offering(_)));
    assert_eq!(ctx.registry.stream_receivers(&stream), 1);
    assert!(rx.session.deadline().is_some());

    // The cards ask twice: no second offer, no second slot.
    assert!(rx.send(r#"{"type":"start_receiving"}"#).is_empty());
    assert_eq!(ctx.registry.receivers(), 1);

    assert!(rx.answer(&offer).is_empty());
    assert!(matches!(rx.session.state, State::Receiving { .. }));
    assert_eq!(rx.session.deadline(), None);
    assert_eq!(ctx.registry.receivers(), 1);
    assert_eq!(
        rx.error_code(r#"{"type":"webrtc_answer","answer":{"type":"answer","sdp":""}}"#),
        "bad_state",
        "answered already"
    );

    assert!(rx.send(r#"{"type":"stop_stream"}"#).is_empty());
    assert!(matches!(rx.session.state, State::Idle));
    assert_eq!(ctx.registry.receivers(), 0);
    rx.closed_peer();
    assert!(
        rx.send(r#"{"type":"stop_stream"}"#).is_empty(),
        "harmless twice"
    );
}

#[test]
fn an_unanswered_offer_is_withdrawn_at_the_handshake_timeout() {
    let (ctx, _tx, stream) = with_live_stream();
    let mut rx = Client::new(&ctx);
    rx.start_receiving(&stream);
    let deadline = rx.session.deadline().expect("a deadline while offering");

    rx.session.on_deadline(deadline - Duration::from_millis(1));
    assert!(matches!(rx.session.state, State::Offering(_)), "not yet");
    assert_eq!(ctx.registry.receivers(), 1);

    rx.session.on_deadline(deadline);
    assert!(matches!(rx.session.state, State::Idle));
    assert_eq!(ctx.registry.receivers(), 0, "the slot is free");
    assert_eq!(rx.session.deadline(), None);
    let replies: Vec<_> = rx.session.out.drain(..).collect();
    assert!(
        matches!(
            replies.as_slice(),
            [ServerMessage::Error {
                code: "answer_timeout",
                ..
            }]
        ),
        "{replies:?}"
    );
    // The connection is still usable.
    rx.start_receiving(&stream);
    assert_eq!(ctx.registry.receivers(), 1);
}

#[test]
fn an_offer_for_an_ended_stream_is_withdrawn() {
    let (ctx, mut tx, stream) = with_live_stream();
    let mut rx = Client::new(&ctx);
    rx.start_receiving(&stream);
    tx.send(r#"{"type":"stop_stream"}"#);
    rx.session
        .on_stream_event(StreamEvent::Ended(stream.clone()));
    assert!(matches!(rx.session.state, State::Idle));
    assert_eq!(ctx.registry.receivers(), 0);
    let replies: Vec<_> = rx.session.out.drain(..).collect();
    assert!(
        matches!(replies.as_slice(), [ServerMessage::StreamEnded { stream_id }] if *stream_id == stream)
    );
}

#[test]
fn limits_and_bad_requests_are_answered_with_their_codes() {
    let ctx = server(Limits {
        streams: 1,
        receivers_per_stream: 1,
        ..limits()
    });
    let mut rx = Client::new(&ctx);
    assert_eq!(rx.error_code(r#"{"type":"start_receiving"}"#), "no_stream");
    assert_eq!(
        rx.error_code(r#"{"type":"start_receiving","stream_id":"stream_x"}"#),
        "unknown_stream"
    );
    assert_eq!(
        rx.error_code(r#"{"type":"webrtc_answer","answer":{"type":"answer","sdp":""}}"#),
        "bad_state"
    );

    let mut tx = Client::new(&ctx);
    let stream = tx.start_stream();
    let mut second = Client::new(&ctx);
    second.send(r#"{"type":"start_sending"}"#);
    let offer = serde_json::json!({
        "type": "webrtc_offer",
        "offer": {"type": "offer", "sdp": browser_offer()},
    });
    assert_eq!(second.error_code(&offer.to_string()), "limit_streams");
    assert!(matches!(second.session.state, State::SenderReady { .. }));

    rx.start_receiving(&stream);
    let mut other = Client::new(&ctx);
    assert_eq!(
        other.error_code(r#"{"type":"start_receiving"}"#),
        "limit_receivers_per_stream"
    );
    assert_eq!(ctx.registry.receivers(), 1);
}
