use std::{
    any::Any,
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::Utc;
use flotilla_broker::{
    BrokerConfig, Connection, Consumer, Delivery, OutgoingMessage, Publisher, QueueNames,
    declare_topology,
};
use flotilla_proto::{
    Heartbeat, HeldTask, PROTOCOL_VERSION, ResultStatus, Task, TaskError, TaskResult,
};
use futures_util::future::join_all;
use serde_json::Value;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
    time::MissedTickBehavior,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::{Error, HandlerError, TaskContext, WorkerConfig};

/// Span name of the handling of one task.
const TASK_SPAN: &str = "worker.task";

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;
type BoxedHandler = Arc<dyn Fn(TaskContext) -> HandlerFuture + Send + Sync>;

fn boxed<H, F>(handler: H) -> BoxedHandler
where
    H: Fn(TaskContext) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Value, HandlerError>> + Send + 'static,
{
    Arc::new(move |ctx| Box::pin(handler(ctx)))
}

/// Assembles a [`Worker`]: the agents it serves and a handler per action.
pub struct WorkerBuilder {
    config: WorkerConfig,
    agents: Vec<String>,
    handlers: HashMap<String, BoxedHandler>,
    fallback: Option<BoxedHandler>,
    broker: BrokerConfig,
}

impl WorkerBuilder {
    /// Serves the queue of `agent` too. Repeatable.
    #[must_use]
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        let agent = agent.into();
        if !self.agents.contains(&agent) {
            self.agents.push(agent);
        }
        self
    }

    /// Answers tasks whose action is `action` with `handler`, whichever agent they are for.
    /// Registering the same action again replaces its handler.
    #[must_use]
    pub fn action<H, F>(mut self, action: impl Into<String>, handler: H) -> Self
    where
        H: Fn(TaskContext) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        self.handlers.insert(action.into(), boxed(handler));
        self
    }

    /// Answers every action that has no handler of its own. Without one, such tasks fail at once
    /// with a non-retryable error.
    #[must_use]
    pub fn fallback<H, F>(mut self, handler: H) -> Self
    where
        H: Fn(TaskContext) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        self.fallback = Some(boxed(handler));
        self
    }

    /// How long connecting to RabbitMQ may take (default 10 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.broker.connect_timeout = timeout;
        self
    }

    /// The `x-delivery-limit` of the agent queues (default 5); it must match the coordinator's.
    #[must_use]
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.broker.delivery_limit = limit;
        self
    }

    pub fn build(self) -> Worker {
        let worker_id = self
            .config
            .worker_id
            .clone()
            .unwrap_or_else(default_worker_id);
        Worker {
            worker_id: worker_id.into(),
            broker: BrokerConfig {
                url: self.config.amqp_url.clone(),
                prefix: self.config.prefix.clone(),
                ..self.broker
            },
            config: self.config,
            agents: self.agents,
            handlers: self.handlers,
            fallback: self.fallback,
        }
    }
}

/// Serves agent actions from RabbitMQ until told to stop. See the crate docs.
pub struct Worker {
    config: WorkerConfig,
    worker_id: Arc<str>,
    agents: Vec<String>,
    handlers: HashMap<String, BoxedHandler>,
    fallback: Option<BoxedHandler>,
    broker: BrokerConfig,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut actions: Vec<&String> = self.handlers.keys().collect();
        actions.sort();
        f.debug_struct("Worker")
            .field("worker_id", &self.worker_id)
            .field("agents", &self.agents)
            .field("actions", &actions)
            .field("fallback", &self.fallback.is_some())
            .field("config", &self.config)
            .finish()
    }
}

impl Worker {
    pub fn builder(config: WorkerConfig) -> WorkerBuilder {
        WorkerBuilder {
            config,
            agents: Vec::new(),
            handlers: HashMap::new(),
            fallback: None,
            broker: BrokerConfig::default(),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Runs until `shutdown` is cancelled, then drains: stops taking tasks, gives back those
    /// received but not started, lets the running ones finish and report within
    /// `shutdown_grace`, and closes the connection. Returns `Ok` after a shutdown request, and an
    /// error if RabbitMQ is unreachable at start or the connection is lost.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let prefetch = self.validate()?;
        let connection_name = format!("flotilla-worker {}", self.worker_id);
        let connection = flotilla_broker::connect(&self.broker, &connection_name)
            .await
            .map_err(Error::Connect)?;
        let outcome = self.serve(&connection, prefetch, shutdown).await;
        if let Err(error) = connection.close().await {
            warn!(%error, "could not close the rabbitmq connection");
        }
        if outcome.is_ok() {
            info!(worker_id = %self.worker_id, "worker stopped");
        }
        outcome
    }

    /// Checks the config, returning the prefetch to use.
    fn validate(&self) -> Result<u16, Error> {
        if self.agents.is_empty() {
            return Err(Error::Config("no agent to serve".into()));
        }
        let prefetch = u16::try_from(self.config.concurrency)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::Config(format!(
                    "concurrency must be between 1 and {}, not {}",
                    u16::MAX,
                    self.config.concurrency
                ))
            })?;
        if self.config.heartbeat_interval.is_zero() {
            return Err(Error::Config("heartbeat interval must not be zero".into()));
        }
        Ok(prefetch)
    }

    async fn serve(
        &self,
        connection: &Connection,
        prefetch: u16,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let names = QueueNames::new(self.config.prefix.clone());
        let channel = connection.open_channel().await?;
        declare_topology(&channel, &names, &self.agents, self.broker.delivery_limit).await?;
        channel.close().await?;

        let shared = Arc::new(Shared {
            worker_id: self.worker_id.clone(),
            names,
            handlers: self.handlers.clone(),
            fallback: self.fallback.clone(),
            publisher: Publisher::new(connection).await?,
            slots: Arc::new(Semaphore::new(usize::from(prefetch))),
            held: Mutex::new(BTreeMap::new()),
        });
        let mut consumers = Vec::with_capacity(self.agents.len());
        for agent in &self.agents {
            let queue = shared.names.agent(agent);
            let tag = format!("{}.{agent}", self.worker_id);
            let consumer = Consumer::start(connection, &queue, &tag, prefetch).await?;
            consumers.push((Arc::<str>::from(agent.as_str()), consumer));
        }
        info!(
            worker_id = %self.worker_id,
            agents = %self.agents.join(","),
            concurrency = prefetch,
            prefix = %shared.names.prefix(),
            "worker started"
        );

        // Stops the intake on a shutdown request, or when one consumer fails.
        let intake_stop = shutdown.child_token();
        // Drops the tasks in progress when they may not finish (grace expired, connection lost).
        let abandon = CancellationToken::new();
        let running = TaskTracker::new();
        let heartbeats = AbortOnDrop(tokio::spawn(send_heartbeats(
            shared.clone(),
            self.agents.clone(),
            u32::from(prefetch),
            self.config.heartbeat_interval,
        )));

        let intakes = consumers.into_iter().map(|(agent, consumer)| {
            intake(agent, consumer, &shared, &running, &intake_stop, &abandon)
        });
        let (consumers, outcomes): (Vec<Consumer>, Vec<Result<(), Error>>) =
            join_all(intakes).await.into_iter().unzip();
        let outcome = outcomes.into_iter().collect::<Result<(), Error>>();

        running.close();
        if outcome.is_ok() {
            info!(in_progress = running.len(), "draining tasks in progress");
            if tokio::time::timeout(self.config.shutdown_grace, running.wait())
                .await
                .is_err()
            {
                warn!(
                    in_progress = running.len(),
                    grace = ?self.config.shutdown_grace,
                    "shutdown grace expired; abandoning tasks in progress, rabbitmq will redeliver them"
                );
            }
        }
        abandon.cancel();
        running.wait().await;
        drop(heartbeats);

        for consumer in &consumers {
            if let Err(error) = consumer.close().await {
                warn!(queue = consumer.queue(), %error, "could not close consumer");
            }
        }
        if let Err(error) = shared.publisher.close().await {
            warn!(%error, "could not close publisher channels");
        }
        outcome
    }
}

/// State shared by the intake loops, the task runners and the heartbeats.
struct Shared {
    worker_id: Arc<str>,
    names: QueueNames,
    handlers: HashMap<String, BoxedHandler>,
    fallback: Option<BoxedHandler>,
    publisher: Publisher,
    /// One permit per task that may run at once, across all agents.
    slots: Arc<Semaphore>,
    /// The tasks in progress, reported in heartbeats.
    held: Mutex<BTreeMap<Uuid, HeldTask>>,
}

impl Shared {
    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, HeldTask>> {
        // Inserts and removes only: the map is consistent even if a holder panicked.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Takes deliveries from one agent's queue and starts a task runner for each, until stopped.
/// Returns the consumer, whose channel must stay open until the runners have acked.
async fn intake(
    agent: Arc<str>,
    mut consumer: Consumer,
    shared: &Arc<Shared>,
    running: &TaskTracker,
    stop: &CancellationToken,
    abandon: &CancellationToken,
) -> (Consumer, Result<(), Error>) {
    let mut outcome = take_deliveries(&agent, &mut consumer, shared, running, stop, abandon).await;
    if outcome.is_ok() {
        outcome = give_back_prefetched(&mut consumer).await;
    }
    if let Err(error) = &outcome {
        error!(%agent, %error, "stopping the worker");
        // Without this consumer the worker would serve its other agents only.
        stop.cancel();
        abandon.cancel();
    }
    (consumer, outcome)
}

async fn take_deliveries(
    agent: &Arc<str>,
    consumer: &mut Consumer,
    shared: &Arc<Shared>,
    running: &TaskTracker,
    stop: &CancellationToken,
    abandon: &CancellationToken,
) -> Result<(), Error> {
    loop {
        let delivery = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Err(Error::ConsumerLost {
                    queue: consumer.queue().to_owned(),
                    reason: error.to_string(),
                }),
                None => return Err(Error::ConsumerLost {
                    queue: consumer.queue().to_owned(),
                    reason: "rabbitmq cancelled the consumer".into(),
                }),
            },
        };
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => {
                requeue(&delivery).await;
                return Ok(());
            }
            permit = shared.slots.clone().acquire_owned() => {
                permit.expect("the worker never closes its semaphore")
            }
        };
        let task = handle_delivery(delivery, agent.clone(), shared.clone(), permit);
        let abandon = abandon.clone();
        running.spawn(async move {
            tokio::select! {
                biased;
                () = abandon.cancelled() => {}
                () = task => {}
            }
        });
    }
}

/// Stops the broker from sending more and requeues what it had already sent.
async fn give_back_prefetched(consumer: &mut Consumer) -> Result<(), Error> {
    consumer.cancel().await?;
    // After `basic.cancel-ok` the stream ends; nothing arrives after it.
    while let Some(next) = consumer.next().await {
        requeue(&next?).await;
    }
    Ok(())
}

async fn requeue(delivery: &Delivery) {
    if let Err(error) = delivery.nack(true).await {
        warn!(routing_key = %delivery.routing_key, %error, "could not requeue a task");
    }
}

/// Runs one delivery to its end: decode, handle, publish the result, ack.
async fn handle_delivery(
    delivery: Delivery,
    agent: Arc<str>,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
) {
    let task: Task = match serde_json::from_slice(&delivery.body) {
        Ok(task) => task,
        Err(error) => {
            error!(
                routing_key = %delivery.routing_key,
                %agent,
                redelivered = delivery.redelivered,
                %error,
                "undecodable task; dead-lettering it"
            );
            if let Err(error) = delivery.nack(false).await {
                warn!(routing_key = %delivery.routing_key, %error, "could not dead-letter a task");
            }
            return;
        }
    };
    let span = info_span!(
        TASK_SPAN,
        run_id = %task.run_id,
        step_id = %task.step_id,
        attempt = task.attempt,
        task_id = %task.task_id,
        %agent,
        action = %task.action,
    );
    run_task(delivery, task, agent, shared)
        .instrument(span)
        .await;
}

async fn run_task(delivery: Delivery, task: Task, agent: Arc<str>, shared: Arc<Shared>) {
    shared.held().insert(
        task.task_id,
        HeldTask {
            task_id: task.task_id,
            run_id: task.run_id,
            step_id: task.step_id.clone(),
            attempt: task.attempt,
        },
    );
    let started_at = Utc::now();
    debug!(redelivered = delivery.redelivered, "task started");
    let outcome = call_handler(&shared, &agent, &task, delivery.redelivered).await;
    let finished_at = Utc::now();
    let duration_ms = (finished_at - started_at).num_milliseconds();
    let (status, output, error) = match outcome {
        Ok(output) => {
            info!(duration_ms, "task succeeded");
            (ResultStatus::Success, Some(output), None)
        }
        Err(failure) => {
            info!(
                duration_ms,
                error = %failure.message,
                retryable = failure.retryable,
                "task failed"
            );
            let error = TaskError {
                message: failure.message,
                retryable: failure.retryable,
            };
            (ResultStatus::Failure, None, Some(error))
        }
    };
    let result = TaskResult {
        v: PROTOCOL_VERSION,
        task_id: task.task_id,
        run_id: task.run_id,
        step_id: task.step_id,
        attempt: task.attempt,
        status,
        output,
        error,
        worker_id: shared.worker_id.to_string(),
        started_at,
        finished_at,
    };
    let reply_to = delivery
        .reply_to
        .clone()
        .filter(|queue| !queue.is_empty())
        .unwrap_or_else(|| shared.names.results());
    let body = serde_json::to_vec(&result).expect("a TaskResult always serializes to JSON");
    let message = OutgoingMessage::new(&reply_to, "result", body)
        .with_correlation_id(task.task_id.to_string());

    match shared.publisher.publish_one(&message).await {
        Ok(()) => {
            if let Err(error) = delivery.ack().await {
                warn!(%error, "could not ack a task whose result is published; it will run again");
            }
        }
        Err(error) => {
            error!(%reply_to, %error, "could not publish a result; requeueing the task");
            requeue(&delivery).await;
        }
    }
    shared.held().remove(&task.task_id);
}

async fn call_handler(
    shared: &Shared,
    agent: &Arc<str>,
    task: &Task,
    redelivered: bool,
) -> Result<Value, HandlerError> {
    let Some(handler) = shared
        .handlers
        .get(&task.action)
        .or(shared.fallback.as_ref())
    else {
        return Err(HandlerError::fatal(format!(
            "no handler for action `{}` of agent `{agent}` on worker {}",
            task.action, shared.worker_id
        )));
    };
    let ctx = TaskContext::new(
        task.clone(),
        agent.clone(),
        shared.worker_id.clone(),
        redelivered,
    );
    // A task of its own, so that a panic is caught at the join (including one raised by the
    // handler before it returns its future); aborted if this is dropped.
    let handler = handler.clone();
    let running = async move { handler(ctx).await }.in_current_span();
    let mut handle = AbortOnDrop(tokio::spawn(running));
    match (&mut handle.0).await {
        Ok(result) => result,
        Err(join_error) if join_error.is_panic() => {
            let message = panic_message(join_error.into_panic());
            error!(panic = %message, "handler panicked");
            Err(HandlerError::retryable(format!(
                "handler panicked: {message}"
            )))
        }
        Err(join_error) => Err(HandlerError::retryable(format!(
            "handler did not finish: {join_error}"
        ))),
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Publishes a heartbeat at once, then every `interval`, until aborted.
async fn send_heartbeats(
    shared: Arc<Shared>,
    agents: Vec<String>,
    concurrency: u32,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let queue = shared.names.heartbeats();
    loop {
        ticker.tick().await;
        let heartbeat = Heartbeat {
            v: PROTOCOL_VERSION,
            worker_id: shared.worker_id.to_string(),
            agents: agents.clone(),
            concurrency,
            tasks: shared.held().values().cloned().collect(),
            sent_at: Utc::now(),
        };
        let body = serde_json::to_vec(&heartbeat).expect("a Heartbeat always serializes to JSON");
        let message = OutgoingMessage::new(&queue, "heartbeat", body);
        if let Err(error) = shared.publisher.publish_one(&message).await {
            warn!(%error, "could not publish a heartbeat");
        }
    }
}

/// Aborts the task when dropped, so that no task outlives its owner.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `{host}-{pid}-{8 random hex digits}`: unique, and still tells where the worker runs.
fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let random = Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_worker_id_names_host_and_pid_and_differs_each_time() {
        let first = default_worker_id();
        let second = default_worker_id();
        assert_ne!(first, second);
        assert!(
            first.contains(&format!("-{}-", std::process::id())),
            "{first}"
        );
    }

    #[test]
    fn panic_message_reads_str_and_string_payloads() {
        assert_eq!(panic_message(Box::new("boom")), "boom");
        assert_eq!(panic_message(Box::new(String::from("bang"))), "bang");
        assert_eq!(panic_message(Box::new(7_u8)), "(no message)");
    }

    #[test]
    fn invalid_configs_are_refused() {
        let worker = Worker::builder(WorkerConfig::default()).build();
        assert!(matches!(worker.validate(), Err(Error::Config(_))));

        let config = WorkerConfig {
            concurrency: 0,
            ..WorkerConfig::default()
        };
        let worker = Worker::builder(config).agent("echo").build();
        assert!(matches!(worker.validate(), Err(Error::Config(_))));

        let config = WorkerConfig {
            concurrency: 70_000,
            ..WorkerConfig::default()
        };
        let worker = Worker::builder(config).agent("echo").build();
        assert!(matches!(worker.validate(), Err(Error::Config(_))));

        let worker = Worker::builder(WorkerConfig::default())
            .agent("echo")
            .agent("echo")
            .build();
        assert_eq!(worker.validate().unwrap(), 16);
        assert_eq!(worker.agents, ["echo"]);
    }
}
