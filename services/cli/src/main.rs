//! `flotilla`: the command-line client of the Flotilla coordinator's HTTP API.
//!
//! Exit codes: 0 when the command did what was asked; 1 when a run it waited for failed or was
//! cancelled, a dead letter it was to redrive was not retried, the run's state did not allow
//! an operator's action (the request was understood, but not carried out), or the worst check
//! of `doctor` warns; 2 for everything else (usage, an unreachable coordinator, a request the
//! coordinator refused as malformed or naming nothing it knows, a `doctor` check that fails).
//! A closed standard output (`| head`) ends a command with 0.

// Standard output goes through `out`, which survives a reader that went away.
#![deny(clippy::print_stdout)]

mod access;
mod actor;
mod cli;
mod client;
mod commands;
mod metrics;
mod out;
mod params;
mod render;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::commands::Outcome;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli).await {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(
            Outcome::WorkflowFailed
            | Outcome::NotAllRedriven
            | Outcome::Refused
            | Outcome::Unhealthy
            | Outcome::AuditWarned,
        ) => ExitCode::from(1),
        Ok(Outcome::AuditFailed) => ExitCode::from(2),
        Err(err) => {
            eprintln!("error: {err}");
            // The outermost error says what failed; the innermost one usually says why (e.g.
            // "Connection refused"). The layers between are rarely worth a reader's time.
            if let Some(cause) = err.chain().skip(1).last() {
                eprintln!("  cause: {cause}");
            }
            ExitCode::from(2)
        }
    }
}
