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

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use flotilla_core::definition::RetrySpec;
use flotilla_core::duration::{UserDuration, parse as parse_duration};
use flotilla_core::retry::Backoff;
use flotilla_worker::cli::{WorkerArgs, start_telemetry};
use flotilla_worker::{HandlerError, TaskContext};
use serde_json::Value;
use tracing::error;

use crate::request::{Defaults, Request};

/// Serves Flotilla agent queues by performing HTTP requests.
#[derive(Parser)]
#[command(version)]
struct Args {
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
    #[command(flatten)]
    worker: WorkerArgs,
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
    let tracing = match start_telemetry("flotilla-http") {
        Ok(tracing) => tracing,
        Err(code) => return code,
    };

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
    let config = args.worker.config();
    args.worker
        .serve(config, tracing, move |ctx| handle(agent.clone(), ctx))
        .await
}
