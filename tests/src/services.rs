//! Stopping and starting the RabbitMQ and Postgres servers under a running fleet.
//!
//! These act on the machine's servers, shared by every test: tests that call them belong to
//! nextest's `services` group (see `.config/nextest.toml`), which runs them alone. They need the
//! rights to run `rabbitmqctl` and `pg_ctlcluster` (root, as on CI).

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;
use tokio::time::Instant;

use crate::{amqp_url, postgres_url};

/// How long a server may take to stop or to come back.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between two probes of a server that is coming back.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

async fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new(program);
    command.args(args).kill_on_drop(true);
    let output = tokio::time::timeout(SERVICE_TIMEOUT, command.output())
        .await
        .with_context(|| {
            format!(
                "`{program} {}` took over {SERVICE_TIMEOUT:?}",
                args.join(" ")
            )
        })?
        .with_context(|| format!("running `{program}` (is it installed and on PATH?)"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed with {}: {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A server the test stopped. [`Outage::end`] starts it again; dropping an outage that was not
/// ended (the test failed or panicked meanwhile) starts it too, blocking, so that one failed test
/// does not leave the machine without its broker or database.
#[must_use = "the server stays down until the outage ends"]
pub struct Outage {
    service: Service,
    ended: bool,
}

#[derive(Debug, Clone, Copy)]
enum Service {
    RabbitMq,
    Postgres,
}

impl Outage {
    /// Starts the server again and waits until it accepts connections.
    pub async fn end(mut self) -> anyhow::Result<()> {
        let started = match self.service {
            Service::RabbitMq => rabbitmq_start().await,
            Service::Postgres => postgres_start().await,
        };
        // On failure, dropping the outage tries once more.
        self.ended = started.is_ok();
        started
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        eprintln!(
            "[harness] restarting {:?}, which a failed test left stopped",
            self.service
        );
        let started = match self.service {
            Service::RabbitMq => std::process::Command::new("rabbitmqctl")
                .arg("start_app")
                .status(),
            Service::Postgres => postgres_cluster()
                .and_then(|(version, cluster)| {
                    Ok(std::process::Command::new("pg_ctlcluster")
                        .args(["--skip-systemctl-redirect", &version, &cluster, "start"])
                        .status()?)
                })
                .map_err(std::io::Error::other),
        };
        if !started.as_ref().is_ok_and(|s| s.success()) {
            eprintln!(
                "[harness] could not restart {:?}: {started:?}",
                self.service
            );
        }
    }
}

/// `rabbitmqctl stop_app`: the broker closes every connection and stops accepting new ones; its
/// queues and persistent messages stay on disk.
pub async fn rabbitmq_stop() -> anyhow::Result<Outage> {
    let outage = Outage {
        service: Service::RabbitMq,
        ended: false,
    };
    run("rabbitmqctl", &["stop_app"]).await?;
    Ok(outage)
}

/// `rabbitmqctl start_app`, then waits until a client can connect again.
pub async fn rabbitmq_start() -> anyhow::Result<()> {
    run("rabbitmqctl", &["start_app"]).await?;
    run("rabbitmqctl", &["await_startup"]).await?;
    let config = flotilla_broker::BrokerConfig::new(amqp_url());
    wait_until_up("RabbitMQ", || async {
        let connection = flotilla_broker::connect(&config, "flotilla-tests-probe").await?;
        let _ = connection.close().await;
        Ok(())
    })
    .await
}

/// Probes a server until it answers, at most [`SERVICE_TIMEOUT`].
async fn wait_until_up<F, Fut>(what: &str, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + SERVICE_TIMEOUT;
    loop {
        let error = match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            bail!("{what} did not come back within {SERVICE_TIMEOUT:?}: {error:#}");
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// The Postgres cluster to restart: `FLOTILLA_TEST_PG_CLUSTER` (`"15 main"`), else the newest
/// version under `/etc/postgresql` and its `main` cluster.
fn postgres_cluster() -> anyhow::Result<(String, String)> {
    if let Ok(spec) = std::env::var("FLOTILLA_TEST_PG_CLUSTER") {
        let mut parts = spec.split_whitespace();
        if let (Some(version), Some(name), None) = (parts.next(), parts.next(), parts.next()) {
            return Ok((version.into(), name.into()));
        }
        bail!("FLOTILLA_TEST_PG_CLUSTER must be `<version> <cluster>`, not `{spec}`");
    }
    let mut versions: Vec<(u32, String)> = std::fs::read_dir("/etc/postgresql")
        .context("reading /etc/postgresql: restarting Postgres needs a pg_ctlcluster install")?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            Some((name.parse().ok()?, name))
        })
        .collect();
    versions.sort();
    let (_, version) = versions
        .pop()
        .context("no Postgres version under /etc/postgresql")?;
    Ok((version, "main".into()))
}

async fn pg_ctlcluster(action: &str) -> anyhow::Result<()> {
    let (version, cluster) = postgres_cluster()?;
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, &cluster, action],
    )
    .await
}

/// Stops Postgres (fast mode: open transactions are rolled back, connections cut).
pub async fn postgres_stop() -> anyhow::Result<Outage> {
    let outage = Outage {
        service: Service::Postgres,
        ended: false,
    };
    pg_ctlcluster("stop").await?;
    Ok(outage)
}

/// Starts Postgres and waits until it accepts connections.
pub async fn postgres_start() -> anyhow::Result<()> {
    pg_ctlcluster("start").await?;
    wait_for_postgres().await
}

/// Restarts Postgres and waits until it accepts connections.
pub async fn postgres_restart() -> anyhow::Result<()> {
    pg_ctlcluster("restart").await?;
    wait_for_postgres().await
}

async fn wait_for_postgres() -> anyhow::Result<()> {
    wait_until_up("Postgres", || async {
        let (client, connection) =
            tokio_postgres::connect(&postgres_url("postgres"), tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let answered = client.simple_query("SELECT 1").await;
        drop(client);
        let _ = driver.await;
        answered?;
        Ok(())
    })
    .await
}
