//! Signalling: one WebSocket client's connection, from greeting to close.
//! Owns the socket loop ([`serve`]) and its named close steps; the protocol's
//! messages are in [`messages`], the per-connection state machine in
//! `session.rs`, and where a stream starts and ends (registry and relay
//! together) in `streams.rs`. It talks to the registry and hands negotiated
//! peers to the media relay.

pub mod messages;
mod rate_limit;
mod session;
mod streams;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tungstenite::error::CapacityError;

use crate::access::Permissions;
use crate::config::Limits;
use crate::ice_servers::IceServers;
use crate::mp3::Mp3Config;
use crate::registry::{Registry, StreamEvent};
use crate::relay::RelayHandle;
use crate::whip_push::Pushes;
use messages::ServerMessage;
use session::Session;

/// A client that does not take a message within this time is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What every connection needs.
pub struct Signalling {
    pub registry: Arc<Registry>,
    pub relay: RelayHandle,
    pub mp3: Mp3Config,
    pub limits: Limits,
    /// How long a receiver may take to answer our offer (the same bound the
    /// relay puts on ICE and DTLS).
    pub handshake_timeout: Duration,
    /// STUN/TURN servers handed to clients (in `sender_ready` and
    /// `webrtc_offer`, and WHIP/WHEP `Link` headers).
    pub ice_servers: IceServers,
    /// Every stream's pushes to `--whip-push` targets.
    pub pushes: Pushes,
}

/// What the socket loop does after one input.
enum Next {
    Continue,
    /// The client left or the socket failed: just stop.
    Leave,
    /// The client sent a message over the size limit.
    CloseOversized,
    /// The server is shutting down.
    CloseForShutdown,
}

/// Serves one WebSocket client until it leaves or the server stops.
pub async fn serve(
    socket: WebSocket,
    ctx: Arc<Signalling>,
    max_message: usize,
    allowed: Permissions,
) {
    let _client = ctx.registry.client_guard();
    let (peer_tx, mut peer_rx) = mpsc::unbounded_channel();
    let mut events = ctx.registry.subscribe();
    let mut session = Session::new(ctx.clone(), allowed, peer_tx);
    tracing::debug!(conn = %session.id, "websocket connected");
    let (mut sink, mut stream) = socket.split();

    let next = loop {
        if !flush(&mut sink, &mut session).await {
            break Next::Leave;
        }
        let deadline = session.deadline();
        let next = tokio::select! {
            msg = stream.next() => on_frame(&mut session, msg),
            ev = events.recv() => on_stream_event(&mut session, ev),
            Some(ev) = peer_rx.recv() => {
                session.on_peer_event(ev);
                Next::Continue
            }
            () = sleep_until(deadline) => {
                session.on_deadline(Instant::now());
                Next::Continue
            }
        };
        if !matches!(next, Next::Continue) {
            break next;
        }
    };
    match next {
        Next::CloseOversized => close_oversized(&mut session, max_message, sink, stream).await,
        Next::CloseForShutdown => close_for_shutdown(&ctx.registry, sink).await,
        Next::Continue | Next::Leave => {}
    }
    session.stop();
    tracing::debug!(conn = %session.id, "websocket closed");
}

/// One frame (or the end, or an error) from the client.
fn on_frame(session: &mut Session, msg: Option<Result<Message, axum::Error>>) -> Next {
    match msg {
        Some(Ok(Message::Text(text))) => session.on_text(&text),
        Some(Ok(Message::Binary(_))) => session.on_binary(),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
        Some(Ok(Message::Close(_))) | None => return Next::Leave,
        Some(Err(e)) => return on_socket_error(session, e),
    }
    Next::Continue
}

/// A read error: an oversized message is answered before closing; any other
/// error means the client is gone.
fn on_socket_error(session: &Session, error: axum::Error) -> Next {
    let error = error.into_inner();
    if is_oversized(&*error) {
        tracing::info!(conn = %session.id, %error, "oversized message, closing");
        Next::CloseOversized
    } else {
        tracing::debug!(conn = %session.id, %error, "websocket dropped");
        Next::Leave
    }
}

/// Whether a WebSocket read failed on a message over the size limit (the
/// frame or the whole message), by tungstenite's error type.
fn is_oversized(error: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        error.downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(
            CapacityError::MessageTooLong { .. }
        ))
    )
}

fn on_stream_event(
    session: &mut Session,
    ev: Result<StreamEvent, broadcast::error::RecvError>,
) -> Next {
    match ev {
        Ok(StreamEvent::Shutdown) => return Next::CloseForShutdown,
        Ok(ev) => session.on_stream_event(ev),
        Err(broadcast::error::RecvError::Lagged(_)) => session.on_events_lost(),
        Err(broadcast::error::RecvError::Closed) => return Next::Leave,
    }
    Next::Continue
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Sends what the session has for the client; false if the client is gone.
async fn flush<S>(sink: &mut S, session: &mut Session) -> bool
where
    S: Sink<Message> + Unpin,
{
    for msg in session.out.drain(..) {
        if !send(sink, &msg).await {
            return false;
        }
    }
    true
}

/// Close step for an oversized message: the `error`, close code 1009, then
/// a moment for the client to read them.
async fn close_oversized<S, R>(
    session: &mut Session,
    max_message: usize,
    mut sink: S,
    mut stream: R,
) where
    S: Sink<Message> + Unpin,
    R: Stream + Unpin,
{
    session.on_oversized(max_message);
    let _ = flush(&mut sink, session).await;
    let _ = sink.send(close_frame(1009, "message too big")).await;
    linger(&mut stream).await;
}

/// Close step for a server shutdown: `stream_ended` for every live stream,
/// then close code 1001.
async fn close_for_shutdown<S>(registry: &Registry, mut sink: S)
where
    S: Sink<Message> + Unpin,
{
    for stream_id in registry.list() {
        let _ = send(&mut sink, &ServerMessage::StreamEnded { stream_id }).await;
    }
    let _ = sink.send(close_frame(1001, "server shutting down")).await;
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// After we close a connection with unread input, read (and discard) what
/// the client still sends for a moment: closing a socket with unread data
/// resets it, and the reset can destroy the error and close frames we just
/// sent before the client reads them.
async fn linger<S>(stream: &mut S)
where
    S: Stream + Unpin,
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
    S: Sink<Message> + Unpin,
{
    let Ok(text) = serde_json::to_string(msg) else {
        return true;
    };
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(text.into()))).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_messages_are_told_by_error_type_not_text() {
        let too_long = tungstenite::Error::Capacity(CapacityError::MessageTooLong {
            size: 4096,
            max_size: 2048,
        });
        assert!(is_oversized(&*axum::Error::new(too_long).into_inner()));
        let lookalike = std::io::Error::other("message too long");
        assert!(!is_oversized(&*axum::Error::new(lookalike).into_inner()));
        let headers = tungstenite::Error::Capacity(CapacityError::TooManyHeaders);
        assert!(!is_oversized(&*axum::Error::new(headers).into_inner()));
    }
}
