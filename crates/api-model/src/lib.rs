//! JSON models of the Flotilla HTTP API, shared by the server (`flotilla-api`) and the CLI.
//!
//! Field names are camelCase on the wire. Optional fields are left out of the JSON when unset,
//! and read as unset when absent, so either side may be the older one as long as a field is only
//! ever added as optional.
//!
//! Request bodies refuse unknown fields: a misspelt `param` or a `version` pin that this server
//! does not honour yet must be an error, not silently ignored. Responses accept unknown fields so
//! that an older CLI can read a newer server.
//!
//! **Architecture invariant:** this crate holds data shapes and the rules of their wire format
//! only — no HTTP client or server, no domain logic. Status values are plain strings so that a
//! client keeps working when the server learns a new status.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

mod access;

pub use access::{
    API_TOKEN_ENV, AuditEntry, AuditPage, AuditQuery, CreatedToken, NewTokenRequest, SCOPES,
    TokenList, TokenSummary,
};

/// Every status a run can have, as the API writes it (`GET /api/workflows?status=` takes one).
pub const RUN_STATUSES: [&str; 10] = [
    "running",
    "paused",
    "failing",
    "success",
    "failure",
    "cancelled",
    "needs_attention",
    "rolling_back",
    "rolled_back",
    "rollback_failed",
];

/// Schemas of the OpenAPI document that the derives cannot state.
#[cfg(feature = "openapi")]
mod schemas {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};

    /// A run status: one of [`RUN_STATUSES`](crate::RUN_STATUSES).
    pub(crate) fn run_status() -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(crate::RUN_STATUSES))
    }

    /// A token's scopes: at least one of [`SCOPES`](crate::SCOPES).
    pub(crate) fn scopes() -> ArrayBuilder {
        let scope = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(crate::SCOPES));
        ArrayBuilder::new().items(scope).min_items(Some(1))
    }

    /// Namespaces (see [`check_namespace`](crate::check_namespace)), or `*` for all of them.
    pub(crate) fn namespaces() -> ArrayBuilder {
        let namespace = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^(\\*|[a-z0-9][a-z0-9-]{0,62})$"));
        ArrayBuilder::new().items(namespace)
    }
}

/// `POST /api/workflows/execute`: start a run. Exactly one of `workflow`, `definition` and `yaml`
/// names what to run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecuteRequest {
    /// The name of a registered definition (also accepted as `name`); its latest revision runs,
    /// or the one `version` names.
    #[serde(default, alias = "name", skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// With `workflow`: the definition's `version:` (its latest revision with it), or a
    /// revision number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A definition given inline as a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<Value>,
    /// A definition given inline as YAML (or JSON) text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yaml: Option<String>,
    /// Run params; each overrides the definition's default of the same name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    /// Run only these steps (by step id); the others end `skipped`, saying
    /// `not selected: --only …`. A selected step whose dependencies are left out starts without
    /// waiting for them, as after an operator's skip of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<String>,
    /// Leave these steps out (by step id): they end `skipped`, saying `skipped: --skip …`, and
    /// their dependents run. With `only`, leaves steps out of those selected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<String>,
    /// `high`: the run's tasks are taken by workers before any normal one waiting; left out,
    /// the definition's `priority:` (normal unless it says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<RunPriority>,
    /// The namespace the run belongs to (also given by the [`NAMESPACE_HEADER`]); left out, the
    /// credential's namespace when it has exactly one, or `default` for a credential of all
    /// namespaces. A registered `workflow` is looked up there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// How soon a run's tasks are taken by workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RunPriority {
    #[default]
    Normal,
    High,
}

/// The request header that names the namespace a request acts in: where a submission's run,
/// a definition or a schedule belongs, and the one namespace lists are narrowed to.
pub const NAMESPACE_HEADER: &str = "Flotilla-Namespace";

/// The environment variable the CLI reads the namespace it acts in from.
pub const NAMESPACE_ENV: &str = "FLOTILLA_NAMESPACE";

/// The namespace of everything stored before namespaces existed, and of submissions by a
/// credential of all namespaces that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The longest namespace name, in characters.
pub const MAX_NAMESPACE_CHARS: usize = 63;

/// Checks that `name` can name a namespace: 1 to [`MAX_NAMESPACE_CHARS`] lowercase ASCII
/// letters, digits and `-`, starting with a letter or digit (a DNS label, so that a namespace
/// can be a Kubernetes namespace's name too). `*` is not a namespace: it stands for all of them.
pub fn check_namespace(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAMESPACE_CHARS
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a namespace: 1 to {MAX_NAMESPACE_CHARS} lowercase letters, digits \
             and `-`, not starting with `-`"
        ))
    }
}

/// The answer to [`ExecuteRequest`]: the run was accepted and will proceed in the background.
///
/// `202 Accepted` when this request started the run; `200 OK` with the header
/// [`IDEMPOTENT_REPLAYED_HEADER`]`: true` when an earlier request with the same
/// [`IDEMPOTENCY_KEY_HEADER`] had started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ExecuteResponse {
    pub workflow_id: Uuid,
}

/// The request header of `POST /api/workflows/execute` that makes repeating a submission safe:
/// every request with the same key answers the run the first one started.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// The response header, `true`, that marks an execute answer as the run an earlier request with
/// the same idempotency key started.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// The longest idempotency key accepted, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;

/// Why a string is not a token: 1 to a maximum number of visible ASCII characters, the rule of
/// the [`IDEMPOTENCY_KEY_HEADER`] and the [`ACTOR_HEADER`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("it is empty")]
    Empty,
    #[error("it is {chars} characters long, more than {max}")]
    TooLong { chars: usize, max: usize },
    #[error("character {position} is not visible ASCII (`!` to `~`, no spaces)")]
    NotVisibleAscii {
        /// 1-based.
        position: usize,
    },
}

/// Checks that `key` is an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_CHARS`] visible ASCII
/// characters. The server and the CLI share this rule so that the CLI refuses a key before it
/// sends anything.
pub fn check_idempotency_key(key: &str) -> Result<(), TokenError> {
    check_token(key, MAX_IDEMPOTENCY_KEY_CHARS)
}

/// The request header of the operator routes (cancel, pause, resume, retry, skip, complete) that
/// names who acts, as recorded in the run's history.
pub const ACTOR_HEADER: &str = "Flotilla-Actor";

/// The longest actor accepted, in characters.
pub const MAX_ACTOR_CHARS: usize = 200;

/// Checks that `actor` can be the [`ACTOR_HEADER`]: 1 to [`MAX_ACTOR_CHARS`] visible ASCII
/// characters. ASCII only, because the actor is written into an audit trail that people read:
/// invisible and direction-changing Unicode characters could make one actor pass for another.
pub fn check_actor(actor: &str) -> Result<(), TokenError> {
    check_token(actor, MAX_ACTOR_CHARS)
}

fn check_token(token: &str, max: usize) -> Result<(), TokenError> {
    if let Some(position) = token.chars().position(|c| !c.is_ascii_graphic()) {
        return Err(TokenError::NotVisibleAscii {
            position: position + 1,
        });
    }
    // Only ASCII is left, so bytes are characters.
    match token.len() {
        0 => Err(TokenError::Empty),
        chars if chars > max => Err(TokenError::TooLong { chars, max }),
        _ => Ok(()),
    }
}

/// What a submission did, as the server's backend reports it: the HTTP answer is an
/// [`ExecuteResponse`] whose status and headers say whether it was `replayed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    pub workflow_id: Uuid,
    /// True when an earlier submission with the same idempotency key had started the run, so
    /// this one started nothing.
    pub replayed: bool,
}

/// The OpenTelemetry trace id of a run: the run id itself, in 32 hex digits.
pub fn trace_id(workflow_id: Uuid) -> String {
    workflow_id.simple().to_string()
}

/// `GET /api/workflows/{id}`: a run and all its steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WorkflowResult {
    pub workflow_id: Uuid,
    /// The id of the run's trace (see [`trace_id`]), to look it up in a trace viewer; empty
    /// from a coordinator older than the field.
    #[serde(default)]
    pub trace_id: String,
    /// The definition's name.
    pub name: String,
    /// `running`, `paused` (by an operator: nothing new is dispatched), `failing` (a step failed
    /// and the failure handlers are running), `needs_attention` (a step escalated and waits for
    /// an operator; the others go on), `rolling_back` (the compensations of the steps that
    /// succeeded run, the latest first), `success`, `failure`, `cancelled` (by an operator),
    /// `rolled_back` or `rollback_failed` (`error` names the step that could not be undone).
    pub status: String,
    pub start_time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<DateTime<Utc>>,
    /// Milliseconds from start to end; set once the run has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    /// The effective run params: the definition's defaults overlaid with those submitted.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// The steps the submission selected with `only` (see [`ExecuteRequest::only`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<String>,
    /// The steps the submission left out with `skip`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<String>,
    /// Why the run failed when no step's failure says it, e.g. `workflow timed out after 5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub steps: Vec<StepResult>,
    pub metrics: Metrics,
    /// The run and step that started this run as a sub-workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRun>,
}

/// The step of another run that started a run as its sub-workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ParentRun {
    pub workflow_id: Uuid,
    pub step_id: String,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StepResult {
    pub step_id: String,
    pub agent: String,
    pub action: String,
    /// `pending`, `running`, `success`, `failure`, `skipped`, `cancelled` (the run was
    /// cancelled before the step ended) or `needs_attention` (it escalated).
    pub status: String,
    /// Attempts dispatched so far.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<DateTime<Utc>>,
    /// What the agent returned on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The last failure's message, or why the step was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the next attempt is due, while a failed attempt waits to be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The strike the step reached: 1 its own attempts and retries, 2 its `fallback`, 3 it
    /// escalated (status `needs_attention` until an operator retries, skips or completes it).
    #[serde(default = "first_strike")]
    pub strike: u8,
    /// Why a pending step waits with no attempt dispatched: `circuit open for agent X` while
    /// that agent's circuit breaker holds it, `limit reached for agent X` while the agent has a
    /// limit (`FLOTILLA_AGENT_LIMITS`) that holds it (or its breaker does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// For a sub-workflow step: the registered definition it runs (`agent` and `action` are
    /// empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// For a sub-workflow step: the run its latest attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_workflow_id: Option<Uuid>,
    /// Set while the step's attempt is queued and no healthy worker of its agent with the
    /// step's `labels` is registered: it waits for one to start (see `GET /api/agents`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting_for_worker: bool,
}

fn first_strike() -> u8 {
    1
}

/// Step counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    pub total_steps: usize,
    pub successful_steps: usize,
    pub failed_steps: usize,
    pub skipped_steps: usize,
}

/// A run as listed by `GET /api/workflows`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    pub workflow_id: Uuid,
    pub name: String,
    /// As in [`WorkflowResult::status`].
    pub status: String,
    pub start_time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<DateTime<Utc>>,
    /// Milliseconds, once the run has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
}

/// One page of runs, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RunPage {
    pub workflows: Vec<RunSummary>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The query string of `GET /api/workflows`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase")]
pub struct RunQuery {
    /// Only runs with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(schema_with = schemas::run_status))]
    pub status: Option<String>,
    /// Only runs of the definition with this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Only runs started at or after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Page size: 50 when unset, at most 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 500))]
    pub limit: Option<u32>,
    /// The `nextCursor` of the previous page (its pattern is what a cursor looks like, so that
    /// tools can make one; it is not a promise that the form will stay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        param(pattern = "^[0-9]{1,16}_[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
    )]
    pub cursor: Option<String>,
}

/// What an operator asks of a run. The routes build it from the request's path and body and
/// hand it to the server's backend; it is not itself sent over the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// Ends every unfinished step as `cancelled`, and the run too; later results are ignored.
    Cancel,
    /// Stops dispatching: results are still recorded, nothing new starts.
    Pause,
    /// Dispatches what became ready while the run was paused.
    Resume,
    /// Gives one failed step of a failed run (`step`), or every failed step (`None`), a new
    /// attempt, and the run runs again.
    Retry { step: Option<String> },
    /// Ends a step that has not ended (or the failed step of a failed run) as `skipped`; its
    /// dependents go on.
    Skip { step: String },
    /// As [`Operation::Skip`], but the step ends `success` with this output.
    Complete { step: String, output: Value },
    /// Runs the `compensate:` of every step of an ended run (`success`, `failure`, `cancelled`,
    /// or `rollback_failed` to go on) that succeeded and is not undone yet, the latest first.
    Rollback,
}

impl Operation {
    /// The action's name, as [`OperateResponse::action`] and [`RunEvent::action`] spell it.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Retry { .. } => "retry",
            Self::Skip { .. } => "skip",
            Self::Complete { .. } => "complete",
            Self::Rollback => "rollback",
        }
    }

    /// The step the operation is about, if it names one.
    pub fn step(&self) -> Option<&str> {
        match self {
            Self::Retry { step } => step.as_deref(),
            Self::Skip { step } | Self::Complete { step, .. } => Some(step),
            Self::Cancel | Self::Pause | Self::Resume | Self::Rollback => None,
        }
    }
}

/// The body of `POST /api/workflows/{id}/retry`, which may also be left out: without `step`,
/// every failed step is retried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryRequest {
    /// Only this failed step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// The body of `POST /api/workflows/{id}/steps/{step}/complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteRequest {
    /// The step's output, as if its agent had returned it: any JSON, `null` included. Required,
    /// so that a forgotten output is an error rather than a step that succeeded with nothing.
    pub output: Value,
}

/// The answer to an operator's request that was carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct OperateResponse {
    pub workflow_id: Uuid,
    /// As [`Operation::action`]: `cancel`, `pause`, `resume`, `retry`, `skip` or `complete`.
    pub action: String,
    /// The run's status once the action was applied, as in [`WorkflowResult::status`].
    pub status: String,
}

/// One entry of a run's history: something an operator did to it, who and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RunEvent {
    pub at: DateTime<Utc>,
    /// Who did it: the credential's name, and `as <`[`ACTOR_HEADER`]`>` when the request had
    /// one; with authentication off, the header (or `anonymous@<address>` without one).
    pub actor: String,
    /// As [`Operation::action`].
    pub action: String,
    /// The step it was about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    /// What else the action carried, e.g. `{"output": ...}` of a `complete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

/// `GET /api/workflows/{id}/events`: the run's history, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RunEventList {
    pub events: Vec<RunEvent>,
}

/// The query string of `GET /api/workflows/{id}/logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    /// Only this step's lines (an instance of a `for_each` step is `id[index]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Only this attempt's lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1))]
    pub attempt: Option<u32>,
    /// Only lines after this `seq` (the `nextAfter` of the previous answer); from the start
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Most lines answered: 1000 when unset, at most 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 10000))]
    pub limit: Option<u32>,
    /// Seconds (at most 30) to wait for a line when there is none yet and the run has not
    /// ended: how a client follows a log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(maximum = 30))]
    pub wait: Option<u32>,
}

/// One line of a step's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StepLogLine {
    /// Its place in the run's log, from 1.
    pub seq: u64,
    pub step_id: String,
    pub attempt: u32,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
    /// When the handler wrote it.
    pub at: DateTime<Utc>,
}

/// An attempt whose log went past the coordinator's `FLOTILLA_MAX_STEP_LOG_BYTES`: its later
/// lines were dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TruncatedLog {
    pub step_id: String,
    pub attempt: u32,
    /// The bytes of lines kept.
    pub bytes: u64,
}

/// `GET /api/workflows/{id}/logs`: lines of a run's step logs, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StepLogs {
    pub workflow_id: Uuid,
    pub lines: Vec<StepLogLine>,
    /// The `after` that asks for the lines that follow: the last line's `seq`, or the
    /// request's `after` when no line came.
    pub next_after: u64,
    /// Attempts (among those asked for) whose logs were cut at the cap.
    pub truncated: Vec<TruncatedLog>,
    /// Whether the run had ended when the lines were read. Lines sent by its last steps just
    /// before the end may still be on their way for a moment after.
    pub ended: bool,
}

/// `POST /api/definitions`: register a new revision of a definition. Exactly one of
/// `definition` and `yaml` must be given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterDefinitionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yaml: Option<String>,
}

/// A registered definition revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DefinitionSummary {
    pub name: String,
    /// The definition's own `version:` field, as its author wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// 1, 2, 3… per name: each registration of that name adds one.
    pub revision: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Top-level steps of the definition.
    pub steps: usize,
    /// A content hash of the definition, to tell whether two revisions differ.
    pub hash: String,
    pub created_at: DateTime<Utc>,
}

/// `GET /api/definitions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DefinitionList {
    pub definitions: Vec<DefinitionSummary>,
}

/// `GET /api/definitions/{name}`: one revision and its content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DefinitionDetail {
    #[serde(flatten)]
    pub summary: DefinitionSummary,
    /// The definition as stored (its canonical JSON).
    pub definition: Value,
}

/// `GET /api/definitions/{name}/versions`: every revision, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DefinitionVersions {
    pub name: String,
    pub versions: Vec<DefinitionSummary>,
}

/// The query string of `GET /api/definitions/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefinitionQuery {
    /// The definition's `version:` or a revision number; the latest revision when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The query string of `GET /api/dlq`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterQuery {
    /// Only dead letters not redriven yet (`true` when unset), or all of them (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<bool>,
    /// At most this many, newest first: 50 when unset, at most 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 500))]
    pub limit: Option<u32>,
}

/// A task RabbitMQ dead-lettered (delivered too often, or rejected by a worker). The step it
/// carried failed with `reason`; a redrive gives the step a new attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSummary {
    pub id: Uuid,
    /// The task's run, step, attempt and task id: absent when the body is not a readable task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<Uuid>,
    /// Why RabbitMQ dead-lettered it, e.g. the delivery limit.
    pub reason: String,
    /// How often RabbitMQ had delivered it, when the broker said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<u64>,
    pub created_at: DateTime<Utc>,
    /// When it was redriven; absent while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redriven_at: Option<DateTime<Utc>>,
    /// The message body: the task's JSON, or a string when the body is not JSON.
    pub body: Value,
}

/// `GET /api/agents/breakers`: each agent's circuit breaker, by agent name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BreakerList {
    pub breakers: Vec<BreakerSummary>,
}

/// One agent's circuit breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BreakerSummary {
    pub agent: String,
    /// `closed` (steps are dispatched), `open` (new steps are held) or `half_open` (one probe
    /// attempt is let through; its success closes the breaker, its failure opens it again).
    pub state: String,
    /// The share of failed attempts among those in the window (0 to 1).
    pub failure_rate: f64,
    /// Attempt outcomes in the window.
    pub window: usize,
    /// When the breaker last opened, while open or half-open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_at: Option<DateTime<Utc>>,
    /// When an open breaker lets its probe through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_probe_at: Option<DateTime<Utc>>,
    /// Steps held for the agent: by this breaker, or by the agent's limit when it has one
    /// (`FLOTILLA_AGENT_LIMITS`).
    pub held_steps: u64,
    /// The operator who last reset it, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_at: Option<DateTime<Utc>>,
}

/// `GET /api/dlq`: dead letters, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetterSummary>,
}

/// `POST /api/dlq/redrive`: give the steps of dead letters a new attempt. Exactly one of a
/// non-empty `ids` and `all: true` must be given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedriveRequest {
    /// These dead letters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<Uuid>,
    /// Every dead letter not redriven yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// What a redrive did with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RedriveOutcome {
    pub dead_letter: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    /// The step's new attempt, when it was retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Why the step was not retried (e.g. its run has ended); absent when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RedriveOutcome {
    /// Whether the step got a new attempt.
    pub fn retried(&self) -> bool {
        self.error.is_none()
    }
}

/// The answer to [`RedriveRequest`]: one outcome per dead letter named (in the order named), or
/// per dead letter found with `all`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RedriveResponse {
    pub redriven: Vec<RedriveOutcome>,
}

/// `GET /health` and `GET /health/ready` (when ready): the parts a process depends on, each
/// checked when asked. `GET /health/ready` answers 503 with an [`ErrorBody`] instead when a part
/// is failing; its `details` is this report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// `ok` when every check is, else `failing`.
    pub status: String,
    /// The version of the process that answered.
    pub version: String,
    pub checks: Vec<HealthCheck>,
}

/// One part of a [`HealthReport`], e.g. `postgres` or `rabbitmq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub name: String,
    /// `ok` or `failing`.
    pub status: String,
    /// What was found, e.g. why it is failing. Never holds credentials.
    pub message: String,
}

/// [`HealthReport::status`] and [`HealthCheck::status`] of a part that works.
pub const HEALTH_OK: &str = "ok";
/// [`HealthReport::status`] and [`HealthCheck::status`] of a part that does not.
pub const HEALTH_FAILING: &str = "failing";

impl HealthCheck {
    /// A check that passed.
    pub fn ok(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: HEALTH_OK.into(),
            message: message.into(),
        }
    }

    /// A check that failed, saying why.
    pub fn failing(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: HEALTH_FAILING.into(),
            message: message.into(),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == HEALTH_OK
    }
}

impl HealthReport {
    /// The report of `checks`: `ok` when all of them are.
    pub fn of(version: impl Into<String>, checks: Vec<HealthCheck>) -> Self {
        let status = if checks.iter().all(HealthCheck::is_ok) {
            HEALTH_OK
        } else {
            HEALTH_FAILING
        };
        Self {
            status: status.into(),
            version: version.into(),
            checks,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == HEALTH_OK
    }
}

/// The query string of `GET /api/health/audit`: the window over which attempts are weighed and
/// the targets, each the reference spec's when unset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase")]
pub struct HealthAuditQuery {
    /// How far back attempts count, e.g. `15m`, `1h` (see [`parse_range`]); `1h` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// The highest share of an agent's attempts that may fail (0 to 1); `0.001` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(exclusive_minimum = 0, maximum = 1))]
    pub max_error_rate: Option<f64>,
    /// The highest p95 of an agent's attempts' run time, in milliseconds; `500` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(exclusive_minimum = 0))]
    pub max_p95_ms: Option<f64>,
    /// The highest share of the Postgres pool in use (0 to 1); `0.8` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(exclusive_minimum = 0, maximum = 1))]
    pub max_pool_use: Option<f64>,
    /// The longest a lost worker's steps may wait before they run again, in seconds; `30`
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(exclusive_minimum = 0))]
    pub max_failover_secs: Option<f64>,
}

/// The targets an audit grades against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HealthTargets {
    pub max_error_rate: f64,
    pub max_p95_ms: f64,
    pub max_pool_use: f64,
    pub max_failover_secs: f64,
}

impl Default for HealthTargets {
    /// The reference spec's: error rate under 0.1 %, p95 step latency under 500 ms, pool use
    /// under 80 %, failover under 30 s.
    fn default() -> Self {
        Self {
            max_error_rate: 0.001,
            max_p95_ms: 500.0,
            max_pool_use: 0.8,
            max_failover_secs: 30.0,
        }
    }
}

impl HealthAuditQuery {
    /// The targets the query asks for over the defaults, or which one is out of range.
    pub fn targets(&self) -> Result<HealthTargets, String> {
        let base = HealthTargets::default();
        let pick = |given: Option<f64>, default: f64, name: &str, ratio: bool| match given {
            None => Ok(default),
            Some(v) if v.is_finite() && v > 0.0 && (!ratio || v <= 1.0) => Ok(v),
            Some(v) if ratio => Err(format!("{name} must be above 0 and at most 1, not {v}")),
            Some(v) => Err(format!("{name} must be above 0, not {v}")),
        };
        Ok(HealthTargets {
            max_error_rate: pick(
                self.max_error_rate,
                base.max_error_rate,
                "maxErrorRate",
                true,
            )?,
            max_p95_ms: pick(self.max_p95_ms, base.max_p95_ms, "maxP95Ms", false)?,
            max_pool_use: pick(self.max_pool_use, base.max_pool_use, "maxPoolUse", true)?,
            max_failover_secs: pick(
                self.max_failover_secs,
                base.max_failover_secs,
                "maxFailoverSecs",
                false,
            )?,
        })
    }
}

/// The answer of `GET /api/health/audit` (`flotilla doctor`): every check of the fleet, graded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HealthAudit {
    /// The worst grade of the checks: `pass`, `warn` or `fail`.
    pub status: String,
    /// The window attempts were weighed over, as asked (e.g. `1h`).
    pub window: String,
    pub targets: HealthTargets,
    pub checks: Vec<HealthAuditCheck>,
}

/// One graded check of a [`HealthAudit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HealthAuditCheck {
    /// `postgres`, `rabbitmq`, `coordinators`, `workers`, `agents` or `schedules`.
    pub area: String,
    /// What was checked, e.g. `queue build` or `error rate build`.
    pub name: String,
    /// `pass`, `warn` or `fail`.
    pub status: String,
    /// The number the grade rests on, when there is one (a rate as a share, a time in ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// What was found and why it earned its grade.
    pub message: String,
}

/// [`HealthAuditCheck::status`] of a check within its target.
pub const HEALTH_PASS: &str = "pass";
/// [`HealthAuditCheck::status`] of a check past its target, or of a part that degrades the fleet.
pub const HEALTH_WARN: &str = "warn";
/// [`HealthAuditCheck::status`] of a part that is broken.
pub const HEALTH_FAIL: &str = "fail";

impl HealthAudit {
    /// The audit of `checks`, graded by its worst check.
    pub fn of(window: String, targets: HealthTargets, checks: Vec<HealthAuditCheck>) -> Self {
        let worst = [HEALTH_FAIL, HEALTH_WARN]
            .into_iter()
            .find(|grade| checks.iter().any(|c| c.status == *grade))
            .unwrap_or(HEALTH_PASS);
        Self {
            status: worst.into(),
            window,
            targets,
            checks,
        }
    }

    /// The exit code of `flotilla doctor`: 0 pass, 1 warn, 2 fail.
    pub fn exit_code(&self) -> i32 {
        match self.status.as_str() {
            HEALTH_PASS => 0,
            HEALTH_WARN => 1,
            _ => 2,
        }
    }
}

/// The query string of `GET /api/metrics/summary`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct SummaryQuery {
    /// How far back to look, e.g. `30m`, `1h`, `7d` (see [`parse_range`]); `1h` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<String>,
}

/// The range of a summary when none is given.
pub const DEFAULT_SUMMARY_RANGE: &str = "1h";

/// The longest range a summary covers.
pub const MAX_SUMMARY_RANGE: std::time::Duration = std::time::Duration::from_secs(90 * 86_400);

/// Reads a summary range: a positive whole number followed by `s`, `m`, `h` or `d`, at most 90
/// days. The error says what was wrong.
pub fn parse_range(range: &str) -> Result<std::time::Duration, String> {
    let range = range.trim();
    let split = range
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(range.len());
    let (count, unit) = range.split_at(split);
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "range `{range}`: expected a number and a unit s, m, h or d (e.g. 1h)"
            ));
        }
    };
    let count: u64 = count.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
        format!("range `{range}`: expected a positive whole number before `{unit}`")
    })?;
    let duration = std::time::Duration::from_secs(count.saturating_mul(seconds));
    if duration > MAX_SUMMARY_RANGE {
        return Err(format!("range `{range}`: at most 90d"));
    }
    Ok(duration)
}

/// `GET /api/metrics/summary`: the attempts that ended over a range, read from Postgres, so
/// the same whichever coordinator answers and across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct MetricsSummary {
    /// The range asked for, as given (e.g. `1h`).
    pub range: String,
    /// Attempts that ended at or after this time are counted.
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Attempts that ended, over all agents.
    pub executions: u64,
    /// Those of them that succeeded.
    pub successes: u64,
    /// `successes / executions`; absent when nothing ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// By agent, in name order.
    pub agents: Vec<AgentSummary>,
}

/// One agent's attempts in a [`MetricsSummary`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentSummary {
    pub agent: String,
    pub executions: u64,
    pub successes: u64,
    pub success_rate: f64,
    /// Percentiles of the run time workers reported (start to finish), in milliseconds; absent
    /// when no attempt of the agent was reported by a worker (all ended by the coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// `GET /api/agents`: every agent with a registered worker or an attempt waiting for one, in
/// name order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentList {
    pub agents: Vec<AgentStatus>,
}

/// `GET /api/agents/{name}`: an agent's workers and what waits for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub name: String,
    /// `healthy` (a healthy worker serves it), `unhealthy` (workers are registered, none
    /// healthy) or `no_workers`; see [`AgentHealth`].
    pub health: String,
    /// Its registered workers, by id.
    pub workers: Vec<WorkerStatus>,
    /// Tasks ready in its RabbitMQ queue; absent when RabbitMQ could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u32>,
    /// Attempts dispatched to it that no worker has started yet.
    pub waiting_steps: u64,
    /// How long the oldest of them has waited, in milliseconds; absent when none waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_waiting_ms: Option<u64>,
}

/// A worker of the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub worker_id: String,
    /// `healthy`, or `unhealthy` once no heartbeat came for the coordinator's
    /// `FLOTILLA_WORKER_UNHEALTHY_AFTER_MS`.
    pub health: String,
    /// Every agent it serves.
    pub agents: Vec<String>,
    /// The actions it has a handler for; empty when it takes any.
    #[serde(default)]
    pub actions: Vec<String>,
    /// How many tasks it runs at once at most.
    pub concurrency: u32,
    /// Tasks it held at its last heartbeat.
    pub in_flight: u32,
    pub last_seen: DateTime<Utc>,
    /// What it told when it registered; absent when the registry knows it by its heartbeats
    /// only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub labels: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
}

/// `GET /api/agents/{name}/health`: whether some worker can start the agent's tasks now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentHealth {
    pub name: String,
    /// [`AGENT_HEALTHY`], [`AGENT_UNHEALTHY`] or [`AGENT_NO_WORKERS`].
    pub health: String,
    pub healthy_workers: u32,
    pub unhealthy_workers: u32,
    pub waiting_steps: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_waiting_ms: Option<u64>,
}

/// The buckets of [`AgentMetrics::series`]: the range cut into this many.
pub const METRICS_BUCKETS: u32 = 30;

/// `GET /api/agents/{name}/metrics`: the agent's attempts that ended over a range, read from
/// Postgres (the same on every coordinator), in total and over time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentMetrics {
    pub agent: String,
    /// The range asked for, as given (e.g. `1h`).
    pub range: String,
    /// Attempts that ended at or after this time are counted.
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Attempts that ended.
    pub executions: u64,
    /// Those of them that failed (timeouts and lost attempts too).
    pub errors: u64,
    /// `errors / executions`; absent when nothing ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Percentiles of the run time workers reported (start to finish), in milliseconds; absent
    /// when no worker reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// The width of each bucket of `series`, in milliseconds.
    pub bucket_ms: u64,
    /// The range in [`METRICS_BUCKETS`] buckets of `bucketMs`, oldest first, empty ones too.
    pub series: Vec<MetricsBucket>,
}

/// The attempts of an agent that ended within one bucket of [`AgentMetrics::series`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct MetricsBucket {
    /// When the bucket starts; it lasts `bucketMs`.
    pub start: DateTime<Utc>,
    pub executions: u64,
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// The data of a `runs` event of `GET /api/events`: runs changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RunsChanged {
    /// The runs whose status or steps changed; absent when they are too many to name, or when
    /// changes may have been missed (the first event of a stream, or after a reconnect of the
    /// coordinator's listener): read again whatever is shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<Uuid>>,
}

/// At least one healthy worker serves the agent.
pub const AGENT_HEALTHY: &str = "healthy";
/// Workers of the agent are registered, but none is healthy.
pub const AGENT_UNHEALTHY: &str = "unhealthy";
/// No worker of the agent is registered.
pub const AGENT_NO_WORKERS: &str = "no_workers";

/// The body of every error response, whatever the route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// A stable snake_case word for programs to match on, e.g. `invalid_yaml`, `not_found`.
    pub code: String,
    /// The full explanation for people, e.g. every problem found in a definition.
    pub message: String,
    /// Structured context, e.g. `{"line": 3, "column": 5}` or `{"problems": [...]}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// `POST /api/schedules`: run a registered definition on a cron schedule. A definition has at
/// most one schedule: posting another for the same definition replaces it (as registering a
/// definition with a `schedule:` does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleRequest {
    /// The registered definition's name; each tick runs its latest revision.
    pub definition: String,
    /// Five fields (minute hour day month weekday), or six with seconds first.
    pub cron: String,
    /// An IANA time zone such as `Europe/Paris`; UTC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Ticks missed while no coordinator ran: `skip` (default) or `catch_up_once`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<String>,
    /// A tick while the previous run still runs: `skip` (default) or `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<String>,
    /// Params of every run it starts, over the definition's defaults.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
}

/// A schedule. Its id is the name of the definition it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSummary {
    pub id: String,
    pub definition: String,
    pub cron: String,
    pub timezone: String,
    pub missed: String,
    pub overlap: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    /// The next tick.
    pub next_at: DateTime<Utc>,
    /// The run the last tick started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// `GET /api/schedules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleSummary>,
}

/// `GET /api/workflows/{id}/report`: what a run did, step by step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub workflow_id: Uuid,
    pub name: String,
    pub status: String,
    /// From the run's creation to its end (or now), in ms.
    pub duration_ms: u64,
    /// The summed run time of the steps over the time from the first start to the last end:
    /// 1.0 for a pipeline, up to the number of steps for a fan-out.
    pub parallelism: f64,
    /// The chain of steps that decided the run's length, first to last.
    pub critical_path: Vec<String>,
    pub steps: Vec<StepReport>,
}

/// One step of a [`RunReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub step_id: String,
    pub status: String,
    /// The steps of the plan this one waits for (for an instance of a `for_each` step, its
    /// step's): the edges of the run's graph.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Dispatch to start, summed over its attempts (a `for_each` step: its instances'), in ms.
    pub queue_wait_ms: u64,
    /// Start to finish, summed over its attempts, in ms; for a `for_each` step, from its first
    /// instance's start to its last one's end.
    pub run_ms: u64,
    pub attempts: Vec<AttemptReport>,
    /// Why it ended as it did (a failure's message, why it was skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What each strike did, in the order they happened (a retried step goes through them
    /// again); empty for a step that made no attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub strikes: Vec<StrikeReport>,
    /// For a `for_each` step: its instances by status (each instance is a step of the report,
    /// `<id>[<index>]`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub instances: std::collections::BTreeMap<String, usize>,
    /// For a step with `expect:`: what its attempts claimed and what was verified (a `for_each`
    /// step: its instances').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

/// The `expect:` of a [`StepReport`]: how many attempts claimed success, how many of those the
/// expectations verified, and why the others were not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// The step's expectations, as written.
    pub expect: Vec<String>,
    pub claimed: u32,
    pub verified: u32,
    /// The error of each attempt that claimed success but failed an expectation, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// One strike of a [`StepReport`]: 1 the step's own attempts, 2 its fallback's, 3 its
/// escalation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StrikeReport {
    pub strike: u8,
    /// Strikes 1 and 2: what the attempts called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Strikes 1 and 2: the attempts it made (their numbers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<u32>,
    /// Strikes 1 and 2: the errors of its failed attempts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Strikes 1 and 2: the status of its last attempt. Strike 3: `notified` or
    /// `notify_failed`, once the notification's result is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Strike 3: the channel told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Strike 3: what an operator did about it (retry, skip, complete), who and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<RunEvent>,
}

/// One attempt of a [`StepReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AttemptReport {
    pub attempt: u32,
    pub status: String,
    pub dispatched_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use chrono::TimeZone;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;

    #[test]
    fn health_report_is_ok_only_when_every_check_is() {
        let ok = HealthReport::of("1.0.0", vec![HealthCheck::ok("postgres", "answers")]);
        assert!(ok.is_ok());
        let failing = HealthReport::of(
            "1.0.0",
            vec![
                HealthCheck::ok("postgres", "answers"),
                HealthCheck::failing("rabbitmq", "connection refused"),
            ],
        );
        assert!(!failing.is_ok());
        round_trip(&failing);
        assert_eq!(
            serde_json::to_value(&failing).unwrap()["checks"][1],
            json!({"name": "rabbitmq", "status": "failing", "message": "connection refused"})
        );
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
        let text = serde_json::to_string(value).unwrap();
        let back: T = serde_json::from_str(&text).unwrap();
        assert_eq!(&back, value, "{text}");
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_750_000_000 + seconds, 0).unwrap()
    }

    fn finished_step() -> StepResult {
        StepResult {
            step_id: "scaffold".into(),
            agent: "agent6".into(),
            action: "scaffold_project".into(),
            status: "failure".into(),
            attempts: 3,
            start_time: Some(at(0)),
            end_time: Some(at(2)),
            output: Some(json!({"files": 12})),
            error: Some("template not found".into()),
            next_attempt_at: Some(at(5)),
            strike: 1,
            held: None,
            workflow: None,
            child_workflow_id: None,
            waiting_for_worker: false,
        }
    }

    fn full_result() -> WorkflowResult {
        WorkflowResult {
            workflow_id: Uuid::from_u128(7),
            trace_id: trace_id(Uuid::from_u128(7)),
            name: "Complete Project Build".into(),
            status: "failure".into(),
            start_time: at(0),
            end_time: Some(at(3)),
            duration: Some(3000),
            params: json!({"projectName": "my-app"})
                .as_object()
                .unwrap()
                .clone(),
            only: vec!["scaffold".into()],
            skip: Vec::new(),
            error: Some("workflow timed out after 5m".into()),
            steps: vec![finished_step()],
            metrics: Metrics {
                total_steps: 1,
                successful_steps: 0,
                failed_steps: 1,
                skipped_steps: 0,
            },
            parent: None,
        }
    }

    fn keys(value: &Value) -> BTreeSet<&str> {
        value
            .as_object()
            .expect("a JSON object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn workflow_result_uses_the_spec_keys() {
        let value = serde_json::to_value(full_result()).unwrap();
        assert_eq!(
            keys(&value),
            BTreeSet::from([
                "workflowId",
                "traceId",
                "name",
                "status",
                "startTime",
                "endTime",
                "duration",
                "params",
                "only",
                "error",
                "steps",
                "metrics",
            ])
        );
        assert_eq!(
            keys(&value["steps"][0]),
            BTreeSet::from([
                "stepId",
                "agent",
                "action",
                "status",
                "attempts",
                "startTime",
                "endTime",
                "output",
                "error",
                "nextAttemptAt",
                "strike",
            ])
        );
        assert_eq!(
            keys(&value["metrics"]),
            BTreeSet::from([
                "totalSteps",
                "successfulSteps",
                "failedSteps",
                "skippedSteps"
            ])
        );
        // The spec's `duration` is a number of milliseconds, and times are RFC 3339 strings.
        assert_eq!(value["duration"], json!(3000));
        assert_eq!(value["startTime"], json!("2025-06-15T15:06:40Z"));
    }

    #[test]
    fn unset_optional_fields_are_left_out() {
        let mut result = full_result();
        result.status = "running".into();
        result.end_time = None;
        result.duration = None;
        result.steps[0] = StepResult {
            start_time: None,
            end_time: None,
            output: None,
            error: None,
            next_attempt_at: None,
            strike: 1,
            held: None,
            ..finished_step()
        };
        let value = serde_json::to_value(&result).unwrap();
        assert!(value.get("endTime").is_none() && value.get("duration").is_none());
        assert_eq!(
            keys(&value["steps"][0]),
            BTreeSet::from(["stepId", "agent", "action", "status", "attempts", "strike"])
        );
        round_trip(&result);
    }

    #[test]
    fn responses_round_trip() {
        round_trip(&full_result());
        round_trip(&ExecuteResponse {
            workflow_id: Uuid::from_u128(1),
        });
        round_trip(&RunPage {
            workflows: vec![RunSummary {
                workflow_id: Uuid::from_u128(2),
                name: "n".into(),
                status: "success".into(),
                start_time: at(0),
                end_time: Some(at(1)),
                duration: Some(1000),
            }],
            next_cursor: Some("opaque".into()),
        });
        round_trip(&DefinitionList {
            definitions: vec![DefinitionSummary {
                name: "n".into(),
                version: Some("1.0.0".into()),
                revision: 2,
                description: None,
                steps: 4,
                hash: "abc".into(),
                created_at: at(0),
            }],
        });
        round_trip(&DeadLetterList {
            dead_letters: vec![dead_letter()],
        });
        round_trip(&ErrorBody {
            error: ErrorDetail {
                code: "invalid_yaml".into(),
                message: "YAML error at line 3, column 5: bad".into(),
                details: Some(json!({"line": 3, "column": 5})),
            },
        });
    }

    #[test]
    fn namespaces_are_dns_labels() {
        for good in ["default", "team-a", "a1", &"x".repeat(MAX_NAMESPACE_CHARS)] {
            assert_eq!(check_namespace(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            "Team",
            "a_b",
            "*",
            "a b",
            &"x".repeat(MAX_NAMESPACE_CHARS + 1),
        ] {
            let err = check_namespace(bad).unwrap_err();
            assert!(err.contains("is not a namespace"), "{bad}: {err}");
        }
    }

    #[test]
    fn requests_round_trip() {
        round_trip(&ExecuteRequest {
            yaml: Some("name: x".into()),
            params: json!({"n": 3}).as_object().unwrap().clone(),
            ..ExecuteRequest::default()
        });
        round_trip(&RegisterDefinitionRequest {
            definition: Some(json!({"name": "x", "steps": []})),
            yaml: None,
        });
        round_trip(&RunQuery {
            status: Some("running".into()),
            limit: Some(10),
            since: Some(Utc.with_ymd_and_hms(2026, 1, 31, 12, 0, 0).unwrap()),
            ..RunQuery::default()
        });
        round_trip(&DeadLetterQuery {
            pending: Some(false),
            limit: Some(10),
        });
        round_trip(&RedriveRequest {
            ids: vec![Uuid::from_u128(1), Uuid::from_u128(2)],
            all: false,
        });
    }

    fn dead_letter() -> DeadLetterSummary {
        DeadLetterSummary {
            id: Uuid::from_u128(9),
            workflow_id: Some(Uuid::from_u128(7)),
            step_id: Some("deploy".into()),
            attempt: Some(2),
            task_id: Some(Uuid::from_u128(8)),
            reason: "delivered 5 times".into(),
            deliveries: Some(5),
            created_at: at(0),
            redriven_at: Some(at(60)),
            body: json!({"run_id": Uuid::from_u128(7)}),
        }
    }

    #[test]
    fn dead_letters_use_camel_case_keys() {
        let value = serde_json::to_value(DeadLetterList {
            dead_letters: vec![dead_letter()],
        })
        .unwrap();
        assert_eq!(keys(&value), BTreeSet::from(["deadLetters"]));
        assert_eq!(
            keys(&value["deadLetters"][0]),
            BTreeSet::from([
                "id",
                "workflowId",
                "stepId",
                "attempt",
                "taskId",
                "reason",
                "deliveries",
                "createdAt",
                "redrivenAt",
                "body",
            ])
        );

        // A body that is not a task leaves only what RabbitMQ said.
        let unreadable = DeadLetterSummary {
            workflow_id: None,
            step_id: None,
            attempt: None,
            task_id: None,
            deliveries: None,
            redriven_at: None,
            body: json!("not json"),
            ..dead_letter()
        };
        let value = serde_json::to_value(&unreadable).unwrap();
        assert_eq!(
            keys(&value),
            BTreeSet::from(["id", "reason", "createdAt", "body"])
        );
        round_trip(&unreadable);
    }

    #[test]
    fn redrive_shapes() {
        let outcomes = RedriveResponse {
            redriven: vec![
                RedriveOutcome {
                    dead_letter: Uuid::from_u128(1),
                    workflow_id: Some(Uuid::from_u128(7)),
                    step_id: Some("deploy".into()),
                    attempt: Some(3),
                    error: None,
                },
                RedriveOutcome {
                    dead_letter: Uuid::from_u128(2),
                    workflow_id: None,
                    step_id: None,
                    attempt: None,
                    error: Some("the run has ended".into()),
                },
            ],
        };
        let value = serde_json::to_value(&outcomes).unwrap();
        assert_eq!(
            keys(&value["redriven"][0]),
            BTreeSet::from(["deadLetter", "workflowId", "stepId", "attempt"])
        );
        assert_eq!(
            keys(&value["redriven"][1]),
            BTreeSet::from(["deadLetter", "error"])
        );
        assert!(outcomes.redriven[0].retried() && !outcomes.redriven[1].retried());

        // What is not asked for is not sent.
        assert_eq!(
            serde_json::to_value(RedriveRequest {
                ids: Vec::new(),
                all: true
            })
            .unwrap(),
            json!({"all": true})
        );
        let read: RedriveRequest =
            serde_json::from_value(json!({"ids": [Uuid::from_u128(1)]})).unwrap();
        assert_eq!(
            read,
            RedriveRequest {
                ids: vec![Uuid::from_u128(1)],
                all: false
            }
        );
        let err = serde_json::from_value::<RedriveRequest>(json!({"every": true})).unwrap_err();
        assert!(err.to_string().contains("unknown field `every`"), "{err}");
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_of_bounded_length() {
        assert_eq!(check_idempotency_key("a"), Ok(()));
        assert_eq!(
            check_idempotency_key("0196c1f4-7e2a-7c3b-9d7e-1f2a3b4c5d6e"),
            Ok(())
        );
        assert_eq!(check_idempotency_key("!~{}\\\"=:"), Ok(()));
        let longest = "k".repeat(MAX_IDEMPOTENCY_KEY_CHARS);
        assert_eq!(check_idempotency_key(&longest), Ok(()));

        assert_eq!(check_idempotency_key(""), Err(TokenError::Empty));
        let err = check_idempotency_key(&format!("{longest}k")).unwrap_err();
        assert_eq!(
            err,
            TokenError::TooLong {
                chars: 201,
                max: 200
            }
        );
        assert_eq!(err.to_string(), "it is 201 characters long, more than 200");
        for (key, position) in [("a b", 2), ("\tab", 1), ("ab\n", 3), ("clé", 3)] {
            assert_eq!(
                check_idempotency_key(key),
                Err(TokenError::NotVisibleAscii { position }),
                "{key:?}"
            );
        }
    }

    #[test]
    fn actors_are_visible_ascii_of_bounded_length() {
        assert_eq!(check_actor("alice@build-box"), Ok(()));
        assert_eq!(check_actor("anonymous@[::1]"), Ok(()));
        assert_eq!(check_actor(&"a".repeat(MAX_ACTOR_CHARS)), Ok(()));

        assert_eq!(check_actor(""), Err(TokenError::Empty));
        assert_eq!(
            check_actor(&"a".repeat(MAX_ACTOR_CHARS + 1)),
            Err(TokenError::TooLong {
                chars: 201,
                max: MAX_ACTOR_CHARS
            })
        );
        // A space, a right-to-left override and a zero-width space would let a name pass for
        // another in the history.
        for (actor, position) in [("jane doe", 5), ("eve\u{202e}nimda", 4), ("bob\u{200b}", 4)] {
            assert_eq!(
                check_actor(actor),
                Err(TokenError::NotVisibleAscii { position }),
                "{actor:?}"
            );
        }
    }

    #[test]
    fn operations_name_their_action_and_step() {
        let step = || "deploy".to_string();
        let cases = [
            (Operation::Cancel, "cancel", None),
            (Operation::Pause, "pause", None),
            (Operation::Resume, "resume", None),
            (Operation::Retry { step: None }, "retry", None),
            (
                Operation::Retry { step: Some(step()) },
                "retry",
                Some("deploy"),
            ),
            (Operation::Skip { step: step() }, "skip", Some("deploy")),
            (
                Operation::Complete {
                    step: step(),
                    output: json!({"url": "https://x"}),
                },
                "complete",
                Some("deploy"),
            ),
        ];
        for (operation, action, step) in cases {
            assert_eq!(operation.action(), action, "{operation:?}");
            assert_eq!(operation.step(), step, "{operation:?}");
        }
    }

    fn event(step_id: Option<&str>, detail: Option<Value>) -> RunEvent {
        RunEvent {
            at: at(30),
            actor: "alice@build-box".into(),
            action: "complete".into(),
            step_id: step_id.map(Into::into),
            detail,
        }
    }

    #[test]
    fn operator_shapes_use_camel_case_keys() {
        let response = OperateResponse {
            workflow_id: Uuid::from_u128(7),
            action: "cancel".into(),
            status: "cancelled".into(),
        };
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            json!({"workflowId": Uuid::from_u128(7), "action": "cancel", "status": "cancelled"})
        );
        round_trip(&response);

        let list = RunEventList {
            events: vec![
                event(
                    Some("deploy"),
                    Some(json!({"output": {"url": "https://x"}})),
                ),
                event(None, None),
            ],
        };
        assert_eq!(
            serde_json::to_value(&list).unwrap(),
            json!({"events": [
                {
                    "at": "2025-06-15T15:07:10Z",
                    "actor": "alice@build-box",
                    "action": "complete",
                    "stepId": "deploy",
                    "detail": {"output": {"url": "https://x"}},
                },
                {"at": "2025-06-15T15:07:10Z", "actor": "alice@build-box", "action": "complete"},
            ]})
        );
        round_trip(&list);
    }

    #[test]
    fn operator_requests_read_strictly() {
        assert_eq!(
            serde_json::from_value::<RetryRequest>(json!({})).unwrap(),
            RetryRequest::default()
        );
        assert_eq!(
            serde_json::to_value(RetryRequest::default()).unwrap(),
            json!({})
        );
        round_trip(&RetryRequest {
            step: Some("deploy".into()),
        });
        let err = serde_json::from_value::<RetryRequest>(json!({"steps": ["a"]})).unwrap_err();
        assert!(err.to_string().contains("unknown field `steps`"), "{err}");

        round_trip(&CompleteRequest {
            output: json!({"rows": 3}),
        });
        // `null` is an output like any other; leaving the output out is a mistake.
        let read: CompleteRequest = serde_json::from_value(json!({"output": null})).unwrap();
        assert_eq!(read.output, Value::Null);
        let err = serde_json::from_value::<CompleteRequest>(json!({})).unwrap_err();
        assert!(err.to_string().contains("missing field `output`"), "{err}");
        let err = serde_json::from_value::<CompleteRequest>(json!({"output": 1, "status": "ok"}))
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `status`"), "{err}");
    }

    #[test]
    fn the_spec_example_request_reads() {
        let request: ExecuteRequest = serde_json::from_value(json!({
            "workflow": "build-project",
            "params": {"projectName": "my-app"}
        }))
        .unwrap();
        assert_eq!(request.workflow.as_deref(), Some("build-project"));
        assert_eq!(request.params["projectName"], json!("my-app"));
        assert!(request.definition.is_none() && request.yaml.is_none());
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let err = serde_json::from_value::<ExecuteRequest>(json!({
            "workflow": "build-project",
            "urgency": 2
        }))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `urgency`"), "{err}");
    }

    #[test]
    fn summary_ranges_are_a_count_and_a_unit() {
        assert_eq!(parse_range("1h"), Ok(std::time::Duration::from_secs(3_600)));
        assert_eq!(
            parse_range("30m"),
            Ok(std::time::Duration::from_secs(1_800))
        );
        assert_eq!(parse_range("45s"), Ok(std::time::Duration::from_secs(45)));
        assert_eq!(parse_range("90d"), Ok(MAX_SUMMARY_RANGE));
        for (bad, says) in [
            ("", "a unit"),
            ("1", "a unit"),
            ("1w", "a unit"),
            ("h", "positive whole number"),
            ("0h", "positive whole number"),
            ("-1h", "a unit"),
            ("91d", "at most 90d"),
            ("99999999999999999999h", "positive whole number"),
        ] {
            let error = parse_range(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn responses_accept_unknown_fields() {
        let mut value = serde_json::to_value(full_result()).unwrap();
        value["addedLater"] = json!(true);
        let read: WorkflowResult = serde_json::from_value(value).unwrap();
        assert_eq!(read, full_result());
    }
}
