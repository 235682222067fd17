//! Steps routed by their `labels:` to workers with matching labels, end to end: the real
//! coordinator and echo workers as separate processes, against the real Postgres and RabbitMQ.

use std::collections::BTreeMap;
use std::time::Duration;
use tokio::process::Command;

use flotilla_tests::workload::eventually;
use flotilla_tests::{Fleet, Launch, binary, step};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// Starts an echo worker of agent `render` with `labels`.
fn start_render_worker(
    fleet: &mut Fleet,
    worker_id: &str,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let mut command = Command::new(binary("flotilla-agent-echo"));
    command
        .args([
            "--agent",
            "render",
            "--concurrency",
            "4",
            "--worker-id",
            worker_id,
        ])
        .env("RUST_LOG", "warn")
        .env("FLOTILLA_HEARTBEAT_INTERVAL_MS", "200");
    for (k, v) in labels {
        command.arg("--label").arg(format!("{k}={v}"));
    }
    let queues = fleet.queue_names().worker_queues("render", labels);
    fleet.track_queues(queues.into_iter().map(|(queue, _)| queue));
    fleet.start_worker_command(worker_id, &["render"], command, Launch::once())?;
    Ok(())
}

#[tokio::test]
async fn labelled_steps_go_only_to_workers_with_the_labels() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let gpu = labels(&[("gpu", "true"), ("region", "eu")]);
    start_render_worker(&mut fleet, "render-gpu", &gpu)?;
    start_render_worker(&mut fleet, "render-cpu", &labels(&[("gpu", "false")]))?;
    // Both workers registered, so that a plain step may go to either.
    eventually(WAIT, "both workers registered", || async {
        let agents = fleet.agents().await?;
        Ok(agents
            .iter()
            .find(|a| a.name == "render" && a.workers.len() == 2)
            .map(|_| ()))
    })
    .await?;

    let steps: String = (0..6)
        .map(|i| {
            format!(
                "  - {{id: gpu{i}, agent: render, action: x, labels: {{gpu: true}}, params: {{sleep_ms: 50}}, depends_on: []}}\n  - {{id: cpu{i}, agent: render, action: x, labels: {{gpu: false}}, params: {{sleep_ms: 50}}, depends_on: []}}\n  - {{id: any{i}, agent: render, action: x, params: {{sleep_ms: 50}}, depends_on: []}}\n"
            )
        })
        .collect();
    let id = fleet
        .execute_yaml(&format!("name: routed\nsteps:\n{steps}"), json!({}))
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");
    let db = fleet.db().await?;
    let rows = db
        .query(
            "SELECT s.step_id, a.worker FROM attempts a JOIN steps s USING (run_id, idx)
             WHERE a.run_id = $1",
            &[&id],
        )
        .await?;
    let by_step: BTreeMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(by_step.len(), 18, "{by_step:?}");
    for i in 0..6 {
        assert_eq!(by_step[&format!("gpu{i}")], "render-gpu", "{by_step:?}");
        assert_eq!(by_step[&format!("cpu{i}")], "render-cpu", "{by_step:?}");
    }

    // No worker has region=us: the step waits where the API shows it, then fails saying why.
    let id = fleet
        .execute_yaml(
            "name: unmatched\nsteps:\n  - {id: us, agent: render, action: x, labels: {gpu: true, region: us}, schedule_to_start: 2s, retry: {max_attempts: 1}}\n",
            json!({}),
        )
        .await?;
    eventually(
        WAIT,
        "the unmatched step shown waiting for a worker",
        || async {
            let run = fleet.run(id).await?;
            Ok(step(&run, "us").waiting_for_worker.then_some(()))
        },
    )
    .await?;
    // The autoscaler's signal counts the task in its label set's queue as the agent's.
    let metrics = eventually(WAIT, "the waiting task in the agent's depth", || async {
        let page = reqwest::get(format!("{}/metrics", fleet.url()))
            .await?
            .text()
            .await?;
        Ok(page
            .contains("orchestrator_queue_depth{agent=\"render\"} 1")
            .then_some(page))
    })
    .await?;
    assert!(
        metrics.contains("orchestrator_queue_oldest_age_seconds{agent=\"render\"}"),
        "{metrics}"
    );
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "failure");
    assert_eq!(
        step(&run, "us").error.as_deref(),
        Some("no worker of agent render with labels gpu=true,region=us started the step within 2s")
    );
    fleet.cleanup().await
}

#[tokio::test]
async fn bad_labels_are_refused_with_the_fault_named() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let refused = fleet
        .execute_yaml(
            "name: bad\nsteps:\n  - {id: s, agent: render, action: x, labels: {gpu: \"a b\"}}\n",
            json!({}),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("400"), "{refused}");
    assert!(
        refused.contains("label value `a b` must be 1 to 63 letters"),
        "{refused}"
    );
    let db = fleet.db().await?;
    let runs: i64 = db.query_one("SELECT count(*) FROM runs", &[]).await?.get(0);
    assert_eq!(runs, 0, "nothing stored");
    fleet.cleanup().await
}
