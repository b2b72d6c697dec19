//! The JSON messages of the WebSocket protocol (see PROTOCOL.md): what a
//! client may send, what the server sends, and the parsing of one text frame
//! into a message or a specific error. Pure: no state, no I/O.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ice_servers::RtcIceServer;

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
        /// (Addition) STUN/TURN servers for the sender's peer connection;
        /// absent when none are configured.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        ice_servers: Vec<RtcIceServer>,
    },
    WebrtcAnswer {
        answer: SessionDescription,
    },
    WebrtcOffer {
        offer: SessionDescription,
        /// (Addition) STUN/TURN servers for the receiver's peer connection;
        /// absent when none are configured.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        ice_servers: Vec<RtcIceServer>,
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

impl SessionDescription {
    pub fn offer(sdp: String) -> Self {
        Self {
            kind: "offer".into(),
            sdp,
        }
    }

    pub fn answer(sdp: String) -> Self {
        Self {
            kind: "answer".into(),
            sdp,
        }
    }
}

impl ServerMessage {
    /// An `error` message; long messages are cut to [`MAX_ERROR_CHARS`].
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
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

/// Checks that a sender's `offer` is one, and can be relayed.
pub fn check_sender_offer(offer: &SessionDescription) -> Result<(), String> {
    if offer.kind != "offer" {
        return Err("webrtc_offer.offer.type must be \"offer\"".into());
    }
    check_sender_sdp(&offer.sdp)
}

/// Checks that an SDP offer from a sender can be relayed: it must carry an
/// audio m-line that offers Opus.
pub fn check_sender_sdp(sdp: &str) -> Result<(), String> {
    let lower = sdp.to_ascii_lowercase();
    if !lower.lines().any(|l| l.starts_with("m=audio")) {
        return Err("the offer has no audio track (m=audio)".into());
    }
    if !lower.contains("opus/48000") {
        return Err("the offer does not include the Opus codec".into());
    }
    Ok(())
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
            ice_servers: Vec::new(),
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"sender_ready","connection_id":"conn_1","stream_id":"stream_a"}"#
        );
        let m = ServerMessage::WebrtcOffer {
            offer: SessionDescription::offer("v=0".into()),
            ice_servers: vec![RtcIceServer {
                urls: "turn:h?transport=tcp".into(),
                username: Some("u".into()),
                credential: Some("p".into()),
            }],
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"webrtc_offer","offer":{"type":"offer","sdp":"v=0"},"ice_servers":[{"urls":"turn:h?transport=tcp","username":"u","credential":"p"}]}"#
        );
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
