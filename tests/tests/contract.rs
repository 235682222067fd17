//! The HTTP API against its own OpenAPI document: schemathesis (tests/requirements.txt, installed
//! into .flotilla/venv by deploy/python.sh) generates requests from a live fleet's
//! `/api/openapi.json`, valid and invalid, and checks every answer: no 5xx, status codes,
//! content types, headers and bodies as documented, schema-valid requests accepted and invalid
//! ones refused, credentials required, deleted things gone. Its settings, and the few checks
//! turned off for an operation and why, are in tests/schemathesis.toml.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_tests::{Fleet, repo_file, target_dir};
use serde_json::{Value, json};
use tokio::process::Command;
use uuid::Uuid;

/// The fleet's definition, agent and schedule: one name for all three, which the generated
/// requests use half of the time where a name goes.
const NAME: &str = "contract";

const DEFINITION: &str = r#"
name: contract
params: {sleep_ms: 0, fail_attempts: 0}
steps:
  - id: first
    agent: contract
    action: work
    params: {sleep_ms: "${{ params.sleep_ms }}", fail_attempts: "${{ params.fail_attempts }}"}
    retry: {max_attempts: 1}
  - {id: second, agent: contract, action: work}
"#;

/// Far longer than the run of schemathesis, which a test must never wait for.
const SCHEMATHESIS_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_as_its_openapi_document_says() -> anyhow::Result<()> {
    let schemathesis = repo_file(".flotilla/venv/bin/schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run deploy/python.sh (tests/run.sh does)",
        schemathesis.display()
    );
    let fleet = Fleet::new();
    // The processes' logs go beside schemathesis's files, out of the test's output.
    let work = target_dir().join("contract").join(&fleet.prefix);
    let mut fleet = fleet.log_to(&work)?;
    fleet.start_coordinator().await?;
    fleet.start_echo("contract-1", &[NAME], 8)?;

    // Something of each kind for the generated requests to find: a definition with a schedule
    // (yearly, so it never ticks here), a run that succeeded, one that failed, one still running.
    post(
        &fleet,
        "/api/definitions",
        &json!({"yaml": DEFINITION}),
        201,
    )
    .await?;
    let schedule = json!({"definition": NAME, "cron": "0 0 1 1 *"});
    post(&fleet, "/api/schedules", &schedule, 201).await?;
    let succeeded = execute(&fleet, json!({})).await?;
    let failed = execute(&fleet, json!({"fail_attempts": 1})).await?;
    let running = execute(&fleet, json!({"sleep_ms": 600_000})).await?;
    for id in [succeeded, failed] {
        fleet.wait_for_end(id, Duration::from_secs(60)).await?;
    }

    let config = work.join("schemathesis.toml");
    std::fs::copy(repo_file("tests/schemathesis.toml"), &config)?;
    dictionary(
        &work,
        "runs",
        &[succeeded, failed, running].map(|id| id.to_string()),
    )?;
    dictionary(&work, "steps", &["first".into(), "second".into()])?;
    dictionary(&work, "names", &[NAME.into()])?;

    let started = Instant::now();
    let run = Command::new(&schemathesis)
        .current_dir(&work)
        .arg("--config-file")
        .arg(&config)
        .args(["--no-color", "run"])
        .arg(format!("{}/api/openapi.json", fleet.url()))
        // In the environment, not the arguments, which anyone on the machine may read.
        .env("FLOTILLA_CONTRACT_TOKEN", fleet.admin_token())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SCHEMATHESIS_TIMEOUT, run)
        .await
        .context("schemathesis did not finish in time")??;
    let report = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    println!("schemathesis ran {:.0?}:\n{report}", started.elapsed());
    assert!(
        output.status.success(),
        "schemathesis found the API at odds with its document ({}):\n{report}\n{errors}",
        output.status
    );
    // The run did test something: a schemathesis that reached no operation exits 0 too.
    assert!(
        report.contains("passed") && !report.contains("Tested: 0"),
        "{report}"
    );

    // Anything it ran stops with the fleet, and queues it made for agents it invented go too.
    fleet.stop().await
}

/// `POST path` with `body`, which must answer `status`; returns the answer.
async fn post(fleet: &Fleet, path: &str, body: &Value, status: u16) -> anyhow::Result<Value> {
    let response = fleet
        .http()
        .post(format!("{}{path}", fleet.url()))
        .json(body)
        .send()
        .await?;
    let answered = response.status().as_u16();
    let answer: Value = response.json().await?;
    if answered != status {
        bail!("POST {path} answered {answered}, not {status}: {answer}");
    }
    Ok(answer)
}

/// Starts a run of the fleet's definition with `params`.
async fn execute(fleet: &Fleet, params: Value) -> anyhow::Result<Uuid> {
    let request = json!({"workflow": NAME, "params": params});
    let answer = post(fleet, "/api/workflows/execute", &request, 202).await?;
    Ok(answer["workflowId"]
        .as_str()
        .context("workflowId in the answer")?
        .parse()?)
}

/// Writes the dictionary `name` of schemathesis.toml into `dir`: one quoted value a line.
fn dictionary(dir: &Path, name: &str, values: &[String]) -> anyhow::Result<()> {
    let lines: String = values.iter().map(|v| format!("\"{v}\"\n")).collect();
    std::fs::write(dir.join(format!("{name}.dict")), lines)?;
    Ok(())
}
