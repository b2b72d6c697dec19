//! Web assets embedded in the binary: the page at `/` and the Home Assistant
//! Lovelace cards.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::http::AppState;

const INDEX_HTML: &str = include_str!("../assets/index.html");

pub fn routes() -> Router<AppState> {
    Router::new().route("/index.html", get(|| async { index() }))
}

pub fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
}
