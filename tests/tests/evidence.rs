//! Evidence checks end to end: a step's `expect:` decides whether its worker's claim of success
//! counts, against the real coordinator, echo workers, Postgres and RabbitMQ.

use std::time::Duration;

use flotilla_api_model::RunReport;
use flotilla_tests::{Fleet, step};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// The run's report, through the CLI's JSON output.
async fn report(fleet: &Fleet, id: uuid::Uuid) -> anyhow::Result<RunReport> {
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "report", &id.to_string(), "-o", "json"])
        .await?;
    assert!(status.success(), "{stderr}");
    Ok(serde_json::from_str(&stdout)?)
}

#[tokio::test]
async fn an_output_that_fails_its_expectation_is_retried_until_it_meets_it_or_fails_the_run()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo", &["ci"], 4)?;

    // The echo worker adds the attempt's number to its output: attempt 1's does not meet the
    // expectation, attempt 2's does.
    let yaml = "name: verified\nsteps:\n  - id: test\n    agent: ci\n    action: run\n    params: {coverage: 0.9, with_attempt: true}\n    retry: {max_attempts: 3, delay: 0}\n    expect:\n      - output.attempt >= 2\n      - output.coverage >= 0.85\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");
    let test = step(&run, "test");
    assert_eq!((test.status.as_str(), test.attempts), ("success", 2));
    assert_eq!(test.output, Some(json!({"coverage": 0.9, "attempt": 2})));
    let first = "expectation failed: output.attempt >= 2 (output.attempt was 1)";
    let r = report(&fleet, id).await?;
    let test = r.steps.iter().find(|s| s.step_id == "test").unwrap();
    let errors: Vec<Option<&str>> = test.attempts.iter().map(|a| a.error.as_deref()).collect();
    assert_eq!(errors, [Some(first), None]);
    let evidence = test
        .evidence
        .as_ref()
        .expect("a step with expect has evidence");
    assert_eq!(
        (
            evidence.claimed,
            evidence.verified,
            evidence.failures.as_slice()
        ),
        (2, 1, [first.to_string()].as_slice())
    );
    assert_eq!(
        evidence.expect,
        ["output.attempt >= 2", "output.coverage >= 0.85"]
    );
    let (_, text, _) = fleet.cli(&["workflows", "report", &id.to_string()]).await?;
    assert!(
        text.contains("test evidence: 2 claimed success, 1 verified (expect: output.attempt >= 2; output.coverage >= 0.85)"),
        "{text}"
    );
    assert!(text.contains(&format!("test attempt 1: {first}")), "{text}");

    // An output that never meets its expectation uses up the retries and fails the run.
    let yaml = "name: unverified\nsteps:\n  - {id: test, agent: ci, action: run, params: {coverage: 0.7}, retry: {max_attempts: 2, delay: 0}, expect: output.coverage >= 0.85}\n  - {id: deploy, agent: ci, action: ship}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "failure", "{run:?}");
    let failed = "expectation failed: output.coverage >= 0.85 (output.coverage was 0.7)";
    let test = step(&run, "test");
    assert_eq!(
        (test.status.as_str(), test.attempts, test.error.as_deref()),
        ("failure", 2, Some(failed))
    );
    assert_eq!(test.output, None, "an unverified output is not the step's");
    assert_eq!(step(&run, "deploy").attempts, 0, "its dependent never ran");
    let r = report(&fleet, id).await?;
    let evidence = r
        .steps
        .iter()
        .find(|s| s.step_id == "test")
        .and_then(|s| s.evidence.clone())
        .unwrap();
    assert_eq!((evidence.claimed, evidence.verified), (2, 0));
    assert_eq!(evidence.failures, [failed, failed]);
    assert!(
        r.steps
            .iter()
            .find(|s| s.step_id == "deploy")
            .is_some_and(|s| s.evidence.is_none()),
        "a step without expect has no evidence"
    );
    fleet.stop().await
}
