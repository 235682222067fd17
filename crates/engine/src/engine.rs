//! The batching state-machine loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_broker::Delivery;
use flotilla_core::breaker::{BreakerConfig, Breakers};
use flotilla_core::definition::Priority;
use flotilla_core::limits::{AgentLimits, Limits};
use flotilla_core::plan::{ESCALATION_SUFFIX, NOTIFY_ACTION, NOTIFY_AGENT, SubWorkflow};
use flotilla_core::quota::Quotas;
use flotilla_core::scheduler::{ParentLink, Transition};
use flotilla_core::{
    Definition, Effect, Event, Outcome, Plan, RunState, RunStatus, Strike, Subset,
};
use flotilla_proto::{
    Cancel, PROTOCOL_VERSION, QueueNames, ResultStatus, Task, TaskError, TaskResult,
};
use flotilla_store::dead_letters::{self, DeadLetter};
use flotilla_store::definitions::Content;
use flotilla_store::engine::{
    self as db, AttemptEnd, AttemptStart, Batch, OutboxRow, RunUpdate, StepIdent, StepRow,
};
use flotilla_store::queries::{self, RunEvent};
use flotilla_store::{Store, definitions, idempotency, quotas};
use flotilla_telemetry::metrics::CoordinatorMetrics;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Why the engine could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] flotilla_store::Error),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error("the run could not be recorded: {0}")]
    NotRecorded(String),
    /// An operator's request names a run or step that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An operator's request the run's state does not allow.
    #[error("{0}")]
    Refused(String),
    /// A submission to a namespace that has as many runs in flight as its quota allows.
    #[error("namespace `{namespace}` has {limit} runs in flight, as many as its quota allows")]
    RunQuota { namespace: String, limit: u64 },
    /// A submission of the latest revision of a definition of which a newer one (or none) is
    /// registered now: read it again and submit again.
    #[error(
        "definition `{name}` of namespace `{namespace}` was registered anew while the run was submitted"
    )]
    StaleDefinition { namespace: String, name: String },
}

impl Error {
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Store(e) => e.is_unavailable(),
            Error::ShuttingDown | Error::NotRecorded(_) => true,
            Error::NotFound(_)
            | Error::Refused(_)
            | Error::RunQuota { .. }
            | Error::StaleDefinition { .. } => false,
        }
    }
}

/// How many times a batch that lost a lock conflict is tried again before its inputs fail.
const CONFLICT_RETRIES: u32 = 3;

/// Tuning of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub names: QueueNames,
    /// The most inputs handled in one transaction.
    pub max_batch: usize,
    /// The most runs whose state is kept in memory between batches.
    pub max_cached_runs: usize,
    /// How long a repeated `Idempotency-Key` answers the run its first submission started.
    pub idempotency_retention: Duration,
    /// The most instances one `for_each` step may expand to.
    pub max_instances: usize,
    /// The most attempts one run has outstanding (see [`RunState::window`]).
    pub dispatch_window: usize,
    /// The agents' circuit breakers; `None` turns them off.
    pub breaker: Option<BreakerConfig>,
    /// How deep sub-workflows may nest: a run this deep starts no further one.
    pub max_workflow_depth: u32,
    /// How long a dispatched attempt may wait for a worker to start it, for steps that do not
    /// set `schedule_to_start`; no limit when `None`.
    pub schedule_to_start: Option<Duration>,
    /// The namespaces' quotas; the engine checks runs in flight, in the transaction that
    /// creates the run.
    pub quotas: Quotas,
    /// The agents' concurrency caps and rate limits, enforced at dispatch.
    pub limits: AgentLimits,
}

impl EngineConfig {
    /// Gives a run loaded or created by the engine the bounds of this config.
    fn bound(&self, state: &mut RunState) {
        state.max_instances = self.max_instances;
        state.window = self.dispatch_window;
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            names: QueueNames::default(),
            max_batch: 512,
            max_cached_runs: 20_000,
            idempotency_retention: Duration::from_secs(24 * 3600),
            max_instances: flotilla_core::scheduler::DEFAULT_MAX_INSTANCES,
            dispatch_window: flotilla_core::scheduler::DEFAULT_DISPATCH_WINDOW,
            breaker: Some(BreakerConfig::default()),
            max_workflow_depth: flotilla_core::scheduler::DEFAULT_MAX_WORKFLOW_DEPTH,
            schedule_to_start: None,
            quotas: Quotas::default(),
            limits: AgentLimits::default(),
        }
    }
}

/// A run to start.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub definition: Definition,
    pub plan: Arc<Plan>,
    /// The effective run params.
    pub params: Map<String, Value>,
    /// The steps to run or leave out, checked against `plan`.
    pub subset: Subset,
    /// The run's priority when its submission gives one; its plan's otherwise.
    pub priority: Option<Priority>,
    /// A repeat of a submission with the same key answers the first one's run.
    pub idempotency_key: Option<String>,
    /// The namespace the run belongs to.
    pub namespace: String,
    /// The content hash of the registered revision `definition` is, when the submission named
    /// the definition without a version (so asked for the latest). The run is refused
    /// ([`Error::StaleDefinition`]) if another revision has been registered since: a run never
    /// starts a revision older than one whose registration ended before it was submitted,
    /// whoever read the definition from where.
    pub latest: Option<String>,
}

/// What a submission did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    pub id: Uuid,
    /// True when an earlier submission with the same idempotency key had started the run.
    pub replayed: bool,
}

/// What an operator asks of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Cancel,
    Pause,
    Resume,
    /// Retry one failed step of a failed run, or every failed step.
    Retry {
        step: Option<String>,
    },
    Skip {
        step: String,
    },
    /// End a step as succeeded with this output.
    Complete {
        step: String,
        output: Value,
    },
    /// Undo an ended run's steps that succeeded, by their compensations.
    Rollback,
}

impl Operation {
    fn name(&self) -> &'static str {
        match self {
            Operation::Cancel => "cancel",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Retry { .. } => "retry",
            Operation::Skip { .. } => "skip",
            Operation::Complete { .. } => "complete",
            Operation::Rollback => "rollback",
        }
    }

    fn step(&self) -> Option<&str> {
        match self {
            Operation::Retry { step } => step.as_deref(),
            Operation::Skip { step } | Operation::Complete { step, .. } => Some(step),
            _ => None,
        }
    }
}

/// What a redrive did with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redriven {
    pub dead_letter: Uuid,
    pub run_id: Option<Uuid>,
    pub step_id: Option<String>,
    /// Whether the step got a new attempt; if not, why.
    pub retried: Result<u32, String>,
}

pub(crate) enum Input {
    Submit {
        run: Box<NewRun>,
        /// The run's definition as stored, hashed by the submitter rather than in the engine's
        /// loop, which every input waits on.
        content: Box<Content>,
        reply: oneshot::Sender<Result<Submitted, Error>>,
    },
    Result {
        result: Box<TaskResult>,
        delivery: Box<Delivery>,
    },
    /// Timers that are due; `done` is answered once they are handled, so the timer does not
    /// hand the same ones over twice.
    Due {
        due: Vec<Due>,
        done: oneshot::Sender<()>,
    },
    /// A task RabbitMQ dead-lettered; `task` is absent when its body is not a task.
    DeadLetter {
        letter: Box<DeadLetter>,
        task: Option<Box<Task>>,
        delivery: Box<Delivery>,
    },
    /// An operator's action on a run; answered with the run's status after it.
    Operate {
        run_id: Uuid,
        operation: Operation,
        actor: String,
        reply: oneshot::Sender<Result<RunStatus, Error>>,
    },
    /// Retry the steps of these dead letters (all pending ones when empty).
    Redrive {
        ids: Vec<Uuid>,
        reply: oneshot::Sender<Result<Vec<Redriven>, Error>>,
    },
}

/// A timer that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// A waiting step's retry.
    Retry {
        run_id: Uuid,
        step: usize,
        attempt: u32,
    },
    /// A running attempt whose worker stopped renewing its lease.
    Lease {
        run_id: Uuid,
        step: usize,
        attempt: u32,
        task_id: Uuid,
    },
    /// A running attempt past its step's timeout.
    Timeout {
        run_id: Uuid,
        step: usize,
        attempt: u32,
        task_id: Uuid,
    },
    /// A dispatched attempt no worker started within its step's `schedule_to_start`.
    NotStarted {
        run_id: Uuid,
        step: usize,
        attempt: u32,
        task_id: Uuid,
    },
    /// A run past its workflow timeout.
    RunTimeout { run_id: Uuid },
    /// A step held by a circuit breaker that may let it through now.
    Release { run_id: Uuid, step: usize },
}

impl Due {
    fn run_id(&self) -> Uuid {
        match self {
            Due::Retry { run_id, .. }
            | Due::Lease { run_id, .. }
            | Due::Timeout { run_id, .. }
            | Due::RunTimeout { run_id }
            | Due::NotStarted { run_id, .. }
            | Due::Release { run_id, .. } => *run_id,
        }
    }
}

/// Talks to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    inputs: mpsc::Sender<Input>,
}

impl EngineHandle {
    /// Creates a run and dispatches its first steps; returns once that is committed.
    pub async fn submit(&self, run: NewRun) -> Result<Submitted, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Submit {
            content: Box::new(Content::of(&run.definition)),
            run: Box::new(run),
            reply,
        })
        .await?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Hands due timers to the engine and waits until they are handled.
    pub async fn due(&self, due: Vec<Due>) -> Result<(), Error> {
        let (done, handled) = oneshot::channel();
        self.send(Input::Due { due, done }).await?;
        handled.await.map_err(|_| Error::ShuttingDown)
    }

    /// Applies an operator's action to a run, recorded in the run's history with `actor`.
    pub async fn operate(
        &self,
        run_id: Uuid,
        operation: Operation,
        actor: String,
    ) -> Result<RunStatus, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Operate {
            run_id,
            operation,
            actor,
            reply,
        })
        .await?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Gives the steps of dead-lettered tasks a new attempt: those named, or every one not
    /// redriven yet when `ids` is empty.
    pub async fn redrive(&self, ids: Vec<Uuid>) -> Result<Vec<Redriven>, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Redrive { ids, reply }).await?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    pub(crate) async fn send(&self, input: Input) -> Result<(), Error> {
        self.inputs
            .send(input)
            .await
            .map_err(|_| Error::ShuttingDown)
    }
}

/// A sub-workflow's definition, as its content hash and plan; or why it cannot run.
type Resolved = Result<(String, Arc<Plan>), String>;

struct CachedRun {
    plan: Arc<Plan>,
    /// Where its sub-workflows' definitions are found, and its children belong.
    namespace: String,
    state: RunState,
    version: i64,
    /// Step rows stored for the run; slots past them (new `for_each` instances) are inserted.
    stored: usize,
}

/// The engine: owns the cache of active runs.
pub struct Engine {
    store: Store,
    config: EngineConfig,
    inputs: mpsc::Receiver<Input>,
    outbox: mpsc::UnboundedSender<Vec<OutboxRow>>,
    wake_hint: mpsc::UnboundedSender<DateTime<Utc>>,
    runs: HashMap<Uuid, CachedRun>,
    plans: HashMap<String, Arc<Plan>>,
    metrics: Arc<CoordinatorMetrics>,
    /// When each attempt this engine dispatched was dispatched, until it ends: the start of its
    /// queue wait. See [`Engine::track_dispatch`] for its bound.
    dispatched: HashMap<Uuid, DateTime<Utc>>,
    /// What follows a committed batch off the engine's loop — the acks of its messages and the
    /// announcement of the runs it changed — done beside the next batch; waited for at the
    /// engine's stop.
    after_commit: TaskTracker,
}

/// Attempts whose dispatch time [`Engine::dispatched`] keeps at most.
const MAX_TRACKED_DISPATCHES: usize = 100_000;

impl Engine {
    /// Creates an engine; `outbox` receives the rows of every committed batch, `wake_hint` the
    /// due time of every retry the engine schedules.
    pub fn new(
        store: Store,
        config: EngineConfig,
        outbox: mpsc::UnboundedSender<Vec<OutboxRow>>,
        wake_hint: mpsc::UnboundedSender<DateTime<Utc>>,
    ) -> (Self, EngineHandle) {
        let (tx, rx) = mpsc::channel(config.max_batch * 4);
        let engine = Self {
            store,
            config,
            inputs: rx,
            outbox,
            wake_hint,
            runs: HashMap::new(),
            plans: HashMap::new(),
            metrics: Arc::default(),
            dispatched: HashMap::new(),
            after_commit: TaskTracker::new(),
        };
        (engine, EngineHandle { inputs: tx })
    }

    /// Counts what the engine commits into `metrics` (by default, into metrics of its own that
    /// nobody reads).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<CoordinatorMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs until every [`EngineHandle`] is dropped, or `shutdown` is cancelled and the inputs
    /// already queued are handled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // The messages of each committed batch, in the order of the batches.
        let (committed, to_acknowledge) = mpsc::unbounded_channel();
        self.after_commit.spawn(acknowledge(to_acknowledge));
        let mut batch = Vec::with_capacity(self.config.max_batch);
        loop {
            let first = tokio::select! {
                biased;
                input = self.inputs.recv() => input,
                () = shutdown.cancelled() => {
                    self.inputs.close();
                    self.inputs.recv().await
                }
            };
            let Some(first) = first else { break };
            batch.push(first);
            while batch.len() < self.config.max_batch {
                match self.inputs.try_recv() {
                    Ok(input) => batch.push(input),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.handle(&mut batch, &committed).await {
                tracing::error!(error = %e, "engine batch failed; its inputs will be retried");
                // Postgres is likely away: give it a moment instead of spinning.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            batch.clear();
        }
        // Ends `acknowledge` once it has acked what the last batches recorded.
        drop(committed);
        self.after_commit.close();
        self.after_commit.wait().await;
        tracing::info!("engine stopped");
    }

    async fn handle(
        &mut self,
        inputs: &mut Vec<Input>,
        committed: &mpsc::UnboundedSender<Vec<Delivery>>,
    ) -> Result<(), Error> {
        let mut conflicts = 0;
        let outcome = loop {
            match self.transact(inputs).await {
                // Lost to another coordinator's batch (a deadlock Postgres broke): nothing was
                // written, so the same inputs go again rather than fail their submitters.
                Err(Error::Store(e)) if e.is_conflict() && conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    self.runs.clear();
                    tracing::warn!(error = %e, retry = conflicts, "engine batch lost a lock conflict; trying it again");
                }
                outcome => break outcome,
            }
        };
        match outcome {
            Ok(mut done) => {
                if !done.outbox.is_empty() {
                    // The relay outlives the engine; a closed channel only happens at exit, and
                    // then the sweeper of the next start publishes these rows.
                    let _ = self.outbox.send(std::mem::take(&mut done.outbox));
                }
                for at in done.wakes.drain(..) {
                    let _ = self.wake_hint.send(at);
                }
                self.observe(std::mem::take(&mut done.observed));
                let mut recorded = Vec::new();
                for (n, input) in inputs.drain(..).enumerate() {
                    match input {
                        Input::Submit { reply, .. } => {
                            let answer = done.submitted.remove(&n).unwrap_or_else(|| {
                                Err(Error::NotRecorded(
                                    "the engine lost track of the submission".into(),
                                ))
                            });
                            let _ = reply.send(answer);
                        }
                        Input::Redrive { reply, .. } => {
                            let _ = reply.send(Ok(done.redriven.remove(&n).unwrap_or_default()));
                        }
                        Input::Operate { reply, .. } => {
                            let answer = done.operated.remove(&n).unwrap_or_else(|| {
                                Err(Error::NotRecorded(
                                    "the engine lost track of the request".into(),
                                ))
                            });
                            let _ = reply.send(answer);
                        }
                        Input::Result { delivery, .. } | Input::DeadLetter { delivery, .. } => {
                            recorded.push(*delivery);
                        }
                        Input::Due { done, .. } => {
                            let _ = done.send(());
                        }
                    }
                }
                // Acked beside the next batch rather than before it: what they say is committed,
                // and one whose ack is lost comes again and is fenced off as a duplicate.
                if !recorded.is_empty() {
                    let _ = committed.send(recorded);
                }
                // The watchers hear of the changes after the outbox and the submitters did, so
                // neither waits for them.
                let changed = std::mem::take(&mut done.changed);
                if !changed.is_empty() {
                    let store = self.store.clone();
                    self.after_commit
                        .spawn(async move { announce(&store, changed).await });
                }
                Ok(())
            }
            Err(e) => {
                // Cached states may hold changes that were never committed.
                self.runs.clear();
                for input in inputs.drain(..) {
                    match input {
                        Input::Submit { reply, .. } => {
                            let _ = reply.send(Err(Error::NotRecorded(e.to_string())));
                        }
                        Input::Redrive { reply, .. } => {
                            let _ = reply.send(Err(Error::NotRecorded(e.to_string())));
                        }
                        Input::Operate { reply, .. } => {
                            let _ = reply.send(Err(Error::NotRecorded(e.to_string())));
                        }
                        Input::Result { delivery, .. } | Input::DeadLetter { delivery, .. } => {
                            let _ = delivery.nack(true).await;
                        }
                        Input::Due { done, .. } => {
                            let _ = done.send(());
                        }
                    }
                }
                Err(e)
            }
        }
    }

    /// One transaction: lock and (re)load the touched runs, apply every input, write the batch.
    async fn transact(&mut self, inputs: &[Input]) -> Result<Committed, Error> {
        let now = Utc::now();
        let mut client = self.store.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(flotilla_store::Error::from)?;

        let mut redrive_letters: HashMap<usize, Vec<DeadLetter>> = HashMap::new();
        for (n, input) in inputs.iter().enumerate() {
            if let Input::Redrive { ids, .. } = input {
                redrive_letters.insert(n, dead_letters::lock_pending(&tx, ids).await?);
            }
        }
        let mut touched: Vec<Uuid> = inputs
            .iter()
            .flat_map(|i| match i {
                Input::Result { result, .. } => vec![result.run_id],
                Input::Due { due, .. } => due.iter().map(Due::run_id).collect(),
                Input::DeadLetter { task, .. } => task.iter().map(|t| t.run_id).collect(),
                Input::Operate { run_id, .. } => vec![*run_id],
                Input::Submit { .. } | Input::Redrive { .. } => Vec::new(),
            })
            .chain(redrive_letters.values().flatten().filter_map(|l| l.run_id))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        // Submissions of a definition's latest revision, checked against the latest registered:
        // a read that locks nothing, sent beside the runs' lock.
        let asked_latest: Vec<(&str, &str)> = inputs
            .iter()
            .filter_map(|i| match i {
                Input::Submit { run, .. } if run.latest.is_some() => {
                    Some((run.namespace.as_str(), run.definition.name.as_str()))
                }
                _ => None,
            })
            .collect();
        let (breakers, latest) = if touched.iter().all(|id| self.runs.contains_key(id)) {
            // A cached run's plan never changes, so the agents whose breakers the batch locks
            // are known before its runs are locked: both locks go in one round trip, the runs'
            // first as always (both statements are prepared before either is sent, so nothing
            // reorders them), behind the settings that plan every statement of the batch by key.
            db::prepare_lock_runs(&tx).await?;
            flotilla_store::breakers::prepare_lock(&tx).await?;
            let plans = batch_plans(&self.runs, &touched, inputs);
            let ((), versions, breakers, latest) = futures_util::try_join!(
                db::plan_by_keys(&tx),
                db::lock_runs(&tx, &touched),
                crate::breakers::lock(&tx, self.config.breaker.as_ref(), plans),
                definitions::latest_hashes(&tx, &asked_latest),
            )?;
            self.refresh(&tx, &versions).await?;
            (breakers, latest)
        } else {
            let ((), versions, latest) = futures_util::try_join!(
                db::plan_by_keys(&tx),
                db::lock_runs(&tx, &touched),
                definitions::latest_hashes(&tx, &asked_latest),
            )?;
            self.refresh(&tx, &versions).await?;
            let plans = batch_plans(&self.runs, &touched, inputs);
            let breakers = crate::breakers::lock(&tx, self.config.breaker.as_ref(), plans).await?;
            (breakers, latest)
        };
        let plans: Vec<&Plan> = batch_plans(&self.runs, &touched, inputs).collect();
        let limits = crate::limits::lock(&tx, &self.config.limits, plans.iter().copied()).await?;

        let keys: Vec<&str> = inputs
            .iter()
            .filter_map(|i| match i {
                Input::Submit { run, .. } => run.idempotency_key.as_deref(),
                _ => None,
            })
            .collect();
        let retention = chrono::Duration::from_std(self.config.idempotency_retention)
            .unwrap_or(chrono::Duration::MAX);
        let mut keyed = idempotency::claim(&tx, &keys, now - retention).await?;
        let mut in_flight = self.lock_run_quotas(&tx, inputs, &keyed).await?;

        let names = self.config.names.clone();
        let mut pending = Pending {
            names: &names,
            schedule_to_start: self.config.schedule_to_start,
            now,
            batch: Batch::default(),
            changes: BTreeMap::new(),
            wakes: Vec::new(),
            observed: Vec::new(),
            events: Vec::new(),
            breakers,
            limits,
            children: Vec::new(),
            cancelled_children: Vec::new(),
        };
        let mut submitted = HashMap::new();
        let mut redriven = HashMap::new();
        let mut operated = HashMap::new();
        let mut events = Vec::new();
        let mut new_runs: Vec<(Uuid, CachedRun)> = Vec::new();
        let mut new_plans: Vec<(String, Arc<Plan>)> = Vec::new();
        let mut new_keys = Vec::new();
        let mut new_dead_letters = Vec::new();
        for (n, input) in inputs.iter().enumerate() {
            match input {
                Input::Submit { run, content, .. } => {
                    if let Some(&id) = run.idempotency_key.as_ref().and_then(|k| keyed.get(k)) {
                        submitted.insert(n, Ok(Submitted { id, replayed: true }));
                        continue;
                    }
                    if let Some(hash) = &run.latest {
                        let key = (run.namespace.clone(), run.definition.name.clone());
                        if latest.get(&key) != Some(hash) {
                            let (namespace, name) = key;
                            submitted.insert(n, Err(Error::StaleDefinition { namespace, name }));
                            continue;
                        }
                    }
                    if let Some((count, limit)) = in_flight.get_mut(&run.namespace) {
                        if *count >= *limit {
                            submitted.insert(
                                n,
                                Err(Error::RunQuota {
                                    namespace: run.namespace.clone(),
                                    limit: *limit,
                                }),
                            );
                            continue;
                        }
                        *count += 1;
                    }
                    let id = Uuid::now_v7();
                    let mut state = RunState::new(id, &run.plan, run.params.clone());
                    self.config.bound(&mut state);
                    state.subset = run.subset.clone();
                    state.priority = run.priority.unwrap_or(run.plan.priority);
                    let t = state.apply_limited(
                        &run.plan,
                        Event::Start,
                        now,
                        &mut pending.breakers,
                        &mut pending.limits,
                    );
                    if !run.subset.is_empty() {
                        // The history says why steps were skipped before anything ran.
                        pending.events.push(RunEvent {
                            run_id: id,
                            at: now,
                            actor: ENGINE_ACTOR.into(),
                            action: "subset".into(),
                            step_id: None,
                            detail: Some(json!({"only": run.subset.only, "skip": run.subset.skip})),
                        });
                    }
                    pending.effects(&run.plan, &state, &t);
                    pending.create(&run.plan, &state, &content.hash, &run.namespace);
                    // A known plan's content is stored: it was loaded, or committed with a run.
                    if !self.plans.contains_key(&content.hash)
                        && !new_plans.iter().any(|(h, _)| *h == content.hash)
                    {
                        new_plans.push((content.hash.clone(), run.plan.clone()));
                        let body = content.body.clone();
                        pending.batch.definitions.push((content.hash.clone(), body));
                    }
                    if let Some(key) = &run.idempotency_key {
                        keyed.insert(key.clone(), id);
                        new_keys.push((key.clone(), id));
                    }
                    submitted.insert(
                        n,
                        Ok(Submitted {
                            id,
                            replayed: false,
                        }),
                    );
                    let plan = run.plan.clone();
                    new_runs.push((
                        id,
                        CachedRun {
                            plan,
                            namespace: run.namespace.clone(),
                            stored: state.steps.len(),
                            state,
                            version: 0,
                        },
                    ));
                }
                Input::Result { result, .. } => {
                    if let Some(step_id) = result.step_id.strip_suffix(ESCALATION_SUFFIX) {
                        pending.events.push(notified(result, step_id, now));
                        continue;
                    }
                    let event = |step| Event::AttemptFinished {
                        step,
                        attempt: result.attempt,
                        task_id: result.task_id,
                        outcome: outcome_of(result),
                        worker: result.worker_id.clone(),
                        started_at: result.started_at,
                        finished_at: result.finished_at,
                    };
                    apply_to_step(
                        &mut self.runs,
                        &mut pending,
                        result.run_id,
                        &result.step_id,
                        event,
                    );
                }
                Input::Due { due, .. } => {
                    for d in due {
                        let Some(cached) = self.runs.get_mut(&d.run_id()) else {
                            continue;
                        };
                        let ended = |step, attempt, task_id, outcome| Event::AttemptFinished {
                            step,
                            attempt,
                            task_id,
                            outcome,
                            worker: String::new(),
                            started_at: now,
                            finished_at: now,
                        };
                        let failed = |step, attempt, task_id, message| {
                            ended(
                                step,
                                attempt,
                                task_id,
                                Outcome::Failure {
                                    message,
                                    retryable: true,
                                },
                            )
                        };
                        let event = match *d {
                            Due::Retry { step, attempt, .. } => Event::Wake { step, attempt },
                            Due::Release { step, .. } => Event::Release { step },
                            Due::RunTimeout { .. } => Event::TimedOut,
                            Due::Lease {
                                step,
                                attempt,
                                task_id,
                                ..
                            } => {
                                if step < cached.state.steps.len() {
                                    tracing::warn!(run_id = %cached.state.id, trace_id = %trace_id_of(cached.state.id), step_id = %cached.state.slot_id(&cached.plan, step), attempt, "lease expired");
                                }
                                let message = "lease expired: the worker stopped renewing it (crashed, stopped or cut off)";
                                ended(
                                    step,
                                    attempt,
                                    task_id,
                                    Outcome::Lost {
                                        message: message.into(),
                                    },
                                )
                            }
                            Due::Timeout {
                                step,
                                attempt,
                                task_id,
                                ..
                            } => {
                                let limit = (step < cached.state.steps.len())
                                    .then(|| {
                                        let n = &cached.plan.nodes[cached.state.node_of(step)];
                                        let strike = cached.state.steps[step].strike_of(n, attempt);
                                        n.attempt_timeout(strike.is_fallback())
                                    })
                                    .flatten()
                                    .unwrap_or_default();
                                let message = format!(
                                    "timed out: the attempt ran past its timeout of {limit:?}"
                                );
                                failed(step, attempt, task_id, message)
                            }
                            Due::NotStarted {
                                step,
                                attempt,
                                task_id,
                                ..
                            } => {
                                // A step index out of range is fenced off by the scheduler.
                                let message = match cached.state.steps.get(step) {
                                    Some(state) => {
                                        let n = &cached.plan.nodes[cached.state.node_of(step)];
                                        let strike = state.strike_of(n, attempt);
                                        let (agent, _) = n.target(strike.is_fallback());
                                        let limit = n
                                            .schedule_to_start
                                            .or(pending.schedule_to_start)
                                            .unwrap_or_default();
                                        match n.labels(strike.is_fallback()) {
                                            Some(labels) => format!(
                                                "no worker of agent {agent} with labels {} started the step within {limit:?}",
                                                flotilla_core::labels::describe(labels)
                                            ),
                                            None => format!(
                                                "no worker of agent {agent} started the step within {limit:?}"
                                            ),
                                        }
                                    }
                                    None => String::new(),
                                };
                                failed(step, attempt, task_id, message)
                            }
                        };
                        pending.apply(cached, event);
                    }
                }
                Input::DeadLetter { letter, task, .. } => {
                    new_dead_letters.push(letter.as_ref().clone());
                    pending.observed.push(Observation::DeadLettered {
                        agent: task.as_ref().map(|t| t.agent.clone()),
                    });
                    if let Some(task) = task {
                        let event = |step| Event::AttemptFinished {
                            step,
                            attempt: task.attempt,
                            task_id: task.task_id,
                            // A task that shared a crashing worker with a poison one is
                            // dead-lettered too: the first time, the step is only retried.
                            outcome: Outcome::Lost {
                                message: letter.reason.clone(),
                            },
                            worker: String::new(),
                            started_at: now,
                            finished_at: now,
                        };
                        apply_to_step(
                            &mut self.runs,
                            &mut pending,
                            task.run_id,
                            &task.step_id,
                            event,
                        );
                    }
                }
                Input::Operate {
                    run_id,
                    operation,
                    actor,
                    ..
                } => {
                    let answer = operate(&mut self.runs, &mut pending, *run_id, operation);
                    if answer.is_ok() {
                        events.push(RunEvent {
                            run_id: *run_id,
                            at: now,
                            actor: actor.clone(),
                            action: operation.name().to_string(),
                            step_id: operation.step().map(str::to_string),
                            detail: match operation {
                                Operation::Complete { output, .. } => {
                                    Some(serde_json::json!({ "output": output }))
                                }
                                _ => None,
                            },
                        });
                    }
                    operated.insert(n, answer);
                }
                Input::Redrive { .. } => {
                    let letters = redrive_letters.remove(&n).unwrap_or_default();
                    // Several letters of one step (a step may lose an attempt before it fails)
                    // are all settled by the one retry.
                    let mut retried: HashMap<(Option<Uuid>, Option<String>), u32> = HashMap::new();
                    let outcomes = letters
                        .into_iter()
                        .map(|letter| {
                            let key = (letter.run_id, letter.step_id.clone());
                            let outcome = match retried.get(&key) {
                                Some(&attempt) => Ok(attempt),
                                None => redrive_one(&mut self.runs, &mut pending, &letter),
                            };
                            if let Ok(attempt) = outcome {
                                retried.insert(key, attempt);
                            }
                            Redriven {
                                retried: outcome,
                                dead_letter: letter.id,
                                run_id: letter.run_id,
                                step_id: letter.step_id,
                            }
                        })
                        .collect::<Vec<_>>();
                    redriven.insert(n, outcomes);
                }
            }
        }
        let mut created = HashSet::new();
        self.sub_workflows(&tx, &mut pending, &mut created, &new_runs)
            .await?;
        let Pending {
            mut batch,
            changes,
            wakes: wakes_due,
            observed,
            events: engine_events,
            breakers,
            limits,
            ..
        } = pending;
        events.extend(engine_events);

        for (run_id, steps) in &changes {
            let cached = &self.runs[run_id];
            for &i in steps {
                let row = StepRow {
                    run_id: *run_id,
                    idx: i as i32,
                    state: cached.state.steps[i].clone(),
                };
                if i < cached.stored {
                    batch.step_updates.push(row);
                } else {
                    batch.new_steps.push((
                        step_ident(
                            &cached.plan,
                            &cached.state,
                            i,
                            self.config.schedule_to_start,
                        ),
                        row,
                    ));
                }
            }
            batch.run_updates.push(RunUpdate {
                id: *run_id,
                status: cached.state.status,
                ended_at: cached.state.ended_at,
                deadline: cached.state.deadline,
                error: cached.state.error.clone(),
            });
        }

        if !batch.is_empty() {
            db::write(&tx, &batch).await?;
        }
        crate::breakers::write(&tx, &breakers).await?;
        flotilla_store::limits::write(&tx, limits.changed()).await?;
        // The timer releases held steps once a breaker closes, or sends a probe once an open
        // one has cooled down; and once a limit has room again: an attempt ended, or a token
        // is due.
        let mut wakes_due = wakes_due;
        wakes_due.extend(
            breakers
                .moved()
                .map(|b| b.probe_at(&breakers.config).unwrap_or(now)),
        );
        wakes_due.extend(limits.freed().then_some(now));
        wakes_due.extend(limits.refills());
        dead_letters::insert(&tx, &new_dead_letters).await?;
        idempotency::record(&tx, &new_keys, now).await?;
        queries::record_events(&tx, &events).await?;
        let retried: Vec<Uuid> = redriven
            .values()
            .flatten()
            .filter(|r: &&Redriven| r.retried.is_ok())
            .map(|r| r.dead_letter)
            .collect();
        if !retried.is_empty() {
            dead_letters::mark_redriven(&tx, &retried, now).await?;
        }
        tx.commit().await.map_err(flotilla_store::Error::from)?;
        // The window the outbox exists for: committed, not yet published.
        flotilla_telemetry::failpoint("crash-after-commit");
        let changed = batch.new_runs.iter().map(|r| r.id);
        let changed = changed
            .chain(batch.run_updates.iter().map(|r| r.id))
            .collect();

        for run_id in changes.keys() {
            if let Some(cached) = self.runs.get_mut(run_id) {
                cached.version += 1;
                cached.stored = cached.state.steps.len();
            }
        }
        for (id, run) in new_runs {
            self.runs.insert(id, run);
        }
        self.plans.extend(new_plans);
        self.runs.retain(|_, c| !c.state.status.is_terminal());
        if self.runs.len() > self.config.max_cached_runs {
            // Evicting is always safe: a run missing from the cache is loaded again.
            let excess = self.runs.len() - self.config.max_cached_runs;
            let victims: Vec<Uuid> = self.runs.keys().take(excess).copied().collect();
            for id in victims {
                self.runs.remove(&id);
            }
        }
        Ok(Committed {
            outbox: batch.outbox,
            changed,
            submitted,
            redriven,
            operated,
            wakes: wakes_due,
            observed,
        })
    }

    /// Counts what a committed batch did.
    fn observe(&mut self, observed: Vec<Observation>) {
        for observation in observed {
            match observation {
                Observation::Dispatched {
                    agent,
                    label_queue,
                    attempt,
                    task_id,
                    at,
                } => {
                    self.metrics
                        .dispatched(&agent, attempt, label_queue.as_deref());
                    self.track_dispatch(task_id, at);
                }
                Observation::AttemptEnded {
                    agent,
                    task_id,
                    success,
                    reported,
                } => {
                    let dispatched = self.dispatched.remove(&task_id);
                    // A negative span (clocks of coordinator and worker apart) is not observed.
                    let (ran, waited) = reported.map_or((None, None), |(started, finished)| {
                        (
                            (finished - started).to_std().ok(),
                            dispatched.and_then(|at| (started - at).to_std().ok()),
                        )
                    });
                    self.metrics.attempt_ended(&agent, success, ran, waited);
                }
                Observation::AttemptCancelled { task_id } => {
                    self.dispatched.remove(&task_id);
                }
                Observation::Stale => self.metrics.stale_ignored(),
                Observation::Held { agent } => self.metrics.held(&agent),
                Observation::RunEnded { status, duration } => {
                    self.metrics.run_ended(status, duration);
                }
                Observation::DeadLettered { agent } => {
                    self.metrics.dead_lettered(agent.as_deref());
                }
                Observation::Traced(ended) => ended.emit(&self.dispatched),
            }
        }
    }

    /// Remembers when an attempt was dispatched. An attempt whose result another coordinator
    /// records never leaves the map here, so it is bounded: when full, the attempts dispatched
    /// over an hour ago are forgotten, and everything if that frees less than half. A forgotten
    /// attempt only goes without its queue wait observed.
    fn track_dispatch(&mut self, task_id: Uuid, at: DateTime<Utc>) {
        if self.dispatched.len() >= MAX_TRACKED_DISPATCHES {
            let horizon = at - chrono::Duration::hours(1);
            self.dispatched
                .retain(|_, dispatched| *dispatched > horizon);
            if self.dispatched.len() >= MAX_TRACKED_DISPATCHES / 2 {
                self.dispatched.clear();
            }
        }
        self.dispatched.insert(task_id, at);
    }

    /// (Re)loads the locked runs whose cached state is missing or older than `versions`.
    async fn refresh(
        &mut self,
        tx: &impl flotilla_store::GenericClient,
        versions: &HashMap<Uuid, i64>,
    ) -> Result<(), Error> {
        let stale: Vec<Uuid> = versions
            .iter()
            .filter(|(id, v)| self.runs.get(id).is_none_or(|c| c.version != **v))
            .map(|(id, _)| *id)
            .collect();
        if !stale.is_empty() {
            self.load(tx, &stale).await?;
        }
        Ok(())
    }

    /// Starts the runs of the sub-workflow attempts the batch dispatched, and cancels the runs
    /// of those that ended otherwise than by their run's own result (a timeout, a cancel), in
    /// the batch's transaction: so a child exists exactly when its parent's dispatch committed,
    /// and a cancel cannot be lost. Starting or cancelling a child may do either again, one level
    /// deeper each round. `created` holds the children created in this transaction.
    async fn sub_workflows(
        &mut self,
        tx: &impl flotilla_store::GenericClient,
        pending: &mut Pending<'_>,
        created: &mut HashSet<Uuid>,
        submitted: &[(Uuid, CachedRun)],
    ) -> Result<(), Error> {
        // Each definition is looked up once per batch and namespace, however many children
        // start from it (a `for_each` over a workflow step starts one per item).
        let mut resolved: HashMap<(String, SubWorkflow), Resolved> = HashMap::new();
        loop {
            let cancelled = std::mem::take(&mut pending.cancelled_children);
            let starts = std::mem::take(&mut pending.children);
            if cancelled.is_empty() && starts.is_empty() {
                return Ok(());
            }
            let mut stored: Vec<Uuid> = cancelled
                .iter()
                .filter(|id| !created.contains(*id))
                .copied()
                .collect();
            stored.sort_unstable();
            stored.dedup();
            // Another run may hold a child's lock while waiting for its parent's: Postgres then
            // breaks the deadlock by failing one batch, whose inputs are retried.
            let versions = db::lock_runs(tx, &stored).await?;
            self.refresh(tx, &versions).await?;
            for id in &cancelled {
                // Absent: it never started (its attempt failed instead).
                let Some(cached) = self.runs.get_mut(id) else {
                    continue;
                };
                if cached.state.status.is_terminal() {
                    continue;
                }
                tracing::info!(run_id = %id, "sub-workflow run cancelled: the attempt that started it ended");
                pending.apply(cached, Event::Cancel);
                pending.events.push(RunEvent {
                    run_id: *id,
                    at: pending.now,
                    actor: ENGINE_ACTOR.into(),
                    action: "cancel".into(),
                    step_id: None,
                    detail: Some(json!({"reason": "the step attempt that started it ended"})),
                });
            }
            for start in starts {
                // A child cancelled in the round that dispatched it is never started.
                if cancelled.contains(&start.id) {
                    continue;
                }
                // A child belongs to its parent's namespace, and its definition is found there.
                let parent = start.parent.run_id;
                let namespace = self
                    .runs
                    .get(&parent)
                    .or_else(|| {
                        submitted
                            .iter()
                            .find(|(id, _)| *id == parent)
                            .map(|(_, c)| c)
                    })
                    .map(|c| c.namespace.clone())
                    .ok_or_else(|| {
                        Error::NotRecorded(format!("the parent run {parent} is not at hand"))
                    })?;
                let key = (namespace, start.workflow.clone());
                if !resolved.contains_key(&key) {
                    let plan = self.sub_workflow_plan(tx, &key.0, &start.workflow).await?;
                    resolved.insert(key.clone(), plan);
                }
                let plan = match resolved[&key].clone() {
                    Ok(plan) => plan,
                    Err(why) => {
                        pending.not_started(&start, why);
                        continue;
                    }
                };
                let max = self.config.max_workflow_depth;
                if start.parent.depth > max {
                    let why = format!(
                        "it would nest {} deep; at most {max} levels are allowed (FLOTILLA_MAX_WORKFLOW_DEPTH)",
                        start.parent.depth
                    );
                    pending.not_started(&start, why);
                    continue;
                }
                let (hash, plan) = plan;
                let params = plan.run_params(start.params);
                let mut state = RunState::new(start.id, &plan, params);
                self.config.bound(&mut state);
                state.parent = Some(start.parent);
                state.priority = state.priority.max(start.priority);
                // Gated by the breakers the batch locked; one of an agent only a child calls
                // is not locked here (see ARCHITECTURE.md), and lets the step through.
                let t = state.apply_limited(
                    &plan,
                    Event::Start,
                    pending.now,
                    &mut pending.breakers,
                    &mut pending.limits,
                );
                pending.create(&plan, &state, &hash, &key.0);
                pending.effects(&plan, &state, &t);
                tracing::info!(run_id = %start.id, workflow = %plan.name, "sub-workflow run started");
                created.insert(start.id);
                self.runs.insert(
                    start.id,
                    CachedRun {
                        plan,
                        namespace: key.0,
                        stored: state.steps.len(),
                        state,
                        version: 0,
                    },
                );
            }
        }
    }

    /// Locks the run quotas of the namespaces the batch submits runs to (those with a quota of
    /// runs in flight), after every other lock of the batch, and answers per namespace its runs
    /// in flight and its quota. A replay of an idempotency key (`keyed`) starts nothing, so it
    /// takes no lock.
    async fn lock_run_quotas(
        &self,
        tx: &impl flotilla_store::GenericClient,
        inputs: &[Input],
        keyed: &HashMap<String, Uuid>,
    ) -> Result<HashMap<String, (u64, u64)>, Error> {
        let quota = |namespace: &str| self.config.quotas.of(namespace).runs_in_flight;
        let limited: Vec<String> = inputs
            .iter()
            .filter_map(|i| match i {
                Input::Submit { run, .. }
                    if !run
                        .idempotency_key
                        .as_ref()
                        .is_some_and(|k| keyed.contains_key(k)) =>
                {
                    quota(&run.namespace).map(|_| run.namespace.clone())
                }
                _ => None,
            })
            .collect();
        if limited.is_empty() {
            return Ok(HashMap::new());
        }
        let counts = quotas::lock_runs_in_flight(tx, &limited).await?;
        Ok(counts
            .into_iter()
            .filter_map(|(namespace, count)| {
                let limit = quota(&namespace)?;
                Some((namespace, (u64::try_from(count).unwrap_or(0), limit)))
            })
            .collect())
    }

    /// The registered definition a sub-workflow step names, as its content hash and plan; or
    /// why it cannot run.
    async fn sub_workflow_plan(
        &mut self,
        tx: &impl flotilla_store::GenericClient,
        namespace: &str,
        workflow: &SubWorkflow,
    ) -> Result<Resolved, Error> {
        let found = match &workflow.version {
            Some(version) => definitions::version(tx, namespace, &workflow.name, version).await?,
            None => definitions::latest(tx, namespace, &workflow.name).await?,
        };
        let Some((registered, body)) = found else {
            return Ok(Err(match &workflow.version {
                Some(version) => format!(
                    "workflow `{}` has no version or revision `{version}`",
                    workflow.name
                ),
                None => format!("no workflow named `{}` is registered", workflow.name),
            }));
        };
        if let Some(plan) = self.plans.get(&registered.hash) {
            return Ok(Ok((registered.hash, plan.clone())));
        }
        let plan = match Definition::from_value(body)
            .map_err(|e| e.to_string())
            .and_then(|d| Plan::compile(&d).map_err(|e| e.to_string()))
        {
            Ok(plan) => Arc::new(plan),
            Err(e) => {
                return Ok(Err(format!(
                    "workflow `{}` is unreadable: {e}",
                    workflow.name
                )));
            }
        };
        self.plans.insert(registered.hash.clone(), plan.clone());
        Ok(Ok((registered.hash, plan)))
    }

    /// Loads runs whose cached state is missing or outdated.
    async fn load(
        &mut self,
        client: &impl flotilla_store::GenericClient,
        ids: &[Uuid],
    ) -> Result<(), Error> {
        let stored = db::load_runs(client, ids).await?;
        let missing: Vec<String> = stored
            .iter()
            .map(|r| r.definition_hash.clone())
            .filter(|h| !self.plans.contains_key(h))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            for (hash, body) in db::load_definitions(client, &missing).await? {
                let plan = Definition::from_value(body)
                    .map_err(|e| e.to_string())
                    .and_then(|d| Plan::compile(&d).map_err(|e| e.to_string()))
                    .map_err(|e| {
                        flotilla_store::Error::Corrupt(format!("definition {hash}: {e}"))
                    })?;
                self.plans.insert(hash, Arc::new(plan));
            }
        }
        for run in stored {
            let plan = self.plans[&run.definition_hash].clone();
            if run.steps.len() < plan.nodes.len() {
                return Err(flotilla_store::Error::Corrupt(format!(
                    "run {} has {} steps but its definition has {}",
                    run.id,
                    run.steps.len(),
                    plan.nodes.len()
                ))
                .into());
            }
            let mut state = RunState::restore(
                run.id,
                &plan,
                run.status,
                run.params,
                run.steps,
                run.ended_at,
            );
            self.config.bound(&mut state);
            state.deadline = run.deadline;
            state.error = run.error;
            state.subset = run.subset;
            state.priority = run.priority;
            state.parent = run.parent;
            self.runs.insert(
                run.id,
                CachedRun {
                    plan,
                    namespace: run.namespace,
                    stored: state.steps.len(),
                    state,
                    version: run.version,
                },
            );
        }
        Ok(())
    }
}

/// The rows one batch will write, built up input by input.
struct Pending<'a> {
    names: &'a QueueNames,
    /// The coordinator's default `schedule_to_start`.
    schedule_to_start: Option<Duration>,
    now: DateTime<Utc>,
    batch: Batch,
    /// The steps each existing run changed; each such run is written and its version bumped.
    changes: BTreeMap<Uuid, Vec<usize>>,
    /// Due times of the retries scheduled.
    wakes: Vec<DateTime<Utc>>,
    /// What the metrics count once the batch has committed.
    observed: Vec<Observation>,
    /// What the engine itself did that goes into runs' histories (strikes, notifications).
    events: Vec<RunEvent>,
    /// The breakers of the agents the batch's runs call, locked.
    breakers: Breakers,
    /// The limits of the agents the batch's runs call, locked.
    limits: Limits,
    /// Sub-workflow attempts dispatched, whose runs are still to be created.
    children: Vec<ChildStart>,
    /// The runs of sub-workflow attempts that ended otherwise than with their run: to cancel.
    cancelled_children: Vec<Uuid>,
}

/// A sub-workflow attempt to start: its run's id is the attempt's task id, so the run exists
/// once, exactly when the dispatch committed.
struct ChildStart {
    id: Uuid,
    parent: ParentLink,
    workflow: SubWorkflow,
    /// The step's rendered params: the child's params over its definition's defaults.
    params: Map<String, Value>,
    /// The parent run's: a child runs at least as urgently as its parent.
    priority: Priority,
}

/// Something a batch did that the metrics count; counted only once the batch has committed,
/// so that nothing rolled back is.
enum Observation {
    Dispatched {
        agent: String,
        /// The queue of its label set, when its step asked for labels.
        label_queue: Option<String>,
        attempt: u32,
        task_id: Uuid,
        at: DateTime<Utc>,
    },
    AttemptEnded {
        agent: String,
        task_id: Uuid,
        success: bool,
        /// When the worker says the attempt started and finished; `None` when the coordinator
        /// ended it (lease, timeout, dead letter).
        reported: Option<(DateTime<Utc>, DateTime<Utc>)>,
    },
    AttemptCancelled {
        task_id: Uuid,
    },
    Stale,
    /// A step was held by its agent's open circuit breaker.
    Held {
        agent: String,
    },
    RunEnded {
        status: &'static str,
        duration: Duration,
    },
    DeadLettered {
        agent: Option<String>,
    },
    /// A span to emit; before the observation of the same attempt, which forgets its dispatch.
    Traced(crate::trace::Ended),
}

impl Pending<'_> {
    /// Applies an event to a cached run and records what changed.
    fn apply(&mut self, cached: &mut CachedRun, event: Event) -> Transition {
        let t = cached.state.apply_limited(
            &cached.plan,
            event,
            self.now,
            &mut self.breakers,
            &mut self.limits,
        );
        if !t.changed.is_empty() || t.run_changed {
            let entry = self.changes.entry(cached.state.id).or_default();
            entry.extend(&t.changed);
            entry.sort_unstable();
            entry.dedup();
        }
        self.effects(&cached.plan, &cached.state, &t);
        t
    }

    /// Rows that create a new run with its steps.
    fn create(&mut self, plan: &Plan, state: &RunState, definition_hash: &str, namespace: &str) {
        self.batch.new_runs.push(db::NewRun {
            id: state.id,
            name: plan.name.clone(),
            definition_hash: definition_hash.to_string(),
            status: state.status,
            params: state.params.clone(),
            created_at: self.now,
            ended_at: state.ended_at,
            deadline: state.deadline,
            error: state.error.clone(),
            subset: state.subset.clone(),
            priority: state.priority,
            parent: state.parent.clone(),
            namespace: namespace.to_string(),
        });
        for (idx, step) in state.steps.iter().enumerate() {
            self.batch.new_steps.push((
                step_ident(plan, state, idx, self.schedule_to_start),
                StepRow {
                    run_id: state.id,
                    idx: idx as i32,
                    state: step.clone(),
                },
            ));
        }
    }

    /// Turns a transition's effects into rows of the batch.
    fn effects(&mut self, plan: &Plan, state: &RunState, t: &Transition) {
        for &i in &t.changed {
            if let Some(at) = state.steps[i].wake_at {
                self.wakes.push(at);
            }
        }
        if let (true, Some(at)) = (t.run_changed, state.deadline) {
            self.wakes.push(at);
        }
        for effect in &t.effects {
            match effect {
                Effect::Dispatch {
                    step,
                    attempt,
                    task_id,
                } => {
                    let node = &plan.nodes[state.node_of(*step)];
                    let step_id = state.slot_id(plan, *step);
                    let strike = state.steps[*step].strike_of(node, *attempt);
                    let (agent, action) = node.target(strike.is_fallback());
                    self.batch.attempts_started.push(AttemptStart {
                        run_id: state.id,
                        idx: *step as i32,
                        attempt: *attempt as i32,
                        task_id: *task_id,
                        dispatched_at: self.now,
                        strike,
                        agent: agent.to_string(),
                    });
                    // The scheduler rendered these before it dispatched; they render the same
                    // now, as nothing they read can change in between.
                    let params = state.task_params(plan, *step).unwrap_or_else(|e| {
                        tracing::error!(run_id = %state.id, trace_id = %trace_id_of(state.id), %step_id, error = %e, "params no longer render");
                        node.params.clone()
                    });
                    if let Some(workflow) = node.sub_workflow(strike.is_fallback()) {
                        tracing::debug!(run_id = %state.id, %step_id, attempt, workflow = %workflow.name, "dispatch sub-workflow");
                        self.children.push(ChildStart {
                            id: *task_id,
                            parent: ParentLink {
                                run_id: state.id,
                                step_id,
                                attempt: *attempt,
                                depth: state.depth() + 1,
                                started_at: self.now,
                            },
                            workflow: workflow.clone(),
                            params,
                            priority: state.priority,
                        });
                        continue;
                    }
                    let task = Task {
                        v: PROTOCOL_VERSION,
                        task_id: *task_id,
                        run_id: state.id,
                        step_id: step_id.clone(),
                        attempt: *attempt,
                        agent: agent.to_string(),
                        action: action.to_string(),
                        idempotency_key: format!("{}:{step_id}", state.id),
                        params,
                        run_params: state.params.clone(),
                        inputs: state.inputs_for(plan, *step),
                        dispatched_at: self.now,
                        heartbeat_timeout_ms: node.heartbeat_timeout.map(|t| t.as_millis() as u64),
                        ack_early: node.acks_early(strike.is_fallback()),
                    };
                    let labels = node
                        .labels(strike.is_fallback())
                        .cloned()
                        .unwrap_or_default();
                    let queue = self
                        .names
                        .tasks(agent, &labels, state.priority == Priority::High);
                    // The agent's own queues are always read for its depth; these are extra.
                    let label_queue = (!labels.is_empty()).then(|| queue.clone());
                    self.batch.outbox.push(OutboxRow {
                        id: *task_id,
                        routing_key: queue,
                        kind: "task".into(),
                        correlation_id: Some(task_id.to_string()),
                        reply_to: Some(self.names.results()),
                        body: serde_json::to_vec(&task).expect("a task always serialises"),
                        created_at: self.now,
                    });
                    tracing::debug!(run_id = %state.id, trace_id = %trace_id_of(state.id), %step_id, attempt, "dispatch");
                    self.observed.push(Observation::Dispatched {
                        agent: agent.to_string(),
                        label_queue,
                        attempt: *attempt,
                        task_id: *task_id,
                        at: self.now,
                    });
                }
                Effect::AttemptEnded {
                    step,
                    attempt,
                    task_id,
                    success,
                    error,
                    worker,
                    started_at,
                    finished_at,
                } => {
                    self.batch.attempts_ended.push(AttemptEnd {
                        task_id: *task_id,
                        success: *success,
                        started_at: *started_at,
                        finished_at: *finished_at,
                        worker: worker.clone(),
                        error: error.clone(),
                    });
                    let node = &plan.nodes[state.node_of(*step)];
                    let strike = state.steps[*step].strike_of(node, *attempt);
                    let sub_workflow = node.sub_workflow(strike.is_fallback()).is_some();
                    // Ended by the engine (its timeout), not by its run's result: the run stops.
                    if sub_workflow && worker.is_empty() {
                        self.cancelled_children.push(*task_id);
                    }
                    self.observed.extend(
                        crate::trace::when_enabled(|| crate::trace::Ended::Attempt {
                            run_id: state.id,
                            step_id: state.slot_id(plan, *step),
                            agent: node.target(strike.is_fallback()).0.to_string(),
                            attempt: *attempt,
                            task_id: *task_id,
                            worker: worker.clone(),
                            error: error.clone(),
                            started_at: (!worker.is_empty()).then_some(*started_at),
                            finished_at: *finished_at,
                        })
                        .map(Observation::Traced),
                    );
                    if sub_workflow {
                        continue;
                    }
                    self.observed.push(Observation::AttemptEnded {
                        agent: node.target(strike.is_fallback()).0.to_string(),
                        task_id: *task_id,
                        success: *success,
                        // The engine ends attempts itself with no worker named.
                        reported: (!worker.is_empty()).then_some((*started_at, *finished_at)),
                    });
                }
                Effect::Stale {
                    step,
                    attempt,
                    reason,
                } => {
                    let step_id = if *step < state.steps.len() {
                        state.slot_id(plan, *step)
                    } else {
                        format!("#{step}")
                    };
                    tracing::info!(run_id = %state.id, trace_id = %trace_id_of(state.id), %step_id, attempt, reason, "stale result ignored");
                    self.observed.push(Observation::Stale);
                }
                Effect::Strike { step, strike } => self.strike(plan, state, *step, *strike),
                Effect::Held {
                    step,
                    agent,
                    by_limit: true,
                } => {
                    let step_id = state.slot_id(plan, *step);
                    tracing::debug!(run_id = %state.id, %step_id, agent = %agent, "step held: limit reached");
                }
                Effect::Held {
                    step,
                    agent,
                    by_limit: false,
                } => {
                    let step_id = state.slot_id(plan, *step);
                    tracing::info!(run_id = %state.id, %step_id, agent = %agent, "step held: circuit open");
                    self.observed.push(Observation::Held {
                        agent: agent.clone(),
                    });
                }
                Effect::Refused(reason) => {
                    tracing::info!(run_id = %state.id, trace_id = %trace_id_of(state.id), reason = %reason, "operator request refused");
                }
                Effect::Cancelled {
                    step,
                    attempt,
                    task_id,
                } => {
                    let step_id = state.slot_id(plan, *step);
                    tracing::info!(run_id = %state.id, trace_id = %trace_id_of(state.id), %step_id, attempt, "running attempt cancelled");
                    self.observed
                        .push(Observation::AttemptCancelled { task_id: *task_id });
                    let node = &plan.nodes[state.node_of(*step)];
                    let strike = state.steps[*step].strike_of(node, *attempt);
                    if node.sub_workflow(strike.is_fallback()).is_some() {
                        self.cancelled_children.push(*task_id);
                        continue;
                    }
                    // Tells the worker running it to stop; sent after the commit like a task.
                    let cancel = Cancel {
                        v: PROTOCOL_VERSION,
                        task_id: *task_id,
                        run_id: state.id,
                        step_id,
                        attempt: *attempt,
                        reason: "the run was cancelled".into(),
                        sent_at: self.now,
                    };
                    self.batch.outbox.push(OutboxRow {
                        id: Uuid::now_v7(),
                        routing_key: self.names.control(),
                        kind: "cancel".into(),
                        correlation_id: Some(task_id.to_string()),
                        reply_to: None,
                        body: serde_json::to_vec(&cancel).expect("a cancel always serialises"),
                        created_at: self.now,
                    });
                }
                Effect::RunEnded(status) => {
                    tracing::info!(run_id = %state.id, trace_id = %trace_id_of(state.id), workflow = %plan.name, status = status.as_str(), "run ended");
                    let duration = run_duration(state, self.now);
                    self.observed.extend(
                        crate::trace::run(state, &plan.name, status.as_str(), duration, self.now)
                            .map(Observation::Traced),
                    );
                    self.observed.push(Observation::RunEnded {
                        status: status.as_str(),
                        duration,
                    });
                    if let Some(parent) = &state.parent {
                        let outcome = state.outcome_for_parent(plan);
                        self.report_to_parent(state.id, parent, outcome);
                    }
                }
            }
        }
    }
}

impl Pending<'_> {
    /// Sends a sub-workflow run's end to the attempt that started it as that attempt's result:
    /// through the outbox and the results queue, committed with the end, and applied (fenced
    /// like any result) by whichever coordinator consumes it.
    fn report_to_parent(&mut self, run_id: Uuid, parent: &ParentLink, outcome: Outcome) {
        let (status, output, error) = match outcome {
            Outcome::Success(output) => (ResultStatus::Success, Some(output), None),
            Outcome::Failure { message, retryable } => (
                ResultStatus::Failure,
                None,
                Some(TaskError { message, retryable }),
            ),
            Outcome::Lost { message } => (
                ResultStatus::Failure,
                None,
                Some(TaskError {
                    message,
                    retryable: true,
                }),
            ),
        };
        let result = TaskResult {
            v: PROTOCOL_VERSION,
            task_id: run_id,
            run_id: parent.run_id,
            step_id: parent.step_id.clone(),
            attempt: parent.attempt,
            status,
            output,
            error,
            worker_id: ENGINE_ACTOR.into(),
            started_at: parent.started_at,
            finished_at: self.now,
        };
        self.batch.outbox.push(OutboxRow {
            id: Uuid::now_v7(),
            routing_key: self.names.results(),
            kind: "result".into(),
            correlation_id: Some(run_id.to_string()),
            reply_to: None,
            body: serde_json::to_vec(&result).expect("a result always serialises"),
            created_at: self.now,
        });
    }

    /// A sub-workflow attempt whose run could not start fails, with the reason, as if its run
    /// had failed; retrying cannot help.
    fn not_started(&mut self, start: &ChildStart, why: String) {
        tracing::warn!(run_id = %start.parent.run_id, step_id = %start.parent.step_id, workflow = %start.workflow.name, reason = %why, "sub-workflow not started");
        let outcome = Outcome::Failure {
            message: format!("sub-workflow `{}` not started: {why}", start.workflow.name),
            retryable: false,
        };
        self.report_to_parent(start.id, &start.parent, outcome);
    }

    /// Records a step's move to its fallback or its escalation in the run's history; an
    /// escalation also queues its notification, in the outbox like every message.
    fn strike(&mut self, plan: &Plan, state: &RunState, step: usize, strike: Strike) {
        let node = &plan.nodes[state.node_of(step)];
        let step_id = state.slot_id(plan, step);
        let s = &state.steps[step];
        let (action, detail) = match strike {
            Strike::Fallback => {
                let (agent, action) = node.target(true);
                tracing::info!(run_id = %state.id, trace_id = %trace_id_of(state.id), %step_id, agent, action, "retries exhausted; the fallback runs");
                (
                    "fallback",
                    json!({"strike": 2, "agent": agent, "action": action, "error": s.error}),
                )
            }
            _ => {
                let channel = node.escalate.clone().unwrap_or_default();
                tracing::warn!(run_id = %state.id, trace_id = %trace_id_of(state.id), %step_id, channel = %channel, "step escalated; it waits for an operator");
                let message = format!(
                    "Flotilla run {} ({}): step `{}` needs attention after {} attempts: {}",
                    state.id,
                    plan.name,
                    step_id,
                    s.attempt,
                    s.error.as_deref().unwrap_or("it failed")
                );
                let mut params = Map::new();
                params.insert("channel".into(), json!(channel));
                params.insert("message".into(), json!(message));
                params.insert("step".into(), json!(step_id));
                let task_id = Uuid::new_v4();
                let task = Task {
                    v: PROTOCOL_VERSION,
                    task_id,
                    run_id: state.id,
                    step_id: format!("{step_id}{ESCALATION_SUFFIX}"),
                    attempt: s.attempt.max(1),
                    agent: NOTIFY_AGENT.to_string(),
                    action: NOTIFY_ACTION.to_string(),
                    idempotency_key: format!("{}:{step_id}:escalation:{}", state.id, s.attempt),
                    params,
                    run_params: state.params.clone(),
                    inputs: Map::new(),
                    dispatched_at: self.now,
                    heartbeat_timeout_ms: None,
                    ack_early: false,
                };
                self.batch.outbox.push(OutboxRow {
                    id: task_id,
                    routing_key: self.names.agent(NOTIFY_AGENT),
                    kind: "task".into(),
                    correlation_id: Some(task_id.to_string()),
                    reply_to: Some(self.names.results()),
                    body: serde_json::to_vec(&task).expect("a task always serialises"),
                    created_at: self.now,
                });
                (
                    "escalate",
                    json!({"strike": 3, "channel": channel, "error": s.error}),
                )
            }
        };
        self.events.push(RunEvent {
            run_id: state.id,
            at: self.now,
            actor: ENGINE_ACTOR.into(),
            action: action.into(),
            step_id: Some(step_id),
            detail: Some(detail),
        });
    }
}

/// A run's trace id, for the `trace_id` field of the log lines about it.
fn trace_id_of(run_id: Uuid) -> String {
    flotilla_telemetry::trace::trace_id_of(run_id.as_u128())
}

/// Who the engine's own entries in a run's history name.
const ENGINE_ACTOR: &str = "flotilla";

/// The history entry for the result of an escalation's notification.
fn notified(result: &TaskResult, step_id: &str, now: DateTime<Utc>) -> RunEvent {
    let (action, detail) = match result.status {
        ResultStatus::Success => ("notified", result.output.clone()),
        // The notify agent serves no cancellation; a cancelled notice was not sent either.
        ResultStatus::Failure | ResultStatus::Cancelled => (
            "notify_failed",
            result.error.as_ref().map(|e| json!({"error": e.message})),
        ),
    };
    RunEvent {
        run_id: result.run_id,
        at: now,
        actor: ENGINE_ACTOR.into(),
        action: action.into(),
        step_id: Some(step_id.to_string()),
        detail,
    }
}

/// Applies the event built for a step named by id to its run, if both exist.
fn apply_to_step(
    runs: &mut HashMap<Uuid, CachedRun>,
    pending: &mut Pending<'_>,
    run_id: Uuid,
    step_id: &str,
    event: impl FnOnce(usize) -> Event,
) {
    let Some(cached) = runs.get_mut(&run_id) else {
        tracing::warn!(%run_id, trace_id = %trace_id_of(run_id), step_id, "message for an unknown run ignored");
        return;
    };
    let Some(step) = cached.state.slot_of(&cached.plan, step_id) else {
        tracing::warn!(%run_id, trace_id = %trace_id_of(run_id), step_id, "message for an unknown step ignored");
        return;
    };
    pending.apply(cached, event(step));
}

/// The fixed identity of a slot's row: its step id, agent and action, and its limits.
fn step_ident(
    plan: &Plan,
    state: &RunState,
    slot: usize,
    schedule_to_start: Option<Duration>,
) -> StepIdent {
    let node = &plan.nodes[state.node_of(slot)];
    let millis = |t: Duration| i32::try_from(t.as_millis()).unwrap_or(i32::MAX);
    StepIdent {
        step_id: state.slot_id(plan, slot),
        agent: node.agent.clone(),
        action: node.action.clone(),
        lease_ms: node.heartbeat_timeout.map(millis),
        start_ms: node.schedule_to_start.or(schedule_to_start).map(millis),
        workflow: node.workflow.as_ref().map(|w| w.name.clone()),
        labels: node.labels(false).map(|l| json!(l)),
    }
}

/// Applies an operator's action to its run.
fn operate(
    runs: &mut HashMap<Uuid, CachedRun>,
    pending: &mut Pending<'_>,
    run_id: Uuid,
    operation: &Operation,
) -> Result<RunStatus, Error> {
    let cached = runs
        .get_mut(&run_id)
        .ok_or_else(|| Error::NotFound(format!("no run has id {run_id}")))?;
    let step = |id: &str| {
        cached
            .plan
            .node_index(id)
            .ok_or_else(|| Error::NotFound(format!("run {run_id} has no step `{id}`")))
    };
    let event = match operation {
        Operation::Cancel => Event::Cancel,
        Operation::Pause => Event::Pause,
        Operation::Resume => Event::Resume,
        Operation::Rollback => Event::Rollback,
        Operation::Retry { step: None } => Event::Retry { step: None },
        Operation::Retry { step: Some(id) } => Event::Retry {
            step: Some(step(id)?),
        },
        Operation::Skip { step: id } => Event::Settle {
            step: step(id)?,
            output: None,
        },
        Operation::Complete { step: id, output } => Event::Settle {
            step: step(id)?,
            output: Some(output.clone()),
        },
    };
    let t = pending.apply(cached, event);
    if let Some(Effect::Refused(reason)) = t.effects.first() {
        return Err(Error::Refused(reason.clone()));
    }
    Ok(cached.state.status)
}

/// Retries the step of one dead letter; answers its new attempt, or why it was not retried.
fn redrive_one(
    runs: &mut HashMap<Uuid, CachedRun>,
    pending: &mut Pending<'_>,
    letter: &DeadLetter,
) -> Result<u32, String> {
    let (Some(run_id), Some(step_id)) = (letter.run_id, letter.step_id.as_deref()) else {
        return Err("the dead letter is not a readable task".into());
    };
    let cached = runs
        .get_mut(&run_id)
        .ok_or_else(|| format!("run {run_id} does not exist"))?;
    let step = cached
        .plan
        .node_index(step_id)
        // An instance of a `for_each` step is retried through its step.
        .or_else(|| {
            let slot = cached.state.slot_of(&cached.plan, step_id)?;
            Some(cached.state.node_of(slot))
        })
        .ok_or_else(|| format!("run {run_id} has no step `{step_id}`"))?;
    let t = pending.apply(cached, Event::Retry { step: Some(step) });
    if let Some(Effect::Refused(reason)) = t.effects.first() {
        return Err(reason.clone());
    }
    Ok(cached.state.steps[step].attempt)
}

/// How long a run took from its creation to its end (`now` if it has no end time). Submitted
/// runs' ids are UUIDv7 minted in the transaction that created the run, so the id carries its
/// creation time; a sub-workflow's run keeps it in its parent link.
fn run_duration(state: &RunState, now: DateTime<Utc>) -> Duration {
    let created = state.parent.as_ref().map(|p| p.started_at).or_else(|| {
        state.id.get_timestamp().and_then(|t| {
            let (secs, nanos) = t.to_unix();
            DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
        })
    });
    created
        .and_then(|created| (state.ended_at.unwrap_or(now) - created).to_std().ok())
        .unwrap_or_default()
}

struct Committed {
    outbox: Vec<OutboxRow>,
    /// The runs the batch created or changed, for the watchers.
    changed: Vec<Uuid>,
    /// What each submission did, by its position in the batch.
    submitted: HashMap<usize, Result<Submitted, Error>>,
    /// What each redrive did, by its position in the batch.
    redriven: HashMap<usize, Vec<Redriven>>,
    /// What each operator action did, by its position in the batch.
    operated: HashMap<usize, Result<RunStatus, Error>>,
    wakes: Vec<DateTime<Utc>>,
    observed: Vec<Observation>,
}

/// The plans of a batch: of the runs it touches that are cached, and of its submissions.
fn batch_plans<'a>(
    runs: &'a HashMap<Uuid, CachedRun>,
    touched: &'a [Uuid],
    inputs: &'a [Input],
) -> impl Iterator<Item = &'a Plan> {
    let submitted = inputs.iter().filter_map(|i| match i {
        Input::Submit { run, .. } => Some(run.plan.as_ref()),
        _ => None,
    });
    touched
        .iter()
        .filter_map(|id| runs.get(id).map(|c| c.plan.as_ref()))
        .chain(submitted)
}

/// Acks the messages of committed batches, taken in the order the batches committed. Of those
/// ready, the last of each consumer channel acks itself and every earlier delivery of its
/// channel in one frame (`multiple`): one ack, and one settlement in the queue's log, where there
/// were as many as messages. That is right because every earlier delivery of those channels is
/// settled already or ready here: the results and dead-letter consumers hand the engine each of
/// their deliveries in order (but an unreadable result, which the results consumer acks itself
/// before it takes the next), and a batch that fails nacks its messages before the next batch
/// is taken.
async fn acknowledge(mut committed: mpsc::UnboundedReceiver<Vec<Delivery>>) {
    let mut ready = Vec::new();
    while committed.recv_many(&mut ready, 1024).await > 0 {
        for delivery in Delivery::last_of_each_channel(ready.drain(..).flatten()) {
            if let Err(e) = delivery.ack_multiple().await {
                tracing::warn!(error = %e, "could not ack recorded messages");
            }
        }
    }
}

/// Tells the watchers that `runs` changed; a failure only makes them see it late.
async fn announce(store: &Store, runs: Vec<Uuid>) {
    if runs.is_empty() {
        return;
    }
    let announced = match store.client().await {
        Ok(client) => flotilla_store::events::announce(&client, runs).await,
        Err(e) => Err(e),
    };
    if let Err(e) = announced {
        tracing::warn!(error = %e, "could not announce the runs a batch changed");
    }
}

fn outcome_of(result: &TaskResult) -> Outcome {
    match result.status {
        ResultStatus::Success => Outcome::Success(result.output.clone().unwrap_or(Value::Null)),
        // A cancelled attempt's result is fenced off (its step is no longer running); should
        // one still count, it counts as the failure it is.
        ResultStatus::Failure | ResultStatus::Cancelled => {
            let (message, retryable) = result.error.as_ref().map_or(
                (
                    "the worker reported a failure without a message".to_string(),
                    true,
                ),
                |e| (e.message.clone(), e.retryable),
            );
            Outcome::Failure { message, retryable }
        }
    }
}
