//! The registry of workers against the real services: echo workers announce themselves, turn
//! unhealthy when killed and leave when stopped; a step whose agent has no worker shows as
//! waiting for one, and fails after its `schedule_to_start`.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_tests::workload::{eventually, poll_until};
use flotilla_tests::{Fleet, Launch, Signal, step};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// The health of each worker of `agent` the registry lists, by worker id.
async fn workers_of(fleet: &Fleet, agent: &str) -> anyhow::Result<Vec<(String, String)>> {
    Ok(fleet
        .agents()
        .await?
        .into_iter()
        .filter(|a| a.name == agent)
        .flat_map(|a| a.workers)
        .map(|w| (w.worker_id, w.health))
        .collect())
}

/// A worker that beats often, so that the short intervals of the coordinator below hold.
fn quick_beats() -> Launch {
    Launch::once().env("FLOTILLA_HEARTBEAT_INTERVAL_MS", "200")
}

#[tokio::test]
async fn workers_appear_turn_unhealthy_when_killed_and_leave_when_stopped() -> anyhow::Result<()> {
    let mut fleet = Fleet::new()
        .coordinator_env("FLOTILLA_WORKER_UNHEALTHY_AFTER_MS", "2000")
        .coordinator_env("FLOTILLA_WORKER_FORGET_AFTER_MS", "5000");
    fleet.start_coordinator().await?;
    let killed = fleet.start_worker("reg-killed", &["regecho"], 3, quick_beats())?;
    let stopped = fleet.start_worker(
        "reg-stopped",
        &["regecho", "other"],
        2,
        quick_beats().env("FLOTILLA_WORKER_LABELS", "region=eu"),
    )?;
    let (names, region) = (
        fleet.queue_names(),
        BTreeMap::from([("region".into(), "eu".into())]),
    );
    for agent in ["regecho", "other"] {
        fleet.track_queues(
            names
                .worker_queues(agent, &region)
                .into_iter()
                .map(|(q, _)| q),
        );
    }

    let both =
        eventually(WAIT, "both workers registered and healthy", || async {
            let listed = fleet.agents().await?;
            let echo = listed.into_iter().find(|a| a.name == "regecho");
            Ok(echo.filter(|a| {
                a.workers.len() == 2 && a.workers.iter().all(|w| w.health == "healthy")
            }))
        })
        .await?;
    assert_eq!(both.health, "healthy");
    let announced = &both.workers[1];
    assert_eq!(announced.worker_id, "reg-stopped");
    assert_eq!(announced.agents, ["regecho", "other"]);
    assert_eq!(announced.concurrency, 2);
    assert_eq!(announced.labels["region"], "eu");
    assert!(
        announced
            .sdk
            .as_deref()
            .is_some_and(|sdk| sdk.starts_with("flotilla-worker/")),
        "{announced:?}"
    );
    assert!(
        announced.pid.is_some() && announced.host.is_some(),
        "{announced:?}"
    );

    let (status, out, err) = fleet.cli(&["agents", "list"]).await?;
    assert!(status.success(), "{out}{err}");
    for expected in ["regecho", "other", "reg-killed", "reg-stopped", "healthy"] {
        assert!(out.contains(expected), "no {expected} in:\n{out}");
    }
    let (status, out, err) = fleet.cli(&["agents", "health", "regecho"]).await?;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("regecho: healthy (2 healthy"), "{out}");

    // Killed: its heartbeats stop, it turns unhealthy, then is forgotten.
    fleet.worker(killed).signal(Signal::Kill).await?;
    poll_until(WAIT, "the killed worker unhealthy", || async {
        Ok(workers_of(&fleet, "regecho")
            .await?
            .contains(&("reg-killed".into(), "unhealthy".into())))
    })
    .await?;
    let (status, out, _) = fleet.cli(&["agents", "list"]).await?;
    assert!(status.success());
    assert!(
        out.lines()
            .any(|l| l.starts_with("reg-killed") && l.contains("unhealthy")),
        "{out}"
    );
    poll_until(WAIT, "the killed worker forgotten", || async {
        Ok(!workers_of(&fleet, "regecho")
            .await?
            .iter()
            .any(|(id, _)| id == "reg-killed"))
    })
    .await?;

    // Stopped gracefully: it says goodbye and is gone at once, never shown unhealthy.
    fleet.worker(stopped).signal(Signal::Term).await?;
    poll_until(WAIT, "the stopped worker gone", || async {
        let workers = workers_of(&fleet, "regecho").await?;
        anyhow::ensure!(
            !workers.iter().any(|(_, health)| health == "unhealthy"),
            "a worker stopped gracefully showed as unhealthy: {workers:?}"
        );
        Ok(workers.is_empty())
    })
    .await?;
    let (status, out, _) = fleet.cli(&["agents", "health", "regecho"]).await?;
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("regecho: no_workers"), "{out}");
    fleet.stop().await
}

#[tokio::test]
async fn a_step_without_workers_waits_and_fails_after_schedule_to_start() -> anyhow::Result<()> {
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_SCHEDULE_TO_START_MS", "3000");
    fleet.start_coordinator().await?;
    fleet.start_worker("reg-present", &["present"], 2, quick_beats())?;
    let id = fleet
        .execute_yaml(
            "name: unserved\nsteps:\n  - {id: own, agent: nobody, action: work, depends_on: [], schedule_to_start: 1s, retry: {max_attempts: 2, delay: 100ms}}\n  - {id: default, agent: nobody, action: work, depends_on: [], retry: {max_attempts: 1}}\n  - {id: served, agent: present, action: work, depends_on: [], params: {sleep_ms: 10}}\n",
            json!({}),
        )
        .await?;

    let waiting = eventually(WAIT, "the unserved steps shown waiting", || async {
        let run = fleet.run(id).await?;
        Ok(
            (step(&run, "own").waiting_for_worker && step(&run, "default").waiting_for_worker)
                .then_some(run),
        )
    })
    .await?;
    assert_eq!(step(&waiting, "own").status, "running");
    let nobody = eventually(WAIT, "the agent with no worker listed", || async {
        Ok(fleet
            .agents()
            .await?
            .into_iter()
            .find(|a| a.name == "nobody"))
    })
    .await?;
    assert_eq!(nobody.health, "no_workers");
    assert!(nobody.workers.is_empty());
    assert!(nobody.waiting_steps >= 1, "{nobody:?}");
    let metrics = reqwest::get(format!("{}/metrics", fleet.url()))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("orchestrator_queue_oldest_age_seconds{agent=\"nobody\"}"),
        "{metrics}"
    );

    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "failure");
    let own = step(&run, "own");
    assert_eq!(own.status, "failure");
    assert_eq!(own.attempts, 2, "retried by its policy: {own:?}");
    assert_eq!(
        own.error.as_deref(),
        Some("no worker of agent nobody started the step within 1s")
    );
    assert!(!own.waiting_for_worker);
    let default = step(&run, "default");
    assert_eq!(
        default.error.as_deref(),
        Some("no worker of agent nobody started the step within 3s"),
        "the coordinator's default"
    );
    let served = step(&run, "served");
    assert_eq!(served.status, "success");
    assert!(!served.waiting_for_worker);
    fleet.stop().await
}
