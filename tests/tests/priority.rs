//! Run priorities end to end: the real coordinator and an echo worker as separate processes,
//! against the real Postgres and RabbitMQ.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_tests::Fleet;
use flotilla_tests::workload::eventually;
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

fn parallel(name: &str, n: usize, header: &str) -> String {
    let steps: String = (0..n)
        .map(|i| {
            format!("  - {{id: s{i}, agent: prio, action: x, params: {{sleep_ms: 200}}, depends_on: []}}\n")
        })
        .collect();
    format!("name: {name}\n{header}steps:\n{steps}")
}

/// Submits `yaml` with `priority` in the request.
async fn submit(fleet: &Fleet, yaml: &str, priority: &str) -> anyhow::Result<reqwest::Response> {
    Ok(fleet
        .http()
        .post(format!("{}/api/workflows/execute", fleet.url()))
        .json(&json!({"yaml": yaml, "priority": priority}))
        .send()
        .await?)
}

/// When each step of `run` finished, as stored.
async fn finished(fleet: &Fleet, run: Uuid) -> anyhow::Result<Vec<DateTime<Utc>>> {
    let db = fleet.db().await?;
    Ok(db
        .query(
            "SELECT finished_at FROM attempts WHERE run_id = $1 AND status = 'success'",
            &[&run],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

#[tokio::test]
async fn a_high_priority_run_goes_ahead_of_the_normal_backlog() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("prio-worker", &["prio"], 2)?;

    let backlog = fleet
        .execute_yaml(&parallel("backlog", 20, ""), json!({}))
        .await?;
    // The worker is busy with the backlog before the urgent runs come.
    eventually(WAIT, "two backlog steps done", || async {
        Ok((finished(&fleet, backlog).await?.len() >= 2).then_some(()))
    })
    .await?;
    // High by its definition, and high by its submission.
    let by_definition = fleet
        .execute_yaml(&parallel("urgent", 2, "priority: high\n"), json!({}))
        .await?;
    let response = submit(&fleet, &parallel("asked", 2, ""), "high").await?;
    assert_eq!(response.status().as_u16(), 202);
    let by_request: Uuid = response.json::<serde_json::Value>().await?["workflowId"]
        .as_str()
        .unwrap_or_default()
        .parse()?;

    for id in [backlog, by_definition, by_request] {
        let run = fleet.wait_for_end(id, WAIT).await?;
        assert_eq!(run.status, "success", "{run:?}");
    }
    let mut urgent = finished(&fleet, by_definition).await?;
    urgent.extend(finished(&fleet, by_request).await?);
    let last_urgent = urgent.iter().max().copied().unwrap();
    let backlog_after = finished(&fleet, backlog)
        .await?
        .into_iter()
        .filter(|at| *at > last_urgent)
        .count();
    // In one queue they would have waited for the whole backlog.
    assert!(
        backlog_after >= 8,
        "only {backlog_after} of the 20 backlog steps finished after the urgent ones"
    );
    fleet.cleanup().await
}

#[tokio::test]
async fn an_unknown_priority_is_refused_with_the_fault_named() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let asked = submit(&fleet, &parallel("asked", 1, ""), "urgent").await?;
    assert_eq!(asked.status().as_u16(), 400);
    let body = asked.text().await?;
    assert!(body.contains("unknown variant `urgent`"), "{body}");
    let written = fleet
        .execute_yaml(&parallel("written", 1, "priority: urgent\n"), json!({}))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        written.contains("400") && written.contains("unknown variant `urgent`"),
        "{written}"
    );
    let db = fleet.db().await?;
    let runs: i64 = db.query_one("SELECT count(*) FROM runs", &[]).await?.get(0);
    assert_eq!(runs, 0, "nothing stored");
    fleet.cleanup().await
}
