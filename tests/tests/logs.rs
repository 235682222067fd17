//! Step logs across a real fleet: what a shell step prints reaches the coordinator in batches,
//! is stored per attempt up to the cap, and is read back through the API and the CLI, live with
//! `--follow`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use flotilla_api_model::StepLogs;
use flotilla_tests::{Fleet, Launch, binary, step};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
/// The fleet's cap on each attempt's log, small enough for a step to pass it.
const MAX_LOG_BYTES: usize = 2000;

/// A fleet with a coordinator (log cap [`MAX_LOG_BYTES`]) and a shell agent allowed `sh`,
/// running its commands in a directory of the test's own.
async fn shell_fleet() -> anyhow::Result<(Fleet, PathBuf)> {
    let root = std::env::temp_dir().join(format!("flotilla-logs-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&root)?;
    let mut fleet =
        Fleet::new().coordinator_env("FLOTILLA_MAX_STEP_LOG_BYTES", &MAX_LOG_BYTES.to_string());
    fleet.start_coordinator().await?;
    let mut shell = Command::new(binary("flotilla-agent-shell"));
    shell
        .args(["--agent", "shell", "--worker-id", "shell", "--allow", "sh"])
        .arg("--root")
        .arg(&root)
        .env("RUST_LOG", "warn");
    fleet.start_worker_command("shell", &["shell"], shell, Launch::once())?;
    Ok((fleet, root))
}

async fn logs(fleet: &Fleet, id: Uuid, query: &str) -> anyhow::Result<StepLogs> {
    let response = fleet
        .http()
        .get(format!("{}/api/workflows/{id}/logs?{query}", fleet.url()))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "logs answered {}",
        response.status()
    );
    Ok(response.json().await?)
}

fn lines(logs: &StepLogs) -> Vec<(&str, u32, &str, &str)> {
    logs.lines
        .iter()
        .map(|l| {
            (
                l.step_id.as_str(),
                l.attempt,
                l.stream.as_str(),
                l.line.as_str(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_steps_output_is_stored_per_attempt_up_to_the_cap_and_read_back() -> anyhow::Result<()> {
    let (fleet, root) = shell_fleet().await?;
    let yaml = "name: logs\nsteps:\n  \
        - id: flaky\n    agent: shell\n    action: run\n    retry: {max_attempts: 2, delay: 10ms}\n    \
          params: {command: [sh, -c, 'echo try; echo warned >&2; [ -e tried ] || { touch tried; exit 1; }; echo ok']}\n  \
        - id: chatty\n    agent: shell\n    action: run\n    \
          params: {command: [sh, -c, 'for i in $(seq 1 300); do echo \"line $i of a step that says a lot\"; done']}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");
    assert_eq!(step(&run, "flaky").attempts, 2);

    // The run's log holds each attempt's lines, in order within each stream.
    let flaky = logs(&fleet, id, "step=flaky").await?;
    let mut stdout: Vec<_> = lines(&flaky)
        .into_iter()
        .filter(|l| l.2 == "stdout")
        .collect();
    stdout.sort_by_key(|l| l.1);
    assert_eq!(
        stdout,
        [
            ("flaky", 1, "stdout", "try"),
            ("flaky", 2, "stdout", "try"),
            ("flaky", 2, "stdout", "ok")
        ]
    );
    assert_eq!(
        lines(&logs(&fleet, id, "step=flaky&attempt=1").await?)
            .into_iter()
            .filter(|l| l.2 == "stderr")
            .collect::<Vec<_>>(),
        [("flaky", 1, "stderr", "warned")]
    );
    assert!(flaky.truncated.is_empty());
    assert!(flaky.ended);

    // The chatty step's log stops at the cap, and says so.
    let chatty = logs(&fleet, id, "step=chatty").await?;
    let kept: usize = chatty.lines.iter().map(|l| l.line.len()).sum();
    assert!(
        kept <= MAX_LOG_BYTES && kept > MAX_LOG_BYTES - 50,
        "{kept} bytes kept"
    );
    assert_eq!(chatty.lines[0].line, "line 1 of a step that says a lot");
    let numbers: Vec<usize> = chatty
        .lines
        .iter()
        .map(|l| l.line.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (1..=numbers.len()).collect::<Vec<_>>(),
        "the head, in order"
    );
    assert_eq!(chatty.truncated.len(), 1);
    assert_eq!(
        (
            chatty.truncated[0].step_id.as_str(),
            chatty.truncated[0].attempt
        ),
        ("chatty", 1)
    );

    // Paging: a read after the last line seen gives what follows it.
    let first = logs(&fleet, id, "limit=2").await?;
    let rest = logs(&fleet, id, &format!("after={}", first.next_after)).await?;
    let all = logs(&fleet, id, "").await?;
    assert_eq!(
        first.lines.iter().chain(&rest.lines).collect::<Vec<_>>(),
        all.lines.iter().collect::<Vec<_>>()
    );

    // The CLI: stdout lines on stdout, stderr lines on stderr, the cut named.
    let (status, out, err) = fleet
        .cli(&["workflows", "logs", &id.to_string(), "--step", "flaky"])
        .await?;
    assert!(status.success(), "{err}");
    assert_eq!(out, "try\ntry\nok\n");
    assert!(
        err.contains("warned\n") && err.contains("--- attempt 2 ---"),
        "{err}"
    );
    let (status, out, err) = fleet.cli(&["workflows", "logs", &id.to_string()]).await?;
    assert!(status.success(), "{err}");
    assert!(out.starts_with("flaky: try\n"), "{out}");
    assert!(
        out.contains("flaky#2: ok\n") && out.contains("chatty: line 3 of"),
        "{out}"
    );
    assert!(
        err.contains(&format!(
            "the log of step `chatty` (attempt 1) was cut at {kept} bytes"
        )),
        "{err}"
    );
    let (status, _, err) = fleet
        .cli(&["workflows", "logs", &id.to_string(), "--step", "deploy"])
        .await?;
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("has no step `deploy`"), "{err}");

    fleet.stop().await?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[tokio::test]
async fn follow_prints_lines_while_the_step_runs_and_ends_with_the_run() -> anyhow::Result<()> {
    let (fleet, root) = shell_fleet().await?;
    // The step prints, then waits for the test to let it finish.
    let yaml = "name: follow\nsteps:\n  - id: build\n    agent: shell\n    action: run\n    \
        params: {command: [sh, -c, 'echo compiling; while [ ! -e release ]; do sleep 0.05; done; echo finished']}\n";
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let mut follower = Command::new(binary("flotilla"))
        .args(["workflows", "logs", &id.to_string(), "--follow"])
        .env("FLOTILLA_URL", fleet.url())
        .env(flotilla_api_model::API_TOKEN_ENV, fleet.admin_token())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = BufReader::new(follower.stdout.take().unwrap()).lines();

    let first = tokio::time::timeout(WAIT, out.next_line()).await??;
    assert_eq!(first.as_deref(), Some("build: compiling"));
    assert_eq!(
        fleet.run(id).await?.status,
        "running",
        "the line was shown while its step ran"
    );

    std::fs::write(root.join("release"), "")?;
    let last = tokio::time::timeout(WAIT, out.next_line()).await??;
    assert_eq!(last.as_deref(), Some("build: finished"));
    let started = Instant::now();
    let status = tokio::time::timeout(WAIT, follower.wait()).await??;
    assert!(status.success(), "{status}");
    assert_eq!(out.next_line().await?, None);
    assert_eq!(fleet.run(id).await?.status, "success");
    assert!(started.elapsed() < Duration::from_secs(10));

    fleet.stop().await?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
