//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use reqwest::Url;
use uuid::Uuid;

use crate::params::{Param, parse_param};

/// Run and inspect Flotilla workflows through the coordinator's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version)]
pub struct Cli {
    /// The coordinator's base URL.
    #[arg(
        long,
        env = "FLOTILLA_URL",
        default_value = "http://127.0.0.1:3020",
        global = true
    )]
    pub url: Url,

    /// How to print results.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people: summaries and tables.
    Text,
    /// The API's JSON, for programs.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start, follow and list workflow runs.
    #[command(subcommand)]
    Workflows(WorkflowsCommand),
    /// Register and list named workflow definitions.
    #[command(subcommand)]
    Definitions(DefinitionsCommand),
}

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// Run the workflow defined in FILE (YAML or JSON) and print the run's id.
    Execute {
        /// The workflow definition.
        file: PathBuf,
        /// A run param, overriding the definition's default. VALUE is read as JSON when it is
        /// valid JSON (`n=3`, `flag=true`, `obj={"a":1}`) and as a string otherwise.
        #[arg(long = "param", short, value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<Param>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Show a run and its steps.
    Status {
        /// The run's id.
        id: Uuid,
        #[command(flatten)]
        wait: Wait,
    },
    /// List runs, newest first.
    List {
        /// Only runs with this status: running, failing, success or failure.
        #[arg(long)]
        status: Option<String>,
        /// At most this many runs (1 to 500; the coordinator's default is 50).
        #[arg(long)]
        limit: Option<u32>,
        /// Continue a listing where an earlier page ended.
        #[arg(long)]
        cursor: Option<String>,
    },
}

/// Following a run to its end.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Wait {
    /// Follow the run until it ends, then exit 0 if it succeeded and 1 if it failed.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds (exit 2; the run goes on).
    #[arg(long, value_name = "SECONDS", requires = "wait")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum DefinitionsCommand {
    /// Register the definition in FILE (YAML or JSON) as the newest revision of its name.
    Register {
        /// The workflow definition.
        file: PathBuf,
    },
    /// List registered definitions.
    List,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeout_needs_wait() {
        let err = Cli::try_parse_from([
            "flotilla",
            "workflows",
            "execute",
            "f.yml",
            "--timeout",
            "5",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn malformed_params_are_usage_errors() {
        let err =
            Cli::try_parse_from(["flotilla", "workflows", "execute", "f.yml", "-p", "novalue"])
                .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
    }
}
