//! The `flotilla` binary against the real HTTP API (`flotilla-api`), served on a local port with a
//! scripted stand-in for the coordinator behind it. Each test asserts what a user sees: stdout,
//! stderr and the exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{TimeZone, Utc};
use flotilla_api::{Backend, BackendError, LatestDefinition, Limits, Namespaces, Submission};
use flotilla_api_model::{
    BreakerList, BreakerSummary, DeadLetterList, DeadLetterQuery, DeadLetterSummary,
    DefinitionSummary, ExecuteResponse, Metrics, OperateResponse, Operation, RedriveOutcome,
    RedriveResponse, RunEvent, RunEventList, RunPage, RunQuery, RunSummary, StepResult, Submitted,
    WorkflowResult,
};
use flotilla_core::Definition;
use serde_json::{Map, Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
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
    /// Submissions that started a run (every one starts [`RUN_ID`]).
    submissions: Vec<Submission>,
    /// The idempotency key of every submission, replayed or not, in order.
    keys: Vec<Option<String>>,
    queries: Vec<RunQuery>,
    definitions: Vec<DefinitionSummary>,
    /// Newest first. A redrive retries those not redriven yet, except the step `ended`'s.
    dead_letters: Vec<DeadLetterSummary>,
    dead_letter_queries: Vec<DeadLetterQuery>,
    redrives: Vec<Vec<Uuid>>,
    /// Answered by a redrive instead of doing anything.
    redrive_failure: Option<BackendError>,
    /// Every operator action asked for on [`RUN_ID`], with its actor.
    operations: Vec<(Operation, String)>,
    /// Answered by every operator action on [`RUN_ID`] instead of doing it.
    refusal: Option<String>,
    /// The history of [`RUN_ID`].
    history: Vec<RunEvent>,
    schedules: Vec<flotilla_api_model::ScheduleSummary>,
    breakers: Vec<BreakerSummary>,
    /// Every breaker reset asked for: the agent and the actor.
    resets: Vec<(String, String)>,
}

impl Coordinator {
    fn scripted(script: Vec<WorkflowResult>) -> Arc<Self> {
        let coordinator = Self::default();
        coordinator.state().script = script;
        Arc::new(coordinator)
    }

    fn with_dead_letters(dead_letters: Vec<DeadLetterSummary>) -> Arc<Self> {
        let coordinator = Self::default();
        coordinator.state().dead_letters = dead_letters;
        Arc::new(coordinator)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("no test thread panicked holding the lock")
    }
}

impl Backend for Coordinator {
    async fn submit(&self, submission: Submission) -> Result<Submitted, BackendError> {
        let mut state = self.state();
        let key = submission.idempotency_key.clone();
        let replayed = key.is_some() && state.keys.contains(&key);
        state.keys.push(key);
        if !replayed {
            state.submissions.push(submission);
        }
        Ok(Submitted {
            workflow_id: RUN_ID,
            replayed,
        })
    }

    async fn run(
        &self,
        _namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<WorkflowResult>, BackendError> {
        let mut state = self.state();
        if id != RUN_ID || state.script.is_empty() {
            return Ok(None);
        }
        let answer = state.script[state.polls.min(state.script.len() - 1)].clone();
        state.polls += 1;
        Ok(Some(answer))
    }

    async fn runs(
        &self,
        _namespaces: &Namespaces,
        query: RunQuery,
    ) -> Result<RunPage, BackendError> {
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
        _namespace: &str,
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

    async fn definitions(
        &self,
        _namespaces: &Namespaces,
    ) -> Result<Vec<DefinitionSummary>, BackendError> {
        Ok(self.state().definitions.clone())
    }

    async fn definition(
        &self,
        _namespace: &str,
        _name: &str,
    ) -> Result<Option<LatestDefinition>, BackendError> {
        Ok(None)
    }

    async fn dead_letters(
        &self,
        query: DeadLetterQuery,
    ) -> Result<Vec<DeadLetterSummary>, BackendError> {
        let mut state = self.state();
        state.dead_letter_queries.push(query);
        Ok(state.dead_letters.clone())
    }

    async fn redrive(&self, ids: Vec<Uuid>) -> Result<Vec<RedriveOutcome>, BackendError> {
        let mut state = self.state();
        if let Some(err) = state.redrive_failure.take() {
            return Err(err);
        }
        state.redrives.push(ids.clone());
        Ok(state
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
            .collect())
    }

    /// [`RUN_ID`] has the steps `build` and `deploy`; an action that is not refused leaves the
    /// run `cancelled`, `paused` or `running`.
    async fn operate(
        &self,
        _namespaces: &Namespaces,
        id: Uuid,
        operation: Operation,
        actor: String,
    ) -> Result<String, BackendError> {
        let mut state = self.state();
        if id != RUN_ID {
            return Err(BackendError::NotFound(format!("no run has id {id}")));
        }
        state.operations.push((operation.clone(), actor));
        if let Some(step) = operation.step()
            && !["build", "deploy"].contains(&step)
        {
            return Err(BackendError::NotFound(format!(
                "run {id} has no step `{step}`"
            )));
        }
        if let Some(reason) = &state.refusal {
            return Err(BackendError::Conflict(reason.clone()));
        }
        Ok(match operation {
            Operation::Cancel => "cancelled",
            Operation::Pause => "paused",
            _ => "running",
        }
        .to_string())
    }

    async fn events(
        &self,
        _namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<Vec<RunEvent>>, BackendError> {
        Ok((id == RUN_ID).then(|| self.state().history.clone()))
    }

    async fn attempts_since(
        &self,
        _since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<flotilla_api_model::AgentSummary>, BackendError> {
        Ok(Vec::new())
    }

    async fn agent_attempts(
        &self,
        _agent: &str,
        _since: chrono::DateTime<chrono::Utc>,
        _until: chrono::DateTime<chrono::Utc>,
        _bucket: std::time::Duration,
    ) -> Result<
        (
            flotilla_api::AttemptFigures,
            Vec<(u64, flotilla_api::AttemptFigures)>,
        ),
        BackendError,
    > {
        Ok(Default::default())
    }

    // The CLI reads no event stream.
    fn changes(
        &self,
        _namespaces: Namespaces,
    ) -> impl futures_util::Stream<Item = flotilla_api_model::RunsChanged> + Send + use<> {
        futures_util::stream::empty()
    }

    // `flotilla doctor` is tested against a live fleet (tests/tests/doctor.rs).
    async fn health_audit(
        &self,
        _since: chrono::DateTime<chrono::Utc>,
        _targets: flotilla_api_model::HealthTargets,
    ) -> Result<Vec<flotilla_api_model::HealthAuditCheck>, BackendError> {
        Ok(Vec::new())
    }

    // `flotilla agents` is tested against a live coordinator (tests/tests/registry.rs).
    async fn agents(
        &self,
        _agent: Option<&str>,
    ) -> Result<Vec<flotilla_api_model::AgentStatus>, BackendError> {
        Ok(Vec::new())
    }

    // Reports are tested against a live coordinator (tests/tests/operator.rs).
    async fn report(
        &self,
        _namespaces: &Namespaces,
        _id: Uuid,
    ) -> Result<Option<flotilla_api_model::RunReport>, BackendError> {
        Ok(None)
    }

    // Logs are tested against a live fleet (tests/tests/logs.rs).
    async fn logs(
        &self,
        _namespaces: &flotilla_api::Namespaces,
        _id: Uuid,
        _query: flotilla_api_model::LogQuery,
    ) -> Result<Option<flotilla_api_model::StepLogs>, BackendError> {
        Ok(None)
    }

    // Versions are tested against a live coordinator (tests/tests/operator.rs).
    async fn definition_versions(
        &self,
        _namespace: &str,
        name: &str,
    ) -> Result<Vec<DefinitionSummary>, BackendError> {
        let state = self.state();
        Ok(state
            .definitions
            .iter()
            .filter(|d| d.name == name)
            .cloned()
            .collect())
    }

    async fn definition_detail(
        &self,
        _namespace: &str,
        name: &str,
        _version: Option<&str>,
    ) -> Result<Option<flotilla_api_model::DefinitionDetail>, BackendError> {
        Ok(self
            .state()
            .definitions
            .iter()
            .rev()
            .find(|d| d.name == name)
            .map(|d| flotilla_api_model::DefinitionDetail {
                summary: d.clone(),
                definition: serde_json::json!({"name": d.name}),
            }))
    }

    // The schedule commands are tested against a live coordinator (tests/tests/operator.rs);
    // these keep what they are given.
    async fn put_schedule(
        &self,
        new: flotilla_api::NewSchedule,
    ) -> Result<flotilla_api_model::ScheduleSummary, BackendError> {
        let summary = flotilla_api_model::ScheduleSummary {
            id: new.definition.clone(),
            definition: new.definition,
            cron: new.schedule.cron.clone(),
            timezone: new.schedule.timezone.clone(),
            missed: "skip".into(),
            overlap: "skip".into(),
            params: new.params,
            next_at: new.schedule.next_after(chrono::Utc::now()).unwrap(),
            last_run_id: None,
            created_at: chrono::Utc::now(),
        };
        self.state().schedules.push(summary.clone());
        Ok(summary)
    }

    async fn schedules(
        &self,
        _namespaces: &Namespaces,
    ) -> Result<Vec<flotilla_api_model::ScheduleSummary>, BackendError> {
        Ok(self.state().schedules.clone())
    }

    async fn schedule(
        &self,
        _namespace: &str,
        id: &str,
    ) -> Result<Option<flotilla_api_model::ScheduleSummary>, BackendError> {
        Ok(self.state().schedules.iter().find(|s| s.id == id).cloned())
    }

    async fn delete_schedule(&self, _namespace: &str, id: &str) -> Result<bool, BackendError> {
        let mut state = self.state();
        let before = state.schedules.len();
        state.schedules.retain(|s| s.id != id);
        Ok(state.schedules.len() < before)
    }

    async fn breakers(&self) -> Result<Vec<BreakerSummary>, BackendError> {
        Ok(self.state().breakers.clone())
    }

    async fn reset_breaker(
        &self,
        agent: &str,
        actor: String,
    ) -> Result<Option<BreakerSummary>, BackendError> {
        let mut state = self.state();
        state.resets.push((agent.to_string(), actor.clone()));
        Ok(state
            .breakers
            .iter()
            .find(|b| b.agent == agent)
            .map(|b| BreakerSummary {
                state: "closed".into(),
                failure_rate: 0.0,
                window: 0,
                opened_at: None,
                next_probe_at: None,
                held_steps: 0,
                reset_by: Some(actor),
                ..b.clone()
            }))
    }
}

/// Serves the API over `coordinator` on a free local port; answers its address.
async fn serve_at(coordinator: Arc<Coordinator>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = flotilla_api::router(coordinator, Limits::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Serves the API over `coordinator` on a free local port; answers its base URL.
async fn serve(coordinator: Arc<Coordinator>) -> String {
    format!("http://{}", serve_at(coordinator).await)
}

/// How a [`FlakyProxy`] spoils a connection.
#[derive(Debug, Clone, Copy)]
enum Spoil {
    /// Closed as soon as it is accepted: the request never reaches the coordinator.
    Drop,
    /// The request is forwarded, and the connection closed once the coordinator starts to
    /// answer: the request took effect, and the client never learns how.
    LoseAnswer,
}

/// A TCP proxy in front of the API that spoils the first `spoiled` connections and forwards
/// the later ones.
struct FlakyProxy {
    url: String,
    /// Connections accepted so far.
    connections: Arc<AtomicUsize>,
}

impl FlakyProxy {
    async fn start(upstream: SocketAddr, spoil: Spoil, spoiled: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let n = accepted.fetch_add(1, Ordering::SeqCst);
                match spoil {
                    _ if n >= spoiled => {
                        tokio::spawn(forward(client, upstream));
                    }
                    Spoil::Drop => drop(client),
                    Spoil::LoseAnswer => {
                        tokio::spawn(lose_answer(client, upstream));
                    }
                }
            }
        });
        Self { url, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr) {
    let mut server = TcpStream::connect(upstream).await.unwrap();
    // The client closing its connection ends this; how is not the test's business.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// Forwards the request, and closes both connections when the first byte of the answer comes:
/// axum answers only once the handler has returned, so the coordinator has done its part.
async fn lose_answer(mut client: TcpStream, upstream: SocketAddr) {
    let mut server = TcpStream::connect(upstream).await.unwrap();
    let (mut from_client, _) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let mut first = [0u8; 1];
    tokio::select! {
        _ = tokio::io::copy(&mut from_client, &mut to_server) => {
            panic!("the client closed the connection before it was answered");
        }
        read = from_server.read(&mut first) => {
            assert_eq!(read.unwrap(), 1, "the coordinator closed without answering");
        }
    }
}

async fn flotilla(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env("FLOTILLA_URL", url)
        .output()
        .await
        .expect("the binary runs")
}

/// Runs an operator command as the user `user` (`None`: no `USER` at all) on the host
/// `build-box`.
async fn flotilla_as(url: &str, user: Option<&str>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla"));
    command
        .args(args)
        .env("FLOTILLA_URL", url)
        .env("HOSTNAME", "build-box");
    match user {
        Some(user) => command.env("USER", user),
        None => command.env_remove("USER"),
    };
    command.output().await.expect("the binary runs")
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
        strike: 1,
        held: None,
        workflow: None,
        child_workflow_id: None,
        waiting_for_worker: false,
    }
}

fn result(status: &str, steps: Vec<StepResult>) -> WorkflowResult {
    let count = |s: &str| steps.iter().filter(|step| step.status == s).count();
    let finished = status == "success" || status == "failure";
    WorkflowResult {
        workflow_id: RUN_ID,
        trace_id: flotilla_api_model::trace_id(RUN_ID),
        name: "build".into(),
        status: status.into(),
        start_time: Utc.timestamp_opt(1_750_000_000, 0).unwrap(),
        end_time: finished.then(|| Utc.timestamp_opt(1_750_000_003, 0).unwrap()),
        duration: finished.then_some(3_000),
        params: Map::new(),
        only: Vec::new(),
        skip: Vec::new(),
        error: None,
        metrics: Metrics {
            total_steps: steps.len(),
            successful_steps: count("success"),
            failed_steps: count("failure"),
            skipped_steps: count("skipped"),
        },
        parent: None,
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
async fn a_reader_that_stopped_reading_ends_the_command_quietly() {
    // `flotilla workflows status ID | head -1`: the reader is gone before the summary is written.
    let run = result(
        "failure",
        vec![step("scaffold", "failure", 3, Some("boom"))],
    );
    let url = serve(Coordinator::scripted(vec![run])).await;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["workflows", "status", &RUN_ID.to_string()])
        .env("FLOTILLA_URL", &url)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs")
        .wait_with_output()
        .await
        .unwrap();

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stderr(&output), "");
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
            ..RunQuery::default()
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

/// The one key every submission so far was sent with.
fn the_key(coordinator: &Coordinator) -> String {
    let state = coordinator.state();
    let first = state.keys[0].clone().expect("an Idempotency-Key was sent");
    assert!(
        state.keys.iter().all(|k| k.as_ref() == Some(&first)),
        "{:?}",
        state.keys
    );
    first
}

#[tokio::test]
async fn execute_sends_a_new_random_idempotency_key_each_time() {
    let coordinator = Coordinator::scripted(Vec::new());
    let url = serve(Arc::clone(&coordinator)).await;
    let file = workflow_file("execute_keys", WORKFLOW);
    for _ in 0..2 {
        let output = flotilla(&url, &["workflows", "execute", file.to_str().unwrap()]).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    }

    let state = coordinator.state();
    let keys: Vec<Uuid> = state
        .keys
        .iter()
        .map(|k| k.as_deref().expect("a key").parse().expect("a UUID"))
        .collect();
    assert!(keys.iter().all(|k| k.get_version_num() == 4), "{keys:?}");
    assert_ne!(keys[0], keys[1]);
    assert_eq!(state.submissions.len(), 2);
}

#[tokio::test]
async fn a_chosen_idempotency_key_answers_the_first_run() {
    let coordinator = Coordinator::scripted(Vec::new());
    let url = serve(Arc::clone(&coordinator)).await;
    let file = workflow_file("execute_chosen_key", WORKFLOW);
    let args = [
        "workflows",
        "execute",
        file.to_str().unwrap(),
        "--idempotency-key",
        "nightly-2025-06-15",
    ];

    let output = flotilla(&url, &args).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{RUN_ID}\n"));
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));

    let output = flotilla(&url, &[&args[..], &["--output", "json"]].concat()).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed: ExecuteResponse = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed.workflow_id, RUN_ID);
    assert_eq!(
        stderr(&output),
        format!(
            "run {RUN_ID} was started by an earlier request with idempotency key \
             `nightly-2025-06-15`; it was not started again\n"
        )
    );

    assert_eq!(the_key(&coordinator), "nightly-2025-06-15");
    assert_eq!(coordinator.state().keys.len(), 2);
    assert_eq!(coordinator.state().submissions.len(), 1);
}

#[tokio::test]
async fn a_lost_answer_is_asked_for_again_with_the_same_key() {
    let coordinator = Coordinator::scripted(Vec::new());
    let proxy = FlakyProxy::start(
        serve_at(Arc::clone(&coordinator)).await,
        Spoil::LoseAnswer,
        1,
    )
    .await;
    let file = workflow_file("execute_lost_answer", WORKFLOW);
    let output = flotilla(
        &proxy.url,
        &["workflows", "execute", file.to_str().unwrap()],
    )
    .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{RUN_ID}\n"));
    // The replay is of the command's own attempt: nothing to tell the user.
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    assert_eq!(proxy.connections(), 2);
    // Both attempts reached the coordinator under one key, and one run started.
    let key = the_key(&coordinator);
    assert_eq!(coordinator.state().keys.len(), 2, "{key}");
    assert_eq!(coordinator.state().submissions.len(), 1);
}

#[tokio::test]
async fn a_dropped_connection_is_retried() {
    let coordinator = Coordinator::scripted(Vec::new());
    let proxy = FlakyProxy::start(serve_at(Arc::clone(&coordinator)).await, Spoil::Drop, 1).await;
    let file = workflow_file("execute_dropped", WORKFLOW);
    let output = flotilla(
        &proxy.url,
        &["workflows", "execute", file.to_str().unwrap()],
    )
    .await;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{RUN_ID}\n"));
    assert_eq!(proxy.connections(), 2);
    assert_eq!(coordinator.state().keys.len(), 1);
    assert_eq!(coordinator.state().submissions.len(), 1);
}

#[tokio::test]
async fn execute_gives_up_after_5_attempts_and_names_the_key_to_repeat() {
    let coordinator = Coordinator::scripted(Vec::new());
    let proxy = FlakyProxy::start(
        serve_at(Arc::clone(&coordinator)).await,
        Spoil::Drop,
        usize::MAX,
    )
    .await;
    let file = workflow_file("execute_give_up", WORKFLOW);
    let output = flotilla(
        &proxy.url,
        &[
            "workflows",
            "execute",
            file.to_str().unwrap(),
            "--idempotency-key",
            "give-up",
        ],
    )
    .await;

    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.starts_with(&format!(
            "error: no answer from the coordinator at {}/ after 5 attempts",
            proxy.url
        )),
        "{err}"
    );
    assert!(err.contains("`--idempotency-key give-up`"), "{err}");
    assert!(stdout(&output).is_empty());
    assert_eq!(proxy.connections(), 5);
    assert!(coordinator.state().keys.is_empty());
}

#[tokio::test]
async fn execute_against_no_coordinator_says_it_is_unreachable() {
    // A port that was free a moment ago and that nothing listens on now.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let file = workflow_file("execute_unreachable", WORKFLOW);
    let output = flotilla(&url, &["workflows", "execute", file.to_str().unwrap()]).await;

    // No connection was made, so no run can have started: no key to repeat.
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.starts_with(&format!(
            "error: could not reach the Flotilla coordinator at {url}/"
        )),
        "{err}"
    );
    assert!(!err.contains("idempotency"), "{err}");
}

fn dead_letter(n: u128, step: &str) -> DeadLetterSummary {
    DeadLetterSummary {
        id: Uuid::from_u128(0xd0 + n),
        workflow_id: Some(Uuid::from_u128(n)),
        step_id: Some(step.into()),
        attempt: Some(1),
        task_id: Some(Uuid::from_u128(0x70 + n)),
        reason: "delivery limit of 5 reached".into(),
        deliveries: Some(5),
        created_at: Utc.timestamp_opt(1_750_000_000 + n as i64, 0).unwrap(),
        redriven_at: None,
        body: json!({"step_id": step}),
    }
}

#[tokio::test]
async fn dlq_list_shows_a_table_and_passes_the_filters() {
    let coordinator =
        Coordinator::with_dead_letters(vec![dead_letter(2, "ended"), dead_letter(1, "deploy")]);
    let url = serve(Arc::clone(&coordinator)).await;

    let output = flotilla(&url, &["dlq", "list"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "\
ID                                    WORKFLOW                              STEP    ATTEMPT  DELIVERIES  CREATED                  REASON
00000000-0000-0000-0000-0000000000d2  00000000-0000-0000-0000-000000000002  ended   1        5           2025-06-15 15:06:42 UTC  delivery limit of 5 reached
00000000-0000-0000-0000-0000000000d1  00000000-0000-0000-0000-000000000001  deploy  1        5           2025-06-15 15:06:41 UTC  delivery limit of 5 reached
"
    );

    let output = flotilla(
        &url,
        &["dlq", "list", "--all", "--limit", "5", "--output", "json"],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed: DeadLetterList = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed.dead_letters, coordinator.state().dead_letters);

    assert_eq!(
        coordinator.state().dead_letter_queries,
        [
            DeadLetterQuery {
                pending: Some(true),
                limit: Some(50),
            },
            DeadLetterQuery {
                pending: Some(false),
                limit: Some(5),
            },
        ]
    );
}

#[tokio::test]
async fn dlq_list_with_a_bad_limit_prints_the_server_message() {
    let url = serve(Coordinator::scripted(Vec::new())).await;
    let output = flotilla(&url, &["dlq", "list", "--limit", "0"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "error: limit must be between 1 and 500, not 0\n"
    );
}

#[tokio::test]
async fn dlq_redrive_exits_0_only_when_every_one_was_retried() {
    let coordinator =
        Coordinator::with_dead_letters(vec![dead_letter(2, "ended"), dead_letter(1, "deploy")]);
    let url = serve(Arc::clone(&coordinator)).await;
    let [retried, refused] = [1, 2].map(|n| Uuid::from_u128(0xd0 + n).to_string());

    let output = flotilla(&url, &["dlq", "redrive", &retried]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        format!(
            "{retried}: retried as attempt 2 (step `deploy` of run {})\n",
            Uuid::from_u128(1)
        )
    );

    let unknown = Uuid::from_u128(0xee).to_string();
    let output = flotilla(&url, &["dlq", "redrive", &refused, &unknown, &retried]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        format!(
            "\
{refused}: not retried: the run has ended
{unknown}: not retried: no dead letter with this id is waiting to be redriven (there is none, or it was redriven already)
{retried}: retried as attempt 2 (step `deploy` of run {})
",
            Uuid::from_u128(1)
        )
    );

    let output = flotilla(&url, &["dlq", "redrive", "--all", "--output", "json"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let printed: RedriveResponse = serde_json::from_slice(&output.stdout).unwrap();
    let retried_ones: Vec<(String, bool)> = printed
        .redriven
        .iter()
        .map(|o| (o.dead_letter.to_string(), o.retried()))
        .collect();
    assert_eq!(retried_ones, [(refused, false), (retried, true)]);

    assert_eq!(
        coordinator.state().redrives,
        [
            vec![Uuid::from_u128(0xd1)],
            vec![
                Uuid::from_u128(0xd2),
                Uuid::from_u128(0xee),
                Uuid::from_u128(0xd1)
            ],
            vec![],
        ]
    );
}

#[tokio::test]
async fn dlq_redrive_with_nothing_pending_says_so_and_exits_0() {
    let url = serve(Coordinator::scripted(Vec::new())).await;
    let output = flotilla(&url, &["dlq", "redrive", "--all"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "no dead letters to redrive\n");
}

#[tokio::test]
async fn dlq_redrive_errors_exit_2() {
    let coordinator = Coordinator::with_dead_letters(vec![dead_letter(1, "deploy")]);
    coordinator.state().redrive_failure =
        Some(BackendError::Unavailable("RabbitMQ is unreachable".into()));
    let url = serve(Arc::clone(&coordinator)).await;

    let output = flotilla(&url, &["dlq", "redrive", "--all"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stderr(&output), "error: RabbitMQ is unreachable\n");
    assert!(stdout(&output).is_empty());

    let output = flotilla(&url, &["dlq", "redrive"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(coordinator.state().redrives.is_empty());
}

#[tokio::test]
async fn operator_commands_print_the_run_status_and_exit_0() {
    let coordinator = Coordinator::scripted(Vec::new());
    let url = serve(Arc::clone(&coordinator)).await;
    let id = RUN_ID.to_string();
    let cases: [(&[&str], String); 7] = [
        (
            &["cancel", &id],
            format!("run {RUN_ID} cancel: cancelled\n"),
        ),
        (&["pause", &id], format!("run {RUN_ID} pause: paused\n")),
        (&["resume", &id], format!("run {RUN_ID} resume: running\n")),
        (&["retry", &id], format!("run {RUN_ID} retry: running\n")),
        (
            &["retry", &id, "--step", "deploy"],
            format!("run {RUN_ID} retry step `deploy`: running\n"),
        ),
        (
            &["skip", &id, "--step", "build"],
            format!("run {RUN_ID} skip step `build`: running\n"),
        ),
        (
            &[
                "complete",
                &id,
                "--step",
                "deploy",
                "--step-output",
                r#"{"url": "https://staging.example"}"#,
            ],
            format!("run {RUN_ID} complete step `deploy`: running\n"),
        ),
    ];
    for (args, expected) in cases {
        let output = flotilla_as(&url, Some("alice"), &[&["workflows"], args].concat()).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            stderr(&output)
        );
        assert_eq!(stdout(&output), expected, "{args:?}");
        assert!(stderr(&output).is_empty(), "{args:?}: {}", stderr(&output));
    }

    let state = coordinator.state();
    let operations: Vec<&Operation> = state.operations.iter().map(|(o, _)| o).collect();
    assert_eq!(
        operations,
        [
            &Operation::Cancel,
            &Operation::Pause,
            &Operation::Resume,
            &Operation::Retry { step: None },
            &Operation::Retry {
                step: Some("deploy".into())
            },
            &Operation::Skip {
                step: "build".into()
            },
            &Operation::Complete {
                step: "deploy".into(),
                output: json!({"url": "https://staging.example"})
            },
        ]
    );
}

#[tokio::test]
async fn operator_commands_send_who_acts() {
    let coordinator = Coordinator::scripted(Vec::new());
    let url = serve(Arc::clone(&coordinator)).await;
    let id = RUN_ID.to_string();
    for user in [Some("alice"), None, Some("jane doe")] {
        let output = flotilla_as(&url, user, &["workflows", "pause", &id]).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{user:?}: {}",
            stderr(&output)
        );
    }
    let actors: Vec<String> = coordinator
        .state()
        .operations
        .iter()
        .map(|(_, actor)| actor.clone())
        .collect();
    // A user name the header cannot carry as it is still names someone.
    assert_eq!(
        actors,
        ["alice@build-box", "unknown@build-box", "jane_doe@build-box"]
    );
}

#[tokio::test]
async fn operator_commands_print_json_on_request() {
    let url = serve(Coordinator::scripted(Vec::new())).await;
    let output = flotilla_as(
        &url,
        Some("alice"),
        &[
            "workflows",
            "cancel",
            &RUN_ID.to_string(),
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed: OperateResponse = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        printed,
        OperateResponse {
            workflow_id: RUN_ID,
            action: "cancel".into(),
            status: "cancelled".into(),
        }
    );
}

#[tokio::test]
async fn a_refused_operator_command_prints_the_reason_and_exits_1() {
    let coordinator = Coordinator::scripted(Vec::new());
    coordinator.state().refusal = Some("run has ended: it succeeded".into());
    let url = serve(Arc::clone(&coordinator)).await;
    let id = RUN_ID.to_string();
    for args in [
        &["cancel", &id][..],
        &["pause", &id],
        &["resume", &id],
        &["retry", &id],
        &["skip", &id, "--step", "deploy"],
        &["complete", &id, "--step", "deploy", "--step-output", "null"],
    ] {
        let output = flotilla_as(&url, Some("alice"), &[&["workflows"], args].concat()).await;
        assert_eq!(
            output.status.code(),
            Some(1),
            "{args:?}: {}",
            stderr(&output)
        );
        assert_eq!(
            stderr(&output),
            "error: run has ended: it succeeded\n",
            "{args:?}"
        );
        assert!(stdout(&output).is_empty(), "{args:?}");
    }
    assert_eq!(coordinator.state().operations.len(), 6);
}

#[tokio::test]
async fn operator_commands_on_what_does_not_exist_exit_2() {
    let coordinator = Coordinator::scripted(Vec::new());
    let url = serve(Arc::clone(&coordinator)).await;
    let unknown = Uuid::nil().to_string();
    let id = RUN_ID.to_string();
    let cases: [(&[&str], String); 4] = [
        (
            &["cancel", &unknown],
            format!("error: no run has id {unknown}\n"),
        ),
        (
            &["retry", &unknown, "--step", "deploy"],
            format!("error: no run has id {unknown}\n"),
        ),
        (
            &["skip", &id, "--step", "ghost"],
            format!("error: run {RUN_ID} has no step `ghost`\n"),
        ),
        (
            &["complete", &id, "--step", "ghost", "--step-output", "1"],
            format!("error: run {RUN_ID} has no step `ghost`\n"),
        ),
    ];
    for (args, expected) in cases {
        let output = flotilla_as(&url, Some("alice"), &[&["workflows"], args].concat()).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert_eq!(stderr(&output), expected, "{args:?}");
        assert!(stdout(&output).is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn operator_usage_and_connection_errors_exit_2() {
    let coordinator = Coordinator::scripted(Vec::new());
    let url = serve(Arc::clone(&coordinator)).await;
    let id = RUN_ID.to_string();

    let output = flotilla_as(
        &url,
        Some("alice"),
        &[
            "workflows",
            "complete",
            &id,
            "--step",
            "deploy",
            "--step-output",
            "{url: x}",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains("invalid value '{url: x}' for '--step-output <JSON>': not JSON"),
        "{err}"
    );
    for args in [
        &["workflows", "skip", &id][..],
        &["workflows", "pause", "not-a-uuid"],
        &["workflows", "complete", &id, "--step", "deploy"],
    ] {
        let output = flotilla_as(&url, Some("alice"), args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
    assert!(coordinator.state().operations.is_empty());

    // A port that was free a moment ago and that nothing listens on now.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let output = flotilla_as(&nowhere, Some("alice"), &["workflows", "cancel", &id]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).starts_with(&format!(
            "error: could not reach the Flotilla coordinator at {nowhere}/"
        )),
        "{}",
        stderr(&output)
    );
}

fn event(actor: &str, action: &str, step: Option<&str>, detail: Option<Value>) -> RunEvent {
    RunEvent {
        at: Utc.timestamp_opt(1_750_000_060, 0).unwrap(),
        actor: actor.into(),
        action: action.into(),
        step_id: step.map(Into::into),
        detail,
    }
}

#[tokio::test]
async fn history_shows_a_table_or_json() {
    let coordinator = Coordinator::scripted(Vec::new());
    coordinator.state().history = vec![
        event("alice@build-box", "pause", None, None),
        event(
            "bob@laptop",
            "complete",
            Some("deploy"),
            Some(json!({"output": {"url": "https://x"}})),
        ),
    ];
    let url = serve(Arc::clone(&coordinator)).await;
    let id = RUN_ID.to_string();

    let output = flotilla(&url, &["workflows", "history", &id]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "\
TIME                     ACTOR            ACTION    STEP    DETAIL
2025-06-15 15:07:40 UTC  alice@build-box  pause
2025-06-15 15:07:40 UTC  bob@laptop       complete  deploy  {\"output\":{\"url\":\"https://x\"}}
"
    );

    let output = flotilla(&url, &["workflows", "history", &id, "--output", "json"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed: RunEventList = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed.events, coordinator.state().history);
}

#[tokio::test]
async fn history_of_an_unknown_run_exits_2() {
    let url = serve(Coordinator::scripted(Vec::new())).await;
    let unknown = Uuid::nil();
    let output = flotilla(&url, &["workflows", "history", &unknown.to_string()]).await;
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        format!("error: workflow run {unknown} not found\n")
    );

    let output = flotilla(&url, &["workflows", "history", &RUN_ID.to_string()]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "no operator actions recorded for this run\n"
    );
}

#[tokio::test]
async fn waiting_for_a_cancelled_run_ends_with_exit_1() {
    let url = serve(Coordinator::scripted(vec![result(
        "cancelled",
        vec![
            step("scaffold", "success", 1, None),
            step("deploy", "cancelled", 1, None),
        ],
    )]))
    .await;
    let output = flotilla(
        &url,
        &["workflows", "status", &RUN_ID.to_string(), "--wait"],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("Status    cancelled"),
        "{}",
        stdout(&output)
    );
}

#[tokio::test]
async fn agents_breakers_shows_a_table_and_breaker_reset_names_the_operator() {
    let coordinator = Coordinator::scripted(Vec::new());
    coordinator.state().breakers = vec![BreakerSummary {
        agent: "flaky".into(),
        state: "half_open".into(),
        failure_rate: 0.75,
        window: 4,
        opened_at: Some(Utc.with_ymd_and_hms(2025, 6, 15, 15, 6, 41).unwrap()),
        next_probe_at: None,
        held_steps: 3,
        reset_by: None,
        reset_at: None,
    }];
    let url = serve(Arc::clone(&coordinator)).await;

    let output = flotilla(&url, &["agents", "breakers"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "\
AGENT  STATE      FAILED    OPENED                   NEXT PROBE  HELD
flaky  half-open  75% of 4  2025-06-15 15:06:41 UTC              3
"
    );
    let output = flotilla(&url, &["agents", "breakers", "--output", "json"]).await;
    let printed: BreakerList = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed.breakers, coordinator.state().breakers);

    let output = flotilla(&url, &["agents", "breaker-reset", "flaky"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("flaky  closed"),
        "{}",
        stdout(&output)
    );
    let resets = coordinator.state().resets.clone();
    assert_eq!(resets.len(), 1);
    assert_eq!(resets[0].0, "flaky");
    assert!(resets[0].1.contains('@'), "{resets:?}");
}

/// `flotilla completion SHELL` prints a script the shell accepts, offering the subcommands;
/// it needs no coordinator.
#[tokio::test]
async fn completion_scripts_are_printed_for_bash_zsh_and_fish() {
    let nowhere = "http://127.0.0.1:9";
    for (shell, marker) in [
        ("bash", "_flotilla()"),
        ("zsh", "#compdef flotilla"),
        ("fish", "complete -c flotilla"),
    ] {
        let output = flotilla(nowhere, &["completion", shell]).await;
        assert!(output.status.success(), "{shell}: {output:?}");
        let script = stdout(&output);
        for expected in [marker, "workflows", "breaker-reset"] {
            assert!(
                script.contains(expected),
                "{shell}: no {expected} in\n{script}"
            );
        }
    }
    // Bash parses the script it gets.
    let script = stdout(&flotilla(nowhere, &["completion", "bash"]).await);
    let checked = tokio::process::Command::new("bash")
        .args(["-n", "-c", &script])
        .output()
        .await
        .expect("bash runs");
    assert!(checked.status.success(), "{checked:?}");
    let refused = flotilla(nowhere, &["completion", "tcsh"]).await;
    assert_eq!(refused.status.code(), Some(2));
}
