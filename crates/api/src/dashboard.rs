//! The dashboard: one page, its script and its style sheet, built into the binary (no build
//! step, nothing fetched from elsewhere), served without a credential since they hold no data.
//! The page asks for a credential once, keeps it in the tab's `sessionStorage`, and sends it as
//! `Authorization: Bearer` with every API request, the event stream (`GET /api/events`) included:
//! it reads the stream with `fetch`, not `EventSource` (which cannot send headers), so no
//! credential ever travels in a URL.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flotilla_api_model::ErrorBody;

use crate::error::ApiError;
use crate::extract::Path;

/// Where the page is served.
pub(crate) const PATH: &str = "/dashboard";

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Only these files load, and nothing from elsewhere; the page's API calls go to this origin.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' \
                      data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                      frame-ancestors 'none'";

pub(crate) fn routes() -> Router {
    Router::new()
        .route(PATH, get(page))
        .route("/dashboard/{asset}", get(asset))
}

#[utoipa::path(
    get,
    path = "/dashboard",
    tag = "dashboard",
    summary = "The dashboard: runs, their steps live, agents, metrics and failures",
    description = "An HTML page for a browser; it asks for an API token and calls this API.",
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String)
    )
)]
pub(crate) async fn page() -> Response {
    file("text/html; charset=utf-8", PAGE)
}

#[utoipa::path(
    get,
    path = "/dashboard/{asset}",
    tag = "dashboard",
    summary = "The dashboard's script (`app.js`) and style sheet (`app.css`)",
    params(("asset" = String, Path, description = "`app.js` or `app.css`")),
    responses(
        (status = 200, description = "The file", content_type = "text/plain", body = String),
        (status = 404, description = "No such file", body = ErrorBody)
    )
)]
pub(crate) async fn asset(Path(asset): Path<String>) -> Result<Response, ApiError> {
    match asset.as_str() {
        "app.js" => Ok(file("text/javascript; charset=utf-8", SCRIPT)),
        "app.css" => Ok(file("text/css; charset=utf-8", STYLE)),
        _ => Err(ApiError::not_found(format!(
            "the dashboard has no file `{asset}`"
        ))),
    }
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Small files: asking again costs little and a new coordinator's are seen at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
