//! `flotilla metrics`: the main figures of a coordinator, read from its `/metrics` (the
//! Prometheus text format) and summed up for people.

use std::collections::BTreeMap;
use std::fmt::Write;

use flotilla_api_model::MetricsSummary;
use serde::Serialize;

/// One sample of the text format: a series and its value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Reads the samples of the Prometheus text format (version 0.0.4); comments, and lines that
/// are not samples, are skipped.
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(sample)
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, labels(rest.strip_suffix('}')?)?),
        None => (series, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y \"quoted\""` into its pairs.
fn labels(mut text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_string(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// The figures of one agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentFigures {
    pub executions: f64,
    pub errors: f64,
    pub retries: f64,
    pub dead_letters: f64,
    /// Tasks waiting in the agent's queue, when the coordinator could read it.
    pub queued: Option<f64>,
    /// Attempt run time quantiles, in seconds, estimated from the histogram's buckets.
    pub latency_p50: Option<f64>,
    pub latency_p95: Option<f64>,
    /// How long tasks waited for a worker, 95th percentile in seconds.
    pub queue_wait_p95: Option<f64>,
}

/// What `flotilla metrics` prints: counts since the coordinator started, gauges as of now.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Runs that ended, by status.
    pub workflows: BTreeMap<String, f64>,
    /// Runs not ended, when the coordinator reports it.
    pub active: Option<f64>,
    pub outbox_backlog: Option<f64>,
    pub stale_results: f64,
    pub agents: BTreeMap<String, AgentFigures>,
}

/// Sums up a coordinator's metrics; only `agent`'s when given.
pub fn summarize(text: &str, agent: Option<&str>) -> Summary {
    let samples = samples(text);
    let mut summary = Summary::default();
    // Histogram buckets by agent: (upper bound, cumulative count).
    let mut latency: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut waits: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &samples {
        let of_agent = s.labels.get("agent").cloned();
        if let (Some(wanted), Some(this)) = (agent, &of_agent)
            && wanted != this
        {
            continue;
        }
        let bucket = || s.labels.get("le").and_then(|le| sample_bound(le));
        let mut figures = |f: &mut dyn FnMut(&mut AgentFigures)| {
            if let Some(name) = &of_agent {
                f(summary.agents.entry(name.clone()).or_default());
            }
        };
        match s.name.as_str() {
            "orchestrator_workflows_total" => {
                if let Some(status) = s.labels.get("status") {
                    summary.workflows.insert(status.clone(), s.value);
                }
            }
            "orchestrator_workflows_active" => summary.active = Some(s.value),
            "orchestrator_outbox_backlog" => summary.outbox_backlog = Some(s.value),
            "orchestrator_stale_results_total" => summary.stale_results = s.value,
            "orchestrator_agent_executions_total" => figures(&mut |f| f.executions = s.value),
            "orchestrator_agent_errors_total" => figures(&mut |f| f.errors = s.value),
            "orchestrator_retries_total" => figures(&mut |f| f.retries = s.value),
            "orchestrator_dead_letters_total" => figures(&mut |f| f.dead_letters = s.value),
            "orchestrator_queue_depth" => figures(&mut |f| f.queued = Some(s.value)),
            "orchestrator_agent_latency_seconds_bucket" => {
                if let (Some(name), Some(le)) = (&of_agent, bucket()) {
                    latency.entry(name.clone()).or_default().push((le, s.value));
                }
            }
            "orchestrator_queue_wait_seconds_bucket" => {
                if let (Some(name), Some(le)) = (&of_agent, bucket()) {
                    waits.entry(name.clone()).or_default().push((le, s.value));
                }
            }
            _ => {}
        }
    }
    for (name, buckets) in &mut latency {
        let figures = summary.agents.entry(name.clone()).or_default();
        figures.latency_p50 = quantile(0.5, buckets);
        figures.latency_p95 = quantile(0.95, buckets);
    }
    for (name, buckets) in &mut waits {
        summary
            .agents
            .entry(name.clone())
            .or_default()
            .queue_wait_p95 = quantile(0.95, buckets);
    }
    summary
}

fn sample_bound(le: &str) -> Option<f64> {
    match le {
        "+Inf" => Some(f64::INFINITY),
        other => other.parse().ok(),
    }
}

/// The `q` quantile of a histogram given by its cumulative buckets, interpolated linearly within
/// the bucket it falls in, as Prometheus's `histogram_quantile` does; `None` without
/// observations. A quantile in the `+Inf` bucket is the highest finite bound.
fn quantile(q: f64, buckets: &mut [(f64, f64)]) -> Option<f64> {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets.iter() {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let within = count - below;
            let fraction = if within > 0.0 {
                (rank - below) / within
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * fraction);
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

/// The summary as text for people.
pub fn render(summary: &Summary) -> String {
    let mut out = String::new();
    let count = |status: &str| summary.workflows.get(status).copied().unwrap_or(0.0);
    // A run that was rolled back (or failed to be) failed first.
    let failure = count("failure") + count("rolled_back") + count("rollback_failed");
    let (success, cancelled) = (count("success"), count("cancelled"));
    let ended = success + failure + cancelled;
    let rate = if ended > 0.0 {
        format!(" (success rate {:.1}%)", 100.0 * success / ended)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "Workflows  {success} succeeded, {failure} failed, {cancelled} cancelled{rate}"
    );
    if let Some(active) = summary.active {
        let _ = writeln!(out, "Active     {active}");
    }
    if let Some(backlog) = summary.outbox_backlog {
        let _ = writeln!(out, "Outbox     {backlog} messages not yet published");
    }
    let _ = writeln!(
        out,
        "Stale      {} results ignored (duplicates, late results)",
        summary.stale_results
    );
    if summary.agents.is_empty() {
        out.push_str("\nno agent has run a task yet\n");
        return out;
    }
    let seconds = |s: Option<f64>| s.map_or_else(|| "-".to_string(), human_seconds);
    let mut rows = vec![
        [
            "AGENT",
            "EXECUTIONS",
            "ERRORS",
            "RETRIES",
            "DEAD",
            "QUEUED",
            "P50",
            "P95",
            "WAIT P95",
        ]
        .map(String::from),
    ];
    for (name, f) in &summary.agents {
        rows.push([
            name.clone(),
            f.executions.to_string(),
            f.errors.to_string(),
            f.retries.to_string(),
            f.dead_letters.to_string(),
            f.queued.map_or_else(|| "-".to_string(), |q| q.to_string()),
            seconds(f.latency_p50),
            seconds(f.latency_p95),
            seconds(f.queue_wait_p95),
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);
    out
}

/// Rows in left-aligned columns, the first row being the header.
fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `flotilla metrics --range R`: the attempts that ended over the range, from
/// `/api/metrics/summary`; only `agent`'s when given.
pub fn render_range(summary: &MetricsSummary, agent: Option<&str>) -> String {
    let mut out = String::new();
    let percent = |rate: f64| format!("{:.1}%", 100.0 * rate);
    let rate = summary
        .success_rate
        .map_or_else(String::new, |r| format!(" (success rate {})", percent(r)));
    let _ = writeln!(
        out,
        "Attempts   {} ended in the last {}, {} succeeded{rate}",
        summary.executions, summary.range, summary.successes
    );
    let agents: Vec<_> = summary
        .agents
        .iter()
        .filter(|a| agent.is_none_or(|name| a.agent == name))
        .collect();
    if agents.is_empty() {
        out.push_str("\nno attempt ended in that range\n");
        return out;
    }
    let millis =
        |ms: Option<f64>| ms.map_or_else(|| "-".to_string(), |ms| human_seconds(ms / 1000.0));
    let mut rows = vec![["AGENT", "EXECUTIONS", "SUCCESS", "P50", "P95", "P99"].map(String::from)];
    for a in agents {
        rows.push([
            a.agent.clone(),
            a.executions.to_string(),
            percent(a.success_rate),
            millis(a.p50_ms),
            millis(a.p95_ms),
            millis(a.p99_ms),
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);
    out
}

/// `4ms`, `1.25s`, `2m 05s`.
fn human_seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.2}s")
    } else {
        let whole = s.round() as u64;
        format!("{}m {:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_summary_reads_as_a_table() {
        let agent = |name: &str, executions, successes, p50_ms| flotilla_api_model::AgentSummary {
            agent: name.into(),
            executions,
            successes,
            success_rate: successes as f64 / executions as f64,
            p50_ms,
            p95_ms: p50_ms.map(|ms| ms * 2.0),
            p99_ms: p50_ms.map(|ms| ms * 3.0),
        };
        let summary = MetricsSummary {
            range: "1h".into(),
            since: chrono::DateTime::UNIX_EPOCH,
            until: chrono::DateTime::UNIX_EPOCH,
            executions: 4,
            successes: 3,
            success_rate: Some(0.75),
            agents: vec![agent("a1", 3, 2, Some(12.0)), agent("b2", 1, 1, None)],
        };
        assert_eq!(
            render_range(&summary, None),
            "Attempts   4 ended in the last 1h, 3 succeeded (success rate 75.0%)\n\n\
             AGENT  EXECUTIONS  SUCCESS  P50   P95   P99\n\
             a1     3           66.7%    12ms  24ms  36ms\n\
             b2     1           100.0%   -     -     -\n"
        );
        assert!(
            render_range(&summary, Some("b2"))
                .ends_with("b2     1           100.0%   -    -    -\n")
        );
        assert!(render_range(&summary, Some("zz")).ends_with("no attempt ended in that range\n"));
    }

    const TEXT: &str = r#"# HELP orchestrator_workflows_total Runs that ended, by final status.
# TYPE orchestrator_workflows_total counter
orchestrator_workflows_total{status="success"} 3
orchestrator_workflows_total{status="failure"} 1
orchestrator_workflows_total{status="cancelled"} 0
orchestrator_outbox_backlog 2
orchestrator_stale_results_total 5
orchestrator_agent_executions_total{agent="a1"} 4
orchestrator_agent_errors_total{agent="a1"} 1
orchestrator_agent_executions_total{agent="b \"2\""} 7
orchestrator_retries_total{agent="a1"} 1
orchestrator_queue_depth{agent="a1"} 9
orchestrator_agent_latency_seconds_bucket{agent="a1",le="0.1"} 2
orchestrator_agent_latency_seconds_bucket{agent="a1",le="1"} 4
orchestrator_agent_latency_seconds_bucket{agent="a1",le="+Inf"} 4
orchestrator_agent_latency_seconds_sum{agent="a1"} 1.5
orchestrator_agent_latency_seconds_count{agent="a1"} 4
"#;

    #[test]
    fn samples_are_read_with_their_labels() {
        let all = samples(TEXT);
        assert_eq!(all.len(), 15);
        let quoted = all
            .iter()
            .find(|s| s.value == 7.0)
            .expect("the sample with an escaped label");
        assert_eq!(quoted.labels["agent"], "b \"2\"");
        assert_eq!(
            sample("x_bucket{le=\"+Inf\"} +Inf").unwrap().value,
            f64::INFINITY
        );
        assert_eq!(sample("not a sample"), None);
    }

    #[test]
    fn the_summary_has_the_main_figures() {
        let summary = summarize(TEXT, None);
        assert_eq!(summary.workflows["success"], 3.0);
        assert_eq!(summary.outbox_backlog, Some(2.0));
        assert_eq!(summary.active, None);
        assert_eq!(summary.stale_results, 5.0);
        let a1 = &summary.agents["a1"];
        assert_eq!((a1.executions, a1.errors, a1.retries), (4.0, 1.0, 1.0));
        assert_eq!(a1.queued, Some(9.0));
        // Half of 4 observations is the second, the top of the first bucket.
        assert_eq!(a1.latency_p50, Some(0.1));
        // The 3.8th lies 90% into the second bucket.
        assert!((a1.latency_p95.unwrap() - 0.91).abs() < 1e-9);
        assert_eq!(a1.queue_wait_p95, None);

        let text = render(&summary);
        assert!(
            text.starts_with(
                "Workflows  3 succeeded, 1 failed, 0 cancelled (success rate 75.0%)\n"
            ),
            "{text}"
        );
        assert!(text.contains("a1     4           1"), "{text}");
    }

    #[test]
    fn one_agent_can_be_picked() {
        let summary = summarize(TEXT, Some("a1"));
        assert_eq!(summary.agents.keys().collect::<Vec<_>>(), ["a1"]);
        assert_eq!(summary.workflows["failure"], 1.0, "run figures stay");
    }

    #[test]
    fn quantiles_of_an_empty_histogram_are_unknown() {
        assert_eq!(quantile(0.5, &mut []), None);
        assert_eq!(quantile(0.5, &mut [(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.99, &mut [(1.0, 1.0), (f64::INFINITY, 10.0)]),
            Some(1.0)
        );
    }
}
