//! The WHIP (RFC 9725) HTTP endpoints: `POST /whip` and `/whip/{name}`
//! take an SDP offer and answer `201` with our SDP answer, the session URL
//! and the `ice-server` `Link`s of `--ice-server`; `DELETE` on that URL ends
//! the stream; `PATCH` (trickle ICE) is `405`; `OPTIONS` answers CORS.
//! Checks (origin, token, content type, size) and the mapping of session
//! errors onto HTTP statuses are here; the sessions themselves are
//! `crate::whip`'s.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{options, post};
use axum::Router;
use futures_util::StreamExt;

use super::{forbidden_origin, unauthorized, AppState, Refusal};
use crate::metrics::metrics;
use crate::registry::Refused;
use crate::whip::{Kind, SessionError, Started};

/// Largest SDP offer taken (a browser's audio+video offer is ~6 KB).
pub const MAX_SDP_BYTES: usize = 64 * 1024;

/// Most of an oversized body read (and dropped) before answering `413`.
const DRAIN_BYTES: usize = 4 << 20;

/// The SDP content type, for offers and answers.
const SDP: &str = "application/sdp";

/// The WHIP routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/whip", post(publish_unnamed).options(preflight_endpoint))
        .route(
            "/whip/{name}",
            post(publish_named).options(preflight_endpoint),
        )
        .route(
            "/whip/session/{id}",
            options(preflight_session)
                .delete(delete_session)
                .patch(patch_session),
        )
}

async fn publish_unnamed(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = publish(&state, None, &uri, &headers, body).await;
    with_cors(&state, &headers, respond(&state, result))
}

async fn publish_named(
    State(state): State<AppState>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = publish(&state, Some(&name), &uri, &headers, body).await;
    with_cors(&state, &headers, respond(&state, result))
}

/// Checks a WHIP `POST` and starts its stream.
async fn publish(
    state: &AppState,
    name: Option<&str>,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Started, Refusal> {
    check_post(state, uri, headers, Kind::Publish)?;
    let offer = read_sdp(headers, body).await?;
    let started = std::time::Instant::now();
    let result = state.whip.publish(name, &offer);
    metrics()
        .offer_answer_seconds
        .observe(started.elapsed().as_secs_f64());
    result.map_err(refusal)
}

/// Whether the presented token lets a client do what a session of `kind` does.
fn permitted(state: &AppState, uri: &Uri, headers: &HeaderMap, kind: Kind) -> bool {
    let may = state.access.of_request(uri, headers);
    match kind {
        Kind::Publish => may.send,
        Kind::Play => may.listen,
    }
}

/// The checks before a WHIP or WHEP `POST` is read: the web origin, then the
/// token.
pub(super) fn check_post(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    kind: Kind,
) -> Result<(), Refusal> {
    if !state.access.origin_allowed(headers) {
        return Err(forbidden_origin());
    }
    if !permitted(state, uri, headers, kind) {
        return Err(unauthorized(match kind {
            Kind::Publish => "WHIP publishing",
            Kind::Play => "WHEP playback",
        }));
    }
    Ok(())
}

/// `DELETE` of a WHIP or WHEP session, by a client with the token its kind
/// needs.
pub(super) fn delete(
    state: &AppState,
    id: &str,
    uri: &Uri,
    headers: &HeaderMap,
    kind: Kind,
) -> Response {
    let response = if !permitted(state, uri, headers, kind) {
        unauthorized(match kind {
            Kind::Publish => "WHIP",
            Kind::Play => "WHEP",
        })
        .into_response()
    } else {
        ended(state.whip.end(id, kind))
    };
    with_cors(state, headers, response)
}

/// The body of a `POST`, if it is an SDP of a size we take.
pub(super) async fn read_sdp(headers: &HeaderMap, body: Body) -> Result<String, Refusal> {
    let bytes = read_bounded(headers, body).await;
    if !is_sdp(headers) {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("the offer must be sent as Content-Type: {SDP}"),
        ));
    }
    String::from_utf8(bytes?)
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "the offer is not UTF-8 text"))
}

/// Reads a request body of at most [`MAX_SDP_BYTES`]. A larger one is
/// read on (and dropped) up to [`DRAIN_BYTES`] before the `413`: closing a
/// connection with unread input resets it, and the reset can destroy our
/// answer before the client reads it.
async fn read_bounded(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Refusal> {
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the offer is larger than {MAX_SDP_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_BYTES as u64) {
        return Err(too_large());
    }
    let mut data = Vec::new();
    let mut seen = 0usize;
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            )
        })?;
        seen = seen.saturating_add(chunk.len());
        if seen <= MAX_SDP_BYTES {
            data.extend_from_slice(&chunk);
        } else if seen > DRAIN_BYTES {
            break;
        }
    }
    if seen > MAX_SDP_BYTES {
        return Err(too_large());
    }
    Ok(data)
}

/// Whether the request's content type is `application/sdp` (parameters and
/// case aside).
fn is_sdp(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(SDP))
}

/// `201 Created`: the answer, the session URL, the stream's id, and a `Link`
/// for each STUN/TURN server (RFC 9725 section 4.6), with fresh credentials.
pub(super) fn created(state: &AppState, started: &Started, kind: &str) -> Response {
    let location = format!("/{kind}/session/{}", started.id);
    let mut response = (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, SDP)],
        started.answer.clone(),
    )
        .into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", started.id)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&started.stream) {
        h.insert(HeaderName::from_static("x-stream-id"), v);
    }
    add_ice_server_links(state, h);
    response
}

/// One `Link: <uri>; rel="ice-server"; ...` header per configured server.
fn add_ice_server_links(state: &AppState, h: &mut HeaderMap) {
    for server in state.signalling.ice_servers.issue_now() {
        // Checked at startup: URIs and credentials are printable ASCII.
        if let Ok(v) = HeaderValue::from_str(&server.link_value()) {
            h.append(header::LINK, v);
        }
    }
}

fn respond(state: &AppState, result: Result<Started, Refusal>) -> Response {
    match result {
        Ok(started) => created(state, &started, "whip"),
        Err(refusal) => refusal.into_response(),
    }
}

/// The HTTP status (and message) of a session that could not start.
pub(super) fn refusal(e: SessionError) -> Refusal {
    let message = e.to_string();
    let limit = |name: &str| {
        metrics().limit_hits.with_label_values(&[name]).inc();
        Refusal {
            header: Some((header::RETRY_AFTER, "10")),
            ..Refusal::new(StatusCode::SERVICE_UNAVAILABLE, message.clone())
        }
    };
    match e {
        SessionError::BadSdp(_) | SessionError::BadName => {
            Refusal::new(StatusCode::BAD_REQUEST, message)
        }
        SessionError::Unacceptable(_) => Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, message),
        SessionError::Refused(Refused::NameTaken) => Refusal::new(StatusCode::CONFLICT, message),
        SessionError::Refused(Refused::NoStream) => Refusal::new(StatusCode::NOT_FOUND, message),
        SessionError::NoLiveStream => Refusal {
            header: Some((header::RETRY_AFTER, "5")),
            ..Refusal::new(StatusCode::CONFLICT, message)
        },
        SessionError::Refused(Refused::Streams(_)) => limit("streams"),
        SessionError::Refused(Refused::Receivers(_)) => limit("receivers"),
        SessionError::Refused(Refused::ReceiversPerStream(_)) => limit("receivers_per_stream"),
        SessionError::TooManySessions(_) => limit("http_sessions"),
        SessionError::Busy(_) => limit("relay_busy"),
        SessionError::Internal(_) => Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

/// `DELETE /whip/session/{id}`: ends the stream.
async fn delete_session(
    State(state): State<AppState>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    delete(&state, &id, &uri, &headers, Kind::Publish)
}

/// `200` when a session was ended, `404` when there was none.
pub(super) fn ended(found: bool) -> Response {
    if found {
        StatusCode::OK.into_response()
    } else {
        Refusal::new(StatusCode::NOT_FOUND, "no such session").into_response()
    }
}

/// `PATCH` (trickle ICE, ICE restart): not supported. We are ICE lite and
/// learn the client's address from its connectivity checks, so a client's
/// trickled candidates are not needed.
pub(super) async fn patch_session(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let refusal = Refusal {
        header: Some((header::ALLOW, "DELETE, OPTIONS")),
        ..Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "trickle ICE and ICE restarts are not supported: the answer carries all our candidates",
        )
    };
    with_cors(&state, &headers, refusal.into_response())
}

/// `OPTIONS /whip`: CORS preflight, and what `POST` takes.
async fn preflight_endpoint(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    preflight_post(&state, &uri, &headers, Kind::Publish)
}

pub(super) async fn preflight_session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Response {
    preflight(&state, &headers, "DELETE, PATCH, OPTIONS", false)
}

/// `OPTIONS` on a WHIP or WHEP endpoint. RFC 9725 (section 4.6) lets the
/// answer carry the STUN/TURN `Link`s for clients that must configure them
/// before their offer, but not to a CORS preflight; they are given, like on
/// `POST`, only to a client with the token its kind needs.
pub(super) fn preflight_post(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    kind: Kind,
) -> Response {
    let mut response = preflight(state, headers, "POST, OPTIONS", true);
    let cors_preflight = headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !cors_preflight && permitted(state, uri, headers, kind) {
        add_ice_server_links(state, response.headers_mut());
    }
    response
}

/// `204` with the CORS answer for `methods`.
fn preflight(
    state: &AppState,
    headers: &HeaderMap,
    methods: &'static str,
    accept_post: bool,
) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static(methods));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, If-Match"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    if accept_post {
        h.insert(
            HeaderName::from_static("accept-post"),
            HeaderValue::from_static(SDP),
        );
    }
    with_cors(state, headers, response)
}

/// Lets a web page from an allowed origin (`--allowed-origin`, or any)
/// read the response, including the headers WHIP and WHEP clients need.
pub(super) fn with_cors(state: &AppState, request: &HeaderMap, mut response: Response) -> Response {
    let Some(origin) = request.get(header::ORIGIN).cloned() else {
        return response;
    };
    if !state.access.origin_allowed(request) {
        return response;
    }
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, ETag, Link, Accept-Patch, Accept-Post, X-Stream-Id"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_type(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(v).expect("header"),
        );
        h
    }

    #[test]
    fn sdp_content_type() {
        assert!(is_sdp(&with_type("application/sdp")));
        assert!(is_sdp(&with_type("Application/SDP; charset=utf-8")));
        assert!(!is_sdp(&with_type("text/plain")));
        assert!(!is_sdp(&with_type("application/sdpx")));
        assert!(!is_sdp(&HeaderMap::new()));
    }
}
