//! The HTTP agent: performs the HTTP request of each step (method, URL, headers, body, expected
//! statuses, timeout, retries on 5xx and connection errors) and extracts fields of the JSON
//! answer into the step's output.
//!
//! Exit codes: 0 after a graceful shutdown (SIGTERM or Ctrl-C), 130 when a second signal cuts the
//! shutdown short, 2 when it cannot start (invalid flags, RabbitMQ unreachable or refusing its
//! queues, the metrics port taken).
//!
//! URLs appear in logs and errors without password or query; header values never appear.

mod call;
mod request;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use flotilla_core::definition::RetrySpec;
use flotilla_core::duration::{UserDuration, parse as parse_duration};
use flotilla_core::retry::Backoff;
use flotilla_worker::{HandlerError, TaskContext, Worker, WorkerConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::request::{Defaults, Request};

/// Serves Flotilla agent queues by performing HTTP requests.
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
    /// A try's timeout when the step sets none.
    #[arg(long, env = "FLOTILLA_HTTP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Tries per step, the first included, when the step's `retry` does not say.
    #[arg(long, env = "FLOTILLA_HTTP_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,
    /// The wait before the first retry; it doubles on each (up to 10s) unless the step says
    /// otherwise.
    #[arg(long, env = "FLOTILLA_HTTP_RETRY_DELAY", default_value = "200ms", value_parser = parse_duration)]
    retry_delay: Duration,
    /// The largest response body a step accepts.
    #[arg(long, env = "FLOTILLA_HTTP_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
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

/// What every step shares.
struct Agent {
    http: reqwest::Client,
    defaults: Defaults,
    max_body_bytes: usize,
}

async fn handle(agent: Arc<Agent>, ctx: TaskContext) -> Result<Value, HandlerError> {
    let request = Request::from_params(ctx.params(), &agent.defaults)?;
    call::call(&agent.http, &request, agent.max_body_bytes).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    flotilla_telemetry::init_logging();

    let http = match call::client() {
        Ok(http) => http,
        Err(error) => {
            error!(%error, "cannot build the HTTP client");
            return ExitCode::from(2);
        }
    };
    let agent = Arc::new(Agent {
        http,
        defaults: Defaults {
            timeout: args.timeout,
            retry: RetrySpec {
                max_attempts: Some(args.max_attempts),
                backoff: Some(Backoff::Exponential),
                delay: Some(UserDuration(args.retry_delay)),
                max_delay: Some(UserDuration(args.retry_delay.max(Duration::from_secs(10)))),
                jitter: None,
            },
        },
        max_body_bytes: args.max_body_bytes,
    });

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
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
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
        .fallback(move |ctx| handle(agent.clone(), ctx));
    if let Some(port) = args.metrics_port {
        builder = builder.serve_health(SocketAddr::new(args.metrics_bind, port));
    }

    match builder.build().run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "cannot start");
            ExitCode::from(2)
        }
    }
}
