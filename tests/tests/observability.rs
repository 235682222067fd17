//! Observability end to end: the coordinator's and a worker's `/metrics` move as a run
//! progresses, and the summary over a range (`/api/metrics/summary`, `flotilla metrics
//! --range`) counts its attempts; readiness follows RabbitMQ (cut through a proxy of the test's
//! own, so that the broker other tests use stays up), and no log line shows a password.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_tests::workload::eventually;
use flotilla_tests::{Fleet, Launch};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);

/// Two steps of one agent; the first fails its first attempt and is retried.
const RETRIED_RUN: &str = "
name: observed
steps:
  - id: flaky
    agent: obs1
    action: build
    params: {fail_attempts: 1}
    retry: {max_attempts: 3, delay: 100ms}
  - id: steady
    agent: obs1
    action: test
";

/// A port nothing listens on now, for a process to serve on.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The samples of a Prometheus text page, by series as written (`name{labels}`).
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(http: &reqwest::Client, base: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let response = http
        .get(format!("{base}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = response.text().await?;
    if !status.is_success() || !content_type.starts_with("text/plain; version=0.0.4") {
        bail!("{base}/metrics answered {status} ({content_type}): {text}");
    }
    Ok(parse_metrics(&text))
}

/// Status and JSON body of `GET {base}{path}`.
async fn get_json(http: &reqwest::Client, base: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let response = http
        .get(format!("{base}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// Waits until `GET {base}{path}` answers `status`; returns the body.
async fn wait_for_status(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    status: u16,
) -> anyhow::Result<Value> {
    eventually(
        WAIT,
        &format!("{base}{path} answering {status}"),
        || async {
            let (got, body) = get_json(http, base, path).await?;
            Ok((got == status).then_some(body))
        },
    )
    .await
}

fn value(metrics: &BTreeMap<String, f64>, series: &str) -> f64 {
    metrics.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_as_a_run_with_a_retry_progresses() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    let http = fleet.http();
    let worker_port = free_port()?;
    fleet.start_worker(
        "echo-observed",
        &["obs1"],
        2,
        Launch::once().env("FLOTILLA_METRICS_PORT", &worker_port.to_string()),
    )?;
    let coordinator = fleet.url();
    let worker = format!("http://127.0.0.1:{worker_port}");

    let ready = wait_for_status(&http, &coordinator, "/health/ready", 200).await?;
    let parts: Vec<(&str, &str)> = ready["checks"]
        .as_array()
        .context("checks")?
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or(""),
                c["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        parts,
        [("postgres", "ok"), ("rabbitmq", "ok"), ("migrations", "ok")]
    );
    wait_for_status(&http, &worker, "/health/ready", 200).await?;
    let (status, live) = get_json(&http, &worker, "/health/live").await?;
    assert_eq!((status, live["status"].as_str()), (200, Some("ok")));

    let before = scrape(&http, &coordinator).await?;
    let success = "orchestrator_workflows_total{status=\"success\"}";
    assert_eq!(value(&before, success), 0.0, "a new fleet: {before:?}");

    let id = fleet.execute_yaml(RETRIED_RUN, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");

    // The engine counts after its commit, which the API may read first.
    let after = eventually(WAIT, "the run counted in /metrics", || async {
        let now = scrape(&http, &coordinator).await?;
        Ok((value(&now, success) == 1.0).then_some(now))
    })
    .await?;
    let moved = |series: &str| value(&after, series) - value(&before, series);
    for (series, by) in [
        ("orchestrator_workflow_duration_seconds_count", 1.0),
        ("orchestrator_agent_executions_total{agent=\"obs1\"}", 3.0),
        ("orchestrator_agent_errors_total{agent=\"obs1\"}", 1.0),
        ("orchestrator_retries_total{agent=\"obs1\"}", 1.0),
        (
            "orchestrator_agent_latency_seconds_count{agent=\"obs1\"}",
            3.0,
        ),
        ("orchestrator_queue_wait_seconds_count{agent=\"obs1\"}", 3.0),
        ("orchestrator_stale_results_total", 0.0),
        ("orchestrator_workflows_total{status=\"failure\"}", 0.0),
    ] {
        assert_eq!(
            moved(series),
            by,
            "{series}: before {before:?}, after {after:?}"
        );
    }
    // Read at scrape time: nothing is left to publish or to take.
    assert_eq!(after.get("orchestrator_outbox_backlog"), Some(&0.0));
    assert_eq!(
        after.get("orchestrator_queue_depth{agent=\"obs1\"}"),
        Some(&0.0)
    );

    let worker_metrics = scrape(&http, &worker).await?;
    for (series, expected) in [
        (
            "orchestrator_worker_tasks_total{agent=\"obs1\",action=\"build\"}",
            2.0,
        ),
        (
            "orchestrator_worker_tasks_failed_total{agent=\"obs1\",action=\"build\"}",
            1.0,
        ),
        (
            "orchestrator_worker_tasks_total{agent=\"obs1\",action=\"test\"}",
            1.0,
        ),
        (
            "orchestrator_worker_tasks_in_flight{agent=\"obs1\",action=\"build\"}",
            0.0,
        ),
    ] {
        assert_eq!(
            worker_metrics.get(series),
            Some(&expected),
            "{series} in {worker_metrics:?}"
        );
    }

    let (status, stdout, stderr) = fleet.cli(&["metrics", "--agent", "obs1"]).await?;
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("Workflows  1 succeeded, 0 failed, 0 cancelled (success rate 100.0%)"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|line| line.starts_with("obs1 "))
        .with_context(|| format!("no row for obs1:\n{stdout}"))?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..5], ["obs1", "3", "1", "1", "0"], "{stdout}");

    // The same attempts over a range, read from Postgres rather than one process's counters.
    let (status, summary) = get_json(&http, &coordinator, "/api/metrics/summary?range=1h").await?;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(
        (
            summary["executions"].as_u64(),
            summary["successes"].as_u64(),
            summary["agents"].as_array().map(Vec::len),
        ),
        (Some(3), Some(2), Some(1)),
        "{summary}"
    );
    let obs1 = &summary["agents"][0];
    assert_eq!(obs1["agent"], "obs1");
    let (p50, p99) = (obs1["p50Ms"].as_f64(), obs1["p99Ms"].as_f64());
    assert!(
        matches!((p50, p99), (Some(p50), Some(p99)) if 0.0 <= p50 && p50 <= p99),
        "{summary}"
    );
    let (status, _) = get_json(&http, &coordinator, "/api/metrics/summary?range=soon").await?;
    assert_eq!(status, 400);

    let (status, stdout, stderr) = fleet.cli(&["metrics", "--range", "1h"]).await?;
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("Attempts   3 ended in the last 1h, 2 succeeded (success rate 66.7%)"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|line| line.starts_with("obs1 "))
        .with_context(|| format!("no row for obs1:\n{stdout}"))?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["obs1", "3", "66.7%"], "{stdout}");
    let (status, _, stderr) = fleet.cli(&["metrics", "--range", "1w"]).await?;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("a unit s, m, h or d"), "{stderr}");

    fleet.stop().await
}

/// A TCP proxy in front of RabbitMQ whose connections the test can cut: a cut drops every
/// connection through it and refuses new ones until restored, as a broker that went away does.
struct CuttableProxy {
    address: SocketAddr,
    refusing: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let refusing = Arc::new(AtomicBool::new(false));
        let cuts = watch::Sender::new(0u64);
        let accepting = tokio::spawn({
            let (refusing, cuts) = (refusing.clone(), cuts.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        continue;
                    }
                    let mut cut = cuts.subscribe();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = cut.changed() => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                    });
                }
            }
        });
        Ok(Self {
            address,
            refusing,
            cuts,
            accepting,
        })
    }

    /// `url` with its host and port replaced by the proxy's.
    fn url(&self, url: &str) -> anyhow::Result<String> {
        let start = url.find("://").context("a URL")? + 3;
        let end = url[start..].find('/').map_or(url.len(), |s| start + s);
        let host = url[start..end]
            .rfind('@')
            .map_or(start, |at| start + at + 1);
        Ok(format!("{}{}{}", &url[..host], self.address, &url[end..]))
    }

    fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

/// The broker's `host:port`, from its URL.
fn upstream(url: &str) -> anyhow::Result<String> {
    let start = url.find("://").context("a URL")? + 3;
    let end = url[start..].find('/').map_or(url.len(), |s| start + s);
    let authority = &url[url[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1)..end];
    Ok(if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:5672")
    })
}

#[tokio::test]
async fn readiness_is_503_naming_rabbitmq_while_it_is_cut_off() -> anyhow::Result<()> {
    let broker = flotilla_tests::amqp_url();
    let proxy = CuttableProxy::start(upstream(&broker)?).await?;
    let through_proxy = proxy.url(&broker)?;
    let mut fleet = Fleet::new().coordinator_env("AMQP_URL", &through_proxy);
    fleet.start_coordinator().await?;
    let http = fleet.http();
    let worker_port = free_port()?;
    fleet.start_worker(
        "echo-cut",
        &["cut1"],
        1,
        Launch::once()
            .env("AMQP_URL", &through_proxy)
            .env("FLOTILLA_METRICS_PORT", &worker_port.to_string()),
    )?;
    let coordinator = fleet.url();
    let worker = format!("http://127.0.0.1:{worker_port}");
    wait_for_status(&http, &coordinator, "/health/ready", 200).await?;
    wait_for_status(&http, &worker, "/health/ready", 200).await?;

    proxy.cut();
    let refused = wait_for_status(&http, &coordinator, "/health/ready", 503).await?;
    let error = &refused["error"];
    assert_eq!(error["code"], "unavailable", "{refused}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("not ready: rabbitmq: "), "{refused}");
    assert!(
        !message.contains("postgres"),
        "postgres still answers: {refused}"
    );
    let checks = &error["details"]["checks"];
    assert_eq!(checks[0]["status"], "ok", "{refused}");
    assert_eq!(checks[1]["name"], "rabbitmq", "{refused}");
    assert_eq!(checks[1]["status"], "failing", "{refused}");
    // Alive all the same, and the summary says what fails.
    let (status, _) = get_json(&http, &coordinator, "/health/live").await?;
    assert_eq!(status, 200);
    let (status, summary) = get_json(&http, &coordinator, "/health").await?;
    assert_eq!((status, summary["status"].as_str()), (200, Some("failing")));

    let refused = wait_for_status(&http, &worker, "/health/ready", 503).await?;
    assert_eq!(
        refused["error"]["details"]["checks"][0]["name"], "rabbitmq",
        "{refused}"
    );

    proxy.restore();
    wait_for_status(&http, &coordinator, "/health/ready", 200).await?;
    wait_for_status(&http, &worker, "/health/ready", 200).await?;

    fleet.stop().await
}

/// `url` with the password `password` for its user (`postgres` when it names none).
fn with_password(url: &str, password: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("a URL")?;
    Ok(match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or(user);
            format!("{scheme}://{user}:{password}@{host}")
        }
        None => format!("{scheme}://postgres:{password}@{rest}"),
    })
}

/// Every line the processes of a fleet logged to `dir`.
fn log_lines(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        lines.extend(text.lines().map(str::to_string));
    }
    Ok(lines)
}

/// Runs a fleet whose URLs carry passwords through a start, a run, a lost broker and a failed
/// start, with every log at debug, and checks that no line shows a password.
async fn no_password_in_logs(format: &str) -> anyhow::Result<()> {
    const DB_PASSWORD: &str = "s3cret";
    let broker = flotilla_tests::amqp_url();
    assert!(
        broker.contains("guest:guest@"),
        "the test expects the broker's URL to carry the user and password guest:guest"
    );
    let proxy = CuttableProxy::start(upstream(&broker)?).await?;
    let through_proxy = proxy.url(&broker)?;
    let fleet = Fleet::new();
    let logs = flotilla_tests::target_dir()
        .join("observability-logs")
        .join(&fleet.prefix);
    let database = with_password(&fleet.database_url(), DB_PASSWORD)?;
    let mut fleet = fleet
        .coordinator_env("DATABASE_URL", &database)
        .coordinator_env("AMQP_URL", &through_proxy)
        .coordinator_env("FLOTILLA_LOG_FORMAT", format)
        .coordinator_env("RUST_LOG", "debug")
        .log_to(&logs)?;
    fleet.start_coordinator().await?;
    let http = fleet.http();
    fleet.start_worker(
        "echo-secrets",
        &["sec1"],
        1,
        Launch::once()
            .env("AMQP_URL", &through_proxy)
            .env("FLOTILLA_LOG_FORMAT", format)
            .env("RUST_LOG", "debug"),
    )?;
    let coordinator = fleet.url();

    let run = "name: secrets\nsteps:\n  - {id: one, agent: sec1, action: go}\n";
    let id = fleet.execute_yaml(run, json!({})).await?;
    assert_eq!(fleet.wait_for_end(id, WAIT).await?.status, "success");
    // Reconnecting logs the broker's URL.
    proxy.cut();
    wait_for_status(&http, &coordinator, "/health/ready", 503).await?;
    proxy.restore();
    wait_for_status(&http, &coordinator, "/health/ready", 200).await?;

    // A start that fails names the database's URL in its error.
    let port = free_port()?;
    let failed = fleet
        .coordinator_command()
        .env(
            "DATABASE_URL",
            format!("postgres://app:{DB_PASSWORD}@127.0.0.1:{port}/nowhere"),
        )
        .env("PORT", free_port()?.to_string())
        .env("FLOTILLA_LOG_FORMAT", format)
        .output()
        .await?;
    assert_eq!(failed.status.code(), Some(2), "{failed:?}");
    let failed_stderr = String::from_utf8_lossy(&failed.stderr).into_owned();
    assert!(
        failed_stderr.contains(&format!("127.0.0.1:{port}")),
        "the error names where it tried: {failed_stderr}"
    );

    fleet.shutdown().await;
    let mut lines = log_lines(&logs)?;
    lines.extend(failed_stderr.lines().map(str::to_string));
    let leaks: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(DB_PASSWORD) || l.contains("guest:guest"))
        .collect();
    assert!(leaks.is_empty(), "passwords in the logs: {leaks:#?}");
    // The URLs are there, redacted: the check above looked at the right lines.
    for redacted in [":***@127.0.0.1:5432", "guest:***@"] {
        assert!(
            lines.iter().any(|l| l.contains(redacted)),
            "no line shows `{redacted}`"
        );
    }
    if format == "json" {
        for line in lines.iter().filter(|l| l.starts_with('{')) {
            let event: Value = serde_json::from_str(line)
                .with_context(|| format!("a log line that is not JSON: {line}"))?;
            // Lines about a step name it and its run at the top level.
            if event.get("step_id").is_some() {
                assert!(event.get("run_id").is_some(), "{line}");
            }
        }
        assert!(
            lines.iter().any(|l| l.contains("\"step_id\"")),
            "some line is about a step"
        );
        // The worker's lines within the task carry the run's trace id, and so does the
        // coordinator's line about the run's end.
        let trace_id = format!("\"trace_id\":\"{}\"", id.simple());
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&trace_id) && l.contains("worker.task")),
            "no worker line carries {trace_id}"
        );
        let run_ended = lines
            .iter()
            .find(|l| l.contains("run ended") && l.contains(&id.to_string()))
            .context("the coordinator's line about the run's end")?;
        assert!(run_ended.contains(&trace_id), "{run_ended}");
    }
    fleet.cleanup().await?;
    std::fs::remove_dir_all(&logs)?;
    Ok(())
}

#[tokio::test]
async fn no_password_in_text_logs() -> anyhow::Result<()> {
    no_password_in_logs("text").await
}

#[tokio::test]
async fn no_password_in_json_logs() -> anyhow::Result<()> {
    no_password_in_logs("json").await
}
