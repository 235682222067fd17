//! What every agent binary built on the SDK shares: its connection and serving flags, and the
//! start and end around [`Worker::run`] (feature `cli`).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use flotilla_telemetry::trace::Tracing;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::{HandlerError, TaskContext, Worker, WorkerConfig};

/// How long the spans still queued at shutdown may take to export.
const TRACES_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The flags of an agent binary; `#[command(flatten)]` them into its own.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// An agent whose queue to serve; repeat for several.
    #[arg(
        long = "agent",
        env = "FLOTILLA_AGENTS",
        value_delimiter = ',',
        required = true
    )]
    pub agents: Vec<String>,
    /// How many tasks run at once at most.
    #[arg(long, env = "FLOTILLA_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// The RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = flotilla_broker::DEFAULT_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// Prefix of the queue names; must match the coordinator's.
    #[arg(long, env = "FLOTILLA_QUEUE_PREFIX", default_value = "flotilla")]
    pub queue_prefix: String,
    /// Names this worker in results and heartbeats [default: host-pid-random]
    #[arg(long, env = "FLOTILLA_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Milliseconds between heartbeats; the coordinators' lease (FLOTILLA_LEASE_TIMEOUT_MS)
    /// must be at least twice as long.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL_MS", default_value_t = 5_000)]
    pub heartbeat_interval_ms: u64,
    /// Serve /health/live, /health/ready and /metrics on this port [default: not served]
    #[arg(long, env = "FLOTILLA_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// The address of the health and metrics port; loopback unless told otherwise.
    #[arg(long, env = "FLOTILLA_METRICS_BIND", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub metrics_bind: IpAddr,
    /// A `KEY=VALUE` label that describes this worker in the registry (`flotilla agents`);
    /// repeat for several.
    #[arg(long = "label", env = "FLOTILLA_WORKER_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A directory of secrets, one file per secret named like it, read for
    /// `${{ secrets.NAME }}` when FLOTILLA_SECRET_<NAME> is not set.
    #[arg(long, env = "FLOTILLA_SECRETS_DIR")]
    pub secrets_dir: Option<std::path::PathBuf>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("expected KEY=VALUE, not `{text}`")),
    }
}

/// Starts logging and, with `OTEL_EXPORTER_OTLP_ENDPOINT`, trace export as `service` (unless
/// `OTEL_SERVICE_NAME` says otherwise). An invalid `OTEL_*` setting is exit code 2.
pub fn start_telemetry(service: &str) -> Result<Tracing, ExitCode> {
    flotilla_telemetry::init(service).map_err(|error| {
        eprintln!("error: {error}");
        ExitCode::from(2)
    })
}

impl WorkerArgs {
    /// The worker's config as the flags give it; the rest at its defaults.
    pub fn config(&self) -> WorkerConfig {
        WorkerConfig {
            amqp_url: self.amqp_url.clone(),
            prefix: self.queue_prefix.clone(),
            concurrency: self.concurrency,
            worker_id: self.worker_id.clone(),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            secrets_dir: self.secrets_dir.clone(),
            ..WorkerConfig::default()
        }
    }

    /// Serves every action of the agents with `handler` until SIGTERM or Ctrl-C, then flushes
    /// the traces. Exit codes: 0 after a graceful shutdown, 130 when a second signal cuts it
    /// short, 2 when the worker cannot start, 1 when it cannot listen for signals.
    pub async fn serve<H, F>(self, config: WorkerConfig, tracing: Tracing, handler: H) -> ExitCode
    where
        H: Fn(TaskContext) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        if let Err(error) = flotilla_telemetry::shutdown_on_signals(shutdown.clone()) {
            error!(%error, "cannot listen for signals");
            return ExitCode::FAILURE;
        }
        let mut builder = self
            .agents
            .iter()
            .map(|agent| agent.trim())
            .filter(|agent| !agent.is_empty())
            .fold(Worker::builder(config), |builder, agent| {
                builder.agent(agent)
            })
            .fallback(handler);
        for (key, value) in &self.labels {
            builder = builder.label(key, value);
        }
        if let Some(port) = self.metrics_port {
            builder = builder.serve_health(SocketAddr::new(self.metrics_bind, port));
        }
        let code = match builder.build().run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            // Once started, a worker stops only when asked to.
            Err(error) => {
                error!(%error, "cannot start");
                ExitCode::from(2)
            }
        };
        tracing.shutdown(TRACES_FLUSH_TIMEOUT);
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_key_value_pairs() {
        assert_eq!(
            parse_label(" region = eu ").unwrap(),
            ("region".to_owned(), "eu".to_owned())
        );
        assert_eq!(
            parse_label("empty=").unwrap(),
            ("empty".to_owned(), String::new())
        );
        for bad in ["gpu", "=x", " =x"] {
            let error = parse_label(bad).unwrap_err();
            assert!(error.contains("expected KEY=VALUE"), "{error}");
        }
    }
}
