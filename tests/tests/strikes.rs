//! Three-strike escalation end to end: the real coordinator, echo workers and CLI as separate
//! processes, against the real Postgres and RabbitMQ, with a webhook receiver of the test's own.

use std::time::Duration;

use flotilla_tests::Fleet;
use flotilla_tests::{step, webhook, workload::eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_step_falls_back_then_escalates_and_an_operator_completes_it() -> anyhow::Result<()> {
    let (hook, received) = webhook().await?;
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_NOTIFY_OPS_URL", &hook);
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-strikes", &["primary", "spare", "other"], 4)?;
    let yaml = r#"name: three strikes
steps:
  - id: build
    agent: primary
    action: compile
    params: {fail_attempts: 9}
    retry: {max_attempts: 2, delay: 50ms}
    fallback:
      agent: spare
      action: compile_slowly
      params: {fail_attempts: 9, origin: "${{ params.origin }}"}
      retry: {max_attempts: 1}
    escalate: ops
  - {id: ship, agent: other, action: ship}
  - {id: lint, agent: other, action: lint, depends_on: []}
"#;
    let id = fleet
        .execute_yaml(yaml, json!({"origin": "mirror"}))
        .await?;

    // Strike 3: the run waits for a person, the independent branch has run, the team is told.
    let run = eventually(WAIT, "the escalation", || async {
        let run = fleet.run(id).await?;
        let posted = !received.lock().unwrap().is_empty();
        Ok(
            (run.status == "needs_attention" && step(&run, "lint").status == "success" && posted)
                .then_some(run),
        )
    })
    .await?;
    let build = step(&run, "build");
    assert_eq!(
        (build.status.as_str(), build.attempts, build.strike),
        ("needs_attention", 3, 3),
        "{build:?}"
    );
    assert!(build.error.as_deref().unwrap().contains("fail_attempts"));
    assert_eq!(step(&run, "ship").status, "pending", "ship waits for build");
    assert_eq!(step(&run, "lint").strike, 1);

    // Each attempt's strike and agent are on record.
    let db = fleet.db().await?;
    let attempts: Vec<(i16, String)> = db
        .query(
            "SELECT a.strike, a.agent FROM attempts a JOIN steps s USING (run_id, idx)
             WHERE a.run_id = $1 AND s.step_id = 'build' ORDER BY a.attempt",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        attempts,
        [
            (1, "primary".to_string()),
            (1, "primary".to_string()),
            (2, "spare".to_string())
        ]
    );

    let ids = id.to_string();
    let (status, stdout, stderr) = fleet.cli(&["workflows", "status", &ids]).await?;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("needs_attention"), "{stdout}");
    assert!(stdout.contains("strike 3: escalated"), "{stdout}");

    // The history tells which strike did what, and that the notification went out.
    let history = eventually(WAIT, "the notification in the history", || async {
        let (status, out, _) = fleet
            .cli(&["workflows", "history", &ids, "--output", "json"])
            .await?;
        anyhow::ensure!(status.success());
        let history: Value = serde_json::from_str(&out)?;
        let actions: Vec<String> = history["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_string())
            .collect();
        Ok(actions.contains(&"notified".to_string()).then_some(history))
    })
    .await?;
    let events = history["events"].as_array().unwrap();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["fallback", "escalate", "notified"]);
    assert_eq!(events[0]["detail"]["agent"], json!("spare"));
    assert_eq!(events[1]["detail"]["channel"], json!("ops"));
    assert!(events.iter().all(|e| e["stepId"] == json!("build")));

    let post = received.lock().unwrap()[0].clone();
    assert_eq!(post["workflowId"], json!(ids));
    assert_eq!(post["stepId"], json!("build"));
    assert!(
        post["text"].as_str().unwrap().contains("needs attention"),
        "{post}"
    );

    // An operator completes the step by hand: its dependents go on and the run succeeds.
    let (status, stdout, stderr) = fleet
        .cli(&[
            "workflows",
            "complete",
            &ids,
            "--step",
            "build",
            "--step-output",
            "{\"artifact\": \"by-hand\"}",
        ])
        .await?;
    assert!(status.success(), "{stdout}{stderr}");
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    assert_eq!(step(&run, "ship").status, "success");
    assert_eq!(
        step(&run, "build").output,
        Some(json!({"artifact": "by-hand"}))
    );
    assert_eq!(received.lock().unwrap().len(), 1, "notified once");

    // The report says what each strike did: the retries, the fallback, the escalation, its
    // notice and what the operator did then.
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "report", &ids, "--output", "json"])
        .await?;
    assert!(status.success(), "{stderr}");
    let report: flotilla_api_model::RunReport = serde_json::from_str(&stdout)?;
    let build = report.steps.iter().find(|s| s.step_id == "build").unwrap();
    let strikes: Vec<_> = build
        .strikes
        .iter()
        .map(|s| {
            (
                s.strike,
                s.agent.as_deref().or(s.channel.as_deref()),
                s.attempts.clone(),
                s.result.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        strikes,
        [
            (1, Some("primary"), vec![1, 2], Some("failure")),
            (2, Some("spare"), vec![3], Some("failure")),
            (3, Some("ops"), vec![], Some("notified")),
        ],
        "{build:?}"
    );
    assert_eq!(build.strikes[0].errors.len(), 2);
    assert_eq!(build.strikes[1].action.as_deref(), Some("compile_slowly"));
    let operator = build.strikes[2]
        .operator
        .as_ref()
        .expect("the operator's action");
    assert_eq!(operator.action, "complete");
    let (_, text, _) = fleet.cli(&["workflows", "report", &ids]).await?;
    assert!(
        text.contains("build strike 2: spare.compile_slowly, attempts 3: failure"),
        "{text}"
    );
    assert!(
        text.contains("build strike 3: escalated to ops, notified; then complete by "),
        "{text}"
    );
    fleet.stop().await
}

#[tokio::test]
async fn a_retried_escalated_step_starts_over_and_a_fallback_can_rescue_a_step()
-> anyhow::Result<()> {
    let (hook, received) = webhook().await?;
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_NOTIFY_OPS_URL", &hook);
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-strikes", &["primary", "spare"], 4)?;

    // The fallback succeeds: the step succeeds with the fallback's output, nobody is told.
    let rescued = fleet
        .execute_yaml(
            "name: rescued\nsteps:\n  - {id: fetch, agent: primary, action: fetch, params: {fail_attempts: 9}, retry: {max_attempts: 1}, fallback: {agent: spare, action: fetch_cache, params: {output: {from: cache}}}, escalate: ops}\n",
            json!({}),
        )
        .await?;
    let run = fleet.wait_for_end(rescued, WAIT).await?;
    assert_eq!(run.status, "success");
    let fetch = step(&run, "fetch");
    assert_eq!((fetch.strike, fetch.attempts), (2, 2));
    assert_eq!(fetch.output, Some(json!({"from": "cache"})));

    // No fallback: the step escalates after its retries; a retry starts it over with its whole
    // budget, and its third attempt (the first of the new budget's two) fails, the fourth passes.
    let id = fleet
        .execute_yaml(
            "name: retried\nsteps:\n  - {id: flaky, agent: primary, action: flaky, params: {fail_attempts: 3}, retry: {max_attempts: 2, delay: 50ms}, escalate: ops}\n",
            json!({}),
        )
        .await?;
    eventually(WAIT, "the escalation", || async {
        Ok((fleet.run(id).await?.status == "needs_attention").then_some(()))
    })
    .await?;
    let ids = id.to_string();
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "retry", &ids, "--step", "flaky"])
        .await?;
    assert!(status.success(), "{stdout}{stderr}");
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    let flaky = step(&run, "flaky");
    assert_eq!((flaky.attempts, flaky.strike), (4, 1));
    eventually(WAIT, "the escalation's notice", || async {
        Ok((received.lock().unwrap().len() == 1).then_some(()))
    })
    .await?;
    fleet.stop().await
}
