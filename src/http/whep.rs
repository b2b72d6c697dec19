//! The WHEP (draft-ietf-wish-whep) HTTP endpoints: `POST /whep/{stream_id}`
//! and `POST /whep/latest` take a player's recvonly offer and answer `201`
//! with our sendonly answer and the session URL; `DELETE` on that URL ends
//! the receiver; `PATCH` is `405`; `OPTIONS` answers CORS. The checks and
//! statuses are WHIP's (`whip.rs`); the sessions are `crate::whip`'s.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{options, post};
use axum::Router;

use super::whip::{
    check_post, created, delete, patch_session, preflight_post, preflight_session, read_sdp,
    refusal, with_cors,
};
use super::{AppState, Refusal};
use crate::whip::{Kind, Started};

/// The WHEP routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/whep/{stream}", post(play).options(preflight_endpoint))
        .route(
            "/whep/session/{id}",
            options(preflight_session)
                .delete(delete_session)
                .patch(patch_session),
        )
}

async fn play(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match start(&state, &stream, &uri, &headers, body).await {
        Ok(started) => created(&state, &started, "whep"),
        Err(refusal) => refusal.into_response(),
    };
    with_cors(&state, &headers, response)
}

/// Checks a WHEP `POST` and adds its receiver.
async fn start(
    state: &AppState,
    stream: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Started, Refusal> {
    check_post(state, uri, headers, Kind::Play)?;
    let offer = read_sdp(headers, body).await?;
    state.whip.play(stream, &offer).map_err(refusal)
}

async fn delete_session(
    State(state): State<AppState>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    delete(&state, &id, &uri, &headers, Kind::Play)
}

async fn preflight_endpoint(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    preflight_post(&state, &uri, &headers, Kind::Play)
}
