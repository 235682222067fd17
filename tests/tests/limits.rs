//! Per-agent limits end to end: the real coordinators and echo workers as separate processes,
//! against the real Postgres and RabbitMQ; what they allow is read from the attempts stored.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_tests::Fleet;
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

/// A definition of `n` independent steps of `agent`, each given `params`.
fn parallel(name: &str, agent: &str, n: usize, params: &str) -> String {
    let steps: String = (0..n)
        .map(|i| {
            format!(
                "  - {{id: s{i}, agent: {agent}, action: x, params: {params}, depends_on: []}}\n"
            )
        })
        .collect();
    format!("name: {name}\nsteps:\n{steps}")
}

/// The attempts of `runs`: (dispatched, started, finished) as stored.
async fn attempts(
    fleet: &Fleet,
    runs: &[Uuid],
) -> anyhow::Result<Vec<(DateTime<Utc>, DateTime<Utc>, DateTime<Utc>)>> {
    let db = fleet.db().await?;
    let rows = db
        .query(
            "SELECT dispatched_at, started_at, finished_at FROM attempts
             WHERE run_id = ANY($1) AND status = 'success' ORDER BY dispatched_at",
            &[&runs],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// The most attempts running at one time, from their start and end as the workers reported.
fn most_at_once(intervals: &[(DateTime<Utc>, DateTime<Utc>)]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = intervals
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    // An end before a start at the same instant: the slot was free again.
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[tokio::test]
async fn a_concurrency_cap_holds_across_workers_and_coordinators() -> anyhow::Result<()> {
    let mut fleet =
        Fleet::new().coordinator_env("FLOTILLA_AGENT_LIMITS", "capped=max_concurrency:2");
    fleet.start_coordinator().await?;
    fleet
        .add_coordinator(flotilla_tests::Launch::once())
        .await?;
    fleet.start_echo("capped-a", &["capped"], 4)?;
    fleet.start_echo("capped-b", &["capped"], 4)?;

    let yaml = parallel("capped", "capped", 10, "{sleep_ms: 150}");
    let first = fleet.execute_yaml_on(0, &yaml, json!({})).await?;
    // Two go, the others wait where the API shows them.
    let run = fleet.run(first).await?;
    let held = run
        .steps
        .iter()
        .filter(|s| s.held.as_deref() == Some("limit reached for agent capped"))
        .count();
    assert!(held >= 7, "{run:?}");
    let second = fleet.execute_yaml_on(1, &yaml, json!({})).await?;
    for id in [first, second] {
        let run = fleet.wait_for_end(id, WAIT).await?;
        assert_eq!(run.status, "success", "{run:?}");
        assert!(run.steps.iter().all(|s| s.attempts == 1), "{run:?}");
    }

    let attempts = attempts(&fleet, &[first, second]).await?;
    assert_eq!(attempts.len(), 20);
    let intervals: Vec<_> = attempts.iter().map(|&(_, s, f)| (s, f)).collect();
    assert_eq!(most_at_once(&intervals), 2, "{intervals:?}");
    let db = fleet.db().await?;
    let running: i32 = db
        .query_one(
            "SELECT running FROM agent_limits WHERE agent = 'capped'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(running, 0, "every slot given back");
    fleet.cleanup().await
}

#[tokio::test]
async fn a_rate_limit_spreads_dispatches() -> anyhow::Result<()> {
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_AGENT_LIMITS", "paced=rate_limit:5/s");
    fleet.start_coordinator().await?;
    fleet.start_echo("paced", &["paced"], 8)?;

    let id = fleet
        .execute_yaml(&parallel("paced", "paced", 15, "{}"), json!({}))
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");

    let dispatched: Vec<DateTime<Utc>> = attempts(&fleet, &[id])
        .await?
        .into_iter()
        .map(|(d, _, _)| d)
        .collect();
    assert_eq!(dispatched.len(), 15);
    // A bucket of 5 refilled at 5 a second: any stretch of time holds at most 5 dispatches
    // plus those it refilled; 15 take at least two seconds.
    for (i, from) in dispatched.iter().enumerate() {
        for (j, to) in dispatched.iter().enumerate().skip(i) {
            let seconds = (*to - *from).num_microseconds().unwrap() as f64 / 1e6;
            assert!(
                (j - i + 1) as f64 <= 5.0 + 5.0 * seconds + 1e-6,
                "{} dispatches in {seconds}s: {dispatched:?}",
                j - i + 1
            );
        }
    }
    let spread = dispatched[14] - dispatched[0];
    assert!(
        spread >= chrono::Duration::milliseconds(1_990),
        "{dispatched:?}"
    );
    fleet.cleanup().await
}

#[tokio::test]
async fn a_run_keeps_at_most_its_dispatch_window_of_attempts_outstanding() -> anyhow::Result<()> {
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_DISPATCH_WINDOW", "3");
    fleet.start_coordinator().await?;
    // Eight slots in all: the window, not the workers, is what bounds the run.
    fleet.start_echo("wide-a", &["wide"], 4)?;
    fleet.start_echo("wide-b", &["wide"], 4)?;

    let yaml = parallel("wide", "wide", 12, "{sleep_ms: 150}");
    let id = fleet.execute_yaml(&yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");
    assert!(run.steps.iter().all(|s| s.attempts == 1), "{run:?}");

    let attempts = attempts(&fleet, &[id]).await?;
    assert_eq!(attempts.len(), 12);
    // From its dispatch to its end, as the worker reported it (the coordinator records the end,
    // and dispatches the next step, after that).
    let outstanding: Vec<_> = attempts.iter().map(|&(d, _, f)| (d, f)).collect();
    assert_eq!(most_at_once(&outstanding), 3, "{outstanding:?}");
    fleet.cleanup().await
}
