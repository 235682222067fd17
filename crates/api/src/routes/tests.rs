//! The routes against an in-memory stand-in for the coordinator.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::{Body, to_bytes};
use axum::http::{HeaderValue, Request, header};
use chrono::{TimeZone, Utc};
use flotilla_api_model::{
    AgentStatus, AgentSummary, DeadLetterSummary, ErrorBody, Metrics, RunEvent, StepLogLine,
    StepResult, WorkerStatus,
};
use serde_json::{Map, json};
use tower::ServiceExt;

use super::*;
use crate::{AttemptFigures, BackendError, LatestDefinition, Namespaces};

const SEED: &str = "\
name: build
params:
  env: staging
  retries: 1
steps:
  - id: scaffold
    agent: agent6
    action: scaffold_project
  - id: deploy
    agent: agent19
    action: deploy
";

const CYCLE: &str = "\
name: loop
steps:
  - id: a
    agent: x
    action: y
    depends_on: [b]
  - id: b
    agent: x
    action: y
    depends_on: [a]
";

/// Stands in for the coordinator: keeps everything in memory and records what it was asked.
#[derive(Default)]
pub(crate) struct FakeBackend {
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    /// Submissions that started a run; run `n` (from 1) has the id `Uuid::from_u128(n)`.
    submissions: Vec<Submission>,
    /// Idempotency key → the run it started.
    keys: HashMap<String, Uuid>,
    runs: Vec<WorkflowResult>,
    run_queries: Vec<RunQuery>,
    definitions: Vec<(Definition, DefinitionSummary)>,
    /// Oldest first. A redrive retries those not redriven yet, except for the step `ended`,
    /// whose run is taken to have ended.
    dead_letters: Vec<DeadLetterSummary>,
    dead_letter_queries: Vec<DeadLetterQuery>,
    redrives: Vec<Vec<Uuid>>,
    /// Every operator action asked for, done or not: the run, the action and the actor.
    operations: Vec<(Uuid, Operation, String)>,
    /// The operator actions done, by run, oldest first.
    history: HashMap<Uuid, Vec<RunEvent>>,
    /// The summary answered for any range, and the start of each range asked for.
    attempts: Vec<AgentSummary>,
    summaries_since: Vec<chrono::DateTime<Utc>>,
    audit_checks: Vec<flotilla_api_model::HealthAuditCheck>,
    audits: Vec<(chrono::DateTime<Utc>, flotilla_api_model::HealthTargets)>,
    schedules: Vec<ScheduleSummary>,
    breakers: Vec<BreakerSummary>,
    /// What `agent_attempts` answers, and each call: the agent, since, until and bucket.
    figures: (AttemptFigures, Vec<(u64, AttemptFigures)>),
    figure_queries: Vec<(
        String,
        chrono::DateTime<Utc>,
        chrono::DateTime<Utc>,
        std::time::Duration,
    )>,
    /// What the stream of changes yields before it ends.
    changes: Vec<RunsChanged>,
    /// The agents answered, in name order.
    agents: Vec<AgentStatus>,
    /// The lines of every run's logs, by run, in order.
    logs: HashMap<Uuid, Vec<StepLogLine>>,
    /// The log queries the backend was asked.
    log_queries: Vec<LogQuery>,
    /// Answered by the next call instead of doing anything.
    next_failure: Option<BackendError>,
    /// Registered, one each, as the next submissions are recorded: the race of another
    /// client's registration with a submission.
    racing_registrations: Vec<Definition>,
}

impl FakeBackend {
    fn with_run(run: WorkflowResult) -> Self {
        let backend = Self::default();
        backend.state().runs.push(run);
        backend
    }

    fn with_dead_letters(dead_letters: Vec<DeadLetterSummary>) -> Self {
        let backend = Self::default();
        backend.state().dead_letters = dead_letters;
        backend
    }

    fn failing_with(err: BackendError) -> Self {
        let backend = Self::default();
        backend.state().next_failure = Some(err);
        backend
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .expect("no test thread panicked holding the lock")
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, FakeState>, BackendError> {
        let mut state = self.state();
        match state.next_failure.take() {
            Some(err) => Err(err),
            None => Ok(state),
        }
    }
}

impl FakeState {
    fn register(&mut self, definition: Definition) -> DefinitionSummary {
        let revision = self
            .definitions
            .iter()
            .filter(|(d, _)| d.name == definition.name)
            .count() as i64
            + 1;
        let summary = DefinitionSummary {
            name: definition.name.clone(),
            version: definition.version.clone(),
            revision,
            description: definition.description.clone(),
            steps: definition.steps.len(),
            hash: format!("hash-{revision}"),
            created_at: Utc.timestamp_opt(1_750_000_000, 0).unwrap(),
        };
        self.definitions.push((definition, summary.clone()));
        summary
    }

    fn latest(&self, name: &str) -> Option<&(Definition, DefinitionSummary)> {
        self.definitions.iter().rev().find(|(d, _)| d.name == name)
    }
}

impl Backend for FakeBackend {
    async fn submit(&self, submission: Submission) -> Result<Submitted, BackendError> {
        let mut state = self.check()?;
        if !state.racing_registrations.is_empty() {
            let racing = state.racing_registrations.remove(0);
            state.register(racing);
        }
        if let Some(hash) = &submission.latest {
            let name = &submission.definition.name;
            if state.latest(name).map(|(_, s)| &s.hash) != Some(hash) {
                return Err(BackendError::StaleDefinition(format!(
                    "`{name}` was registered anew"
                )));
            }
        }
        if let Some(&workflow_id) = submission
            .idempotency_key
            .as_ref()
            .and_then(|key| state.keys.get(key))
        {
            return Ok(Submitted {
                workflow_id,
                replayed: true,
            });
        }
        let key = submission.idempotency_key.clone();
        state.submissions.push(submission);
        let workflow_id = Uuid::from_u128(state.submissions.len() as u128);
        if let Some(key) = key {
            state.keys.insert(key, workflow_id);
        }
        Ok(Submitted {
            workflow_id,
            replayed: false,
        })
    }

    async fn run(
        &self,
        _namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<WorkflowResult>, BackendError> {
        let state = self.check()?;
        Ok(state.runs.iter().find(|r| r.workflow_id == id).cloned())
    }

    async fn runs(
        &self,
        _namespaces: &Namespaces,
        query: RunQuery,
    ) -> Result<RunPage, BackendError> {
        let mut state = self.check()?;
        state.run_queries.push(query);
        Ok(RunPage {
            workflows: Vec::new(),
            next_cursor: None,
        })
    }

    async fn register_definition(
        &self,
        _namespace: &str,
        definition: Definition,
    ) -> Result<DefinitionSummary, BackendError> {
        Ok(self.check()?.register(definition))
    }

    async fn definitions(
        &self,
        _namespaces: &Namespaces,
    ) -> Result<Vec<DefinitionSummary>, BackendError> {
        let state = self.check()?;
        Ok(state.definitions.iter().map(|(_, s)| s.clone()).collect())
    }

    async fn definition(
        &self,
        _namespace: &str,
        name: &str,
    ) -> Result<Option<LatestDefinition>, BackendError> {
        let state = self.check()?;
        Ok(state.latest(name).map(|(d, s)| LatestDefinition {
            definition: d.clone(),
            hash: s.hash.clone(),
        }))
    }

    async fn definition_versions(
        &self,
        _namespace: &str,
        name: &str,
    ) -> Result<Vec<DefinitionSummary>, BackendError> {
        let state = self.check()?;
        Ok(state
            .definitions
            .iter()
            .filter(|(d, _)| d.name == name)
            .map(|(_, s)| s.clone())
            .collect())
    }

    async fn definition_detail(
        &self,
        _namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<DefinitionDetail>, BackendError> {
        let state = self.check()?;
        Ok(state
            .definitions
            .iter()
            .rev()
            .filter(|(d, _)| d.name == name)
            .find(|(d, s)| {
                version
                    .is_none_or(|v| d.version.as_deref() == Some(v) || s.revision.to_string() == v)
            })
            .map(|(d, s)| DefinitionDetail {
                summary: s.clone(),
                definition: serde_json::to_value(d).unwrap(),
            }))
    }

    async fn dead_letters(
        &self,
        query: DeadLetterQuery,
    ) -> Result<Vec<DeadLetterSummary>, BackendError> {
        let mut state = self.check()?;
        state.dead_letter_queries.push(query);
        Ok(state.dead_letters.iter().rev().cloned().collect())
    }

    async fn redrive(&self, ids: Vec<Uuid>) -> Result<Vec<RedriveOutcome>, BackendError> {
        let mut state = self.check()?;
        state.redrives.push(ids.clone());
        let outcomes = state
            .dead_letters
            .iter()
            .filter(|d| d.redriven_at.is_none() && (ids.is_empty() || ids.contains(&d.id)))
            .map(|d| {
                let ended = d.step_id.as_deref() == Some("ended");
                RedriveOutcome {
                    dead_letter: d.id,
                    workflow_id: d.workflow_id,
                    step_id: d.step_id.clone(),
                    attempt: (!ended).then(|| d.attempt.unwrap_or(0) + 1),
                    error: ended.then(|| "the run has ended".into()),
                }
            })
            .collect();
        Ok(outcomes)
    }

    /// A small model of the scheduler's rules: enough to answer each route's outcomes.
    async fn operate(
        &self,
        _namespaces: &Namespaces,
        id: Uuid,
        operation: Operation,
        actor: String,
    ) -> Result<String, BackendError> {
        let mut state = self.check()?;
        state
            .operations
            .push((id, operation.clone(), actor.clone()));
        let run = state
            .runs
            .iter_mut()
            .find(|r| r.workflow_id == id)
            .ok_or_else(|| BackendError::NotFound(format!("no run has id {id}")))?;
        if let Some(step) = operation.step()
            && !run.steps.iter().any(|s| s.step_id == step)
        {
            return Err(BackendError::NotFound(format!(
                "run {id} has no step `{step}`"
            )));
        }
        let refused = |reason: &str| Err(BackendError::Conflict(reason.to_string()));
        let status = match (&operation, run.status.as_str()) {
            (Operation::Rollback, "success" | "failure") => "rolling_back",
            (Operation::Rollback, _) => return refused("only an ended run can be rolled back"),
            (_, "success" | "cancelled") => return refused("the run has ended"),
            (Operation::Retry { .. } | Operation::Skip { .. }, "failure") => "running",
            (_, "failure") => return refused("the run has ended"),
            (Operation::Retry { .. }, _) => return refused("only a failed run can be retried"),
            (Operation::Cancel, _) => "cancelled",
            (Operation::Pause, "paused") => return refused("the run is paused already"),
            (Operation::Pause, _) => "paused",
            (Operation::Resume, "paused") => "running",
            (Operation::Resume, _) => return refused("the run is not paused"),
            (Operation::Skip { .. } | Operation::Complete { .. }, current) => current,
        }
        .to_string();
        run.status = status.clone();
        let event = RunEvent {
            at: Utc.timestamp_opt(1_750_000_060, 0).unwrap(),
            actor,
            action: operation.action().to_string(),
            step_id: operation.step().map(str::to_string),
            detail: match operation {
                Operation::Complete { output, .. } => Some(json!({ "output": output })),
                _ => None,
            },
        };
        state.history.entry(id).or_default().push(event);
        Ok(status)
    }

    async fn logs(
        &self,
        _namespaces: &Namespaces,
        id: Uuid,
        query: LogQuery,
    ) -> Result<Option<StepLogs>, BackendError> {
        let mut state = self.check()?;
        let Some(run) = state.runs.iter().find(|r| r.workflow_id == id) else {
            return Ok(None);
        };
        if let Some(step) = &query.step
            && !run.steps.iter().any(|s| &s.step_id == step)
        {
            return Err(BackendError::NotFound(format!(
                "run {id} has no step `{step}`"
            )));
        }
        let ended = matches!(run.status.as_str(), "success" | "failure" | "cancelled");
        let after = query.after.unwrap_or(0);
        let lines: Vec<StepLogLine> = state
            .logs
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|l| l.seq > after)
            .filter(|l| query.step.as_ref().is_none_or(|s| &l.step_id == s))
            .filter(|l| query.attempt.is_none_or(|a| l.attempt == a))
            .take(query.limit.unwrap_or(u32::MAX) as usize)
            .cloned()
            .collect();
        state.log_queries.push(query);
        Ok(Some(StepLogs {
            workflow_id: id,
            next_after: lines.last().map_or(after, |l| l.seq),
            lines,
            truncated: Vec::new(),
            ended,
        }))
    }

    async fn events(
        &self,
        _namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<Vec<RunEvent>>, BackendError> {
        let state = self.check()?;
        if !state.runs.iter().any(|r| r.workflow_id == id) {
            return Ok(None);
        }
        Ok(Some(state.history.get(&id).cloned().unwrap_or_default()))
    }

    async fn agents(&self, agent: Option<&str>) -> Result<Vec<AgentStatus>, BackendError> {
        let state = self.check()?;
        Ok(state
            .agents
            .iter()
            .filter(|a| agent.is_none_or(|name| a.name == name))
            .cloned()
            .collect())
    }

    async fn agent_attempts(
        &self,
        agent: &str,
        since: chrono::DateTime<Utc>,
        until: chrono::DateTime<Utc>,
        bucket: std::time::Duration,
    ) -> Result<(AttemptFigures, Vec<(u64, AttemptFigures)>), BackendError> {
        let mut state = self.check()?;
        state
            .figure_queries
            .push((agent.to_owned(), since, until, bucket));
        Ok(state.figures.clone())
    }

    fn changes(
        &self,
        _namespaces: Namespaces,
    ) -> impl futures_util::Stream<Item = RunsChanged> + Send + use<> {
        futures_util::stream::iter(self.state().changes.clone())
    }

    async fn health_audit(
        &self,
        since: chrono::DateTime<Utc>,
        targets: flotilla_api_model::HealthTargets,
    ) -> Result<Vec<flotilla_api_model::HealthAuditCheck>, BackendError> {
        let mut state = self.check()?;
        state.audits.push((since, targets));
        Ok(state.audit_checks.clone())
    }

    async fn attempts_since(
        &self,
        since: chrono::DateTime<Utc>,
    ) -> Result<Vec<AgentSummary>, BackendError> {
        let mut state = self.check()?;
        state.summaries_since.push(since);
        Ok(state.attempts.clone())
    }

    /// A report of the run as its steps stand, without attempts.
    async fn report(
        &self,
        _namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<RunReport>, BackendError> {
        let state = self.check()?;
        Ok(state
            .runs
            .iter()
            .find(|r| r.workflow_id == id)
            .map(|r| RunReport {
                workflow_id: r.workflow_id,
                name: r.name.clone(),
                status: r.status.clone(),
                duration_ms: r.duration.unwrap_or(0),
                parallelism: 1.0,
                critical_path: Vec::new(),
                steps: Vec::new(),
            }))
    }

    async fn put_schedule(&self, new: NewSchedule) -> Result<ScheduleSummary, BackendError> {
        let mut state = self.check()?;
        if !state
            .definitions
            .iter()
            .any(|(d, _)| d.name == new.definition)
        {
            return Err(BackendError::NotFound(format!(
                "no workflow definition named `{}` is registered",
                new.definition
            )));
        }
        let at = Utc.timestamp_opt(1_750_000_000, 0).unwrap();
        let summary = ScheduleSummary {
            id: new.definition.clone(),
            definition: new.definition,
            cron: new.schedule.cron.clone(),
            timezone: new.schedule.timezone.clone(),
            missed: serde_json::to_value(new.schedule.missed)
                .unwrap()
                .as_str()
                .unwrap()
                .into(),
            overlap: serde_json::to_value(new.schedule.overlap)
                .unwrap()
                .as_str()
                .unwrap()
                .into(),
            params: new.params,
            next_at: new.schedule.next_after(at).unwrap(),
            last_run_id: None,
            created_at: at,
        };
        state.schedules.retain(|s| s.id != summary.id);
        state.schedules.push(summary.clone());
        Ok(summary)
    }

    async fn schedules(
        &self,
        _namespaces: &Namespaces,
    ) -> Result<Vec<ScheduleSummary>, BackendError> {
        Ok(self.check()?.schedules.clone())
    }

    async fn schedule(
        &self,
        _namespace: &str,
        id: &str,
    ) -> Result<Option<ScheduleSummary>, BackendError> {
        Ok(self.check()?.schedules.iter().find(|s| s.id == id).cloned())
    }

    async fn delete_schedule(&self, _namespace: &str, id: &str) -> Result<bool, BackendError> {
        let mut state = self.check()?;
        let before = state.schedules.len();
        state.schedules.retain(|s| s.id != id);
        Ok(state.schedules.len() < before)
    }

    async fn breakers(&self) -> Result<Vec<BreakerSummary>, BackendError> {
        Ok(self.check()?.breakers.clone())
    }

    async fn reset_breaker(
        &self,
        agent: &str,
        actor: String,
    ) -> Result<Option<BreakerSummary>, BackendError> {
        let mut state = self.check()?;
        let Some(b) = state.breakers.iter_mut().find(|b| b.agent == agent) else {
            return Ok(None);
        };
        *b = BreakerSummary {
            agent: b.agent.clone(),
            state: "closed".into(),
            failure_rate: 0.0,
            window: 0,
            opened_at: None,
            next_probe_at: None,
            held_steps: b.held_steps,
            reset_by: Some(actor),
            reset_at: Some(Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()),
        };
        Ok(Some(b.clone()))
    }
}

struct Api {
    backend: Arc<FakeBackend>,
    router: Router,
}

impl Api {
    fn new(backend: FakeBackend) -> Self {
        Self::with_limits(backend, Limits::default())
    }

    fn with_limits(backend: FakeBackend, limits: Limits) -> Self {
        let backend = Arc::new(backend);
        let router = router(Arc::clone(&backend), limits);
        Self { backend, router }
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, headers, body)
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        let (status, _, body) = self.post_with_headers(uri, body, []).await;
        (status, body)
    }

    async fn post_with_headers<const N: usize>(
        &self,
        uri: &str,
        body: Value,
        headers: [(&str, HeaderValue); N],
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut request = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        self.send(request.body(Body::from(body.to_string())).unwrap())
            .await
    }

    /// Submits [`SEED`] with these `Idempotency-Key` headers.
    async fn execute_with_keys<const N: usize>(
        &self,
        keys: [HeaderValue; N],
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        self.post_with_headers(
            "/api/workflows/execute",
            json!({"yaml": SEED}),
            keys.map(|key| ("Idempotency-Key", key)),
        )
        .await
    }

    /// POSTs `body` as it is, with these headers and no others.
    async fn post_raw<const N: usize>(
        &self,
        uri: &str,
        body: &str,
        headers: [(&str, HeaderValue); N],
    ) -> (StatusCode, Value) {
        let mut request = Request::post(uri);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let (status, _, body) = self
            .send(request.body(Body::from(body.to_string())).unwrap())
            .await;
        (status, body)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let (status, _, body) = self
            .send(Request::get(uri).body(Body::empty()).unwrap())
            .await;
        (status, body)
    }

    /// DELETEs `uri`; answers the status and the body's text (empty on success).
    async fn delete(&self, uri: &str) -> (StatusCode, String) {
        let request = Request::delete(uri).body(Body::empty()).unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Reads an error answer, checking it has the one error shape.
fn error(body: Value) -> ErrorBody {
    serde_json::from_value(body.clone())
        .unwrap_or_else(|e| panic!("not an ErrorBody ({e}): {body}"))
}

fn sample_run(id: Uuid) -> WorkflowResult {
    WorkflowResult {
        workflow_id: id,
        trace_id: flotilla_api_model::trace_id(id),
        name: "build".into(),
        status: "running".into(),
        start_time: Utc.timestamp_opt(1_750_000_000, 0).unwrap(),
        end_time: None,
        duration: None,
        params: Map::new(),
        only: Vec::new(),
        skip: Vec::new(),
        error: None,
        steps: Vec::new(),
        metrics: Metrics::default(),
        parent: None,
    }
}

#[tokio::test]
async fn execute_by_yaml_submits_the_effective_params() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"yaml": SEED, "params": {"env": "production", "extra": [1, 2]}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, json!({"workflowId": Uuid::from_u128(1)}));

    let state = api.backend.state();
    let submission = &state.submissions[0];
    assert_eq!(submission.definition.name, "build");
    assert_eq!(submission.plan.nodes.len(), 2);
    assert_eq!(
        Value::Object(submission.params.clone()),
        json!({"env": "production", "retries": 1, "extra": [1, 2]})
    );
}

#[tokio::test]
async fn execute_submits_the_subset_and_refuses_unknown_steps_storing_nothing() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"yaml": SEED, "only": ["deploy"], "skip": ["deploy", "scaffold"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error(body).error.message,
        "the selection leaves out every step of workflow `build`: nothing would run"
    );
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"yaml": SEED, "only": ["deploy", "test"], "skip": ["lint"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let err = error(body).error;
    assert_eq!(err.code, "invalid_request");
    assert_eq!(
        err.message,
        "unknown steps in the selection: `test`, `lint` are not steps of workflow `build`"
    );
    assert!(api.backend.state().submissions.is_empty());

    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"yaml": SEED, "only": ["deploy"]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let state = api.backend.state();
    assert_eq!(
        state.submissions[0].subset,
        flotilla_core::Subset {
            only: vec!["deploy".into()],
            skip: Vec::new()
        }
    );
}

#[tokio::test]
async fn execute_by_definition_object_is_accepted() {
    let api = Api::new(FakeBackend::default());
    let definition = json!({
        "name": "inline",
        "steps": [{"agent": "a", "action": "b"}]
    });
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"definition": definition, "params": {"n": 3}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let state = api.backend.state();
    assert_eq!(state.submissions[0].definition.name, "inline");
    assert_eq!(
        Value::Object(state.submissions[0].params.clone()),
        json!({"n": 3})
    );
}

#[tokio::test]
async fn execute_by_name_runs_the_registered_definition() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api.post("/api/definitions", json!({"yaml": SEED})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let summary: DefinitionSummary = serde_json::from_value(body).unwrap();
    assert_eq!((summary.name.as_str(), summary.revision), ("build", 1));

    let (status, body) = api
        .post("/api/workflows/execute", json!({"workflow": "build"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let state = api.backend.state();
    assert_eq!(state.submissions[0].definition.name, "build");
    assert_eq!(state.submissions[0].latest.as_deref(), Some("hash-1"));
    assert_eq!(
        Value::Object(state.submissions[0].params.clone()),
        json!({"env": "staging", "retries": 1})
    );
}

#[tokio::test]
async fn a_revision_registered_while_submitting_is_the_one_that_runs() {
    let api = Api::new(FakeBackend::default());
    let (status, _) = api.post("/api/definitions", json!({"yaml": SEED})).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut newer = Definition::from_yaml(SEED).unwrap();
    newer.description = Some("registered while the first was submitted".into());
    api.backend.state().racing_registrations = vec![newer.clone()];

    let (status, body) = api
        .post("/api/workflows/execute", json!({"workflow": "build"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let state = api.backend.state();
    assert_eq!(state.submissions.len(), 1, "one run started");
    assert_eq!(state.submissions[0].definition, newer);
    assert_eq!(state.submissions[0].latest.as_deref(), Some("hash-2"));
}

#[tokio::test]
async fn a_definition_registered_anew_at_every_try_is_409_and_starts_nothing() {
    let api = Api::new(FakeBackend::default());
    let (status, _) = api.post("/api/definitions", json!({"yaml": SEED})).await;
    assert_eq!(status, StatusCode::CREATED);
    let seed = Definition::from_yaml(SEED).unwrap();
    api.backend.state().racing_registrations = vec![seed; 1 + STALE_REREADS as usize];

    let (status, body) = api
        .post("/api/workflows/execute", json!({"workflow": "build"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let err = error(body).error;
    assert!(
        err.message.contains("`build` was registered anew"),
        "{}",
        err.message
    );
    assert!(api.backend.state().submissions.is_empty());
}

#[tokio::test]
async fn unknown_workflow_name_is_404() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api
        .post("/api/workflows/execute", json!({"workflow": "nope"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let err = error(body).error;
    assert_eq!(err.code, "not_found");
    assert!(err.message.contains("`nope`"), "{}", err.message);
    assert!(api.backend.state().submissions.is_empty());
}

#[tokio::test]
async fn bad_yaml_is_400_with_line_and_column() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"yaml": "name: x\nsteps:\n  - agent: a\n    action: [b\n"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert_eq!(err.code, "invalid_yaml");
    let details = err.details.expect("a location");
    let line = details["line"].as_u64().expect("a line number");
    assert!(line >= 4, "{details}");
    assert!(details["column"].is_u64(), "{details}");
    assert!(
        err.message.contains(&format!("line {line}")),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn cycle_is_400_naming_the_cycle() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api
        .post("/api/workflows/execute", json!({"yaml": CYCLE}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert_eq!(err.code, "invalid_definition");
    assert!(
        err.message.contains("dependency cycle: a → b → a")
            || err.message.contains("dependency cycle: b → a → b"),
        "{}",
        err.message
    );
    let details = err.details.expect("the problems");
    assert_eq!(details["workflow"], json!("loop"));
    let problems = details["problems"].as_array().expect("a list of problems");
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.starts_with("dependency cycle"))),
        "{details}"
    );
    assert!(api.backend.state().submissions.is_empty());
}

#[tokio::test]
async fn every_problem_of_a_definition_is_listed() {
    let api = Api::new(FakeBackend::default());
    let definition = json!({
        "name": "broken",
        "steps": [{"id": "a"}, {"id": "b", "agent": "x", "action": "y", "depends_on": ["ghost"]}]
    });
    let (status, body) = api
        .post("/api/definitions", json!({"definition": definition}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    for expected in ["missing `agent`", "missing `action`", "`ghost`"] {
        assert!(
            err.message.contains(expected),
            "{expected}: {}",
            err.message
        );
    }
    assert!(api.backend.state().definitions.is_empty());
}

#[tokio::test]
async fn definition_object_of_the_wrong_shape_is_400() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"definition": {"name": "x", "stepz": []}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert_eq!(err.code, "invalid_definition");
    assert!(err.message.contains("stepz"), "{}", err.message);
}

#[tokio::test]
async fn exactly_one_source_is_required() {
    let api = Api::new(FakeBackend::default());

    let (status, body) = api
        .post("/api/workflows/execute", json!({"params": {"a": 1}}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert_eq!(err.code, "invalid_request");
    assert!(
        err.message
            .contains("give one of `workflow`, `definition` or `yaml`"),
        "{}",
        err.message
    );

    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"workflow": "build", "yaml": SEED}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert!(
        err.message.contains("`workflow` and `yaml` were given"),
        "{}",
        err.message
    );

    let (status, body) = api
        .post(
            "/api/definitions",
            json!({"yaml": SEED, "definition": {"name": "x"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error(body)
            .error
            .message
            .contains("give only one of `definition` or `yaml`")
    );
    let state = api.backend.state();
    assert!(state.submissions.is_empty() && state.definitions.is_empty());
}

#[tokio::test]
async fn run_is_answered_by_id() {
    let id = Uuid::from_u128(42);
    let api = Api::new(FakeBackend::with_run(sample_run(id)));
    let (status, body) = api.get(&format!("/api/workflows/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_value::<WorkflowResult>(body).unwrap(),
        sample_run(id)
    );
}

#[tokio::test]
async fn unknown_run_is_404_naming_the_id() {
    let api = Api::new(FakeBackend::default());
    let id = Uuid::from_u128(7);
    let (status, body) = api.get(&format!("/api/workflows/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let err = error(body).error;
    assert_eq!(err.code, "not_found");
    assert!(err.message.contains(&id.to_string()), "{}", err.message);
}

#[tokio::test]
async fn malformed_run_id_is_400() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api.get("/api/workflows/not-a-uuid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert_eq!(err.code, "invalid_request");
    assert!(err.message.contains("`not-a-uuid`"), "{}", err.message);
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let api = Api::with_limits(
        FakeBackend::default(),
        Limits {
            max_body_bytes: 256,
            ..Limits::default()
        },
    );
    let yaml = format!("{SEED}# {}\n", "x".repeat(1024));
    let (status, body) = api
        .post("/api/workflows/execute", json!({"yaml": yaml}))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let err = error(body).error;
    assert_eq!(err.code, "payload_too_large");
    assert!(err.message.contains("256 bytes"), "{}", err.message);
    assert!(api.backend.state().submissions.is_empty());

    // The same request fits under the default limit.
    let api = Api::new(FakeBackend::default());
    let yaml = format!("{SEED}# {}\n", "x".repeat(1024));
    let (status, _) = api
        .post("/api/workflows/execute", json!({"yaml": yaml}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn definitions_steps_and_params_over_their_limits_are_413_naming_the_limit() {
    let limits = Limits {
        max_definition_bytes: 400,
        max_steps: 2,
        max_params_bytes: 64,
        ..Limits::default()
    };
    let api = Api::with_limits(FakeBackend::default(), limits);
    let three = format!(
        "{SEED}  - id: third\n    agent: agent6\n    action: scaffold_project\n    depends_on: [deploy]\n"
    );
    let cases = [
        (
            "/api/workflows/execute",
            json!({"yaml": format!("{SEED}# {}\n", "x".repeat(400))}),
            "maxDefinitionBytes",
            400,
        ),
        (
            "/api/definitions",
            json!({"yaml": format!("{SEED}# {}\n", "x".repeat(400))}),
            "maxDefinitionBytes",
            400,
        ),
        (
            "/api/workflows/execute",
            json!({"definition": Definition::from_yaml(&three).unwrap()}),
            "maxSteps",
            2,
        ),
        (
            "/api/workflows/execute",
            json!({"yaml": SEED, "params": {"padding": "x".repeat(64)}}),
            "maxParamsBytes",
            64,
        ),
    ];
    for (path, request, limit, max) in cases {
        let (status, body) = api.post(path, request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{limit}: {body}");
        let err = error(body).error;
        assert_eq!(err.code, "payload_too_large");
        assert!(err.message.contains(limit), "{}", err.message);
        let details = err.details.unwrap();
        assert_eq!(
            (&details["limit"], &details["max"]),
            (&json!(limit), &json!(max))
        );
        assert!(details["actual"].as_u64().unwrap() > max, "{details}");
    }
    {
        let state = api.backend.state();
        assert!(state.submissions.is_empty() && state.definitions.is_empty());
    }

    // At the limits, the same requests pass.
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"yaml": SEED, "params": {"env": "prod"}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn malformed_json_is_400_in_the_error_shape() {
    let api = Api::new(FakeBackend::default());
    let request = Request::post("/api/workflows/execute")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"yaml": "#))
        .unwrap();
    let (status, _, body) = api.send(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert_eq!(err.code, "invalid_request");
    assert!(err.message.contains("JSON"), "{}", err.message);
}

#[tokio::test]
async fn missing_json_content_type_is_400_in_the_error_shape() {
    let api = Api::new(FakeBackend::default());
    let request = Request::post("/api/definitions")
        .header(header::CONTENT_TYPE, "text/yaml")
        .body(Body::from(SEED))
        .unwrap();
    let (status, _, body) = api.send(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert_eq!(err.code, "invalid_request");
    assert!(err.message.contains("application/json"), "{}", err.message);
}

#[tokio::test]
async fn unknown_request_fields_are_refused() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"workflow": "build", "urgency": 3}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert!(
        err.message.contains("unknown field `urgency`"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn run_listing_gets_defaults_and_passes_the_cursor() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api.get("/api/workflows").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"workflows": []}));
    let (status, _) = api
        .get("/api/workflows?status=failure&limit=500&cursor=abc%3D")
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .get("/api/workflows?name=build&since=2026-01-31T12:00:00Z")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        api.backend.state().run_queries,
        [
            RunQuery {
                limit: Some(DEFAULT_RUN_LIMIT),
                ..RunQuery::default()
            },
            RunQuery {
                status: Some("failure".into()),
                limit: Some(500),
                cursor: Some("abc=".into()),
                ..RunQuery::default()
            },
            RunQuery {
                name: Some("build".into()),
                since: Some(Utc.with_ymd_and_hms(2026, 1, 31, 12, 0, 0).unwrap()),
                limit: Some(DEFAULT_RUN_LIMIT),
                ..RunQuery::default()
            },
        ]
    );
}

#[tokio::test]
async fn run_listing_refuses_bad_queries() {
    let api = Api::new(FakeBackend::default());
    for (uri, expected) in [
        ("/api/workflows?status=done", "unknown status `done`"),
        ("/api/workflows?limit=501", "between 1 and 500"),
        ("/api/workflows?limit=0", "between 1 and 500"),
        ("/api/workflows?limit=many", "limit"),
    ] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        let err = error(body).error;
        assert_eq!(err.code, "invalid_request", "{uri}");
        assert!(err.message.contains(expected), "{uri}: {}", err.message);
    }
    assert!(api.backend.state().run_queries.is_empty());
}

#[tokio::test]
async fn definitions_are_listed() {
    let api = Api::new(FakeBackend::default());
    for _ in 0..2 {
        let (status, _) = api.post("/api/definitions", json!({"yaml": SEED})).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, body) = api.get("/api/definitions").await;
    assert_eq!(status, StatusCode::OK);
    let list: DefinitionList = serde_json::from_value(body).unwrap();
    let revisions: Vec<i64> = list.definitions.iter().map(|d| d.revision).collect();
    assert_eq!(revisions, [1, 2]);
}

#[tokio::test]
async fn schedules_are_created_listed_read_and_removed() {
    let api = Api::new(FakeBackend::default());
    let (status, _) = api.post("/api/definitions", json!({"yaml": SEED})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = api
        .post(
            "/api/schedules",
            json!({"definition": "build", "cron": "*/5 * * * *", "timezone": "Europe/Paris",
                   "overlap": "allow", "params": {"env": "prod"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let created: ScheduleSummary = serde_json::from_value(body).unwrap();
    assert_eq!(
        (
            created.id.as_str(),
            created.timezone.as_str(),
            created.missed.as_str(),
            created.overlap.as_str()
        ),
        ("build", "Europe/Paris", "skip", "allow")
    );
    assert_eq!(created.params["env"], "prod");
    assert_eq!(
        created.next_at,
        Utc.timestamp_opt(1_750_000_200, 0).unwrap()
    );

    let (status, body) = api.get("/api/schedules").await;
    assert_eq!(status, StatusCode::OK);
    let list: ScheduleList = serde_json::from_value(body).unwrap();
    assert_eq!(list.schedules, std::slice::from_ref(&created));
    let (status, body) = api.get("/api/schedules/build").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_value::<ScheduleSummary>(body).unwrap(),
        created
    );

    let (status, text) = api.delete("/api/schedules/build").await;
    assert_eq!((status, text.as_str()), (StatusCode::NO_CONTENT, ""));
    let (status, text) = api.delete("/api/schedules/build").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains("no schedule `build`"), "{text}");
    let (status, body) = api.get("/api/schedules/build").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error(body).error.code, "not_found");
}

#[tokio::test]
async fn bad_schedules_are_refused_naming_the_fault() {
    let api = Api::new(FakeBackend::default());
    api.post("/api/definitions", json!({"yaml": SEED})).await;
    for (request, fault) in [
        (
            json!({"definition": "build", "cron": "every day"}),
            "is not a cron expression",
        ),
        (
            json!({"definition": "build", "cron": "0 * * * *", "timezone": "Mars/Olympus"}),
            "`Mars/Olympus` is not a time zone",
        ),
        (
            json!({"definition": "build", "cron": "0 * * * *", "missed": "always"}),
            "`missed` must be `skip` or `catch_up_once`, not `always`",
        ),
        (
            json!({"definition": "build", "cron": "0 * * * *", "overlap": "queue"}),
            "`overlap` must be `skip` or `allow`, not `queue`",
        ),
        (
            json!({"definition": " ", "cron": "0 * * * *"}),
            "`definition` must name",
        ),
    ] {
        let (status, body) = api.post("/api/schedules", request.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{request}: {body}");
        let message = error(body).error.message;
        assert!(message.contains(fault), "{request}: {message}");
    }
    let (status, body) = api
        .post(
            "/api/schedules",
            json!({"definition": "nope", "cron": "0 * * * *"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error(body).error.message.contains("`nope`"));
    assert!(api.backend.state().schedules.is_empty());
}

#[tokio::test]
async fn definition_versions_are_listed_shown_and_executed() {
    let api = Api::new(FakeBackend::default());
    let v1 = "name: ship\nversion: '1.0'\nsteps:\n  - {id: old, agent: a, action: x}\n";
    let v2 = "name: ship\nversion: '2.0'\nsteps:\n  - {id: new, agent: a, action: x}\n";
    for yaml in [v1, v2] {
        let (status, _) = api.post("/api/definitions", json!({"yaml": yaml})).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, body) = api.get("/api/definitions/ship/versions").await;
    assert_eq!(status, StatusCode::OK);
    let versions: DefinitionVersions = serde_json::from_value(body).unwrap();
    let listed: Vec<(i64, Option<&str>)> = versions
        .versions
        .iter()
        .map(|d| (d.revision, d.version.as_deref()))
        .collect();
    assert_eq!(listed, [(1, Some("1.0")), (2, Some("2.0"))]);

    let (status, body) = api.get("/api/definitions/ship").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            body["revision"].clone(),
            body["definition"]["steps"][0]["id"].clone()
        ),
        (json!(2), json!("new"))
    );
    for version in ["1.0", "1"] {
        let (status, body) = api
            .get(&format!("/api/definitions/ship?version={version}"))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["definition"]["steps"][0]["id"], "old", "{version}");
    }
    let (status, body) = api.get("/api/definitions/ship?version=9").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        error(body)
            .error
            .message
            .contains("no version or revision `9`")
    );
    let (status, _) = api.get("/api/definitions/nope/versions").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"name": "ship", "version": "1.0"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, _) = api
        .post("/api/workflows/execute", json!({"name": "ship"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let submitted: Vec<String> = api
        .backend
        .state()
        .submissions
        .iter()
        .map(|s| s.definition.steps[0].id.clone().unwrap_or_default())
        .collect();
    assert_eq!(submitted, ["old", "new"]);
    let (status, body) = api
        .post(
            "/api/workflows/execute",
            json!({"yaml": v1, "version": "1.0"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error(body).error.message.contains("give its name"));
}

#[tokio::test]
async fn a_run_report_is_served_and_an_unknown_run_is_404() {
    let id = Uuid::from_u128(7);
    let api = Api::new(FakeBackend::with_run(sample_run(id)));
    let (status, body) = api.get(&format!("/api/workflows/{id}/report")).await;
    assert_eq!(status, StatusCode::OK);
    let report: RunReport = serde_json::from_value(body).unwrap();
    assert_eq!(report.workflow_id, id);
    let other = Uuid::from_u128(8);
    let (status, body) = api.get(&format!("/api/workflows/{other}/report")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error(body).error.message.contains(&other.to_string()));
    let (status, _) = api.get("/api/workflows/nope/report").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

fn log_line(seq: u64, step: &str, attempt: u32, line: &str) -> StepLogLine {
    StepLogLine {
        seq,
        step_id: step.into(),
        attempt,
        stream: "stdout".into(),
        line: line.into(),
        at: Utc.timestamp_opt(1_750_000_000, 0).unwrap(),
    }
}

fn run_with_steps(id: Uuid, steps: &[&str]) -> WorkflowResult {
    let mut run = sample_run(id);
    for step in steps {
        let step: StepResult = serde_json::from_value(json!({
            "stepId": step, "agent": "a", "action": "b", "status": "running", "attempts": 1
        }))
        .unwrap();
        run.steps.push(step);
    }
    run
}

#[tokio::test]
async fn log_lines_are_read_by_step_attempt_and_position() {
    let id = Uuid::from_u128(7);
    let backend = FakeBackend::with_run(run_with_steps(id, &["build", "test"]));
    backend.state().logs.insert(
        id,
        vec![
            log_line(1, "build", 1, "compiling"),
            log_line(2, "test", 1, "running 3 tests"),
            log_line(3, "build", 2, "compiling again"),
            log_line(4, "build", 2, "finished"),
        ],
    );
    let api = Api::new(backend);
    let (status, body) = api
        .get(&format!(
            "/api/workflows/{id}/logs?step=build&attempt=2&limit=1"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let logs: StepLogs = serde_json::from_value(body).unwrap();
    assert_eq!(logs.lines, [log_line(3, "build", 2, "compiling again")]);
    assert_eq!(logs.next_after, 3);
    let (_, body) = api
        .get(&format!("/api/workflows/{id}/logs?step=build&after=3"))
        .await;
    let logs: StepLogs = serde_json::from_value(body).unwrap();
    assert_eq!(logs.lines, [log_line(4, "build", 2, "finished")]);
    let (_, body) = api.get(&format!("/api/workflows/{id}/logs?after=4")).await;
    let logs: StepLogs = serde_json::from_value(body).unwrap();
    assert!(logs.lines.is_empty());
    assert_eq!(logs.next_after, 4, "the cursor stays where it was");
    assert_eq!(
        api.backend.state().log_queries[0].limit,
        Some(1),
        "the limit is passed on"
    );
    assert_eq!(
        api.backend.state().log_queries[2].limit,
        Some(DEFAULT_LOG_LIMIT)
    );
}

#[tokio::test]
async fn bad_log_queries_are_refused_naming_the_fault() {
    let id = Uuid::from_u128(7);
    let api = Api::new(FakeBackend::with_run(run_with_steps(id, &["build"])));
    for (query, status, message) in [
        (
            "attempt=0",
            StatusCode::BAD_REQUEST,
            "attempt must be 1 or more: attempts are numbered from 1",
        ),
        (
            "wait=31",
            StatusCode::BAD_REQUEST,
            "wait must be at most 30 seconds, not 31",
        ),
        (
            "limit=10001",
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 10000, not 10001",
        ),
        (
            "step=deploy",
            StatusCode::NOT_FOUND,
            "run 00000000-0000-0000-0000-000000000007 has no step `deploy`",
        ),
    ] {
        let (got, body) = api.get(&format!("/api/workflows/{id}/logs?{query}")).await;
        assert_eq!(got, status, "{query}: {body}");
        assert_eq!(error(body).error.message, message, "{query}");
    }
    let other = Uuid::from_u128(8);
    let (status, body) = api.get(&format!("/api/workflows/{other}/logs")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error(body).error.message.contains(&other.to_string()));
    assert!(api.backend.state().log_queries.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_waiting_log_read_answers_the_first_line_written_meanwhile() {
    let id = Uuid::from_u128(7);
    let api = Arc::new(Api::new(FakeBackend::with_run(run_with_steps(
        id,
        &["build"],
    ))));
    let started = tokio::time::Instant::now();
    let reader = {
        let api = api.clone();
        tokio::spawn(async move { api.get(&format!("/api/workflows/{id}/logs?wait=20")).await })
    };
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    api.backend
        .state()
        .logs
        .insert(id, vec![log_line(1, "build", 1, "compiling")]);
    let (status, body) = reader.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let logs: StepLogs = serde_json::from_value(body).unwrap();
    assert_eq!(logs.lines, [log_line(1, "build", 1, "compiling")]);
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(2) && waited < std::time::Duration::from_secs(3),
        "{waited:?}"
    );

    // A run that has ended has nothing more to wait for.
    api.backend.state().runs[0].status = "success".into();
    let started = tokio::time::Instant::now();
    let (_, body) = api
        .get(&format!("/api/workflows/{id}/logs?after=1&wait=20"))
        .await;
    let logs: StepLogs = serde_json::from_value(body).unwrap();
    assert!(logs.lines.is_empty() && logs.ended);
    assert_eq!(started.elapsed(), std::time::Duration::ZERO);
}

#[tokio::test]
async fn backend_outage_is_503_with_its_message() {
    let api = Api::new(FakeBackend::failing_with(BackendError::Unavailable(
        "Postgres is unreachable".into(),
    )));
    let (status, body) = api.get("/api/definitions").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let err = error(body).error;
    assert_eq!(err.code, "unavailable");
    assert_eq!(err.message, "Postgres is unreachable");
}

#[tokio::test]
async fn internal_errors_do_not_reach_the_client() {
    let secret = "connect to postgres://flotilla:hunter2@db failed";
    let api = Api::new(FakeBackend::failing_with(BackendError::Internal(
        secret.into(),
    )));
    let (status, body) = api.get(&format!("/api/workflows/{}", Uuid::nil())).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!body.to_string().contains("hunter2"), "{body}");
    let err = error(body).error;
    assert_eq!(err.code, "internal");
    assert!(err.message.contains("incident"), "{}", err.message);
}

#[tokio::test]
async fn backend_refusals_are_400_and_404() {
    let api = Api::new(FakeBackend::failing_with(BackendError::Invalid(
        "cursor `x` cannot be read".into(),
    )));
    let (status, body) = api.get("/api/workflows?cursor=x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error(body).error.message, "cursor `x` cannot be read");

    let api = Api::new(FakeBackend::failing_with(BackendError::NotFound(
        "gone".into(),
    )));
    let (status, body) = api.get("/api/definitions").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error(body).error.code, "not_found");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api.get("/api/fleet").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error(body).error.message, "no route for GET /api/fleet");

    let request = Request::delete("/api/definitions")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = api.send(request).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error(body).error.code, "method_not_allowed");
    let allow = headers[header::ALLOW].to_str().unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
}

#[tokio::test]
async fn a_repeated_idempotency_key_answers_the_first_run() {
    let api = Api::new(FakeBackend::default());
    let key = HeaderValue::from_static("deploy-2025-06-15");

    let (status, headers, body) = api.execute_with_keys([key.clone()]).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(headers.get("idempotent-replayed").is_none());
    let first = body;

    let (status, headers, body) = api.execute_with_keys([key]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["Idempotent-Replayed"], "true");
    assert_eq!(body, first);
    assert_eq!(body, json!({"workflowId": Uuid::from_u128(1)}));

    // Another key, or none, starts another run.
    let (status, _, body) = api
        .execute_with_keys([HeaderValue::from_static("other")])
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"workflowId": Uuid::from_u128(2)}));
    let (status, _, body) = api.execute_with_keys([]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"workflowId": Uuid::from_u128(3)}));

    let state = api.backend.state();
    let keys: Vec<Option<&str>> = state
        .submissions
        .iter()
        .map(|s| s.idempotency_key.as_deref())
        .collect();
    assert_eq!(keys, [Some("deploy-2025-06-15"), Some("other"), None]);
}

#[tokio::test]
async fn an_idempotency_key_of_200_visible_characters_is_accepted() {
    let api = Api::new(FakeBackend::default());
    let key = format!("{}~", "!".repeat(199));
    let (status, _, body) = api
        .execute_with_keys([HeaderValue::from_str(&key).unwrap()])
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        api.backend.state().submissions[0].idempotency_key,
        Some(key)
    );
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_400_naming_the_header() {
    let api = Api::new(FakeBackend::default());
    let cases: [(Vec<HeaderValue>, &str); 5] = [
        (vec![HeaderValue::from_static("")], "it is empty"),
        (
            vec![HeaderValue::from_str(&"k".repeat(201)).unwrap()],
            "201 characters long",
        ),
        (
            vec![HeaderValue::from_static("two words")],
            "character 4 is not visible ASCII",
        ),
        (
            vec![HeaderValue::from_bytes("clé".as_bytes()).unwrap()],
            "character 3 is not visible ASCII",
        ),
        (
            vec![HeaderValue::from_static("a"), HeaderValue::from_static("b")],
            "given 2 times",
        ),
    ];
    for (keys, expected) in cases {
        let mut request = Request::post("/api/workflows/execute")
            .header(header::CONTENT_TYPE, "application/json");
        for key in &keys {
            request = request.header("Idempotency-Key", key);
        }
        let request = request
            .body(Body::from(json!({"yaml": SEED}).to_string()))
            .unwrap();
        let (status, _, body) = api.send(request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{keys:?}");
        let err = error(body).error;
        assert_eq!(err.code, "invalid_request", "{keys:?}");
        assert!(
            err.message
                .starts_with("invalid `Idempotency-Key` header: ")
                && err.message.contains(expected),
            "{keys:?}: {}",
            err.message
        );
    }
    assert!(api.backend.state().submissions.is_empty());
}

fn letter(n: u128, step: &str, redriven: bool) -> DeadLetterSummary {
    DeadLetterSummary {
        id: Uuid::from_u128(0xd0 + n),
        workflow_id: Some(Uuid::from_u128(n)),
        step_id: Some(step.into()),
        attempt: Some(1),
        task_id: Some(Uuid::from_u128(0x70 + n)),
        reason: "delivery limit of 5 reached".into(),
        deliveries: Some(5),
        created_at: Utc.timestamp_opt(1_750_000_000 + n as i64, 0).unwrap(),
        redriven_at: redriven.then(|| Utc.timestamp_opt(1_750_000_100, 0).unwrap()),
        body: json!({"step_id": step}),
    }
}

#[tokio::test]
async fn dead_letters_are_listed_with_defaults() {
    let api = Api::new(FakeBackend::with_dead_letters(vec![letter(
        1, "deploy", false,
    )]));
    let (status, body) = api.get("/api/dlq").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"deadLetters": [{
            "id": Uuid::from_u128(0xd1),
            "workflowId": Uuid::from_u128(1),
            "stepId": "deploy",
            "attempt": 1,
            "taskId": Uuid::from_u128(0x71),
            "reason": "delivery limit of 5 reached",
            "deliveries": 5,
            "createdAt": "2025-06-15T15:06:41Z",
            "body": {"step_id": "deploy"},
        }]})
    );

    let (status, _) = api.get("/api/dlq?pending=false&limit=500").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        api.backend.state().dead_letter_queries,
        [
            DeadLetterQuery {
                pending: Some(true),
                limit: Some(DEFAULT_DEAD_LETTER_LIMIT),
            },
            DeadLetterQuery {
                pending: Some(false),
                limit: Some(500),
            },
        ]
    );
}

#[tokio::test]
async fn dead_letter_listing_refuses_bad_queries() {
    let api = Api::new(FakeBackend::default());
    for (uri, expected) in [
        ("/api/dlq?limit=501", "between 1 and 500"),
        ("/api/dlq?limit=0", "between 1 and 500"),
        ("/api/dlq?limit=many", "limit"),
        ("/api/dlq?pending=maybe", "pending"),
    ] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        let err = error(body).error;
        assert_eq!(err.code, "invalid_request", "{uri}");
        assert!(err.message.contains(expected), "{uri}: {}", err.message);
    }
    assert!(api.backend.state().dead_letter_queries.is_empty());
}

fn agent(name: &str, executions: u64, successes: u64) -> AgentSummary {
    AgentSummary {
        agent: name.into(),
        executions,
        successes,
        success_rate: successes as f64 / executions as f64,
        p50_ms: Some(10.0),
        p95_ms: Some(20.0),
        p99_ms: Some(30.0),
    }
}

#[tokio::test]
async fn the_metrics_summary_totals_its_agents_over_the_range() {
    let backend = FakeBackend::default();
    backend.state().attempts = vec![agent("a", 3, 2), agent("b", 1, 1)];
    let api = Api::new(backend);
    let before = Utc::now();
    let (status, body) = api.get("/api/metrics/summary?range=2h").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["range"], "2h");
    assert_eq!(
        (body["executions"].as_u64(), body["successes"].as_u64()),
        (Some(4), Some(3))
    );
    assert_eq!(body["successRate"].as_f64(), Some(0.75));
    assert_eq!(body["agents"][0]["p95Ms"].as_f64(), Some(20.0));
    let since = api.backend.state().summaries_since[0];
    let hours = (before - since).num_minutes();
    assert!(
        (119..=120).contains(&hours),
        "since {since}, {hours} minutes before"
    );

    api.backend.state().attempts.clear();
    let (status, body) = api.get("/api/metrics/summary").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["range"], "1h", "the default range");
    assert_eq!(body["executions"].as_u64(), Some(0));
    assert!(
        body.get("successRate").is_none(),
        "no rate of nothing: {body}"
    );
}

fn audit_check(name: &str, status: &str) -> flotilla_api_model::HealthAuditCheck {
    flotilla_api_model::HealthAuditCheck {
        area: "agents".into(),
        name: name.into(),
        status: status.into(),
        value: None,
        message: "found".into(),
    }
}

#[tokio::test]
async fn the_audit_is_graded_by_its_worst_check_against_the_targets_asked() {
    let backend = FakeBackend::default();
    backend.state().audit_checks = vec![audit_check("a", "pass"), audit_check("b", "warn")];
    let api = Api::new(backend);
    let (status, body) = api.get("/api/health/audit").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["window"].as_str()),
        (Some("warn"), Some("1h"))
    );
    assert_eq!(
        body["targets"],
        json!({"maxErrorRate": 0.001, "maxP95Ms": 500.0, "maxPoolUse": 0.8, "maxFailoverSecs": 30.0})
    );
    assert_eq!(body["checks"][1]["name"], "b");

    api.backend
        .state()
        .audit_checks
        .push(audit_check("c", "fail"));
    let (_, body) = api
        .get("/api/health/audit?window=15m&maxErrorRate=0.01&maxP95Ms=200")
        .await;
    assert_eq!(body["status"], "fail");
    let (since, targets) = api.backend.state().audits[1];
    assert_eq!((targets.max_error_rate, targets.max_p95_ms), (0.01, 200.0));
    assert!((Utc::now() - since).num_minutes() <= 15);

    for (uri, expected) in [
        (
            "/api/health/audit?maxErrorRate=2",
            "maxErrorRate must be above 0 and at most 1, not 2",
        ),
        (
            "/api/health/audit?maxP95Ms=-5",
            "maxP95Ms must be above 0, not -5",
        ),
        ("/api/health/audit?window=1w", "a unit s, m, h or d"),
    ] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(error(body).error.message.contains(expected), "{uri}");
    }
    assert_eq!(
        api.backend.state().audits.len(),
        2,
        "nothing audited on a refusal"
    );
}

#[tokio::test]
async fn the_metrics_summary_refuses_bad_ranges() {
    let api = Api::new(FakeBackend::default());
    for (uri, expected) in [
        ("/api/metrics/summary?range=1w", "a unit s, m, h or d"),
        ("/api/metrics/summary?range=0h", "positive whole number"),
        ("/api/metrics/summary?range=100d", "at most 90d"),
    ] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        let err = error(body).error;
        assert_eq!(err.code, "invalid_request", "{uri}");
        assert!(err.message.contains(expected), "{uri}: {}", err.message);
    }
    assert!(api.backend.state().summaries_since.is_empty());
}

#[tokio::test]
async fn redrive_needs_either_ids_or_all() {
    let api = Api::new(FakeBackend::default());
    let id = Uuid::from_u128(1);
    for (body, expected) in [
        (json!({}), "nothing to redrive: give one of `ids` or `all`"),
        (
            json!({"ids": [], "all": false}),
            "nothing to redrive: give one of `ids` or `all`",
        ),
        (
            json!({"ids": [id], "all": true}),
            "`ids` and `all` were given: give only one of `ids` or `all`",
        ),
        (json!({"ids": ["not-a-uuid"]}), "ids"),
        (json!({"all": "yes"}), "all"),
        (json!({"every": true}), "unknown field `every`"),
    ] {
        let (status, answer) = api.post("/api/dlq/redrive", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let err = error(answer).error;
        assert_eq!(err.code, "invalid_request", "{body}");
        assert!(err.message.contains(expected), "{body}: {}", err.message);
    }
    assert!(api.backend.state().redrives.is_empty());
}

#[tokio::test]
async fn redrive_answers_every_named_dead_letter_in_order() {
    let api = Api::new(FakeBackend::with_dead_letters(vec![
        letter(1, "deploy", false),
        letter(2, "ended", false),
        letter(3, "build", true),
    ]));
    let [retried, refused, redriven] = [1, 2, 3].map(|n| Uuid::from_u128(0xd0 + n));
    let unknown = Uuid::from_u128(0xee);
    let (status, body) = api
        .post(
            "/api/dlq/redrive",
            json!({"ids": [redriven, unknown, refused, retried, redriven]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let not_pending = "no dead letter with this id is waiting to be redriven (there is none, or \
                       it was redriven already)";
    assert_eq!(
        body,
        json!({"redriven": [
            {"deadLetter": redriven, "error": not_pending},
            {"deadLetter": unknown, "error": not_pending},
            {
                "deadLetter": refused,
                "workflowId": Uuid::from_u128(2),
                "stepId": "ended",
                "error": "the run has ended",
            },
            {
                "deadLetter": retried,
                "workflowId": Uuid::from_u128(1),
                "stepId": "deploy",
                "attempt": 2,
            },
        ]})
    );
    // The backend gets each id once.
    assert_eq!(
        api.backend.state().redrives,
        [vec![redriven, unknown, refused, retried]]
    );
}

#[tokio::test]
async fn redrive_all_hands_the_backend_no_ids() {
    let api = Api::new(FakeBackend::with_dead_letters(vec![
        letter(1, "deploy", false),
        letter(2, "ended", false),
        letter(3, "build", true),
    ]));
    let (status, body) = api.post("/api/dlq/redrive", json!({"all": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response: RedriveResponse = serde_json::from_value(body).unwrap();
    let outcomes: Vec<(Uuid, bool)> = response
        .redriven
        .iter()
        .map(|o| (o.dead_letter, o.retried()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Uuid::from_u128(0xd1), true),
            (Uuid::from_u128(0xd2), false)
        ]
    );
    assert_eq!(api.backend.state().redrives, [Vec::<Uuid>::new()]);
}

const RUN: Uuid = Uuid::from_u128(0x0196_0000_0000_7000_8000_0000_0000_0001);

fn step(id: &str, status: &str) -> StepResult {
    StepResult {
        step_id: id.into(),
        agent: "agent".into(),
        action: id.into(),
        status: status.into(),
        attempts: 1,
        start_time: None,
        end_time: None,
        output: None,
        error: None,
        next_attempt_at: None,
        strike: 1,
        held: None,
        workflow: None,
        child_workflow_id: None,
        waiting_for_worker: false,
    }
}

/// A backend with [`RUN`] in `status`, with the steps `build` and `deploy`.
fn run_in(status: &str) -> FakeBackend {
    FakeBackend::with_run(WorkflowResult {
        status: status.into(),
        steps: vec![step("build", "success"), step("deploy", "running")],
        ..sample_run(RUN)
    })
}

fn actor(name: &'static str) -> [(&'static str, HeaderValue); 1] {
    [("Flotilla-Actor", HeaderValue::from_static(name))]
}

#[tokio::test]
async fn cancel_pause_and_resume_answer_the_run_status() {
    let api = Api::new(run_in("running"));
    // No body, `{}`, and an empty body that claims to be JSON are all "no arguments".
    let json = (
        header::CONTENT_TYPE.as_str(),
        HeaderValue::from_static("application/json"),
    );
    let [who] = actor("alice@build-box");
    for (action, body, content_type, status) in [
        ("pause", "", None, "paused"),
        ("resume", "{}", Some(json.clone()), "running"),
        ("cancel", "", Some(json.clone()), "cancelled"),
    ] {
        let uri = format!("/api/workflows/{RUN}/{action}");
        let (answer, body) = match content_type {
            Some(json) => api.post_raw(&uri, body, [who.clone(), json]).await,
            None => api.post_raw(&uri, body, [who.clone()]).await,
        };
        assert_eq!(answer, StatusCode::OK, "{action}: {body}");
        assert_eq!(
            body,
            json!({"workflowId": RUN, "action": action, "status": status})
        );
    }
    let actor = || "alice@build-box".to_string();
    assert_eq!(
        api.backend.state().operations,
        [
            (RUN, Operation::Pause, actor()),
            (RUN, Operation::Resume, actor()),
            (RUN, Operation::Cancel, actor()),
        ]
    );
}

#[tokio::test]
async fn a_null_body_is_no_arguments_and_a_field_is_refused() {
    let api = Api::new(run_in("running"));
    let uri = format!("/api/workflows/{RUN}/pause");
    let (status, body) = api.post(&uri, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api.post(&uri, json!({"force": true})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error(body).error.message.contains("force"));
    assert_eq!(api.backend.state().operations.len(), 1);
}

/// Postgres can store a NUL character in neither text nor JSON: wherever a request carries one,
/// it is refused, saying where, before the backend sees it.
#[tokio::test]
async fn a_nul_character_anywhere_is_refused_and_nothing_is_stored() {
    let api = Api::new(run_in("running"));
    for (uri, place) in [
        ("/api/definitions/build%00", "the path"),
        ("/api/agents/a%00b/health", "the path"),
        ("/api/workflows?cursor=%00", "the query string"),
    ] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        let message = error(body).error.message;
        assert!(
            message.starts_with(&format!("{place} holds a NUL")),
            "{message}"
        );
    }
    let yaml_nul = "name: \"a\\0b\"\nsteps:\n  - {agent: x, action: y}\n";
    for (request, place) in [
        (
            json!({"yaml": SEED, "params": {"k": "a\u{0}b"}}),
            "the request body",
        ),
        (json!({"yaml": yaml_nul}), "the definition"),
    ] {
        let (status, body) = api.post("/api/workflows/execute", request.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{request}: {body}");
        let message = error(body).error.message;
        assert!(
            message.starts_with(&format!("{place} holds a NUL")),
            "{message}"
        );
    }
    let uri = format!("/api/workflows/{RUN}/steps/deploy/complete");
    let (status, body) = api.post(&uri, json!({"output": {"k\u{0}": 1}})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let state = api.backend.state();
    assert!(state.submissions.is_empty() && state.operations.is_empty());
}

#[tokio::test]
async fn retry_takes_an_optional_step() {
    let api = Api::new(run_in("failure"));
    let uri = format!("/api/workflows/{RUN}/retry");
    let (status, body) = api.post_raw(&uri, "", actor("ops")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"workflowId": RUN, "action": "retry", "status": "running"})
    );

    api.backend.state().runs[0].status = "failure".into();
    let (status, body) = api.post(&uri, json!({"step": "deploy"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let operations: Vec<Operation> = api
        .backend
        .state()
        .operations
        .iter()
        .map(|(_, operation, _)| operation.clone())
        .collect();
    assert_eq!(
        operations,
        [
            Operation::Retry { step: None },
            Operation::Retry {
                step: Some("deploy".into())
            }
        ]
    );
}

#[tokio::test]
async fn rollback_answers_the_run_rolling_back_and_a_conflict_for_a_run_that_runs() {
    let api = Api::new(run_in("failure"));
    let uri = format!("/api/workflows/{RUN}/rollback");
    let (status, body) = api.post_raw(&uri, "", actor("ops")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"workflowId": RUN, "action": "rollback", "status": "rolling_back"})
    );
    let (status, body) = api.post(&uri, json!({"step": "deploy"})).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a rollback takes no arguments: {body}"
    );
    let (status, body) = api.post(&uri, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        error(body).error.message,
        "only an ended run can be rolled back"
    );
    // The malformed request never reached the backend.
    assert_eq!(api.backend.state().operations.len(), 2);
}

#[tokio::test]
async fn skip_and_complete_name_the_step_from_the_path() {
    let api = Api::new(run_in("running"));
    let (status, body) = api
        .post(
            &format!("/api/workflows/{RUN}/steps/deploy/skip"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"workflowId": RUN, "action": "skip", "status": "running"})
    );

    let output = json!({"url": "https://staging.example", "replicas": [1, 2]});
    let (status, body) = api
        .post(
            &format!("/api/workflows/{RUN}/steps/deploy/complete"),
            json!({"output": output}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["action"], "complete");

    // A step id is one path segment, percent-encoded as needed.
    let (status, body) = api
        .post(
            &format!("/api/workflows/{RUN}/steps/deploy%20eu/skip"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        error(body).error.message,
        format!("run {RUN} has no step `deploy eu`")
    );

    let operations: Vec<Operation> = api
        .backend
        .state()
        .operations
        .iter()
        .map(|(_, operation, _)| operation.clone())
        .collect();
    assert_eq!(
        operations,
        [
            Operation::Skip {
                step: "deploy".into()
            },
            Operation::Complete {
                step: "deploy".into(),
                output
            },
            Operation::Skip {
                step: "deploy eu".into()
            },
        ]
    );
}

/// Every operator route for [`RUN`], with a body it accepts; those of a step name `step`.
fn operator_requests(step: &str) -> [(String, Value); 6] {
    let run = format!("/api/workflows/{RUN}");
    [
        (format!("{run}/cancel"), json!({})),
        (format!("{run}/pause"), json!({})),
        (format!("{run}/resume"), json!({})),
        (format!("{run}/retry"), json!({"step": step})),
        (format!("{run}/steps/{step}/skip"), json!({})),
        (format!("{run}/steps/{step}/complete"), json!({"output": 1})),
    ]
}

#[tokio::test]
async fn operating_on_an_unknown_run_is_404() {
    let api = Api::new(FakeBackend::default());
    for (uri, body) in operator_requests("deploy") {
        let (status, answer) = api.post(&uri, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        let err = error(answer).error;
        assert_eq!(err.code, "not_found", "{uri}");
        assert_eq!(err.message, format!("no run has id {RUN}"), "{uri}");
    }
}

#[tokio::test]
async fn operating_on_an_unknown_step_is_404_naming_it() {
    let api = Api::new(run_in("failure"));
    // The last three name a step: retry, skip and complete.
    for (uri, body) in operator_requests("ghost").into_iter().skip(3) {
        let (status, answer) = api.post(&uri, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        let err = error(answer).error;
        assert_eq!(err.code, "not_found", "{uri}");
        assert_eq!(
            err.message,
            format!("run {RUN} has no step `ghost`"),
            "{uri}"
        );
    }
    assert_eq!(api.backend.state().runs[0].status, "failure");
}

#[tokio::test]
async fn an_action_the_run_refuses_is_409_with_the_reason() {
    let api = Api::new(run_in("success"));
    for (uri, body) in operator_requests("deploy") {
        let (status, answer) = api.post(&uri, body).await;
        assert_eq!(status, StatusCode::CONFLICT, "{uri}");
        let err = error(answer).error;
        assert_eq!(err.code, "conflict", "{uri}");
        assert_eq!(err.message, "the run has ended", "{uri}");
    }

    let api = Api::new(run_in("running"));
    let (status, answer) = api
        .post(&format!("/api/workflows/{RUN}/retry"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        error(answer).error.message,
        "only a failed run can be retried"
    );
    assert!(api.backend.state().history.is_empty());
}

#[tokio::test]
async fn malformed_operator_requests_are_400() {
    let api = Api::new(run_in("failure"));
    let run = format!("/api/workflows/{RUN}");
    for (uri, body, expected) in [
        (
            format!("{run}/steps/deploy/complete"),
            json!({}),
            "missing field `output`",
        ),
        (
            format!("{run}/steps/deploy/complete"),
            json!({"output": 1, "status": "success"}),
            "unknown field `status`",
        ),
        (
            format!("{run}/retry"),
            json!({"steps": ["deploy"]}),
            "unknown field `steps`",
        ),
        (format!("{run}/retry"), json!({"step": 3}), "step"),
        (
            format!("{run}/cancel"),
            json!({"force": true}),
            "unknown field `force`",
        ),
        (
            format!("{run}/steps/deploy/skip"),
            json!({"reason": "flaky"}),
            "unknown field `reason`",
        ),
        (
            "/api/workflows/not-a-uuid/pause".to_string(),
            json!({}),
            "`not-a-uuid` is not a workflow id",
        ),
    ] {
        let (status, answer) = api.post(&uri, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body}");
        let err = error(answer).error;
        assert_eq!(err.code, "invalid_request", "{uri} {body}");
        assert!(
            err.message.contains(expected),
            "{uri} {body}: {}",
            err.message
        );
    }

    // A body that is given must be JSON, said so.
    let complete = format!("{run}/steps/deploy/complete");
    let retry = format!("{run}/retry");
    for (uri, body, expected) in [
        (&complete, "", "application/json"),
        (&retry, r#"{"step": "deploy"}"#, "application/json"),
    ] {
        let (status, answer) = api.post_raw(uri, body, []).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body:?}");
        let err = error(answer).error;
        assert!(err.message.contains(expected), "{uri}: {}", err.message);
    }
    let (status, answer) = api
        .post_raw(
            &retry,
            r#"{"step": "#,
            [(
                header::CONTENT_TYPE.as_str(),
                HeaderValue::from_static("application/json"),
            )],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error(answer).error.message.contains("JSON"));

    assert!(api.backend.state().operations.is_empty());
}

#[tokio::test]
async fn an_optional_body_over_the_limit_is_413() {
    let api = Api::with_limits(
        run_in("running"),
        Limits {
            max_body_bytes: 64,
            ..Limits::default()
        },
    );
    let (status, body) = api
        .post(
            &format!("/api/workflows/{RUN}/pause"),
            json!({"padding": "x".repeat(100)}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error(body).error.code, "payload_too_large");
    assert!(api.backend.state().operations.is_empty());
}

#[tokio::test]
async fn operator_routes_take_only_post() {
    let api = Api::new(run_in("running"));
    let (status, body) = api.get(&format!("/api/workflows/{RUN}/cancel")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error(body).error.code, "method_not_allowed");
    assert!(api.backend.state().operations.is_empty());
}

#[tokio::test]
async fn the_actor_header_is_checked_and_recorded() {
    let api = Api::new(run_in("running"));
    let uri = format!("/api/workflows/{RUN}/pause");
    let longest = "a".repeat(200);
    let (status, _, body) = api
        .post_with_headers(
            &uri,
            json!({}),
            [("Flotilla-Actor", HeaderValue::from_str(&longest).unwrap())],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let cases: [(Vec<HeaderValue>, &str); 5] = [
        (vec![HeaderValue::from_static("")], "it is empty"),
        (
            vec![HeaderValue::from_str(&"a".repeat(201)).unwrap()],
            "201 characters long",
        ),
        (
            vec![HeaderValue::from_static("jane doe")],
            "character 5 is not visible ASCII",
        ),
        (
            vec![HeaderValue::from_bytes("josé@host".as_bytes()).unwrap()],
            "character 4 is not visible ASCII",
        ),
        (
            vec![HeaderValue::from_static("a"), HeaderValue::from_static("b")],
            "given 2 times",
        ),
    ];
    for (actors, expected) in cases {
        let mut request = Request::post(&uri);
        for actor in &actors {
            request = request.header("Flotilla-Actor", actor);
        }
        let (status, _, body) = api.send(request.body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{actors:?}");
        let err = error(body).error;
        assert_eq!(err.code, "invalid_request", "{actors:?}");
        assert!(
            err.message.starts_with("invalid `Flotilla-Actor` header: ")
                && err.message.contains(expected),
            "{actors:?}: {}",
            err.message
        );
    }
    let actors: Vec<String> = api
        .backend
        .state()
        .operations
        .iter()
        .map(|(_, _, actor)| actor.clone())
        .collect();
    assert_eq!(actors, [longest]);
}

#[tokio::test]
async fn without_an_actor_header_the_actor_is_anonymous() {
    let api = Api::new(run_in("running"));
    let (status, body) = api
        .post_raw(&format!("/api/workflows/{RUN}/pause"), "", [])
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // With the peer's address known, the actor says where the request came from.
    let peer = std::net::SocketAddr::from(([10, 1, 2, 3], 50_123));
    let backend = Arc::new(run_in("running"));
    let router = router(Arc::clone(&backend), Limits::default())
        .layer(axum::extract::connect_info::MockConnectInfo(peer));
    let response = router
        .oneshot(
            Request::post(format!("/api/workflows/{RUN}/cancel"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    assert_eq!(api.backend.state().operations[0].2, "anonymous");
    assert_eq!(backend.state().operations[0].2, "anonymous@10.1.2.3");
}

#[tokio::test]
async fn a_server_with_connect_info_records_the_peer_of_an_anonymous_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let backend = Arc::new(run_in("running"));
    let app = router(Arc::clone(&backend), Limits::default())
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST /api/workflows/{RUN}/pause HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");

    assert_eq!(backend.state().operations[0].2, "anonymous@127.0.0.1");
}

#[tokio::test]
async fn the_history_lists_what_operators_did() {
    let api = Api::new(run_in("running"));
    let (status, body) = api.get(&format!("/api/workflows/{RUN}/events")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"events": []}));

    let run = format!("/api/workflows/{RUN}");
    let [alice] = actor("alice@build-box");
    let [bob] = actor("bob@laptop");
    let (status, _, _) = api
        .post_with_headers(&format!("{run}/pause"), json!({}), [alice])
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = api
        .post_with_headers(
            &format!("{run}/steps/deploy/complete"),
            json!({"output": {"url": "https://x"}}),
            [bob.clone()],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // A refused action is not history.
    let (status, _, _) = api
        .post_with_headers(&format!("{run}/retry"), json!({}), [bob])
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, body) = api.get(&format!("{run}/events")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"events": [
            {"at": "2025-06-15T15:07:40Z", "actor": "alice@build-box", "action": "pause"},
            {
                "at": "2025-06-15T15:07:40Z",
                "actor": "bob@laptop",
                "action": "complete",
                "stepId": "deploy",
                "detail": {"output": {"url": "https://x"}},
            },
        ]})
    );
}

#[tokio::test]
async fn the_history_of_an_unknown_run_is_404() {
    let api = Api::new(FakeBackend::default());
    let (status, body) = api.get(&format!("/api/workflows/{RUN}/events")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let err = error(body).error;
    assert_eq!(err.code, "not_found");
    assert_eq!(err.message, format!("workflow run {RUN} not found"));

    let (status, body) = api.get("/api/workflows/nope/events").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error(body).error.code, "invalid_request");
}

#[tokio::test]
async fn operator_outages_are_503() {
    let api = Api::new(FakeBackend::failing_with(BackendError::Unavailable(
        "the coordinator is shutting down".into(),
    )));
    let (status, body) = api
        .post(&format!("/api/workflows/{RUN}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        error(body).error.message,
        "the coordinator is shutting down"
    );
}

#[tokio::test]
async fn the_new_run_statuses_can_be_listed() {
    let api = Api::new(FakeBackend::default());
    for status in ["paused", "cancelled"] {
        let (answer, body) = api.get(&format!("/api/workflows?status={status}")).await;
        assert_eq!(answer, StatusCode::OK, "{status}: {body}");
    }
    let (_, body) = api.get("/api/workflows?status=stopped").await;
    assert_eq!(
        error(body).error.message,
        "unknown status `stopped`: expected `running`, `paused`, `failing`, `success`, \
         `failure`, `cancelled`, `needs_attention`, `rolling_back`, \
         `rolled_back` or `rollback_failed`"
    );
}

/// Stands in for a process's health: checks as set by the test.
pub(crate) struct FakeProbe {
    checks: Mutex<Vec<flotilla_api_model::HealthCheck>>,
}

impl FakeProbe {
    pub(crate) fn new(checks: Vec<flotilla_api_model::HealthCheck>) -> Arc<Self> {
        Arc::new(Self {
            checks: Mutex::new(checks),
        })
    }

    fn set(&self, checks: Vec<flotilla_api_model::HealthCheck>) {
        *self.checks.lock().expect("no test thread panicked") = checks;
    }
}

impl Probe for FakeProbe {
    fn version(&self) -> &str {
        "9.9.9"
    }

    async fn checks(&self) -> Vec<flotilla_api_model::HealthCheck> {
        self.checks.lock().expect("no test thread panicked").clone()
    }

    async fn metrics(&self) -> String {
        "# TYPE up gauge\nup 1\n".into()
    }
}

/// Status, content type and body of a request to `app`.
async fn call(app: &Router, request: Request<Body>) -> (StatusCode, String, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (
        status,
        content_type,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

fn get_request(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn readiness_follows_the_checks_and_names_the_failing_part() {
    use flotilla_api_model::HealthCheck;

    let probe = FakeProbe::new(vec![
        HealthCheck::ok("postgres", "answers"),
        HealthCheck::ok("rabbitmq", "connected"),
    ]);
    let app = router_with_health(
        Arc::new(FakeBackend::default()),
        Arc::clone(&probe),
        Limits::default(),
    );

    let (status, _, body) = call(&app, get_request("/health/ready")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], "9.9.9");

    probe.set(vec![
        HealthCheck::ok("postgres", "answers"),
        HealthCheck::failing("rabbitmq", "connection refused"),
    ]);
    let (status, _, body) = call(&app, get_request("/health/ready")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let err = error(serde_json::from_str(&body).unwrap()).error;
    assert_eq!(err.code, "unavailable");
    assert_eq!(err.message, "not ready: rabbitmq: connection refused");
    let details = err.details.expect("the report is in the details");
    assert_eq!(details["status"], "failing");
    assert_eq!(details["checks"][1]["name"], "rabbitmq");

    // Liveness does not depend on the parts, and the summary reports without failing.
    let (status, _, body) = call(&app, get_request("/health/live")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "ok", "version": "9.9.9", "checks": []})
    );
    let (status, _, body) = call(&app, get_request("/health")).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "failing");
    assert_eq!(
        body["checks"][1],
        json!({"name": "rabbitmq", "status": "failing", "message": "connection refused"})
    );
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text_beside_the_api() {
    let app = router_with_health(
        Arc::new(FakeBackend::default()),
        FakeProbe::new(Vec::new()),
        Limits::default(),
    );
    let (status, content_type, body) = call(&app, get_request("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, crate::health::METRICS_CONTENT_TYPE);
    assert_eq!(body, "# TYPE up gauge\nup 1\n");

    let (status, _, _) = call(&app, get_request("/api/workflows")).await;
    assert_eq!(status, StatusCode::OK, "the API is still served");
    let (status, _, body) =
        call(&app, Request::post("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        error(serde_json::from_str(&body).unwrap()).error.code,
        "method_not_allowed"
    );
}

#[tokio::test]
async fn a_health_router_alone_serves_no_api() {
    let app = health_router(FakeProbe::new(Vec::new()));
    let (status, _, _) = call(&app, get_request("/health/ready")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&app, get_request("/api/workflows")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        error(serde_json::from_str(&body).unwrap()).error.message,
        "no route for GET /api/workflows"
    );
}

fn open_breaker(agent: &str) -> BreakerSummary {
    BreakerSummary {
        agent: agent.into(),
        state: "open".into(),
        failure_rate: 0.75,
        window: 4,
        opened_at: Some(Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()),
        next_probe_at: Some(Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 30).unwrap()),
        held_steps: 2,
        reset_by: None,
        reset_at: None,
    }
}

fn worker(id: &str, health: &str) -> WorkerStatus {
    WorkerStatus {
        worker_id: id.into(),
        health: health.into(),
        agents: vec!["echo".into()],
        actions: Vec::new(),
        concurrency: 4,
        in_flight: 1,
        last_seen: Utc::now(),
        sdk: Some("flotilla-worker/0.1.0".into()),
        host: Some("host".into()),
        pid: Some(7),
        labels: Map::new(),
        started_at: None,
    }
}

#[tokio::test]
async fn breakers_are_listed_with_their_state_and_held_steps() {
    let backend = FakeBackend::default();
    backend.state().breakers = vec![open_breaker("flaky")];
    let api = Api::new(backend);
    let (status, body) = api.get("/api/agents/breakers").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"breakers": [{
            "agent": "flaky", "state": "open", "failureRate": 0.75, "window": 4,
            "openedAt": "2030-01-01T00:00:00Z", "nextProbeAt": "2030-01-01T00:00:30Z",
            "heldSteps": 2
        }]})
    );
}

#[tokio::test]
async fn an_operator_resets_a_breaker_by_agent_name() {
    let backend = FakeBackend::default();
    backend.state().breakers = vec![open_breaker("flaky")];
    let api = Api::new(backend);
    let (status, _, body) = api
        .post_with_headers("/api/agents/flaky/breaker/reset", json!({}), actor("ana"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "closed");
    assert_eq!(body["resetBy"], "ana");
    assert_eq!(
        api.backend.state().breakers[0].reset_by.as_deref(),
        Some("ana")
    );

    let (status, body) = api
        .post("/api/agents/nobody/breaker/reset", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("agent `nobody` has no circuit breaker"),
        "{message}"
    );
}

#[tokio::test]
async fn agents_are_listed_with_their_workers_and_health() {
    let backend = FakeBackend::default();
    backend.state().agents = vec![AgentStatus {
        name: "echo".into(),
        health: "healthy".into(),
        workers: vec![worker("w1", "healthy"), worker("w2", "unhealthy")],
        queue_depth: Some(3),
        waiting_steps: 2,
        oldest_waiting_ms: Some(1500),
    }];
    let api = Api::new(backend);

    let (status, body) = api.get("/api/agents").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["agents"][0]["name"], "echo");
    assert_eq!(body["agents"][0]["workers"][1]["health"], "unhealthy");
    assert_eq!(body["agents"][0]["queueDepth"], 3);
    assert_eq!(body["agents"][0]["oldestWaitingMs"], 1500);

    let (status, body) = api.get("/api/agents/echo").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["workers"][0]["workerId"], "w1");

    let (status, body) = api.get("/api/agents/echo/health").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["health"], "healthy");
    assert_eq!(body["healthyWorkers"], 1);
    assert_eq!(body["unhealthyWorkers"], 1);
    assert_eq!(body["waitingSteps"], 2);

    let (status, body) = api.get("/api/agents/ghost").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`ghost`"),
        "{body}"
    );
    let (status, body) = api.get("/api/agents/ghost/health").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["health"], "no_workers");
}

#[tokio::test]
async fn agent_metrics_fill_every_bucket_of_the_range() {
    let backend = FakeBackend::default();
    let busy = AttemptFigures {
        executions: 4,
        errors: 1,
        run_time_ms: Some([10.0, 20.0, 30.0]),
    };
    backend.state().figures = (
        AttemptFigures {
            executions: 5,
            errors: 2,
            run_time_ms: Some([11.0, 21.0, 31.0]),
        },
        vec![
            (0, busy.clone()),
            (
                29,
                AttemptFigures {
                    executions: 1,
                    errors: 1,
                    run_time_ms: None,
                },
            ),
        ],
    );
    let api = Api::new(backend);

    let (status, body) = api.get("/api/agents/echo/metrics?range=15m").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["agent"], "echo");
    assert_eq!(body["range"], "15m");
    assert_eq!(body["executions"], 5);
    assert_eq!(body["errors"], 2);
    assert_eq!(body["errorRate"], 0.4);
    assert_eq!(body["p95Ms"], 21.0);
    assert_eq!(body["bucketMs"], 30_000);
    let series = body["series"].as_array().unwrap();
    assert_eq!(series.len(), 30);
    assert_eq!(series[0]["executions"], 4);
    assert_eq!(series[0]["p99Ms"], 30.0);
    assert_eq!(series[1]["executions"], 0);
    assert!(series[1].get("p50Ms").is_none(), "{}", series[1]);
    assert_eq!(series[29]["errors"], 1);
    let since: chrono::DateTime<Utc> = serde_json::from_value(body["since"].clone()).unwrap();
    let last: chrono::DateTime<Utc> = serde_json::from_value(series[29]["start"].clone()).unwrap();
    assert_eq!(last - since, chrono::Duration::seconds(29 * 30));
    {
        let state = api.backend.state();
        let (agent, since, until, bucket) = &state.figure_queries[0];
        assert_eq!(agent, "echo");
        assert_eq!(*until - *since, chrono::Duration::minutes(15));
        assert_eq!(*bucket, std::time::Duration::from_secs(30));
    }

    let (status, body) = api.get("/api/agents/echo/metrics?range=forever").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("forever"),
        "{body}"
    );
    assert_eq!(api.backend.state().figure_queries.len(), 1);
}

#[tokio::test]
async fn the_event_stream_starts_by_naming_no_run_then_names_each_change() {
    let backend = FakeBackend::default();
    let run = Uuid::from_u128(7);
    backend.state().changes = vec![
        RunsChanged {
            runs: Some(vec![run]),
        },
        RunsChanged { runs: None },
    ];
    let api = Api::new(backend);

    let response = api
        .router
        .clone()
        .oneshot(Request::get("/api/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert_eq!(
        text,
        format!(
            "event: runs\ndata: {{}}\n\nevent: runs\ndata: {{\"runs\":[\"{run}\"]}}\n\n\
             event: runs\ndata: {{}}\n\n"
        )
    );
}

#[tokio::test]
async fn the_dashboard_is_served_with_its_assets_and_nothing_else() {
    let api = Api::new(FakeBackend::default());
    for (path, kind, needle) in [
        ("/dashboard", "text/html", "<title>Flotilla</title>"),
        ("/dashboard/app.js", "text/javascript", "/api/events"),
        ("/dashboard/app.css", "text/css", "prefers-color-scheme"),
    ] {
        let response = api
            .router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers().clone();
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}: {headers:?}"
        );
        assert!(
            headers[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("connect-src 'self'"),
            "{path}"
        );
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains(needle), "{path} lacks {needle}");
    }
    let (status, body) = api.get("/dashboard/secrets.txt").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`secrets.txt`"),
        "{body}"
    );
}
