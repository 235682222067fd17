//! The Flotilla worker SDK: serve agent actions from RabbitMQ with bounded concurrency and
//! graceful shutdown.
//!
//! ```no_run
//! use flotilla_worker::{HandlerError, TaskContext, Worker, WorkerConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! async fn scaffold(ctx: TaskContext) -> Result<serde_json::Value, HandlerError> {
//!     let name = ctx.params().get("name").and_then(|v| v.as_str())
//!         .ok_or_else(|| HandlerError::fatal("param `name` is required"))?;
//!     Ok(serde_json::json!({ "created": name }))
//! }
//!
//! # async fn example() -> Result<(), flotilla_worker::Error> {
//! let worker = Worker::builder(WorkerConfig::default())
//!     .agent("agent6")
//!     .action("scaffold_project", scaffold)
//!     .build();
//! worker.run(CancellationToken::new()).await
//! # }
//! ```
//!
//! How a task is handled:
//!
//! - Each agent has a queue and a `:high` twin for high-priority runs, and one more pair per
//!   non-empty subset of the worker's labels (`QueueNames::worker_queues`); it consumes all of
//!   them with manual acks, and a semaphore shared by all agents caps the tasks running at once
//!   at `concurrency`. A task of a `:high` queue gets the next free slot before any other.
//! - A body that is not a valid task is nacked without requeue, so the queue dead-letters it
//!   instead of redelivering it forever.
//! - The handler runs in a task of its own; a panic becomes a failure result.
//! - The result goes to the task's `reply_to` queue with a publisher confirm, and only then is
//!   the task acked. If the result cannot be published the task is requeued and runs again: the
//!   coordinator fences results by task id and attempt, so duplicates are harmless.
//! - What a handler writes to its step's log ([`TaskContext::log`]) goes to `{prefix}.logs` in
//!   batches while it runs (every 200 ms, or sooner once 256 lines wait), and the last batch
//!   before the result, each line numbered so that the coordinator stores it once.
//! - `${{ secrets.NAME }}` in a task's params is replaced, before the handler runs, by the
//!   value of `FLOTILLA_SECRET_<NAME>` or of the file `NAME` in `secrets_dir`; a secret set
//!   nowhere fails the task (not retryable). The values are replaced by `***` in the output,
//!   the error and the step log the worker sends back.
//! - Heartbeats listing the tasks in progress go to `{prefix}.heartbeats` every
//!   `heartbeat_interval`.
//! - Each task runs in a `worker.task` span. In a binary that started telemetry with
//!   `flotilla_telemetry::init`, it joins the run's trace as a child of the attempt span named by
//!   the task's `traceparent` header (keeping its `tracestate`); [`TaskContext::span`],
//!   [`TaskContext::traceparent`] and [`TaskContext::tracestate`] let a handler's own work and
//!   outgoing calls join it too.
//! - With [`WorkerBuilder::serve_health`], `/health/live`, `/health/ready` and `/metrics` are
//!   served on an address of its own.
//!
//! When the connection (or a consumer's channel) is lost, [`Worker::run`] goes on: it stops
//! taking tasks, reconnects with backoff, declares its queues again and resumes. Tasks running
//! meanwhile finish, and their results are published on the new connection; their deliveries
//! died with the old one and are not acked (RabbitMQ requeued them). When such a task comes
//! back while its first run is still in progress here, that run settles the new delivery too
//! instead of running the task again. Anywhere else, it runs again, and the coordinator, which
//! fences results by task id and attempt, counts only the first result.

#[cfg(feature = "cli")]
pub mod cli;
mod context;
mod health;
mod log;
mod secrets;
mod worker;

use std::time::Duration;

pub use context::{HandlerError, TaskContext};
pub use flotilla_proto::LogStream;
pub use log::{MAX_LINE_BYTES, StepLog};
pub use secrets::{ENV_PREFIX as SECRET_ENV_PREFIX, MASK as SECRET_MASK};
pub use worker::{Worker, WorkerBuilder};

/// How a worker reaches RabbitMQ and how it runs tasks.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// `amqp://user:password@host:port/vhost`; never logged with its password.
    pub amqp_url: String,
    /// Prefix of the queue names; the coordinator must use the same.
    pub prefix: String,
    /// How many tasks run at once at most, across all agents. Also the prefetch of each agent
    /// queue, so at most 65535.
    pub concurrency: usize,
    /// Names this process in results and heartbeats; `None` means `{host}-{pid}-{random}`.
    pub worker_id: Option<String>,
    pub heartbeat_interval: Duration,
    /// How long a shutdown waits for tasks in progress before leaving them to be redelivered.
    pub shutdown_grace: Duration,
    /// Where `${{ secrets.NAME }}` is read from when `FLOTILLA_SECRET_<NAME>` is not set: the
    /// file `NAME` of this directory.
    pub secrets_dir: Option<std::path::PathBuf>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let broker = flotilla_broker::BrokerConfig::default();
        Self {
            amqp_url: broker.url,
            prefix: broker.prefix,
            concurrency: 16,
            worker_id: None,
            heartbeat_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            secrets_dir: None,
        }
    }
}

// By hand so that the password never reaches a log through `{:?}`.
impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("amqp_url", &flotilla_core::redact_url(&self.amqp_url))
            .field("prefix", &self.prefix)
            .field("concurrency", &self.concurrency)
            .field("worker_id", &self.worker_id)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("secrets_dir", &self.secrets_dir)
            .finish()
    }
}

/// Why [`Worker::run`] could not start. Once started, it stops only when asked to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid worker config: {0}")]
    Config(String),
    /// RabbitMQ could not be reached or refused the connection.
    #[error(transparent)]
    Connect(flotilla_broker::Error),
    /// RabbitMQ refused to declare or consume the worker's queues, e.g. because they exist
    /// with another delivery limit.
    #[error(transparent)]
    Broker(#[from] flotilla_broker::Error),
    /// The address given to [`WorkerBuilder::serve_health`] cannot be listened on.
    #[error("cannot serve health and metrics on {addr}: {source}")]
    Health {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_does_not_show_the_password() {
        let config = WorkerConfig {
            amqp_url: "amqp://app:hunter2@rabbit:5672/%2f".into(),
            ..WorkerConfig::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
