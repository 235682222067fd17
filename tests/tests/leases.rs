//! A step's own lease (`heartbeat_timeout`) end to end: the real coordinator and echo workers as
//! separate processes, against the real Postgres and RabbitMQ.

use std::time::Duration;

use flotilla_tests::workload::eventually;
use flotilla_tests::{Fleet, Launch, Signal};
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// A fleet whose coordinator's own lease (2 min) is longer than any wait here: only the step's
/// `heartbeat_timeout` can get a lost attempt retried in time.
async fn fleet() -> anyhow::Result<Fleet> {
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_LEASE_TIMEOUT_MS", "120000");
    fleet.start_coordinator().await?;
    Ok(fleet)
}

/// The run's attempts: (attempt, status, worker).
async fn attempts(fleet: &Fleet, id: Uuid) -> anyhow::Result<Vec<(i32, String, Option<String>)>> {
    let db = fleet.db().await?;
    Ok(db
        .query(
            "SELECT attempt, status, worker FROM attempts WHERE run_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Checks that the run succeeded once, by `worker-2`, on its second attempt.
async fn completed_once_on_the_second_attempt(fleet: &Fleet, id: Uuid) -> anyhow::Result<()> {
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    assert_eq!(run.steps[0].attempts, 2);
    let attempts = attempts(fleet, id).await?;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_ne!(attempts[0].1, "success", "{attempts:?}");
    assert_eq!(
        attempts[1],
        (2, "success".to_string(), Some("worker-2".to_string()))
    );
    Ok(())
}

#[tokio::test]
async fn a_frozen_worker_past_its_steps_heartbeat_timeout_is_replaced_and_the_step_completes_once()
-> anyhow::Result<()> {
    let mut fleet = fleet().await?;
    fleet.start_echo("worker-1", &["leased"], 1)?;
    // The echo workers heartbeat every 5 s: longer than the step's lease, so the step completes
    // only if they heartbeat at a third of it. Its short `timeout` keeps the task unacked while
    // it runs, so that the frozen worker has no free slot to take the retry.
    let id = fleet
        .execute_yaml(
            "name: leased\nsteps:\n  - {id: slow, agent: leased, action: work, heartbeat_timeout: 2s, timeout: 1m, params: {sleep_ms: 4000}}\n",
            json!({}),
        )
        .await?;
    let db = fleet.db().await?;
    eventually(WAIT, "worker-1 to hold the step's lease", || async {
        let row = db
            .query_one(
                "SELECT lease_until IS NOT NULL FROM steps WHERE run_id = $1",
                &[&id],
            )
            .await?;
        Ok(row.get::<_, bool>(0).then_some(()))
    })
    .await?;
    fleet.worker(0).signal(Signal::Stop).await?;
    fleet.start_echo("worker-2", &["leased"], 1)?;

    completed_once_on_the_second_attempt(&fleet, id).await?;
    fleet.stop().await
}

#[tokio::test]
async fn a_worker_that_dies_after_acking_a_step_early_loses_it_to_another_and_it_completes_once()
-> anyhow::Result<()> {
    let mut fleet = fleet().await?;
    let crashing = fleet.start_worker(
        "worker-1",
        &["leased"],
        1,
        Launch::once().failpoint_first(1, "crash-after-early-ack=1"),
    )?;
    let id = fleet
        .execute_yaml(
            "name: long\nsteps:\n  - {id: slow, agent: leased, action: work, heartbeat_timeout: 2s, params: {sleep_ms: 1000}}\n",
            json!({}),
        )
        .await?;
    // It dies right after acking the task: RabbitMQ has nothing to give back, and only the
    // lease running out gets the step retried.
    fleet.worker(crashing).wait_exits(1, WAIT).await?;
    fleet.start_echo("worker-2", &["leased"], 1)?;

    completed_once_on_the_second_attempt(&fleet, id).await?;
    fleet.stop().await
}
