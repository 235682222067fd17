use std::sync::Arc;

use flotilla_proto::Task;
use serde_json::{Map, Value};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::log::StepLog;

/// What a handler gets: the task, where it came from, the span it runs in, whether it was
/// cancelled, and its step's log.
#[derive(Debug, Clone)]
pub struct TaskContext {
    task: Task,
    agent: Arc<str>,
    worker_id: Arc<str>,
    redelivered: bool,
    span: tracing::Span,
    cancel: CancellationToken,
    log: StepLog,
}

impl TaskContext {
    /// The worker builds the context of each task; build one yourself to unit-test a handler.
    /// The context's span is the current one.
    pub fn new(
        task: Task,
        agent: impl Into<Arc<str>>,
        worker_id: impl Into<Arc<str>>,
        redelivered: bool,
    ) -> Self {
        Self {
            task,
            agent: agent.into(),
            worker_id: worker_id.into(),
            redelivered,
            span: tracing::Span::current(),
            cancel: CancellationToken::new(),
            log: StepLog::default(),
        }
    }

    /// Makes `log` the step's log the handler writes to.
    #[must_use]
    pub fn with_log(mut self, log: StepLog) -> Self {
        self.log = log;
        self
    }

    /// The step's log: lines written to it are stored with the run, and shown by `flotilla
    /// workflows logs` while the step runs and after.
    pub fn log(&self) -> &StepLog {
        &self.log
    }

    /// Makes `cancel` the token whose cancellation tells the handler to stop.
    #[must_use]
    pub fn with_cancellation(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Completes when the coordinator asks to stop this attempt (its run was cancelled). A
    /// long handler should select on it and return an error: the worker then reports the
    /// attempt as cancelled.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether the coordinator asked to stop this attempt.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn task(&self) -> &Task {
        &self.task
    }

    pub fn into_task(self) -> Task {
        self.task
    }

    /// The step's own params.
    pub fn params(&self) -> &Map<String, Value> {
        &self.task.params
    }

    /// The run's params.
    pub fn run_params(&self) -> &Map<String, Value> {
        &self.task.run_params
    }

    /// Outputs of the steps this step depends on, by step id.
    pub fn inputs(&self) -> &Map<String, Value> {
        &self.task.inputs
    }

    pub fn action(&self) -> &str {
        &self.task.action
    }

    /// 1 for the first attempt.
    pub fn attempt(&self) -> u32 {
        self.task.attempt
    }

    /// The same for every attempt of this step in this run: key side effects on it to make them
    /// idempotent.
    pub fn idempotency_key(&self) -> &str {
        &self.task.idempotency_key
    }

    /// The agent whose queue the task came from.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// True when RabbitMQ delivered this task before, maybe to a worker that crashed while
    /// running it: the side effects of that run may already have happened.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// The task's `worker.task` span. The handler already runs in it, so its own spans are
    /// children of it; enter it in tasks the handler spawns.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The W3C `traceparent` to send in the headers of a request made for this task, so that
    /// the service called joins the run's trace; `None` when traces are not exported.
    pub fn traceparent(&self) -> Option<String> {
        flotilla_telemetry::trace::traceparent_of(&self.span)
    }

    /// The W3C `tracestate` to send with [`TaskContext::traceparent`]: the one the task
    /// arrived with.
    pub fn tracestate(&self) -> Option<String> {
        flotilla_telemetry::trace::tracestate_of(&self.span)
    }
}

/// Why a handler failed, and whether trying again could help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    /// False when retrying cannot help (bad params, unknown action): the step fails at once.
    pub retryable: bool,
}

impl HandlerError {
    /// A failure that may pass on another attempt (a timeout, a service that is down).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure that another attempt would repeat.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}
