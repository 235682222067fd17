//! Whole-system tests: the real coordinator, echo workers and CLI as separate processes, against
//! the real Postgres and RabbitMQ.

use std::time::Duration;

use flotilla_tests::step;
use flotilla_tests::{Fleet, repo_file};
use serde_json::{Value, json};
use uuid::Uuid;

const SEED_AGENTS: &[&str] = &[
    "agent1", "agent6", "agent7", "agent8", "agent9", "agent10", "agent11", "agent16", "agent19",
];
const WAIT: Duration = Duration::from_secs(60);

/// The id the CLI printed for the run it started.
fn run_id_from(stdout: &str) -> Uuid {
    stdout
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find_map(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("no workflow id in the CLI's output:\n{stdout}"))
}

#[tokio::test]
async fn seed_workflow_runs_its_dag_across_two_worker_processes() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", SEED_AGENTS, 4)?;
    fleet.start_echo("echo-b", SEED_AGENTS, 4)?;

    let file = repo_file("examples/workflow.yml");
    let (status, stdout, stderr) = fleet
        .cli(&[
            "workflows",
            "execute",
            file.to_str().unwrap(),
            "--param",
            "passed=true",
            "--wait",
        ])
        .await?;
    assert!(
        status.success(),
        "CLI failed ({status}):\n{stdout}\n{stderr}"
    );
    let run = fleet.run(run_id_from(&stdout)).await?;

    assert_eq!(run.status, "success");
    assert_eq!(run.name, "Complete Project Build");
    for id in [
        "scaffold",
        "build_api",
        "quality_check",
        "security_scan",
        "performance_test",
        "deploy",
    ] {
        let s = step(&run, id);
        assert_eq!((s.status.as_str(), s.attempts), ("success", 1), "step {id}");
    }
    // The echo agent answers with the run's params overlaid by the step's.
    assert_eq!(
        step(&run, "security_scan").output,
        Some(json!({"passed": true}))
    );
    for id in ["log_error", "notify_slack"] {
        assert_eq!(
            step(&run, id).status,
            "skipped",
            "failure handler {id} of a successful run"
        );
    }
    assert_eq!(
        (
            run.metrics.total_steps,
            run.metrics.successful_steps,
            run.metrics.skipped_steps
        ),
        (8, 6, 2)
    );

    // The declared order held: each step started only after what it depends on had ended.
    let ended = |id: &str| step(&run, id).end_time.unwrap();
    let started = |id: &str| step(&run, id).start_time.unwrap();
    assert!(started("build_api") >= ended("scaffold"));
    for id in ["quality_check", "security_scan", "performance_test"] {
        assert!(started(id) >= ended("build_api"), "{id} started early");
        assert!(
            started("deploy") >= ended(id),
            "deploy started before {id} ended"
        );
    }

    // Postgres holds one successful attempt per step that ran, and nothing left to publish.
    let db = fleet.db().await?;
    let rows = db
        .query("SELECT s.step_id, count(*) FILTER (WHERE a.status = 'success'), count(*) FROM attempts a JOIN steps s USING (run_id, idx) WHERE a.run_id = $1 GROUP BY s.step_id", &[&run.workflow_id])
        .await?;
    assert_eq!(rows.len(), 6);
    for r in &rows {
        let (id, ok, all): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!((ok, all), (1, 1), "attempts of {id}");
    }
    let outbox: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0);
    assert_eq!(outbox, 0);
    fleet.stop().await
}

#[tokio::test]
async fn a_false_condition_skips_deploy_and_the_run_succeeds() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", SEED_AGENTS, 4)?;
    let yaml = std::fs::read_to_string(repo_file("examples/workflow.yml"))?;
    let id = fleet.execute_yaml(&yaml, json!({"passed": false})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    let deploy = step(&run, "deploy");
    assert_eq!(deploy.status, "skipped");
    assert!(
        deploy
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("condition is false"),
        "{deploy:?}"
    );
    fleet.stop().await
}

#[tokio::test]
async fn the_other_seed_examples_run_as_pipelines() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", SEED_AGENTS, 4)?;
    for (file, last) in [
        ("examples/complete-project-build.yaml", "deploy"),
        ("examples/data-pipeline.yaml", "export_data"),
    ] {
        let yaml = std::fs::read_to_string(repo_file(file))?;
        let id = fleet.execute_yaml(&yaml, json!({})).await?;
        let run = fleet.wait_for_end(id, WAIT).await?;
        assert_eq!(run.status, "success", "{file}");
        // A pipeline: every step started after the one before it ended.
        let main: Vec<_> = run
            .steps
            .iter()
            .filter(|s| s.step_id != "security_scan")
            .collect();
        for pair in main.windows(2) {
            assert!(
                pair[1].start_time >= pair[0].end_time,
                "{file}: {} started before {} ended",
                pair[1].step_id,
                pair[0].step_id
            );
        }
        assert_eq!(main.last().unwrap().step_id, last);
    }
    fleet.stop().await
}

#[tokio::test]
async fn a_step_that_fails_twice_succeeds_on_its_third_attempt() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", &["flaky"], 2)?;
    let yaml = "name: flaky\nerror_handling:\n  retry: {max_attempts: 3, backoff: exponential, delay: 100ms}\nsteps:\n  - {id: wobbly, agent: flaky, action: try, params: {fail_attempts: 2}}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    let s = step(&run, "wobbly");
    assert_eq!((s.status.as_str(), s.attempts), ("success", 3));
    let db = fleet.db().await?;
    let attempts: Vec<(i32, String)> = db
        .query(
            "SELECT attempt, status FROM attempts WHERE run_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        attempts,
        [
            (1, "failure".into()),
            (2, "failure".into()),
            (3, "success".into())
        ]
    );
    fleet.stop().await
}

#[tokio::test]
async fn two_workers_of_one_agent_share_its_queue() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("worker-1", &["shared"], 2)?;
    fleet.start_echo("worker-2", &["shared"], 2)?;
    let mut yaml = String::from("name: fan-out\nsteps:\n");
    for i in 0..40 {
        yaml += &format!(
            "  - {{id: s{i}, agent: shared, action: work, depends_on: [], params: {{sleep_ms: 50}}}}\n"
        );
    }
    let id = fleet.execute_yaml(&yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    let db = fleet.db().await?;
    let per_worker: Vec<(String, i64)> = db
        .query("SELECT worker, count(*) FROM attempts WHERE run_id = $1 GROUP BY worker ORDER BY worker", &[&id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert_eq!(per_worker.iter().map(|(_, n)| n).sum::<i64>(), 40);
    for (worker, n) in &per_worker {
        // With 2 slots each and 50 ms per step, neither worker can take everything.
        assert!(*n >= 5, "{worker} ran only {n} of 40 steps: {per_worker:?}");
    }
    fleet.stop().await
}

#[tokio::test]
async fn a_cyclic_definition_is_refused_with_the_cycle_named() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let dir = std::env::temp_dir().join(format!("flotilla-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("cycle.yaml");
    std::fs::write(
        &file,
        "name: cyclic\nsteps:\n  - {id: a, agent: x, action: y, depends_on: [c]}\n  - {id: b, agent: x, action: y, depends_on: [a]}\n  - {id: c, agent: x, action: y, depends_on: [b]}\n",
    )?;
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "execute", file.to_str().unwrap()])
        .await?;
    assert_eq!(status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("dependency cycle: a → b → c → a"),
        "{stderr}"
    );
    let db = fleet.db().await?;
    let runs: i64 = db.query_one("SELECT count(*) FROM runs", &[]).await?.get(0);
    assert_eq!(runs, 0, "nothing is stored for a refused definition");
    std::fs::remove_dir_all(dir)?;
    fleet.stop().await
}

#[tokio::test]
async fn a_failed_run_runs_its_handlers_and_posts_the_notification() -> anyhow::Result<()> {
    // A local webhook receiver standing in for Slack.
    let (hook, received) = flotilla_tests::webhook().await?;

    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_NOTIFY_OPS_URL", &hook);
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", &["builder", "logger"], 2)?;
    let yaml = "name: doomed\nerror_handling:\n  retry: {max_attempts: 2, delay: 50ms}\n  on_failure:\n    - {agent: logger, action: log_error}\n    - notify: ops\nsteps:\n  - {id: build, agent: builder, action: compile, params: {fail_attempts: 9}}\n  - {id: ship, agent: builder, action: ship}\n";
    let dir = std::env::temp_dir().join(format!("flotilla-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("doomed.yaml");
    std::fs::write(&file, yaml)?;
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "execute", file.to_str().unwrap(), "--wait"])
        .await?;
    assert_eq!(
        status.code(),
        Some(1),
        "a failed run exits 1:\n{stdout}\n{stderr}"
    );
    let run = fleet.run(run_id_from(&stdout)).await?;
    assert_eq!(run.status, "failure");
    let build = step(&run, "build");
    assert_eq!((build.status.as_str(), build.attempts), ("failure", 2));
    assert!(
        build.error.as_deref().unwrap().contains("fail_attempts"),
        "{build:?}"
    );
    let ship = step(&run, "ship");
    assert_eq!(ship.status, "skipped");
    assert_eq!(ship.error.as_deref(), Some("upstream failed: `build`"));
    assert_eq!(step(&run, "log_error").status, "success");
    assert_eq!(step(&run, "notify_ops").status, "success");
    let posts = received.lock().unwrap().clone();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["workflowId"], json!(run.workflow_id.to_string()));
    assert!(posts[0]["text"].as_str().unwrap().contains("failed"));
    std::fs::remove_dir_all(dir)?;
    fleet.stop().await
}

#[tokio::test]
async fn a_duplicate_result_is_acknowledged_and_ignored() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", &["once"], 1)?;
    let id = fleet
        .execute_yaml(
            "name: once\nsteps:\n  - {id: only, agent: once, action: do, params: {output: 1}}\n",
            json!({}),
        )
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(step(&run, "only").output, Some(json!(1)));

    // Replay the accepted result, as a redelivery after a lost ack would.
    let db = fleet.db().await?;
    let row = db
        .query_one(
            "SELECT task_id, started_at, finished_at FROM attempts WHERE run_id = $1",
            &[&id],
        )
        .await?;
    let duplicate = flotilla_proto::TaskResult {
        v: flotilla_proto::PROTOCOL_VERSION,
        task_id: row.get(0),
        run_id: id,
        step_id: "only".into(),
        attempt: 1,
        status: flotilla_proto::ResultStatus::Success,
        output: Some(json!("a second answer")),
        error: None,
        worker_id: "replayer".into(),
        started_at: row.get(1),
        finished_at: row.get(2),
    };
    let names = flotilla_proto::QueueNames::new(fleet.prefix.clone());
    let connection = flotilla_broker::connect(
        &flotilla_broker::BrokerConfig::new(flotilla_tests::amqp_url()),
        "flotilla-tests",
    )
    .await?;
    let publisher = flotilla_broker::Publisher::new(&connection).await?;
    publisher
        .publish_one(&flotilla_broker::OutgoingMessage::new(
            names.results(),
            "result",
            serde_json::to_vec(&duplicate)?,
        ))
        .await?;
    // The coordinator consumes and acks it: the results queue drains.
    let channel = connection.open_channel().await?;
    let deadline = std::time::Instant::now() + WAIT;
    while channel.message_count(&names.results()).await? > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the duplicate was never consumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    connection.close().await?;
    // Nothing changed: one attempt, the first output.
    let after = fleet.run(id).await?;
    assert_eq!(step(&after, "only").output, Some(json!(1)));
    let attempts: i64 = db
        .query_one("SELECT count(*) FROM attempts WHERE run_id = $1", &[&id])
        .await?
        .get(0);
    assert_eq!(attempts, 1);
    fleet.stop().await
}

#[tokio::test]
async fn unreachable_services_are_named_at_start() -> anyhow::Result<()> {
    let fleet = Fleet::new();
    let out = fleet
        .coordinator_command()
        .env("AMQP_URL", "amqp://guest:hunter2@127.0.0.1:1/%2f")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("amqp://guest:***@127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
    assert!(stderr.contains("rabbitmq-server"), "{stderr}");

    let out = fleet
        .coordinator_command()
        .env(
            "DATABASE_URL",
            "postgres://flotilla:hunter2@127.0.0.1:1/flotilla",
        )
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("postgres://flotilla:***@127.0.0.1:1/flotilla"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
    fleet.stop().await
}

#[tokio::test]
async fn a_twice_dead_lettered_task_fails_its_step_and_a_redrive_runs_it_again()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let id = fleet
        .execute_yaml("name: fragile\nsteps:\n  - {id: only, agent: fragile, action: do, params: {output: 1}}\n", json!({}))
        .await?;

    // A worker rejects the task: RabbitMQ dead-letters it. The first time, the step is only
    // retried (the task may have shared a crashing worker with a poison one); the second time,
    // it fails.
    let connection = fleet.broker().await?;
    let mut consumer = fleet.consume_tasks(&connection, "fragile", 1).await?;
    for attempt in 1..=2u32 {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await?
            .expect("a task");
        let task: flotilla_proto::Task = serde_json::from_slice(&delivery.body)?;
        assert_eq!(task.attempt, attempt);
        delivery.nack(false).await?;
    }
    consumer.into_consumer()?.close().await?;
    connection.close().await?;

    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "failure");
    let only = step(&run, "only");
    assert!(
        only.error
            .as_deref()
            .unwrap_or_default()
            .contains("dead-lettered"),
        "{only:?}"
    );

    let http = fleet.http();
    let letters: Value = http
        .get(format!("{}/api/dlq", fleet.url()))
        .send()
        .await?
        .json()
        .await?;
    let letters = letters["deadLetters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| l["workflowId"] == json!(id.to_string()) && l["stepId"] == json!("only"))
    );

    // With a worker there now, a redrive gives the step a second attempt and the run succeeds.
    fleet.start_echo("echo-a", &["fragile"], 1)?;
    let answer: Value = http
        .post(format!("{}/api/dlq/redrive", fleet.url()))
        .json(&json!({"all": true}))
        .send()
        .await?
        .json()
        .await?;
    // One retry of the step settles both of its letters.
    let attempts: Vec<&Value> = answer["redriven"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["attempt"])
        .collect();
    assert_eq!(attempts, [&json!(3), &json!(3)], "{answer}");
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    assert_eq!(step(&run, "only").attempts, 3);
    let pending: Value = http
        .get(format!("{}/api/dlq", fleet.url()))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(pending["deadLetters"], json!([]));
    fleet.stop().await
}

#[tokio::test]
async fn a_repeated_idempotency_key_answers_the_first_run() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let http = fleet.http();
    let body = json!({"yaml": "name: once\nsteps:\n  - {agent: nobody, action: wait}\n"});
    let send = || {
        http.post(format!("{}/api/workflows/execute", fleet.url()))
            .header("Idempotency-Key", "order-42")
            .json(&body)
            .send()
    };
    let first = send().await?;
    assert_eq!(first.status().as_u16(), 202);
    let first: Value = first.json().await?;
    let second = send().await?;
    assert_eq!(second.status().as_u16(), 200);
    assert_eq!(
        second
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let second: Value = second.json().await?;
    assert_eq!(first["workflowId"], second["workflowId"]);
    let db = fleet.db().await?;
    let runs: i64 = db.query_one("SELECT count(*) FROM runs", &[]).await?.get(0);
    assert_eq!(runs, 1);
    fleet.stop().await
}

#[tokio::test]
async fn operators_pause_resume_cancel_and_complete_live_runs_from_the_cli() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let two_steps = "name: steer\nsteps:\n  - {id: a, agent: steer, action: first}\n  - {id: b, agent: steer, action: second}\n";

    // Pause while `a` waits for a worker; `a` then finishes but `b` is held until the resume.
    let id = fleet.execute_yaml(two_steps, json!({})).await?;
    let ids = id.to_string();
    let (status, stdout, stderr) = fleet.cli(&["workflows", "pause", &ids]).await?;
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("paused"), "{stdout}");
    fleet.start_echo("echo-a", &["steer"], 2)?;
    let deadline = std::time::Instant::now() + WAIT;
    while step(&fleet.run(id).await?, "a").status != "success" {
        assert!(std::time::Instant::now() < deadline, "a never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = fleet.run(id).await?;
    assert_eq!(
        (held.status.as_str(), step(&held, "b").status.as_str()),
        ("paused", "pending")
    );
    let (status, ..) = fleet.cli(&["workflows", "resume", &ids]).await?;
    assert!(status.success());
    assert_eq!(fleet.wait_for_end(id, WAIT).await?.status, "success");
    let (status, history, _) = fleet
        .cli(&["workflows", "history", &ids, "--output", "json"])
        .await?;
    assert!(status.success());
    let history: Value = serde_json::from_str(&history)?;
    let actions: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["pause", "resume"]);
    assert!(
        history["events"][0]["actor"]
            .as_str()
            .unwrap()
            .contains('@')
    );

    // Cancel a run whose step waits for an agent nobody serves; a second cancel is refused.
    let id = fleet
        .execute_yaml(
            "name: idle\nsteps:\n  - {id: wait, agent: nobody, action: wait}\n",
            json!({}),
        )
        .await?;
    let ids = id.to_string();
    let (status, ..) = fleet.cli(&["workflows", "cancel", &ids]).await?;
    assert!(status.success());
    let run = fleet.run(id).await?;
    assert_eq!(
        (run.status.as_str(), step(&run, "wait").status.as_str()),
        ("cancelled", "cancelled")
    );
    let (status, _, stderr) = fleet.cli(&["workflows", "cancel", &ids]).await?;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already ended"), "{stderr}");

    // Complete the failed step of a failed run by hand: the run goes on and succeeds.
    let id = fleet
        .execute_yaml("name: mend\nsteps:\n  - {id: broken, agent: steer, action: x, params: {fail_attempts: 5}}\n  - {id: after, agent: steer, action: y}\n", json!({}))
        .await?;
    assert_eq!(fleet.wait_for_end(id, WAIT).await?.status, "failure");
    let ids = id.to_string();
    let (status, _, stderr) = fleet
        .cli(&[
            "workflows",
            "complete",
            &ids,
            "--step",
            "broken",
            "--step-output",
            "{\"fixed\": true}",
        ])
        .await?;
    assert!(status.success(), "{stderr}");
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    assert_eq!(step(&run, "broken").output, Some(json!({"fixed": true})));
    assert_eq!(step(&run, "after").status, "success");
    fleet.stop().await
}

#[tokio::test]
async fn an_attempt_past_its_timeout_fails_and_is_retried() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", &["sleepy"], 2)?;
    let yaml = "name: slow\nsteps:\n  - {id: nap, agent: sleepy, action: sleep, timeout: 300ms, retry: {max_attempts: 2, delay: 0}, params: {sleep_ms: 3000}}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "failure");
    let nap = step(&run, "nap");
    assert_eq!(nap.attempts, 2);
    assert!(
        nap.error
            .as_deref()
            .unwrap_or_default()
            .contains("timed out"),
        "{nap:?}"
    );
    fleet.stop().await
}

#[tokio::test]
async fn the_monitoring_example_takes_both_branches_of_its_condition() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", SEED_AGENTS, 4)?;
    let yaml = std::fs::read_to_string(repo_file("examples/monitoring.yaml"))?;
    // The echo agent answers with the run's params, so `error_rate` reaches the condition as a
    // field of collect_metrics' output.
    for (rate, rollback) in [(0.2, "success"), (0.01, "skipped")] {
        let id = fleet
            .execute_yaml(&yaml, json!({"error_rate": rate}))
            .await?;
        let run = fleet.wait_for_end(id, WAIT).await?;
        assert_eq!(run.status, "success", "error_rate {rate}");
        assert_eq!(step(&run, "rollback").status, rollback, "error_rate {rate}");
    }
    fleet.stop().await
}

#[tokio::test]
async fn a_schedule_starts_one_run_per_tick_with_two_coordinators() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet
        .add_coordinator(flotilla_tests::process::Launch::once())
        .await?;
    fleet.start_echo("echo-a", &["ticker"], 4)?;
    let dir = std::env::temp_dir().join(format!("flotilla-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("ticker.yaml");
    // Every second (cron with seconds).
    std::fs::write(
        &file,
        "name: ticker\nschedule: \"* * * * * *\"\nsteps:\n  - {agent: ticker, action: tick}\n",
    )?;
    let (status, _, stderr) = fleet
        .cli(&["definitions", "register", file.to_str().unwrap()])
        .await?;
    assert!(status.success(), "{stderr}");

    let db = fleet.db().await?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let runs: i64 = db
            .query_one("SELECT count(*) FROM runs WHERE status = 'success'", &[])
            .await?
            .get(0);
        if runs >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the schedule did not fire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Unschedule by registering a revision without `schedule:`.
    std::fs::write(
        &file,
        "name: ticker\nsteps:\n  - {agent: ticker, action: tick}\n",
    )?;
    let (status, _, stderr) = fleet
        .cli(&["definitions", "register", file.to_str().unwrap()])
        .await?;
    assert!(status.success(), "{stderr}");
    let left: i64 = db
        .query_one("SELECT count(*) FROM schedules", &[])
        .await?
        .get(0);
    assert_eq!(left, 0);
    // Each tick started exactly one run, whichever coordinator fired it.
    let (runs, ticks): (i64, i64) = {
        let r = db
            .query_one("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM idempotency_keys WHERE key LIKE 'schedule:default/ticker:%')", &[])
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!(runs, ticks, "one run per tick");
    std::fs::remove_dir_all(dir)?;
    fleet.stop().await
}

#[tokio::test]
async fn a_revision_registered_through_one_coordinator_is_what_the_next_submission_through_another_runs()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let other = fleet
        .add_coordinator(flotilla_tests::process::Launch::once())
        .await?;
    fleet.start_echo("echo-a", &["relay"], 4)?;
    let register = |step: &'static str| {
        fleet.post_on(
            0,
            "/api/definitions",
            json!({"yaml": format!("name: relay\nsteps:\n  - {{id: {step}, agent: relay, action: pass}}\n")}),
        )
    };
    let execute_on_other = || async {
        let (status, body) = fleet
            .post_on(
                other,
                "/api/workflows/execute",
                json!({"workflow": "relay"}),
            )
            .await?;
        assert_eq!(status, 202, "{body}");
        let id: Uuid = body["workflowId"].as_str().unwrap_or_default().parse()?;
        let run = fleet.wait_for_end(id, WAIT).await?;
        anyhow::Ok(
            run.steps
                .iter()
                .map(|s| s.step_id.clone())
                .collect::<Vec<_>>(),
        )
    };

    assert_eq!(register("first").await?.0, 201);
    // The other coordinator reads revision 1, and keeps it for its next submissions.
    assert_eq!(execute_on_other().await?, ["first"]);
    assert_eq!(execute_on_other().await?, ["first"]);
    assert_eq!(register("second").await?.0, 201);
    assert_eq!(
        execute_on_other().await?,
        ["second"],
        "the submission after the registration ended runs the new revision"
    );
    fleet.stop().await
}

#[tokio::test]
async fn results_are_acked_once_each_and_none_is_left_when_the_fleet_stops() -> anyhow::Result<()> {
    let logs = std::env::temp_dir().join(format!("flotilla-acks-{}", Uuid::new_v4()));
    let mut fleet = Fleet::new().log_to(&logs)?;
    fleet.start_coordinator().await?;
    fleet.start_echo("worker-1", &["wide"], 16)?;
    fleet.start_echo("worker-2", &["wide"], 16)?;
    let mut yaml = String::from("name: wide\nsteps:\n");
    for i in 0..300 {
        yaml += &format!("  - {{id: s{i}, agent: wide, action: pass}}\n");
    }
    yaml += "  - {id: join, agent: wide, action: pass, depends_on: [s0, s299]}\n";
    let id = fleet.execute_yaml(&yaml, json!({})).await?;
    assert_eq!(fleet.wait_for_end(id, WAIT).await?.status, "success");
    fleet.shutdown().await;

    // The engine acks the results of many batches with one frame per channel: an ack the broker
    // did not expect would have closed the channel, and its results would have come again.
    for needle in ["consumer lost", "could not ack", "stale result ignored"] {
        assert_eq!(
            fleet.count_in_logs("coordinator", needle),
            0,
            "`{needle}` in the logs"
        );
    }
    let results = fleet.queue_names().results();
    let counts = flotilla_tests::audit::queue_counts(&fleet).await?;
    let left = counts.iter().find(|(q, _)| *q == results).map(|(_, n)| *n);
    assert_eq!(left, Some(0), "results left on {results}: {counts:?}");
    fleet.cleanup().await?;
    std::fs::remove_dir_all(logs)?;
    Ok(())
}
