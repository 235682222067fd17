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
const STEPS: usize = 400;

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
    until_done(&fleet, run, 160).await?;
    fleet.worker(graceful).signal(Signal::Term).await?;
    fleet.worker(killed).kill().await?;
    until_done(&fleet, run, 240).await?;
    worker(&mut fleet, "scale-late")?;

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

    // Every worker took a share, the ones that joined late too.
    let db = fleet.db().await?;
    let rows = db
        .query(
            "SELECT worker, count(*) FROM attempts WHERE run_id = $1 AND status = 'success'
             GROUP BY worker ORDER BY worker",
            &[&run],
        )
        .await?;
    let by_worker: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for id in [
        "scale-first",
        "scale-graceful",
        "scale-killed",
        "scale-late",
    ] {
        assert!(
            by_worker.iter().any(|(w, n)| w == id && *n > 0),
            "{id} ran nothing: {by_worker:?}"
        );
    }

    let expected = Expected::all_succeed(vec![run], STEPS);
    let audit = audit::audit(&mut fleet, &expected, Duration::from_secs(30)).await?;
    assert_eq!(audit.problems(), Vec::<String>::new());
    assert_eq!((audit.lost(), audit.double_completed()), (0, 0));
    fleet.cleanup().await
}
