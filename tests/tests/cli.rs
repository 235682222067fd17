//! Every command of the `flotilla` CLI against a live fleet (the real coordinator and an echo
//! worker, on the real Postgres and RabbitMQ): what `--output json` prints parses as the API's
//! models and says what happened, the default output is a table or summary for people, and the
//! exit code is the documented one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use flotilla_api_model::{
    AgentHealth, AgentList, AuditPage, BreakerList, BreakerSummary, CreatedToken, DeadLetterList,
    DefinitionDetail, DefinitionList, DefinitionSummary, ExecuteResponse, MetricsSummary,
    OperateResponse, RedriveResponse, RunEventList, RunPage, RunReport, ScheduleList,
    ScheduleSummary, TokenList, TokenSummary, WorkflowResult,
};
use flotilla_tests::{Fleet, step};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

const AGENT: &str = "cli";

/// `sleep_ms` and `fail_attempts` (echo's) come from the run's params, so that one definition
/// makes runs that succeed, fail, or run until they are cancelled.
const DEFINITION: &str = r#"
name: cli-tour
params: {sleep_ms: 0, fail_attempts: 0}
steps:
  - id: build
    agent: cli
    action: build
    params: {sleep_ms: "${{ params.sleep_ms }}", fail_attempts: "${{ params.fail_attempts }}"}
    retry: {max_attempts: 1}
  - {id: deploy, agent: cli, action: deploy}
"#;

const WAIT: Duration = Duration::from_secs(60);

/// Runs `flotilla ARGS --output json`, which must exit with `code`; returns what it printed,
/// parsed as `T`.
async fn json_exiting<T: DeserializeOwned>(
    fleet: &Fleet,
    code: i32,
    args: &[&str],
) -> anyhow::Result<T> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (status, stdout, stderr) = fleet.cli(&all).await?;
    ensure!(
        status.code() == Some(code),
        "flotilla {} exited {status}, not {code}:\n{stdout}\n{stderr}",
        args.join(" ")
    );
    serde_json::from_str(&stdout).with_context(|| {
        format!(
            "flotilla {} --output json printed:\n{stdout}",
            args.join(" ")
        )
    })
}

/// Runs `flotilla ARGS --output json`, which must succeed.
async fn json<T: DeserializeOwned>(fleet: &Fleet, args: &[&str]) -> anyhow::Result<T> {
    json_exiting(fleet, 0, args).await
}

/// Runs `flotilla ARGS` (text output), which must succeed; returns its stdout.
async fn text(fleet: &Fleet, args: &[&str]) -> anyhow::Result<String> {
    let (status, stdout, stderr) = fleet.cli(args).await?;
    ensure!(
        status.success(),
        "flotilla {} exited {status}:\n{stdout}\n{stderr}",
        args.join(" ")
    );
    Ok(stdout)
}

fn write_definition() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("flotilla-cli-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("cli-tour.yaml");
    std::fs::write(&file, DEFINITION)?;
    Ok(file)
}

/// Polls the run until `condition` holds.
async fn wait_for(
    fleet: &Fleet,
    id: Uuid,
    what: &str,
    condition: impl Fn(&WorkflowResult) -> bool,
) -> anyhow::Result<WorkflowResult> {
    let deadline = Instant::now() + WAIT;
    loop {
        let run = fleet.run(id).await?;
        if condition(&run) {
            return Ok(run);
        }
        ensure!(Instant::now() < deadline, "{what} within {WAIT:?}: {run:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Definitions, runs, their reports and histories, agents, metrics, schedules, dead letters,
/// tokens and the audit log: each command's JSON, and the tables people read.
#[tokio::test]
async fn every_reading_and_defining_command_prints_json_and_tables() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("cli-1", &[AGENT], 4)?;
    let file = write_definition()?;
    let file = file.to_str().context("a UTF-8 path")?;

    let plan: Value = json(&fleet, &["workflows", "execute", file, "--dry-run"]).await?;
    assert_eq!(
        plan["stages"][1],
        json!([{"id": "deploy", "call": "cli.deploy", "after": ["build"]}])
    );
    let registered: DefinitionSummary = json(&fleet, &["definitions", "register", file]).await?;
    assert_eq!(
        (registered.name.as_str(), registered.revision),
        ("cli-tour", 1)
    );
    let listed: DefinitionList = json(&fleet, &["definitions", "list"]).await?;
    assert_eq!(listed.definitions, std::slice::from_ref(&registered));
    let shown: Value = json(&fleet, &["definitions", "show", "cli-tour"]).await?;
    let detail: DefinitionDetail = serde_json::from_value(shown["definition"].clone())?;
    assert_eq!(detail.definition["steps"][0]["id"], "build");
    let versions: Vec<DefinitionSummary> = serde_json::from_value(shown["versions"].clone())?;
    assert_eq!(versions, std::slice::from_ref(&registered));
    assert!(
        text(&fleet, &["definitions", "list"])
            .await?
            .contains("cli-tour")
    );

    // A run from the file, and one of the registered name followed to its end.
    let started: ExecuteResponse = json(&fleet, &["workflows", "execute", file]).await?;
    let run: WorkflowResult = json(
        &fleet,
        &["workflows", "execute", "--name", "cli-tour", "--wait"],
    )
    .await?;
    assert_eq!(run.status, "success");
    assert_eq!(step(&run, "deploy").status, "success");
    fleet.wait_for_end(started.workflow_id, WAIT).await?;
    let ids = started.workflow_id.to_string();

    let status: WorkflowResult = json(&fleet, &["workflows", "status", &ids]).await?;
    assert_eq!(
        (status.workflow_id, status.status.as_str()),
        (started.workflow_id, "success")
    );
    let status_text = text(&fleet, &["workflows", "status", &ids]).await?;
    assert!(
        status_text.contains("deploy") && status_text.contains("success"),
        "{status_text}"
    );
    let page: RunPage = json(&fleet, &["workflows", "list", "--status", "success"]).await?;
    let mut listed: Vec<Uuid> = page.workflows.iter().map(|r| r.workflow_id).collect();
    listed.sort();
    let mut expected = vec![started.workflow_id, run.workflow_id];
    expected.sort();
    assert_eq!(listed, expected);
    let report: RunReport = json(&fleet, &["workflows", "report", &ids]).await?;
    assert_eq!(report.critical_path, ["build", "deploy"]);
    let history: RunEventList = json(&fleet, &["workflows", "history", &ids]).await?;
    assert!(history.events.is_empty(), "{history:?}");

    let agents: AgentList = json(&fleet, &["agents", "list"]).await?;
    let agent = agents
        .agents
        .iter()
        .find(|a| a.name == AGENT)
        .context("the worker's agent is listed")?;
    assert_eq!(agent.workers.len(), 1);
    let table = text(&fleet, &["agents", "list"]).await?;
    assert!(table.contains(AGENT) && table.contains("cli-1"), "{table}");
    let health: AgentHealth = json(&fleet, &["agents", "health", AGENT]).await?;
    assert_eq!(
        (health.health.as_str(), health.healthy_workers),
        ("healthy", 1)
    );
    let nobody: AgentHealth = json_exiting(&fleet, 1, &["agents", "health", "nobody"]).await?;
    assert_eq!(nobody.health, "no_workers");
    let breakers: BreakerList = json(&fleet, &["agents", "breakers"]).await?;
    assert!(
        breakers
            .breakers
            .iter()
            .any(|b| b.agent == AGENT && b.state == "closed")
    );
    let reset: BreakerSummary = json(&fleet, &["agents", "breaker-reset", AGENT]).await?;
    assert_eq!(
        (reset.agent.as_str(), reset.state.as_str()),
        (AGENT, "closed")
    );

    let figures: Value = json(&fleet, &["metrics", "--agent", AGENT]).await?;
    assert_eq!(figures["workflows"]["success"], 2.0, "{figures}");
    assert_eq!(figures["agents"][AGENT]["executions"], 4.0, "{figures}");
    let range: MetricsSummary = json(&fleet, &["metrics", "--range", "1h"]).await?;
    assert_eq!((range.executions, range.successes), (4, 4));
    assert!(text(&fleet, &["metrics"]).await?.contains(AGENT));

    let added: ScheduleSummary = json(
        &fleet,
        &[
            "schedules",
            "add",
            "cli-tour",
            "--cron",
            "0 0 1 1 *",
            "--param",
            "sleep_ms=1",
        ],
    )
    .await?;
    assert_eq!(
        (added.id.as_str(), added.cron.as_str()),
        ("cli-tour", "0 0 1 1 *")
    );
    let schedules: ScheduleList = json(&fleet, &["schedules", "list"]).await?;
    assert_eq!(schedules.schedules.len(), 1);
    let removed: Value = json(&fleet, &["schedules", "remove", "cli-tour"]).await?;
    assert_eq!(removed, json!({"removed": "cli-tour"}));
    let schedules: ScheduleList = json(&fleet, &["schedules", "list"]).await?;
    assert!(schedules.schedules.is_empty());

    let letters: DeadLetterList = json(&fleet, &["dlq", "list", "--all"]).await?;
    assert!(letters.dead_letters.is_empty());
    let redriven: RedriveResponse = json(&fleet, &["dlq", "redrive", "--all"]).await?;
    assert!(redriven.redriven.is_empty());

    let created: CreatedToken =
        json(&fleet, &["tokens", "create", "ci", "--scope", "read"]).await?;
    assert!(created.token.starts_with("flt_"));
    let tokens: TokenList = json(&fleet, &["tokens", "list"]).await?;
    assert!(tokens.tokens.iter().any(|t| t.id == created.summary.id));
    let created_id = created.summary.id.to_string();
    let revoked: TokenSummary = json(&fleet, &["tokens", "revoke", &created_id]).await?;
    assert!(revoked.revoked_at.is_some());
    let audit: AuditPage = json(&fleet, &["audit", "--limit", "100"]).await?;
    let actions: Vec<&str> = audit.entries.iter().map(|e| e.action.as_str()).collect();
    for action in [
        "POST /api/definitions",
        "POST /api/tokens",
        "DELETE /api/tokens/{id}",
    ] {
        assert!(actions.contains(&action), "{action} not in {actions:?}");
    }
    fleet.stop().await
}

/// The operator commands on live runs: JSON of the run's status after each, a refusal that
/// exits 1, and `--wait` on a run that fails exiting 1 with the run's JSON.
#[tokio::test]
async fn operator_commands_print_the_run_status_as_json() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("cli-2", &[AGENT], 4)?;
    let file = write_definition()?;
    let file = file.to_str().context("a UTF-8 path")?;
    let execute = |more: &[&'static str]| [&["workflows", "execute", file][..], more].concat();

    let args = execute(&["-p", "fail_attempts=1", "--wait"]);
    let failed: WorkflowResult = json_exiting(&fleet, 1, &args).await?;
    assert_eq!(failed.status, "failure");
    let ids = failed.workflow_id.to_string();
    let skipped: OperateResponse =
        json(&fleet, &["workflows", "skip", &ids, "--step", "build"]).await?;
    assert_eq!(
        (skipped.action.as_str(), skipped.workflow_id),
        ("skip", failed.workflow_id)
    );
    let run = wait_for(
        &fleet,
        failed.workflow_id,
        "the run goes on past the skip",
        |run| run.status == "success",
    )
    .await?;
    assert_eq!(step(&run, "build").status, "skipped");

    let long: ExecuteResponse = json(&fleet, &execute(&["-p", "sleep_ms=60000"])).await?;
    let id = long.workflow_id.to_string();
    wait_for(&fleet, long.workflow_id, "the step runs", |run| {
        step(run, "build").status == "running"
    })
    .await?;
    for (action, status) in [("pause", "paused"), ("resume", "running")] {
        let answer: OperateResponse = json(&fleet, &["workflows", action, &id]).await?;
        assert_eq!(
            (answer.action.as_str(), answer.status.as_str()),
            (action, status)
        );
    }
    let completed: OperateResponse = json(
        &fleet,
        &[
            "workflows",
            "complete",
            &id,
            "--step",
            "build",
            "--step-output",
            r#"{"by": "hand"}"#,
        ],
    )
    .await?;
    assert_eq!(completed.action, "complete");
    let run = wait_for(&fleet, long.workflow_id, "the run ends", |run| {
        run.status == "success"
    })
    .await?;
    assert_eq!(step(&run, "build").output, Some(json!({"by": "hand"})));
    let history: RunEventList = json(&fleet, &["workflows", "history", &id]).await?;
    let actions: Vec<&str> = history.events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["pause", "resume", "complete"]);

    // A refusal is an answer, not a failure to ask: exit 1, the reason on stderr.
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "cancel", &id, "--output", "json"])
        .await?;
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("already ended"), "{stderr}");

    let cancelled: ExecuteResponse = json(&fleet, &execute(&["-p", "sleep_ms=60000"])).await?;
    let answer: OperateResponse = json(
        &fleet,
        &["workflows", "cancel", &cancelled.workflow_id.to_string()],
    )
    .await?;
    assert_eq!(answer.status, "cancelled");
    fleet.stop().await
}
