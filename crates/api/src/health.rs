//! The operational routes of every Flotilla process, coordinator and workers alike: liveness,
//! readiness, a health summary and Prometheus metrics, over a [`Probe`] the process implements.
//!
//! | route               | answer                                                               |
//! | ------------------- | -------------------------------------------------------------------- |
//! | `GET /health/live`  | 200 [`HealthReport`] without checks, as long as the process serves  |
//! | `GET /health/ready` | 200 [`HealthReport`] when every check passes; else 503 `unavailable` naming the failing parts, the report in `details` |
//! | `GET /health`       | 200 [`HealthReport`]: each part `ok` or `failing`, with a message    |
//! | `GET /metrics`      | 200, the Prometheus text format (version 0.0.4)                     |
//!
//! They are outside `/api` and take no credentials: orchestrators and scrapers call them.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flotilla_api_model::{ErrorBody, HealthCheck, HealthReport};

use crate::error::ApiError;

/// The `Content-Type` of `GET /metrics`: the Prometheus text format, which [`Probe::metrics`]
/// must answer in.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a process tells about its own health.
pub trait Probe: Send + Sync + 'static {
    /// The version `GET /health` reports.
    fn version(&self) -> &str;

    /// Checks each part the process needs to do its work (a database, a broker connection…),
    /// now. Each check must be bounded in time: a part that does not answer soon is failing.
    fn checks(&self) -> impl Future<Output = Vec<HealthCheck>> + Send;

    /// The process's metrics in the Prometheus text format (version 0.0.4).
    fn metrics(&self) -> impl Future<Output = String> + Send;
}

/// The health and metrics routes over `probe`, without fallbacks, to merge into a router.
pub(crate) fn routes<P: Probe>(probe: Arc<P>) -> Router {
    Router::new()
        .route("/health/live", get(live::<P>))
        .route("/health/ready", get(ready::<P>))
        .route("/health", get(health::<P>))
        .route("/metrics", get(metrics::<P>))
        .with_state(probe)
}

#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    summary = "Liveness: answers as long as the process serves",
    responses(
        (status = 200, description = "Alive (no checks run)", body = HealthReport)
    )
)]
async fn live<P: Probe>(State(probe): State<Arc<P>>) -> axum::Json<HealthReport> {
    axum::Json(HealthReport::of(probe.version(), Vec::new()))
}

#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    summary = "Readiness: every dependency answers",
    responses(
        (status = 200, description = "Ready", body = HealthReport),
        (status = 503, description = "A check failed (`unavailable`); the report is in `details`", body = ErrorBody)
    )
)]
async fn ready<P: Probe>(
    State(probe): State<Arc<P>>,
) -> Result<axum::Json<HealthReport>, ApiError> {
    let report = HealthReport::of(probe.version(), probe.checks().await);
    if report.is_ok() {
        return Ok(axum::Json(report));
    }
    let failing: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.is_ok())
        .map(|c| format!("{}: {}", c.name, c.message))
        .collect();
    Err(ApiError::not_ready(
        format!("not ready: {}", failing.join("; ")),
        &report,
    ))
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    summary = "Each dependency, `ok` or `failing`, with a message",
    responses(
        (status = 200, description = "The health report", body = HealthReport)
    )
)]
async fn health<P: Probe>(State(probe): State<Arc<P>>) -> axum::Json<HealthReport> {
    axum::Json(HealthReport::of(probe.version(), probe.checks().await))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    summary = "Prometheus metrics (text format 0.0.4)",
    description = "Open by default; a coordinator that protects its metrics \
                   (`FLOTILLA_PROTECT_METRICS=true`) asks for a credential with scope `read`.",
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)
    )
)]
async fn metrics<P: Probe>(State(probe): State<Arc<P>>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        probe.metrics().await,
    )
        .into_response()
}
