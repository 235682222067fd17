//! Rollback by compensation end to end: a run that fails in its third phase undoes the second
//! and the first, in that order, through a coordinator crash in the middle; an operator rolls
//! back a run that succeeded from the CLI. Real coordinator, echo workers, Postgres, RabbitMQ.

use std::time::{Duration, Instant};

use flotilla_api_model::WorkflowResult;
use flotilla_tests::{Fleet, Launch, step};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// Three phases, each undone by a compensation on the `undo` agent; the third fails. The
/// second's compensation takes long enough for the coordinator to be killed while it runs.
const THREE_PHASES: &str = "name: release
steps:
  - id: provision
    agent: infra
    action: create
    params: {vm: vm-7}
    compensate: {agent: undo, action: destroy, params: {vm: '${{ steps.provision.output.vm }}'}}
  - id: configure
    agent: infra
    action: configure
    compensate: {agent: undo, action: unconfigure, params: {sleep_ms: 3000}}
  - id: deploy
    agent: app
    action: deploy
    params: {fail_attempts: 1}
    retry: {max_attempts: 1}
    compensate: {agent: undo, action: undeploy}
error_handling:
  rollback: true
";

/// Polls the run until `done` holds for it, at most `WAIT`.
async fn wait_until(
    fleet: &Fleet,
    id: uuid::Uuid,
    what: &str,
    done: impl Fn(&WorkflowResult) -> bool,
) -> anyhow::Result<WorkflowResult> {
    let deadline = Instant::now() + WAIT;
    loop {
        let run = fleet.run(id).await?;
        if done(&run) {
            return Ok(run);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not {what} within {WAIT:?}: {run:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_run_failing_in_phase_three_undoes_two_then_one_across_a_coordinator_crash()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.add_coordinator(Launch::supervised()).await?;
    fleet.start_echo("echo", &["infra", "app", "undo"], 4)?;

    let id = fleet.execute_yaml(THREE_PHASES, json!({})).await?;
    let rolling = wait_until(&fleet, id, "undoing configure", |run| {
        step(run, "configure:compensate").status == "running"
    })
    .await?;
    assert_eq!(rolling.status, "rolling_back");
    assert_eq!(step(&rolling, "provision:compensate").status, "pending");

    fleet.coordinator(0).kill().await?;
    fleet
        .coordinator(0)
        .wait_for(WAIT, "restarted", |s| s.starts >= 2 && s.pid.is_some())
        .await?;
    fleet.wait_coordinator_ready(0, WAIT).await?;

    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "rolled_back", "{run:#?}");
    assert_eq!(fleet.coordinator(0).state().exits_by_signal(9), 1);
    for (id, status) in [
        ("provision", "success"),
        ("configure", "success"),
        ("deploy", "failure"),
    ] {
        assert_eq!(step(&run, id).status, status, "{id}");
    }
    let (two, one) = (
        step(&run, "configure:compensate"),
        step(&run, "provision:compensate"),
    );
    // Each undone once, the second phase before the first.
    assert_eq!((two.status.as_str(), two.attempts), ("success", 1));
    assert_eq!((one.status.as_str(), one.attempts), ("success", 1));
    assert!(two.end_time.unwrap() <= one.start_time.unwrap(), "{run:#?}");
    assert_eq!(
        one.output.as_ref().unwrap()["vm"],
        "vm-7",
        "templated from its step's output"
    );
    let three = step(&run, "deploy:compensate");
    assert_eq!((three.status.as_str(), three.attempts), ("skipped", 0));

    // Postgres agrees: one successful attempt per compensation, and nothing else ran on `undo`.
    let db = fleet.db().await?;
    let rows = db
        .query(
            "SELECT agent, status, count(*) FROM attempts WHERE run_id = $1 AND agent = 'undo' GROUP BY 1, 2",
            &[&id],
        )
        .await?;
    let counts: Vec<(String, String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(counts, [("undo".to_string(), "success".to_string(), 2)]);
    fleet.stop().await
}

#[tokio::test]
async fn an_operator_rolls_back_a_run_that_succeeded_from_the_cli() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo", &["infra", "undo"], 4)?;

    let yaml = "name: shipped\nsteps:\n  - {id: a, agent: infra, action: do, compensate: {agent: undo, action: undo_a}}\n  - {id: b, agent: infra, action: do, compensate: {agent: undo, action: undo_b}}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    assert_eq!(step(&run, "a:compensate").status, "skipped");

    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "rollback", &id.to_string()])
        .await?;
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("run {id} rollback: rolling_back")),
        "{stdout}"
    );
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "rolled_back", "{run:#?}");
    let (b, a) = (step(&run, "b:compensate"), step(&run, "a:compensate"));
    assert_eq!((b.attempts, a.attempts), (1, 1));
    assert!(b.end_time.unwrap() <= a.start_time.unwrap(), "{run:#?}");

    // Nothing is undone twice: a second rollback is refused, naming why.
    let (status, _, stderr) = fleet
        .cli(&["workflows", "rollback", &id.to_string()])
        .await?;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rolled_back"), "{stderr}");
    let history = fleet
        .cli(&["workflows", "history", &id.to_string()])
        .await?
        .1;
    assert!(history.contains("rollback"), "{history}");
    fleet.stop().await
}
