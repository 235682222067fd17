//! The routes and their handlers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flotilla_api_model::{
    AGENT_HEALTHY, AGENT_NO_WORKERS, AgentHealth, AgentList, AgentMetrics, AgentStatus,
    BreakerList, BreakerSummary, CompleteRequest, DEFAULT_SUMMARY_RANGE, DeadLetterList,
    DeadLetterQuery, DefinitionDetail, DefinitionList, DefinitionQuery, DefinitionSummary,
    DefinitionVersions, ErrorBody, ExecuteRequest, ExecuteResponse, HealthAudit, HealthAuditQuery,
    IDEMPOTENT_REPLAYED_HEADER, LogQuery, METRICS_BUCKETS, MetricsBucket, MetricsSummary,
    OperateResponse, Operation, RedriveOutcome, RedriveRequest, RedriveResponse,
    RegisterDefinitionRequest, RetryRequest, RunEventList, RunPage, RunQuery, RunReport,
    RunsChanged, ScheduleList, ScheduleRequest, ScheduleSummary, StepLogs, Submitted, SummaryQuery,
    WorkflowResult,
};
use flotilla_core::json::holds_nul;
use flotilla_core::schedule::{Missed, Overlap, Schedule};
use flotilla_core::{Definition, Plan, RunStatus, Subset};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::AuditTarget;
use crate::backend::{Backend, BackendError, NewSchedule, Submission};
use crate::error::{ApiError, Kind};
use crate::extract::{Actor, IdempotencyKey, Json, OptionalJson, Path, Query, Tenant};
use crate::health::{self, Probe};

/// Runs listed per page when the query gives no `limit`.
pub const DEFAULT_RUN_LIMIT: u32 = 50;
/// The largest `limit` a run listing accepts.
pub const MAX_RUN_LIMIT: u32 = 500;
/// Dead letters listed when the query gives no `limit`.
pub const DEFAULT_DEAD_LETTER_LIMIT: u32 = 50;
/// The largest `limit` a dead-letter listing accepts.
pub const MAX_DEAD_LETTER_LIMIT: u32 = 500;

/// Log lines answered when the query gives no `limit`.
pub const DEFAULT_LOG_LIMIT: u32 = 1000;
/// The largest `limit` a log read accepts.
pub const MAX_LOG_LIMIT: u32 = 10_000;
/// The longest `wait` a log read accepts, in seconds.
pub const MAX_LOG_WAIT_SECS: u32 = 30;
/// How often a waiting log read looks for new lines.
const LOG_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Every run status, for telling a client which ones exist.
pub(crate) const RUN_STATUSES: [RunStatus; 10] = [
    RunStatus::Running,
    RunStatus::Paused,
    RunStatus::Failing,
    RunStatus::Success,
    RunStatus::Failure,
    RunStatus::Cancelled,
    RunStatus::NeedsAttention,
    RunStatus::RollingBack,
    RunStatus::RolledBack,
    RunStatus::RollbackFailed,
];

// A status added to the core stops the build here until it is added to `RUN_STATUSES` too.
const _: fn(RunStatus) = |status| match status {
    RunStatus::Running
    | RunStatus::Paused
    | RunStatus::Failing
    | RunStatus::Success
    | RunStatus::Failure
    | RunStatus::Cancelled
    | RunStatus::NeedsAttention
    | RunStatus::RollingBack
    | RunStatus::RolledBack
    | RunStatus::RollbackFailed => {}
};

/// Bounds on what a client may send. A request past one is answered 413 (`payload_too_large`)
/// naming the limit, its value and the request's, and nothing of it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest request body accepted. This also bounds the YAML the coordinator parses per
    /// request.
    pub max_body_bytes: usize,
    /// The largest definition given in a request: its YAML text, or its JSON.
    pub max_definition_bytes: usize,
    /// The most steps a definition may have (`on_failure` handlers included).
    pub max_steps: usize,
    /// The largest `params` of a run request, as JSON.
    pub max_params_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_definition_bytes: 1024 * 1024,
            max_steps: 10_000,
            max_params_bytes: 256 * 1024,
        }
    }
}

impl Limits {
    /// Refuses `actual` when it is over `max`, naming the limit (`what`).
    fn check(what: &str, name: &str, max: usize, actual: usize) -> Result<(), ApiError> {
        if actual <= max {
            return Ok(());
        }
        Err(ApiError::too_large(
            format!("{what} is {actual}, over the coordinator's limit of {max} ({name})"),
            json!({ "limit": name, "max": max, "actual": actual }),
        ))
    }
}

/// What the handlers share.
struct AppState<B> {
    backend: Arc<B>,
    limits: Limits,
}

// Derived `Clone` would require `B: Clone`; only the `Arc` is cloned.
impl<B> Clone for AppState<B> {
    fn clone(&self) -> Self {
        Self {
            backend: Arc::clone(&self.backend),
            limits: self.limits,
        }
    }
}

impl<B> FromRef<AppState<B>> for Arc<B> {
    fn from_ref(state: &AppState<B>) -> Self {
        Arc::clone(&state.backend)
    }
}

impl<B> FromRef<AppState<B>> for Limits {
    fn from_ref(state: &AppState<B>) -> Self {
        state.limits
    }
}

/// The API's routes over `backend`. Requests to other paths, or with other methods, are answered
/// with 404 and 405 in the API's error shape.
pub fn router<B: Backend>(backend: Arc<B>, limits: Limits) -> Router {
    finish(api_routes(backend, limits), limits)
}

/// The API's routes over `backend`, and the health and metrics routes over `probe` (see
/// [`health`](crate::health)): what the coordinator serves.
pub fn router_with_health<B: Backend, P: Probe>(
    backend: Arc<B>,
    probe: Arc<P>,
    limits: Limits,
) -> Router {
    finish(
        api_routes(backend, limits).merge(health::routes(probe)),
        limits,
    )
}

/// The health and metrics routes over `probe` alone, for a process that serves no API (a
/// worker), with the same answers to other paths and methods.
pub fn health_router<P: Probe>(probe: Arc<P>) -> Router {
    finish(health::routes(probe), Limits::default())
}

/// Answers to paths and methods no route takes, and the body limit, for every route above.
fn finish(routes: Router, limits: Limits) -> Router {
    routes
        // Applies to the routes registered before it, so it must come after them.
        .method_not_allowed_fallback(wrong_method)
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
}

fn api_routes<B: Backend>(backend: Arc<B>, limits: Limits) -> Router {
    Router::new()
        .route("/api/workflows/execute", post(execute::<B>))
        .route("/api/workflows", get(list_runs::<B>))
        .route("/api/workflows/{id}", get(get_run::<B>))
        .route("/api/workflows/{id}/cancel", post(cancel::<B>))
        .route("/api/workflows/{id}/pause", post(pause::<B>))
        .route("/api/workflows/{id}/resume", post(resume::<B>))
        .route("/api/workflows/{id}/retry", post(retry::<B>))
        .route("/api/workflows/{id}/rollback", post(rollback::<B>))
        .route("/api/workflows/{id}/steps/{step}/skip", post(skip::<B>))
        .route(
            "/api/workflows/{id}/steps/{step}/complete",
            post(complete::<B>),
        )
        .route("/api/workflows/{id}/events", get(run_events::<B>))
        .route("/api/workflows/{id}/report", get(run_report::<B>))
        .route("/api/workflows/{id}/logs", get(run_logs::<B>))
        .route(
            "/api/definitions",
            post(register_definition::<B>).get(list_definitions::<B>),
        )
        .route(
            "/api/schedules",
            post(create_schedule::<B>).get(list_schedules::<B>),
        )
        .route(
            "/api/schedules/{id}",
            get(get_schedule::<B>).delete(delete_schedule::<B>),
        )
        .route("/api/definitions/{name}", get(get_definition::<B>))
        .route(
            "/api/definitions/{name}/versions",
            get(definition_versions::<B>),
        )
        .route("/api/dlq", get(list_dead_letters::<B>))
        .route("/api/dlq/redrive", post(redrive::<B>))
        .route("/api/metrics/summary", get(metrics_summary::<B>))
        .route("/api/health/audit", get(health_audit::<B>))
        .route("/api/agents/breakers", get(list_breakers::<B>))
        .route("/api/agents/{name}/breaker/reset", post(reset_breaker::<B>))
        .route("/api/agents", get(list_agents::<B>))
        .route("/api/agents/{name}", get(get_agent::<B>))
        .route("/api/agents/{name}/health", get(agent_health::<B>))
        .route("/api/agents/{name}/metrics", get(agent_metrics::<B>))
        .route("/api/events", get(events::<B>))
        .route(crate::openapi::PATH, get(crate::openapi::serve))
        .with_state(AppState { backend, limits })
        .merge(crate::dashboard::routes())
}

#[utoipa::path(
    post,
    path = "/api/workflows/execute",
    tag = "workflows",
    summary = "Start a run of a registered or inline definition",
    request_body = ExecuteRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Replays the run an earlier request with this key started"),
        ("Flotilla-Namespace" = Option<String>, Header, description = "The namespace of the run (or `namespace` in the body)")
    ),
    responses(
        (status = 202, description = "The run was started", body = ExecuteResponse),
        (status = 200, description = "An earlier request with this `Idempotency-Key` started the run; nothing new was started", body = ExecuteResponse),
        (status = 404, description = "No registered definition has this name or version", body = ErrorBody),
        (status = 409, description = "The named definition was registered anew each time the run was about to start; nothing was started", body = ErrorBody),
        (status = 429, description = "The namespace is over a quota (`Retry-After` says when to try again)", body = ErrorBody)
    )
)]
async fn execute<B: Backend>(
    State(backend): State<Arc<B>>,
    State(limits): State<Limits>,
    tenant: Tenant,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    Json(request): Json<ExecuteRequest>,
) -> Result<Response, ApiError> {
    let ExecuteRequest {
        workflow,
        version,
        definition,
        yaml,
        params,
        only,
        skip,
        priority,
        namespace,
    } = request;
    let namespace = tenant.one(namespace.as_deref())?;
    if version.is_some() && workflow.is_none() {
        return Err(ApiError::invalid_request(
            "`version` names a version of a registered definition: give its name too",
        ));
    }
    let params_bytes = serde_json::to_vec(&params).map_or(0, |p| p.len());
    Limits::check(
        "the size of `params` in bytes",
        "maxParamsBytes",
        limits.max_params_bytes,
        params_bytes,
    )?;
    let source = exactly_one(
        "nothing to run",
        [
            ("workflow", workflow.map(Source::Registered)),
            (
                "definition",
                definition.map(|v| Source::Inline(Inline::Object(v))),
            ),
            ("yaml", yaml.map(|t| Source::Inline(Inline::Yaml(t)))),
        ],
    )?;
    let (mut definition, mut latest) = match (source, version) {
        (Source::Registered(name), Some(version)) => {
            let detail = backend
                .definition_detail(&namespace, &name, Some(&version))
                .await?
                .ok_or_else(|| definition_not_found(&name, Some(&version)))?;
            let definition = Definition::from_value(detail.definition).map_err(|e| {
                ApiError::from(BackendError::Internal(format!(
                    "stored definition `{name}` is unreadable: {e}"
                )))
            })?;
            (definition, None)
        }
        (Source::Registered(name), None) => latest_definition(&*backend, &namespace, &name).await?,
        (Source::Inline(inline), _) => (inline.parse(limits)?, None),
    };
    // The latest revision may be registered anew between its reading (perhaps from a cache)
    // and the run's recording, which then refuses it: it is read again, and submitted again.
    let mut reread = 0;
    let Submitted {
        workflow_id,
        replayed,
    } = loop {
        let plan = Plan::compile(&definition)?;
        let subset = Subset {
            only: only.clone(),
            skip: skip.clone(),
        };
        subset
            .check(&plan)
            .map_err(|e| ApiError::invalid_request(e.to_string()))?;
        let effective = plan.run_params(params.clone());
        let name = definition.name.clone();
        let answer = backend
            .submit(Submission {
                definition,
                plan,
                params: effective,
                subset,
                priority,
                idempotency_key: idempotency_key.clone(),
                namespace: namespace.clone(),
                latest,
            })
            .await;
        match answer {
            Err(BackendError::StaleDefinition(_)) if reread < STALE_REREADS => {
                reread += 1;
                (definition, latest) = latest_definition(&*backend, &namespace, &name).await?;
            }
            answer => break answer?,
        }
    };
    let body = axum::Json(ExecuteResponse { workflow_id });
    // A replay started nothing, so it is not "accepted for processing" (202): it reports the
    // state of an earlier request, and the header lets a client tell the two apart.
    let mut response = if replayed {
        (StatusCode::OK, [(IDEMPOTENT_REPLAYED_HEADER, "true")], body).into_response()
    } else {
        (StatusCode::ACCEPTED, body).into_response()
    };
    response
        .extensions_mut()
        .insert(AuditTarget::one("workflowId", workflow_id));
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/api/workflows/{id}",
    tag = "workflows",
    summary = "One run with its steps",
    params(RunPath),
    responses(
        (status = 200, description = "The run", body = WorkflowResult),
        (status = 404, description = "No run has this id", body = ErrorBody)
    )
)]
async fn get_run<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
) -> Result<axum::Json<WorkflowResult>, ApiError> {
    let id = run_id(&id)?;
    match backend.run(&tenant.visible(), id).await? {
        Some(result) => Ok(axum::Json(result)),
        None => Err(run_not_found(id)),
    }
}

/// A run id from the path.
fn run_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|e| {
        ApiError::invalid_request(format!("`{text}` is not a workflow id (a UUID): {e}"))
    })
}

fn run_not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("workflow run {id} not found"))
}

/// The path of a run's routes.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
struct RunPath {
    /// The run's id (a UUID).
    #[param(format = Uuid)]
    id: String,
}

/// The path of a step's routes.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
struct StepPath {
    /// The run's id (a UUID).
    #[param(format = Uuid)]
    id: String,
    /// The step's id in the definition.
    step: String,
}

/// The path of a registered definition's routes.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
struct DefinitionPath {
    /// The definition's name.
    name: String,
}

/// The path of an agent's routes.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
struct AgentPath {
    /// The agent's name.
    name: String,
}

/// The path of a schedule's routes.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
struct SchedulePath {
    /// The schedule's id: the name of its definition.
    id: String,
}

/// What an operator action answers, for the OpenAPI document (the handlers answer with an
/// [`OperateResponse`] or an [`ApiError`]).
#[derive(utoipa::IntoResponses)]
#[expect(dead_code, reason = "describes answers for the OpenAPI document only")]
enum OperatorAnswer {
    /// The action was applied; the run's status after it.
    #[response(status = 200)]
    Applied(OperateResponse),
    /// No run has this id, or, for a step's action, no step this id (`not_found`).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The run's state does not allow the action (`conflict`, with the reason).
    #[response(status = 409)]
    Conflict(ErrorBody),
}

/// The body of an action that takes no arguments: none, or `{}`. A field is refused, as in every
/// request body, so that a client that expects it to mean something learns that it does not.
#[derive(Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NoArguments {}

#[utoipa::path(
    post,
    path = "/api/workflows/{id}/cancel",
    tag = "workflows",
    summary = "Cancel a run",
    params(RunPath),
    request_body(content = Option<NoArguments>, description = "No body, or `{}`"),
    responses(OperatorAnswer)
)]
async fn cancel<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
    Actor(actor): Actor,
    OptionalJson(NoArguments {}): OptionalJson<NoArguments>,
) -> Result<axum::Json<OperateResponse>, ApiError> {
    operate(&*backend, &tenant, &id, Operation::Cancel, actor).await
}

#[utoipa::path(
    post,
    path = "/api/workflows/{id}/pause",
    tag = "workflows",
    summary = "Pause a run: no new step starts until it is resumed",
    params(RunPath),
    request_body(content = Option<NoArguments>, description = "No body, or `{}`"),
    responses(OperatorAnswer)
)]
async fn pause<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
    Actor(actor): Actor,
    OptionalJson(NoArguments {}): OptionalJson<NoArguments>,
) -> Result<axum::Json<OperateResponse>, ApiError> {
    operate(&*backend, &tenant, &id, Operation::Pause, actor).await
}

#[utoipa::path(
    post,
    path = "/api/workflows/{id}/resume",
    tag = "workflows",
    summary = "Resume a paused run",
    params(RunPath),
    request_body(content = Option<NoArguments>, description = "No body, or `{}`"),
    responses(OperatorAnswer)
)]
async fn resume<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
    Actor(actor): Actor,
    OptionalJson(NoArguments {}): OptionalJson<NoArguments>,
) -> Result<axum::Json<OperateResponse>, ApiError> {
    operate(&*backend, &tenant, &id, Operation::Resume, actor).await
}

#[utoipa::path(
    post,
    path = "/api/workflows/{id}/retry",
    tag = "workflows",
    summary = "Retry a run's failed steps, or one step",
    params(RunPath),
    request_body(content = Option<RetryRequest>, description = "Optional: the step to retry"),
    responses(OperatorAnswer)
)]
async fn retry<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
    Actor(actor): Actor,
    OptionalJson(RetryRequest { step }): OptionalJson<RetryRequest>,
) -> Result<axum::Json<OperateResponse>, ApiError> {
    operate(&*backend, &tenant, &id, Operation::Retry { step }, actor).await
}

#[utoipa::path(
    post,
    path = "/api/workflows/{id}/rollback",
    tag = "workflows",
    summary = "Roll back an ended run: undo its steps that succeeded by their compensations, the latest first",
    params(RunPath),
    request_body(content = Option<NoArguments>, description = "No body, or `{}`"),
    responses(OperatorAnswer)
)]
async fn rollback<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
    Actor(actor): Actor,
    OptionalJson(NoArguments {}): OptionalJson<NoArguments>,
) -> Result<axum::Json<OperateResponse>, ApiError> {
    operate(&*backend, &tenant, &id, Operation::Rollback, actor).await
}

#[utoipa::path(
    post,
    path = "/api/workflows/{id}/steps/{step}/skip",
    tag = "workflows",
    summary = "Skip a step of a run",
    params(StepPath),
    request_body(content = Option<NoArguments>, description = "No body, or `{}`"),
    responses(OperatorAnswer)
)]
async fn skip<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(StepPath { id, step }): Path<StepPath>,
    Actor(actor): Actor,
    OptionalJson(NoArguments {}): OptionalJson<NoArguments>,
) -> Result<axum::Json<OperateResponse>, ApiError> {
    operate(&*backend, &tenant, &id, Operation::Skip { step }, actor).await
}

#[utoipa::path(
    post,
    path = "/api/workflows/{id}/steps/{step}/complete",
    tag = "workflows",
    summary = "Complete a step of a run by hand, with its output",
    params(StepPath),
    request_body = CompleteRequest,
    responses(OperatorAnswer)
)]
async fn complete<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(StepPath { id, step }): Path<StepPath>,
    Actor(actor): Actor,
    Json(CompleteRequest { output }): Json<CompleteRequest>,
) -> Result<axum::Json<OperateResponse>, ApiError> {
    operate(
        &*backend,
        &tenant,
        &id,
        Operation::Complete { step, output },
        actor,
    )
    .await
}

async fn operate<B: Backend>(
    backend: &B,
    tenant: &Tenant,
    id: &str,
    operation: Operation,
    actor: String,
) -> Result<axum::Json<OperateResponse>, ApiError> {
    let id = run_id(id)?;
    let action = operation.action();
    let step = operation.step().map(str::to_string);
    let status = backend
        .operate(&tenant.visible(), id, operation, actor.clone())
        .await?;
    // The run's history has the action too; the log puts it beside what the engine did after.
    tracing::info!(
        workflow_id = %id,
        action,
        step_id = step.as_deref(),
        %actor,
        %status,
        "operator action applied"
    );
    Ok(axum::Json(OperateResponse {
        workflow_id: id,
        action: action.to_string(),
        status,
    }))
}

#[utoipa::path(
    get,
    path = "/api/workflows/{id}/report",
    tag = "workflows",
    summary = "A run's report: per step its attempts, waits and durations",
    params(RunPath),
    responses(
        (status = 200, description = "The run's report", body = RunReport),
        (status = 404, description = "No run has this id", body = ErrorBody)
    )
)]
async fn run_report<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
) -> Result<axum::Json<RunReport>, ApiError> {
    let id = run_id(&id)?;
    match backend.report(&tenant.visible(), id).await? {
        Some(report) => Ok(axum::Json(report)),
        None => Err(run_not_found(id)),
    }
}

#[utoipa::path(
    get,
    path = "/api/workflows/{id}/events",
    tag = "workflows",
    summary = "A run's history, oldest first",
    params(RunPath),
    responses(
        (status = 200, description = "The run's events", body = RunEventList),
        (status = 404, description = "No run has this id", body = ErrorBody)
    )
)]
async fn run_events<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
) -> Result<axum::Json<RunEventList>, ApiError> {
    let id = run_id(&id)?;
    match backend.events(&tenant.visible(), id).await? {
        Some(events) => Ok(axum::Json(RunEventList { events })),
        None => Err(run_not_found(id)),
    }
}

#[utoipa::path(
    get,
    path = "/api/workflows/{id}/logs",
    tag = "workflows",
    summary = "Lines of a run's step logs, in order; with `wait`, waits for the next ones",
    params(RunPath, LogQuery),
    responses(
        (status = 200, description = "The lines asked for", body = StepLogs),
        (status = 404, description = "No run has this id, or the run has no such step", body = ErrorBody)
    )
)]
async fn run_logs<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(RunPath { id }): Path<RunPath>,
    Query(mut query): Query<LogQuery>,
) -> Result<axum::Json<StepLogs>, ApiError> {
    let id = run_id(&id)?;
    query.limit = Some(page_limit(query.limit, DEFAULT_LOG_LIMIT, MAX_LOG_LIMIT)?);
    query.after = Some(query.after.unwrap_or(0));
    if query.attempt == Some(0) {
        return Err(ApiError::invalid_request(
            "attempt must be 1 or more: attempts are numbered from 1",
        ));
    }
    let wait = query.wait.take().unwrap_or(0);
    if wait > MAX_LOG_WAIT_SECS {
        return Err(ApiError::invalid_request(format!(
            "wait must be at most {MAX_LOG_WAIT_SECS} seconds, not {wait}"
        )));
    }
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(u64::from(wait));
    loop {
        let Some(logs) = backend.logs(&tenant.visible(), id, query.clone()).await? else {
            return Err(run_not_found(id));
        };
        if !logs.lines.is_empty() || logs.ended || tokio::time::Instant::now() >= until {
            return Ok(axum::Json(logs));
        }
        tokio::time::sleep(LOG_POLL).await;
    }
}

#[utoipa::path(
    get,
    path = "/api/workflows",
    tag = "workflows",
    summary = "List runs, newest first, one page at a time",
    params(RunQuery),
    responses(
        (status = 200, description = "One page of runs", body = RunPage)
    )
)]
async fn list_runs<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Query(mut query): Query<RunQuery>,
) -> Result<axum::Json<RunPage>, ApiError> {
    if let Some(status) = &query.status
        && RunStatus::parse(status).is_none()
    {
        let known: Vec<&str> = RUN_STATUSES.iter().map(|s| s.as_str()).collect();
        return Err(ApiError::invalid_request(format!(
            "unknown status `{status}`: expected {}",
            listing(&known, "or")
        )));
    }
    query.limit = Some(page_limit(query.limit, DEFAULT_RUN_LIMIT, MAX_RUN_LIMIT)?);
    Ok(axum::Json(backend.runs(&tenant.visible(), query).await?))
}

/// The `limit` of a listing: `default` when unset, else in `1..=max`.
pub(crate) fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::invalid_request(format!(
            "limit must be between 1 and {max}, not {limit}"
        )))
    }
}

#[utoipa::path(
    post,
    path = "/api/definitions",
    tag = "definitions",
    summary = "Register a definition, or a new version of one",
    request_body = RegisterDefinitionRequest,
    responses(
        (status = 201, description = "The definition was registered", body = DefinitionSummary)
    )
)]
async fn register_definition<B: Backend>(
    State(backend): State<Arc<B>>,
    State(limits): State<Limits>,
    tenant: Tenant,
    Json(request): Json<RegisterDefinitionRequest>,
) -> Result<(StatusCode, axum::Json<DefinitionSummary>), ApiError> {
    let RegisterDefinitionRequest { definition, yaml } = request;
    let definition = exactly_one(
        "nothing to run",
        [
            ("definition", definition.map(Inline::Object)),
            ("yaml", yaml.map(Inline::Yaml)),
        ],
    )?
    .parse(limits)?;
    // Refuse what could never run, so that a registered name always names a valid workflow.
    Plan::compile(&definition)?;
    let summary = backend
        .register_definition(&tenant.one(None)?, definition)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(summary)))
}

#[utoipa::path(
    get,
    path = "/api/definitions",
    tag = "definitions",
    summary = "The registered definitions, each at its latest version",
        responses(
        (status = 200, description = "The definitions", body = DefinitionList)
    )
)]
async fn list_definitions<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
) -> Result<axum::Json<DefinitionList>, ApiError> {
    let definitions = backend.definitions(&tenant.visible()).await?;
    Ok(axum::Json(DefinitionList { definitions }))
}

#[utoipa::path(
    get,
    path = "/api/definitions/{name}",
    tag = "definitions",
    summary = "A registered definition, at its latest or a given version",
    params(DefinitionPath, DefinitionQuery),
    responses(
        (status = 200, description = "The definition", body = DefinitionDetail),
        (status = 404, description = "No definition has this name, or no such version", body = ErrorBody)
    )
)]
async fn get_definition<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(DefinitionPath { name }): Path<DefinitionPath>,
    Query(DefinitionQuery { version }): Query<DefinitionQuery>,
) -> Result<axum::Json<DefinitionDetail>, ApiError> {
    backend
        .definition_detail(&tenant.one(None)?, &name, version.as_deref())
        .await?
        .map(axum::Json)
        .ok_or_else(|| definition_not_found(&name, version.as_deref()))
}

#[utoipa::path(
    get,
    path = "/api/definitions/{name}/versions",
    tag = "definitions",
    summary = "Every version of a definition",
    params(DefinitionPath),
    responses(
        (status = 200, description = "The versions", body = DefinitionVersions),
        (status = 404, description = "No definition has this name", body = ErrorBody)
    )
)]
async fn definition_versions<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(DefinitionPath { name }): Path<DefinitionPath>,
) -> Result<axum::Json<DefinitionVersions>, ApiError> {
    let versions = backend
        .definition_versions(&tenant.one(None)?, &name)
        .await?;
    if versions.is_empty() {
        return Err(definition_not_found(&name, None));
    }
    Ok(axum::Json(DefinitionVersions { name, versions }))
}

fn definition_not_found(name: &str, version: Option<&str>) -> ApiError {
    ApiError::not_found(match version {
        None => format!("no workflow definition named `{name}` is registered"),
        Some(version) => format!(
            "definition `{name}` has no version or revision `{version}` (see /api/definitions/{name}/versions)"
        ),
    })
}

#[utoipa::path(
    get,
    path = "/api/dlq",
    tag = "dlq",
    summary = "Dead letters: tasks and results no one could handle",
    params(DeadLetterQuery),
    responses(
        (status = 200, description = "The dead letters", body = DeadLetterList)
    )
)]
async fn list_dead_letters<B: Backend>(
    State(backend): State<Arc<B>>,
    Query(mut query): Query<DeadLetterQuery>,
) -> Result<axum::Json<DeadLetterList>, ApiError> {
    query.pending = Some(query.pending.unwrap_or(true));
    query.limit = Some(page_limit(
        query.limit,
        DEFAULT_DEAD_LETTER_LIMIT,
        MAX_DEAD_LETTER_LIMIT,
    )?);
    let dead_letters = backend.dead_letters(query).await?;
    Ok(axum::Json(DeadLetterList { dead_letters }))
}

#[utoipa::path(
    get,
    path = "/api/agents/breakers",
    tag = "agents",
    summary = "The circuit breakers of the agents steps have called",
        responses(
        (status = 200, description = "The breakers", body = BreakerList)
    )
)]
async fn list_breakers<B: Backend>(
    State(backend): State<Arc<B>>,
) -> Result<axum::Json<BreakerList>, ApiError> {
    let breakers = backend.breakers().await?;
    Ok(axum::Json(BreakerList { breakers }))
}

#[utoipa::path(
    post,
    path = "/api/agents/{name}/breaker/reset",
    tag = "agents",
    summary = "Close an agent's circuit breaker",
    params(AgentPath),
    request_body(content = Option<NoArguments>, description = "No body, or `{}`"),
    responses(
        (status = 200, description = "The breaker after the reset", body = BreakerSummary),
        (status = 404, description = "No step has called this agent yet", body = ErrorBody)
    )
)]
async fn reset_breaker<B: Backend>(
    State(backend): State<Arc<B>>,
    Path(AgentPath { name: agent }): Path<AgentPath>,
    Actor(actor): Actor,
    OptionalJson(NoArguments {}): OptionalJson<NoArguments>,
) -> Result<axum::Json<BreakerSummary>, ApiError> {
    let breaker = backend
        .reset_breaker(&agent, actor.clone())
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "agent `{agent}` has no circuit breaker: no step has called it yet"
            ))
        })?;
    tracing::info!(agent, %actor, "circuit breaker reset by an operator");
    Ok(axum::Json(breaker))
}

#[utoipa::path(
    get,
    path = "/api/health/audit",
    tag = "health",
    summary = "Audit the fleet: each part checked and graded pass, warn or fail against targets",
    params(HealthAuditQuery),
    responses(
        (status = 200, description = "The audit; `status` is its worst check", body = HealthAudit)
    )
)]
async fn health_audit<B: Backend>(
    State(backend): State<Arc<B>>,
    Query(query): Query<HealthAuditQuery>,
) -> Result<axum::Json<HealthAudit>, ApiError> {
    let (window, length) = time_range(query.window.clone())?;
    let targets = query.targets().map_err(ApiError::invalid_request)?;
    let checks = backend
        .health_audit(chrono::Utc::now() - length, targets)
        .await?;
    Ok(axum::Json(HealthAudit::of(window, targets, checks)))
}

#[utoipa::path(
    get,
    path = "/api/metrics/summary",
    tag = "metrics",
    summary = "Executions, successes and latency per agent over a range",
    params(SummaryQuery),
    responses(
        (status = 200, description = "The summary", body = MetricsSummary)
    )
)]
async fn metrics_summary<B: Backend>(
    State(backend): State<Arc<B>>,
    Query(query): Query<SummaryQuery>,
) -> Result<axum::Json<MetricsSummary>, ApiError> {
    let (range, length) = time_range(query.range)?;
    let until = chrono::Utc::now();
    let since = until - length;
    let agents = backend.attempts_since(since).await?;
    let executions = agents.iter().map(|a| a.executions).sum::<u64>();
    let successes = agents.iter().map(|a| a.successes).sum::<u64>();
    Ok(axum::Json(MetricsSummary {
        range,
        since,
        until,
        executions,
        successes,
        success_rate: (executions > 0).then(|| successes as f64 / executions as f64),
        agents,
    }))
}

#[utoipa::path(
    post,
    path = "/api/dlq/redrive",
    tag = "dlq",
    summary = "Retry dead letters, named or all pending",
    request_body = RedriveRequest,
    responses(
        (status = 200, description = "One outcome per dead letter", body = RedriveResponse)
    )
)]
async fn redrive<B: Backend>(
    State(backend): State<Arc<B>>,
    Json(request): Json<RedriveRequest>,
) -> Result<axum::Json<RedriveResponse>, ApiError> {
    let RedriveRequest { ids, all } = request;
    let which = exactly_one(
        "nothing to redrive",
        [
            ("ids", (!ids.is_empty()).then_some(ids)),
            // `all: true` is the backend's empty list.
            ("all", all.then(Vec::new)),
        ],
    )?;
    let mut seen = HashSet::new();
    let named: Vec<Uuid> = which.into_iter().filter(|id| seen.insert(*id)).collect();
    let outcomes = backend.redrive(named.clone()).await?;
    let redriven = if named.is_empty() {
        outcomes
    } else {
        per_named(named, outcomes)
    };
    Ok(axum::Json(RedriveResponse { redriven }))
}

/// Why a named dead letter the backend said nothing about was not retried.
const NOT_PENDING: &str = "no dead letter with this id is waiting to be redriven (there is none, \
                           or it was redriven already)";

/// One outcome per named dead letter, in the order named, so that a client can check each one:
/// the backend may leave out those it had nothing pending for.
fn per_named(named: Vec<Uuid>, outcomes: Vec<RedriveOutcome>) -> Vec<RedriveOutcome> {
    let mut answered: HashMap<Uuid, Option<RedriveOutcome>> =
        named.iter().map(|id| (*id, None)).collect();
    // Outcomes for ids nobody named would be a backend bug; they are passed on, not hidden.
    let mut unnamed = Vec::new();
    for outcome in outcomes {
        match answered.get_mut(&outcome.dead_letter) {
            Some(slot) => *slot = Some(outcome),
            None => unnamed.push(outcome),
        }
    }
    named
        .into_iter()
        .map(|id| {
            answered
                .remove(&id)
                .flatten()
                .unwrap_or_else(|| RedriveOutcome {
                    dead_letter: id,
                    workflow_id: None,
                    step_id: None,
                    attempt: None,
                    error: Some(NOT_PENDING.into()),
                })
        })
        .chain(unnamed)
        .collect()
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

pub(crate) async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        Kind::MethodNotAllowed,
        format!("{} does not accept {method}", uri.path()),
    )
}

/// How many times a submission of a registered definition's latest revision reads it again
/// when another revision was registered meanwhile, before answering 409.
const STALE_REREADS: u32 = 3;

/// The latest revision of registered definition `name`, with its hash, or 404.
async fn latest_definition<B: Backend>(
    backend: &B,
    namespace: &str,
    name: &str,
) -> Result<(Definition, Option<String>), ApiError> {
    let latest = backend
        .definition(namespace, name)
        .await?
        .ok_or_else(|| definition_not_found(name, None))?;
    Ok((latest.definition, Some(latest.hash)))
}

/// Where a run request's definition comes from.
enum Source {
    /// The name of a registered definition.
    Registered(String),
    Inline(Inline),
}

/// A definition given in the request itself.
enum Inline {
    /// A JSON object.
    Object(Value),
    /// YAML (or JSON) text.
    Yaml(String),
}

impl Inline {
    /// The definition, within `limits`: its size is checked before it is parsed, its steps after.
    fn parse(self, limits: Limits) -> Result<Definition, ApiError> {
        let size = match &self {
            Self::Object(value) => serde_json::to_vec(value).map_or(0, |v| v.len()),
            Self::Yaml(text) => text.len(),
        };
        Limits::check(
            "the definition's size in bytes",
            "maxDefinitionBytes",
            limits.max_definition_bytes,
            size,
        )?;
        let definition = match self {
            Self::Object(value) => Definition::from_value(value)?,
            Self::Yaml(text) => Definition::from_yaml(&text)?,
        };
        // YAML escapes (`"\0"`, `"\x00"`) make NUL characters that the JSON body did not show.
        if serde_json::to_vec(&definition).is_ok_and(|json| holds_nul(&json)) {
            return Err(ApiError::holds_nul("the definition holds", "\\0"));
        }
        let steps = definition.steps.len()
            + definition
                .error_handling
                .as_ref()
                .map_or(0, |handling| handling.on_failure.len());
        Limits::check(
            "the definition's number of steps",
            "maxSteps",
            limits.max_steps,
            steps,
        )?;
        Ok(definition)
    }
}

/// The one value given among the named request fields, or why the request is ambiguous;
/// `nothing` starts the message when none is given.
fn exactly_one<T, const N: usize>(
    nothing: &str,
    fields: [(&'static str, Option<T>); N],
) -> Result<T, ApiError> {
    let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
    let given: Vec<(&str, T)> = fields
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect();
    match <[(&str, T); 1]>::try_from(given) {
        Ok([(_, source)]) => Ok(source),
        Err(given) if given.is_empty() => Err(ApiError::invalid_request(format!(
            "{nothing}: give one of {}",
            listing(&names, "or")
        ))),
        Err(given) => {
            let given: Vec<&str> = given.iter().map(|(name, _)| *name).collect();
            Err(ApiError::invalid_request(format!(
                "{} were given: give only one of {}",
                listing(&given, "and"),
                listing(&names, "or")
            )))
        }
    }
}

/// "`a`, `b` or `c`".
fn listing(items: &[&str], conjunction: &str) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("`{i}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("{} {conjunction} {last}", rest.join(", "))
        }
        _ => quoted.concat(),
    }
}

#[cfg(test)]
pub(crate) mod tests;

#[utoipa::path(
    post,
    path = "/api/schedules",
    tag = "schedules",
    summary = "Set the schedule of a registered definition",
    request_body = ScheduleRequest,
    responses(
        (status = 201, description = "The schedule was set", body = ScheduleSummary),
        (status = 404, description = "No definition has this name", body = ErrorBody)
    )
)]
async fn create_schedule<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Json(request): Json<ScheduleRequest>,
) -> Result<(StatusCode, axum::Json<ScheduleSummary>), ApiError> {
    let ScheduleRequest {
        definition,
        cron,
        timezone,
        missed,
        overlap,
        params,
    } = request;
    if definition.trim().is_empty() {
        return Err(ApiError::invalid_request(
            "`definition` must name a registered definition",
        ));
    }
    let missed: Missed = policy("missed", missed, "`skip` or `catch_up_once`")?;
    let overlap: Overlap = policy("overlap", overlap, "`skip` or `allow`")?;
    let schedule = Schedule::new(&cron, timezone.as_deref(), missed, overlap)
        .map_err(ApiError::invalid_request)?;
    let created = backend
        .put_schedule(NewSchedule {
            namespace: tenant.one(None)?,
            definition,
            schedule,
            params,
        })
        .await?;
    tracing::info!(schedule = %created.id, cron = %created.cron, next_at = %created.next_at, "schedule set");
    Ok((StatusCode::CREATED, axum::Json(created)))
}

/// A schedule policy by its name in the definition format; the default when unset.
fn policy<T: serde::de::DeserializeOwned + Default>(
    field: &str,
    value: Option<String>,
    allowed: &str,
) -> Result<T, ApiError> {
    match value {
        None => Ok(T::default()),
        Some(name) => serde_json::from_value(Value::String(name.clone())).map_err(|_| {
            ApiError::invalid_request(format!("`{field}` must be {allowed}, not `{name}`"))
        }),
    }
}

#[utoipa::path(
    get,
    path = "/api/schedules",
    tag = "schedules",
    summary = "Every schedule",
        responses(
        (status = 200, description = "The schedules", body = ScheduleList)
    )
)]
async fn list_schedules<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
) -> Result<axum::Json<ScheduleList>, ApiError> {
    Ok(axum::Json(ScheduleList {
        schedules: backend.schedules(&tenant.visible()).await?,
    }))
}

#[utoipa::path(
    get,
    path = "/api/schedules/{id}",
    tag = "schedules",
    summary = "One schedule",
    params(SchedulePath),
    responses(
        (status = 200, description = "The schedule", body = ScheduleSummary),
        (status = 404, description = "No schedule has this id", body = ErrorBody)
    )
)]
async fn get_schedule<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(SchedulePath { id }): Path<SchedulePath>,
) -> Result<axum::Json<ScheduleSummary>, ApiError> {
    backend
        .schedule(&tenant.one(None)?, &id)
        .await?
        .map(axum::Json)
        .ok_or_else(|| schedule_not_found(&id))
}

#[utoipa::path(
    delete,
    path = "/api/schedules/{id}",
    tag = "schedules",
    summary = "Remove a schedule",
    params(SchedulePath),
    responses(
        (status = 204, description = "The schedule was removed"),
        (status = 404, description = "No schedule has this id", body = ErrorBody)
    )
)]
async fn delete_schedule<B: Backend>(
    State(backend): State<Arc<B>>,
    tenant: Tenant,
    Path(SchedulePath { id }): Path<SchedulePath>,
) -> Result<StatusCode, ApiError> {
    if backend.delete_schedule(&tenant.one(None)?, &id).await? {
        tracing::info!(schedule = %id, "schedule removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(schedule_not_found(&id))
    }
}

fn schedule_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no schedule `{id}` (a schedule's id is the name of its definition)"
    ))
}

#[utoipa::path(
    get,
    path = "/api/agents",
    tag = "agents",
    summary = "Agents with their workers, health and queue depth",
        responses(
        (status = 200, description = "The agents", body = AgentList)
    )
)]
async fn list_agents<B: Backend>(
    State(backend): State<Arc<B>>,
) -> Result<axum::Json<AgentList>, ApiError> {
    let agents = backend.agents(None).await?;
    Ok(axum::Json(AgentList { agents }))
}

#[utoipa::path(
    get,
    path = "/api/agents/{name}",
    tag = "agents",
    summary = "One agent with its workers",
    params(AgentPath),
    responses(
        (status = 200, description = "The agent", body = AgentStatus),
        (status = 404, description = "No worker serves this agent and no step waits for it", body = ErrorBody)
    )
)]
async fn get_agent<B: Backend>(
    State(backend): State<Arc<B>>,
    Path(AgentPath { name }): Path<AgentPath>,
) -> Result<axum::Json<AgentStatus>, ApiError> {
    backend
        .agents(Some(&name))
        .await?
        .pop()
        .map(axum::Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "agent `{name}` has no registered worker and no step waits for it"
            ))
        })
}

/// Answers for any name: an agent nobody serves is `no_workers`, which is what its health is.
#[utoipa::path(
    get,
    path = "/api/agents/{name}/health",
    tag = "agents",
    summary = "An agent's health; `no_workers` for one nobody serves",
    params(AgentPath),
    responses(
        (status = 200, description = "The agent's health", body = AgentHealth)
    )
)]
async fn agent_health<B: Backend>(
    State(backend): State<Arc<B>>,
    Path(AgentPath { name }): Path<AgentPath>,
) -> Result<axum::Json<AgentHealth>, ApiError> {
    let status = backend.agents(Some(&name)).await?.pop();
    let health = match status {
        Some(status) => {
            let healthy = status
                .workers
                .iter()
                .filter(|w| w.health == AGENT_HEALTHY)
                .count();
            let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            AgentHealth {
                name,
                health: status.health,
                healthy_workers: count(healthy),
                unhealthy_workers: count(status.workers.len() - healthy),
                waiting_steps: status.waiting_steps,
                oldest_waiting_ms: status.oldest_waiting_ms,
            }
        }
        None => AgentHealth {
            name,
            health: AGENT_NO_WORKERS.to_owned(),
            healthy_workers: 0,
            unhealthy_workers: 0,
            waiting_steps: 0,
            oldest_waiting_ms: None,
        },
    };
    Ok(axum::Json(health))
}

#[utoipa::path(
    get,
    path = "/api/agents/{name}/metrics",
    tag = "agents",
    summary = "An agent's executions, errors and latency over a range, in total and over time",
    params(AgentPath, SummaryQuery),
    responses(
        (status = 200, description = "The agent's figures (zero for an agent nothing ran on)", body = AgentMetrics)
    )
)]
async fn agent_metrics<B: Backend>(
    State(backend): State<Arc<B>>,
    Path(AgentPath { name }): Path<AgentPath>,
    Query(query): Query<SummaryQuery>,
) -> Result<axum::Json<AgentMetrics>, ApiError> {
    let (range, length) = time_range(query.range)?;
    let until = chrono::Utc::now();
    let since = until - length;
    let bucket = length / METRICS_BUCKETS;
    let (total, counted) = backend.agent_attempts(&name, since, until, bucket).await?;
    let mut series: Vec<MetricsBucket> = (0..METRICS_BUCKETS)
        .map(|n| MetricsBucket {
            start: since + bucket * n,
            executions: 0,
            errors: 0,
            p50_ms: None,
            p95_ms: None,
            p99_ms: None,
        })
        .collect();
    for (n, figures) in counted {
        if let Some(slot) = usize::try_from(n).ok().and_then(|n| series.get_mut(n)) {
            let [p50, p95, p99] = percentiles(&figures);
            *slot = MetricsBucket {
                start: slot.start,
                executions: figures.executions,
                errors: figures.errors,
                p50_ms: p50,
                p95_ms: p95,
                p99_ms: p99,
            };
        }
    }
    let [p50, p95, p99] = percentiles(&total);
    Ok(axum::Json(AgentMetrics {
        agent: name,
        range,
        since,
        until,
        executions: total.executions,
        errors: total.errors,
        error_rate: (total.executions > 0).then(|| total.errors as f64 / total.executions as f64),
        p50_ms: p50,
        p95_ms: p95,
        p99_ms: p99,
        bucket_ms: u64::try_from(bucket.as_millis()).unwrap_or(u64::MAX),
        series,
    }))
}

fn percentiles(figures: &crate::backend::AttemptFigures) -> [Option<f64>; 3] {
    figures.run_time_ms.map_or([None; 3], |p| p.map(Some))
}

/// A range of time asked for (`1h`, `30m`…; the default when unset): as asked, and its length.
fn time_range(asked: Option<String>) -> Result<(String, std::time::Duration), ApiError> {
    let range = asked.unwrap_or_else(|| DEFAULT_SUMMARY_RANGE.to_owned());
    let length = flotilla_api_model::parse_range(&range).map_err(ApiError::invalid_request)?;
    Ok((range, length))
}

/// The name of the events of `GET /api/events`.
const RUNS_EVENT: &str = "runs";

/// The stream starts with a `runs` event naming no run, sent once the stream listens: a
/// client reads what it shows after it, so that no change falls between its read and the
/// stream.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "events",
    summary = "Changes of runs as they commit, on any coordinator (server-sent events)",
    description = "A `text/event-stream` of `runs` events whose data is a `RunsChanged`, naming \
                   only runs of the credential's namespaces. The \
                   first event names no run (read again what is shown); a comment is sent every \
                   15 s to keep idle connections open. Send the credential as for any route \
                   (read the stream with `fetch`: `EventSource` cannot send it).",
    responses(
        (status = 200, description = "The stream", content_type = "text/event-stream", body = RunsChanged)
    )
)]
async fn events<B: Backend>(State(backend): State<Arc<B>>, tenant: Tenant) -> impl IntoResponse {
    use futures_util::StreamExt;
    let everything = RunsChanged { runs: None };
    let changes = futures_util::stream::once(std::future::ready(everything))
        .chain(backend.changes(tenant.visible()))
        .map(|changed| Event::default().event(RUNS_EVENT).json_data(changed));
    Sse::new(changes).keep_alive(KeepAlive::default())
}
