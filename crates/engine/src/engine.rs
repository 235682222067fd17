//! The batching state-machine loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_broker::Delivery;
use flotilla_core::scheduler::Transition;
use flotilla_core::{Definition, Effect, Event, Outcome, Plan, RunState};
use flotilla_proto::{PROTOCOL_VERSION, QueueNames, ResultStatus, Task, TaskResult};
use flotilla_store::Store;
use flotilla_store::definitions::Content;
use flotilla_store::engine::{
    self as db, AttemptEnd, AttemptStart, Batch, OutboxRow, RunUpdate, StepIdent, StepRow,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
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
}

impl Error {
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Store(e) => e.is_unavailable(),
            Error::ShuttingDown | Error::NotRecorded(_) => true,
        }
    }
}

/// Tuning of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub names: QueueNames,
    /// The most inputs handled in one transaction.
    pub max_batch: usize,
    /// The most runs whose state is kept in memory between batches.
    pub max_cached_runs: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            names: QueueNames::default(),
            max_batch: 512,
            max_cached_runs: 20_000,
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
}

pub(crate) enum Input {
    Submit {
        run: Box<NewRun>,
        reply: oneshot::Sender<Result<Uuid, Error>>,
    },
    Result {
        result: Box<TaskResult>,
        delivery: Box<Delivery>,
    },
    /// Retries that are due; `done` is answered once they are handled, so the timer does not
    /// hand the same ones over twice.
    Wakes {
        wakes: Vec<Wake>,
        done: oneshot::Sender<()>,
    },
}

/// A waiting step whose retry is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    pub run_id: Uuid,
    pub step: usize,
    /// The attempt that failed.
    pub attempt: u32,
}

/// Talks to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    inputs: mpsc::Sender<Input>,
}

impl EngineHandle {
    /// Creates a run and dispatches its first steps; returns once that is committed.
    pub async fn submit(&self, run: NewRun) -> Result<Uuid, Error> {
        let (reply, answer) = oneshot::channel();
        self.inputs
            .send(Input::Submit {
                run: Box::new(run),
                reply,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Hands due retries to the engine and waits until they are handled.
    pub async fn wake(&self, wakes: Vec<Wake>) -> Result<(), Error> {
        let (done, handled) = oneshot::channel();
        self.send(Input::Wakes { wakes, done }).await?;
        handled.await.map_err(|_| Error::ShuttingDown)
    }

    pub(crate) async fn send(&self, input: Input) -> Result<(), Error> {
        self.inputs
            .send(input)
            .await
            .map_err(|_| Error::ShuttingDown)
    }
}

struct CachedRun {
    plan: Arc<Plan>,
    state: RunState,
    version: i64,
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
}

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
        };
        (engine, EngineHandle { inputs: tx })
    }

    /// Runs until every [`EngineHandle`] is dropped, or `shutdown` is cancelled and the inputs
    /// already queued are handled.
    pub async fn run(mut self, shutdown: CancellationToken) {
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
            if let Err(e) = self.handle(&mut batch).await {
                tracing::error!(error = %e, "engine batch failed; its inputs will be retried");
                // Postgres is likely away: give it a moment instead of spinning.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            batch.clear();
        }
        tracing::info!("engine stopped");
    }

    async fn handle(&mut self, inputs: &mut Vec<Input>) -> Result<(), Error> {
        let touched: Vec<Uuid> = {
            let mut ids: Vec<Uuid> = inputs
                .iter()
                .flat_map(|i| match i {
                    Input::Result { result, .. } => vec![result.run_id],
                    Input::Wakes { wakes, .. } => wakes.iter().map(|w| w.run_id).collect(),
                    Input::Submit { .. } => Vec::new(),
                })
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let outcome = self.transact(inputs, &touched).await;
        match outcome {
            Ok(done) => {
                if !done.outbox.is_empty() {
                    // The relay outlives the engine; a closed channel only happens at exit, and
                    // then the sweeper of the next start publishes these rows.
                    let _ = self.outbox.send(done.outbox);
                }
                for at in done.wakes {
                    let _ = self.wake_hint.send(at);
                }
                for (n, input) in inputs.drain(..).enumerate() {
                    match input {
                        Input::Submit { reply, .. } => {
                            let answer = done.submitted.get(&n).copied().ok_or_else(|| {
                                Error::NotRecorded("the engine lost track of the submission".into())
                            });
                            let _ = reply.send(answer);
                        }
                        Input::Result { delivery, .. } => {
                            if let Err(e) = delivery.ack().await {
                                // The result will come again and be fenced off as a duplicate.
                                tracing::warn!(error = %e, "could not ack a recorded result");
                            }
                        }
                        Input::Wakes { done, .. } => {
                            let _ = done.send(());
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                for id in &touched {
                    self.runs.remove(id);
                }
                for input in inputs.drain(..) {
                    match input {
                        Input::Submit { reply, .. } => {
                            let _ = reply.send(Err(Error::NotRecorded(e.to_string())));
                        }
                        Input::Result { delivery, .. } => {
                            let _ = delivery.nack(true).await;
                        }
                        Input::Wakes { done, .. } => {
                            let _ = done.send(());
                        }
                    }
                }
                Err(e)
            }
        }
    }

    /// One transaction: lock and (re)load the touched runs, apply every input, write the batch.
    async fn transact(&mut self, inputs: &[Input], touched: &[Uuid]) -> Result<Committed, Error> {
        let now = Utc::now();
        let mut client = self.store.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(flotilla_store::Error::from)?;
        let versions = db::lock_runs(&tx, touched).await?;
        let stale: Vec<Uuid> = versions
            .iter()
            .filter(|(id, v)| self.runs.get(id).is_none_or(|c| c.version != **v))
            .map(|(id, _)| *id)
            .collect();
        if !stale.is_empty() {
            self.load(&tx, &stale).await?;
        }

        let mut pending = Pending {
            names: &self.config.names,
            now,
            batch: Batch::default(),
            changes: BTreeMap::new(),
            wakes: Vec::new(),
        };
        let mut submitted = HashMap::new();
        let mut new_runs: Vec<(Uuid, CachedRun)> = Vec::new();
        for (n, input) in inputs.iter().enumerate() {
            match input {
                Input::Submit { run, .. } => {
                    let id = Uuid::now_v7();
                    let content = Content::of(&run.definition);
                    let mut state = RunState::new(id, &run.plan, run.params.clone());
                    let t = state.apply(&run.plan, Event::Start, now);
                    pending.effects(&run.plan, &state, &t);
                    pending.create(&run.plan, &state, &content.hash);
                    self.plans
                        .entry(content.hash.clone())
                        .or_insert_with(|| run.plan.clone());
                    pending.batch.definitions.push((content.hash, content.body));
                    submitted.insert(n, id);
                    let plan = run.plan.clone();
                    new_runs.push((
                        id,
                        CachedRun {
                            plan,
                            state,
                            version: 0,
                        },
                    ));
                }
                Input::Result { result, .. } => {
                    let Some(cached) = self.runs.get_mut(&result.run_id) else {
                        tracing::warn!(run_id = %result.run_id, step_id = %result.step_id, "result for an unknown run ignored");
                        continue;
                    };
                    let Some(step) = cached.plan.node_index(&result.step_id) else {
                        tracing::warn!(run_id = %result.run_id, step_id = %result.step_id, "result for an unknown step ignored");
                        continue;
                    };
                    pending.apply(
                        cached,
                        Event::AttemptFinished {
                            step,
                            attempt: result.attempt,
                            task_id: result.task_id,
                            outcome: outcome_of(result),
                            worker: result.worker_id.clone(),
                            started_at: result.started_at,
                            finished_at: result.finished_at,
                        },
                    );
                }
                Input::Wakes { wakes, .. } => {
                    for wake in wakes {
                        if let Some(cached) = self.runs.get_mut(&wake.run_id) {
                            let (step, attempt) = (wake.step, wake.attempt);
                            pending.apply(cached, Event::Wake { step, attempt });
                        }
                    }
                }
            }
        }
        let Pending {
            mut batch,
            changes,
            wakes: wakes_due,
            ..
        } = pending;

        for (run_id, steps) in &changes {
            let cached = &self.runs[run_id];
            for &i in steps {
                batch.step_updates.push(StepRow {
                    run_id: *run_id,
                    idx: i as i32,
                    state: cached.state.steps[i].clone(),
                });
            }
            batch.run_updates.push(RunUpdate {
                id: *run_id,
                status: cached.state.status,
                ended_at: cached.state.ended_at,
            });
        }

        if !batch.is_empty() {
            db::write(&tx, &batch).await?;
        }
        tx.commit().await.map_err(flotilla_store::Error::from)?;

        for run_id in changes.keys() {
            if let Some(cached) = self.runs.get_mut(run_id) {
                cached.version += 1;
            }
        }
        for (id, run) in new_runs {
            self.runs.insert(id, run);
        }
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
            submitted,
            wakes: wakes_due,
        })
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
            if plan.nodes.len() != run.steps.len() {
                return Err(flotilla_store::Error::Corrupt(format!(
                    "run {} has {} steps but its definition has {}",
                    run.id,
                    run.steps.len(),
                    plan.nodes.len()
                ))
                .into());
            }
            let state = RunState::restore(
                run.id,
                &plan,
                run.status,
                run.params,
                run.steps,
                run.ended_at,
            );
            self.runs.insert(
                run.id,
                CachedRun {
                    plan,
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
    now: DateTime<Utc>,
    batch: Batch,
    /// The steps each existing run changed; each such run is written and its version bumped.
    changes: BTreeMap<Uuid, Vec<usize>>,
    /// Due times of the retries scheduled.
    wakes: Vec<DateTime<Utc>>,
}

impl Pending<'_> {
    /// Applies an event to a cached run and records what changed.
    fn apply(&mut self, cached: &mut CachedRun, event: Event) {
        let t = cached.state.apply(&cached.plan, event, self.now);
        if !t.changed.is_empty() || t.run_changed {
            let entry = self.changes.entry(cached.state.id).or_default();
            entry.extend(&t.changed);
            entry.sort_unstable();
            entry.dedup();
        }
        self.effects(&cached.plan, &cached.state, &t);
    }

    /// Rows that create a new run with its steps.
    fn create(&mut self, plan: &Plan, state: &RunState, definition_hash: &str) {
        self.batch.new_runs.push(db::NewRun {
            id: state.id,
            name: plan.name.clone(),
            definition_hash: definition_hash.to_string(),
            status: state.status,
            params: state.params.clone(),
            created_at: self.now,
            ended_at: state.ended_at,
        });
        for (idx, (node, step)) in plan.nodes.iter().zip(&state.steps).enumerate() {
            self.batch.new_steps.push((
                StepIdent {
                    step_id: node.id.clone(),
                    agent: node.agent.clone(),
                    action: node.action.clone(),
                },
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
        for effect in &t.effects {
            match effect {
                Effect::Dispatch {
                    step,
                    attempt,
                    task_id,
                } => {
                    let node = &plan.nodes[*step];
                    self.batch.attempts_started.push(AttemptStart {
                        run_id: state.id,
                        idx: *step as i32,
                        attempt: *attempt as i32,
                        task_id: *task_id,
                        dispatched_at: self.now,
                    });
                    let task = Task {
                        v: PROTOCOL_VERSION,
                        task_id: *task_id,
                        run_id: state.id,
                        step_id: node.id.clone(),
                        attempt: *attempt,
                        agent: node.agent.clone(),
                        action: node.action.clone(),
                        idempotency_key: format!("{}:{}", state.id, node.id),
                        params: node.params.clone(),
                        run_params: state.params.clone(),
                        inputs: state.inputs_for(plan, *step),
                        dispatched_at: self.now,
                    };
                    self.batch.outbox.push(OutboxRow {
                        id: *task_id,
                        routing_key: self.names.agent(&node.agent),
                        kind: "task".into(),
                        correlation_id: Some(task_id.to_string()),
                        reply_to: Some(self.names.results()),
                        body: serde_json::to_vec(&task).expect("a task always serialises"),
                        created_at: self.now,
                    });
                    tracing::debug!(run_id = %state.id, step_id = %node.id, attempt, "dispatch");
                }
                Effect::AttemptEnded {
                    attempt: _,
                    task_id,
                    success,
                    error,
                    worker,
                    started_at,
                    finished_at,
                    ..
                } => self.batch.attempts_ended.push(AttemptEnd {
                    task_id: *task_id,
                    success: *success,
                    started_at: *started_at,
                    finished_at: *finished_at,
                    worker: worker.clone(),
                    error: error.clone(),
                }),
                Effect::Stale {
                    step,
                    attempt,
                    reason,
                } => {
                    tracing::info!(run_id = %state.id, step_id = %plan.nodes.get(*step).map_or("?", |n| n.id.as_str()), attempt, reason, "stale result ignored");
                }
                Effect::RunEnded(status) => {
                    tracing::info!(run_id = %state.id, workflow = %plan.name, status = status.as_str(), "run ended");
                }
            }
        }
    }
}

struct Committed {
    outbox: Vec<OutboxRow>,
    /// The id of the run each submission created, by its position in the batch.
    submitted: HashMap<usize, Uuid>,
    wakes: Vec<DateTime<Utc>>,
}

fn outcome_of(result: &TaskResult) -> Outcome {
    match result.status {
        ResultStatus::Success => Outcome::Success(result.output.clone().unwrap_or(Value::Null)),
        ResultStatus::Failure => {
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
