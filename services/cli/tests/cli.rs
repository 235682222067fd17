//! The `flotilla` binary against the real HTTP API (`flotilla-api`), served on a local port with a
//! scripted stand-in for the coordinator behind it. Each test asserts what a user sees: stdout,
//! stderr and the exit code.

use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{TimeZone, Utc};
use flotilla_api::{Backend, BackendError, Limits, Submission};
use flotilla_api_model::{
    DefinitionSummary, Metrics, RunPage, RunQuery, RunSummary, StepResult, WorkflowResult,
};
use flotilla_core::Definition;
use serde_json::{Map, Value, json};
use uuid::Uuid;

const RUN_ID: Uuid = Uuid::from_u128(0x0196_0000_0000_7000_8000_0000_0000_0001);

const WORKFLOW: &str = "\
name: build
version: 1.0.0
params:
  env: staging
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

/// Stands in for the coordinator: answers `run` from a script and records what it is given.
#[derive(Default)]
struct Coordinator {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What successive `run` calls for [`RUN_ID`] answer; the last one repeats.
    script: Vec<WorkflowResult>,
    polls: usize,
    submissions: Vec<Submission>,
    queries: Vec<RunQuery>,
    definitions: Vec<DefinitionSummary>,
}

impl Coordinator {
    fn scripted(script: Vec<WorkflowResult>) -> Arc<Self> {
        let coordinator = Self::default();
        coordinator.state().script = script;
        Arc::new(coordinator)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("no test thread panicked holding the lock")
    }
}

impl Backend for Coordinator {
    async fn submit(&self, submission: Submission) -> Result<Uuid, BackendError> {
        self.state().submissions.push(submission);
        Ok(RUN_ID)
    }

    async fn run(&self, id: Uuid) -> Result<Option<WorkflowResult>, BackendError> {
        let mut state = self.state();
        if id != RUN_ID || state.script.is_empty() {
            return Ok(None);
        }
        let answer = state.script[state.polls.min(state.script.len() - 1)].clone();
        state.polls += 1;
        Ok(Some(answer))
    }

    async fn runs(&self, query: RunQuery) -> Result<RunPage, BackendError> {
        let mut state = self.state();
        state.queries.push(query);
        Ok(RunPage {
            workflows: state
                .script
                .last()
                .map(|r| RunSummary {
                    workflow_id: r.workflow_id,
                    name: r.name.clone(),
                    status: r.status.clone(),
                    start_time: r.start_time,
                    end_time: r.end_time,
                    duration: r.duration,
                })
                .into_iter()
                .collect(),
            next_cursor: Some("page-2".into()),
        })
    }

    async fn register_definition(
        &self,
        definition: Definition,
    ) -> Result<DefinitionSummary, BackendError> {
        let mut state = self.state();
        let summary = DefinitionSummary {
            name: definition.name,
            version: definition.version,
            revision: state.definitions.len() as i64 + 1,
            description: definition.description,
            steps: definition.steps.len(),
            hash: "9f86d081884c7d659a2feaa0".into(),
            created_at: Utc.timestamp_opt(1_750_000_000, 0).unwrap(),
        };
        state.definitions.push(summary.clone());
        Ok(summary)
    }

    async fn definitions(&self) -> Result<Vec<DefinitionSummary>, BackendError> {
        Ok(self.state().definitions.clone())
    }

    async fn definition(&self, _name: &str) -> Result<Option<Definition>, BackendError> {
        Ok(None)
    }
}

/// Serves the API over `coordinator` on a free local port; answers its base URL.
async fn serve(coordinator: Arc<Coordinator>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = flotilla_api::router(coordinator, Limits::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn flotilla(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env("FLOTILLA_URL", url)
        .output()
        .await
        .expect("the binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes `text` to a file of its own for this test.
fn workflow_file(test: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn step(id: &str, status: &str, attempts: u32, error: Option<&str>) -> StepResult {
    StepResult {
        step_id: id.into(),
        agent: "agent".into(),
        action: id.into(),
        status: status.into(),
        attempts,
        start_time: None,
        end_time: None,
        output: None,
        error: error.map(Into::into),
        next_attempt_at: None,
    }
}

fn result(status: &str, steps: Vec<StepResult>) -> WorkflowResult {
    let count = |s: &str| steps.iter().filter(|step| step.status == s).count();
    let finished = status == "success" || status == "failure";
    WorkflowResult {
        workflow_id: RUN_ID,
        name: "build".into(),
        status: status.into(),
        start_time: Utc.timestamp_opt(1_750_000_000, 0).unwrap(),
        end_time: finished.then(|| Utc.timestamp_opt(1_750_000_003, 0).unwrap()),
        duration: finished.then_some(3_000),
        params: Map::new(),
        metrics: Metrics {
            total_steps: steps.len(),
            successful_steps: count("success"),
            failed_steps: count("failure"),
            skipped_steps: count("skipped"),
        },
        steps,
    }
}

#[tokio::test]
async fn execute_and_wait_for_success_exits_0() {
    let coordinator = Coordinator::scripted(vec![
        result(
            "running",
            vec![
                step("scaffold", "running", 1, None),
                step("deploy", "pending", 0, None),
            ],
        ),
        result(
            "success",
            vec![
                step("scaffold", "success", 1, None),
                step("deploy", "success", 2, None),
            ],
        ),
    ]);
    let url = serve(Arc::clone(&coordinator)).await;
    let file = workflow_file("execute_success", WORKFLOW);
    let output = flotilla(
        &url,
        &[
            "workflows",
            "execute",
            file.to_str().unwrap(),
            "--param",
            "env=production",
            "-p",
            "replicas=3",
            "--wait",
        ],
    )
    .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let out = stdout(&output);
    assert_eq!(
        out.lines().next(),
        Some(RUN_ID.to_string().as_str()),
        "{out}"
    );
    assert!(out.contains("Status    success"), "{out}");
    assert!(out.contains("Duration  3.0s"), "{out}");
    assert!(out.contains("deploy    success  2"), "{out}");

    let state = coordinator.state();
    assert!(state.polls >= 2, "the CLI stopped before the run ended");
    assert_eq!(
        Value::Object(state.submissions[0].params.clone()),
        json!({"env": "production", "replicas": 3})
    );
}

#[tokio::test]
async fn execute_and_wait_for_failure_exits_1() {
    let coordinator = Coordinator::scripted(vec![result(
        "failure",
        vec![
            step("scaffold", "failure", 3, Some("template not found")),
            step("deploy", "skipped", 0, None),
        ],
    )]);
    let url = serve(coordinator).await;
    let file = workflow_file("execute_failure", WORKFLOW);
    let output = flotilla(
        &url,
        &["workflows", "execute", file.to_str().unwrap(), "--wait"],
    )
    .await;

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(out.contains("Status    failure"), "{out}");
    assert!(
        out.contains("scaffold  failure  3         template not found"),
        "{out}"
    );
}

#[tokio::test]
async fn execute_without_wait_prints_only_the_id() {
    let coordinator = Coordinator::scripted(Vec::new());
    let url = serve(Arc::clone(&coordinator)).await;
    let file = workflow_file("execute_no_wait", WORKFLOW);
    let output = flotilla(&url, &["workflows", "execute", file.to_str().unwrap()]).await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{RUN_ID}\n"));
    let state = coordinator.state();
    assert_eq!(state.polls, 0);
    assert_eq!(
        Value::Object(state.submissions[0].params.clone()),
        json!({"env": "staging"})
    );
}

#[tokio::test]
async fn an_invalid_definition_prints_the_problems_and_exits_2() {
    let coordinator = Coordinator::scripted(Vec::new());
    let url = serve(Arc::clone(&coordinator)).await;
    let file = workflow_file("invalid_definition", CYCLE);
    let output = flotilla(&url, &["workflows", "execute", file.to_str().unwrap()]).await;

    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.starts_with("error: workflow `loop` is not valid:\n  - dependency cycle: "),
        "{err}"
    );
    assert!(stdout(&output).is_empty());
    assert!(coordinator.state().submissions.is_empty());
}

#[tokio::test]
async fn an_unreachable_coordinator_is_named_and_exits_2() {
    // A port that was free a moment ago and that nothing listens on now.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);

    let output = flotilla(&url, &["workflows", "list"]).await;
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains(&format!("at {url}/")), "{err}");
    assert!(err.contains("flotilla-coordinator"), "{err}");
}

#[tokio::test]
async fn status_prints_the_run_as_json() {
    let run = result("running", vec![step("scaffold", "running", 1, None)]);
    let url = serve(Coordinator::scripted(vec![run.clone()])).await;
    let output = flotilla(
        &url,
        &[
            "workflows",
            "status",
            &RUN_ID.to_string(),
            "--output",
            "json",
        ],
    )
    .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed: WorkflowResult = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed, run);
}

#[tokio::test]
async fn status_of_an_unknown_run_exits_2() {
    let url = serve(Coordinator::scripted(Vec::new())).await;
    let id = Uuid::nil();
    let output = flotilla(&url, &["workflows", "status", &id.to_string()]).await;

    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        format!("error: workflow run {id} not found\n")
    );
}

#[tokio::test]
async fn list_shows_a_table_and_passes_the_filters() {
    let coordinator = Coordinator::scripted(vec![result(
        "success",
        vec![step("scaffold", "success", 1, None)],
    )]);
    let url = serve(Arc::clone(&coordinator)).await;
    let output = flotilla(
        &url,
        &["workflows", "list", "--status", "success", "--limit", "5"],
    )
    .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(out.starts_with("ID "), "{out}");
    assert!(
        out.contains(&format!(
            "{RUN_ID}  build  success  2025-06-15 15:06:40 UTC  3.0s"
        )),
        "{out}"
    );
    assert!(stderr(&output).contains("--cursor page-2"));
    assert_eq!(
        coordinator.state().queries,
        [RunQuery {
            status: Some("success".into()),
            limit: Some(5),
            cursor: None,
        }]
    );
}

#[tokio::test]
async fn list_with_an_unknown_status_prints_the_server_message() {
    let url = serve(Coordinator::scripted(Vec::new())).await;
    let output = flotilla(&url, &["workflows", "list", "--status", "done"]).await;

    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).starts_with("error: unknown status `done`"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn definitions_are_registered_and_listed() {
    let url = serve(Coordinator::scripted(Vec::new())).await;
    let file = workflow_file("register", WORKFLOW);
    let output = flotilla(&url, &["definitions", "register", file.to_str().unwrap()]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "registered `build` revision 1 (version 1.0.0, 2 steps, hash 9f86d081884c)\n"
    );

    let output = flotilla(&url, &["definitions", "list"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "\
NAME   REVISION  VERSION  STEPS  CREATED                  HASH
build  1         1.0.0    2      2025-06-15 15:06:40 UTC  9f86d081884c
"
    );
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let url = serve(Coordinator::scripted(Vec::new())).await;
    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-such-workflow.yaml");
    let output = flotilla(&url, &["workflows", "execute", missing.to_str().unwrap()]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).starts_with(&format!("error: could not read {}", missing.display())),
        "{}",
        stderr(&output)
    );

    let file = workflow_file("usage", WORKFLOW);
    let output = flotilla(
        &url,
        &[
            "workflows",
            "execute",
            file.to_str().unwrap(),
            "-p",
            "a=1",
            "-p",
            "a=2",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--param `a` is given more than once"));

    let output = flotilla(&url, &["workflows", "status", "not-a-uuid"]).await;
    assert_eq!(output.status.code(), Some(2));
}
