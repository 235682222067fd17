//! The examples that do real work, run as the README says, on a fleet of real processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_tests::{Fleet, Launch, binary, repo_file, step, webhook};
use tokio::process::Command;
use uuid::Uuid;

/// A build on a busy machine: four cargo commands over a fresh target directory.
const WAIT: Duration = Duration::from_secs(240);

/// A directory of the test's own, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "flotilla-example-{name}-{}",
            Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.0.join(relative)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The id the CLI printed for the run it started.
fn run_id_from(stdout: &str) -> Uuid {
    stdout
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find_map(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("no workflow id in the CLI's output:\n{stdout}"))
}

/// Copies the files of directory `from` into `to`.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Starts a shell agent serving `agent` in `root`, allowed `allow`, as the README starts it.
fn start_shell(fleet: &mut Fleet, agent: &str, allow: &str, root: &Path) -> anyhow::Result<()> {
    let mut shell = Command::new(binary("flotilla-agent-shell"));
    shell
        .args(["--agent", agent, "--worker-id", agent, "--allow", allow])
        .arg("--root")
        .arg(root)
        .env("RUST_LOG", "warn");
    fleet.start_worker_command(agent, &[agent], shell, Launch::once())?;
    Ok(())
}

/// `flotilla workflows execute examples/<example> --wait` with `params` (`name=value`): whether
/// the run succeeded, and its id. The CLI failing otherwise than by the run failing is an error.
async fn execute_example(
    fleet: &Fleet,
    example: &str,
    params: &[String],
) -> anyhow::Result<(bool, Uuid)> {
    let file = repo_file(&format!("examples/{example}"));
    let timeout = WAIT.as_secs().to_string();
    let mut args = vec![
        "workflows",
        "execute",
        file.to_str().unwrap(),
        "--wait",
        "--timeout",
        &timeout,
    ];
    for param in params {
        args.extend(["--param", param]);
    }
    let (status, stdout, stderr) = fleet.cli(&args).await?;
    anyhow::ensure!(
        matches!(status.code(), Some(0 | 1)),
        "the CLI failed ({status}):\n{stdout}\n{stderr}"
    );
    Ok((status.success(), run_id_from(&stdout)))
}

/// A fleet whose `build` channel notifies `hook`, with a shell agent serving `build` in `root`.
async fn build_fleet(hook: &str, root: &Path) -> anyhow::Result<Fleet> {
    let mut fleet = Fleet::new().coordinator_env("FLOTILLA_NOTIFY_BUILD_URL", hook);
    fleet.start_coordinator().await?;
    start_shell(&mut fleet, "build", "cargo,cp,install", root)?;
    Ok(fleet)
}

/// `flotilla workflows execute examples/build-project.yaml --wait` with these paths.
async fn build(fleet: &Fleet, source: &Path, deploy: &Path) -> anyhow::Result<(bool, Uuid)> {
    let params = [
        format!("source={}", source.display()),
        format!("deploy_dir={}", deploy.display()),
    ];
    execute_example(fleet, "build-project.yaml", &params).await
}

#[tokio::test]
async fn build_project_builds_tests_packages_and_deploys_the_crate() -> anyhow::Result<()> {
    let scratch = Scratch::new("build")?;
    let (hook, received) = webhook().await?;
    let root = scratch.path("work");
    std::fs::create_dir_all(&root)?;
    let fleet = build_fleet(&hook, &root).await?;
    let deploy = scratch.path("deploy");

    let (succeeded, id) = build(&fleet, &repo_file("examples/hello-crate"), &deploy).await?;
    let run = fleet.run(id).await?;
    assert!(succeeded, "{run:?}");
    for id in [
        "scaffold", "build", "test", "lint", "audit", "package", "deploy",
    ] {
        assert_eq!(step(&run, id).status, "success", "step {id}");
    }
    let tests = step(&run, "test").output.clone().unwrap_or_default();
    assert!(
        tests["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("test result: ok. 2 passed"),
        "{tests}"
    );
    let package = std::fs::read(deploy.join("hello-flotilla-0.1.0.crate"))?;
    assert_eq!(
        &package[..2],
        [0x1f, 0x8b],
        "a gzipped package was deployed"
    );
    assert!(received.lock().unwrap().is_empty(), "no failure, no notice");

    // What cargo printed is in the steps' logs.
    let (status, out, err) = fleet
        .cli(&["workflows", "logs", &id.to_string(), "--step", "build"])
        .await?;
    assert!(status.success(), "{err}");
    assert!(
        err.contains("Compiling hello-flotilla v0.1.0"),
        "{out}\n{err}"
    );
    fleet.stop().await
}

#[tokio::test]
async fn a_build_that_fails_fails_its_run_and_notifies_the_webhook() -> anyhow::Result<()> {
    let scratch = Scratch::new("broken")?;
    let (hook, received) = webhook().await?;
    let root = scratch.path("work");
    std::fs::create_dir_all(&root)?;
    let fleet = build_fleet(&hook, &root).await?;
    // The crate with a syntax error.
    let broken = scratch.path("broken-crate");
    copy_dir(&repo_file("examples/hello-crate"), &broken)?;
    std::fs::write(
        broken.join("src/lib.rs"),
        "pub fn greeting(name: &str -> String {}\n",
    )?;

    let (succeeded, id) = build(&fleet, &broken, &scratch.path("deploy")).await?;
    assert!(!succeeded);
    let run = fleet.run(id).await?;
    assert_eq!(run.status, "failure");
    let build_step = step(&run, "build");
    assert_eq!(build_step.status, "failure");
    let error = build_step.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("shell: `cargo build --offline --locked` exited with code 101; stderr: ")
            && error.contains("error"),
        "{error}"
    );
    for id in ["test", "lint", "audit", "package", "deploy"] {
        assert_eq!(step(&run, id).status, "skipped", "step {id}");
    }
    assert!(!scratch.path("deploy").exists(), "nothing was deployed");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let notice = loop {
        if let Some(notice) = received.lock().unwrap().first().cloned() {
            break notice;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no notification");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(notice["text"], "Build Project failed");
    assert_eq!(notice["workflowId"], id.to_string());
    fleet.stop().await
}

/// A fleet with a shell agent serving `data` in `root`, allowed what the sales pipeline runs.
async fn data_fleet(root: &Path) -> anyhow::Result<Fleet> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    start_shell(&mut fleet, "data", "awk,install", root)?;
    Ok(fleet)
}

/// `flotilla workflows execute examples/sales-pipeline.yaml --wait` over `source`.
async fn sales(fleet: &Fleet, source: &Path, export: &Path) -> anyhow::Result<(bool, Uuid)> {
    let params = [
        format!("source={}", source.display()),
        format!("export_dir={}", export.display()),
    ];
    execute_example(fleet, "sales-pipeline.yaml", &params).await
}

#[tokio::test]
async fn sales_pipeline_partitions_the_csv_and_exports_the_report() -> anyhow::Result<()> {
    let scratch = Scratch::new("sales")?;
    let root = scratch.path("work");
    std::fs::create_dir_all(&root)?;
    let fleet = data_fleet(&root).await?;
    let export = scratch.path("reports");

    let (succeeded, id) = sales(&fleet, &repo_file("examples/data/sales.csv"), &export).await?;
    let run = fleet.run(id).await?;
    assert!(succeeded, "{run:?}");
    let ingest = step(&run, "ingest").output.clone().unwrap_or_default();
    assert_eq!(
        ingest["json"],
        serde_json::json!({"rows": 12, "partitions": ["eu", "us", "apac"]})
    );
    // One instance per partition, each with its own summary.
    let transform = step(&run, "transform").output.clone().unwrap_or_default();
    let revenues: Vec<_> = transform
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["json"]["region"].clone(), o["json"]["revenue"].clone()))
        .collect();
    assert_eq!(
        serde_json::json!(revenues),
        serde_json::json!([["eu", 124.0], ["us", 179.75], ["apac", 133.6]])
    );
    assert_eq!(step(&run, "validate[2]").status, "success");
    let analyze = step(&run, "analyze").output.clone().unwrap_or_default();
    assert_eq!(
        analyze["json"],
        serde_json::json!({"revenue": 437.35, "units": 118, "top_region": "us"})
    );
    let report = std::fs::read_to_string(export.join("sales-report.csv"))?;
    let mut lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.remove(0), "region,rows,units,revenue");
    lines.sort_unstable();
    assert_eq!(
        lines,
        ["apac,4,28,133.60", "eu,4,34,124.00", "us,4,56,179.75"]
    );
    fleet.stop().await
}

#[tokio::test]
async fn a_malformed_row_fails_validation_naming_it_in_the_step_log() -> anyhow::Result<()> {
    let scratch = Scratch::new("sales-bad")?;
    let root = scratch.path("work");
    std::fs::create_dir_all(&root)?;
    let fleet = data_fleet(&root).await?;
    let source = scratch.path("bad.csv");
    std::fs::write(
        &source,
        "date,region,product,units,price\n2026-01-05,eu,widget,ten,2.50\n2026-01-06,us,widget,3,1.00\n",
    )?;

    let (succeeded, id) = sales(&fleet, &source, &scratch.path("reports")).await?;
    assert!(!succeeded);
    let run = fleet.run(id).await?;
    assert_eq!(run.status, "failure");
    assert_eq!(
        step(&run, "validate[0]").error.as_deref(),
        Some(r#"expectation failed: output.json.invalid == 0 (output.json was {"invalid":1})"#)
    );
    let validate = step(&run, "validate").error.clone().unwrap_or_default();
    assert!(validate.starts_with("item 0 failed: "), "{validate}");
    assert_eq!(step(&run, "export").status, "skipped");
    let (status, _, err) = fleet
        .cli(&[
            "workflows",
            "logs",
            &id.to_string(),
            "--step",
            "validate[0]",
        ])
        .await?;
    assert!(status.success(), "{err}");
    assert_eq!(err, "invalid row 2: 2026-01-05,eu,widget,ten,2.50\n");
    fleet.stop().await
}

/// `flotilla workflows execute examples/error-rate-watch.yaml --wait` against the fleet's own
/// metrics; answers the run, which must succeed.
async fn watch(fleet: &Fleet) -> anyhow::Result<flotilla_api_model::WorkflowResult> {
    let params = [format!("metrics_url={}/metrics", fleet.url())];
    let (succeeded, id) = execute_example(fleet, "error-rate-watch.yaml", &params).await?;
    let run = fleet.run(id).await?;
    anyhow::ensure!(succeeded, "{run:?}");
    Ok(run)
}

#[tokio::test]
async fn error_rate_watch_rolls_back_only_past_its_threshold() -> anyhow::Result<()> {
    let scratch = Scratch::new("watch")?;
    let root = scratch.path("ops");
    std::fs::create_dir_all(&root)?;
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let mut http = Command::new(binary("flotilla-agent-http"));
    http.args(["--agent", "metrics", "--worker-id", "metrics"])
        .env("RUST_LOG", "warn");
    fleet.start_worker_command("metrics", &["metrics"], http, Launch::once())?;
    start_shell(&mut fleet, "ops", "awk", &root)?;
    fleet.start_echo("flaky", &["flaky"], 1)?;
    // No attempt has failed yet: nothing to roll back.
    let run = watch(&fleet).await?;
    let errors = step(&run, "track_errors")
        .output
        .clone()
        .unwrap_or_default();
    assert_eq!(errors["json"]["errors"], 0, "{errors}");
    assert_eq!(step(&run, "rollback").status, "skipped");
    assert!(!root.join("rollback.txt").exists());

    // One failed attempt among the three that ended since: a third of them failed.
    let id = fleet
        .execute_yaml(
            "name: flaky\nsteps:\n  - {id: fail, agent: flaky, action: x, retry: {max_attempts: 1}, params: {fail_attempts: 1}}\n",
            serde_json::json!({}),
        )
        .await?;
    assert_eq!(fleet.wait_for_end(id, WAIT).await?.status, "failure");
    let run = watch(&fleet).await?;
    let errors = step(&run, "track_errors")
        .output
        .clone()
        .unwrap_or_default();
    assert_eq!(
        errors["json"],
        serde_json::json!({"errors": 1, "attempts": 3, "error_rate": 0.3333})
    );
    assert_eq!(step(&run, "rollback").status, "success");
    assert_eq!(
        std::fs::read_to_string(root.join("rollback.txt"))?,
        "rolled back: error rate 0.3333\n"
    );
    fleet.stop().await
}
