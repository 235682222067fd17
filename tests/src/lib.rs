//! The harness of Flotilla's end-to-end tests: each test starts its own fleet — a coordinator
//! and echo workers as separate processes of the real binaries — against the real Postgres and
//! RabbitMQ, isolated by its own database and queue prefix, so tests run in parallel.
//!
//! The binaries must be built first (`cargo build --bins`); the test command does that.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_api_model::WorkflowResult;
use tokio::process::{Child, Command};
use uuid::Uuid;

/// The Postgres server the tests use (its `postgres` database; each test creates its own).
pub fn postgres_url(database: &str) -> String {
    let base = std::env::var("FLOTILLA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    format!("{base}/{database}")
}

/// The RabbitMQ the tests use.
pub fn amqp_url() -> String {
    std::env::var("FLOTILLA_TEST_AMQP").unwrap_or_else(|_| flotilla_broker::DEFAULT_URL.into())
}

/// Path of a workspace binary, next to the test executable's directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --bins`",
        path.display()
    );
    path
}

/// A file of the repository, e.g. `examples/workflow.yml`.
pub fn repo_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One isolated fleet.
pub struct Fleet {
    pub database: String,
    pub prefix: String,
    pub port: u16,
    coordinator: Option<Child>,
    workers: Vec<Child>,
    http: reqwest::Client,
    /// Extra environment for the coordinator.
    coordinator_env: Vec<(String, String)>,
    /// Agents whose queues the fleet may have declared; deleted at the end.
    agents: BTreeSet<String>,
}

impl Fleet {
    /// A fleet with nothing started yet.
    pub fn new() -> Self {
        // reqwest is built without a default TLS provider; the binaries install ring, so do we.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let id = Uuid::new_v4().simple().to_string();
        Self {
            database: format!("flotilla_test_{}", &id[..16]),
            prefix: format!("test-{}", &id[..16]),
            port: free_port(),
            coordinator: None,
            workers: Vec::new(),
            http: reqwest::Client::new(),
            coordinator_env: Vec::new(),
            agents: BTreeSet::new(),
        }
    }

    pub fn coordinator_env(mut self, key: &str, value: &str) -> Self {
        self.coordinator_env.push((key.into(), value.into()));
        self
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn database_url(&self) -> String {
        postgres_url(&self.database)
    }

    /// The coordinator command, configured for this fleet.
    pub fn coordinator_command(&self) -> Command {
        let mut cmd = Command::new(binary("flotilla-coordinator"));
        cmd.env("DATABASE_URL", self.database_url())
            .env("AMQP_URL", amqp_url())
            .env("PORT", self.port.to_string())
            .env("FLOTILLA_QUEUE_PREFIX", &self.prefix)
            .env("FLOTILLA_DB_POOL_SIZE", "4")
            .env("RUST_LOG", "info")
            .envs(
                self.coordinator_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Starts the coordinator and waits until its API answers.
    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let child = self
            .coordinator_command()
            .spawn()
            .context("starting flotilla-coordinator")?;
        self.coordinator = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .coordinator
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("the coordinator exited at start with {status}");
            }
            if self
                .http
                .get(format!("{}/api/workflows?limit=1", self.url()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the coordinator did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts an echo worker process serving `agents`.
    pub fn start_echo(
        &mut self,
        worker_id: &str,
        agents: &[&str],
        concurrency: usize,
    ) -> anyhow::Result<()> {
        let mut cmd = Command::new(binary("flotilla-agent-echo"));
        for agent in agents {
            cmd.arg("--agent").arg(agent);
            self.agents.insert((*agent).to_string());
        }
        let child = cmd
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .arg("--worker-id")
            .arg(worker_id)
            .env("AMQP_URL", amqp_url())
            .env("FLOTILLA_QUEUE_PREFIX", &self.prefix)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting flotilla-agent-echo")?;
        self.workers.push(child);
        Ok(())
    }

    /// Runs the `flotilla` CLI against this fleet; returns (exit status, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<(ExitStatus, String, String)> {
        let out = Command::new(binary("flotilla"))
            .args(args)
            .env("FLOTILLA_URL", self.url())
            .stdin(Stdio::null())
            .output()
            .await
            .context("running flotilla")?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `GET /api/workflows/{id}`.
    pub async fn run(&self, id: Uuid) -> anyhow::Result<WorkflowResult> {
        let response = self
            .http
            .get(format!("{}/api/workflows/{id}", self.url()))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET /api/workflows/{id} answered {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// Submits a definition given as YAML text.
    pub async fn execute_yaml(
        &self,
        yaml: &str,
        params: serde_json::Value,
    ) -> anyhow::Result<Uuid> {
        let response = self
            .http
            .post(format!("{}/api/workflows/execute", self.url()))
            .json(&serde_json::json!({"yaml": yaml, "params": params}))
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if status.as_u16() != 202 {
            bail!("execute answered {status}: {body}");
        }
        Ok(body["workflowId"]
            .as_str()
            .context("workflowId in the answer")?
            .parse()?)
    }

    /// Waits until the run has ended (success or failure) and returns it.
    pub async fn wait_for_end(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> anyhow::Result<WorkflowResult> {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id).await?;
            if matches!(run.status.as_str(), "success" | "failure") {
                return Ok(run);
            }
            if Instant::now() > deadline {
                bail!(
                    "run {id} did not end within {timeout:?}: {}",
                    serde_json::to_string_pretty(&run)?
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A connection to this fleet's database.
    pub async fn db(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) =
            tokio_postgres::connect(&self.database_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Stops the processes (SIGTERM, so they drain), drops the database and deletes the queues.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut children: Vec<Child> = self.workers.drain(..).collect();
        children.extend(self.coordinator.take());
        for child in &mut children {
            terminate(child).await;
        }
        let (admin, conn) =
            tokio_postgres::connect(&postgres_url("postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.database
            ))
            .await?;
        let connection = flotilla_broker::connect(
            &flotilla_broker::BrokerConfig::new(amqp_url()),
            "flotilla-tests",
        )
        .await?;
        let channel = connection.open_channel().await?;
        let names = flotilla_proto::QueueNames::new(self.prefix.clone());
        self.agents.insert("flotilla-notify".into());
        let queues = [names.results(), names.heartbeats(), names.dead_letters()]
            .into_iter()
            .chain(self.agents.iter().map(|a| names.agent(a)));
        for queue in queues {
            channel.delete_queue(&queue).await?;
        }
        connection.close().await?;
        Ok(())
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends SIGTERM and waits for the process to exit (killing it after 20 s).
pub async fn terminate(child: &mut Child) -> Option<ExitStatus> {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    }
}
