//! The wire protocol between the coordinator and agent workers, defined once.
//!
//! Every message body is a JSON object whose `type` and `v` fields name its kind and version. The
//! JSON Schemas in `proto/schemas/` are the contract for workers written in any language; the
//! types here are tested against them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Version of the message format this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The JSON Schemas of the protocol, embedded so tools can serve them.
pub mod schemas {
    pub const TASK: &str = include_str!("../schemas/task.v1.json");
    pub const RESULT: &str = include_str!("../schemas/result.v1.json");
    pub const HEARTBEAT: &str = include_str!("../schemas/heartbeat.v1.json");
    pub const CANCEL: &str = include_str!("../schemas/cancel.v1.json");
    pub const REGISTRATION: &str = include_str!("../schemas/registration.v1.json");
    pub const DEREGISTRATION: &str = include_str!("../schemas/deregistration.v1.json");
    pub const LOG: &str = include_str!("../schemas/log.v1.json");
}

/// Queue and routing names, derived from one prefix so that several fleets (or tests) can share
/// a broker without seeing each other's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    prefix: String,
}

impl QueueNames {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The quorum queue that holds tasks for one agent; every worker of that agent consumes it.
    pub fn agent(&self, agent: &str) -> String {
        format!("{}.agent.{agent}", self.prefix)
    }

    /// The quorum queue that holds the tasks for `agent` of steps that ask for `labels` (keys
    /// and values of letters, digits, `_`, `-` and `.`), of `high` priority runs or not:
    /// `{prefix}.agent.{agent}`, then `@key=value,…` (keys in order) when there are labels,
    /// then `:high` for high priority. `@`, `,`, `=` and `:` appear in no agent name or label.
    pub fn tasks(&self, agent: &str, labels: &BTreeMap<String, String>, high: bool) -> String {
        let mut name = self.agent(agent);
        if !labels.is_empty() {
            name.push('@');
            let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            name.push_str(&pairs.join(","));
        }
        if high {
            name.push_str(":high");
        }
        name
    }

    /// Every task queue a worker of `agent` with `labels` consumes, as (queue, high): for each
    /// subset of its labels (the empty one, the agent's own queues, first), the high-priority
    /// queue and the normal one. A step is thus taken by every worker whose labels include the
    /// step's.
    pub fn worker_queues(
        &self,
        agent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<(String, bool)> {
        let pairs: Vec<(&String, &String)> = labels.iter().collect();
        let mut queues = Vec::new();
        for mask in 0..(1u32 << pairs.len()) {
            let subset: BTreeMap<String, String> = pairs
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, (k, v))| ((*k).clone(), (*v).clone()))
                .collect();
            for high in [true, false] {
                queues.push((self.tasks(agent, &subset, high), high));
            }
        }
        queues
    }

    /// The queue that carries results back to the coordinators.
    pub fn results(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// The queue that carries worker heartbeats, registrations and deregistrations to the
    /// coordinators.
    pub fn heartbeats(&self) -> String {
        format!("{}.heartbeats", self.prefix)
    }

    /// The queue that carries the lines handlers write to their step's log, apart from results so
    /// that a chatty step never delays them.
    pub fn logs(&self) -> String {
        format!("{}.logs", self.prefix)
    }

    /// The queue that collects tasks dead-lettered after too many deliveries.
    pub fn dead_letters(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The fanout exchange that carries control messages ([`Cancel`]) to every worker.
    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// The queue of one worker bound to [`QueueNames::control`]: exclusive to the worker's
    /// connection and deleted with it, since a control message matters only to the worker
    /// running its task now.
    pub fn control_queue(&self, worker_id: &str) -> String {
        format!("{}.control.{worker_id}", self.prefix)
    }
}

impl Default for QueueNames {
    fn default() -> Self {
        Self::new("flotilla")
    }
}

/// One attempt of one step, sent to the agent's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "task", deny_unknown_fields, remote = "Self")]
pub struct Task {
    pub v: u32,
    /// Unique per attempt: the fencing token a result must carry back.
    pub task_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    /// 1 for the first attempt, counting up with every retry or re-dispatch.
    pub attempt: u32,
    pub agent: String,
    pub action: String,
    /// Same for every attempt of one step in one run, so a handler can make its side effects
    /// idempotent.
    pub idempotency_key: String,
    /// The step's own params.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// The run's params (the definition's defaults overlaid with those given at submission).
    #[serde(default)]
    pub run_params: Map<String, Value>,
    /// Outputs of the steps this step depends on, by step id.
    #[serde(default)]
    pub inputs: Map<String, Value>,
    pub dispatched_at: DateTime<Utc>,
    /// The attempt's lease: a worker that lists it in no heartbeat for this long is taken as
    /// lost. When present, the worker heartbeats at least every third of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Acknowledge the task once it has started and a heartbeat listing it is confirmed, rather
    /// than at its end, so that a long task does not trip RabbitMQ's consumer timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack_early: bool,
}

/// How an attempt ended, as the worker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    Success,
    Failure,
    /// The worker stopped the attempt because a [`Cancel`] asked it to.
    Cancelled,
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskError {
    pub message: String,
    /// False when retrying cannot help (bad params, unknown action): the step fails at once.
    #[serde(default = "default_true")]
    pub retryable: bool,
}

fn default_true() -> bool {
    true
}

/// The outcome of one attempt, published by the worker to the results queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "result", deny_unknown_fields, remote = "Self")]
pub struct TaskResult {
    pub v: u32,
    pub task_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: u32,
    pub status: ResultStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// Identifies the worker process that ran the attempt.
    pub worker_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// A task a worker is holding, as reported in a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldTask {
    pub task_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: u32,
}

/// A worker's periodic sign of life, listing the tasks it is working on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename = "heartbeat",
    deny_unknown_fields,
    remote = "Self"
)]
pub struct Heartbeat {
    pub v: u32,
    pub worker_id: String,
    pub agents: Vec<String>,
    pub concurrency: u32,
    #[serde(default)]
    pub tasks: Vec<HeldTask>,
    pub sent_at: DateTime<Utc>,
}

/// A worker announcing itself to the coordinators' registry, published to the heartbeats queue
/// when it starts and again after each reconnect. Its heartbeats then keep it alive there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename = "registration",
    deny_unknown_fields,
    remote = "Self"
)]
pub struct Registration {
    pub v: u32,
    pub worker_id: String,
    pub agents: Vec<String>,
    /// The actions it has a handler for; empty when it answers every action (a fallback).
    #[serde(default)]
    pub actions: Vec<String>,
    /// What the worker is built with, e.g. `flotilla-worker/0.1.0` or `pika/1.3`.
    pub sdk: String,
    pub concurrency: u32,
    pub host: String,
    pub pid: u32,
    /// Free-form key/value pairs describing the worker (region, gpu...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub started_at: DateTime<Utc>,
    pub sent_at: DateTime<Utc>,
}

/// A worker saying goodbye as it stops gracefully, so that the registry forgets it at once
/// instead of waiting for its heartbeats to stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename = "deregistration",
    deny_unknown_fields,
    remote = "Self"
)]
pub struct Deregistration {
    pub v: u32,
    pub worker_id: String,
    pub sent_at: DateTime<Utc>,
}

/// Any message a worker publishes to [`QueueNames::heartbeats`].
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerMessage {
    Heartbeat(Heartbeat),
    Registration(Registration),
    Deregistration(Deregistration),
}

impl WorkerMessage {
    /// Reads a message of the heartbeats queue, whichever of its kinds the body's `type` names.
    pub fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Kind<'a> {
            #[serde(rename = "type", borrow)]
            kind: Option<std::borrow::Cow<'a, str>>,
        }
        match serde_json::from_slice::<Kind>(body)?.kind.as_deref() {
            Some("registration") => serde_json::from_slice(body).map(Self::Registration),
            Some("deregistration") => serde_json::from_slice(body).map(Self::Deregistration),
            // Reading it as a heartbeat names whatever else is wrong with it.
            _ => serde_json::from_slice(body).map(Self::Heartbeat),
        }
    }
}

/// Asks the worker running an attempt to stop it, because its run was cancelled. Broadcast on
/// the [`QueueNames::control`] exchange; a worker not running `task_id` ignores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "cancel", deny_unknown_fields, remote = "Self")]
pub struct Cancel {
    pub v: u32,
    pub task_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: u32,
    /// Why, for the worker's log and the handler.
    pub reason: String,
    pub sent_at: DateTime<Utc>,
}

/// Which stream of a step's log a line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// One line of a step's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    /// 1 for the first line of an execution, counting up: with `execution_id`, what makes a
    /// line stored once however often its batch is delivered.
    pub seq: u64,
    pub stream: LogStream,
    /// The line's text, without its line break.
    pub line: String,
    /// When the handler wrote it.
    pub at: DateTime<Utc>,
}

/// Lines a handler wrote to its step's log, published in batches to [`QueueNames::logs`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "log", deny_unknown_fields, remote = "Self")]
pub struct LogBatch {
    pub v: u32,
    pub task_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: u32,
    pub worker_id: String,
    /// Names one execution of the attempt: RabbitMQ may give a task whose worker was lost to
    /// another worker, which runs the same attempt again and numbers its lines from 1 too.
    pub execution_id: Uuid,
    pub lines: Vec<LogLine>,
    pub sent_at: DateTime<Utc>,
}

// The derives above use `remote = "Self"` so that they generate inherent `serialize` and
// `deserialize` functions instead of trait impls; the trait impls below wrap them. serde's derive
// alone gets tagged structs wrong both ways: with `tag` and `deny_unknown_fields` together it
// rejects the very `type` field it writes, and without `deny_unknown_fields` it accepts a document
// with no `type` at all.
macro_rules! tagged_message {
    ($ty:ident, $tag:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                $ty::serialize(self, serializer)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserialize_tagged(deserializer, $tag, |body| $ty::deserialize(body))
            }
        }
    };
}

tagged_message!(Task, "task");
tagged_message!(TaskResult, "result");
tagged_message!(Heartbeat, "heartbeat");
tagged_message!(Cancel, "cancel");
tagged_message!(Registration, "registration");
tagged_message!(Deregistration, "deregistration");
tagged_message!(LogBatch, "log");

/// Checks and removes the `type` field, then reads the remaining fields strictly with `body`.
fn deserialize_tagged<'de, D, T>(
    deserializer: D,
    tag: &'static str,
    body: fn(Value) -> Result<T, serde_json::Error>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    use serde::de::Error as _;

    let mut fields = Map::<String, Value>::deserialize(deserializer)?;
    match fields.remove("type") {
        Some(Value::String(found)) if found == tag => {}
        Some(found) => {
            return Err(D::Error::custom(format_args!(
                "expected message type `{tag}`, found {found}"
            )));
        }
        None => return Err(D::Error::missing_field("type")),
    }
    body(Value::Object(fields)).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_consumes_the_queues_of_every_subset_of_its_labels() {
        let names = QueueNames::new("f");
        let labels: BTreeMap<String, String> = [("region", "eu"), ("gpu", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            names.tasks("render", &BTreeMap::new(), false),
            "f.agent.render"
        );
        assert_eq!(
            names.tasks("render", &labels, true),
            "f.agent.render@gpu=true,region=eu:high"
        );
        let normal: Vec<String> = names
            .worker_queues("render", &labels)
            .into_iter()
            .filter(|(_, high)| !high)
            .map(|(queue, _)| queue)
            .collect();
        assert_eq!(
            normal,
            [
                "f.agent.render",
                "f.agent.render@gpu=true",
                "f.agent.render@region=eu",
                "f.agent.render@gpu=true,region=eu"
            ]
        );
        assert_eq!(
            names.worker_queues("render", &BTreeMap::new()),
            [
                ("f.agent.render:high".to_string(), true),
                ("f.agent.render".to_string(), false)
            ]
        );
    }
}
