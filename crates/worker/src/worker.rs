use std::{
    any::Any,
    collections::{BTreeMap, HashMap, VecDeque},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::Utc;
use flotilla_broker::{
    Backoff, BrokerConfig, Connection, Consumer, Delivery, OutgoingMessage, PublishError,
    Publisher, QueueNames, declare_control_queue, declare_task_queue, declare_topology, reconnect,
};
use flotilla_proto::{
    Cancel, Deregistration, Heartbeat, HeldTask, LogBatch, LogLine, PROTOCOL_VERSION, Registration,
    ResultStatus, Task, TaskError, TaskResult,
};
use flotilla_telemetry::metrics::WorkerMetrics;
use flotilla_telemetry::trace::{self, TASK_SPAN};
use futures_util::future::join_all;
use serde_json::Value;
use tokio::{
    net::TcpListener,
    sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, Span, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::log::{BATCH_LINES, StepLog};
use crate::{Error, HandlerError, TaskContext, WorkerConfig, health, secrets};

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
    health: Option<SocketAddr>,
    labels: BTreeMap<String, String>,
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

    /// Describes the worker in the coordinators' registry with `key: value` (e.g. `region:
    /// eu`). Repeatable; a key given again takes the last value.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
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

    /// The waits between attempts to reconnect after RabbitMQ was lost: `initial`, doubling
    /// after each failed attempt up to `max`, each shortened by a random part of up to half
    /// (defaults 100 ms and 5 s). `initial` must not be zero nor exceed `max`.
    #[must_use]
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.broker.reconnect = Backoff { initial, max };
        self
    }

    /// Serves `/health/live`, `/health/ready` (200 while connected to RabbitMQ and consuming,
    /// 503 otherwise) and `/metrics` (tasks run, failed and in flight, by agent and action, in
    /// the Prometheus text format) on `addr` while [`Worker::run`] runs. Off by default.
    #[must_use]
    pub fn serve_health(mut self, addr: SocketAddr) -> Self {
        self.health = Some(addr);
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
            names: QueueNames::new(self.config.prefix.clone()),
            broker: BrokerConfig {
                url: self.config.amqp_url.clone(),
                prefix: self.config.prefix.clone(),
                ..self.broker
            },
            config: self.config,
            agents: self.agents,
            handlers: self.handlers,
            fallback: self.fallback,
            health: self.health,
            labels: self.labels,
        }
    }
}

/// Serves agent actions from RabbitMQ until told to stop. See the crate docs.
pub struct Worker {
    config: WorkerConfig,
    worker_id: Arc<str>,
    names: QueueNames,
    agents: Vec<String>,
    handlers: HashMap<String, BoxedHandler>,
    fallback: Option<BoxedHandler>,
    broker: BrokerConfig,
    health: Option<SocketAddr>,
    labels: BTreeMap<String, String>,
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
            .field("reconnect", &self.broker.reconnect)
            .field("health", &self.health)
            .field("labels", &self.labels)
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
            health: None,
            labels: BTreeMap::new(),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Runs until `shutdown` is cancelled, then drains: stops taking tasks, gives back those
    /// received but not started, lets the running ones finish and report within
    /// `shutdown_grace`, and closes the connection.
    ///
    /// Losing the connection (or a consumer's channel) does not end it. The worker stops taking
    /// tasks, reconnects with backoff (see [`WorkerBuilder::reconnect_backoff`]), declares its
    /// queues again and goes on taking tasks; the tasks running meanwhile go on too, and their
    /// results are published once connected again.
    ///
    /// Returns `Ok` after a shutdown request, and an error only when it cannot start: an
    /// invalid config, the health address taken ([`Error::Health`]), RabbitMQ unreachable or
    /// refusing ([`Error::Connect`]), or queues it is refused to declare or consume. A
    /// connection that fails while the queues are set up is replaced with backoff instead.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let prefetch = self.validate()?;
        let health = match self.health {
            Some(addr) => Some(health::bind(addr).await?),
            None => None,
        };
        let connection_name = format!("flotilla-worker {}", self.worker_id);
        let connection = flotilla_broker::connect(&self.broker, &connection_name)
            .await
            .map_err(Error::Connect)?;
        let first = match self
            .open_session(connection.clone(), 0, prefetch, true)
            .await
        {
            Ok(session) => session,
            Err(error) => {
                if let Err(error) = connection.close().await {
                    warn!(%error, "could not close the rabbitmq connection");
                }
                if !error.is_transient() {
                    return Err(error.into());
                }
                // RabbitMQ answered, then failed under the setup (a quorum queue that timed out
                // a consume, say): retry as after a lost connection rather than give up.
                warn!(%error, "could not set up the queues; reconnecting");
                let retry = reconnect(&connection, &shutdown, |connection| {
                    self.open_session(connection, 0, prefetch, true)
                })
                .await;
                match retry {
                    Some(session) => session,
                    None => {
                        info!(worker_id = %self.worker_id, "worker stopped before it started");
                        return Ok(());
                    }
                }
            }
        };
        self.serve(first, prefetch, shutdown, health).await;
        info!(worker_id = %self.worker_id, "worker stopped");
        Ok(())
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
        flotilla_core::labels::check(&self.labels)
            .map_err(|e| Error::Config(format!("worker labels: {e}")))?;
        let Backoff { initial, max } = self.broker.reconnect;
        if initial.is_zero() || initial > max {
            return Err(Error::Config(format!(
                "reconnect backoff must start above zero and at most at its maximum, not \
                 {initial:?} up to {max:?}"
            )));
        }
        Ok(prefetch)
    }

    /// Sets up `connection` for serving: declares the queues, opens a publisher and, when
    /// `consume`, a consumer per agent.
    async fn open_session(
        &self,
        connection: Connection,
        generation: u64,
        prefetch: u16,
        consume: bool,
    ) -> Result<Session, flotilla_broker::Error> {
        let channel = connection.open_channel().await?;
        declare_topology(
            &channel,
            &self.names,
            &self.agents,
            self.broker.delivery_limit,
        )
        .await?;
        // The queues of high-priority tasks and of the label sets it may serve, beyond the
        // agents' own queues.
        let queues: Vec<(&String, String, bool)> = self
            .agents
            .iter()
            .flat_map(|agent| {
                self.names
                    .worker_queues(agent, &self.labels)
                    .into_iter()
                    .map(move |(queue, high)| (agent, queue, high))
            })
            .collect();
        for (_, queue, _) in queues
            .iter()
            .filter(|(agent, q, _)| *q != self.names.agent(agent))
        {
            declare_task_queue(&channel, &self.names, queue, self.broker.delivery_limit).await?;
        }
        let control = if consume {
            Some(declare_control_queue(&channel, &self.names, &self.worker_id).await?)
        } else {
            None
        };
        channel.close().await?;
        let publisher = Publisher::new(&connection).await?;
        let mut consumers = Vec::new();
        let control = match control {
            // Control messages are acked on receipt; a small prefetch keeps them flowing.
            Some(queue) => Some(Consumer::start(&connection, &queue, &queue, 64).await?),
            None => None,
        };
        if consume {
            for (agent, queue, high) in &queues {
                let tag = format!("{}.{}", self.worker_id, &queue[self.names.prefix().len()..]);
                let consumer = Consumer::start(&connection, queue, &tag, prefetch).await?;
                consumers.push((Arc::<str>::from(agent.as_str()), *high, consumer));
            }
        }
        Ok(Session {
            link: Arc::new(Link {
                generation,
                connection,
                publisher,
                lost: CancellationToken::new(),
            }),
            consumers,
            control,
        })
    }

    async fn serve(
        &self,
        first: Session,
        prefetch: u16,
        shutdown: CancellationToken,
        health: Option<TcpListener>,
    ) {
        let shared = Arc::new(Shared {
            worker_id: self.worker_id.clone(),
            names: self.names.clone(),
            handlers: self.handlers.clone(),
            fallback: self.fallback.clone(),
            slots: Arc::new(Semaphore::new(usize::from(prefetch))),
            secrets: secrets::Source {
                dir: self.config.secrets_dir.clone(),
            },
            high_waiting: watch::Sender::new(0),
            held: Mutex::new(BTreeMap::new()),
            cancelled_early: Mutex::new(VecDeque::new()),
            beat: Notify::new(),
            link: watch::Sender::new(Some(first.link.clone())),
            metrics: Arc::new(WorkerMetrics::new()),
        });
        // Answers until the worker has stopped, so that it reads as not ready while draining.
        let stop_health = CancellationToken::new();
        let health = health.map(|listener| {
            let probe = health::WorkerProbe {
                shared: shared.clone(),
                shutdown: shutdown.clone(),
                agents: self.agents.len(),
            };
            health::serve(listener, probe, stop_health.clone())
        });
        info!(
            worker_id = %self.worker_id,
            agents = %self.agents.join(","),
            concurrency = prefetch,
            prefix = %self.names.prefix(),
            "worker started"
        );

        // Drops the tasks in progress when they may not finish (grace expired).
        let abandon = CancellationToken::new();
        // Stops keeping the link up, once the tasks in progress are done with it.
        let stop_link = CancellationToken::new();
        let running = TaskTracker::new();
        let (sessions, new_sessions) = mpsc::channel(1);

        let keep_link = self.keep_link(first, &shared, sessions, prefetch, &shutdown, &stop_link);
        let work = async {
            let heartbeats = AbortOnDrop(tokio::spawn(send_heartbeats(
                shared.clone(),
                self.registration(u32::from(prefetch)),
                self.config.heartbeat_interval,
            )));
            let consumers = take_tasks(new_sessions, &shared, &running, &shutdown, &abandon).await;

            running.close();
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
            abandon.cancel();
            running.wait().await;
            drop(heartbeats);
            say_goodbye(&shared).await;
            for consumer in &consumers {
                if let Err(error) = consumer.close().await {
                    warn!(queue = consumer.queue(), %error, "could not close consumer");
                }
            }
            stop_link.cancel();
        };
        tokio::join!(keep_link, work);
        stop_health.cancel();
        if let Some(server) = health {
            let _ = server.await;
        }
    }

    /// How this worker announces itself to the registry.
    fn registration(&self, concurrency: u32) -> Registration {
        let mut actions: Vec<String> = self.handlers.keys().cloned().collect();
        actions.sort();
        Registration {
            v: PROTOCOL_VERSION,
            worker_id: self.worker_id.to_string(),
            agents: self.agents.clone(),
            actions,
            sdk: concat!("flotilla-worker/", env!("CARGO_PKG_VERSION")).to_owned(),
            concurrency,
            host: host_name(),
            pid: std::process::id(),
            labels: self.labels.clone(),
            started_at: Utc::now(),
            sent_at: Utc::now(),
        }
    }

    /// Keeps the worker connected until `stop`. Publishes the link of each session for the
    /// task runners, and hands its consumers to the intake. When the link is reported lost,
    /// replaces the session by one on a new connection; it consumes only until the shutdown
    /// request, but is kept up after it so that the tasks still running can report.
    async fn keep_link(
        &self,
        first: Session,
        shared: &Shared,
        sessions: mpsc::Sender<Session>,
        prefetch: u16,
        shutdown: &CancellationToken,
        stop: &CancellationToken,
    ) {
        let mut session = first;
        let last = loop {
            let link = session.link.clone();
            shared.link.send_replace(Some(link.clone()));
            if !session.consumers.is_empty() {
                // Refused once the intake has stopped: dropped, the consumers close their
                // channels, and RabbitMQ requeues what they had prefetched.
                let _ = sessions.send(session).await;
            }
            tokio::select! {
                () = stop.cancelled() => break link,
                () = link.lost.cancelled() => {}
            }
            shared.link.send_replace(None);
            // Even if only one channel failed, start over on a new connection: then every
            // delivery of the old link is certainly dead, and no ack is sent for it by mistake.
            if let Err(error) = link.connection.close().await {
                debug!(%error, "could not close the lost connection");
            }
            let generation = link.generation + 1;
            let replaced = reconnect(&link.connection, stop, |connection| {
                self.open_session(connection, generation, prefetch, !shutdown.is_cancelled())
            })
            .await;
            match replaced {
                Some(next) => session = next,
                None => return,
            }
        };
        shared.link.send_replace(None);
        if let Err(error) = last.publisher.close().await {
            warn!(%error, "could not close publisher channels");
        }
        if let Err(error) = last.connection.close().await {
            warn!(%error, "could not close the rabbitmq connection");
        }
    }
}

/// One connection to RabbitMQ and the publisher on it.
struct Link {
    /// Numbers the links of a worker: a delivery can be settled only on the link it came from.
    generation: u64,
    connection: Connection,
    publisher: Publisher,
    /// Cancelled by whoever first sees the link fail; the worker then replaces it.
    lost: CancellationToken,
}

impl Link {
    fn report_lost(&self, reason: impl std::fmt::Display) {
        if !self.lost.is_cancelled() {
            warn!(%reason, "lost rabbitmq; reconnecting");
            self.lost.cancel();
        }
    }

    /// Whether a publish failed because this link is gone, rather than for the message.
    fn failed_with(&self, error: &PublishError) -> bool {
        matches!(error, PublishError::Broker(_))
            && (self.lost.is_cancelled() || !self.connection.is_connected())
    }
}

/// A link freshly set up, and the consumers of the agent queues when it was set up to take
/// tasks.
struct Session {
    link: Arc<Link>,
    /// By agent, and whether the queue holds high-priority tasks.
    consumers: Vec<(Arc<str>, bool, Consumer)>,
    /// The consumer of this worker's control queue, when set up to take tasks.
    control: Option<Consumer>,
}

/// A delivery, and the link it came on.
struct Receipt {
    delivery: Delivery,
    generation: u64,
    /// Acked once the task started (see [`ack_early`]): its result settles nothing more.
    acked: bool,
}

/// A task in progress.
struct Held {
    task: HeldTask,
    /// Cancelled when the coordinator asks to stop the task; its handler sees it.
    cancel: CancellationToken,
    /// Deliveries of the same task that arrived while it ran, settled with its result.
    adopted: Vec<Receipt>,
    /// The task's own lease, if it has one: heartbeats come at least every third of it.
    lease: Option<Duration>,
    /// Told when a heartbeat listing the task is confirmed, for a task acked early.
    first_beat: Option<oneshot::Sender<()>>,
}

/// Counts a high-priority intake waiting for a slot for as long as it lives, however the wait
/// ends (the intake may stop waiting on shutdown).
struct HighWaiting<'a>(&'a watch::Sender<usize>);

impl<'a> HighWaiting<'a> {
    fn new(count: &'a watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for HighWaiting<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// State shared by the intake, the task runners, the heartbeats and the health server.
pub(crate) struct Shared {
    worker_id: Arc<str>,
    names: QueueNames,
    handlers: HashMap<String, BoxedHandler>,
    fallback: Option<BoxedHandler>,
    secrets: secrets::Source,
    /// One permit per task that may run at once, across all agents.
    slots: Arc<Semaphore>,
    /// How many intakes of high-priority queues wait for a slot: the others let them go first.
    high_waiting: watch::Sender<usize>,
    /// The tasks in progress, by task id, reported in heartbeats.
    held: Mutex<BTreeMap<Uuid, Held>>,
    /// Tasks cancelled before they started here (the cancel overtook the task, still queued or
    /// prefetched): they start cancelled. The most recent [`CANCELLED_KEPT`] only.
    cancelled_early: Mutex<VecDeque<Uuid>>,
    /// Wakes the heartbeat loop when a task is taken, so that its lease starts at once instead
    /// of at the next regular heartbeat.
    beat: Notify,
    /// The link to publish on; `None` while reconnecting.
    link: watch::Sender<Option<Arc<Link>>>,
    pub(crate) metrics: Arc<WorkerMetrics>,
}

impl Shared {
    /// A slot to run a task in. A task of a high-priority queue gets the next slot that frees;
    /// one of a normal queue waits while any of those waits. Cancel-safe.
    async fn take_slot(&self, high: bool) -> OwnedSemaphorePermit {
        let acquire = || async {
            self.slots
                .clone()
                .acquire_owned()
                .await
                .expect("the worker never closes its semaphore")
        };
        if high {
            let _waiting = HighWaiting::new(&self.high_waiting);
            return acquire().await;
        }
        let mut waiting = self.high_waiting.subscribe();
        loop {
            let _ = waiting.wait_for(|&n| n == 0).await;
            let permit = acquire().await;
            // A high-priority task came while this one queued for the slot: it goes first.
            if *self.high_waiting.borrow() == 0 {
                return permit;
            }
        }
    }

    /// Whether the worker holds a live link, which it consumes on until the shutdown request.
    pub(crate) fn consuming(&self) -> bool {
        self.link
            .borrow()
            .as_ref()
            .is_some_and(|link| !link.lost.is_cancelled() && link.connection.is_connected())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, Held>> {
        // Inserts, pushes and removes only: the map is consistent even if a holder panicked.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `receipt` to the run of its task in progress here; gives it back if there is none.
    fn adopt(&self, task_id: Uuid, receipt: Receipt) -> Option<Receipt> {
        match self.held().get_mut(&task_id) {
            Some(held) => {
                held.adopted.push(receipt);
                None
            }
            None => Some(receipt),
        }
    }

    /// Records `task` as in progress, unless it already is (then `receipt` is adopted): returns
    /// the receipt to run the task with, the token that cancels it and, for a task acked early,
    /// what tells that its first heartbeat is confirmed.
    fn claim(
        &self,
        task: &Task,
        receipt: Receipt,
    ) -> Option<(Receipt, CancellationToken, Option<oneshot::Receiver<()>>)> {
        let mut held = self.held();
        if let Some(running) = held.get_mut(&task.task_id) {
            running.adopted.push(receipt);
            return None;
        }
        let lease = task.heartbeat_timeout_ms.map(Duration::from_millis);
        let (first_beat, beaten) = match task.ack_early {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let task = HeldTask {
            task_id: task.task_id,
            run_id: task.run_id,
            step_id: task.step_id.clone(),
            attempt: task.attempt,
        };
        let cancel = CancellationToken::new();
        if self.early().contains(&task.task_id) {
            cancel.cancel();
        }
        held.insert(
            task.task_id,
            Held {
                task,
                cancel: cancel.clone(),
                adopted: Vec::new(),
                lease,
                first_beat,
            },
        );
        self.beat.notify_one();
        Some((receipt, cancel, beaten))
    }

    /// Tells the handler of the task `cancel` names to stop if the task runs here, or makes it
    /// start cancelled should it come later.
    fn cancel(&self, cancel: &Cancel) -> bool {
        if let Some(held) = self.held().get(&cancel.task_id) {
            held.cancel.cancel();
            return true;
        }
        let mut early = self.early();
        if early.len() == CANCELLED_KEPT {
            early.pop_front();
        }
        early.push_back(cancel.task_id);
        false
    }

    fn early(&self) -> std::sync::MutexGuard<'_, VecDeque<Uuid>> {
        // Pushes and pops only: consistent even if a holder panicked.
        self.cancelled_early
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The time between heartbeats: `interval`, or a third of the shortest lease held if sooner.
    fn heartbeat_period(&self, interval: Duration) -> Duration {
        self.held()
            .values()
            .filter_map(|held| held.lease)
            .map(|lease| lease / 3)
            .fold(interval, Duration::min)
    }

    /// Tells the tasks listed in a confirmed heartbeat that wait for one.
    fn beaten(&self, tasks: &[HeldTask]) {
        let mut held = self.held();
        for task in tasks {
            if let Some(first_beat) = held
                .get_mut(&task.task_id)
                .and_then(|held| held.first_beat.take())
            {
                let _ = first_beat.send(());
            }
        }
    }

    /// Ends the task in progress, returning `own` and the deliveries adopted by it. One step
    /// under the lock, so that a delivery arriving later starts a run of its own rather than
    /// being adopted by a run that will not settle it.
    fn release(&self, task_id: Uuid, own: Receipt) -> Vec<Receipt> {
        let adopted = self
            .held()
            .remove(&task_id)
            .map(|held| held.adopted)
            .unwrap_or_default();
        std::iter::once(own).chain(adopted).collect()
    }
}

/// Takes tasks from the consumers of each session until the shutdown request. Returns those of
/// the last session, whose channels must stay open until the tasks taken from them are acked.
async fn take_tasks(
    mut sessions: mpsc::Receiver<Session>,
    shared: &Arc<Shared>,
    running: &TaskTracker,
    shutdown: &CancellationToken,
    abandon: &CancellationToken,
) -> Vec<Consumer> {
    loop {
        let session = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Vec::new(),
            session = sessions.recv() => match session {
                Some(session) => session,
                None => return Vec::new(),
            },
        };
        let Session {
            link,
            consumers,
            control,
        } = session;
        let intakes = consumers.into_iter().map(|(agent, high, consumer)| {
            intake(
                agent, high, consumer, &link, shared, running, shutdown, abandon,
            )
        });
        let (consumers, ()) = tokio::join!(
            join_all(intakes),
            listen_control(control, &link, shared, shutdown)
        );
        if shutdown.is_cancelled() {
            return consumers;
        }
        // Otherwise the link was lost, and the next session brings new consumers.
    }
}

/// Takes control messages from the worker's control queue until the shutdown request or the
/// loss of the link, and cancels the tasks they name. Each is acked on receipt: it concerns
/// only tasks running here now, so there is nothing to redeliver it for.
async fn listen_control(
    consumer: Option<Consumer>,
    link: &Link,
    shared: &Shared,
    shutdown: &CancellationToken,
) {
    let Some(mut consumer) = consumer else { return };
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = link.lost.cancelled() => break,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => {
                link.report_lost(format_args!("consuming {}: {error}", consumer.queue()));
                break;
            }
            None => {
                link.report_lost(format_args!(
                    "rabbitmq stopped the consumer of {}",
                    consumer.queue()
                ));
                break;
            }
        };
        match serde_json::from_slice::<Cancel>(&delivery.body) {
            Ok(cancel) => {
                if shared.cancel(&cancel) {
                    info!(run_id = %cancel.run_id, step_id = %cancel.step_id, task_id = %cancel.task_id, reason = %cancel.reason, "cancelling task");
                }
            }
            Err(error) => warn!(%error, "undecodable control message ignored"),
        }
        if let Err(error) = delivery.ack().await {
            debug!(%error, "could not ack a control message");
        }
    }
    if let Err(error) = consumer.close().await {
        debug!(queue = consumer.queue(), %error, "could not close the control consumer");
    }
}

/// Takes deliveries from one agent's queue and starts a task runner for each, until the
/// shutdown request or the loss of the link. Returns the consumer.
#[allow(clippy::too_many_arguments)]
async fn intake(
    agent: Arc<str>,
    high: bool,
    mut consumer: Consumer,
    link: &Link,
    shared: &Arc<Shared>,
    running: &TaskTracker,
    shutdown: &CancellationToken,
    abandon: &CancellationToken,
) -> Consumer {
    let stopped = take_deliveries(
        &agent,
        high,
        &mut consumer,
        link,
        shared,
        running,
        shutdown,
        abandon,
    )
    .await;
    if stopped == Stopped::Shutdown
        && let Err(error) = give_back_prefetched(&mut consumer).await
    {
        link.report_lost(format_args!(
            "giving back the tasks prefetched from {}: {error}",
            consumer.queue()
        ));
    }
    consumer
}

#[derive(Debug, PartialEq, Eq)]
enum Stopped {
    Shutdown,
    LinkLost,
}

#[allow(clippy::too_many_arguments)]
async fn take_deliveries(
    agent: &Arc<str>,
    high: bool,
    consumer: &mut Consumer,
    link: &Link,
    shared: &Arc<Shared>,
    running: &TaskTracker,
    shutdown: &CancellationToken,
    abandon: &CancellationToken,
) -> Stopped {
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Stopped::Shutdown,
            () = link.lost.cancelled() => return Stopped::LinkLost,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => {
                link.report_lost(format_args!("consuming {}: {error}", consumer.queue()));
                return Stopped::LinkLost;
            }
            None => {
                link.report_lost(format_args!(
                    "rabbitmq stopped the consumer of {}",
                    consumer.queue()
                ));
                return Stopped::LinkLost;
            }
        };
        let Some(task) = decode(&delivery, agent).await else {
            continue;
        };
        let receipt = Receipt {
            delivery,
            generation: link.generation,
            acked: false,
        };
        // The task is running here already: its earlier delivery was lost with a connection,
        // or it was published twice. Rather than run it again, the run in progress settles
        // this delivery too. Checked before waiting for a slot, which that run may hold.
        let Some(receipt) = shared.adopt(task.task_id, receipt) else {
            info!(run_id = %task.run_id, step_id = %task.step_id, task_id = %task.task_id, "task delivered again while in progress here; its result will settle this delivery too");
            continue;
        };
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                requeue(&receipt.delivery).await;
                return Stopped::Shutdown;
            }
            () = link.lost.cancelled() => return Stopped::LinkLost,
            permit = shared.take_slot(high) => permit,
        };
        let Some((receipt, cancel, beaten)) = shared.claim(&task, receipt) else {
            continue;
        };
        let task = run_task(
            receipt,
            beaten,
            task,
            agent.clone(),
            shared.clone(),
            permit,
            cancel,
        );
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

/// The task a delivery carries. A body that is not a task is dead-lettered (no retry can make
/// it readable), and gives `None`.
async fn decode(delivery: &Delivery, agent: &str) -> Option<Task> {
    match serde_json::from_slice(&delivery.body) {
        Ok(task) => Some(task),
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
            None
        }
    }
}

/// Stops the broker from sending more and requeues what it had already sent.
async fn give_back_prefetched(consumer: &mut Consumer) -> Result<(), flotilla_broker::Error> {
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

/// Runs one task to its end: handle, publish the result, settle the deliveries.
async fn run_task(
    mut receipt: Receipt,
    beaten: Option<oneshot::Receiver<()>>,
    task: Task,
    agent: Arc<str>,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
    cancel: CancellationToken,
) {
    let span = info_span!(
        TASK_SPAN,
        run_id = %task.run_id,
        // A run's trace id is its id: its 32 hex digits, as Jaeger shows them.
        trace_id = %task.run_id.simple(),
        step_id = %task.step_id,
        attempt = task.attempt,
        task_id = %task.task_id,
        %agent,
        action = %task.action,
    );
    let started_at = Utc::now();
    trace::task_started(
        &span,
        &receipt.delivery.headers,
        &trace::TaskStart {
            run_id: task.run_id.as_u128(),
            step_id: &task.step_id,
            agent: &agent,
            action: &task.action,
            attempt: task.attempt,
            worker_id: &shared.worker_id,
            redelivered: receipt.delivery.redelivered,
            queue_wait: (started_at - task.dispatched_at).to_std().ok(),
        },
    );
    async move {
        let redelivered = receipt.delivery.redelivered;
        debug!(redelivered, "task started");
        let in_flight = shared.metrics.task_started(&agent, &task.action);
        let log = StepLog::default();
        let log_done = CancellationToken::new();
        // The handler sees the secrets' values; nothing it sends back does.
        let mut given = task.clone();
        let resolved = shared.secrets.resolve(&mut given.params);
        let redactor = resolved.clone().unwrap_or_default();
        let mut shipper = AbortOnDrop(tokio::spawn(
            ship_log(
                shared.clone(),
                log.clone(),
                log_batch(&shared, &task),
                redactor.clone(),
                log_done.clone(),
            )
            .in_current_span(),
        ));
        let handling = async {
            match resolved {
                Ok(_) => {
                    call_handler(&shared, &agent, &given, redelivered, cancel.clone(), log).await
                }
                Err(missing) => Err(HandlerError::fatal(missing)),
            }
        };
        let outcome = match beaten {
            None => handling.await,
            Some(beaten) => {
                tokio::pin!(handling);
                tokio::select! {
                    biased;
                    outcome = &mut handling => outcome,
                    confirmed = beaten => {
                        if confirmed.is_ok() {
                            ack_early(&shared, &mut receipt).await;
                        }
                        handling.await
                    }
                }
            }
        };
        // The log's last lines go before the result, so that a run seen ended has its logs.
        log_done.cancel();
        let _ = (&mut shipper.0).await;
        let finished_at = Utc::now();
        in_flight.finish(
            outcome.is_ok(),
            (finished_at - started_at).to_std().unwrap_or_default(),
        );
        let duration_ms = (finished_at - started_at).num_milliseconds();
        let outcome = outcome
            .map(|mut output| {
                redactor.json(&mut output);
                output
            })
            .map_err(|mut failure| {
                failure.message = redactor.text(&failure.message);
                failure
            });
        let (status, output, error) = match outcome {
            Ok(output) => {
                info!(duration_ms, "task succeeded");
                (ResultStatus::Success, Some(output), None)
            }
            // Stopped because it was asked to: no failure of the step's own.
            Err(failure) if cancel.is_cancelled() => {
                info!(duration_ms, error = %failure.message, "task cancelled");
                let error = TaskError {
                    message: failure.message,
                    retryable: false,
                };
                (ResultStatus::Cancelled, None, Some(error))
            }
            Err(failure) => {
                trace::task_failed(&Span::current(), &failure.message);
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
        let reply_to = receipt
            .delivery
            .reply_to
            .clone()
            .filter(|queue| !queue.is_empty())
            .unwrap_or_else(|| shared.names.results());
        let body = serde_json::to_vec(&result).expect("a TaskResult always serializes to JSON");
        let message = OutgoingMessage::new(&reply_to, "result", body)
            .with_correlation_id(task.task_id.to_string());
        report(&shared, task.task_id, &message, receipt).await;
    }
    .instrument(span)
    .await;
}

/// Publishes a task's result, waiting for a link while reconnecting, then settles the task's
/// deliveries: acks them once the result is confirmed, requeues them if it was refused.
///
/// Deliveries that came on an earlier link are left alone. RabbitMQ requeued them when that
/// link was lost, and their delivery tags mean nothing on the new one; the result published
/// late is still valid, since the coordinator fences results by task id and attempt.
async fn report(shared: &Shared, task_id: Uuid, message: &OutgoingMessage, own: Receipt) {
    let Some((link, published)) = publish_when_linked(shared, message).await else {
        return;
    };
    if let Err(error) = &published {
        error!(reply_to = %message.routing_key, %error, "could not publish a result; requeueing the task");
    }
    for receipt in shared.release(task_id, own) {
        if receipt.acked {
            continue;
        }
        if receipt.generation != link.generation {
            info!(
                "the task's delivery was lost with an earlier connection; rabbitmq delivers it again"
            );
            continue;
        }
        if published.is_ok() {
            // The window manual acks leave: the result is confirmed, the task not yet acked.
            flotilla_telemetry::failpoint("crash-before-ack");
            if let Err(error) = receipt.delivery.ack().await {
                warn!(%error, "could not ack a task whose result is published; it will run again");
            }
        } else {
            requeue(&receipt.delivery).await;
        }
    }
}

/// Publishes `message` on the current link, waiting for one while reconnecting and publishing
/// again on the next link when the current one is lost meanwhile. Answers the link it was
/// published on and whether the broker took it; `None` only when the worker is gone.
async fn publish_when_linked(
    shared: &Shared,
    message: &OutgoingMessage,
) -> Option<(Arc<Link>, Result<(), PublishError>)> {
    let mut links = shared.link.subscribe();
    loop {
        let current = match links
            .wait_for(|link| link.as_ref().is_some_and(|link| !link.lost.is_cancelled()))
            .await
        {
            Ok(current) => current.clone(),
            // The sender lives in `shared`, which outlives the callers.
            Err(_) => return None,
        };
        let Some(link) = current else { continue };
        match link.publisher.publish_one(message).await {
            Err(error) if link.failed_with(&error) => {
                link.report_lost(format_args!("publishing a {}: {error}", message.kind));
                info!(kind = %message.kind, "not published; publishing it once reconnected");
            }
            published => return Some((link, published)),
        }
    }
}

/// The log messages of one execution of `task`, without lines yet.
fn log_batch(shared: &Shared, task: &Task) -> LogBatch {
    LogBatch {
        v: PROTOCOL_VERSION,
        task_id: task.task_id,
        run_id: task.run_id,
        step_id: task.step_id.clone(),
        attempt: task.attempt,
        worker_id: shared.worker_id.to_string(),
        execution_id: Uuid::new_v4(),
        lines: Vec::new(),
        sent_at: Utc::now(),
    }
}

/// Sends what the handler writes to `log` in messages of `batch`'s execution, at most
/// [`BATCH_LINES`] lines each: every [`LOG_INTERVAL`], or at once when a batch is full, and what
/// is left once `done` is cancelled. A batch the broker refuses is dropped (its lines are lost, not the step).
async fn ship_log(
    shared: Arc<Shared>,
    log: StepLog,
    mut batch: LogBatch,
    redactor: secrets::Redactor,
    done: CancellationToken,
) {
    let queue = shared.names.logs();
    loop {
        let last = tokio::select! {
            () = done.cancelled() => true,
            () = log.filled() => false,
            () = tokio::time::sleep(LOG_INTERVAL) => false,
        };
        let lines = log.take();
        for chunk in lines.chunks(BATCH_LINES) {
            batch.lines = chunk
                .iter()
                .map(|line| LogLine {
                    line: redactor.text(&line.line),
                    ..line.clone()
                })
                .collect();
            batch.sent_at = Utc::now();
            let body = serde_json::to_vec(&batch).expect("a LogBatch always serializes to JSON");
            let message = OutgoingMessage::new(&queue, "log", body);
            if let Some((_, Err(error))) = publish_when_linked(&shared, &message).await {
                warn!(%error, lines = chunk.len(), "could not publish log lines; they are lost");
            }
        }
        if last {
            return;
        }
    }
}

/// Acks a task marked `ack_early` once a heartbeat listing it is confirmed, so that a long
/// task does not trip RabbitMQ's consumer timeout: from then on only the lease tells the
/// coordinator that this worker is gone (its heartbeats stop, the attempt is retried). Left for
/// the result to settle if the delivery's link is gone, as RabbitMQ requeued it then.
async fn ack_early(shared: &Shared, receipt: &mut Receipt) {
    let live = shared
        .link
        .borrow()
        .as_ref()
        .is_some_and(|link| link.generation == receipt.generation && !link.lost.is_cancelled());
    if !live {
        return;
    }
    match receipt.delivery.ack().await {
        Ok(()) => {
            receipt.acked = true;
            debug!("task acked early; its lease alone now tells if this worker is lost");
            flotilla_telemetry::failpoint("crash-after-early-ack");
        }
        Err(error) => warn!(%error, "could not ack a task early; its result will"),
    }
}

async fn call_handler(
    shared: &Shared,
    agent: &Arc<str>,
    task: &Task,
    redelivered: bool,
    cancel: CancellationToken,
    log: StepLog,
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
    )
    .with_cancellation(cancel)
    .with_log(log);
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

/// Publishes a heartbeat at once, then every `interval` (sooner for tasks with a short lease,
/// see [`Shared::heartbeat_period`]), until aborted. Skipped while reconnecting. Before the
/// first heartbeat on each link, publishes `registration`: the registry learns of the worker
/// at start, and again after a reconnect should it have forgotten it meanwhile.
async fn send_heartbeats(shared: Arc<Shared>, mut registration: Registration, interval: Duration) {
    let queue = shared.names.heartbeats();
    // New tasks bring the next heartbeat forward, but never closer than this to the last one,
    // so that a busy worker does not turn every task into a heartbeat.
    let min_gap = HEARTBEAT_MIN_GAP.min(interval);
    let mut registered = None;
    loop {
        let current = shared.link.borrow().clone();
        if let Some(link) = current
            && registered != Some(link.generation)
        {
            registration.sent_at = Utc::now();
            let body = serde_json::to_vec(&registration)
                .expect("a Registration always serializes to JSON");
            if publish_to_registry(&link, &queue, "registration", body).await {
                registered = Some(link.generation);
            }
        }
        beat_once(
            &shared,
            &registration.agents,
            registration.concurrency,
            &queue,
        )
        .await;
        tokio::time::sleep(min_gap).await;
        let rest = shared.heartbeat_period(interval).saturating_sub(min_gap);
        tokio::select! {
            () = tokio::time::sleep(rest) => {}
            () = shared.beat.notified() => {}
        }
    }
}

/// Publishes one heartbeat listing the tasks held, unless reconnecting.
async fn beat_once(shared: &Shared, agents: &[String], concurrency: u32, queue: &str) {
    let current = shared.link.borrow().clone();
    let Some(link) = current else {
        debug!("no heartbeat while reconnecting");
        return;
    };
    let heartbeat = Heartbeat {
        v: PROTOCOL_VERSION,
        worker_id: shared.worker_id.to_string(),
        agents: agents.to_vec(),
        concurrency,
        tasks: shared
            .held()
            .values()
            .map(|held| held.task.clone())
            .collect(),
        sent_at: Utc::now(),
    };
    let body = serde_json::to_vec(&heartbeat).expect("a Heartbeat always serializes to JSON");
    let message = OutgoingMessage::new(queue, "heartbeat", body);
    match link.publisher.publish_one(&message).await {
        Ok(()) => shared.beaten(&heartbeat.tasks),
        Err(error) if link.failed_with(&error) => {
            link.report_lost(format_args!("publishing a heartbeat: {error}"));
        }
        Err(error) => warn!(%error, "could not publish a heartbeat"),
    }
}

/// Publishes a registration or deregistration on `link`; answers whether it was confirmed.
async fn publish_to_registry(link: &Link, queue: &str, kind: &str, body: Vec<u8>) -> bool {
    match link
        .publisher
        .publish_one(&OutgoingMessage::new(queue, kind, body))
        .await
    {
        Ok(()) => true,
        Err(error) if link.failed_with(&error) => {
            link.report_lost(format_args!("publishing a {kind}: {error}"));
            false
        }
        Err(error) => {
            warn!(%error, kind, "could not publish to the registry");
            false
        }
    }
}

/// Tells the registry that this worker stops, so that it is forgotten at once rather than
/// after its heartbeats are missed. Best effort: without it, the registry forgets the worker
/// after its grace period.
async fn say_goodbye(shared: &Shared) {
    let current = shared.link.borrow().clone();
    let Some(link) = current else { return };
    let goodbye = Deregistration {
        v: PROTOCOL_VERSION,
        worker_id: shared.worker_id.to_string(),
        sent_at: Utc::now(),
    };
    let body = serde_json::to_vec(&goodbye).expect("a Deregistration always serializes to JSON");
    publish_to_registry(&link, &shared.names.heartbeats(), "deregistration", body).await;
}

/// How many cancels of tasks not (yet) running here a worker remembers.
const CANCELLED_KEPT: usize = 1024;

/// The longest a line written to a step's log waits before it is sent.
const LOG_INTERVAL: Duration = Duration::from_millis(200);

/// The least time between two heartbeats of one worker.
const HEARTBEAT_MIN_GAP: Duration = Duration::from_millis(250);

/// Aborts the task when dropped, so that no task outlives its owner.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The host (or pod) this process runs on.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// `{host}-{pid}-{8 random hex digits}`: unique, and still tells where the worker runs.
fn default_worker_id() -> String {
    let random = Uuid::new_v4().simple().to_string();
    format!("{}-{}-{}", host_name(), std::process::id(), &random[..8])
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

    #[tokio::test]
    async fn a_health_address_in_use_stops_the_start_before_connecting() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let worker = Worker::builder(WorkerConfig {
            // Nothing listens there: reaching it would fail differently.
            amqp_url: "amqp://guest:guest@127.0.0.1:9/%2f".into(),
            ..WorkerConfig::default()
        })
        .agent("echo")
        .serve_health(addr)
        .build();
        let error = worker.run(CancellationToken::new()).await.unwrap_err();
        assert!(
            matches!(&error, Error::Health { addr: a, .. } if *a == addr),
            "{error}"
        );
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
