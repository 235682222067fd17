//! Workers added and removed while a run goes on: the real coordinator and echo workers as
//! separate processes, against the real Postgres and RabbitMQ. Added workers take work at once;
//! one stopped gracefully hands back what it had not started, one killed (`kill -9`) loses what
//! it held to RabbitMQ's redelivery; nothing is lost and nothing completes twice.

use std::time::Duration;

use flotilla_tests::audit::{self, Expected};
use flotilla_tests::workload::{Workflow, eventually};
use flotilla_tests::{Fleet, Launch, Signal};
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);
const STEPS: usize = 600;

/// Steps of `run` that succeeded so far.
async fn done(fleet: &Fleet, run: Uuid) -> anyhow::Result<i64> {
    let db = fleet.db().await?;
    Ok(db
        .query_one(
            "SELECT count(*) FROM steps WHERE run_id = $1 AND status = 'success'",
            &[&run],
        )
        .await?
        .get(0))
}

async fn until_done(fleet: &Fleet, run: Uuid, steps: i64) -> anyhow::Result<()> {
    eventually(WAIT, &format!("{steps} steps done"), || async {
        Ok((done(fleet, run).await? >= steps).then_some(()))
    })
    .await
}

/// Waits until `worker` has completed steps of `run`: it is surely taking work.
async fn until_working(fleet: &Fleet, run: Uuid, worker: &str) -> anyhow::Result<()> {
    eventually(WAIT, &format!("{worker} completing steps"), || async {
        let db = fleet.db().await?;
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM attempts
                 WHERE run_id = $1 AND worker = $2 AND status = 'success'",
                &[&run, &worker],
            )
            .await?
            .get(0);
        Ok((n >= 3).then_some(()))
    })
    .await
}

fn worker(fleet: &mut Fleet, id: &str) -> anyhow::Result<usize> {
    let launch = Launch::once().env("FLOTILLA_HEARTBEAT_INTERVAL_MS", "500");
    fleet.start_worker(id, &["scale"], 4, launch)
}

#[tokio::test]
async fn workers_join_and_leave_mid_run_with_nothing_lost_or_done_twice() -> anyhow::Result<()> {
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_LEASE_TIMEOUT_MS", "3000");
    fleet.start_coordinator().await?;
    worker(&mut fleet, "scale-first")?;
    let workflow = Workflow::fan_out("scaling", "scale", STEPS, |_| 20);
    let run = fleet.execute_yaml(&workflow.yaml(), json!({})).await?;

    until_done(&fleet, run, 40).await?;
    let graceful = worker(&mut fleet, "scale-graceful")?;
    let killed = worker(&mut fleet, "scale-killed")?;
    // Each takes work before it goes; so does the one that joins last.
    until_working(&fleet, run, "scale-graceful").await?;
    until_working(&fleet, run, "scale-killed").await?;
    fleet.worker(graceful).signal(Signal::Term).await?;
    fleet.worker(killed).kill().await?;
    worker(&mut fleet, "scale-late")?;
    until_working(&fleet, run, "scale-late").await?;
    anyhow::ensure!(
        done(&fleet, run).await? < STEPS as i64,
        "the run ended before the last worker took its share: make it longer"
    );

    let result = fleet.wait_for_end(run, WAIT).await?;
    assert_eq!(result.status, "success");
    let stopped = fleet.worker(graceful).wait_exits(1, WAIT).await?;
    assert_eq!(
        stopped.exits_by_signal(9),
        0,
        "drained, not killed: {stopped:?}"
    );
    let lost = fleet.worker(killed).wait_exits(1, WAIT).await?;
    assert_eq!(lost.exits_by_signal(9), 1, "{lost:?}");

    let expected = Expected::all_succeed(vec![run], STEPS);
    let audit = audit::audit(&mut fleet, &expected, Duration::from_secs(30)).await?;
    assert_eq!(audit.problems(), Vec::<String>::new());
    assert_eq!((audit.lost(), audit.double_completed()), (0, 0));
    fleet.cleanup().await
}
