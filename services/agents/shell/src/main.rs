//! The shell agent: runs the commands of its steps, each in a process group of its own, within
//! the allow-list, root directory, timeout and output cap of its config (see [`config`]).
//!
//! Exit codes: 0 after a graceful shutdown (SIGTERM or Ctrl-C), 130 when a second signal cuts the
//! shutdown short, 2 when it cannot start (invalid config or flags, RabbitMQ unreachable or
//! refusing its queues, the metrics port taken).
//!
//! A shutdown lets commands in progress run for the shutdown grace; those still running then
//! are killed with their process group, and RabbitMQ gives their tasks to another worker.

mod config;
mod request;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use flotilla_core::duration::{UserDuration, parse as parse_duration};
use flotilla_worker::cli::{WorkerArgs, start_telemetry};
use flotilla_worker::{HandlerError, TaskContext, WorkerConfig};
use serde_json::Value;
use tracing::error;

use crate::config::{Config, File};
use crate::request::Request;

/// Serves Flotilla agent queues by running allow-listed commands.
#[derive(Parser)]
// Commands are heavier than most actions: fewer at once than the SDK's default.
#[command(version, mut_arg("concurrency", |arg| arg.default_value("4")))]
struct Args {
    /// A YAML file with `allow`, `allow_shell`, `root`, `max_output_bytes`, `timeout`,
    /// `pass_env`; the flags below override it.
    #[arg(long, env = "FLOTILLA_SHELL_CONFIG")]
    config: Option<PathBuf>,
    /// Programs steps may run (names found on PATH, or exact paths).
    #[arg(long, env = "FLOTILLA_SHELL_ALLOW", value_delimiter = ',')]
    allow: Option<Vec<String>>,
    /// Let steps run a command string with `shell: true` (sh -c), whatever the allow-list.
    #[arg(long, env = "FLOTILLA_SHELL_ALLOW_SHELL")]
    allow_shell: Option<bool>,
    /// Commands run in this directory or below it [default: the current directory]
    #[arg(long, env = "FLOTILLA_SHELL_ROOT")]
    root: Option<PathBuf>,
    /// Bytes kept of each of stdout and stderr [default: 1048576]
    #[arg(long, env = "FLOTILLA_SHELL_MAX_OUTPUT_BYTES")]
    max_output_bytes: Option<usize>,
    /// A step's timeout when it sets none, e.g. 30s or 10m [default: 10m]
    #[arg(long, env = "FLOTILLA_SHELL_TIMEOUT", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Variables of this process's environment that commands inherit
    /// [default: PATH,HOME,USER,LANG,LC_ALL,TMPDIR,CARGO_HOME,RUSTUP_HOME]
    #[arg(long, env = "FLOTILLA_SHELL_PASS_ENV", value_delimiter = ',')]
    pass_env: Option<Vec<String>>,
    /// Print the effective shell config and exit.
    #[arg(long)]
    dump_config: bool,
    /// Seconds a shutdown waits for commands in progress before killing them.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
    #[command(flatten)]
    worker: WorkerArgs,
}

impl Args {
    /// Defaults, then the file, then environment and flags.
    fn shell_config(&self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => File::read(path)?,
            None => File::default(),
        };
        file.overlay(File {
            allow: self.allow.clone(),
            allow_shell: self.allow_shell,
            root: self.root.clone(),
            max_output_bytes: self.max_output_bytes,
            timeout: self.timeout.map(UserDuration),
            pass_env: self.pass_env.clone(),
        })
        .resolve()
    }
}

/// Runs one step's command, streaming its output to the step's log; it is stopped at its
/// timeout, or when its run is cancelled.
async fn handle(config: Arc<Config>, ctx: TaskContext) -> Result<Value, HandlerError> {
    let request = Request::from_params(ctx.params(), &config)?;
    let timeout = request.timeout;
    let stop = async {
        tokio::select! {
            () = tokio::time::sleep(timeout) => format!("timed out after {timeout:?}"),
            () = ctx.cancelled() => "was cancelled".to_string(),
        }
    };
    run::run(&request, &config, ctx.log(), stop).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let tracing = match start_telemetry("flotilla-shell") {
        Ok(tracing) => tracing,
        Err(code) => return code,
    };

    let config = match args.shell_config() {
        Ok(config) => Arc::new(config),
        Err(error) => {
            error!(error = %format!("{error:#}"), "invalid shell agent config");
            return ExitCode::from(2);
        }
    };
    if args.dump_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }

    let worker_config = WorkerConfig {
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        ..args.worker.config()
    };
    args.worker
        .serve(worker_config, tracing, move |ctx| {
            handle(config.clone(), ctx)
        })
        .await
}
