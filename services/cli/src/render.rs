//! Text output for people. Everything renders into a `String` so that it can be tested.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use flotilla_api_model::{
    AgentHealth, AgentList, BreakerList, DeadLetterList, DefinitionDetail, DefinitionList,
    DefinitionSummary, DefinitionVersions, HEALTH_FAIL, HEALTH_PASS, HEALTH_WARN, HealthAudit,
    OperateResponse, RedriveOutcome, RedriveResponse, RunEventList, RunPage, RunReport,
    ScheduleList, WorkflowResult,
};
use serde_json::Value;

/// How many characters of a definition hash a listing shows; enough to tell revisions apart.
const SHORT_HASH_CHARS: usize = 12;

/// Whether a run has reached its final status.
pub fn is_finished(status: &str) -> bool {
    matches!(
        status,
        "success" | "failure" | "cancelled" | "rolled_back" | "rollback_failed"
    )
}

/// A run's progress, for the progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub finished: u64,
    pub total: u64,
    pub message: String,
}

pub fn progress(result: &WorkflowResult) -> Progress {
    let m = &result.metrics;
    let running = result
        .steps
        .iter()
        .filter(|s| s.status == "running")
        .count();
    let mut message = format!(
        "running {running}, failed {}, skipped {}",
        m.failed_steps, m.skipped_steps
    );
    // A paused run can sit still for hours: say why, so that the wait does not look hung.
    if result.status == "paused" {
        message.insert_str(0, "paused: ");
    }
    // So is a run waiting for a person to act on an escalated step.
    let escalated: Vec<&str> = result
        .steps
        .iter()
        .filter(|s| s.status == "needs_attention")
        .map(|s| s.step_id.as_str())
        .collect();
    if !escalated.is_empty() {
        message.insert_str(0, &format!("needs attention: {}; ", escalated.join(", ")));
    }
    Progress {
        finished: (m.successful_steps + m.failed_steps + m.skipped_steps) as u64,
        total: m.total_steps as u64,
        message,
    }
}

/// The page of a run's trace in a Jaeger UI at `base`; `None` when the coordinator named no
/// trace.
pub fn trace_link(base: &reqwest::Url, trace_id: &str) -> Option<String> {
    (!trace_id.is_empty())
        .then(|| format!("{}/trace/{trace_id}", base.as_str().trim_end_matches('/')))
}

/// A run and one line per step.
pub fn summary(result: &WorkflowResult) -> String {
    let m = &result.metrics;
    let mut out = String::new();
    let mut field = |name: &str, value: &str| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{name:<10}{value}");
    };
    field(
        "Workflow",
        &format!("{} ({})", result.workflow_id, result.name),
    );
    field("Status", &result.status);
    if let Some(error) = &result.error {
        field("Error", error);
    }
    let subset = flotilla_core::Subset {
        only: result.only.clone(),
        skip: result.skip.clone(),
    };
    if !subset.is_empty() {
        field("Subset", &subset.to_string());
    }
    if let Some(parent) = &result.parent {
        field(
            "Parent",
            &format!("{} (step {})", parent.workflow_id, parent.step_id),
        );
    }
    field("Started", &time(result.start_time));
    if let Some(end) = result.end_time {
        field("Ended", &time(end));
    }
    if let Some(ms) = result.duration {
        field("Duration", &duration(ms));
    }
    field(
        "Steps",
        &format!(
            "{} total: {} succeeded, {} failed, {} skipped",
            m.total_steps, m.successful_steps, m.failed_steps, m.skipped_steps
        ),
    );
    if result.steps.is_empty() {
        return out;
    }
    out.push('\n');
    let rows = result
        .steps
        .iter()
        .map(|step| {
            // What the step's strikes did, beyond its own retries, then its error.
            let strike = match step.strike {
                2 => Some("strike 2: fallback"),
                3 => Some("strike 3: escalated"),
                _ => None,
            };
            let first: Vec<&str> = strike.into_iter().chain(step.error.as_deref()).collect();
            let mut lines = vec![first.join("; ")];
            lines.extend(step.held.clone());
            if step.waiting_for_worker {
                lines.push(format!("waiting: no live worker serves `{}`", step.agent));
            }
            if let Some(next) = step.next_attempt_at {
                lines.push(format!("next attempt at {}", time(next)));
            }
            if let Some(workflow) = &step.workflow {
                lines.push(match step.child_workflow_id {
                    Some(child) => format!("workflow {workflow}: run {child}"),
                    None => format!("workflow {workflow}"),
                });
            }
            lines.retain(|line| !line.is_empty());
            let note = lines.join("\n");
            vec![
                step.step_id.clone(),
                step.status.clone(),
                step.attempts.to_string(),
                note,
            ]
        })
        .collect();
    out.push_str(&table(&["STEP", "STATUS", "ATTEMPTS", "ERROR"], rows));
    out
}

/// Runs as a table.
pub fn runs(page: &RunPage) -> String {
    if page.workflows.is_empty() {
        return "no workflow runs\n".to_string();
    }
    let rows = page
        .workflows
        .iter()
        .map(|run| {
            vec![
                run.workflow_id.to_string(),
                run.name.clone(),
                run.status.clone(),
                time(run.start_time),
                run.duration.map(duration).unwrap_or_default(),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATUS", "STARTED", "DURATION"], rows)
}

/// Registered definitions as a table.
pub fn definitions(list: &DefinitionList) -> String {
    if list.definitions.is_empty() {
        return "no registered definitions\n".to_string();
    }
    let rows = list
        .definitions
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.revision.to_string(),
                d.version.clone().unwrap_or_default(),
                d.steps.to_string(),
                time(d.created_at),
                d.hash.chars().take(SHORT_HASH_CHARS).collect(),
            ]
        })
        .collect();
    table(
        &["NAME", "REVISION", "VERSION", "STEPS", "CREATED", "HASH"],
        rows,
    )
}

/// A run's report: a line on the run, a table of its steps, then each failed attempt's error,
/// and what the steps with `expect:` claimed and verified.
pub fn report(r: &RunReport) -> String {
    let path = if r.critical_path.is_empty() {
        "-".to_string()
    } else {
        r.critical_path.join(" -> ")
    };
    let mut out = format!(
        "{} {} {}: {} ms, parallelism {:.2}\ncritical path: {path}\n",
        r.workflow_id, r.name, r.status, r.duration_ms, r.parallelism
    );
    let rows = r
        .steps
        .iter()
        .map(|s| {
            vec![
                s.step_id.clone(),
                s.status.clone(),
                s.attempts.len().to_string(),
                s.queue_wait_ms.to_string(),
                s.run_ms.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["STEP", "STATUS", "ATTEMPTS", "QUEUED MS", "RAN MS"],
        rows,
    ));
    for step in &r.steps {
        for attempt in &step.attempts {
            if let Some(error) = &attempt.error {
                let _ = writeln!(out, "{} attempt {}: {error}", step.step_id, attempt.attempt);
            }
        }
    }
    for step in &r.steps {
        if !step.instances.is_empty() {
            let counts: Vec<String> = step
                .instances
                .iter()
                .map(|(status, n)| format!("{n} {status}"))
                .collect();
            let _ = writeln!(out, "{} instances: {}", step.step_id, counts.join(", "));
        }
        if let Some(e) = &step.evidence {
            let _ = writeln!(
                out,
                "{} evidence: {} claimed success, {} verified (expect: {})",
                step.step_id,
                e.claimed,
                e.verified,
                e.expect.join("; ")
            );
        }
        // A step that went no further than its own attempts says all in the table.
        if step.strikes.iter().all(|s| s.strike == 1) && step.strikes.len() <= 1 {
            continue;
        }
        for s in &step.strikes {
            let _ = writeln!(out, "{} {}", step.step_id, strike(s));
        }
    }
    out
}

/// One strike of a step, on one line.
fn strike(s: &flotilla_api_model::StrikeReport) -> String {
    if s.strike == 3 {
        let mut line = format!(
            "strike 3: escalated to {}",
            s.channel.as_deref().unwrap_or("-")
        );
        if let Some(result) = &s.result {
            let _ = write!(line, ", {result}");
        }
        match &s.operator {
            Some(op) => {
                let _ = write!(
                    line,
                    "; then {} by {} at {}",
                    op.action,
                    op.actor,
                    time(op.at)
                );
            }
            None => line.push_str("; waiting for an operator"),
        }
        return line;
    }
    let attempts: Vec<String> = s.attempts.iter().map(u32::to_string).collect();
    let mut line = format!(
        "strike {}: {}.{}, attempts {}",
        s.strike,
        s.agent.as_deref().unwrap_or("-"),
        s.action.as_deref().unwrap_or("-"),
        attempts.join(", ")
    );
    if let Some(result) = &s.result {
        let _ = write!(line, ": {result}");
    }
    line
}

/// The schedules, one line each.
pub fn schedules(list: &ScheduleList) -> String {
    if list.schedules.is_empty() {
        return "no schedules\n".to_string();
    }
    let rows = list
        .schedules
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.cron.clone(),
                s.timezone.clone(),
                s.missed.clone(),
                s.overlap.clone(),
                time(s.next_at),
                s.last_run_id.map(|id| id.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "DEFINITION",
            "CRON",
            "TIME ZONE",
            "MISSED",
            "OVERLAP",
            "NEXT",
            "LAST RUN",
        ],
        rows,
    )
}

/// The agents, then their workers.
pub fn agents(list: &AgentList) -> String {
    if list.agents.is_empty() {
        return "no agents: no worker is registered and no step waits for one\n".to_string();
    }
    let rows = list
        .agents
        .iter()
        .map(|a| {
            let healthy = a.workers.iter().filter(|w| w.health == "healthy").count();
            vec![
                a.name.clone(),
                a.health.clone(),
                format!("{healthy}/{}", a.workers.len()),
                a.queue_depth
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "?".into()),
                a.waiting_steps.to_string(),
                a.oldest_waiting_ms.map(duration).unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = table(
        &["AGENT", "HEALTH", "HEALTHY", "QUEUED", "WAITING", "OLDEST"],
        rows,
    );
    let mut seen = std::collections::BTreeMap::new();
    for worker in list.agents.iter().flat_map(|a| &a.workers) {
        seen.entry(worker.worker_id.as_str()).or_insert(worker);
    }
    if !seen.is_empty() {
        let rows = seen
            .values()
            .map(|w| {
                vec![
                    w.worker_id.clone(),
                    w.health.clone(),
                    w.agents.join(","),
                    format!("{}/{}", w.in_flight, w.concurrency),
                    w.host.clone().unwrap_or_default(),
                    w.pid.map(|p| p.to_string()).unwrap_or_default(),
                    w.sdk.clone().unwrap_or_default(),
                    time(w.last_seen),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "WORKER",
                "HEALTH",
                "AGENTS",
                "TASKS",
                "HOST",
                "PID",
                "SDK",
                "LAST SEEN",
            ],
            rows,
        ));
    }
    out
}

/// One line: the agent's health, its workers and what waits for them.
pub fn agent_health(h: &AgentHealth) -> String {
    let oldest = h
        .oldest_waiting_ms
        .map(|ms| format!(", the oldest for {}", duration(ms)))
        .unwrap_or_default();
    format!(
        "{}: {} ({} healthy and {} unhealthy workers; {} steps waiting{oldest})",
        h.name, h.health, h.healthy_workers, h.unhealthy_workers, h.waiting_steps
    )
}

/// A definition's revisions, then the content of one of them (its canonical JSON).
pub fn definition(detail: &DefinitionDetail, versions: &DefinitionVersions) -> String {
    let rows = versions
        .versions
        .iter()
        .map(|d| {
            let shown = if d.revision == detail.summary.revision {
                "*"
            } else {
                ""
            };
            vec![
                format!("{}{shown}", d.revision),
                d.version.clone().unwrap_or_default(),
                d.steps.to_string(),
                time(d.created_at),
                d.hash.chars().take(SHORT_HASH_CHARS).collect(),
            ]
        })
        .collect();
    let mut out = table(
        &["REVISION", "VERSION", "STEPS", "REGISTERED", "HASH"],
        rows,
    );
    let _ = writeln!(
        out,
        "\nrevision {} of {} (hash {}):",
        detail.summary.revision, detail.summary.name, detail.summary.hash
    );
    out.push_str(&serde_json::to_string_pretty(&detail.definition).unwrap_or_default());
    out.push('\n');
    out
}

/// One line confirming a registration.
pub fn registered(d: &DefinitionSummary) -> String {
    let mut facts = Vec::new();
    if let Some(version) = &d.version {
        facts.push(format!("version {version}"));
    }
    facts.push(format!("{} steps", d.steps));
    facts.push(format!(
        "hash {}",
        d.hash.chars().take(SHORT_HASH_CHARS).collect::<String>()
    ));
    format!(
        "registered `{}` revision {} ({})\n",
        d.name,
        d.revision,
        facts.join(", ")
    )
}

/// Dead letters as a table. `with_redriven` when the listing includes those redriven already,
/// which adds a column saying when. The reason comes last: it is the one free-text column.
pub fn dead_letters(list: &DeadLetterList, with_redriven: bool) -> String {
    if list.dead_letters.is_empty() {
        return if with_redriven {
            "no dead letters\n"
        } else {
            "no dead letters waiting to be redriven\n"
        }
        .to_string();
    }
    let rows = list
        .dead_letters
        .iter()
        .map(|d| {
            let mut row = vec![
                d.id.to_string(),
                d.workflow_id.map(|id| id.to_string()).unwrap_or_default(),
                d.step_id.clone().unwrap_or_default(),
                d.attempt.map(|a| a.to_string()).unwrap_or_default(),
                d.deliveries.map(|n| n.to_string()).unwrap_or_default(),
                time(d.created_at),
            ];
            if with_redriven {
                row.push(d.redriven_at.map(time).unwrap_or_default());
            }
            row.push(d.reason.clone());
            row
        })
        .collect();
    let mut headers = vec!["ID", "WORKFLOW", "STEP", "ATTEMPT", "DELIVERIES", "CREATED"];
    if with_redriven {
        headers.push("REDRIVEN");
    }
    headers.push("REASON");
    table(&headers, rows)
}

/// One row per agent's circuit breaker.
pub fn breakers(list: &BreakerList) -> String {
    if list.breakers.is_empty() {
        return "no circuit breakers: no step has called an agent yet\n".to_string();
    }
    let rows = list
        .breakers
        .iter()
        .map(|b| {
            vec![
                b.agent.clone(),
                b.state.replace('_', "-"),
                format!("{:.0}% of {}", b.failure_rate * 100.0, b.window),
                b.opened_at.map(time).unwrap_or_default(),
                b.next_probe_at.map(time).unwrap_or_default(),
                b.held_steps.to_string(),
            ]
        })
        .collect();
    table(
        &["AGENT", "STATE", "FAILED", "OPENED", "NEXT PROBE", "HELD"],
        rows,
    )
}

/// One line per dead letter a redrive handled: whether its step was retried, and if not, why.
pub fn redriven(response: &RedriveResponse) -> String {
    if response.redriven.is_empty() {
        return "no dead letters to redrive\n".to_string();
    }
    let mut out = String::new();
    for outcome in &response.redriven {
        let verdict = match (&outcome.error, outcome.attempt) {
            (Some(error), _) => format!("not retried: {error}"),
            (None, Some(attempt)) => format!("retried as attempt {attempt}{}", place(outcome)),
            (None, None) => format!("retried{}", place(outcome)),
        };
        let _ = writeln!(out, "{}: {verdict}", outcome.dead_letter);
    }
    out
}

/// One line saying what an operator's action did: `run <id> <action>[ step `<step>`]: <status>`,
/// the status being the run's once the action was done.
pub fn operated(response: &OperateResponse, step: Option<&str>) -> String {
    let step = step.map(|s| format!(" step `{s}`")).unwrap_or_default();
    format!(
        "run {} {}{step}: {}\n",
        response.workflow_id, response.action, response.status
    )
}

/// The fleet audit: one line per check (grade, area, check, why), then the verdict.
pub fn audit(audit: &HealthAudit) -> String {
    let area = audit.checks.iter().map(|c| c.area.len()).max().unwrap_or(0);
    let name = audit.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in &audit.checks {
        let _ = writeln!(
            out,
            "{:<4}  {:<area$}  {:<name$}  {}",
            c.status.to_uppercase(),
            c.area,
            c.name,
            c.message
        );
    }
    let count = |grade: &str| audit.checks.iter().filter(|c| c.status == grade).count();
    let _ = writeln!(
        out,
        "\n{}: {} failed, {} warned, {} passed (attempts over the last {})",
        audit.status,
        count(HEALTH_FAIL),
        count(HEALTH_WARN),
        count(HEALTH_PASS),
        audit.window
    );
    out
}

/// A run's history as a table, oldest first. The detail comes last: it is the one free-form
/// column.
pub fn events(list: &RunEventList) -> String {
    if list.events.is_empty() {
        return "no operator actions recorded for this run\n".to_string();
    }
    let rows = list
        .events
        .iter()
        .map(|e| {
            vec![
                time(e.at),
                e.actor.clone(),
                e.action.clone(),
                e.step_id.clone().unwrap_or_default(),
                e.detail.as_ref().map(detail).unwrap_or_default(),
            ]
        })
        .collect();
    table(&["TIME", "ACTOR", "ACTION", "STEP", "DETAIL"], rows)
}

/// A detail on one line: text as it is, anything else as compact JSON.
fn detail(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// " (step `deploy` of run …)", or as much of it as is known.
fn place(outcome: &RedriveOutcome) -> String {
    match (&outcome.step_id, outcome.workflow_id) {
        (Some(step), Some(run)) => format!(" (step `{step}` of run {run})"),
        (Some(step), None) => format!(" (step `{step}`)"),
        (None, Some(run)) => format!(" (run {run})"),
        (None, None) => String::new(),
    }
}

/// Times are shown in UTC: the coordinator and its logs use UTC, and runs are compared across
/// machines.
pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `850ms`, `3.2s`, `2m 05s`, `1h 02m 03s`.
fn duration(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        0 => format!("{ms}ms"),
        1..60 => format!("{seconds}.{}s", (ms % 1000) / 100),
        60..3600 => format!("{}m {:02}s", seconds / 60, seconds % 60),
        _ => format!(
            "{}h {:02}m {:02}s",
            seconds / 3600,
            (seconds % 3600) / 60,
            seconds % 60
        ),
    }
}

/// Left-aligned columns two spaces apart. The last column is not padded, and its extra lines
/// (a multi-line error) are indented to where it starts.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row).take(columns - 1) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let indent: usize = widths[..columns - 1].iter().map(|w| w + 2).sum();
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < columns {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            } else {
                let mut parts = cell.lines();
                line.push_str(parts.next().unwrap_or_default());
                for part in parts {
                    let _ = write!(line, "\n{:indent$}{part}", "");
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A line of a step's log, after its step's id (and attempt, past the first) when `prefixed`.
pub fn log_line(line: &flotilla_api_model::StepLogLine, prefixed: bool) -> String {
    match (prefixed, line.attempt) {
        (false, _) => line.line.clone(),
        (true, 1) => format!("{}: {}", line.step_id, line.line),
        (true, n) => format!("{}#{n}: {}", line.step_id, line.line),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use flotilla_api_model::{DeadLetterSummary, Metrics, RunSummary, StepResult};
    use serde_json::{Map, json};
    use uuid::Uuid;

    use super::*;

    #[test]
    fn trace_links_point_at_the_jaeger_trace_page() {
        let run = failed_run();
        for base in ["http://localhost:16686", "http://localhost:16686/"] {
            assert_eq!(
                trace_link(&base.parse().unwrap(), &run.trace_id).as_deref(),
                Some("http://localhost:16686/trace/00000000000000000000000000000001")
            );
        }
        assert_eq!(
            trace_link(&"http://jaeger:16686".parse().unwrap(), ""),
            None
        );
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_750_000_000 + seconds, 0).unwrap()
    }

    fn step(id: &str, status: &str, attempts: u32, error: Option<&str>) -> StepResult {
        StepResult {
            step_id: id.into(),
            agent: "agent".into(),
            action: "act".into(),
            status: status.into(),
            attempts,
            start_time: None,
            end_time: None,
            output: None,
            error: error.map(Into::into),
            next_attempt_at: None,
            strike: 1,
            held: None,
            workflow: None,
            child_workflow_id: None,
            waiting_for_worker: false,
        }
    }

    fn failed_run() -> WorkflowResult {
        WorkflowResult {
            workflow_id: Uuid::from_u128(1),
            trace_id: flotilla_api_model::trace_id(Uuid::from_u128(1)),
            name: "Complete Project Build".into(),
            status: "failure".into(),
            start_time: at(0),
            end_time: Some(at(125)),
            duration: Some(125_400),
            params: Map::new(),
            only: Vec::new(),
            skip: Vec::new(),
            error: None,
            steps: vec![
                step("scaffold", "success", 1, None),
                step("quality_check", "failure", 3, Some("lint failed\n2 errors")),
                step("deploy", "skipped", 0, Some("upstream failed")),
            ],
            metrics: Metrics {
                total_steps: 3,
                successful_steps: 1,
                failed_steps: 1,
                skipped_steps: 1,
            },
            parent: None,
        }
    }

    #[test]
    fn summary_of_a_finished_run() {
        assert_eq!(
            summary(&failed_run()),
            "\
Workflow  00000000-0000-0000-0000-000000000001 (Complete Project Build)
Status    failure
Started   2025-06-15 15:06:40 UTC
Ended     2025-06-15 15:08:45 UTC
Duration  2m 05s
Steps     3 total: 1 succeeded, 1 failed, 1 skipped

STEP           STATUS   ATTEMPTS  ERROR
scaffold       success  1
quality_check  failure  3         lint failed
                                  2 errors
deploy         skipped  0         upstream failed
"
        );
    }

    #[test]
    fn summary_names_the_runs_own_error_and_its_subset() {
        let mut run = failed_run();
        run.error = Some("workflow timed out after 5m".into());
        run.only = vec!["scaffold".into(), "quality_check".into()];
        run.skip = vec!["deploy".into()];
        let text = summary(&run);
        assert!(
            text.contains("Status    failure\nError     workflow timed out after 5m\nSubset    --only scaffold --only quality_check --skip deploy\nStarted"),
            "{text}"
        );
    }

    #[test]
    fn summary_names_the_parent_and_each_workflow_step_s_run() {
        let mut run = failed_run();
        run.parent = Some(flotilla_api_model::ParentRun {
            workflow_id: Uuid::from_u128(9),
            step_id: "deploy".into(),
        });
        run.steps = vec![StepResult {
            agent: String::new(),
            action: String::new(),
            workflow: Some("deploy-service".into()),
            child_workflow_id: Some(Uuid::from_u128(10)),
            ..step("ship", "running", 1, None)
        }];
        let text = summary(&run);
        assert!(
            text.contains("Parent    00000000-0000-0000-0000-000000000009 (step deploy)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "ship  running  1         workflow deploy-service: run 00000000-0000-0000-0000-00000000000a"
            ),
            "{text}"
        );
    }

    #[test]
    fn summary_of_a_running_run_shows_retries() {
        let mut run = failed_run();
        run.status = "running".into();
        run.end_time = None;
        run.duration = None;
        run.steps = vec![StepResult {
            next_attempt_at: Some(at(30)),
            strike: 1,
            held: None,
            ..step("fetch", "running", 1, Some("timeout"))
        }];
        assert_eq!(
            summary(&run),
            "\
Workflow  00000000-0000-0000-0000-000000000001 (Complete Project Build)
Status    running
Started   2025-06-15 15:06:40 UTC
Steps     3 total: 1 succeeded, 1 failed, 1 skipped

STEP   STATUS   ATTEMPTS  ERROR
fetch  running  1         timeout
                          next attempt at 2025-06-15 15:07:10 UTC
"
        );
    }

    #[test]
    fn a_step_no_worker_takes_says_so() {
        let mut run = failed_run();
        run.status = "running".into();
        run.steps = vec![StepResult {
            waiting_for_worker: true,
            ..step("scaffold", "running", 1, None)
        }];
        let text = summary(&run);
        assert!(
            text.ends_with("scaffold  running  1         waiting: no live worker serves `agent`\n"),
            "{text}"
        );
    }

    #[test]
    fn progress_counts_finished_and_running_steps() {
        let mut run = failed_run();
        run.steps[0].status = "running".into();
        assert_eq!(
            progress(&run),
            Progress {
                finished: 3,
                total: 3,
                message: "running 1, failed 1, skipped 1".into(),
            }
        );
    }

    #[test]
    fn run_table() {
        let page = RunPage {
            workflows: vec![
                RunSummary {
                    workflow_id: Uuid::from_u128(2),
                    name: "nightly".into(),
                    status: "running".into(),
                    start_time: at(60),
                    end_time: None,
                    duration: None,
                },
                RunSummary {
                    workflow_id: Uuid::from_u128(1),
                    name: "build".into(),
                    status: "success".into(),
                    start_time: at(0),
                    end_time: Some(at(1)),
                    duration: Some(850),
                },
            ],
            next_cursor: None,
        };
        assert_eq!(
            runs(&page),
            "\
ID                                    NAME     STATUS   STARTED                  DURATION
00000000-0000-0000-0000-000000000002  nightly  running  2025-06-15 15:07:40 UTC
00000000-0000-0000-0000-000000000001  build    success  2025-06-15 15:06:40 UTC  850ms
"
        );
        assert_eq!(
            runs(&RunPage {
                workflows: vec![],
                next_cursor: None
            }),
            "no workflow runs\n"
        );
    }

    #[test]
    fn definition_table_and_registration() {
        let summary = DefinitionSummary {
            name: "build".into(),
            version: Some("1.0.0".into()),
            revision: 2,
            description: None,
            steps: 4,
            hash: "0123456789abcdef0123".into(),
            created_at: at(0),
        };
        assert_eq!(
            definitions(&DefinitionList {
                definitions: vec![summary.clone()]
            }),
            "\
NAME   REVISION  VERSION  STEPS  CREATED                  HASH
build  2         1.0.0    4      2025-06-15 15:06:40 UTC  0123456789ab
"
        );
        assert_eq!(
            registered(&summary),
            "registered `build` revision 2 (version 1.0.0, 4 steps, hash 0123456789ab)\n"
        );
    }

    fn dead_letter(n: u128) -> DeadLetterSummary {
        DeadLetterSummary {
            id: Uuid::from_u128(0xd0 + n),
            workflow_id: Some(Uuid::from_u128(n)),
            step_id: Some("deploy".into()),
            attempt: Some(2),
            task_id: Some(Uuid::from_u128(0x70 + n)),
            reason: "delivery limit of 5 reached".into(),
            deliveries: Some(5),
            created_at: at(0),
            redriven_at: None,
            body: json!({}),
        }
    }

    #[test]
    fn dead_letter_table() {
        let unreadable = DeadLetterSummary {
            workflow_id: None,
            step_id: None,
            attempt: None,
            task_id: None,
            deliveries: None,
            reason: "rejected by a worker\nbody is not a task".into(),
            redriven_at: Some(at(90)),
            ..dead_letter(2)
        };
        let list = DeadLetterList {
            dead_letters: vec![dead_letter(1), unreadable],
        };
        assert_eq!(
            dead_letters(&list, false),
            "\
ID                                    WORKFLOW                              STEP    ATTEMPT  DELIVERIES  CREATED                  REASON
00000000-0000-0000-0000-0000000000d1  00000000-0000-0000-0000-000000000001  deploy  2        5           2025-06-15 15:06:40 UTC  delivery limit of 5 reached
00000000-0000-0000-0000-0000000000d2                                                                     2025-06-15 15:06:40 UTC  rejected by a worker
                                                                                                                                  body is not a task
"
        );
        assert_eq!(
            dead_letters(&list, true).lines().nth(2),
            Some(
                "00000000-0000-0000-0000-0000000000d2                                                                     \
                 2025-06-15 15:06:40 UTC  2025-06-15 15:08:10 UTC  rejected by a worker"
            )
        );
        let none = DeadLetterList {
            dead_letters: Vec::new(),
        };
        assert_eq!(
            dead_letters(&none, false),
            "no dead letters waiting to be redriven\n"
        );
        assert_eq!(dead_letters(&none, true), "no dead letters\n");
    }

    #[test]
    fn redrive_lines() {
        let outcome = |n: u128| RedriveOutcome {
            dead_letter: Uuid::from_u128(0xd0 + n),
            workflow_id: Some(Uuid::from_u128(n)),
            step_id: Some("deploy".into()),
            attempt: Some(3),
            error: None,
        };
        let response = RedriveResponse {
            redriven: vec![
                outcome(1),
                RedriveOutcome {
                    attempt: None,
                    workflow_id: None,
                    ..outcome(2)
                },
                RedriveOutcome {
                    attempt: None,
                    error: Some("the run has ended".into()),
                    ..outcome(3)
                },
            ],
        };
        assert_eq!(
            redriven(&response),
            "\
00000000-0000-0000-0000-0000000000d1: retried as attempt 3 (step `deploy` of run 00000000-0000-0000-0000-000000000001)
00000000-0000-0000-0000-0000000000d2: retried (step `deploy`)
00000000-0000-0000-0000-0000000000d3: not retried: the run has ended
"
        );
        assert_eq!(
            redriven(&RedriveResponse {
                redriven: Vec::new()
            }),
            "no dead letters to redrive\n"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(0), "0ms");
        assert_eq!(duration(999), "999ms");
        assert_eq!(duration(1_000), "1.0s");
        assert_eq!(duration(3_250), "3.2s");
        assert_eq!(duration(59_999), "59.9s");
        assert_eq!(duration(60_000), "1m 00s");
        assert_eq!(duration(3_599_000), "59m 59s");
        assert_eq!(duration(3_723_000), "1h 02m 03s");
    }

    #[test]
    fn success_failure_and_cancelled_end_a_run() {
        assert!(is_finished("success") && is_finished("failure") && is_finished("cancelled"));
        assert!(is_finished("rolled_back") && is_finished("rollback_failed"));
        assert!(!is_finished("running") && !is_finished("failing") && !is_finished("paused"));
        assert!(!is_finished("rolling_back"));
    }

    #[test]
    fn progress_of_a_paused_run_says_it_is_paused() {
        let mut run = failed_run();
        run.status = "paused".into();
        assert_eq!(
            progress(&run).message,
            "paused: running 0, failed 1, skipped 1"
        );
    }

    #[test]
    fn operator_lines() {
        let response = |action: &str, status: &str| OperateResponse {
            workflow_id: Uuid::from_u128(1),
            action: action.into(),
            status: status.into(),
        };
        assert_eq!(
            operated(&response("cancel", "cancelled"), None),
            "run 00000000-0000-0000-0000-000000000001 cancel: cancelled\n"
        );
        assert_eq!(
            operated(&response("skip", "running"), Some("deploy")),
            "run 00000000-0000-0000-0000-000000000001 skip step `deploy`: running\n"
        );
    }

    #[test]
    fn history_table() {
        use flotilla_api_model::RunEvent;

        let event =
            |actor: &str, action: &str, step: Option<&str>, detail: Option<Value>| RunEvent {
                at: at(60),
                actor: actor.into(),
                action: action.into(),
                step_id: step.map(Into::into),
                detail,
            };
        let list = RunEventList {
            events: vec![
                event("alice@build-box", "pause", None, None),
                event(
                    "bob@laptop",
                    "complete",
                    Some("deploy"),
                    Some(json!({"output": {"url": "https://x"}})),
                ),
                event(
                    "anonymous@10.0.0.7",
                    "skip",
                    Some("lint"),
                    Some(json!("flaky")),
                ),
            ],
        };
        assert_eq!(
            events(&list),
            "\
TIME                     ACTOR               ACTION    STEP    DETAIL
2025-06-15 15:07:40 UTC  alice@build-box     pause
2025-06-15 15:07:40 UTC  bob@laptop          complete  deploy  {\"output\":{\"url\":\"https://x\"}}
2025-06-15 15:07:40 UTC  anonymous@10.0.0.7  skip      lint    flaky
"
        );
        assert_eq!(
            events(&RunEventList { events: Vec::new() }),
            "no operator actions recorded for this run\n"
        );
    }

    #[test]
    fn a_run_waiting_for_a_person_names_the_step_and_its_strikes() {
        let mut run = failed_run();
        run.status = "needs_attention".into();
        run.end_time = None;
        run.duration = None;
        run.steps = vec![
            StepResult {
                strike: 3,
                ..step("build", "needs_attention", 3, Some("disk full"))
            },
            StepResult {
                strike: 2,
                ..step("fetch", "success", 2, None)
            },
        ];
        let text = summary(&run);
        assert!(
            text.contains("build  needs_attention  3         strike 3: escalated; disk full"),
            "{text}"
        );
        assert!(text.contains("strike 2: fallback\n"), "{text}");
        assert!(
            progress(&run)
                .message
                .starts_with("needs attention: build; "),
            "{}",
            progress(&run).message
        );
    }
}

/// A plan, for `execute --dry-run`: the stages of steps that can run together, each step with
/// what it waits for and its condition, then the failure handlers and the steps left out. Its
/// JSON is what `--dry-run --output json` prints.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanView {
    pub workflow: String,
    /// Whether the definition runs by itself once registered.
    pub scheduled: bool,
    /// The `--only`/`--skip` selection, as the run would show it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub stages: Vec<Vec<PlannedStep>>,
    pub on_failure: Vec<PlannedStep>,
    /// Whether a failed run rolls back by itself (`error_handling.rollback`).
    pub rollback: bool,
    /// The compensations a rollback runs, of the steps that succeeded, the latest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub compensations: Vec<PlannedStep>,
    pub left_out: Vec<LeftOut>,
}

/// A step of a [`PlanView`].
#[derive(Debug, serde::Serialize)]
pub struct PlannedStep {
    pub id: String,
    /// `agent.action`, or `workflow NAME[@version]`.
    pub call: String,
    /// The steps it waits for (not those left out, which are skipped before the start).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Its condition, decided at run time.
    #[serde(rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
}

/// A step a subset leaves out, and why.
#[derive(Debug, serde::Serialize)]
pub struct LeftOut {
    pub id: String,
    pub reason: String,
}

impl PlanView {
    pub fn new(
        plan: &flotilla_core::Plan,
        scheduled: bool,
        subset: &flotilla_core::Subset,
    ) -> Self {
        let planned = |i: usize| {
            let node = &plan.nodes[i];
            PlannedStep {
                id: node.id.clone(),
                call: call(node),
                after: node
                    .deps
                    .iter()
                    .filter(|&&d| subset.left_out(plan, d).is_none())
                    .map(|&d| plan.nodes[d].id.clone())
                    .collect(),
                condition: node.condition.as_ref().map(|c| c.source().to_string()),
            }
        };
        Self {
            workflow: plan.name.clone(),
            scheduled,
            subset: (!subset.is_empty()).then(|| subset.to_string()),
            stages: plan
                .stages_of(subset)
                .iter()
                .map(|stage| stage.iter().map(|&i| planned(i)).collect())
                .collect(),
            on_failure: (0..plan.nodes.len())
                .filter(|&i| {
                    plan.nodes[i].role == flotilla_core::plan::Role::OnFailure
                        && subset.left_out(plan, i).is_none()
                })
                .map(|i| PlannedStep {
                    after: Vec::new(),
                    condition: None,
                    ..planned(i)
                })
                .collect(),
            rollback: plan.rollback,
            compensations: (0..plan.nodes.len())
                .filter(|&i| plan.nodes[i].role == flotilla_core::plan::Role::Compensation)
                .map(|i| PlannedStep {
                    after: Vec::new(),
                    condition: None,
                    ..planned(i)
                })
                .collect(),
            left_out: (0..plan.nodes.len())
                .filter_map(|i| {
                    Some(LeftOut {
                        id: plan.nodes[i].id.clone(),
                        reason: subset.left_out(plan, i)?,
                    })
                })
                .collect(),
        }
    }
}

/// A [`PlanView`] for people.
pub fn plan(view: &PlanView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Workflow  {} (valid; nothing was run)", view.workflow);
    if view.scheduled {
        let _ = writeln!(out, "Schedule  runs by itself once registered");
    }
    if let Some(subset) = &view.subset {
        let _ = writeln!(out, "Subset    {subset}");
    }
    for (n, stage) in view.stages.iter().enumerate() {
        let _ = writeln!(out, "\nStage {}", n + 1);
        for step in stage {
            let _ = write!(out, "  {}  {}", step.id, step.call);
            if !step.after.is_empty() {
                let _ = write!(out, "  after {}", step.after.join(", "));
            }
            if let Some(condition) = &step.condition {
                let _ = write!(out, "  if {condition}");
            }
            let _ = writeln!(out);
        }
    }
    if !view.on_failure.is_empty() {
        let _ = writeln!(out, "\nIf the run fails");
        for step in &view.on_failure {
            let _ = writeln!(out, "  {}  {}", step.id, step.call);
        }
    }
    if !view.compensations.is_empty() {
        let when = if view.rollback {
            "If the run fails (after its handlers), or on `workflows rollback`"
        } else {
            "On `workflows rollback`"
        };
        let _ = writeln!(
            out,
            "\n{when}: undo the steps that succeeded, the latest first"
        );
        for step in &view.compensations {
            let _ = writeln!(out, "  {}  {}", step.id, step.call);
        }
    }
    if !view.left_out.is_empty() {
        let _ = writeln!(out, "\nLeft out (skipped)");
        for step in &view.left_out {
            let _ = writeln!(out, "  {}  {}", step.id, step.reason);
        }
    }
    out
}

/// What a step of a plan runs: `agent.action`, or `workflow NAME[@version]`.
fn call(node: &flotilla_core::plan::Node) -> String {
    match &node.workflow {
        Some(w) => match &w.version {
            Some(version) => format!("workflow {}@{version}", w.name),
            None => format!("workflow {}", w.name),
        },
        None => format!("{}.{}", node.agent, node.action),
    }
}

#[cfg(test)]
mod plan_tests {
    #[test]
    fn the_seed_plan_reads_as_stages() {
        let def =
            flotilla_core::Definition::from_yaml(include_str!("../../../examples/workflow.yml"))
                .unwrap();
        let plan = flotilla_core::Plan::compile(&def).unwrap();
        let text = super::plan(&super::PlanView::new(
            &plan,
            false,
            &flotilla_core::Subset::default(),
        ));
        assert!(text.contains("Stage 3\n  quality_check  agent7.code_quality_check  after build_api\n  security_scan  agent10.security_scan  after build_api"), "{text}");
        assert!(text.contains("deploy  agent19.deploy  after quality_check, security_scan, performance_test  if quality_check.success && security_scan.passed"), "{text}");
        assert!(text.contains("If the run fails\n  log_error  agent9.log_error\n  notify_slack  flotilla-notify.notify"), "{text}");
        assert!(!text.contains("Left out"), "{text}");
    }

    #[test]
    fn compensations_read_as_what_a_rollback_runs() {
        let def = flotilla_core::Definition::from_yaml(
            "name: p\nsteps:\n  - {id: a, agent: x, action: do, compensate: {agent: x, action: undo}}\nerror_handling:\n  rollback: true\n",
        )
        .unwrap();
        let plan = flotilla_core::Plan::compile(&def).unwrap();
        let text = super::plan(&super::PlanView::new(
            &plan,
            false,
            &flotilla_core::Subset::default(),
        ));
        assert!(text.contains("Stage 1\n  a  x.do\n\nIf the run fails (after its handlers), or on `workflows rollback`: undo the steps that succeeded, the latest first\n  a:compensate  x.undo\n"), "{text}");
    }

    #[test]
    fn the_plan_of_a_subset_shows_what_runs_and_what_is_left_out() {
        let def =
            flotilla_core::Definition::from_yaml(include_str!("../../../examples/workflow.yml"))
                .unwrap();
        let plan = flotilla_core::Plan::compile(&def).unwrap();
        let subset = flotilla_core::Subset {
            only: vec!["build_api".into(), "deploy".into()],
            skip: vec!["deploy".into()],
        };
        let text = super::plan(&super::PlanView::new(&plan, false, &subset));
        assert!(
            text.contains("Subset    --only build_api --only deploy --skip deploy\n\nStage 1\n  build_api  agent1.create_api\n\nLeft out (skipped)\n  scaffold  not selected: --only build_api, deploy\n"),
            "{text}"
        );
        assert!(
            text.contains("  deploy  skipped: --skip deploy\n"),
            "{text}"
        );
        assert!(!text.contains("Stage 2"), "{text}");
        assert!(!text.contains("If the run fails"), "{text}");
    }

    #[test]
    fn a_workflow_step_reads_as_one() {
        let def = flotilla_core::Definition::from_yaml(
            "name: p\nsteps:\n  - {id: deploy, workflow: deploy-service, version: 3}\n  - {id: check, agent: a, action: b}\n",
        )
        .unwrap();
        let plan = flotilla_core::Plan::compile(&def).unwrap();
        let text = super::plan(&super::PlanView::new(
            &plan,
            false,
            &flotilla_core::Subset::default(),
        ));
        assert!(
            text.contains("Stage 1\n  deploy  workflow deploy-service@3\n"),
            "{text}"
        );
        assert!(text.contains("check  a.b  after deploy"), "{text}");
    }

    #[test]
    fn an_audit_prints_one_aligned_line_per_check_and_its_verdict() {
        let check = |area: &str, name: &str, status: &str, message: &str| {
            flotilla_api_model::HealthAuditCheck {
                area: area.into(),
                name: name.into(),
                status: status.into(),
                value: None,
                message: message.into(),
            }
        };
        let audit = flotilla_api_model::HealthAudit::of(
            "1h".into(),
            flotilla_api_model::HealthTargets::default(),
            vec![
                check("postgres", "reachable", "pass", "answers in 1.0 ms"),
                check("rabbitmq", "queue build", "fail", "no consumer"),
            ],
        );
        assert_eq!(
            super::audit(&audit),
            "PASS  postgres  reachable    answers in 1.0 ms\nFAIL  rabbitmq  queue build  no consumer\n\nfail: 1 failed, 0 warned, 1 passed (attempts over the last 1h)\n"
        );
    }
}
