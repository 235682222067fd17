//! The routes against an in-memory stand-in for the coordinator.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::{Body, to_bytes};
use axum::http::{HeaderValue, Request, header};
use chrono::{TimeZone, Utc};
use flotilla_api_model::{DeadLetterSummary, ErrorBody, Metrics};
use serde_json::{Map, json};
use tower::ServiceExt;

use super::*;
use crate::BackendError;

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
struct FakeBackend {
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
    /// Answered by the next call instead of doing anything.
    next_failure: Option<BackendError>,
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

impl Backend for FakeBackend {
    async fn submit(&self, submission: Submission) -> Result<Submitted, BackendError> {
        let mut state = self.check()?;
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

    async fn run(&self, id: Uuid) -> Result<Option<WorkflowResult>, BackendError> {
        let state = self.check()?;
        Ok(state.runs.iter().find(|r| r.workflow_id == id).cloned())
    }

    async fn runs(&self, query: RunQuery) -> Result<RunPage, BackendError> {
        let mut state = self.check()?;
        state.run_queries.push(query);
        Ok(RunPage {
            workflows: Vec::new(),
            next_cursor: None,
        })
    }

    async fn register_definition(
        &self,
        definition: Definition,
    ) -> Result<DefinitionSummary, BackendError> {
        let mut state = self.check()?;
        let revision = state
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
        state.definitions.push((definition, summary.clone()));
        Ok(summary)
    }

    async fn definitions(&self) -> Result<Vec<DefinitionSummary>, BackendError> {
        let state = self.check()?;
        Ok(state.definitions.iter().map(|(_, s)| s.clone()).collect())
    }

    async fn definition(&self, name: &str) -> Result<Option<Definition>, BackendError> {
        let state = self.check()?;
        Ok(state
            .definitions
            .iter()
            .rev()
            .find(|(d, _)| d.name == name)
            .map(|(d, _)| d.clone()))
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

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let (status, _, body) = self
            .send(Request::get(uri).body(Body::empty()).unwrap())
            .await;
        (status, body)
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
        name: "build".into(),
        status: "running".into(),
        start_time: Utc.timestamp_opt(1_750_000_000, 0).unwrap(),
        end_time: None,
        duration: None,
        params: Map::new(),
        steps: Vec::new(),
        metrics: Metrics::default(),
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
    assert_eq!(
        Value::Object(state.submissions[0].params.clone()),
        json!({"env": "staging", "retries": 1})
    );
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
            json!({"workflow": "build", "version": "1.0.0"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = error(body).error;
    assert!(
        err.message.contains("unknown field `version`"),
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
    assert_eq!(
        api.backend.state().run_queries,
        [
            RunQuery {
                status: None,
                limit: Some(DEFAULT_RUN_LIMIT),
                cursor: None,
            },
            RunQuery {
                status: Some("failure".into()),
                limit: Some(500),
                cursor: Some("abc=".into()),
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
    let (status, body) = api.get("/api/agents").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error(body).error.message, "no route for GET /api/agents");

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
