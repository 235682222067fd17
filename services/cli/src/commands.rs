//! What each command does.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use flotilla_api_model::{
    AGENT_HEALTHY, BreakerList, DeadLetterQuery, ExecuteRequest, ExecuteResponse, HealthAuditQuery,
    LogQuery, Operation, RedriveOutcome, RedriveRequest, RegisterDefinitionRequest, RunPriority,
    RunQuery, ScheduleRequest, StepLogLine, WorkflowResult,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::time::MissedTickBehavior;
use uuid::Uuid;

use crate::cli::{
    AgentsCommand, Cli, Command, DefinitionsCommand, DlqCommand, Output, SchedulesCommand, Wait,
    WorkflowsCommand,
};
use crate::client::{Client, ClientError};
use crate::out::{out, outln};
use crate::render;
use crate::{access, actor, metrics, params};

/// How often `--wait` asks for the run's state.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often the spinner moves between polls, so that a long step still looks alive.
const SPINNER_TICK: Duration = Duration::from_millis(120);

/// How long `logs --follow` waits for each next line, within one request.
const FOLLOW_WAIT_SECS: u32 = 20;
/// How long `logs --follow` keeps looking once the run has ended, for lines its last steps
/// sent just before their results.
const FOLLOW_GRACE: Duration = Duration::from_secs(1);

/// How a command that worked ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// A run that the command waited for ended in failure, or was cancelled.
    WorkflowFailed,
    /// Some of the dead letters the command was to redrive were not retried.
    NotAllRedriven,
    /// The coordinator understood an operator's action but the run's state did not allow it.
    Refused,
    /// No healthy worker serves the agent asked about.
    Unhealthy,
    /// The fleet audit's worst check warns.
    AuditWarned,
    /// A check of the fleet audit fails.
    AuditFailed,
}

pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let credential = std::env::var(flotilla_api_model::API_TOKEN_ENV).ok();
    let client = Client::new(cli.url, credential.as_deref(), cli.namespace.as_deref())?;
    let output = cli.output;
    let jaeger = cli.jaeger_url.as_ref();
    match cli.command {
        Command::Workflows(WorkflowsCommand::Execute {
            file: Some(file),
            dry_run: true,
            only,
            skip,
            ..
        }) => {
            let definition = flotilla_core::Definition::from_yaml(&read(&file)?)?;
            let plan = flotilla_core::Plan::compile(&definition)?;
            let subset = flotilla_core::Subset { only, skip };
            subset.check(&plan)?;
            let scheduled = definition.schedule.is_some();
            let view = render::PlanView::new(&plan, scheduled, &subset);
            match output {
                Output::Text => out!("{}", render::plan(&view)),
                Output::Json => print_json(&view)?,
            }
            Ok(Outcome::Done)
        }
        Command::Workflows(WorkflowsCommand::Execute {
            file,
            name,
            version,
            params,
            idempotency_key,
            only,
            skip,
            priority,
            wait,
            ..
        }) => {
            let request = ExecuteRequest {
                yaml: file.as_deref().map(read).transpose()?,
                workflow: name,
                version,
                params: params::collect(params).map_err(|e| anyhow!(e))?,
                only,
                skip,
                priority: priority.map(|p| match p.as_str() {
                    "high" => RunPriority::High,
                    _ => RunPriority::Normal,
                }),
                ..ExecuteRequest::default()
            };
            // A random key is this command's own, so a replay under it can only be of one of the
            // command's attempts whose answer was lost: nothing the user needs to hear about.
            let chosen = idempotency_key.is_some();
            let key = idempotency_key.unwrap_or_else(|| Uuid::new_v4().to_string());
            let submitted = client.execute(&request, &key).await?;
            if submitted.replayed && chosen {
                eprintln!(
                    "run {} was started by an earlier request with idempotency key `{key}`; it \
                     was not started again",
                    submitted.workflow_id
                );
            }
            let response = ExecuteResponse {
                workflow_id: submitted.workflow_id,
            };
            if !wait.wait {
                match output {
                    Output::Text => outln!("{}", response.workflow_id),
                    Output::Json => print_json(&response)?,
                }
                return Ok(Outcome::Done);
            }
            if output == Output::Text {
                // Print the id at once, so that it is known even if the wait is cut short.
                outln!("{}", response.workflow_id);
            }
            let result = follow(&client, response.workflow_id, wait).await?;
            show_run(&result, output, jaeger)?;
            Ok(outcome(&result))
        }
        Command::Workflows(WorkflowsCommand::Status { id, wait }) => {
            if wait.wait {
                let result = follow(&client, id, wait).await?;
                show_run(&result, output, jaeger)?;
                Ok(outcome(&result))
            } else {
                show_run(&client.run(id).await?, output, jaeger)?;
                Ok(Outcome::Done)
            }
        }
        Command::Workflows(WorkflowsCommand::List {
            status,
            limit,
            cursor,
        }) => {
            let page = client
                .runs(&RunQuery {
                    status,
                    limit,
                    cursor,
                    ..RunQuery::default()
                })
                .await?;
            match output {
                Output::Text => {
                    out!("{}", render::runs(&page));
                    if let Some(next) = &page.next_cursor {
                        // On stderr, so that stdout stays a clean table for other tools.
                        eprintln!("more runs: flotilla workflows list --cursor {next}");
                    }
                }
                Output::Json => print_json(&page)?,
            }
            Ok(Outcome::Done)
        }
        Command::Workflows(WorkflowsCommand::Cancel { id }) => {
            operate(&client, id, Operation::Cancel, output).await
        }
        Command::Workflows(WorkflowsCommand::Pause { id }) => {
            operate(&client, id, Operation::Pause, output).await
        }
        Command::Workflows(WorkflowsCommand::Resume { id }) => {
            operate(&client, id, Operation::Resume, output).await
        }
        Command::Workflows(WorkflowsCommand::Rollback { id }) => {
            operate(&client, id, Operation::Rollback, output).await
        }
        Command::Workflows(WorkflowsCommand::Retry { id, step }) => {
            operate(&client, id, Operation::Retry { step }, output).await
        }
        Command::Workflows(WorkflowsCommand::Skip { id, step }) => {
            operate(&client, id, Operation::Skip { step }, output).await
        }
        Command::Workflows(WorkflowsCommand::Complete {
            id,
            step,
            step_output,
        }) => {
            let operation = Operation::Complete {
                step,
                output: step_output,
            };
            operate(&client, id, operation, output).await
        }
        Command::Workflows(WorkflowsCommand::History { id }) => {
            let list = client.events(id).await?;
            match output {
                Output::Text => out!("{}", render::events(&list)),
                Output::Json => print_json(&list)?,
            }
            Ok(Outcome::Done)
        }
        Command::Workflows(WorkflowsCommand::Report { id }) => {
            let report = client.report(id).await?;
            match output {
                Output::Text => out!("{}", render::report(&report)),
                Output::Json => print_json(&report)?,
            }
            Ok(Outcome::Done)
        }
        Command::Workflows(WorkflowsCommand::Logs {
            id,
            step,
            attempt,
            follow,
        }) => {
            logs(&client, id, step, attempt, follow, output).await?;
            Ok(Outcome::Done)
        }
        Command::Definitions(DefinitionsCommand::Register { file }) => {
            let request = RegisterDefinitionRequest {
                yaml: Some(read(&file)?),
                definition: None,
            };
            let summary = client.register_definition(&request).await?;
            match output {
                Output::Text => out!("{}", render::registered(&summary)),
                Output::Json => print_json(&summary)?,
            }
            Ok(Outcome::Done)
        }
        Command::Definitions(DefinitionsCommand::Show { name, version }) => {
            let detail = client.definition(&name, version.as_deref()).await?;
            let versions = client.definition_versions(&name).await?;
            match output {
                Output::Text => out!("{}", render::definition(&detail, &versions)),
                Output::Json => print_json(&serde_json::json!({
                    "definition": detail,
                    "versions": versions.versions,
                }))?,
            }
            Ok(Outcome::Done)
        }
        Command::Definitions(DefinitionsCommand::List) => {
            let list = client.definitions().await?;
            match output {
                Output::Text => out!("{}", render::definitions(&list)),
                Output::Json => print_json(&list)?,
            }
            Ok(Outcome::Done)
        }
        Command::Dlq(DlqCommand::List { all, limit }) => {
            let list = client
                .dead_letters(&DeadLetterQuery {
                    pending: Some(!all),
                    limit,
                })
                .await?;
            match output {
                Output::Text => out!("{}", render::dead_letters(&list, all)),
                Output::Json => print_json(&list)?,
            }
            Ok(Outcome::Done)
        }
        Command::Schedules(SchedulesCommand::List) => {
            let list = client.schedules().await?;
            match output {
                Output::Text => out!("{}", render::schedules(&list)),
                Output::Json => print_json(&list)?,
            }
            Ok(Outcome::Done)
        }
        Command::Schedules(SchedulesCommand::Add {
            name,
            cron,
            timezone,
            missed,
            overlap,
            params,
        }) => {
            let request = ScheduleRequest {
                definition: name,
                cron,
                timezone,
                missed,
                overlap,
                params: params::collect(params).map_err(|e| anyhow!(e))?,
            };
            let schedule = client.add_schedule(&request).await?;
            match output {
                Output::Text => outln!(
                    "scheduled {} ({} {}); next run at {}",
                    schedule.id,
                    schedule.cron,
                    schedule.timezone,
                    render::time(schedule.next_at)
                ),
                Output::Json => print_json(&schedule)?,
            }
            Ok(Outcome::Done)
        }
        Command::Schedules(SchedulesCommand::Remove { name }) => {
            client.remove_schedule(&name).await?;
            match output {
                Output::Text => outln!("removed the schedule of {name}"),
                Output::Json => print_json(&serde_json::json!({ "removed": name }))?,
            }
            Ok(Outcome::Done)
        }
        Command::Agents(AgentsCommand::List) => {
            let list = client.agents().await?;
            match output {
                Output::Text => out!("{}", render::agents(&list)),
                Output::Json => print_json(&list)?,
            }
            Ok(Outcome::Done)
        }
        Command::Agents(AgentsCommand::Health { name }) => {
            let health = client.agent_health(&name).await?;
            match output {
                Output::Text => outln!("{}", render::agent_health(&health)),
                Output::Json => print_json(&health)?,
            }
            if health.health == AGENT_HEALTHY {
                Ok(Outcome::Done)
            } else {
                Ok(Outcome::Unhealthy)
            }
        }
        Command::Metrics {
            agent,
            range: Some(range),
        } => {
            let summary = client.metrics_summary(&range).await?;
            match output {
                Output::Text => out!("{}", metrics::render_range(&summary, agent.as_deref())),
                Output::Json => print_json(&summary)?,
            }
            Ok(Outcome::Done)
        }
        Command::Doctor {
            window,
            max_error_rate,
            max_p95_ms,
            max_pool_use,
            max_failover_secs,
        } => {
            let audit = client
                .health_audit(&HealthAuditQuery {
                    window: Some(window),
                    max_error_rate: Some(max_error_rate),
                    max_p95_ms: Some(max_p95_ms),
                    max_pool_use: Some(max_pool_use),
                    max_failover_secs: Some(max_failover_secs),
                })
                .await?;
            match output {
                Output::Text => out!("{}", render::audit(&audit)),
                Output::Json => print_json(&audit)?,
            }
            Ok(match audit.exit_code() {
                0 => Outcome::Done,
                1 => Outcome::AuditWarned,
                _ => Outcome::AuditFailed,
            })
        }
        Command::Metrics { agent, range: None } => {
            let summary = metrics::summarize(&client.metrics().await?, agent.as_deref());
            match output {
                Output::Text => out!("{}", metrics::render(&summary)),
                Output::Json => print_json(&summary)?,
            }
            Ok(Outcome::Done)
        }
        Command::Agents(AgentsCommand::Breakers) => {
            let list = client.breakers().await?;
            match output {
                Output::Text => out!("{}", render::breakers(&list)),
                Output::Json => print_json(&list)?,
            }
            Ok(Outcome::Done)
        }
        Command::Agents(AgentsCommand::BreakerReset { name }) => {
            let breaker = client.reset_breaker(&name, &actor::local()).await?;
            match output {
                Output::Text => out!(
                    "{}",
                    render::breakers(&BreakerList {
                        breakers: vec![breaker]
                    })
                ),
                Output::Json => print_json(&breaker)?,
            }
            Ok(Outcome::Done)
        }
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            // Into a buffer: clap_complete panics on a write error, a closed pipe included.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "flotilla", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(Outcome::Done)
        }
        Command::Tokens(command) => access::tokens(&client, command, output).await,
        Command::Audit(args) => access::audit(&client, args, output).await,
        Command::Dlq(DlqCommand::Redrive { ids, all }) => {
            let response = client.redrive(&RedriveRequest { ids, all }).await?;
            match output {
                Output::Text => out!("{}", render::redriven(&response)),
                Output::Json => print_json(&response)?,
            }
            if response.redriven.iter().all(RedriveOutcome::retried) {
                Ok(Outcome::Done)
            } else {
                Ok(Outcome::NotAllRedriven)
            }
        }
    }
}

/// Carries out an operator's action and prints what became of the run; a refusal is printed as
/// an error, but is an answer rather than a failure to ask, hence its own exit code.
async fn operate(
    client: &Client,
    id: Uuid,
    operation: Operation,
    output: Output,
) -> anyhow::Result<Outcome> {
    match client.operate(id, &operation, &actor::local()).await {
        Ok(response) => {
            match output {
                Output::Text => out!("{}", render::operated(&response, operation.step())),
                Output::Json => print_json(&response)?,
            }
            Ok(Outcome::Done)
        }
        Err(ClientError::Refused(reason)) => {
            eprintln!("error: {reason}");
            Ok(Outcome::Refused)
        }
        Err(err) => Err(err.into()),
    }
}

/// Prints the lines of run `id`'s logs (of `step` and `attempt` when given): those stored now,
/// or with `follow` also those to come until the run ends. Then names the attempts whose logs
/// were cut at the coordinator's cap.
async fn logs(
    client: &Client,
    id: Uuid,
    step: Option<String>,
    attempt: Option<u32>,
    follow: bool,
    output: Output,
) -> anyhow::Result<()> {
    let mut query = LogQuery {
        step,
        attempt,
        wait: follow.then_some(FOLLOW_WAIT_SECS),
        ..LogQuery::default()
    };
    let prefixed = query.step.is_none();
    let mut shown_attempt = None;
    let mut ended_at: Option<tokio::time::Instant> = None;
    loop {
        let page = client.logs(id, &query).await?;
        for line in &page.lines {
            if !prefixed && query.attempt.is_none() && shown_attempt != Some(line.attempt) {
                if shown_attempt.is_some() {
                    eprintln!("--- attempt {} ---", line.attempt);
                }
                shown_attempt = Some(line.attempt);
            }
            print_log_line(line, prefixed, output)?;
        }
        query.after = Some(page.next_after);
        if !page.lines.is_empty() {
            continue;
        }
        let done = match (follow, page.ended) {
            (false, _) => true,
            (true, false) => false,
            (true, true) => {
                let since = *ended_at.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() < FOLLOW_GRACE {
                    tokio::time::sleep(POLL_INTERVAL).await;
                    false
                } else {
                    true
                }
            }
        };
        if done {
            for cut in &page.truncated {
                eprintln!(
                    "flotilla: the log of step `{}` (attempt {}) was cut at {} bytes \
                     (FLOTILLA_MAX_STEP_LOG_BYTES); its later lines were dropped",
                    cut.step_id, cut.attempt, cut.bytes
                );
            }
            return Ok(());
        }
    }
}

fn print_log_line(line: &StepLogLine, prefixed: bool, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        outln!("{}", serde_json::to_string(line)?);
        return Ok(());
    }
    let text = render::log_line(line, prefixed);
    if line.stream == "stderr" {
        eprintln!("{text}");
    } else {
        outln!("{text}");
    }
    Ok(())
}

/// The file's text, sent as is: the coordinator reads YAML, and JSON is YAML too.
fn read(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("could not read {}", file.display()))
}

pub(crate) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn show_run(
    result: &WorkflowResult,
    output: Output,
    jaeger: Option<&reqwest::Url>,
) -> anyhow::Result<()> {
    match output {
        Output::Text => {
            out!("{}", render::summary(result));
            if let Some(link) = jaeger.and_then(|base| render::trace_link(base, &result.trace_id)) {
                outln!("\nTrace     {link}");
            }
        }
        Output::Json => print_json(result)?,
    }
    Ok(())
}

fn outcome(result: &WorkflowResult) -> Outcome {
    if result.status == "success" {
        Outcome::Done
    } else {
        Outcome::WorkflowFailed
    }
}

/// Polls the run until it ends, showing its progress on stderr (hidden when stderr is not a
/// terminal).
async fn follow(client: &Client, id: Uuid, wait: Wait) -> anyhow::Result<WorkflowResult> {
    let bar = ProgressBar::new(0).with_style(progress_style());
    bar.enable_steady_tick(SPINNER_TICK);
    let polling = poll_until_finished(client, id, &bar);
    let result = match wait.timeout {
        Some(seconds) => tokio::time::timeout(Duration::from_secs(seconds), polling)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow!(
                    "run {id} had not ended after {seconds}s; it goes on (follow it with \
                     `flotilla workflows status {id} --wait`)"
                ))
            }),
        None => polling.await,
    };
    match &result {
        Ok(_) => bar.finish_and_clear(),
        Err(_) => bar.abandon(),
    }
    result
}

async fn poll_until_finished(
    client: &Client,
    id: Uuid,
    bar: &ProgressBar,
) -> anyhow::Result<WorkflowResult> {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    // After a slow answer, wait a full interval rather than polling twice in a row.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = client.run(id).await.with_context(|| {
            format!(
                "lost track of run {id}; it may still be going (follow it with \
                 `flotilla workflows status {id} --wait`)"
            )
        })?;
        let progress = render::progress(&result);
        bar.set_length(progress.total);
        bar.set_position(progress.finished);
        bar.set_message(progress.message);
        if render::is_finished(&result.status) {
            return Ok(result);
        }
    }
}

fn progress_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps finished · {msg}",
    )
    .expect("the progress template is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_template_is_valid() {
        progress_style();
    }
}
