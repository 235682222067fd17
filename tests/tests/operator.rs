//! Operator control against the real services: the coordinator, echo workers and the CLI as
//! separate processes, with the real Postgres and RabbitMQ.

use std::time::{Duration, Instant};

use flotilla_tests::step;
use flotilla_tests::{Fleet, Launch};
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Waits until `condition` holds for the run, polling its API.
async fn wait_for_run(
    fleet: &Fleet,
    id: Uuid,
    what: &str,
    condition: impl Fn(&flotilla_api_model::WorkflowResult) -> bool,
) -> anyhow::Result<flotilla_api_model::WorkflowResult> {
    let deadline = Instant::now() + WAIT;
    loop {
        let run = fleet.run(id).await?;
        if condition(&run) {
            return Ok(run);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what} within {WAIT:?}: {run:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A run cancelled from the CLI while its step sleeps for a minute: the worker is told to stop,
/// its handler stops, and the worker reports the attempt as cancelled.
#[tokio::test]
async fn cancelling_a_run_stops_its_running_step_on_the_worker() -> anyhow::Result<()> {
    let fleet = Fleet::new();
    let logs = flotilla_tests::target_dir()
        .join("operator-logs")
        .join(fleet.queue_names().prefix());
    let mut fleet = fleet.log_to(&logs)?;
    fleet.start_coordinator().await?;
    fleet.start_worker(
        "echo-cancel",
        &["slow"],
        2,
        Launch::once().env("RUST_LOG", "info"),
    )?;

    let id = fleet
        .execute_yaml(
            "name: long\nsteps:\n  - {id: nap, agent: slow, action: sleep, params: {sleep_ms: 60000}}\n",
            json!({}),
        )
        .await?;
    wait_for_run(&fleet, id, "the step runs", |run| {
        step(run, "nap").status == "running"
    })
    .await?;
    // The worker holds the task: its heartbeat renewed the lease.
    let db = fleet.db().await?;
    let deadline = Instant::now() + WAIT;
    while db
        .query_opt(
            "SELECT 1 FROM steps WHERE run_id = $1 AND lease_until IS NOT NULL",
            &[&id],
        )
        .await?
        .is_none()
    {
        anyhow::ensure!(Instant::now() < deadline, "no heartbeat for the task");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, stdout, stderr) = fleet.cli(&["workflows", "cancel", &id.to_string()]).await?;
    assert!(status.success(), "{stdout}{stderr}");
    let run = fleet.run(id).await?;
    assert_eq!(
        (run.status.as_str(), step(&run, "nap").status.as_str()),
        ("cancelled", "cancelled")
    );

    // What the worker reported: the handler stopped on the cancel, not at the sleep's end.
    let deadline = Instant::now() + WAIT;
    while fleet.count_in_logs("echo-cancel", "task cancelled") == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the worker never cancelled the task"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        fleet.count_in_logs("echo-cancel", "of its 60000 ms sleep"),
        1,
        "the handler stopped early, once"
    );
    assert_eq!(fleet.count_in_logs("echo-cancel", "task succeeded"), 0);
    assert!(fleet.count_in_logs("echo-cancel", &id.to_string()) > 0);
    fleet.stop().await
}

/// A file holding `text`, in a directory of the test's own.
fn write_file(name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("flotilla-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(name);
    std::fs::write(&file, text)?;
    Ok(file)
}

/// `flotilla schedules add|list|remove` against a live coordinator: the schedule starts runs
/// with its params, is listed with the run its last tick started, and stops once removed. A bad
/// cron or time zone is refused naming the fault.
#[tokio::test]
async fn schedules_are_added_listed_and_removed_from_the_cli() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-s", &["ticker"], 4)?;
    let file = write_file(
        "ticker.yaml",
        "name: ticker\nparams: {env: dev}\nsteps:\n  - {id: tick, agent: ticker, action: tick}\n",
    )?;
    let (status, _, stderr) = fleet
        .cli(&["definitions", "register", file.to_str().unwrap()])
        .await?;
    assert!(status.success(), "{stderr}");

    for (args, fault) in [
        (
            ["--cron", "every minute", "--timezone", "UTC"],
            "is not a cron expression",
        ),
        (
            ["--cron", "* * * * *", "--timezone", "Mars/Base"],
            "`Mars/Base` is not a time zone",
        ),
    ] {
        let mut command = vec!["schedules", "add", "ticker"];
        command.extend(args);
        let (status, stdout, stderr) = fleet.cli(&command).await?;
        assert!(!status.success(), "{stdout}");
        assert!(stderr.contains(fault), "{stderr}");
    }
    let (status, _, stderr) = fleet
        .cli(&["schedules", "add", "nothing", "--cron", "* * * * *"])
        .await?;
    assert!(!status.success());
    assert!(
        stderr.contains("no workflow definition named `nothing`"),
        "{stderr}"
    );

    // Every second (cron with seconds).
    let (status, stdout, stderr) = fleet
        .cli(&[
            "schedules",
            "add",
            "ticker",
            "--cron",
            "* * * * * *",
            "--overlap",
            "allow",
            "--param",
            "env=prod",
        ])
        .await?;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("scheduled ticker"), "{stdout}");

    let deadline = Instant::now() + WAIT;
    let last_run = loop {
        let (status, stdout, stderr) = fleet
            .cli(&["schedules", "list", "--output", "json"])
            .await?;
        assert!(status.success(), "{stderr}");
        let list: flotilla_api_model::ScheduleList = serde_json::from_str(&stdout)?;
        assert_eq!(list.schedules.len(), 1);
        let schedule = &list.schedules[0];
        assert_eq!(
            (
                schedule.id.as_str(),
                schedule.cron.as_str(),
                schedule.overlap.as_str()
            ),
            ("ticker", "* * * * * *", "allow")
        );
        if let Some(id) = schedule.last_run_id {
            break id;
        }
        anyhow::ensure!(Instant::now() < deadline, "the schedule never fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let run = fleet.wait_for_end(last_run, WAIT).await?;
    assert_eq!(run.status, "success");
    assert_eq!(step(&run, "tick").output, Some(json!({"env": "prod"})));
    let (status, stdout, _) = fleet.cli(&["schedules", "list"]).await?;
    assert!(status.success());
    assert!(
        stdout.contains("ticker") && stdout.contains("* * * * * *"),
        "{stdout}"
    );

    let (status, stdout, stderr) = fleet.cli(&["schedules", "remove", "ticker"]).await?;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("removed"), "{stdout}");
    let (status, _, stderr) = fleet.cli(&["schedules", "remove", "ticker"]).await?;
    assert!(!status.success());
    assert!(stderr.contains("no schedule `ticker`"), "{stderr}");
    let (_, stdout, _) = fleet.cli(&["schedules", "list"]).await?;
    assert_eq!(stdout, "no schedules\n");
    // The firing loop reads only the table: nothing left there fires.
    let db = fleet.db().await?;
    let left: i64 = db
        .query_one("SELECT count(*) FROM schedules", &[])
        .await?
        .get(0);
    assert_eq!(left, 0);
    std::fs::remove_dir_all(file.parent().unwrap())?;
    fleet.stop().await
}

/// A run started from a registered version keeps that version's steps when a new version is
/// registered while it runs; `definitions show` lists both.
#[tokio::test]
async fn a_new_version_does_not_change_a_running_run() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let v1 = write_file(
        "v1.yaml",
        "name: pinned\nversion: '1.0'\nsteps:\n  - {id: old, agent: pin, action: work}\n",
    )?;
    let v2 = write_file(
        "v2.yaml",
        "name: pinned\nversion: '2.0'\nsteps:\n  - {id: new, agent: pin, action: work}\n  - {id: extra, agent: pin, action: work}\n",
    )?;
    let (status, _, stderr) = fleet
        .cli(&["definitions", "register", v1.to_str().unwrap()])
        .await?;
    assert!(status.success(), "{stderr}");

    // No worker serves `pin` yet: the run waits on its step while v2 is registered.
    let (status, stdout, stderr) = fleet
        .cli(&[
            "workflows",
            "execute",
            "--name",
            "pinned",
            "--version",
            "1.0",
        ])
        .await?;
    assert!(status.success(), "{stderr}");
    let id: Uuid = stdout.trim().parse()?;
    let (status, _, stderr) = fleet
        .cli(&["definitions", "register", v2.to_str().unwrap()])
        .await?;
    assert!(status.success(), "{stderr}");
    fleet.start_echo("echo-pin", &["pin"], 2)?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    let steps: Vec<&str> = run.steps.iter().map(|s| s.step_id.as_str()).collect();
    assert_eq!(steps, ["old"]);

    // The latest version runs when none is named.
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "execute", "--name", "pinned", "--wait"])
        .await?;
    assert!(status.success(), "{stderr}");
    let latest = fleet
        .run(stdout.lines().next().unwrap_or_default().trim().parse()?)
        .await?;
    let steps: Vec<&str> = latest.steps.iter().map(|s| s.step_id.as_str()).collect();
    assert_eq!(steps, ["new", "extra"]);

    let (status, stdout, stderr) = fleet
        .cli(&["definitions", "show", "pinned", "--output", "json"])
        .await?;
    assert!(status.success(), "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(shown["definition"]["revision"], 2);
    assert_eq!(shown["versions"].as_array().map(Vec::len), Some(2));
    let (status, stdout, _) = fleet
        .cli(&["definitions", "show", "pinned", "--version", "1.0"])
        .await?;
    assert!(status.success());
    assert!(
        stdout.contains("revision 1 of pinned") && stdout.contains("\"old\""),
        "{stdout}"
    );
    let (status, _, stderr) = fleet
        .cli(&[
            "workflows",
            "execute",
            "--name",
            "pinned",
            "--version",
            "7.0",
        ])
        .await?;
    assert!(!status.success());
    assert!(stderr.contains("no version or revision `7.0`"), "{stderr}");
    for file in [v1, v2] {
        std::fs::remove_dir_all(file.parent().unwrap())?;
    }
    fleet.stop().await
}

/// `flotilla workflows report` of a finished fan-out: each step's attempts with the failed
/// one's error, the critical path through the slow branch, and a run that was parallel.
#[tokio::test]
async fn a_report_shows_attempts_the_critical_path_and_parallelism() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-r", &["rep"], 4)?;
    let id = fleet
        .execute_yaml(
            "name: fan\nsteps:\n  - {id: start, agent: rep, action: a}\n  - {id: quick, agent: rep, action: a, depends_on: [start], retry: {max_attempts: 2, delay: 10ms}, params: {fail_attempts: 1}}\n  - {id: slow, agent: rep, action: a, depends_on: [start], params: {sleep_ms: 600}}\n  - {id: other, agent: rep, action: a, depends_on: [start], params: {sleep_ms: 400}}\n  - {id: end, agent: rep, action: a, depends_on: [quick, slow, other]}\n",
            json!({}),
        )
        .await?;
    assert_eq!(fleet.wait_for_end(id, WAIT).await?.status, "success");

    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "report", &id.to_string(), "--output", "json"])
        .await?;
    assert!(status.success(), "{stderr}");
    let report: flotilla_api_model::RunReport = serde_json::from_str(&stdout)?;
    assert_eq!(report.critical_path, ["start", "slow", "end"]);
    assert!(report.parallelism > 1.0, "{}", report.parallelism);
    let quick = report.steps.iter().find(|s| s.step_id == "quick").unwrap();
    let statuses: Vec<&str> = quick.attempts.iter().map(|a| a.status.as_str()).collect();
    assert_eq!(statuses, ["failure", "success"]);
    assert!(
        quick.attempts[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("failing attempt 1 of 1")),
        "{quick:?}"
    );
    let slow = report.steps.iter().find(|s| s.step_id == "slow").unwrap();
    assert!(slow.run_ms >= 600, "{slow:?}");
    assert_eq!(slow.attempts[0].worker.as_deref(), Some("echo-r"));

    let (status, stdout, _) = fleet.cli(&["workflows", "report", &id.to_string()]).await?;
    assert!(status.success());
    assert!(
        stdout.contains("critical path: start -> slow -> end"),
        "{stdout}"
    );
    assert!(
        stdout.contains("quick attempt 1: echo: failing attempt 1 of 1"),
        "{stdout}"
    );
    fleet.stop().await
}
