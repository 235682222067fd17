//! Operator control against the real services: the coordinator, echo workers and the CLI as
//! separate processes, with the real Postgres and RabbitMQ.

use std::time::{Duration, Instant};

use flotilla_tests::{Fleet, Launch};
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn step<'a>(
    run: &'a flotilla_api_model::WorkflowResult,
    id: &str,
) -> &'a flotilla_api_model::StepResult {
    run.steps
        .iter()
        .find(|s| s.step_id == id)
        .unwrap_or_else(|| panic!("no step {id}"))
}

/// Waits until `condition` holds for the run, polling its API.
async fn wait_for_run(
    fleet: &Fleet,
    id: Uuid,
    what: &str,
    condition: impl Fn(&flotilla_api_model::WorkflowResult) -> bool,
) -> anyhow::Result<flotilla_api_model::WorkflowResult> {
    let deadline = Instant::now() + WAIT;
    loop {
        let run = fleet.run(id).await?;
        if condition(&run) {
            return Ok(run);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what} within {WAIT:?}: {run:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A run cancelled from the CLI while its step sleeps for a minute: the worker is told to stop,
/// its handler stops, and the worker reports the attempt as cancelled.
#[tokio::test]
async fn cancelling_a_run_stops_its_running_step_on_the_worker() -> anyhow::Result<()> {
    let fleet = Fleet::new();
    let logs = flotilla_tests::target_dir()
        .join("operator-logs")
        .join(fleet.queue_names().prefix());
    let mut fleet = fleet.log_to(&logs)?;
    fleet.start_coordinator().await?;
    fleet.start_worker(
        "echo-cancel",
        &["slow"],
        2,
        Launch::once().env("RUST_LOG", "info"),
    )?;

    let id = fleet
        .execute_yaml(
            "name: long\nsteps:\n  - {id: nap, agent: slow, action: sleep, params: {sleep_ms: 60000}}\n",
            json!({}),
        )
        .await?;
    wait_for_run(&fleet, id, "the step runs", |run| {
        step(run, "nap").status == "running"
    })
    .await?;
    // The worker holds the task: its heartbeat renewed the lease.
    let db = fleet.db().await?;
    let deadline = Instant::now() + WAIT;
    while db
        .query_opt(
            "SELECT 1 FROM steps WHERE run_id = $1 AND lease_until IS NOT NULL",
            &[&id],
        )
        .await?
        .is_none()
    {
        anyhow::ensure!(Instant::now() < deadline, "no heartbeat for the task");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, stdout, stderr) = fleet.cli(&["workflows", "cancel", &id.to_string()]).await?;
    assert!(status.success(), "{stdout}{stderr}");
    let run = fleet.run(id).await?;
    assert_eq!(
        (run.status.as_str(), step(&run, "nap").status.as_str()),
        ("cancelled", "cancelled")
    );

    // What the worker reported: the handler stopped on the cancel, not at the sleep's end.
    let deadline = Instant::now() + WAIT;
    while fleet.count_in_logs("echo-cancel", "task cancelled") == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the worker never cancelled the task"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        fleet.count_in_logs("echo-cancel", "of its 60000 ms sleep"),
        1,
        "the handler stopped early, once"
    );
    assert_eq!(fleet.count_in_logs("echo-cancel", "task succeeded"), 0);
    assert!(fleet.count_in_logs("echo-cancel", &id.to_string()) > 0);
    fleet.stop().await
}
