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

use std::process::ExitCode;

use clap::Parser;
use flotilla_worker::cli::{WorkerArgs, start_telemetry};

/// Serves Flotilla agent queues, answering every action with its params.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let tracing = match start_telemetry("flotilla-echo") {
        Ok(tracing) => tracing,
        Err(code) => return code,
    };
    let config = args.worker.config();
    args.worker.serve(config, tracing, echo::handle).await
}
