//! Web assets embedded in the binary: the page at `/` (send and listen) and
//! the Home Assistant Lovelace cards.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::http::AppState;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const CARDS_JS: &str = include_str!("../assets/cards/voice-streaming-card.js");

const JS: &str = "text/javascript; charset=utf-8";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/index.html", get(|| async { index() }))
        .route("/app.js", get(|| async { asset(JS, APP_JS) }))
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/cards/voice-streaming-card.js",
            get(|| async { asset(JS, CARDS_JS) }),
        )
        .route(
            "/voice-streaming-card.js",
            get(|| async { asset(JS, CARDS_JS) }),
        )
}

pub fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
