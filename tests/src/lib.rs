//! The harness of Flotilla's end-to-end tests: each test starts its own fleet — coordinators
//! and echo workers as separate processes of the real binaries — against the real Postgres and
//! RabbitMQ, isolated by its own database and queue prefix, so tests run in parallel.
//!
//! The fault-injection tests (`tests/faults.rs`) use more of it: several coordinators on one
//! database and prefix, workers restarted by a supervisor when they die, signals (`kill -9`,
//! SIGSTOP, SIGCONT) sent to a chosen process ([`process`]), RabbitMQ and Postgres stopped and
//! started under the fleet ([`services`]), and the audit of what the fleet left in Postgres and
//! RabbitMQ ([`audit`]).
//!
//! The binaries must be built first (`cargo build --bins`); the test command does that.

pub mod audit;
pub mod process;
pub mod services;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_api_model::WorkflowResult;
use flotilla_broker::testing;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub use process::{Launch, Managed, ProcessState, Signal};

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

/// The directory of the running executable's profile, e.g. `target/debug`: tests run from
/// `target/<profile>/deps`, binaries built on the harness (the bench) from `target/<profile>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the process knows its own path");
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The cargo target directory the tests were built in (`target/`, or `$CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    let profile = profile_dir();
    profile.parent().map_or(profile.clone(), Path::to_path_buf)
}

/// Path of a workspace binary, next to the test executable's directory.
pub fn binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
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

/// How long a coordinator may take to answer its API after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One coordinator of a fleet: its API port and its process.
struct CoordinatorSlot {
    port: u16,
    process: Managed,
}

/// One isolated fleet: its own database and queue prefix, any number of coordinators sharing
/// them, and echo workers.
pub struct Fleet {
    pub database: String,
    pub prefix: String,
    /// The API port of the first coordinator.
    pub port: u16,
    coordinators: Vec<CoordinatorSlot>,
    workers: Vec<Managed>,
    http: reqwest::Client,
    /// The admin API token every coordinator is started with (`FLOTILLA_ADMIN_TOKEN`), and which
    /// the fleet's CLI runs and HTTP requests send.
    admin_token: String,
    /// Extra environment for every coordinator.
    coordinator_env: Vec<(String, String)>,
    /// Agents whose queues the fleet may have declared; deleted at the end.
    agents: BTreeSet<String>,
    /// Other task queues the fleet may have declared (of label sets); deleted at the end.
    task_queues: BTreeSet<String>,
    /// Where the processes write their output; `None`: the test's own stdout and stderr.
    logs: Option<PathBuf>,
}

impl Fleet {
    /// A fleet with nothing started yet.
    pub fn new() -> Self {
        // reqwest is built without a default TLS provider; the binaries install ring, so do we.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let id = Uuid::new_v4().simple().to_string();
        let admin_token = format!("flt_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        Self {
            database: format!("flotilla_test_{}", &id[..16]),
            prefix: format!("test-{}", &id[..16]),
            port: free_port(),
            coordinators: Vec::new(),
            workers: Vec::new(),
            http: authorized_client(&admin_token),
            admin_token,
            coordinator_env: Vec::new(),
            agents: BTreeSet::new(),
            task_queues: BTreeSet::new(),
            logs: None,
        }
    }

    /// An HTTP client that sends the fleet's admin token with every request: what a test's own
    /// requests to the API go through.
    pub fn http(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// The admin API token of the fleet's coordinators.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Sets `key=value` in the environment of every coordinator started afterwards.
    pub fn coordinator_env(mut self, key: &str, value: &str) -> Self {
        self.coordinator_env.push((key.into(), value.into()));
        self
    }

    /// Writes each process's output to `<dir>/<process>.log` (appending across restarts) instead
    /// of the test's output: fault tests start dozens of processes.
    pub fn log_to(mut self, dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.logs = Some(dir);
        Ok(self)
    }

    /// Where the processes' logs are, if they go to files.
    pub fn log_dir(&self) -> Option<&Path> {
        self.logs.as_deref()
    }

    /// How many lines of the logs of the processes whose name starts with `process` contain
    /// `needle` (0 when the logs are not in files).
    pub fn count_in_logs(&self, process: &str, needle: &str) -> usize {
        let Some(dir) = &self.logs else { return 0 };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(process))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|text| text.lines().filter(|l| l.contains(needle)).count())
            .sum()
    }

    /// The URL of the first coordinator's API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The URL of coordinator `i`'s API.
    pub fn coordinator_url(&self, i: usize) -> String {
        let port = self.coordinators.get(i).map_or(self.port, |c| c.port);
        format!("http://127.0.0.1:{port}")
    }

    pub fn database_url(&self) -> String {
        postgres_url(&self.database)
    }

    /// The queue names of this fleet.
    pub fn queue_names(&self) -> flotilla_proto::QueueNames {
        flotilla_proto::QueueNames::new(self.prefix.clone())
    }

    /// The coordinator command, configured for this fleet, on the first coordinator's port.
    pub fn coordinator_command(&self) -> Command {
        let mut cmd = Command::new(binary("flotilla-coordinator"));
        self.configure_coordinator(&mut cmd, self.port);
        cmd.kill_on_drop(true);
        cmd
    }

    fn configure_coordinator(&self, cmd: &mut Command, port: u16) {
        cmd.env("DATABASE_URL", self.database_url())
            .env("AMQP_URL", amqp_url())
            .env("PORT", port.to_string())
            .env("FLOTILLA_QUEUE_PREFIX", &self.prefix)
            .env("FLOTILLA_DB_POOL_SIZE", "4")
            .env("FLOTILLA_ADMIN_TOKEN", &self.admin_token)
            .env("RUST_LOG", "info")
            .envs(
                self.coordinator_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::null());
    }

    /// A recipe that builds the command of each incarnation of a process.
    fn recipe(
        &self,
        name: &str,
        base: Command,
        launch: &Launch,
    ) -> anyhow::Result<process::Recipe> {
        let log: Option<PathBuf> = self.logs.as_ref().map(|d| d.join(format!("{name}.log")));
        if let Some(path) = &log {
            // Fail here, not in the supervisor, when the log cannot be written.
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
        }
        let std = base.as_std();
        let program = std.get_program().to_owned();
        let args: Vec<_> = std.get_args().map(ToOwned::to_owned).collect();
        let env: Vec<_> = std
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
            .collect();
        let launch = launch.clone();
        let name = name.to_string();
        Ok(Box::new(move |incarnation| {
            let mut cmd = Command::new(&program);
            cmd.args(&args)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .envs(launch.env_of(incarnation))
                .stdin(Stdio::null());
            if let Some(path) = &log {
                match OpenOptions::new().create(true).append(true).open(path) {
                    Ok(file) => {
                        if incarnation > 0 {
                            use std::io::Write;
                            let mut marker: &File = &file;
                            let _ = writeln!(
                                marker,
                                "[harness] {name}: incarnation {incarnation} starts"
                            );
                        }
                        let err = file.try_clone().map_or(Stdio::null(), Stdio::from);
                        cmd.stdout(Stdio::from(file)).stderr(err);
                    }
                    Err(_) => {
                        cmd.stdout(Stdio::null()).stderr(Stdio::null());
                    }
                }
            }
            cmd
        }))
    }

    /// Starts a coordinator with the fleet's settings and waits until its API answers.
    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        self.add_coordinator(Launch::once()).await.map(|_| ())
    }

    /// Starts another coordinator on the fleet's database and queue prefix (the first one on
    /// [`Fleet::port`], the others on ports of their own) and waits until its API answers.
    /// Returns its index.
    pub async fn add_coordinator(&mut self, launch: Launch) -> anyhow::Result<usize> {
        let index = self.coordinators.len();
        let port = if index == 0 { self.port } else { free_port() };
        let name = format!("coordinator-{index}");
        let mut base = Command::new(binary("flotilla-coordinator"));
        self.configure_coordinator(&mut base, port);
        let recipe = self.recipe(&name, base, &launch)?;
        let process = Managed::spawn(&name, recipe, launch.is_supervised())?;
        self.coordinators.push(CoordinatorSlot { port, process });
        self.wait_coordinator_ready(index, READY_TIMEOUT).await?;
        Ok(index)
    }

    /// Waits until coordinator `i`'s API answers (after a start or a restart).
    pub async fn wait_coordinator_ready(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let slot = self
            .coordinators
            .get(i)
            .with_context(|| format!("no coordinator {i}"))?;
        // Open to all, so a coordinator started with another credential than the fleet's is
        // seen ready too; it checks Postgres, as the API needs it.
        let url = format!("http://127.0.0.1:{}/health/ready", slot.port);
        let deadline = Instant::now() + timeout;
        loop {
            let state = slot.process.state();
            if state.finished {
                bail!(
                    "coordinator {i} exited at start with {}",
                    state
                        .exits
                        .last()
                        .map_or_else(|| "no status".into(), process::describe)
                );
            }
            if state.pid.is_some()
                && self
                    .http
                    .get(&url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("coordinator {i} did not answer within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Coordinator `i`'s process.
    pub fn coordinator(&self, i: usize) -> &Managed {
        &self.coordinators[i].process
    }

    /// How many coordinators were started.
    pub fn coordinator_count(&self) -> usize {
        self.coordinators.len()
    }

    /// Starts an echo worker process serving `agents`, not restarted if it dies.
    pub fn start_echo(
        &mut self,
        worker_id: &str,
        agents: &[&str],
        concurrency: usize,
    ) -> anyhow::Result<()> {
        self.start_worker(worker_id, agents, concurrency, Launch::once())
            .map(|_| ())
    }

    /// Starts an echo worker process serving `agents`; returns its index.
    pub fn start_worker(
        &mut self,
        worker_id: &str,
        agents: &[&str],
        concurrency: usize,
        launch: Launch,
    ) -> anyhow::Result<usize> {
        let mut base = Command::new(binary("flotilla-agent-echo"));
        for agent in agents {
            base.arg("--agent").arg(agent);
        }
        base.arg("--concurrency")
            .arg(concurrency.to_string())
            .arg("--worker-id")
            .arg(worker_id)
            .env("RUST_LOG", "warn");
        self.start_worker_command(worker_id, agents, base, launch)
    }

    /// Starts a worker of any kind (e.g. one written in another language) from `base`, which
    /// must serve `agents`; the fleet adds its RabbitMQ URL and queue prefix to the environment
    /// (`AMQP_URL`, `FLOTILLA_QUEUE_PREFIX`). Returns its index among the workers.
    pub fn start_worker_command(
        &mut self,
        worker_id: &str,
        agents: &[&str],
        mut base: Command,
        launch: Launch,
    ) -> anyhow::Result<usize> {
        self.agents
            .extend(agents.iter().map(|agent| (*agent).to_string()));
        base.env("AMQP_URL", amqp_url())
            .env("FLOTILLA_QUEUE_PREFIX", &self.prefix);
        let recipe = self.recipe(worker_id, base, &launch)?;
        let process = Managed::spawn(worker_id, recipe, launch.is_supervised())?;
        self.workers.push(process);
        Ok(self.workers.len() - 1)
    }

    /// Adds agents served by workers the fleet did not start, whose queues those workers
    /// declared, so that cleanup deletes them too. (The queues of the agents of the fleet's
    /// steps are found in its database.)
    pub fn track_agents(&mut self, agents: impl IntoIterator<Item = String>) {
        self.agents.extend(agents);
    }

    /// Adds task queues (those of label sets, see [`flotilla_proto::QueueNames::tasks`]) that
    /// the fleet's workers or coordinators may have declared, so that cleanup deletes them too.
    pub fn track_queues(&mut self, queues: impl IntoIterator<Item = String>) {
        self.task_queues.extend(queues);
    }

    /// Worker `i`'s process.
    pub fn worker(&self, i: usize) -> &Managed {
        &self.workers[i]
    }

    /// The workers' processes, in the order they were started.
    pub fn workers(&self) -> &[Managed] {
        &self.workers
    }

    /// Runs the `flotilla` CLI against this fleet; returns (exit status, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<(ExitStatus, String, String)> {
        let out = Command::new(binary("flotilla"))
            .args(args)
            .env("FLOTILLA_URL", self.url())
            .env(flotilla_api_model::API_TOKEN_ENV, &self.admin_token)
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

    /// The registry's agents, as `GET /api/agents` of the first coordinator lists them.
    pub async fn agents(&self) -> anyhow::Result<Vec<flotilla_api_model::AgentStatus>> {
        let response = self
            .http
            .get(format!("{}/api/agents", self.url()))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET /api/agents answered {}", response.status());
        }
        let list: flotilla_api_model::AgentList = response.json().await?;
        Ok(list.agents)
    }

    /// Submits a definition given as YAML text to the first coordinator.
    pub async fn execute_yaml(
        &self,
        yaml: &str,
        params: serde_json::Value,
    ) -> anyhow::Result<Uuid> {
        self.execute_yaml_on(0, yaml, params).await
    }

    /// `POST` of `body` to `path` of coordinator `i`'s API: the status and the JSON answer.
    pub async fn post_on(
        &self,
        i: usize,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let response = self
            .http
            .post(format!("{}{path}", self.coordinator_url(i)))
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    /// Submits a definition given as YAML text to coordinator `i`.
    pub async fn execute_yaml_on(
        &self,
        i: usize,
        yaml: &str,
        params: serde_json::Value,
    ) -> anyhow::Result<Uuid> {
        let response = self
            .http
            .post(format!("{}/api/workflows/execute", self.coordinator_url(i)))
            .json(&serde_json::json!({"yaml": yaml, "params": params}))
            .timeout(Duration::from_secs(60))
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

    /// Waits until the run has ended (success or failure, or the end of its rollback) and
    /// returns it.
    pub async fn wait_for_end(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> anyhow::Result<WorkflowResult> {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id).await?;
            if matches!(
                run.status.as_str(),
                "success" | "failure" | "rolled_back" | "rollback_failed"
            ) {
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

    /// A connection to RabbitMQ, for inspecting the fleet's queues.
    pub async fn broker(&self) -> anyhow::Result<flotilla_broker::Connection> {
        Ok(flotilla_broker::connect(
            &flotilla_broker::BrokerConfig::new(amqp_url()),
            "flotilla-tests",
        )
        .await?)
    }

    /// Takes the tasks of `agent` in a worker's place, on `connection`. The coordinator may be
    /// declaring the same queue at this moment, and RabbitMQ can then answer the second declare
    /// before the quorum queue serves consumers (`basic.consume` fails with INTERNAL_ERROR and
    /// closes the connection): like a worker, the consumer reconnects on such a transient error.
    pub async fn consume_tasks(
        &self,
        connection: &flotilla_broker::Connection,
        agent: &str,
        prefetch: u16,
    ) -> anyhow::Result<flotilla_broker::ReconnectingConsumer> {
        let names = self.queue_names();
        let queue = names.agent(agent);
        let agent = agent.to_owned();
        // The coordinator declares with the same default limit; another would be refused.
        let limit = connection.config().delivery_limit;
        let declare = move |channel: flotilla_broker::Channel| {
            let (names, agent) = (names.clone(), agent.clone());
            async move { flotilla_broker::declare_agent_queue(&channel, &names, &agent, limit).await }
        };
        Ok(flotilla_broker::ReconnectingConsumer::start(
            connection,
            &queue,
            "",
            prefetch,
            declare,
            tokio_util::sync::CancellationToken::new(),
        )
        .await?)
    }

    /// The queues the fleet may have declared: every agent queue (normal and high priority),
    /// results, dead letters, heartbeats and logs.
    pub fn queues(&self) -> Vec<String> {
        let mut agents = self.agents.clone();
        agents.insert("flotilla-notify".into());
        let mut queues = testing::queues_of(&self.queue_names(), agents.iter().map(String::as_str));
        queues.extend(self.task_queues.iter().cloned());
        queues
    }

    /// The task queues the fleet's coordinators may have declared for its steps: both priorities
    /// of every agent and label set a step asked for, agents no worker serves included. Empty
    /// when the database cannot be read (a fault test may have left Postgres down).
    async fn step_queues(&self) -> Vec<String> {
        let Ok(db) = self.db().await else {
            return Vec::new();
        };
        let Ok(rows) = db
            .query("SELECT DISTINCT agent, labels FROM steps", &[])
            .await
        else {
            return Vec::new();
        };
        let names = self.queue_names();
        rows.iter()
            .flat_map(|row| {
                let agent: String = row.get(0);
                let labels: BTreeMap<String, String> = row
                    .get::<_, Option<serde_json::Value>>(1)
                    .and_then(|labels| serde_json::from_value(labels).ok())
                    .unwrap_or_default();
                [false, true].map(|high| names.tasks(&agent, &labels, high))
            })
            .collect()
    }

    /// Stops every process gracefully (SIGTERM, so they drain; SIGKILL after 20 s): the workers
    /// first, so their last results reach a coordinator, then the coordinators.
    pub async fn shutdown(&mut self) {
        // Every request is sent before any answer is awaited, so they stop side by side.
        let workers: Vec<_> = self.workers.iter().map(Managed::terminate).collect();
        for stopped in workers {
            stopped.await;
        }
        let coordinators: Vec<_> = self
            .coordinators
            .iter()
            .map(|c| c.process.terminate())
            .collect();
        for stopped in coordinators {
            stopped.await;
        }
    }

    /// Stops what still runs, drops the fleet's database and deletes its queues. The processes'
    /// logs stay (see [`Fleet::log_to`]).
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        let mut queues = self.queues();
        queues.extend(self.step_queues().await);
        // Processes still running would recreate what is deleted.
        self.shutdown().await;
        let (admin, conn) =
            tokio_postgres::connect(&postgres_url("postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.database
            ))
            .await?;
        let connection = self.broker().await?;
        testing::delete_topology(&connection, &self.queue_names(), &queues).await?;
        connection.close().await?;
        Ok(())
    }

    /// Stops the processes (SIGTERM, so they drain), drops the database and deletes the queues.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown().await;
        self.cleanup().await
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

/// An HTTP client that sends `token` as `Authorization: Bearer` with every request.
pub fn authorized_client(token: &str) -> reqwest::Client {
    // reqwest is built without a default TLS provider; the binaries install ring, so do we.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .expect("a token is visible ASCII");
    value.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, value)]);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
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

/// The step `id` of a run's view; panics naming it when the run has none.
pub fn step<'a>(
    run: &'a flotilla_api_model::WorkflowResult,
    id: &str,
) -> &'a flotilla_api_model::StepResult {
    run.steps
        .iter()
        .find(|s| s.step_id == id)
        .unwrap_or_else(|| panic!("no step {id} in {run:?}"))
}

/// A local webhook receiver (a team chat, say) on `POST /hook`: its URL, and the JSON bodies it
/// received, in order. It serves until the test's runtime ends.
pub async fn webhook() -> anyhow::Result<(
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
)> {
    let received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = {
        let received = received.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let received = received.clone();
                async move {
                    received
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(body);
                    "ok"
                }
            }),
        )
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, received))
}

/// A reader of `GET /api/events` (server-sent `runs` events).
pub struct RunChanges {
    stream: reqwest::Response,
    buffer: String,
}

impl RunChanges {
    /// Opens the stream at `url` as `client`; fails on a status other than 200.
    pub async fn open(client: &reqwest::Client, url: &str) -> anyhow::Result<Self> {
        let stream = client.get(url).send().await?.error_for_status()?;
        anyhow::ensure!(
            stream.headers()["content-type"] == "text/event-stream",
            "not an event stream: {:?}",
            stream.headers()
        );
        Ok(Self {
            stream,
            buffer: String::new(),
        })
    }

    /// The next event's data as JSON, waiting at most `wait` for each chunk; `None` when the
    /// stream ended.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<serde_json::Value>> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|line| line.strip_prefix("data: "))
                    .collect();
                if data.is_empty() {
                    // A keep-alive comment.
                    continue;
                }
                anyhow::ensure!(block.starts_with("event: runs\n"), "{block}");
                return Ok(Some(serde_json::from_str(&data.concat())?));
            }
            match tokio::time::timeout(wait, self.stream.chunk()).await?? {
                Some(chunk) => self.buffer.push_str(std::str::from_utf8(&chunk)?),
                None => return Ok(None),
            }
        }
    }
}
