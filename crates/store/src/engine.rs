//! The engine's side of the store: locking runs, loading their state, and writing a batch of
//! transitions with a handful of array statements, however many runs and steps it holds.

use std::collections::HashMap;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use flotilla_core::definition::Priority;
use flotilla_core::scheduler::{Instance, ParentLink};
use flotilla_core::{RunStatus, StepState, StepStatus, Strike, Subset};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::Error;

/// What the engine's batch transaction sets first: its statements find rows by key (a run's id,
/// a step's run and index, an attempt's task), so they are planned to reach them by index
/// whatever the tables' statistics say, and once per connection rather than at every execution.
///
/// Left to its estimates, Postgres plans `UPDATE … FROM unnest(…)` and `id = ANY($1)` as a
/// sequential scan and a hash join while a table is young, and a connection keeps its plan of
/// a prepared statement after a few uses until the table is analyzed again: every batch then
/// reads the whole table, and a step's cost grows with the history (at 10,000 runs, 2 to 10
/// times the keyed plan's time per statement). Scans and joins that read a table or an index
/// whole are priced out here; where nothing else can answer a statement, Postgres still runs
/// it. Planned so, a statement's plan fits a batch of one row and of ten thousand alike, so the
/// generic plan is always taken: planning each execution anew took ~0.3 ms of a chain's hop.
const KEYED_PLANS: &str = "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off;
                           SET LOCAL enable_mergejoin = off;
                           SET LOCAL plan_cache_mode = force_generic_plan";

/// Plans the rest of the transaction by key (see [`KEYED_PLANS`]). Sent with the first
/// statement that follows it, it costs no round trip of its own.
pub async fn plan_by_keys(tx: &impl GenericClient) -> Result<(), Error> {
    tx.batch_execute(KEYED_PLANS).await?;
    Ok(())
}

const LOCK_RUNS: &str = "SELECT id, version FROM runs WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// Prepares the statement of [`lock_runs`] on this connection (once: it is cached), so that
/// the lock is sent at once when called: before a statement meant to follow it, whatever their
/// preparing.
pub async fn prepare_lock_runs(tx: &impl GenericClient) -> Result<(), Error> {
    tx.prepare_cached(LOCK_RUNS).await?;
    Ok(())
}

/// Locks the given runs (in id order, so concurrent coordinators cannot deadlock) and returns
/// their versions. Runs that do not exist are absent from the answer. No runs (a batch of
/// submissions only) send nothing.
pub async fn lock_runs(tx: &impl GenericClient, ids: &[Uuid]) -> Result<HashMap<Uuid, i64>, Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let stmt = tx.prepare_cached(LOCK_RUNS).await?;
    Ok(tx
        .query(&stmt, &[&ids])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub id: Uuid,
    pub name: String,
    pub definition_hash: String,
    pub status: RunStatus,
    pub params: Map<String, Value>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// When the run times out, while it may.
    pub deadline: Option<DateTime<Utc>>,
    /// Why the run failed, when no step's failure says it.
    pub error: Option<String>,
    /// The steps the submission selected or left out.
    pub subset: Subset,
    /// How soon its tasks are taken by workers.
    pub priority: Priority,
    /// The attempt that started the run, when it is a sub-workflow.
    pub parent: Option<ParentLink>,
    /// The namespace the run belongs to.
    pub namespace: String,
    pub steps: Vec<StepState>,
}

/// Loads whole runs with their steps.
pub async fn load_runs(client: &impl GenericClient, ids: &[Uuid]) -> Result<Vec<StoredRun>, Error> {
    let runs_stmt = client
        .prepare_cached(
            "SELECT id, name, definition_hash, status, params, version, created_at, ended_at,
                    deadline, error, subset, parent_run_id, parent_step_id, parent_attempt, depth,
                    namespace, priority
             FROM runs WHERE id = ANY($1)",
        )
        .await?;
    let steps_stmt = client
        .prepare_cached(
            "SELECT run_id, status, attempt, task_id, wake_at, started_at, ended_at, output, error,
                    deadline, lost, strike, strike_base, instance_of, item_index, item, held_for
             FROM steps WHERE run_id = ANY($1) ORDER BY run_id, idx",
        )
        .await?;
    let mut runs: HashMap<Uuid, StoredRun> = HashMap::new();
    for r in client.query(&runs_stmt, &[&ids]).await? {
        let status: String = r.get(3);
        let params: Value = r.get(4);
        let id: Uuid = r.get(0);
        runs.insert(
            id,
            StoredRun {
                id,
                name: r.get(1),
                definition_hash: r.get(2),
                status: RunStatus::parse(&status)
                    .ok_or_else(|| Error::Corrupt(format!("run {id} has status `{status}`")))?,
                params: match params {
                    Value::Object(map) => map,
                    _ => {
                        return Err(Error::Corrupt(format!(
                            "run {id} has params that are not an object"
                        )));
                    }
                },
                version: r.get(5),
                created_at: r.get(6),
                ended_at: r.get(7),
                deadline: r.get(8),
                error: r.get(9),
                subset: subset_from_json(r.get(10)),
                priority: r
                    .get::<_, Option<&str>>(16)
                    .and_then(Priority::parse)
                    .unwrap_or_default(),
                parent: match (r.get(11), r.get(12), r.get::<_, Option<i32>>(13)) {
                    (Some(run_id), Some(step_id), Some(attempt)) => Some(ParentLink {
                        run_id,
                        step_id,
                        attempt: u32::try_from(attempt).unwrap_or_default(),
                        depth: u32::try_from(r.get::<_, i32>(14)).unwrap_or_default(),
                        started_at: r.get(6),
                    }),
                    _ => None,
                },
                namespace: r.get(15),
                steps: Vec::new(),
            },
        );
    }
    for r in client.query(&steps_stmt, &[&ids]).await? {
        let run_id: Uuid = r.get(0);
        let status: String = r.get(1);
        let attempt: i32 = r.get(2);
        let strike: i16 = r.get(11);
        let step = StepState {
            status: StepStatus::parse(&status).ok_or_else(|| {
                Error::Corrupt(format!("a step of run {run_id} has status `{status}`"))
            })?,
            attempt: u32::try_from(attempt).unwrap_or_default(),
            task_id: r.get(3),
            wake_at: r.get(4),
            started_at: r.get(5),
            ended_at: r.get(6),
            output: r.get(7),
            error: r.get(8),
            deadline: r.get(9),
            lost: u32::try_from(r.get::<_, i32>(10)).unwrap_or_default(),
            strike: u8::try_from(strike)
                .ok()
                .and_then(Strike::from_number)
                .ok_or_else(|| {
                    Error::Corrupt(format!("a step of run {run_id} has strike {strike}"))
                })?,
            strike_base: u32::try_from(r.get::<_, i32>(12)).unwrap_or_default(),
            instance: match (r.get::<_, Option<i32>>(13), r.get::<_, Option<i32>>(14)) {
                (Some(node), Some(index)) => Some(Instance {
                    node: usize::try_from(node).unwrap_or_default(),
                    index: usize::try_from(index).unwrap_or_default(),
                    item: r.get::<_, Option<Value>>(15).unwrap_or(Value::Null),
                }),
                _ => None,
            },
            held: r.get(16),
        };
        if let Some(run) = runs.get_mut(&run_id) {
            run.steps.push(step);
        }
    }
    Ok(runs.into_values().collect())
}

/// A run's `subset` column: `NULL` for the whole definition.
pub fn subset_from_json(value: Option<Value>) -> Subset {
    let names = |key: &str| -> Vec<String> {
        value
            .as_ref()
            .and_then(|v| v.get(key))
            .and_then(Value::as_array)
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    Subset {
        only: names("only"),
        skip: names("skip"),
    }
}

fn subset_to_json(subset: &Subset) -> Option<Value> {
    (!subset.is_empty()).then(|| serde_json::json!({"only": subset.only, "skip": subset.skip}))
}

/// Loads definition bodies by content hash.
pub async fn load_definitions(
    client: &impl GenericClient,
    hashes: &[String],
) -> Result<Vec<(String, Value)>, Error> {
    let stmt = client
        .prepare_cached("SELECT hash, body FROM definition_contents WHERE hash = ANY($1)")
        .await?;
    Ok(client
        .query(&stmt, &[&hashes])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// One step's mutable state, as a row.
#[derive(Debug, Clone)]
pub struct StepRow {
    pub run_id: Uuid,
    pub idx: i32,
    pub state: StepState,
}

/// A step's fixed identity, written once when its run is created.
#[derive(Debug, Clone)]
pub struct StepIdent {
    pub step_id: String,
    pub agent: String,
    pub action: String,
    /// The step's own lease (its `heartbeat_timeout`), in ms; the coordinator's when `None`.
    pub lease_ms: Option<i32>,
    /// The definition a sub-workflow step runs.
    pub workflow: Option<String>,
    /// How long a dispatched attempt may wait for a worker to start it, in ms; no limit when
    /// `None`.
    pub start_ms: Option<i32>,
    /// The labels a worker must have to run the step's own attempts, as a JSON object.
    pub labels: Option<Value>,
}

/// A run to create.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Uuid,
    pub name: String,
    pub definition_hash: String,
    pub status: RunStatus,
    pub params: Map<String, Value>,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub deadline: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub subset: Subset,
    pub priority: Priority,
    pub parent: Option<ParentLink>,
    /// The namespace it belongs to: its submission's, or its parent's.
    pub namespace: String,
}

/// A run whose status (and version) moves on.
#[derive(Debug, Clone)]
pub struct RunUpdate {
    pub id: Uuid,
    pub status: RunStatus,
    pub ended_at: Option<DateTime<Utc>>,
    pub deadline: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// An attempt that was dispatched.
#[derive(Debug, Clone)]
pub struct AttemptStart {
    pub run_id: Uuid,
    pub idx: i32,
    pub attempt: i32,
    pub task_id: Uuid,
    pub dispatched_at: DateTime<Utc>,
    pub strike: Strike,
    /// The agent the attempt calls: the step's, or its fallback's.
    pub agent: String,
}

/// An attempt that ended.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    pub task_id: Uuid,
    pub success: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub worker: String,
    pub error: Option<String>,
}

/// A message to publish once the batch has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: Uuid,
    pub routing_key: String,
    pub kind: String,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub body: Vec<u8>,
    pub created_at: DateTime<Utc>,
}

/// Everything one engine transaction writes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Definition contents by hash; already stored ones are left alone.
    pub definitions: Vec<(String, Value)>,
    pub new_runs: Vec<NewRun>,
    pub new_steps: Vec<(StepIdent, StepRow)>,
    pub step_updates: Vec<StepRow>,
    /// Runs touched by the batch; each one's version goes up by one.
    pub run_updates: Vec<RunUpdate>,
    pub attempts_started: Vec<AttemptStart>,
    pub attempts_ended: Vec<AttemptEnd>,
    pub outbox: Vec<OutboxRow>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.definitions.is_empty()
            && self.new_runs.is_empty()
            && self.new_steps.is_empty()
            && self.step_updates.is_empty()
            && self.run_updates.is_empty()
            && self.attempts_started.is_empty()
            && self.attempts_ended.is_empty()
            && self.outbox.is_empty()
    }
}

/// Columns of step rows as arrays, for UNNEST.
#[derive(Default)]
struct StepColumns {
    run_id: Vec<Uuid>,
    idx: Vec<i32>,
    status: Vec<&'static str>,
    attempt: Vec<i32>,
    task_id: Vec<Option<Uuid>>,
    wake_at: Vec<Option<DateTime<Utc>>>,
    started_at: Vec<Option<DateTime<Utc>>>,
    ended_at: Vec<Option<DateTime<Utc>>>,
    output: Vec<Option<Value>>,
    error: Vec<Option<String>>,
    deadline: Vec<Option<DateTime<Utc>>>,
    lost: Vec<i32>,
    strike: Vec<i16>,
    strike_base: Vec<i32>,
    held_for: Vec<Option<String>>,
}

/// The instance columns of new step rows (fixed once written).
#[derive(Default)]
struct InstanceColumns {
    instance_of: Vec<Option<i32>>,
    item_index: Vec<Option<i32>>,
    item: Vec<Option<Value>>,
}

impl InstanceColumns {
    fn push(&mut self, row: &StepRow) {
        let i = row.state.instance.as_ref();
        let int = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        self.instance_of.push(i.map(|i| int(i.node)));
        self.item_index.push(i.map(|i| int(i.index)));
        self.item.push(i.map(|i| i.item.clone()));
    }
}

impl StepColumns {
    fn push(&mut self, row: &StepRow) {
        let s = &row.state;
        self.run_id.push(row.run_id);
        self.idx.push(row.idx);
        self.status.push(s.status.as_str());
        self.attempt
            .push(i32::try_from(s.attempt).unwrap_or(i32::MAX));
        self.task_id.push(s.task_id);
        self.wake_at.push(s.wake_at);
        self.started_at.push(s.started_at);
        self.ended_at.push(s.ended_at);
        self.output.push(s.output.clone());
        self.error.push(s.error.clone());
        self.deadline.push(s.deadline);
        self.lost.push(i32::try_from(s.lost).unwrap_or(i32::MAX));
        self.strike.push(i16::from(s.strike.number()));
        self.strike_base
            .push(i32::try_from(s.strike_base).unwrap_or(i32::MAX));
        self.held_for.push(s.held.clone());
    }
}

/// Writes a batch. The caller holds the row locks of every run in `step_updates` and
/// `run_updates` (see [`lock_runs`]) and commits afterwards.
pub async fn write(tx: &impl GenericClient, batch: &Batch) -> Result<(), Error> {
    // The statements are prepared one by one (answered by the connection's cache after its
    // first batch), then sent together and in this order, which Postgres keeps: definitions,
    // runs and steps before the rows that refer to them. The batch costs one round trip, not
    // one per table.
    let mut sent: Vec<Sent<'_>> = Vec::new();
    if !batch.definitions.is_empty() {
        let (hashes, bodies): (Vec<&str>, Vec<&Value>) = batch
            .definitions
            .iter()
            .map(|(h, b)| (h.as_str(), b))
            .unzip();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO definition_contents (hash, body)
                 SELECT * FROM unnest($1::text[], $2::jsonb[]) ON CONFLICT (hash) DO NOTHING",
            )
            .await?;
        sent.push(Box::pin(async move {
            tx.execute(&stmt, &[&hashes, &bodies]).await
        }));
    }
    if !batch.new_runs.is_empty() {
        let runs = &batch.new_runs;
        let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        let hashes: Vec<&str> = runs.iter().map(|r| r.definition_hash.as_str()).collect();
        let statuses: Vec<&str> = runs.iter().map(|r| r.status.as_str()).collect();
        let params: Vec<Value> = runs
            .iter()
            .map(|r| Value::Object(r.params.clone()))
            .collect();
        let created: Vec<DateTime<Utc>> = runs.iter().map(|r| r.created_at).collect();
        let ended: Vec<Option<DateTime<Utc>>> = runs.iter().map(|r| r.ended_at).collect();
        let deadlines: Vec<Option<DateTime<Utc>>> = runs.iter().map(|r| r.deadline).collect();
        let errors: Vec<Option<&str>> = runs.iter().map(|r| r.error.as_deref()).collect();
        let subsets: Vec<Option<Value>> = runs.iter().map(|r| subset_to_json(&r.subset)).collect();
        let parents = runs.iter().map(|r| r.parent.as_ref());
        let parent_runs: Vec<Option<Uuid>> = parents.clone().map(|p| p.map(|p| p.run_id)).collect();
        let parent_steps: Vec<Option<&str>> = parents
            .clone()
            .map(|p| p.map(|p| p.step_id.as_str()))
            .collect();
        let int = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        let parent_attempts: Vec<Option<i32>> =
            parents.clone().map(|p| p.map(|p| int(p.attempt))).collect();
        let depths: Vec<i32> = parents.map(|p| p.map_or(0, |p| int(p.depth))).collect();
        let namespaces: Vec<&str> = runs.iter().map(|r| r.namespace.as_str()).collect();
        // NULL for the usual case, so most rows carry nothing.
        let priorities: Vec<Option<&str>> = runs
            .iter()
            .map(|r| (r.priority != Priority::Normal).then(|| r.priority.as_str()))
            .collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO runs (id, name, definition_hash, status, params, created_at, ended_at,
                                   deadline, error, subset, parent_run_id, parent_step_id, parent_attempt,
                                   depth, namespace, priority)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[],
                                      $6::timestamptz[], $7::timestamptz[], $8::timestamptz[],
                                      $9::text[], $10::jsonb[], $11::uuid[], $12::text[], $13::int4[],
                                      $14::int4[], $15::text[], $16::text[])",
            )
            .await?;
        sent.push(Box::pin(async move {
            tx.execute(
                &stmt,
                &[
                    &ids,
                    &names,
                    &hashes,
                    &statuses,
                    &params,
                    &created,
                    &ended,
                    &deadlines,
                    &errors,
                    &subsets,
                    &parent_runs,
                    &parent_steps,
                    &parent_attempts,
                    &depths,
                    &namespaces,
                    &priorities,
                ],
            )
            .await
        }));
    }
    if !batch.new_steps.is_empty() {
        let mut cols = StepColumns::default();
        let mut instances = InstanceColumns::default();
        let mut step_ids = Vec::with_capacity(batch.new_steps.len());
        let mut agents = Vec::with_capacity(batch.new_steps.len());
        let mut actions = Vec::with_capacity(batch.new_steps.len());
        let mut leases = Vec::with_capacity(batch.new_steps.len());
        let mut workflows = Vec::with_capacity(batch.new_steps.len());
        let mut starts = Vec::with_capacity(batch.new_steps.len());
        let mut labels = Vec::with_capacity(batch.new_steps.len());
        for (ident, row) in &batch.new_steps {
            cols.push(row);
            instances.push(row);
            step_ids.push(ident.step_id.as_str());
            agents.push(ident.agent.as_str());
            actions.push(ident.action.as_str());
            leases.push(ident.lease_ms);
            workflows.push(ident.workflow.as_deref());
            starts.push(ident.start_ms);
            labels.push(ident.labels.as_ref());
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO steps (run_id, idx, step_id, agent, action, status, attempt, task_id,
                                    wake_at, started_at, ended_at, output, error, deadline, lost,
                                    strike, strike_base, instance_of, item_index, item, lease_ms,
                                    held_for, workflow, start_ms, labels, queued_at, start_by)
                 SELECT u.*, q.at, q.at + u.start_ms * interval '1 millisecond'
                 FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::int4[], $8::uuid[], $9::timestamptz[],
                             $10::timestamptz[], $11::timestamptz[], $12::jsonb[], $13::text[],
                             $14::timestamptz[], $15::int4[], $16::int2[], $17::int4[],
                             $18::int4[], $19::int4[], $20::jsonb[], $21::int4[], $22::text[],
                             $23::text[], $24::int4[], $25::jsonb[])
                      AS u(run_id, idx, step_id, agent, action, status, attempt, task_id, wake_at,
                           started_at, ended_at, output, error, deadline, lost, strike,
                           strike_base, instance_of, item_index, item, lease_ms, held_for,
                           workflow, start_ms, labels)
                 -- An attempt dispatched with its step is queued until a worker starts it (a
                 -- sub-workflow's, never started by a worker, is not).
                 CROSS JOIN LATERAL (SELECT CASE WHEN u.status = 'running' AND u.task_id IS NOT NULL
                                                      AND u.workflow IS NULL
                                                 THEN now() END AS at) q",
            )
            .await?;
        sent.push(Box::pin(async move {
            tx.execute(
                &stmt,
                &[
                    &cols.run_id,
                    &cols.idx,
                    &step_ids,
                    &agents,
                    &actions,
                    &cols.status,
                    &cols.attempt,
                    &cols.task_id,
                    &cols.wake_at,
                    &cols.started_at,
                    &cols.ended_at,
                    &cols.output,
                    &cols.error,
                    &cols.deadline,
                    &cols.lost,
                    &cols.strike,
                    &cols.strike_base,
                    &instances.instance_of,
                    &instances.item_index,
                    &instances.item,
                    &leases,
                    &cols.held_for,
                    &workflows,
                    &starts,
                    &labels,
                ],
            )
            .await
        }));
    }
    if !batch.step_updates.is_empty() {
        let mut cols = StepColumns::default();
        for row in &batch.step_updates {
            cols.push(row);
        }
        let stmt = tx
            .prepare_cached(
                "UPDATE steps s SET status = u.status, attempt = u.attempt, task_id = u.task_id,
                        wake_at = u.wake_at, started_at = u.started_at, ended_at = u.ended_at,
                        output = u.output, error = u.error, deadline = u.deadline, lost = u.lost,
                        strike = u.strike, strike_base = u.strike_base, held_for = u.held_for,
                        -- A lease belongs to one running attempt; it ends with it.
                        lease_until = CASE WHEN u.status = 'running' AND s.task_id = u.task_id
                                           THEN s.lease_until END,
                        -- A new attempt is queued until a worker starts it (see renew_leases).
                        -- (A sub-workflow's attempt is never started by a worker.)
                        queued_at = CASE WHEN u.status = 'running' AND u.task_id IS NOT NULL
                                              AND s.workflow IS NULL
                                         THEN CASE WHEN s.task_id = u.task_id THEN s.queued_at
                                                   ELSE now() END END,
                        start_by = CASE WHEN u.status = 'running' AND u.task_id IS NOT NULL
                                             AND s.workflow IS NULL
                                        THEN CASE WHEN s.task_id = u.task_id THEN s.start_by
                                                  ELSE now() + s.start_ms * interval '1 millisecond'
                                             END END
                 FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::int4[], $5::uuid[],
                             $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::jsonb[],
                             $10::text[], $11::timestamptz[], $12::int4[], $13::int2[], $14::int4[],
                             $15::text[])
                      AS u(run_id, idx, status, attempt, task_id, wake_at, started_at, ended_at,
                           output, error, deadline, lost, strike, strike_base, held_for)
                 WHERE s.run_id = u.run_id AND s.idx = u.idx",
            )
            .await?;
        sent.push(Box::pin(async move {
            tx.execute(
                &stmt,
                &[
                    &cols.run_id,
                    &cols.idx,
                    &cols.status,
                    &cols.attempt,
                    &cols.task_id,
                    &cols.wake_at,
                    &cols.started_at,
                    &cols.ended_at,
                    &cols.output,
                    &cols.error,
                    &cols.deadline,
                    &cols.lost,
                    &cols.strike,
                    &cols.strike_base,
                    &cols.held_for,
                ],
            )
            .await
        }));
    }
    if !batch.run_updates.is_empty() {
        let ids: Vec<Uuid> = batch.run_updates.iter().map(|r| r.id).collect();
        let statuses: Vec<&str> = batch
            .run_updates
            .iter()
            .map(|r| r.status.as_str())
            .collect();
        let ended: Vec<Option<DateTime<Utc>>> =
            batch.run_updates.iter().map(|r| r.ended_at).collect();
        let deadlines: Vec<Option<DateTime<Utc>>> =
            batch.run_updates.iter().map(|r| r.deadline).collect();
        let errors: Vec<Option<&str>> = batch
            .run_updates
            .iter()
            .map(|r| r.error.as_deref())
            .collect();
        let stmt = tx
            .prepare_cached(
                "UPDATE runs r SET status = u.status, ended_at = u.ended_at, deadline = u.deadline,
                        error = u.error, version = r.version + 1
                 FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                             $5::text[]) AS u(id, status, ended_at, deadline, error)
                 WHERE r.id = u.id",
            )
            .await?;
        sent.push(Box::pin(async move {
            tx.execute(&stmt, &[&ids, &statuses, &ended, &deadlines, &errors])
                .await
        }));
    }
    if !batch.attempts_started.is_empty() {
        let a = &batch.attempts_started;
        let run_ids: Vec<Uuid> = a.iter().map(|x| x.run_id).collect();
        let idx: Vec<i32> = a.iter().map(|x| x.idx).collect();
        let attempt: Vec<i32> = a.iter().map(|x| x.attempt).collect();
        let task_ids: Vec<Uuid> = a.iter().map(|x| x.task_id).collect();
        let at: Vec<DateTime<Utc>> = a.iter().map(|x| x.dispatched_at).collect();
        let strikes: Vec<i16> = a.iter().map(|x| i16::from(x.strike.number())).collect();
        let agents: Vec<&str> = a.iter().map(|x| x.agent.as_str()).collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO attempts (run_id, idx, attempt, task_id, status, dispatched_at,
                                       strike, agent)
                 SELECT run_id, idx, attempt, task_id, 'dispatched', at, strike, agent
                 FROM unnest($1::uuid[], $2::int4[], $3::int4[], $4::uuid[], $5::timestamptz[],
                             $6::int2[], $7::text[])
                      AS u(run_id, idx, attempt, task_id, at, strike, agent)",
            )
            .await?;
        sent.push(Box::pin(async move {
            tx.execute(
                &stmt,
                &[&run_ids, &idx, &attempt, &task_ids, &at, &strikes, &agents],
            )
            .await
        }));
    }
    if !batch.attempts_ended.is_empty() {
        let a = &batch.attempts_ended;
        let task_ids: Vec<Uuid> = a.iter().map(|x| x.task_id).collect();
        let statuses: Vec<&str> = a
            .iter()
            .map(|x| if x.success { "success" } else { "failure" })
            .collect();
        let started: Vec<DateTime<Utc>> = a.iter().map(|x| x.started_at).collect();
        let finished: Vec<DateTime<Utc>> = a.iter().map(|x| x.finished_at).collect();
        let workers: Vec<&str> = a.iter().map(|x| x.worker.as_str()).collect();
        let errors: Vec<Option<&str>> = a.iter().map(|x| x.error.as_deref()).collect();
        let stmt = tx
            .prepare_cached(
                "UPDATE attempts a SET status = u.status, started_at = u.started_at,
                        finished_at = u.finished_at, worker = u.worker, error = u.error
                 FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                             $5::text[], $6::text[])
                      AS u(task_id, status, started_at, finished_at, worker, error)
                 WHERE a.task_id = u.task_id",
            )
            .await?;
        sent.push(Box::pin(async move {
            tx.execute(
                &stmt,
                &[&task_ids, &statuses, &started, &finished, &workers, &errors],
            )
            .await
        }));
    }
    sent.push(Box::pin(crate::outbox::insert(tx, &batch.outbox)));
    futures_util::future::try_join_all(sent).await?;
    Ok(())
}

/// A statement of [`write`] on its way.
type Sent<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Steps whose retry is due at `now`: (run id, step index, the attempt that failed).
pub async fn due_wakeups(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Uuid, i32, i32)>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT run_id, idx, attempt FROM steps WHERE wake_at <= $1 ORDER BY wake_at LIMIT $2",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&now, &limit])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// The earliest pending retry, if any.
pub async fn next_wakeup(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached("SELECT min(wake_at) FROM steps WHERE wake_at IS NOT NULL")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// Renews the leases of running attempts that workers report holding: `(run id, step id, task
/// id)`, to their step's lease from `now` (`lease` for steps without one of their own); they
/// are started, so no longer queued. Attempts no longer running, or superseded by a newer
/// attempt, are left alone.
pub async fn renew_leases(
    client: &impl GenericClient,
    held: &[(Uuid, String, Uuid)],
    now: DateTime<Utc>,
    lease: chrono::Duration,
) -> Result<u64, Error> {
    if held.is_empty() {
        return Ok(0);
    }
    let run_ids: Vec<Uuid> = held.iter().map(|h| h.0).collect();
    let step_ids: Vec<&str> = held.iter().map(|h| h.1.as_str()).collect();
    let task_ids: Vec<Uuid> = held.iter().map(|h| h.2).collect();
    let stmt = client
        .prepare_cached(
            // Rows an engine batch holds are skipped, not waited for: the engine updates steps
            // in its own order, so waiting could deadlock with it, and the next heartbeat
            // renews what this one skipped (a lease spans at least two heartbeats).
            "WITH held AS (
                 SELECT s.run_id, s.idx FROM steps s
                 JOIN unnest($1::uuid[], $2::text[], $3::uuid[]) AS u(run_id, step_id, task_id)
                   ON s.run_id = u.run_id AND s.step_id = u.step_id AND s.task_id = u.task_id
                 WHERE s.status = 'running'
                 FOR UPDATE OF s SKIP LOCKED)
             UPDATE steps s
             SET lease_until = $4::timestamptz + coalesce(s.lease_ms, $5::int8) * interval '1 millisecond',
                 queued_at = NULL, start_by = NULL
             FROM held h
             WHERE s.run_id = h.run_id AND s.idx = h.idx",
        )
        .await?;
    Ok(client
        .execute(
            &stmt,
            &[
                &run_ids,
                &step_ids,
                &task_ids,
                &now,
                &lease.num_milliseconds(),
            ],
        )
        .await?)
}

/// A running attempt, named by its run, step and task.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningAttempt {
    pub run_id: Uuid,
    pub idx: i32,
    pub attempt: i32,
    pub task_id: Uuid,
}

/// The attempts a timer's `query` finds: it selects `run_id, idx, attempt, task_id` of the
/// steps due by `$1`, at most `$2`.
async fn running_attempts(
    client: &impl GenericClient,
    query: &str,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<RunningAttempt>, Error> {
    let stmt = client.prepare_cached(query).await?;
    Ok(client
        .query(&stmt, &[&now, &limit])
        .await?
        .iter()
        .map(|r| RunningAttempt {
            run_id: r.get(0),
            idx: r.get(1),
            attempt: r.get(2),
            task_id: r.get(3),
        })
        .collect())
}

/// Records that heartbeats got through at `now`. After a gap longer than `lease` (no heartbeat
/// reached any coordinator, e.g. while RabbitMQ was away) every held lease is extended to its
/// step's lease (or `lease`) from now, so that workers get a full lease period to report again
/// before any lease expires.
/// Answers whether that happened.
pub async fn pulse(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    lease: chrono::Duration,
) -> Result<bool, Error> {
    let after_gap = now - lease;
    let stmt = client
        .prepare_cached(
            "WITH previous AS (SELECT at FROM fleet_pulse WHERE id = 1 FOR UPDATE),
                  bumped AS (UPDATE fleet_pulse SET at = greatest(at, $1) WHERE id = 1),
                  extended AS (
                      UPDATE steps
                      SET lease_until = $1 + coalesce(lease_ms * interval '1 millisecond', $1 - $2)
                      WHERE lease_until IS NOT NULL AND (SELECT at FROM previous) < $2
                      RETURNING 1)
             SELECT (SELECT at FROM previous) < $2, (SELECT count(*) FROM extended)",
        )
        .await?;
    let row = client.query_one(&stmt, &[&now, &after_gap]).await?;
    Ok(row.get(0))
}

/// Running attempts whose lease ended before `now` and before the last heartbeat any worker got
/// through: a lease expires only while heartbeats flow, never because they could not.
pub async fn expired_leases(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<RunningAttempt>, Error> {
    running_attempts(
        client,
        // Two bounds rather than `least($1, pulse)`: the planner estimates `<= $1` from the
        // column's statistics, but a bound computed by a subquery at a third of the table, and
        // on a large one it would then launch parallel workers at every timer pass.
        "SELECT run_id, idx, attempt, task_id FROM steps
         WHERE lease_until <= $1 AND lease_until <= (SELECT at FROM fleet_pulse WHERE id = 1)
           AND status = 'running'
         ORDER BY lease_until LIMIT $2",
        now,
        limit,
    )
    .await
}

/// Running attempts whose deadline passed before `now` (same shape as an expired lease).
pub async fn past_deadlines(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<RunningAttempt>, Error> {
    running_attempts(
        client,
        "SELECT run_id, idx, attempt, task_id FROM steps
         WHERE deadline <= $1 AND status = 'running' ORDER BY deadline LIMIT $2",
        now,
        limit,
    )
    .await
}

/// Running attempts no worker started within their step's `schedule_to_start`, by `now`.
pub async fn not_started(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<RunningAttempt>, Error> {
    running_attempts(
        client,
        "SELECT run_id, idx, attempt, task_id FROM steps
         WHERE start_by <= $1 AND status = 'running' ORDER BY start_by LIMIT $2",
        now,
        limit,
    )
    .await
}

/// When the next queued attempt runs out of time to be started, if any.
pub async fn next_start_by(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached("SELECT min(start_by) FROM steps WHERE start_by IS NOT NULL")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// The earliest deadline of a running attempt, if any.
pub async fn next_deadline(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached("SELECT min(deadline) FROM steps WHERE deadline IS NOT NULL")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// The earliest lease end still ahead of the fleet's pulse (those behind it are expirable now;
/// the pulse itself moves with heartbeats, which the timer's regular poll picks up).
pub async fn next_lease_end(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached(
            // The first in index order rather than min(): the bound is a subquery's, which the
            // planner takes to pass a third of the table, and min() could then be a scan of it.
            "SELECT lease_until FROM steps
             WHERE lease_until > (SELECT at FROM fleet_pulse WHERE id = 1)
             ORDER BY lease_until LIMIT 1",
        )
        .await?;
    Ok(client.query_opt(&stmt, &[]).await?.map(|r| r.get(0)))
}

/// Runs whose workflow timeout passed before `now`.
pub async fn past_run_deadlines(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Uuid>, Error> {
    let stmt = client
        .prepare_cached("SELECT id FROM runs WHERE deadline <= $1 ORDER BY deadline LIMIT $2")
        .await?;
    Ok(client
        .query(&stmt, &[&now, &limit])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The earliest workflow timeout of a run, if any.
pub async fn next_run_deadline(
    client: &impl GenericClient,
) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached("SELECT min(deadline) FROM runs WHERE deadline IS NOT NULL")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}
