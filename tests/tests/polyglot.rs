//! Workflows whose steps run on workers written in different languages: the Rust echo agent and
//! the Python example worker (`examples/workers/python`), both speaking the wire protocol of
//! `proto/` to the real RabbitMQ, under a real coordinator.
//!
//! The Python worker needs pika: the test command (`tests/run.sh`) installs it in
//! `.flotilla/venv`. `FLOTILLA_PYTHON` names another interpreter that has it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_tests::workload::{eventually, poll_until};
use flotilla_tests::{Fleet, Launch, repo_file};
use serde_json::json;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(60);

/// The interpreter that runs the Python worker.
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("FLOTILLA_PYTHON") {
        return path.into();
    }
    let venv = repo_file(".flotilla/venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// Starts the Python worker serving `agents` in `fleet`; returns its index among the workers.
async fn start_python_worker(
    fleet: &mut Fleet,
    worker_id: &str,
    agents: &[&str],
    extra_args: &[&str],
) -> anyhow::Result<usize> {
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import pika"])
        .output()
        .await
        .with_context(|| format!("running {}", python.display()))?;
    if !probe.status.success() {
        bail!(
            "{} cannot import pika (run deploy/python.sh, or set FLOTILLA_PYTHON): {}",
            python.display(),
            String::from_utf8_lossy(&probe.stderr)
        );
    }
    let mut command = Command::new(&python);
    command
        .arg("-u")
        .arg(repo_file("examples/workers/python/worker.py"))
        .args(["--worker-id", worker_id])
        .args(extra_args)
        .env("LOG_LEVEL", "WARNING");
    for agent in agents {
        command.args(["--agent", agent]);
    }
    fleet.start_worker_command(worker_id, agents, command, Launch::once())
}

#[tokio::test]
async fn a_workflow_runs_across_rust_and_python_workers() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-1", &["loader", "reporter"], 4)?;
    fleet.start_echo("echo-2", &["loader", "reporter"], 4)?;
    let python = start_python_worker(
        &mut fleet,
        "python-1",
        &["stats"],
        &["--label", "lang=python"],
    )
    .await?;

    // High priority: its tasks go to the agents' `:high` queues, which both languages serve
    // (the other tests here run at the normal one).
    let yaml = "name: polyglot\npriority: high\nsteps:\n  \
        - {id: fetch, agent: loader, action: load, params: {numbers: [1, 2, 3, 4]}}\n  \
        - {id: stats, agent: stats, action: describe, depends_on: [fetch]}\n  \
        - {id: report, agent: reporter, action: publish, depends_on: [stats], params: {channel: ops}}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;

    assert_eq!(run.status, "success", "{run:#?}");
    let step = |id: &str| run.steps.iter().find(|s| s.step_id == id).unwrap();
    // The Python step read the Rust step's output as its input.
    assert_eq!(
        step("stats").output,
        Some(json!({"count": 4, "sum": 10, "mean": 2.5}))
    );
    assert_eq!(step("stats").attempts, 1);
    assert_eq!(step("report").output, Some(json!({"channel": "ops"})));
    assert!(step("report").start_time >= step("stats").end_time);

    // Each attempt is recorded with the worker that ran it.
    let db = fleet.db().await?;
    let workers: Vec<(String, String)> = db
        .query(
            "SELECT s.step_id, a.worker FROM attempts a JOIN steps s USING (run_id, idx)
             WHERE a.run_id = $1 ORDER BY s.step_id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(workers.len(), 3, "{workers:?}");
    for (step_id, worker) in &workers {
        let expected: &[&str] = if step_id == "stats" {
            &["python-1"]
        } else {
            &["echo-1", "echo-2"]
        };
        assert!(
            expected.contains(&worker.as_str()),
            "{step_id} ran on {worker}"
        );
    }

    // The Python worker registered like the Rust ones, and deregisters when stopped.
    let stats_workers = || async {
        Ok::<_, anyhow::Error>(
            fleet
                .agents()
                .await?
                .into_iter()
                .filter(|a| a.name == "stats")
                .flat_map(|a| a.workers)
                .collect::<Vec<_>>(),
        )
    };
    let registered = eventually(WAIT, "the python worker registered", || async {
        Ok(stats_workers().await?.pop().filter(|w| w.sdk.is_some()))
    })
    .await?;
    assert_eq!(registered.worker_id, "python-1");
    assert_eq!(registered.health, "healthy");
    assert_eq!(registered.actions, ["describe", "sleep"]);
    assert!(
        registered
            .sdk
            .as_deref()
            .is_some_and(|sdk| sdk.starts_with("python-pika/")),
        "{registered:?}"
    );
    assert_eq!(registered.labels["lang"], "python");
    fleet.worker(python).terminate().await;
    poll_until(WAIT, "the python worker deregistered", || async {
        Ok(stats_workers().await?.is_empty())
    })
    .await?;
    fleet.stop().await
}

#[tokio::test]
async fn the_python_worker_fails_an_unknown_action_without_retrying() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    start_python_worker(&mut fleet, "python-1", &["stats"], &[]).await?;

    let yaml = "name: unknown\nerror_handling:\n  retry: {max_attempts: 3, delay: 50ms}\nsteps:\n  \
        - {id: odd, agent: stats, action: transmogrify}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;

    assert_eq!(run.status, "failure");
    let step = &run.steps[0];
    assert_eq!((step.status.as_str(), step.attempts), ("failure", 1));
    let error = step.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("no handler for action `transmogrify` of agent `stats`"),
        "{error}"
    );
    fleet.stop().await
}

/// A task longer than the coordinator's lease finishes on its first attempt because the
/// worker's heartbeats renew the lease, and a SIGTERM in the middle lets it finish and report
/// before the worker exits.
#[tokio::test]
async fn the_python_worker_heartbeats_its_task_and_finishes_it_on_sigterm() -> anyhow::Result<()> {
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_LEASE_TIMEOUT_MS", "1500");
    fleet.start_coordinator().await?;
    let worker = start_python_worker(
        &mut fleet,
        "python-1",
        &["sleeper"],
        &["--heartbeat-interval-ms", "300"],
    )
    .await?;

    let yaml =
        "name: long\nsteps:\n  - {id: nap, agent: sleeper, action: sleep, params: {ms: 4000}}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;

    // The coordinator sets a lease only from a heartbeat listing the task: the worker holds it.
    let db = fleet.db().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let leased: bool = db
            .query_one(
                "SELECT lease_until IS NOT NULL FROM steps WHERE run_id = $1 AND step_id = 'nap'",
                &[&id],
            )
            .await?
            .get(0);
        if leased {
            break;
        }
        if Instant::now() > deadline {
            bail!("the python worker's heartbeat never leased the step");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = fleet.worker(worker).terminate().await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit: {status:?}");

    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    let step = &run.steps[0];
    assert_eq!(
        step.attempts, 1,
        "the lease expired: heartbeats did not renew it"
    );
    assert_eq!(step.output, Some(json!({"slept_ms": 4000})));
    fleet.stop().await
}

/// A worker of two agents with room for one task at a time holds a delivery of each; asked to
/// stop, it finishes the one it runs and gives the other back unstarted, for another worker.
#[tokio::test]
async fn the_python_worker_gives_back_unstarted_tasks_on_sigterm() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let python = start_python_worker(
        &mut fleet,
        "python-1",
        &["left", "right"],
        &["--concurrency", "1", "--heartbeat-interval-ms", "300"],
    )
    .await?;

    let yaml = "name: pair\nsteps:\n  \
        - {id: a, agent: left, action: sleep, params: {ms: 2000}}\n  \
        - {id: b, agent: right, action: sleep, depends_on: [], params: {ms: 2000}}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;

    // Heartbeats list every task the worker holds, started or waiting for its one slot.
    let db = fleet.db().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let leased: i64 = db
            .query_one(
                "SELECT count(*) FROM steps WHERE run_id = $1 AND lease_until IS NOT NULL",
                &[&id],
            )
            .await?
            .get(0);
        if leased == 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the python worker did not take both tasks");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = fleet.worker(python).terminate().await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit: {status:?}");
    // The echo agent answers the `sleep` action with its params at once.
    fleet.start_echo("echo-1", &["left", "right"], 2)?;

    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:#?}");
    let mut outputs: Vec<String> = run
        .steps
        .iter()
        .map(|s| {
            assert_eq!(s.attempts, 1, "step {} ran again", s.step_id);
            s.output.clone().unwrap_or_default().to_string()
        })
        .collect();
    outputs.sort();
    assert_eq!(outputs, [r#"{"ms":2000}"#, r#"{"slept_ms":2000}"#]);
    fleet.stop().await
}
