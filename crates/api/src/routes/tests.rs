//! The routes against an in-memory stand-in for the coordinator.

use std::sync::Mutex;

use axum::body::{Body, to_bytes};
use axum::http::{Request, header};
use chrono::{TimeZone, Utc};
use flotilla_api_model::{ErrorBody, Metrics};
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
    submissions: Vec<Submission>,
    runs: Vec<WorkflowResult>,
    run_queries: Vec<RunQuery>,
    definitions: Vec<(Definition, DefinitionSummary)>,
    /// Answered by the next call instead of doing anything.
    next_failure: Option<BackendError>,
}

impl FakeBackend {
    fn with_run(run: WorkflowResult) -> Self {
        let backend = Self::default();
        backend.state().runs.push(run);
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
    async fn submit(&self, submission: Submission) -> Result<Uuid, BackendError> {
        let mut state = self.check()?;
        state.submissions.push(submission);
        Ok(Uuid::from_u128(state.submissions.len() as u128))
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
        let request = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (status, _, body) = self.send(request).await;
        (status, body)
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
