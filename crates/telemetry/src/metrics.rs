//! Prometheus metrics of the coordinator ([`CoordinatorMetrics`]) and of workers
//! ([`WorkerMetrics`]), rendered in the Prometheus text format (version 0.0.4).
//!
//! Every name is a constant here, so that dashboards, alerts and tests have one place to look.
//! Counters are registered without their `_total` suffix: the encoder appends it.
//!
//! Each registry belongs to the value that owns it rather than to the process, so that two
//! coordinators or workers in one test process do not count into each other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`CoordinatorMetrics::render`] and [`WorkerMetrics::render`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// `orchestrator_workflows_total{status}`: runs that ended, by final status.
pub const WORKFLOWS: &str = "orchestrator_workflows";
/// `orchestrator_workflows_active`: runs not ended, counted in Postgres at scrape time.
pub const WORKFLOWS_ACTIVE: &str = "orchestrator_workflows_active";
/// `orchestrator_workflow_duration_seconds`: creation to end of each run that ended.
pub const WORKFLOW_DURATION: &str = "orchestrator_workflow_duration_seconds";
/// `orchestrator_agent_executions_total{agent}`: attempts that ended, however they ended.
pub const AGENT_EXECUTIONS: &str = "orchestrator_agent_executions";
/// `orchestrator_agent_errors_total{agent}`: attempts that ended in failure, including lease
/// expiries, timeouts and dead letters.
pub const AGENT_ERRORS: &str = "orchestrator_agent_errors";
/// `orchestrator_agent_latency_seconds{agent}`: run time of attempts a worker reported (its
/// `started_at` to `finished_at`).
pub const AGENT_LATENCY: &str = "orchestrator_agent_latency_seconds";
/// `orchestrator_queue_wait_seconds{agent}`: dispatch of a task to the start its worker reported.
pub const QUEUE_WAIT: &str = "orchestrator_queue_wait_seconds";
/// `orchestrator_queue_depth{agent}`: ready messages in each agent's task queues (its own, the
/// high-priority one, those of the label sets its tasks went to), read at scrape time.
pub const QUEUE_DEPTH: &str = "orchestrator_queue_depth";
/// `orchestrator_queue_oldest_age_seconds{agent}`: how long the oldest attempt dispatched to
/// each agent and not yet started by a worker has waited, read from Postgres at scrape time;
/// agents with none waiting are left out. With [`QUEUE_DEPTH`], the signal an autoscaler
/// needs.
pub const QUEUE_OLDEST_AGE: &str = "orchestrator_queue_oldest_age_seconds";
/// `orchestrator_outbox_backlog`: committed messages not yet confirmed by RabbitMQ.
pub const OUTBOX_BACKLOG: &str = "orchestrator_outbox_backlog";
/// `orchestrator_retries_total{agent}`: attempts dispatched after the first one of their step.
pub const RETRIES: &str = "orchestrator_retries";
/// `orchestrator_dead_letters_total{agent}`: tasks RabbitMQ dead-lettered.
pub const DEAD_LETTERS: &str = "orchestrator_dead_letters";
/// `orchestrator_stale_results_total`: results and timers ignored because they no longer match
/// their step's current attempt (duplicates, late results).
pub const STALE_RESULTS: &str = "orchestrator_stale_results";
/// `orchestrator_breaker_state{agent}`: each agent's circuit breaker, 0 closed, 1 half-open,
/// 2 open; read from Postgres at scrape time.
pub const BREAKER_STATE: &str = "orchestrator_breaker_state";
/// `orchestrator_breaker_held_steps_total{agent}`: steps an open circuit breaker held instead of
/// dispatching them.
pub const BREAKER_HELD: &str = "orchestrator_breaker_held_steps";

/// `orchestrator_worker_tasks_total{agent,action}`: tasks a worker ran to their end.
pub const WORKER_TASKS: &str = "orchestrator_worker_tasks";
/// `orchestrator_worker_tasks_failed_total{agent,action}`: those of them that failed.
pub const WORKER_TASKS_FAILED: &str = "orchestrator_worker_tasks_failed";
/// `orchestrator_worker_tasks_in_flight{agent,action}`: tasks running now.
pub const WORKER_TASKS_IN_FLIGHT: &str = "orchestrator_worker_tasks_in_flight";
/// `orchestrator_worker_task_duration_seconds{agent,action}`: handler run time.
pub const WORKER_TASK_DURATION: &str = "orchestrator_worker_task_duration_seconds";

/// `orchestrator_spans_dropped_total`: trace spans of this process dropped, past the export
/// queue or in a failed export (see [`crate::trace`]).
pub const SPANS_DROPPED: &str = "orchestrator_spans_dropped";

/// The run statuses `orchestrator_workflows_total` is exported for from the start, so that a
/// rate over them is defined before the first run of each kind ends.
pub const FINAL_STATUSES: [&str; 5] = [
    "success",
    "failure",
    "cancelled",
    "rolled_back",
    "rollback_failed",
];

/// Agents whose queue depth a coordinator reads at most. A scrape costs one round trip to
/// RabbitMQ per agent, so this bounds it.
pub const MAX_QUEUE_GAUGES: usize = 500;

/// Bucket bounds of the run durations, in seconds: runs last from milliseconds to hours.
const WORKFLOW_BUCKETS: [f64; 16] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0,
];

/// Bucket bounds of attempt run times and queue waits, in seconds.
const STEP_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
];

fn step_histogram() -> Histogram {
    Histogram::new(STEP_BUCKETS)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
}

impl AgentLabel {
    fn of(agent: &str) -> Self {
        Self {
            agent: agent.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    agent: String,
    action: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A gauge read from outside at scrape time: left out of the output when it could not be read,
/// rather than showing the last value as if it were current.
#[derive(Debug, Clone, Default)]
struct ScrapedGauge(Family<Vec<(&'static str, &'static str)>, Gauge>);

impl ScrapedGauge {
    fn set(&self, value: Option<i64>) {
        match value {
            // No labels: rendered as a plain gauge.
            Some(value) => {
                self.0.get_or_create(&Vec::new()).set(value);
            }
            None => self.0.clear(),
        }
    }
}

fn render(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The coordinator's metrics. The engine counts what it committed; the gauges that describe
/// shared state (queues, outbox, active runs) are set from Postgres and RabbitMQ right before
/// each [`CoordinatorMetrics::render`], since several coordinators share them.
#[derive(Debug)]
pub struct CoordinatorMetrics {
    registry: Registry,
    workflows: Family<StatusLabel, Counter>,
    workflow_duration: Histogram,
    active: ScrapedGauge,
    executions: Family<AgentLabel, Counter>,
    errors: Family<AgentLabel, Counter>,
    latency: HistogramFamily<AgentLabel>,
    queue_wait: HistogramFamily<AgentLabel>,
    queue_depth: Family<AgentLabel, Gauge>,
    queue_oldest_age: Family<AgentLabel, Gauge<f64, AtomicU64>>,
    outbox_backlog: ScrapedGauge,
    retries: Family<AgentLabel, Counter>,
    dead_letters: Family<AgentLabel, Counter>,
    stale: Counter,
    breaker_state: Family<AgentLabel, Gauge>,
    breaker_held: Family<AgentLabel, Counter>,
    /// Agents this coordinator dispatched to or heard from: the queues whose depth it reads.
    /// By agent, the task queues besides its own two (of label sets) its tasks went to.
    agents: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordinatorMetrics {
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::default(),
            workflows: Family::default(),
            workflow_duration: Histogram::new(WORKFLOW_BUCKETS),
            active: ScrapedGauge::default(),
            executions: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(step_histogram),
            queue_wait: Family::new_with_constructor(step_histogram),
            queue_depth: Family::default(),
            queue_oldest_age: Family::default(),
            outbox_backlog: ScrapedGauge::default(),
            retries: Family::default(),
            dead_letters: Family::default(),
            stale: Counter::default(),
            breaker_state: Family::default(),
            breaker_held: Family::default(),
            agents: Mutex::new(BTreeMap::new()),
        };
        for status in FINAL_STATUSES {
            // Created at 0: the guard returned is only for reading it.
            drop(metrics.workflows.get_or_create(&StatusLabel { status }));
        }
        metrics.register()
    }

    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            WORKFLOWS,
            "Runs that ended, by final status",
            self.workflows.clone(),
        );
        r.register(
            WORKFLOWS_ACTIVE,
            "Runs not ended (running, paused or failing), counted in Postgres at scrape time",
            self.active.0.clone(),
        );
        r.register(
            WORKFLOW_DURATION,
            "Seconds from the creation of a run to its end",
            self.workflow_duration.clone(),
        );
        r.register(
            AGENT_EXECUTIONS,
            "Attempts that ended, by agent",
            self.executions.clone(),
        );
        r.register(
            AGENT_ERRORS,
            "Attempts that ended in failure (including lease expiries, timeouts and dead letters), by agent",
            self.errors.clone(),
        );
        r.register(
            AGENT_LATENCY,
            "Seconds an attempt ran on its worker, as the worker reported it, by agent",
            self.latency.clone(),
        );
        r.register(
            QUEUE_WAIT,
            "Seconds from the dispatch of a task to the start its worker reported, by agent",
            self.queue_wait.clone(),
        );
        r.register(
            QUEUE_DEPTH,
            "Ready messages in each agent queue, read from RabbitMQ at scrape time",
            self.queue_depth.clone(),
        );
        r.register(
            QUEUE_OLDEST_AGE,
            "Seconds the oldest attempt dispatched to each agent and not yet started by a worker has waited, read from Postgres at scrape time",
            self.queue_oldest_age.clone(),
        );
        r.register(
            OUTBOX_BACKLOG,
            "Committed messages not yet confirmed by RabbitMQ, counted in Postgres at scrape time",
            self.outbox_backlog.0.clone(),
        );
        r.register(
            RETRIES,
            "Attempts dispatched after the first one of their step, by agent",
            self.retries.clone(),
        );
        r.register(
            DEAD_LETTERS,
            "Tasks RabbitMQ dead-lettered, by agent",
            self.dead_letters.clone(),
        );
        r.register(
            STALE_RESULTS,
            "Results and timers ignored because they no longer match their step's current attempt",
            self.stale.clone(),
        );
        r.register(
            BREAKER_STATE,
            "Each agent's circuit breaker: 0 closed, 1 half-open, 2 open; read from Postgres at scrape time",
            self.breaker_state.clone(),
        );
        r.register(
            BREAKER_HELD,
            "Steps an open circuit breaker held instead of dispatching them, by agent",
            self.breaker_held.clone(),
        );
        register_spans_dropped(r);
        self
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        // Inserts only: the map is consistent even if a holder panicked.
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers `agent` as one whose queue depth to read, up to [`MAX_QUEUE_GAUGES`] agents.
    pub fn agent_seen(&self, agent: &str) {
        let mut agents = self.agents();
        if agents.len() < MAX_QUEUE_GAUGES && !agents.contains_key(agent) {
            agents.insert(agent.to_owned(), BTreeSet::new());
        }
    }

    /// The agents whose queue depth to read, in name order, each with the queues of label sets
    /// its tasks went to (up to [`MAX_QUEUE_GAUGES`] an agent).
    pub fn known_agents(&self) -> Vec<(String, Vec<String>)> {
        self.agents()
            .iter()
            .map(|(agent, queues)| (agent.clone(), queues.iter().cloned().collect()))
            .collect()
    }

    /// A run ended with `status` (`success`, `failure` or `cancelled`) after `duration`.
    pub fn run_ended(&self, status: &'static str, duration: Duration) {
        self.workflows.get_or_create(&StatusLabel { status }).inc();
        self.workflow_duration.observe(seconds(duration));
    }

    /// An attempt of a step of `agent` ended. `ran` is how long its worker says it ran and
    /// `waited` how long its task waited for a worker, when known.
    pub fn attempt_ended(
        &self,
        agent: &str,
        success: bool,
        ran: Option<Duration>,
        waited: Option<Duration>,
    ) {
        self.agent_seen(agent);
        let label = AgentLabel::of(agent);
        self.executions.get_or_create(&label).inc();
        if !success {
            self.errors.get_or_create(&label).inc();
        }
        if let Some(ran) = ran {
            self.latency.get_or_create(&label).observe(seconds(ran));
        }
        if let Some(waited) = waited {
            self.queue_wait
                .get_or_create(&label)
                .observe(seconds(waited));
        }
    }

    /// A task of `agent` was dispatched, to `label_queue` when its step asked for labels;
    /// `attempt` counts from 1.
    pub fn dispatched(&self, agent: &str, attempt: u32, label_queue: Option<&str>) {
        self.agent_seen(agent);
        if let Some(queue) = label_queue
            && let Some(queues) = self.agents().get_mut(agent)
            && queues.len() < MAX_QUEUE_GAUGES
        {
            queues.insert(queue.to_owned());
        }
        if attempt > 1 {
            self.retries.get_or_create(&AgentLabel::of(agent)).inc();
        }
    }

    /// RabbitMQ dead-lettered a task of `agent` (`None`: the message was not a readable task).
    pub fn dead_lettered(&self, agent: Option<&str>) {
        self.dead_letters
            .get_or_create(&AgentLabel::of(agent.unwrap_or("")))
            .inc();
    }

    /// A result or timer was ignored because it no longer matched its step's attempt.
    pub fn stale_ignored(&self) {
        self.stale.inc();
    }

    /// A step of `agent` was held by its open circuit breaker.
    pub fn held(&self, agent: &str) {
        self.breaker_held
            .get_or_create(&AgentLabel::of(agent))
            .inc();
    }

    /// Sets the breaker state gauges (0 closed, 1 half-open, 2 open) to `states`, forgetting
    /// agents not in it; `None` (Postgres did not answer) leaves them out of the output.
    pub fn set_breaker_states(&self, states: Option<&[(String, i64)]>) {
        self.breaker_state.clear();
        for (agent, state) in states.unwrap_or_default() {
            self.breaker_state
                .get_or_create(&AgentLabel::of(agent))
                .set(*state);
        }
    }

    /// Sets the queue depth gauges to `depths`, forgetting agents not in it.
    pub fn set_queue_depths(&self, depths: &[(String, u32)]) {
        self.queue_depth.clear();
        for (agent, depth) in depths {
            self.queue_depth
                .get_or_create(&AgentLabel::of(agent))
                .set(i64::from(*depth));
        }
    }

    /// Sets the oldest-wait gauges to `ages`, forgetting agents not in it; `None` (Postgres did
    /// not answer) leaves them all out.
    pub fn set_queue_oldest_ages(&self, ages: Option<&[(String, Duration)]>) {
        self.queue_oldest_age.clear();
        for (agent, age) in ages.unwrap_or_default() {
            self.queue_oldest_age
                .get_or_create(&AgentLabel::of(agent))
                .set(seconds(*age));
        }
    }

    /// Sets the outbox backlog; `None` (Postgres did not answer) leaves it out of the output.
    pub fn set_outbox_backlog(&self, messages: Option<i64>) {
        self.outbox_backlog.set(messages);
    }

    /// Sets the count of runs not ended; `None` (Postgres did not answer) leaves it out of the
    /// output.
    pub fn set_active_runs(&self, runs: Option<i64>) {
        self.active.set(runs);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// A worker's metrics.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    tasks: Family<TaskLabels, Counter>,
    failed: Family<TaskLabels, Counter>,
    in_flight: Family<TaskLabels, Gauge>,
    duration: HistogramFamily<TaskLabels>,
}

/// The count is the process's: spans of all its coordinators or workers share one exporter.
fn register_spans_dropped(registry: &mut Registry) {
    registry.register(
        SPANS_DROPPED,
        "Trace spans dropped, past the export queue or in a failed export",
        crate::trace::dropped_spans(),
    );
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
            tasks: Family::default(),
            failed: Family::default(),
            in_flight: Family::default(),
            duration: Family::new_with_constructor(step_histogram),
        };
        let r = &mut metrics.registry;
        r.register(
            WORKER_TASKS,
            "Tasks this worker ran to their end, by agent and action",
            metrics.tasks.clone(),
        );
        r.register(
            WORKER_TASKS_FAILED,
            "Tasks this worker ran that failed, by agent and action",
            metrics.failed.clone(),
        );
        r.register(
            WORKER_TASKS_IN_FLIGHT,
            "Tasks running on this worker now, by agent and action",
            metrics.in_flight.clone(),
        );
        r.register(
            WORKER_TASK_DURATION,
            "Seconds the handler of a task ran, by agent and action",
            metrics.duration.clone(),
        );
        register_spans_dropped(r);
        metrics
    }

    /// Counts a task of `agent` and `action` as in flight until the returned guard is finished
    /// or dropped (a task abandoned at shutdown is dropped without an outcome).
    pub fn task_started(&self, agent: &str, action: &str) -> InFlight<'_> {
        let labels = TaskLabels {
            agent: agent.to_owned(),
            action: action.to_owned(),
        };
        self.in_flight.get_or_create(&labels).inc();
        InFlight {
            metrics: self,
            labels,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// A task counted in flight; see [`WorkerMetrics::task_started`].
#[must_use = "the task counts as in flight until this is finished or dropped"]
#[derive(Debug)]
pub struct InFlight<'a> {
    metrics: &'a WorkerMetrics,
    labels: TaskLabels,
}

impl InFlight<'_> {
    /// The handler ended after `ran`, successfully or not.
    pub fn finish(self, success: bool, ran: Duration) {
        let m = self.metrics;
        m.tasks.get_or_create(&self.labels).inc();
        if !success {
            m.failed.get_or_create(&self.labels).inc();
        }
        m.duration.get_or_create(&self.labels).observe(seconds(ran));
        // `Drop` takes it out of the in-flight gauge.
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.get_or_create(&self.labels).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `series` (name and labels exactly as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn coordinator_metrics_render_the_spec_names() {
        let m = CoordinatorMetrics::new();
        m.run_ended("success", Duration::from_millis(1500));
        m.dispatched("agent1", 1, None);
        m.dispatched("agent1", 2, Some("f.agent.agent1@gpu=true"));
        m.attempt_ended(
            "agent1",
            false,
            Some(Duration::from_millis(20)),
            Some(Duration::from_millis(3)),
        );
        m.attempt_ended("agent1", true, None, None);
        m.dead_lettered(Some("agent1"));
        m.stale_ignored();
        m.set_outbox_backlog(Some(4));
        m.set_active_runs(Some(2));
        m.set_queue_depths(&[("agent1".into(), 7)]);
        m.held("agent1");
        m.set_breaker_states(Some(&[("agent1".into(), 2)]));
        let text = m.render();

        for (series, value) in [
            ("orchestrator_workflows_total{status=\"success\"}", 1.0),
            ("orchestrator_workflows_total{status=\"failure\"}", 0.0),
            ("orchestrator_workflows_total{status=\"cancelled\"}", 0.0),
            ("orchestrator_workflow_duration_seconds_count", 1.0),
            ("orchestrator_workflow_duration_seconds_sum", 1.5),
            ("orchestrator_workflows_active", 2.0),
            ("orchestrator_agent_executions_total{agent=\"agent1\"}", 2.0),
            ("orchestrator_agent_errors_total{agent=\"agent1\"}", 1.0),
            (
                "orchestrator_agent_latency_seconds_count{agent=\"agent1\"}",
                1.0,
            ),
            (
                "orchestrator_queue_wait_seconds_count{agent=\"agent1\"}",
                1.0,
            ),
            ("orchestrator_retries_total{agent=\"agent1\"}", 1.0),
            ("orchestrator_dead_letters_total{agent=\"agent1\"}", 1.0),
            ("orchestrator_stale_results_total", 1.0),
            ("orchestrator_outbox_backlog", 4.0),
            ("orchestrator_queue_depth{agent=\"agent1\"}", 7.0),
            ("orchestrator_breaker_state{agent=\"agent1\"}", 2.0),
            (
                "orchestrator_breaker_held_steps_total{agent=\"agent1\"}",
                1.0,
            ),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(
            text.contains("# TYPE orchestrator_agent_latency_seconds histogram"),
            "{text}"
        );
    }

    #[test]
    fn gauges_that_could_not_be_read_are_left_out() {
        let m = CoordinatorMetrics::new();
        m.set_outbox_backlog(Some(3));
        assert_eq!(
            sample(&m.render(), "orchestrator_outbox_backlog"),
            Some(3.0)
        );
        m.set_outbox_backlog(None);
        let text = m.render();
        assert_eq!(sample(&text, "orchestrator_outbox_backlog"), None, "{text}");
    }

    #[test]
    fn queue_oldest_ages_are_seconds_by_agent_and_forget_agents_no_longer_waiting() {
        let m = CoordinatorMetrics::new();
        m.set_queue_oldest_ages(Some(&[("a".into(), Duration::from_millis(2500))]));
        let series = "orchestrator_queue_oldest_age_seconds{agent=\"a\"}";
        assert_eq!(sample(&m.render(), series), Some(2.5));
        m.set_queue_oldest_ages(Some(&[]));
        assert_eq!(sample(&m.render(), series), None);
    }

    #[test]
    fn queue_depths_forget_agents_no_longer_read() {
        let m = CoordinatorMetrics::new();
        m.set_queue_depths(&[("a".into(), 1), ("b".into(), 2)]);
        m.set_queue_depths(&[("b".into(), 3)]);
        let text = m.render();
        assert_eq!(sample(&text, "orchestrator_queue_depth{agent=\"a\"}"), None);
        assert_eq!(
            sample(&text, "orchestrator_queue_depth{agent=\"b\"}"),
            Some(3.0)
        );
    }

    #[test]
    fn known_agents_are_bounded() {
        let m = CoordinatorMetrics::new();
        for n in 0..MAX_QUEUE_GAUGES + 10 {
            m.agent_seen(&format!("agent{n}"));
        }
        m.agent_seen("agent0");
        assert_eq!(m.known_agents().len(), MAX_QUEUE_GAUGES);
    }

    #[test]
    fn the_label_queues_an_agent_used_are_known() {
        let m = CoordinatorMetrics::new();
        m.dispatched("a", 1, None);
        m.dispatched("a", 1, Some("f.agent.a@gpu=true"));
        m.dispatched("a", 1, Some("f.agent.a@gpu=true"));
        assert_eq!(
            m.known_agents(),
            [("a".to_string(), vec!["f.agent.a@gpu=true".to_string()])]
        );
    }

    #[test]
    fn worker_tasks_leave_the_in_flight_gauge_however_they_end() {
        let m = WorkerMetrics::new();
        let labels = "{agent=\"echo\",action=\"run\"}";
        let running = m.task_started("echo", "run");
        let abandoned = m.task_started("echo", "run");
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                &format!("orchestrator_worker_tasks_in_flight{labels}")
            ),
            Some(2.0)
        );
        running.finish(false, Duration::from_millis(10));
        drop(abandoned);
        let text = m.render();
        for (name, value) in [
            ("orchestrator_worker_tasks_in_flight", 0.0),
            ("orchestrator_worker_tasks_total", 1.0),
            ("orchestrator_worker_tasks_failed_total", 1.0),
            ("orchestrator_worker_task_duration_seconds_count", 1.0),
        ] {
            assert_eq!(
                sample(&text, &format!("{name}{labels}")),
                Some(value),
                "{name} in\n{text}"
            );
        }
    }
}
