//! The command line.

use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use flotilla_api_model::{MAX_IDEMPOTENCY_KEY_CHARS, TokenError, check_idempotency_key};
use reqwest::Url;
use serde_json::Value;
use uuid::Uuid;

pub use crate::access::{AuditArgs, TokensCommand};
use crate::params::{Param, parse_param};

/// What `--help` says of the exit codes (README's CLI section says the same).
const EXIT_CODES: &str = "\
Exit codes:
  0  the command did what was asked, or its reader stopped reading (`| head`)
  1  the request was understood but the outcome is not the one asked for: a run waited for
     (--wait) failed or was cancelled, an operator's action was refused by the run's state, a
     dead letter to redrive was not retried, or `agents health` found no healthy worker
  2  usage errors, an unreachable coordinator, a request the coordinator refused (its message is
     printed), or a --wait that timed out";

/// Run and inspect Flotilla workflows through the coordinator's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, after_help = EXIT_CODES)]
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

    /// The namespace to act in: where runs, definitions and schedules are created and looked
    /// up, and the one lists are narrowed to (sent as the `Flotilla-Namespace` header). Needed
    /// when the credential may see several; left out, the credential's own.
    #[arg(long, env = flotilla_api_model::NAMESPACE_ENV, global = true, value_parser = namespace)]
    pub namespace: Option<String>,

    /// A Jaeger UI (e.g. http://localhost:16686): `workflows status` and `execute --wait` print
    /// the link to the run's trace there.
    #[arg(long, env = "FLOTILLA_JAEGER_URL", global = true)]
    pub jaeger_url: Option<Url>,

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
    /// Start, follow, list and steer workflow runs.
    ///
    /// The operator commands (cancel, pause, resume, retry, rollback, skip, complete) print the
    /// run's status once the action is done and exit 0; when the run's state does not allow the
    /// action they print why and exit 1. Each is recorded in the run's history (see `history`) as done by
    /// the credential's name "as $USER@<hostname>" (HOSTNAME, or else /etc/hostname, names the
    /// host).
    #[command(subcommand)]
    Workflows(WorkflowsCommand),
    /// Register and list named workflow definitions.
    #[command(subcommand)]
    Definitions(DefinitionsCommand),
    /// List and redrive dead letters: tasks RabbitMQ gave up delivering, whose steps failed.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show the registry of workers (which agents are served, by which workers, and what waits
    /// for them), and show and reset the agents' circuit breakers.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// List, add and remove the schedules of registered definitions (one per definition; its
    /// id is the definition's name).
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Create, list and revoke API tokens (needs scope `admin`). The CLI sends the token in
    /// FLOTILLA_API_TOKEN with every request.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Show the audit log, newest first: every state-changing request, who made it, from where,
    /// and its answer (needs scope `admin`).
    Audit(AuditArgs),
    /// Print the completion script of SHELL on stdout, e.g.
    /// `flotilla completion bash > ~/.local/share/bash-completion/completions/flotilla`,
    /// `flotilla completion zsh > "${fpath[1]}/_flotilla"`,
    /// `flotilla completion fish > ~/.config/fish/completions/flotilla.fish`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Show the coordinator's main figures: runs by status, and per agent the attempts, errors,
    /// retries, dead letters, queued tasks and run times (p50, p95).
    ///
    /// Read from the coordinator's /metrics: counts are those of the coordinator FLOTILLA_URL
    /// names since it started; queue depths and the outbox backlog are as of now. With
    /// --range, the attempts of all coordinators that ended over that range, read from Postgres
    /// (/api/metrics/summary): executions, success rate and run time percentiles per agent.
    Metrics {
        /// Only this agent's figures.
        #[arg(long)]
        agent: Option<String>,
        /// Over this range instead, e.g. 30m, 1h, 7d (at most 90d).
        #[arg(long, value_parser = parse_range)]
        range: Option<String>,
    },
    /// Audit the fleet: Postgres (reachable, migrations, pool use, outbox), RabbitMQ (reachable,
    /// each agent's queue with its consumers and depth, dead letters), coordinators, workers
    /// (alive, stale heartbeats, failover), each agent's error rate and p95 latency over the
    /// window, and schedules (missed ticks).
    ///
    /// Each check says pass, warn or fail, why, and the number. Exit code 0 when every check
    /// passes, 1 when the worst warns, 2 when one fails (or the coordinator cannot be asked),
    /// so that it can gate a deploy. The targets default to the reference spec's.
    Doctor {
        /// Weigh the attempts that ended over this window, e.g. 15m, 1h (at most 90d).
        #[arg(long, value_parser = parse_range, default_value = "1h")]
        window: String,
        /// The highest share of an agent's attempts that may fail.
        #[arg(long, default_value_t = 0.001)]
        max_error_rate: f64,
        /// The highest p95 of an agent's attempts' run time, in milliseconds.
        #[arg(long, default_value_t = 500.0)]
        max_p95_ms: f64,
        /// The highest share of the coordinator's Postgres pool in use.
        #[arg(long, default_value_t = 0.8)]
        max_pool_use: f64,
        /// The longest a lost worker's steps may wait to run again, in seconds.
        #[arg(long, default_value_t = 30.0)]
        max_failover_secs: f64,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// Run the workflow defined in FILE (YAML or JSON) and print the run's id; safe to retry.
    ///
    /// The request carries an idempotency key (a new random one, unless --idempotency-key gives
    /// it), and a request that fails in the network (refused, reset, timed out) is sent again
    /// with the same key, so a request whose answer was lost never starts a second run. Running
    /// the command again with the same --idempotency-key is just as safe: it prints the run the
    /// first one started.
    Execute {
        /// The workflow definition.
        #[arg(required_unless_present = "name", conflicts_with = "name")]
        file: Option<PathBuf>,
        /// Run the registered definition NAME instead of a file: its latest revision, or the
        /// one --version names.
        #[arg(long)]
        name: Option<String>,
        /// With --name: the definition's `version:` (its latest revision with it) or a
        /// revision number.
        #[arg(long, requires = "name")]
        version: Option<String>,
        /// A run param, overriding the definition's default. VALUE is read as JSON when it is
        /// valid JSON (`n=3`, `flag=true`, `obj={"a":1}`) and as a string otherwise.
        #[arg(long = "param", short, value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<Param>,
        /// The idempotency key to send instead of a random one: 1 to 200 visible ASCII
        /// characters. Every command with the same key answers the run the first one started
        /// (for as long as the coordinator keeps keys), so a script may repeat the command.
        #[arg(long, value_name = "KEY", value_parser = parse_idempotency_key)]
        idempotency_key: Option<String>,
        /// Run only STEP (repeatable); the other steps end skipped, saying so. A selected step
        /// whose dependencies are left out starts without waiting for them.
        #[arg(long = "only", value_name = "STEP")]
        only: Vec<String>,
        /// Leave STEP out (repeatable): it ends skipped, saying so, and its dependents run. With
        /// --only, leaves steps out of those selected.
        #[arg(long = "skip", value_name = "STEP")]
        skip: Vec<String>,
        /// `high`: the run's tasks are taken by workers before normal ones waiting [default: the
        /// definition's priority]
        #[arg(long, value_parser = ["normal", "high"])]
        priority: Option<String>,
        /// Validate the definition and print its plan — the stages of steps that can run
        /// together, their dependencies and the conditions decided at run time — without
        /// running anything or contacting the coordinator.
        #[arg(long, conflicts_with_all = ["wait", "idempotency_key"], requires = "file")]
        dry_run: bool,
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
        /// Only runs with this status: running, paused, failing, needs_attention, rolling_back,
        /// success, failure, cancelled, rolled_back or rollback_failed.
        #[arg(long)]
        status: Option<String>,
        /// At most this many runs (1 to 500; the coordinator's default is 50).
        #[arg(long)]
        limit: Option<u32>,
        /// Continue a listing where an earlier page ended.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancel a run: every step that has not ended ends `cancelled`, and so does the run.
    Cancel {
        /// The run's id.
        id: Uuid,
    },
    /// Pause a run: results of running steps are still recorded, but nothing new starts.
    Pause {
        /// The run's id.
        id: Uuid,
    },
    /// Resume a paused run: the steps that became ready meanwhile start.
    Resume {
        /// The run's id.
        id: Uuid,
    },
    /// Give the failed steps of a failed run a new attempt, and run it again.
    Retry {
        /// The run's id.
        id: Uuid,
        /// Retry only this failed step.
        #[arg(long)]
        step: Option<String>,
    },
    /// Roll back an ended run (success, failure, cancelled, or rollback_failed to go on): the
    /// `compensate:` of each step that succeeded and is not undone yet runs, the latest first.
    Rollback {
        /// The run's id.
        id: Uuid,
    },
    /// End a step as skipped: one that has not ended, or the failed step of a failed run. Its
    /// dependents go on.
    Skip {
        /// The run's id.
        id: Uuid,
        /// The step to skip.
        #[arg(long)]
        step: String,
    },
    /// End a step as succeeded, with the output given, as if its agent had returned it: one that
    /// has not ended, or the failed step of a failed run. Its dependents go on.
    Complete {
        /// The run's id.
        id: Uuid,
        /// The step to complete.
        #[arg(long)]
        step: String,
        /// The step's output, as JSON (`'{"url": "https://…"}'`, `42`, `'"text"'`). Not
        /// `--output`, which says how the CLI prints.
        #[arg(long, value_name = "JSON", value_parser = parse_json)]
        step_output: Value,
    },
    /// Show a run's history: what operators did to it, who and when.
    History {
        /// The run's id.
        id: Uuid,
    },
    /// Report what a run did: per step its queue wait, run time and attempts (with their
    /// errors), the critical path, and how parallel the run was.
    Report {
        /// The run's id.
        id: Uuid,
    },
    /// Print what a run's steps wrote to their logs, in order: stdout lines on stdout, stderr
    /// lines on stderr, each after its step's id unless `--step` is given. With `--output
    /// json`, one JSON object per line.
    Logs {
        /// The run's id.
        id: Uuid,
        /// Only this step's lines (an instance of a `for_each` step is `id[index]`).
        #[arg(long)]
        step: Option<String>,
        /// Only this attempt's lines.
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing lines as they are written, until the run ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// Following a run to its end.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Wait {
    /// Follow the run until it ends, then exit 0 if it succeeded and 1 if it failed or was
    /// cancelled.
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
    /// Show a registered definition: its revisions, and the content of the latest one (or of
    /// the one --version names).
    Show {
        name: String,
        /// The definition's `version:` or a revision number.
        #[arg(long)]
        version: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// List the schedules and their next ticks.
    List,
    /// Run the registered definition NAME on a cron schedule (replacing its schedule, if any).
    Add {
        /// The registered definition.
        name: String,
        /// Five fields (minute hour day month weekday), or six with seconds first.
        #[arg(long)]
        cron: String,
        /// An IANA time zone such as Europe/Paris [default: UTC].
        #[arg(long)]
        timezone: Option<String>,
        /// Ticks missed while no coordinator ran: skip or catch_up_once [default: skip].
        #[arg(long)]
        missed: Option<String>,
        /// A tick while the previous run still runs: skip or allow [default: skip].
        #[arg(long)]
        overlap: Option<String>,
        /// A param of every run it starts, as for `workflows execute`. Repeatable.
        #[arg(long = "param", short, value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<Param>,
    },
    /// Remove the schedule of definition NAME.
    Remove {
        /// The schedule's id: its definition's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Each agent's circuit breaker: its state, the share of recent attempts that failed, when
    /// it lets a probe through and the steps it holds.
    Breakers,
    /// Close an agent's circuit breaker: its steps held are dispatched and its window starts
    /// afresh. Recorded as done by $USER@<hostname>.
    BreakerReset {
        /// The agent, as steps name it.
        name: String,
    },
    /// List every agent with a registered worker or a step waiting for one, then the workers:
    /// their health (unhealthy once their heartbeats stopped), tasks in flight and last
    /// heartbeat.
    List,
    /// Whether a healthy worker serves the agent: exit 0 if one does, 1 if none does.
    Health {
        /// The agent's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters waiting to be redriven, newest first.
    List {
        /// Include those redriven already.
        #[arg(long)]
        all: bool,
        /// At most this many (1 to 500; the coordinator's default is 50).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Give the steps of dead letters a new attempt; exit 0 if every one was retried, 1 if some
    /// were not.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Redrive {
        /// The dead letters, by the ids `flotilla dlq list` shows.
        #[arg(value_name = "ID")]
        ids: Vec<Uuid>,
        /// Every dead letter not redriven yet.
        #[arg(long)]
        all: bool,
    },
}

/// Checks `--idempotency-key` before anything is sent, by the coordinator's rule.
fn parse_idempotency_key(arg: &str) -> Result<String, TokenError> {
    check_idempotency_key(arg)?;
    Ok(arg.to_string())
}

/// Reads `--step-output`. Unlike `--param`, a value that is not JSON is an error rather than a
/// string: a step's output is usually an object, and a mistyped one must not become text.
fn parse_json(arg: &str) -> Result<Value, String> {
    serde_json::from_str(arg).map_err(|e| format!("not JSON ({e})"))
}

// The help of `--idempotency-key` states the limit in words (doc comments cannot name a
// constant); this stops the build when the two drift apart.
const _: () = assert!(MAX_IDEMPOTENCY_KEY_CHARS == 200);

/// A `--range`, checked here so that a typo is a usage error rather than an API error.
fn parse_range(range: &str) -> Result<String, String> {
    flotilla_api_model::parse_range(range).map(|_| range.trim().to_owned())
}

/// A namespace's name, checked as the coordinator checks it.
fn namespace(text: &str) -> Result<String, String> {
    flotilla_api_model::check_namespace(text)?;
    Ok(text.to_string())
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
    fn the_help_lists_the_exit_codes() {
        let help = Cli::command().render_help().to_string();
        for code in ["  0  ", "  1  ", "  2  "] {
            assert!(help.contains(code), "{help}");
        }
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

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
    }

    #[test]
    fn execute_says_it_is_safe_to_retry() {
        let mut cli = Cli::command();
        let execute = cli
            .find_subcommand_mut("workflows")
            .and_then(|c| c.find_subcommand_mut("execute"))
            .expect("workflows execute exists");
        assert!(execute.render_help().to_string().contains("safe to retry"));
        let long = execute.render_long_help().to_string();
        assert!(long.contains("never starts a second run"), "{long}");
        assert!(long.contains("--idempotency-key <KEY>"), "{long}");
    }

    #[test]
    fn idempotency_keys_are_checked_before_sending() {
        let key = |key: &str| parse(&["workflows", "execute", "f.yml", "--idempotency-key", key]);
        let Command::Workflows(WorkflowsCommand::Execute {
            idempotency_key, ..
        }) = key("nightly-2025-06-15").unwrap().command
        else {
            panic!("not execute");
        };
        assert_eq!(idempotency_key.as_deref(), Some("nightly-2025-06-15"));

        for bad in ["", "two words", &"k".repeat(201)] {
            let err = key(bad).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}"
            );
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn redrive_takes_ids_or_all() {
        let id = Uuid::from_u128(1).to_string();
        assert!(parse(&["dlq", "redrive", &id, &id]).is_ok());
        assert!(parse(&["dlq", "redrive", "--all"]).is_ok());
        assert_eq!(
            parse(&["dlq", "redrive"]).unwrap_err().kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse(&["dlq", "redrive", &id, "--all"]).unwrap_err().kind(),
            clap::error::ErrorKind::ArgumentConflict
        );
        assert_eq!(
            parse(&["dlq", "redrive", "not-a-uuid"]).unwrap_err().kind(),
            clap::error::ErrorKind::ValueValidation
        );
    }

    #[test]
    fn operator_commands_take_their_arguments() {
        let id = Uuid::from_u128(1).to_string();
        let complete = parse(&[
            "workflows",
            "complete",
            &id,
            "--step",
            "deploy",
            "--step-output",
            r#"{"url": "https://x"}"#,
            "--output",
            "json",
        ])
        .unwrap();
        assert_eq!(complete.output, Output::Json);
        let Command::Workflows(WorkflowsCommand::Complete {
            step, step_output, ..
        }) = complete.command
        else {
            panic!("not complete");
        };
        assert_eq!(step, "deploy");
        assert_eq!(step_output, serde_json::json!({"url": "https://x"}));

        assert!(parse(&["workflows", "retry", &id]).is_ok());
        assert!(parse(&["workflows", "retry", &id, "--step", "deploy"]).is_ok());
        for args in [
            &["workflows", "skip", &id][..],
            &["workflows", "complete", &id, "--step", "deploy"],
            &["workflows", "complete", &id, "--step-output", "1"],
        ] {
            assert_eq!(
                parse(args).unwrap_err().kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{args:?}"
            );
        }
        assert_eq!(
            parse(&["workflows", "cancel", "not-a-uuid"])
                .unwrap_err()
                .kind(),
            clap::error::ErrorKind::ValueValidation
        );
    }

    #[test]
    fn a_step_output_that_is_not_json_is_a_usage_error_naming_the_flag() {
        let id = Uuid::from_u128(1).to_string();
        let err = parse(&[
            "workflows",
            "complete",
            &id,
            "--step",
            "deploy",
            "--step-output",
            "{url: x}",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
        let message = err.to_string();
        assert!(message.contains("--step-output <JSON>"), "{message}");
        assert!(message.contains("not JSON"), "{message}");
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
