//! The seam between the HTTP layer and the coordinator: what the API needs from storage and the
//! engine.

use std::future::Future;

use chrono::{DateTime, Utc};
use flotilla_api_model::{
    AgentStatus, AgentSummary, BreakerSummary, DeadLetterQuery, DeadLetterSummary,
    DefinitionDetail, DefinitionSummary, LogQuery, Operation, RedriveOutcome, RunEvent, RunPage,
    RunPriority, RunQuery, RunReport, RunsChanged, ScheduleSummary, StepLogs, Submitted,
    WorkflowResult,
};
use flotilla_api_model::{HealthAuditCheck, HealthTargets};
use flotilla_core::schedule::Schedule;
use flotilla_core::{Definition, Plan, Subset};
use futures_util::Stream;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::auth::Namespaces;

/// A validated run request.
#[derive(Debug, Clone)]
pub struct Submission {
    pub definition: Definition,
    /// `definition` compiled; it is known to be valid.
    pub plan: Plan,
    /// The effective run params: the definition's `params:` defaults overlaid, key by key, with
    /// those given in the request.
    pub params: Map<String, Value>,
    /// The steps to run or leave out; checked against `plan`.
    pub subset: Subset,
    /// The run's priority, when the request gives one (the plan's otherwise).
    pub priority: Option<RunPriority>,
    /// The request's `Idempotency-Key`, checked with
    /// [`check_idempotency_key`](flotilla_api_model::check_idempotency_key).
    pub idempotency_key: Option<String>,
    /// The namespace the run belongs to, one the credential may act in.
    pub namespace: String,
    /// [`LatestDefinition::hash`] when the request named a registered definition without a
    /// version: if another revision is the latest by the time the run is recorded, the backend
    /// answers [`BackendError::StaleDefinition`] and starts nothing.
    pub latest: Option<String>,
}

/// The latest revision of a registered definition.
#[derive(Debug, Clone)]
pub struct LatestDefinition {
    pub definition: Definition,
    /// The revision's content hash: what a [`Submission`] of it names.
    pub hash: String,
}

/// A validated schedule request.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    /// The namespace of the schedule and of its definition.
    pub namespace: String,
    /// The definition it runs; not checked to be registered.
    pub definition: String,
    pub schedule: Schedule,
    pub params: Map<String, Value>,
}

/// What the coordinator provides to the API.
///
/// Runs, named definitions and schedules belong to a namespace. A `namespaces` argument is what
/// the caller may see: a run, definition or schedule of another namespace is answered as if it
/// did not exist, and lists hold only those it may see. A `namespace` argument is the one the
/// caller acts in, already checked to be one it may.
///
/// Inputs arrive validated: definitions compile, a [`RunQuery`] has a known `status` (if any)
/// and a `limit` in `1..=`[`MAX_RUN_LIMIT`](crate::MAX_RUN_LIMIT), always set, and a
/// [`DeadLetterQuery`] has `pending` and a `limit` in
/// `1..=`[`MAX_DEAD_LETTER_LIMIT`](crate::MAX_DEAD_LETTER_LIMIT), always set.
pub trait Backend: Send + Sync + 'static {
    /// Records a new run and starts it; answers its id once the run is durable.
    ///
    /// With an idempotency key that an earlier submission already started a run under (within
    /// however long the backend keeps keys), starts nothing and answers that run with
    /// `replayed: true`. Concurrent submissions with one key start one run between them: the
    /// key exists for clients that resend a request whose answer they lost.
    fn submit(
        &self,
        submission: Submission,
    ) -> impl Future<Output = Result<Submitted, BackendError>> + Send;

    /// A run and its steps, or `None` if there is no run with that id.
    fn run(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<WorkflowResult>, BackendError>> + Send;

    /// What run `id` did, step by step, or `None` if there is no run with that id.
    fn report(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<RunReport>, BackendError>> + Send;

    /// The lines of run `id`'s step logs that `query` asks for, in order, at most `query.limit`
    /// (always set, with `query.after`; `query.wait` is the API's), or `None` if there is no
    /// run with that id. Answers [`BackendError::NotFound`] when the run has no step
    /// `query.step`.
    fn logs(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
        query: LogQuery,
    ) -> impl Future<Output = Result<Option<StepLogs>, BackendError>> + Send;

    /// One page of runs, newest first. `query.cursor` is the opaque `next_cursor` of an earlier
    /// page, passed through unchecked: answer [`BackendError::Invalid`] if it cannot be read.
    fn runs(
        &self,
        namespaces: &Namespaces,
        query: RunQuery,
    ) -> impl Future<Output = Result<RunPage, BackendError>> + Send;

    /// Stores a new revision of a definition under its name in `namespace`.
    fn register_definition(
        &self,
        namespace: &str,
        definition: Definition,
    ) -> impl Future<Output = Result<DefinitionSummary, BackendError>> + Send;

    /// The latest revision of every registered definition.
    fn definitions(
        &self,
        namespaces: &Namespaces,
    ) -> impl Future<Output = Result<Vec<DefinitionSummary>, BackendError>> + Send;

    /// The latest registered definition of that name. It may come from a cache that lags
    /// behind registrations elsewhere: a submission of it names its hash, and is refused with
    /// [`BackendError::StaleDefinition`] if it is not the latest any more.
    fn definition(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<LatestDefinition>, BackendError>> + Send;

    /// Every revision of definition `name`, oldest first; empty when the name is not registered.
    fn definition_versions(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Vec<DefinitionSummary>, BackendError>> + Send;

    /// One revision of definition `name` with its content: the latest, or with `version` the
    /// latest whose `version:` it is, or else the revision it numbers. `None` when there is none.
    fn definition_detail(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> impl Future<Output = Result<Option<DefinitionDetail>, BackendError>> + Send;

    /// Dead-lettered tasks, newest first: those not redriven yet, or all of them when
    /// `query.pending` is `Some(false)`.
    fn dead_letters(
        &self,
        query: DeadLetterQuery,
    ) -> impl Future<Output = Result<Vec<DeadLetterSummary>, BackendError>> + Send;

    /// Gives the steps of these dead letters (distinct ids; every dead letter not redriven yet
    /// when `ids` is empty) a new attempt, and marks those retried as redriven.
    ///
    /// Answers an outcome per dead letter it handled; `error` says why one was not retried. It
    /// may leave out named ids it has no pending dead letter for: the API answers those as not
    /// retried.
    fn redrive(
        &self,
        ids: Vec<Uuid>,
    ) -> impl Future<Output = Result<Vec<RedriveOutcome>, BackendError>> + Send;

    /// Applies an operator's action to run `id` and records it in the run's history with
    /// `actor`; answers the run's status once the action is applied (`cancelled`, `paused`,
    /// `running`…).
    ///
    /// `actor` is the authenticated credential's name, followed by `as <Flotilla-Actor header>`
    /// when the request has one (who the client says it acts for). With authentication off, the
    /// header alone, or without one `anonymous@<the peer's IP>` (`anonymous` when the server does
    /// not know the peer).
    ///
    /// Answers [`BackendError::NotFound`] when there is no such run, or the run has no step the
    /// operation names, and [`BackendError::Conflict`] with the reason when the run's state does
    /// not allow the action (e.g. retrying a run that has not failed).
    fn operate(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
        operation: Operation,
        actor: String,
    ) -> impl Future<Output = Result<String, BackendError>> + Send;

    /// The history of run `id`, oldest first, or `None` if there is no run with that id.
    fn events(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Vec<RunEvent>>, BackendError>> + Send;

    /// Audits the fleet (`GET /api/health/audit`): Postgres, RabbitMQ, coordinators, workers,
    /// agents and schedules, each check graded against `targets`, with the attempts that ended
    /// at or after `since` weighed for the agents' error rates and latencies.
    fn health_audit(
        &self,
        since: DateTime<Utc>,
        targets: HealthTargets,
    ) -> impl Future<Output = Result<Vec<HealthAuditCheck>, BackendError>> + Send;

    /// The attempts that ended at or after `since`, by agent in name order (agents with none
    /// left out).
    fn attempts_since(
        &self,
        since: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<AgentSummary>, BackendError>> + Send;

    /// The attempts of `agent` that ended in `since..until`: in total, and per bucket of
    /// `bucket` by its number from `since` (0, 1…; buckets without any may be left out).
    fn agent_attempts(
        &self,
        agent: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        bucket: std::time::Duration,
    ) -> impl Future<Output = Result<(AttemptFigures, Vec<(u64, AttemptFigures)>), BackendError>> + Send;

    /// The changes of runs in `namespaces` from now on, as their transactions commit, whoever
    /// made them (this coordinator or another); `runs: None` when they cannot be named (too
    /// many, or some may have been missed). A change that names only other namespaces' runs is
    /// not told. The stream ends when the server shuts down.
    fn changes(&self, namespaces: Namespaces)
    -> impl Stream<Item = RunsChanged> + Send + use<Self>;

    /// Every agent with a registered worker (healthy or not) or an attempt waiting for a worker,
    /// in name order; only `agent`, when given (then empty when nothing is known of it).
    fn agents(
        &self,
        agent: Option<&str>,
    ) -> impl Future<Output = Result<Vec<AgentStatus>, BackendError>> + Send;

    /// Schedules the definition (replacing its schedule, if it had one). Answers
    /// [`BackendError::NotFound`] when no definition of that name is registered, and
    /// [`BackendError::Invalid`] when the schedule never fires.
    fn put_schedule(
        &self,
        schedule: NewSchedule,
    ) -> impl Future<Output = Result<ScheduleSummary, BackendError>> + Send;

    /// Every schedule, by definition name.
    fn schedules(
        &self,
        namespaces: &Namespaces,
    ) -> impl Future<Output = Result<Vec<ScheduleSummary>, BackendError>> + Send;

    /// The schedule with id `id` (the name of its definition), if there is one.
    fn schedule(
        &self,
        namespace: &str,
        id: &str,
    ) -> impl Future<Output = Result<Option<ScheduleSummary>, BackendError>> + Send;

    /// Removes the schedule `id`; answers whether there was one.
    fn delete_schedule(
        &self,
        namespace: &str,
        id: &str,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Every agent's circuit breaker, by agent name (agents never called have none).
    fn breakers(&self) -> impl Future<Output = Result<Vec<BreakerSummary>, BackendError>> + Send;

    /// Closes `agent`'s circuit breaker by an operator's hand (`actor`, as in
    /// [`Backend::operate`]): its window is cleared and the steps it held are dispatched.
    /// Answers the breaker after the reset, or `None` when the agent has no breaker.
    fn reset_breaker(
        &self,
        agent: &str,
        actor: String,
    ) -> impl Future<Output = Result<Option<BreakerSummary>, BackendError>> + Send;
}

/// An agent's attempts that ended in a span of time (see [`Backend::agent_attempts`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttemptFigures {
    pub executions: u64,
    /// Failed attempts (timeouts and lost attempts too).
    pub errors: u64,
    /// p50, p95 and p99 of the run time workers reported, in milliseconds; `None` when no
    /// worker reported one.
    pub run_time_ms: Option<[f64; 3]>,
}

/// Why a [`Backend`] call failed. The variant decides the HTTP status.
///
/// The messages of `Invalid`, `NotFound`, `Conflict` and `Unavailable` are sent to the client, so
/// they must not contain credentials (say "Postgres is unreachable", not the connection URL). The
/// message of `Internal` is only logged.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request cannot be served as asked (e.g. an unreadable cursor): 400.
    #[error("{0}")]
    Invalid(String),
    /// The definition names what the store does not hold (a sub-workflow that is not
    /// registered): 400 `invalid_definition`, every problem named.
    #[error(transparent)]
    Definition(#[from] flotilla_core::PlanError),
    /// Something the request names does not exist: 404.
    #[error("{0}")]
    NotFound(String),
    /// The request is understood but the current state does not allow it (an operator's action
    /// the run's state refuses); the message is the reason: 409.
    #[error("{0}")]
    Conflict(String),
    /// The request would take a namespace past one of its quotas: 429 with `Retry-After`.
    #[error("{}", .0.message)]
    QuotaExceeded(QuotaExceeded),
    /// A submission of the latest revision of a definition ([`Submission::latest`]) of which
    /// another revision is the latest now; the route reads it again and submits again, and
    /// answers 409 if that keeps happening.
    #[error("{0}")]
    StaleDefinition(String),
    /// A service the backend depends on (Postgres, RabbitMQ) cannot be reached; retrying later
    /// may succeed: 503.
    #[error("{0}")]
    Unavailable(String),
    /// A fault in the coordinator itself: 500.
    #[error("{0}")]
    Internal(String),
}

/// A namespace's quota that a request would go past.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaExceeded {
    pub namespace: String,
    /// The quota's name: `runsInFlight`, `stepsPerRun` or `requestsPerSecond`.
    pub quota: &'static str,
    pub limit: Value,
    /// Says what is over the quota.
    pub message: String,
    /// When trying again may succeed.
    pub retry_after: std::time::Duration,
}
