//! The echo agent: a test and demo worker that answers any action of the agents it serves with
//! the step's params (see [`echo`] for the reserved params that script its behaviour).
//!
//! Exit codes: 0 after a graceful shutdown (SIGTERM or Ctrl-C), 130 when a second signal cuts the
//! shutdown short, 2 when it cannot start (RabbitMQ unreachable or refusing its queues, the
//! metrics port taken, invalid flags). Losing RabbitMQ while running is not an exit: the agent
//! reconnects and goes on.
//!
//! `--metrics-port` (`FLOTILLA_METRICS_PORT`) serves `/health/live`, `/health/ready` and
//! `/metrics` on that port, on `--metrics-bind` (`FLOTILLA_METRICS_BIND`, default 127.0.0.1).
//!
//! `OTEL_EXPORTER_OTLP_ENDPOINT` turns on trace export (service `flotilla-echo` unless
//! `OTEL_SERVICE_NAME` says otherwise); an invalid `OTEL_*` setting is exit code 2.

mod echo;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use clap::Parser;
use flotilla_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;
use tracing::error;

/// Serves Flotilla agent queues, answering every action with its params.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// An agent whose queue to serve; repeat for several.
    #[arg(
        long = "agent",
        env = "FLOTILLA_AGENTS",
        value_delimiter = ',',
        required = true
    )]
    agents: Vec<String>,
    /// How many tasks run at once at most.
    #[arg(long, env = "FLOTILLA_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// The RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = flotilla_broker::DEFAULT_URL, hide_env_values = true)]
    amqp_url: String,
    /// Prefix of the queue names; must match the coordinator's.
    #[arg(long, env = "FLOTILLA_QUEUE_PREFIX", default_value = "flotilla")]
    queue_prefix: String,
    /// Names this worker in results and heartbeats [default: host-pid-random]
    #[arg(long, env = "FLOTILLA_WORKER_ID")]
    worker_id: Option<String>,
    /// Milliseconds between heartbeats; the coordinators' lease (FLOTILLA_LEASE_TIMEOUT_MS)
    /// must be at least twice as long.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL_MS", default_value_t = 5_000)]
    heartbeat_interval_ms: u64,
    /// Serve /health/live, /health/ready and /metrics on this port [default: not served]
    #[arg(long, env = "FLOTILLA_METRICS_PORT")]
    metrics_port: Option<u16>,
    /// The address of the health and metrics port; loopback unless told otherwise.
    #[arg(long, env = "FLOTILLA_METRICS_BIND", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    metrics_bind: IpAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let tracing = match flotilla_telemetry::init("flotilla-echo") {
        Ok(tracing) => tracing,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };

    let shutdown = CancellationToken::new();
    if let Err(error) = flotilla_telemetry::shutdown_on_signals(shutdown.clone()) {
        error!(%error, "cannot listen for signals");
        return ExitCode::FAILURE;
    }

    let config = WorkerConfig {
        amqp_url: args.amqp_url,
        prefix: args.queue_prefix,
        concurrency: args.concurrency,
        worker_id: args.worker_id,
        heartbeat_interval: std::time::Duration::from_millis(args.heartbeat_interval_ms),
        ..WorkerConfig::default()
    };
    let mut builder = args
        .agents
        .iter()
        .map(|agent| agent.trim())
        .filter(|agent| !agent.is_empty())
        .fold(Worker::builder(config), |builder, agent| {
            builder.agent(agent)
        })
        .fallback(echo::handle);
    if let Some(port) = args.metrics_port {
        builder = builder.serve_health(SocketAddr::new(args.metrics_bind, port));
    }
    let worker = builder.build();

    let code = match worker.run(shutdown).await {
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

/// How long the spans still queued at shutdown may take to export.
const TRACES_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
