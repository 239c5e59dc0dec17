//! The web console: three static files (HTML, CSS, plain JavaScript)
//! compiled into the binary and served at `/` beside the API. The page
//! signs in with an API token kept in the tab's `sessionStorage` and calls
//! the public `/v1` API like any other client; it stays current by reading
//! `GET /v1/watch` and re-reading what it shows.
//!
//! Architecture Invariant: the console has no privileged path into the
//! controller. These handlers serve files and nothing else; everything the
//! page shows or does goes through the authenticated public API, so the
//! console can never do what the API forbids, and the API is the one
//! thing to secure and test. Nothing is loaded from elsewhere (the
//! Content-Security-Policy says so to the browser).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// Only this origin's own files and API; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse + Clone {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            // The files change with the binary; a restart must not leave a
            // browser on an old page talking to a new API.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}

/// The console's routes: the page and its two assets, without a token
/// (they hold no data; the token is asked for by the page).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let index = file("text/html; charset=utf-8", INDEX_HTML);
    let script = file("text/javascript; charset=utf-8", APP_JS);
    let style = file("text/css; charset=utf-8", STYLE_CSS);
    Router::new()
        .route("/", get(move || std::future::ready(index.clone())))
        .route(
            "/console/app.js",
            get(move || std::future::ready(script.clone())),
        )
        .route(
            "/console/style.css",
            get(move || std::future::ready(style.clone())),
        )
}

/// The console's paths, served without a token.
pub const PATHS: &[&str] = &["/", "/console/app.js", "/console/style.css"];
