//! `flotilla doctor` against a live fleet: a healthy one passes; killing the only worker of an
//! agent fails the check of that agent's queue, with exit code 2.

use std::time::{Duration, Instant};

use flotilla_api_model::HealthAudit;
use flotilla_tests::Fleet;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Runs `flotilla doctor -o json` until `done` holds for its exit code and audit, at most `WAIT`.
async fn doctor_until(
    fleet: &Fleet,
    what: &str,
    done: impl Fn(Option<i32>, &HealthAudit) -> bool,
) -> anyhow::Result<HealthAudit> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, stdout, stderr) = fleet.cli(&["doctor", "-o", "json"]).await?;
        let audit: HealthAudit =
            serde_json::from_str(&stdout).map_err(|e| anyhow::anyhow!("{e}: {stdout}{stderr}"))?;
        if done(status.code(), &audit) {
            return Ok(audit);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not {what} within {WAIT:?}: {audit:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_healthy_fleet_passes_and_an_agent_without_its_worker_fails() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("builder", &["build"], 2)?;
    let id = fleet
        .execute_yaml(
            "name: b\nsteps:\n  - {agent: build, action: compile}\n  - {agent: build, action: link}\n",
            json!({}),
        )
        .await?;
    assert_eq!(fleet.wait_for_end(id, WAIT).await?.status, "success");

    let healthy = doctor_until(&fleet, "passing", |code, audit| {
        code == Some(0) && audit.checks.iter().any(|c| c.name == "queue build")
    })
    .await?;
    assert_eq!(healthy.status, "pass", "{healthy:#?}");
    let rate = healthy
        .checks
        .iter()
        .find(|c| c.name == "error rate build")
        .expect("the agent's attempts are weighed");
    assert_eq!(
        (rate.value, rate.message.as_str()),
        (
            Some(0.0),
            "0 of 2 attempts failed (0.00 %, target under 0.1 %)"
        )
    );
    let (status, text, _) = fleet.cli(&["doctor"]).await?;
    assert!(status.success(), "{text}");
    assert!(text.contains("pass: 0 failed, 0 warned"), "{text}");

    fleet.worker(0).kill().await?;
    let broken = doctor_until(&fleet, "failing", |code, audit| {
        code == Some(2)
            && audit
                .checks
                .iter()
                .any(|c| c.name == "queue build" && c.status == "fail")
    })
    .await?;
    assert_eq!(broken.status, "fail");
    let (status, text, _) = fleet.cli(&["doctor"]).await?;
    assert_eq!(status.code(), Some(2), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("queue build"))
        .unwrap_or_else(|| panic!("no line for the queue: {text}"));
    assert!(
        line.starts_with("FAIL") && line.contains("no consumer: no worker takes its tasks"),
        "{line}"
    );

    // The API answers the same, over the window asked.
    let audit: HealthAudit = fleet
        .http()
        .get(format!("{}/api/health/audit?window=15m", fleet.url()))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(
        (audit.status.as_str(), audit.window.as_str()),
        ("fail", "15m")
    );
    fleet.stop().await
}
