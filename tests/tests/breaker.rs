//! The circuit breaker of an agent end to end: the real coordinator, echo workers and CLI as
//! separate processes, against the real Postgres and RabbitMQ.

use std::time::Duration;

use flotilla_api_model::{BreakerList, BreakerSummary, WorkflowResult};
use flotilla_tests::{Fleet, step};
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// A fleet whose breakers open on 4 attempts of which more than half failed, and cool down for
/// `cool_down`, with echo workers serving `flaky`.
async fn fleet(cool_down: &str) -> anyhow::Result<Fleet> {
    let mut fleet = Fleet::new()
        .coordinator_env("FLOTILLA_BREAKER_WINDOW", "4")
        .coordinator_env("FLOTILLA_BREAKER_MIN_ATTEMPTS", "4")
        .coordinator_env("FLOTILLA_BREAKER_FAILURE_RATE", "0.5")
        .coordinator_env("FLOTILLA_BREAKER_COOL_DOWN", cool_down);
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-breaker", &["flaky"], 4)?;
    Ok(fleet)
}

/// Four attempts of `flaky` that fail: its breaker opens. Answers the breaker.
async fn open_the_breaker(fleet: &Fleet) -> anyhow::Result<BreakerSummary> {
    let steps: String = (0..4)
        .map(|i| {
            format!(
                "  - {{id: s{i}, agent: flaky, action: x, params: {{fail_attempts: 9}}, depends_on: []}}\n"
            )
        })
        .collect();
    let id = fleet
        .execute_yaml(&format!("name: failing\nsteps:\n{steps}"), json!({}))
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "failure");
    let breaker = flaky(fleet).await?;
    assert_eq!(
        (breaker.state.as_str(), breaker.failure_rate, breaker.window),
        ("open", 1.0, 4),
        "{breaker:?}"
    );
    Ok(breaker)
}

/// `flaky`'s breaker as `flotilla agents breakers --output json` prints it.
async fn flaky(fleet: &Fleet) -> anyhow::Result<BreakerSummary> {
    let (status, stdout, stderr) = fleet
        .cli(&["agents", "breakers", "--output", "json"])
        .await?;
    anyhow::ensure!(status.success(), "agents breakers: {stderr}");
    let list: BreakerList = serde_json::from_str(&stdout)?;
    list.breakers
        .into_iter()
        .find(|b| b.agent == "flaky")
        .ok_or_else(|| anyhow::anyhow!("no breaker for flaky in {stdout}"))
}

/// Attempts recorded for a run.
async fn attempts(fleet: &Fleet, id: Uuid) -> anyhow::Result<i64> {
    let db = fleet.db().await?;
    let row = db
        .query_one("SELECT count(*) FROM attempts WHERE run_id = $1", &[&id])
        .await?;
    Ok(row.get(0))
}

fn held_steps(run: &WorkflowResult) -> Vec<&str> {
    run.steps
        .iter()
        .filter(|s| s.held.as_deref() == Some("circuit open for agent flaky"))
        .map(|s| s.step_id.as_str())
        .collect()
}

#[tokio::test]
async fn an_open_breaker_holds_steps_then_probes_fail_and_succeed() -> anyhow::Result<()> {
    let fleet = fleet("6s").await?;
    let opened = open_the_breaker(&fleet).await?;

    // While open, new steps for the agent wait without an attempt: first a step whose probe
    // will fail, then two that will succeed.
    let doomed = fleet
        .execute_yaml(
            "name: doomed\nsteps:\n  - {id: d, agent: flaky, action: x, params: {fail_attempts: 9}}\n",
            json!({}),
        )
        .await?;
    let healthy = fleet
        .execute_yaml(
            "name: healthy\nsteps:\n  - {id: h1, agent: flaky, action: x}\n  - {id: h2, agent: flaky, action: x, depends_on: []}\n",
            json!({}),
        )
        .await?;
    let run = fleet.run(doomed).await?;
    assert_eq!(held_steps(&run), ["d"], "{run:?}");
    assert_eq!(
        (step(&run, "d").status.as_str(), step(&run, "d").attempts),
        ("pending", 0)
    );
    let run = fleet.run(healthy).await?;
    assert_eq!(held_steps(&run), ["h1", "h2"], "{run:?}");
    assert_eq!(
        (
            attempts(&fleet, doomed).await?,
            attempts(&fleet, healthy).await?
        ),
        (0, 0)
    );
    let breaker = flaky(&fleet).await?;
    assert_eq!((breaker.state.as_str(), breaker.held_steps), ("open", 3));
    let (_, printed, _) = fleet
        .cli(&["workflows", "status", &doomed.to_string()])
        .await?;
    assert!(
        printed.contains("circuit open for agent flaky"),
        "{printed}"
    );
    let metrics = reqwest::get(format!("{}/metrics", fleet.url()))
        .await?
        .text()
        .await?;
    for series in [
        "orchestrator_breaker_state{agent=\"flaky\"} 2\n",
        "orchestrator_breaker_held_steps_total{agent=\"flaky\"} 3\n",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }

    // After the cool-down the oldest held step goes alone, as the probe; it fails, and the
    // breaker opens again for another cool-down with the other steps still held.
    let run = fleet.wait_for_end(doomed, WAIT).await?;
    assert_eq!(
        (run.status.as_str(), step(&run, "d").attempts),
        ("failure", 1)
    );
    let reopened = flaky(&fleet).await?;
    assert_eq!(reopened.state, "open", "{reopened:?}");
    assert!(
        reopened.opened_at > opened.opened_at,
        "{reopened:?} after {opened:?}"
    );
    let run = fleet.run(healthy).await?;
    assert_eq!(held_steps(&run), ["h1", "h2"], "{run:?}");
    assert_eq!(attempts(&fleet, healthy).await?, 0);

    // The next probe succeeds: the breaker closes and the step it still held runs too.
    let run = fleet.wait_for_end(healthy, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");
    assert!(run.steps.iter().all(|s| s.attempts == 1), "{run:?}");
    let closed = flaky(&fleet).await?;
    assert_eq!(
        (
            closed.state.as_str(),
            closed.failure_rate,
            closed.held_steps
        ),
        ("closed", 0.0, 0),
        "{closed:?}"
    );
    fleet.cleanup().await
}

#[tokio::test]
async fn an_operator_reset_dispatches_held_steps_and_a_cancel_ends_them() -> anyhow::Result<()> {
    // A cool-down far longer than the test: only the operator lets steps through.
    let fleet = fleet("1h").await?;
    open_the_breaker(&fleet).await?;
    let cancelled = fleet
        .execute_yaml(
            "name: cancelled\nsteps:\n  - {id: c, agent: flaky, action: x}\n",
            json!({}),
        )
        .await?;
    let kept = fleet
        .execute_yaml(
            "name: kept\nsteps:\n  - {id: k, agent: flaky, action: x}\n",
            json!({}),
        )
        .await?;
    let (status, _, stderr) = fleet
        .cli(&["workflows", "cancel", &cancelled.to_string()])
        .await?;
    assert!(status.success(), "{stderr}");
    let run = fleet.run(cancelled).await?;
    assert_eq!(
        (run.status.as_str(), step(&run, "c").status.as_str()),
        ("cancelled", "cancelled")
    );
    assert!(held_steps(&run).is_empty());
    assert_eq!(held_steps(&fleet.run(kept).await?), ["k"]);
    assert_eq!(flaky(&fleet).await?.held_steps, 1);

    let (status, stdout, stderr) = fleet.cli(&["agents", "breaker-reset", "flaky"]).await?;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("closed"), "{stdout}");
    let run = fleet.wait_for_end(kept, WAIT).await?;
    assert_eq!(
        (run.status.as_str(), step(&run, "k").attempts),
        ("success", 1)
    );
    let breaker = flaky(&fleet).await?;
    assert_eq!(breaker.state, "closed");
    assert!(
        breaker
            .reset_by
            .as_deref()
            .is_some_and(|by| by.contains('@')),
        "{breaker:?}"
    );
    // The cancelled run's step never got an attempt.
    assert_eq!(step(&fleet.run(cancelled).await?, "c").attempts, 0);
    assert_eq!(attempts(&fleet, cancelled).await?, 0);

    let (status, _, stderr) = fleet.cli(&["agents", "breaker-reset", "nobody"]).await?;
    assert!(!status.success());
    assert!(
        stderr.contains("agent `nobody` has no circuit breaker"),
        "{stderr}"
    );
    fleet.cleanup().await
}
