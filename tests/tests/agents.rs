//! The shell and HTTP agents as separate processes of a real fleet: what their steps answer,
//! refuse and leave behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flotilla_api_model::WorkflowResult;
use flotilla_tests::Managed;
use flotilla_tests::step;
use flotilla_tests::{Fleet, amqp_url, binary};
use serde_json::json;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(60);

/// A fleet with one agent process (`binary` serving `agent`), which the fleet's harness did not
/// start: the test stops it, and the fleet deletes its queues.
struct AgentFleet {
    fleet: Fleet,
    process: Managed,
}

impl AgentFleet {
    async fn start(binary_name: &str, agent: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut fleet = Fleet::new();
        fleet.start_coordinator().await?;
        let process = start_agent(&fleet, binary_name, agent, args)?;
        fleet.track_agents([agent.to_string()]);
        Ok(Self { fleet, process })
    }

    async fn run(&self, yaml: &str) -> anyhow::Result<WorkflowResult> {
        let id = self.fleet.execute_yaml(yaml, json!({})).await?;
        self.fleet.wait_for_end(id, WAIT).await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.process.terminate().await;
        self.fleet.stop().await
    }
}

fn start_agent(
    fleet: &Fleet,
    binary_name: &str,
    agent: &str,
    args: &[&str],
) -> anyhow::Result<Managed> {
    let program = binary(binary_name);
    let args: Vec<String> = ["--agent", agent, "--worker-id", agent]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    let prefix = fleet.prefix.clone();
    let recipe = Box::new(move |_incarnation| {
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .env("AMQP_URL", amqp_url())
            .env("FLOTILLA_QUEUE_PREFIX", &prefix)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        cmd
    });
    Managed::spawn(agent, recipe, false)
}

/// A directory of its own for a test's commands.
fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "flotilla-agents-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Waits for a file a command writes, and reads it.
async fn read_when_written(path: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return Ok(text);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `pid` still runs: present in /proc and not a zombie waiting for its reaper.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) state …`: the state follows the last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

async fn wait_gone(pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        anyhow::ensure!(Instant::now() < deadline, "process {pid} still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_shell_step_runs_an_allowed_command_and_returns_its_output() -> anyhow::Result<()> {
    let fleet = AgentFleet::start(
        "flotilla-agent-shell",
        "shell",
        &["--allow", "cargo,printf"],
    )
    .await?;
    let run = fleet
        .run(
            "name: shell\nsteps:\n  - {id: version, agent: shell, action: run, params: {command: [cargo, --version]}}\n  - {id: report, agent: shell, action: run, depends_on: [version], params: {command: [printf, '{\"ok\": true}'], parse: json}}\n",
        )
        .await?;
    assert_eq!(run.status, "success", "{run:?}");
    let version = step(&run, "version").output.clone().unwrap_or_default();
    assert_eq!(version["exit_code"], 0);
    assert!(
        version["stdout"]
            .as_str()
            .unwrap_or_default()
            .starts_with("cargo "),
        "{version}"
    );
    let report = step(&run, "report").output.clone().unwrap_or_default();
    assert_eq!(report["json"], json!({"ok": true}), "{report}");
    fleet.stop().await
}

#[tokio::test]
async fn a_command_outside_the_allow_list_is_refused_without_retry() -> anyhow::Result<()> {
    let fleet = AgentFleet::start("flotilla-agent-shell", "shell", &["--allow", "cargo"]).await?;
    let run = fleet
        .run("name: shell\nsteps:\n  - id: wipe\n    agent: shell\n    action: run\n    retry: {max_attempts: 3, delay: 10ms}\n    params: {command: [rm, -rf, /tmp/anything]}\n")
        .await?;
    assert_eq!(run.status, "failure");
    let wipe = step(&run, "wipe");
    assert_eq!(
        wipe.error.as_deref(),
        Some("shell: program `rm` is not in this agent's allow-list (cargo)")
    );
    assert_eq!(wipe.attempts, 1, "a refusal is not retried");
    fleet.stop().await
}

#[tokio::test]
async fn a_failing_command_fails_its_step_with_the_exit_code() -> anyhow::Result<()> {
    let fleet = AgentFleet::start("flotilla-agent-shell", "shell", &["--allow", "sh"]).await?;
    let run = fleet
        .run("name: shell\nsteps:\n  - {id: build, agent: shell, action: run, params: {command: [sh, -c, 'echo compiling; echo error: broken >&2; exit 7']}}\n")
        .await?;
    assert_eq!(run.status, "failure");
    assert_eq!(
        step(&run, "build").error.as_deref(),
        Some(
            "shell: `sh -c echo compiling; echo error: broken >&2; exit 7` exited with code 7; stderr: error: broken"
        )
    );
    fleet.stop().await
}

/// A command that starts a grandchild and waits: the grandchild's pid is in `grandchild.pid`.
const SPAWNS_A_GRANDCHILD: &str = "sleep 300 & echo $! > grandchild.pid; wait";

#[tokio::test]
async fn a_timed_out_command_is_killed_with_its_whole_process_group() -> anyhow::Result<()> {
    let root = scratch("timeout")?;
    let fleet = AgentFleet::start(
        "flotilla-agent-shell",
        "shell",
        &["--allow", "sh", "--root", root.to_str().unwrap()],
    )
    .await?;
    let yaml = format!(
        "name: shell\nsteps:\n  - {{id: hang, agent: shell, action: run, params: {{command: [sh, -c, '{SPAWNS_A_GRANDCHILD}'], timeout: 1s}}}}\n"
    );
    let run = fleet.run(&yaml).await?;
    assert_eq!(run.status, "failure");
    let error = step(&run, "hang").error.clone().unwrap_or_default();
    assert!(
        error.ends_with("timed out after 1s; its process group was killed"),
        "{error}"
    );
    let grandchild: u32 = std::fs::read_to_string(root.join("grandchild.pid"))?
        .trim()
        .parse()?;
    wait_gone(grandchild).await?;
    std::fs::remove_dir_all(&root)?;
    fleet.stop().await
}

#[tokio::test]
async fn a_stopping_worker_kills_the_commands_it_gives_up() -> anyhow::Result<()> {
    let root = scratch("shutdown")?;
    let fleet = AgentFleet::start(
        "flotilla-agent-shell",
        "shell",
        &[
            "--allow",
            "sh",
            "--root",
            root.to_str().unwrap(),
            "--shutdown-grace-secs",
            "1",
        ],
    )
    .await?;
    let yaml = format!(
        "name: shell\nsteps:\n  - {{id: hang, agent: shell, action: run, params: {{command: [sh, -c, '{SPAWNS_A_GRANDCHILD}']}}}}\n"
    );
    fleet.fleet.execute_yaml(&yaml, json!({})).await?;
    let grandchild: u32 = read_when_written(&root.join("grandchild.pid"))
        .await?
        .trim()
        .parse()?;
    assert!(alive(grandchild));
    let status = fleet.process.terminate().await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{status:?}");
    wait_gone(grandchild).await?;
    std::fs::remove_dir_all(&root)?;
    fleet.stop().await
}

#[tokio::test]
async fn cancelling_the_run_kills_the_command_with_its_whole_process_group() -> anyhow::Result<()> {
    let root = scratch("cancel")?;
    let fleet = AgentFleet::start(
        "flotilla-agent-shell",
        "shell",
        &["--allow", "sh", "--root", root.to_str().unwrap()],
    )
    .await?;
    let yaml = format!(
        "name: shell\nsteps:\n  - {{id: hang, agent: shell, action: run, params: {{command: [sh, -c, '{SPAWNS_A_GRANDCHILD}']}}}}\n"
    );
    let id = fleet.fleet.execute_yaml(&yaml, json!({})).await?;
    let grandchild: u32 = read_when_written(&root.join("grandchild.pid"))
        .await?
        .trim()
        .parse()?;
    assert!(alive(grandchild));
    let (status, _, stderr) = fleet
        .fleet
        .cli(&["workflows", "cancel", &id.to_string()])
        .await?;
    assert!(status.success(), "{stderr}");
    wait_gone(grandchild).await?;
    assert_eq!(
        step(&fleet.fleet.run(id).await?, "hang").status,
        "cancelled"
    );
    std::fs::remove_dir_all(&root)?;
    fleet.stop().await
}

/// A service for the HTTP agent: `/item` answers JSON, `/flaky` answers 503 once then 200,
/// `/missing` 404 with a reason.
async fn serve(flaky_calls: Arc<AtomicU32>) -> anyhow::Result<String> {
    use axum::Json;
    use axum::http::StatusCode;
    use axum::routing::get;

    let app = axum::Router::new()
        .route(
            "/item",
            get(|| async { Json(json!({"data": {"id": 42, "name": "widget"}})) }),
        )
        .route(
            "/flaky",
            get(move || async move {
                if flaky_calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ok": false})))
                } else {
                    (StatusCode::OK, Json(json!({"ok": true})))
                }
            }),
        )
        .route(
            "/missing",
            get(|| async { (StatusCode::NOT_FOUND, "no such item") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

#[tokio::test]
async fn http_steps_extract_fields_retry_5xx_and_fail_on_unexpected_statuses() -> anyhow::Result<()>
{
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let url = serve(flaky_calls.clone()).await?;
    let fleet =
        AgentFleet::start("flotilla-agent-http", "http", &["--retry-delay", "50ms"]).await?;

    let run = fleet
        .run(&format!(
            "name: http\nsteps:\n  - {{id: fetch, agent: http, action: get, params: {{url: '{url}/item', extract: {{id: $.data.id, name: /data/name}}}}}}\n  - {{id: flaky, agent: http, action: get, params: {{url: '{url}/flaky'}}}}\n"
        ))
        .await?;
    assert_eq!(run.status, "success", "{run:?}");
    let fetch = step(&run, "fetch").output.clone().unwrap_or_default();
    assert_eq!(fetch["status"], 200);
    assert_eq!(fetch["extracted"], json!({"id": 42, "name": "widget"}));
    let flaky = step(&run, "flaky");
    assert_eq!(
        flaky.output.as_ref().map(|o| o["body"].clone()),
        Some(json!({"ok": true}))
    );
    assert_eq!(flaky.attempts, 1, "the agent retried within one attempt");
    assert_eq!(flaky_calls.load(Ordering::SeqCst), 2);

    let (host, port) = url.trim_start_matches("http://").split_once(':').unwrap();
    let run = fleet
        .run(&format!(
            "name: http\nsteps:\n  - {{id: missing, agent: http, action: get, retry: {{max_attempts: 3, delay: 10ms}}, params: {{url: 'http://bot:hunter2@{host}:{port}/missing?token=abc', headers: {{X-Api-Key: key-s3cret}}}}}}\n"
        ))
        .await?;
    assert_eq!(run.status, "failure");
    let missing = step(&run, "missing");
    assert_eq!(
        missing.error.as_deref(),
        Some(
            format!(
                "http: GET http://bot:***@{host}:{port}/missing?… answered 404 Not Found, expected 2xx; body: no such item"
            )
            .as_str()
        )
    );
    assert_eq!(missing.attempts, 1, "a 404 is not retried");
    fleet.stop().await
}
