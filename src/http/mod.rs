//! HTTP routes: WebSocket upgrade (`/ws` and `/`), `/health`,
//! `/stream/status`, the live MP3 and Ogg/Opus streams, WHIP and WHEP
//! (`whip.rs`, `whep.rs`), and the web assets. On plain-HTTP listeners, live
//! stream requests are taken over earlier, in the accept hook
//! (`mp3_direct.rs`, which serves both formats); the route here serves them
//! behind TLS and for `HEAD`.

mod demux;
mod mp3_direct;
mod peek;
mod whep;
mod whip;

pub use demux::{classify, FirstBytes, IceTcpDemux, NotHttp};
pub use mp3_direct::{Mp3Acceptor, TakenOver};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Path, Query, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::access::Access;
use crate::liveness::Liveness;
use crate::metrics::metrics;
use crate::mp3::{Fanout, Format};
use crate::proxy::TrustedProxies;
use crate::registry::{Registry, StreamEvent};
use crate::signalling::{self, Signalling};
use crate::web;

/// Initial WebSocket read buffer per connection (tungstenite grows it for
/// larger frames, up to the message size limit). The buffer keeps the size of
/// the largest frame read so far (for a receiver, its SDP answer, ~2 KB), so a
/// larger start only adds memory to every open connection: 1 KiB instead of
/// 4 KiB measured ~2 KB less per receiver.
const WS_READ_BUFFER: usize = 1024;

#[derive(Clone)]
pub struct AppState {
    pub signalling: Arc<Signalling>,
    pub max_message_bytes: usize,
    /// Default wait of `latest.mp3` for a stream to start.
    pub mp3_wait: Duration,
    /// The certificate offered at `/ca.crt` when serving TLS.
    pub ca_pem: Option<Arc<Vec<u8>>>,
    pub access: Arc<Access>,
    /// Proxies whose forwarded client address is believed.
    pub trusted_proxies: Arc<TrustedProxies>,
    /// WHIP and WHEP sessions.
    pub whip: Arc<crate::whip::Sessions>,
}

/// Why a request is refused: status, a JSON `error` message, and maybe one
/// extra header.
pub(crate) struct Refusal {
    status: StatusCode,
    message: String,
    header: Option<(header::HeaderName, &'static str)>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            header: None,
        }
    }

    fn body(&self) -> String {
        json!({ "error": self.message }).to_string()
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some((name, value)) = self.header {
            response
                .headers_mut()
                .insert(name, header::HeaderValue::from_static(value));
        }
        response
    }
}

/// A browser page from an origin `--allowed-origin` does not list.
fn forbidden_origin() -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        "this web origin may not use the relay (see --allowed-origin)",
    )
}

fn unauthorized(what: &str) -> Refusal {
    metrics()
        .limit_hits
        .with_label_values(&["unauthorized"])
        .inc();
    Refusal {
        header: Some((header::WWW_AUTHENTICATE, "Bearer")),
        ..Refusal::new(
            StatusCode::UNAUTHORIZED,
            format!("{what} needs a valid token (?token= or Authorization: Bearer)"),
        )
    }
}

impl AppState {
    fn registry(&self) -> &Registry {
        &self.signalling.registry
    }
}

/// Every route of the main listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/ws", get(ws))
        .route("/ca.crt", get(ca_cert))
        .route("/metrics", get(prometheus_metrics))
        .merge(web::routes())
        .merge(whip::routes())
        .merge(whep::routes())
        .merge(audio_routes())
        .with_state(state)
}

/// The plain-HTTP listener for speakers (`--audio-listen`).
pub fn audio_router(state: AppState) -> Router {
    audio_routes().with_state(state)
}

/// The routes a speaker needs.
fn audio_routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/stream/status", get(status))
        .route("/stream/{file}", get(live_stream))
}

/// `GET /metrics`: Prometheus text format.
async fn prometheus_metrics(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if !state.access.of_request(&uri, &headers).listen {
        return unauthorized("/metrics").into_response();
    }
    let reg = state.registry();
    let m = metrics();
    m.streams.set(reg.list().len() as i64);
    m.senders.set(reg.senders() as i64);
    m.receivers.set(reg.receivers() as i64);
    m.mp3_listeners
        .set(reg.format_listeners(Format::Mp3) as i64);
    m.ogg_listeners
        .set(reg.format_listeners(Format::Ogg) as i64);
    m.websocket_clients.set(reg.clients() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct StreamQuery {
    /// Seconds `latest.mp3` / `latest.ogg` may wait for a stream to start.
    wait: Option<f64>,
}

/// Longest wait a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The stream id and output format a `/stream/{file}` names.
fn stream_file(file: &str) -> Option<(&str, Format)> {
    [Format::Mp3, Format::Ogg].into_iter().find_map(|format| {
        let id = file.strip_suffix(format.name())?.strip_suffix('.')?;
        Some((id, format))
    })
}

/// Resolves a request for `/stream/{file}` (`.mp3` or `.ogg`) to a live
/// stream's output (waiting for `latest`), checking access and, when `join`
/// is set, the listener limits.
pub(crate) async fn find_live_stream(
    state: &AppState,
    file: &str,
    uri: &Uri,
    headers: &HeaderMap,
    join: bool,
) -> Result<(Arc<str>, Arc<Fanout>), Refusal> {
    if !state.access.of_request(uri, headers).listen {
        return Err(unauthorized("listening"));
    }
    let Some((id, format)) = stream_file(file) else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("no such resource: /stream/{file} (streams end in .mp3 or .ogg)"),
        ));
    };
    let wait = latest_wait(state, uri)?;
    let registry = state.registry();
    let found = if id == "latest" {
        wait_for_latest(registry, wait, format).await
    } else {
        registry.fanout(Some(id), format)
    };
    let Some((stream_id, fanout)) = found else {
        let message = if id == "latest" {
            "no stream is live".to_owned()
        } else {
            format!("no such stream: {id}")
        };
        return Err(Refusal::new(StatusCode::NOT_FOUND, message));
    };
    if join {
        check_listener_limits(state, &stream_id, &fanout)?;
    }
    Ok((stream_id, fanout))
}

/// How long `latest.mp3` / `latest.ogg` may wait for a stream: `?wait=SECONDS` (at most
/// [`MAX_WAIT`]) or the server's default.
fn latest_wait(state: &AppState, uri: &Uri) -> Result<Duration, Refusal> {
    let Ok(Query(query)) = Query::<StreamQuery>::try_from_uri(uri) else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid query (expected ?wait=SECONDS)",
        ));
    };
    Ok(query
        .wait
        .filter(|w| w.is_finite() && *w >= 0.0)
        .map(|w| Duration::from_secs_f64(w.min(MAX_WAIT.as_secs_f64())))
        .unwrap_or(state.mp3_wait))
}

/// A 503 once the stream or the server has its maximum of HTTP listeners
/// (MP3 and Ogg together).
fn check_listener_limits(
    state: &AppState,
    stream_id: &str,
    fanout: &Fanout,
) -> Result<(), Refusal> {
    let limits = &state.signalling.limits;
    let registry = state.registry();
    let of_stream = registry
        .stream_listeners(stream_id)
        .unwrap_or_else(|| fanout.listener_count());
    if of_stream < limits.listeners_per_stream && registry.total_listeners() < limits.listeners {
        return Ok(());
    }
    let format = fanout.format().name();
    tracing::info!(stream = %stream_id, format, "listener refused: limit reached");
    metrics().limit_hits.with_label_values(&["listeners"]).inc();
    Err(Refusal {
        header: Some((header::RETRY_AFTER, "10")),
        ..Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many listeners, try again later",
        )
    })
}

/// `GET /stream/{id}.mp3` and `/stream/latest.mp3`, and the same in `.ogg`:
/// an endless live body.
async fn live_stream(
    State(state): State<AppState>,
    method: Method,
    Path(file): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let join = method != Method::HEAD;
    let (stream_id, fanout) = match find_live_stream(&state, &file, &uri, &headers, join).await {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let format = fanout.format();
    let mut response = if join {
        let listener = fanout.subscribe();
        tracing::info!(stream = %stream_id, format = format.name(), listeners = fanout.listener_count(), "listener joined");
        Body::from_stream(listener.into_stream()).into_response()
    } else {
        Body::empty().into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(format.content_type()),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, no-store"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&stream_id) {
        h.insert(header::HeaderName::from_static("x-stream-id"), v);
    }
    response
}

/// The newest stream's `format` output, waiting up to `wait` for one to start.
async fn wait_for_latest(
    registry: &Registry,
    wait: Duration,
    format: Format,
) -> Option<(Arc<str>, Arc<Fanout>)> {
    // Subscribe before looking, so a stream starting in between is not missed.
    let mut events = registry.subscribe();
    if let Some(found) = registry.fanout(None, format) {
        return Some(found);
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return None,
            Ok(Ok(StreamEvent::Shutdown)) | Ok(Err(RecvError::Closed)) => return None,
            Ok(_) => {
                if let Some(found) = registry.fanout(None, format) {
                    return Some(found);
                }
            }
        }
    }
}

async fn root(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(upgrade) => upgrade_ws(state, peer, &uri, &headers, upgrade),
        Err(_) => web::index().into_response(),
    }
}

async fn ca_cert(State(state): State<AppState>) -> Response {
    match &state.ca_pem {
        Some(pem) => (
            [
                (header::CONTENT_TYPE, "application/x-x509-ca-cert"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"voice-relay-ca.crt\"",
                ),
            ],
            pem.as_ref().clone(),
        )
            .into_response(),
        None => Refusal::new(StatusCode::NOT_FOUND, "this server does not use TLS").into_response(),
    }
}

async fn ws(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade_ws(state, peer, &uri, &headers, upgrade)
}

fn upgrade_ws(
    state: AppState,
    peer: SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let ip = state.trusted_proxies.client_ip(peer.ip(), headers);
    if !state.access.origin_allowed(headers) {
        tracing::info!(%ip, "WebSocket refused: origin not allowed");
        metrics().limit_hits.with_label_values(&["origin"]).inc();
        return forbidden_origin().into_response();
    }
    let allowed = state.access.of_request(uri, headers);
    if !allowed.any() {
        tracing::info!(%ip, "WebSocket refused: no valid token");
        return unauthorized("the WebSocket").into_response();
    }
    let max = state.max_message_bytes;
    let ctx = state.signalling.clone();
    let per_ip = ctx.limits.connections_per_ip;
    let Some(guard) = ctx.registry.ip_guard(ip, per_ip) else {
        tracing::info!(%ip, "too many WebSocket connections from one address");
        metrics()
            .limit_hits
            .with_label_values(&["connections_per_ip"])
            .inc();
        return Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many connections from this address (the limit is {per_ip})"),
        )
        .into_response();
    };
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // Signalling messages are small, and every receiver keeps its socket
        // open: tungstenite's default read buffer (128 KiB, allocated up
        // front) would be most of a receiver's memory. Ours grows on demand.
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| async move {
            signalling::serve(socket, ctx, max, allowed).await;
            drop(guard);
        })
}

/// `{stream_id: listener count}` of one format for every live stream.
fn listener_map(reg: &Registry, format: Format) -> serde_json::Map<String, serde_json::Value> {
    reg.listener_counts(format)
        .into_iter()
        .map(|(id, n)| (id.to_string(), json!(n)))
        .collect()
}

async fn health(State(state): State<AppState>) -> Response {
    health_of(state.registry(), Liveness::process())
}

/// `/health`: 200 `healthy` with the counts, or 503 `unhealthy` with the
/// reason once a thread the server needs has died (the process is exiting).
fn health_of(reg: &Registry, liveness: &Liveness) -> Response {
    let failure = liveness.failure();
    let status = match failure {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let listeners = listener_map(reg, Format::Mp3);
    let mut body = json!({
        "status": if failure.is_none() { "healthy" } else { "unhealthy" },
        "active_streams": reg.list(),
        "senders": reg.senders(),
        "receivers": reg.receivers(),
        "websocket_clients": reg.clients(),
        "mp3_listeners": listeners,
        "ogg_listeners": listener_map(reg, Format::Ogg),
        "uptime_secs": reg.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(reason) = failure {
        body["reason"] = json!(reason);
    }
    (status, Json(body)).into_response()
}

async fn status(State(state): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    if !state.access.of_request(&uri, &headers).listen {
        return unauthorized("/stream/status").into_response();
    }
    let reg = state.registry();
    Json(json!({
        "active_streams": reg.list(),
        "mp3_listeners": listener_map(reg, Format::Mp3),
        "ogg_listeners": listener_map(reg, Format::Ogg),
    }))
    .into_response()
}

/// Send buffer of accepted TCP connections. Small on purpose: a live
/// listener that stops reading must fall behind (and be dropped) within
/// seconds, instead of the kernel soaking up minutes of audio for it. JSON
/// signalling messages are far smaller.
const TCP_SEND_BUFFER: usize = 64 * 1024;

/// Applies our socket options to every accepted connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct TuneSocket;

impl<S> axum_server::accept::Accept<tokio::net::TcpStream, S> for TuneSocket {
    type Stream = tokio::net::TcpStream;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        tune(&stream);
        std::future::ready(Ok((stream, service)))
    }
}

/// Our socket options for an accepted connection.
fn tune(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_send_buffer_size(TCP_SEND_BUFFER);
    let _ = stream.set_nodelay(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn health_turns_503_when_a_needed_thread_dies() {
        let reg = Registry::new();
        let liveness = Liveness::default();
        let ok = health_of(&reg, &liveness);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(body_json(ok).await["status"], "healthy");

        let l = liveness.clone();
        let _ = std::thread::spawn(move || drop(l.watch("the media relay thread"))).join();
        let dead = health_of(&reg, &liveness);
        assert_eq!(dead.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = body_json(dead).await;
        assert_eq!(body["status"], "unhealthy");
        assert_eq!(body["reason"], "the media relay thread stopped");
    }
}
