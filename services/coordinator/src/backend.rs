//! The API's backend: reads from Postgres, submissions through the engine.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use flotilla_api::{
    AttemptFigures, Backend, BackendError, LatestDefinition, Namespaces, NewSchedule,
    QuotaExceeded, Submission,
};
use flotilla_api_model::{
    AGENT_HEALTHY, AGENT_NO_WORKERS, AGENT_UNHEALTHY, AgentStatus, AgentSummary, AttemptReport,
    BreakerSummary, DeadLetterQuery, DeadLetterSummary, DefinitionDetail, DefinitionSummary,
    Evidence, HealthAuditCheck, HealthTargets, LogQuery, Metrics, Operation, ParentRun,
    RedriveOutcome, RunEvent, RunPage, RunPriority, RunQuery, RunReport, RunSummary, RunsChanged,
    ScheduleSummary, StepLogLine, StepLogs, StepReport, StepResult, StrikeReport, Submitted,
    TruncatedLog, WorkerStatus, WorkflowResult,
};
use flotilla_core::definition::Priority;
use flotilla_core::labels;
use flotilla_core::limits::AgentLimits;
use flotilla_core::quota::Quotas;
use flotilla_core::registry::{RegistryPolicy, WorkerHealth};
use flotilla_core::schedule::Schedule;
use flotilla_core::{Definition, Plan, PlanError, condition, report};
use flotilla_engine::Operation as EngineOperation;
use flotilla_engine::{EngineHandle, NewRun};
use flotilla_store::breakers::{self, BreakerRecord};
use flotilla_store::queries::{self, Cursor, RunRecord, StepRecord};
use flotilla_store::registry::{self, WorkerRecord};
use flotilla_store::schedules::{self, ScheduleRow};
use flotilla_store::{Store, dead_letters, definitions, logs, outbox};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::audit;
use crate::events::Changes;
use crate::health::CoordinatorProbe;

pub struct CoordinatorBackend {
    pub store: Store,
    pub engine: EngineHandle,
    /// When a registered worker counts as healthy.
    pub registry: RegistryPolicy,
    /// Asks RabbitMQ for queue depths.
    pub probe: Arc<CoordinatorProbe>,
    pub audit: crate::access::AuditWriter,
    /// Valid API tokens seen lately, so that most requests cost no lookup.
    pub tokens: crate::access::TokenCache,
    /// Run changes, for the event stream.
    pub changes: Changes,
    /// How long a running attempt stays leased without a heartbeat, for the audit's failover.
    pub lease: std::time::Duration,
    /// The namespaces' quotas; the backend checks steps per run (the engine, runs in flight).
    pub quotas: Quotas,
    /// The agents' limits, which say why a held step waits.
    pub agent_limits: AgentLimits,
    /// The most instances a `for_each` step may expand to, which a run's steps are counted with.
    pub max_instances: usize,
    /// Registered definitions submitted lately, so that most submissions by name read nothing.
    pub definitions: DefinitionCache,
}

/// The most definitions remembered; past it, the cache starts over.
const DEFINITIONS_REMEMBERED: usize = 1024;

/// The latest revision of the definitions submitted lately, by namespace and name. An entry may
/// be stale (a revision registered through another coordinator): the engine refuses a
/// submission whose hash is not the latest in the run's own transaction, and the entry is
/// forgotten then, so a stale one costs a refused try, never a run of an old revision.
#[derive(Default)]
pub struct DefinitionCache {
    latest: Mutex<HashMap<(String, String), LatestDefinition>>,
}

impl DefinitionCache {
    fn get(&self, namespace: &str, name: &str) -> Option<LatestDefinition> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        latest
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    fn put(&self, namespace: &str, found: LatestDefinition) {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        if latest.len() >= DEFINITIONS_REMEMBERED {
            latest.clear();
        }
        latest.insert((namespace.to_owned(), found.definition.name.clone()), found);
    }

    fn forget(&self, namespace: &str, name: &str) {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        latest.remove(&(namespace.to_owned(), name.to_owned()));
    }
}

pub(crate) fn store_error(e: flotilla_store::Error) -> BackendError {
    if e.is_unavailable() {
        BackendError::Unavailable(format!("Postgres is unavailable: {e}"))
    } else {
        BackendError::Internal(e.to_string())
    }
}

fn engine_error(e: flotilla_engine::Error) -> BackendError {
    match e {
        flotilla_engine::Error::NotFound(m) => return BackendError::NotFound(m),
        flotilla_engine::Error::Refused(m) => return BackendError::Conflict(m),
        flotilla_engine::Error::StaleDefinition { .. } => {
            return BackendError::StaleDefinition(e.to_string());
        }
        flotilla_engine::Error::RunQuota { namespace, limit } => {
            return BackendError::QuotaExceeded(QuotaExceeded {
                message: format!(
                    "namespace `{namespace}` has {limit} runs in flight, as many as its quota \
                     (runsInFlight) allows; submit again once one has ended"
                ),
                namespace,
                quota: "runsInFlight",
                limit: limit.into(),
                retry_after: RUN_QUOTA_RETRY_AFTER,
            });
        }
        _ => {}
    }
    if e.is_unavailable() {
        BackendError::Unavailable(e.to_string())
    } else {
        BackendError::Internal(e.to_string())
    }
}

/// When a submission over a namespace's runs in flight may try again: runs take seconds or
/// more to end.
const RUN_QUOTA_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// When a submission of a run with more steps than its namespace's quota may try again: not
/// before the quota is raised, which an operator does.
const STEP_QUOTA_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The most steps a run of `plan` may have: its nodes, and for each `for_each` step the items
/// of its list when that reads the params alone (else as many as a step may expand to).
fn steps_bound(plan: &Plan, params: &Map<String, Value>, max_instances: usize) -> u64 {
    let instances: usize = plan
        .nodes
        .iter()
        .filter_map(|n| n.for_each.as_ref())
        .map(|f| {
            if !f.reads.is_empty() {
                return max_instances;
            }
            match flotilla_core::template::render_text(&f.items, params, Map::new()) {
                Ok(Value::Array(items)) => items.len().min(max_instances),
                // The step fails when it is reached, with no instance.
                _ => 0,
            }
        })
        .sum();
    u64::try_from(plan.nodes.len() + instances).unwrap_or(u64::MAX)
}

/// An idempotency key as stored: within its namespace, so that two tenants' keys never meet
/// (neither a namespace nor a key holds a space).
fn namespaced_key(namespace: &str, key: &str) -> String {
    format!("{namespace} {key}")
}

fn breaker_summary(b: BreakerRecord) -> BreakerSummary {
    let (reset_by, reset_at) = b.reset.unzip();
    BreakerSummary {
        state: b.breaker.state.as_str().to_string(),
        failure_rate: b.breaker.failure_rate(),
        window: b.breaker.window.len(),
        opened_at: b.breaker.opened_at,
        next_probe_at: b.probe_at,
        held_steps: u64::try_from(b.held).unwrap_or(0),
        reset_by,
        reset_at,
        agent: b.agent,
    }
}

fn millis_between(start: DateTime<Utc>, end: Option<DateTime<Utc>>) -> Option<u64> {
    end.map(|e| u64::try_from((e - start).num_milliseconds()).unwrap_or(0))
}

/// The API's step status: retries waiting show as `pending`, steps skipped for a failed
/// dependency as `skipped` (their error says why).
fn api_step_status(stored: &str) -> &str {
    match stored {
        "waiting" => "pending",
        "upstream_failed" => "skipped",
        other => other,
    }
}

/// `healthy`: the healthy workers; `limits`: the agents' limits.
fn workflow_result(
    run: RunRecord,
    steps: Vec<StepRecord>,
    healthy: &[WorkerRecord],
    limits: &AgentLimits,
) -> WorkflowResult {
    let mut metrics = Metrics {
        total_steps: steps.len(),
        successful_steps: 0,
        failed_steps: 0,
        skipped_steps: 0,
    };
    let steps = steps
        .into_iter()
        .map(|s| {
            let status = api_step_status(&s.status).to_string();
            match status.as_str() {
                "success" => metrics.successful_steps += 1,
                "failure" => metrics.failed_steps += 1,
                "skipped" => metrics.skipped_steps += 1,
                _ => {}
            }
            StepResult {
                step_id: s.step_id,
                agent: s.agent,
                action: s.action,
                status,
                attempts: u32::try_from(s.attempt).unwrap_or(0),
                start_time: s.started_at,
                end_time: s.ended_at,
                output: s.output,
                error: s.error,
                next_attempt_at: s.wake_at,
                strike: u8::try_from(s.strike).unwrap_or(1),
                held: s.held_for.map(|agent| match limits.get(&agent) {
                    // Its breaker may hold it too; the breaker's own view says whether it does.
                    Some(_) => format!("limit reached for agent {agent}"),
                    None => format!("circuit open for agent {agent}"),
                }),
                workflow: s.workflow,
                child_workflow_id: s.child_run_id,
                // Queued for an agent no healthy worker with the step's labels serves.
                waiting_for_worker: s.queued_for.as_ref().is_some_and(|agent| {
                    !healthy.iter().any(|w| {
                        w.agents.contains(agent) && labels::satisfies(&w.labels, &s.queued_labels)
                    })
                }),
            }
        })
        .collect();
    WorkflowResult {
        workflow_id: run.id,
        trace_id: flotilla_api_model::trace_id(run.id),
        name: run.name,
        status: run.status,
        start_time: run.created_at,
        end_time: run.ended_at,
        duration: millis_between(run.created_at, run.ended_at),
        params: match run.params {
            Value::Object(map) => map,
            _ => Default::default(),
        },
        only: run.subset.only,
        skip: run.subset.skip,
        error: run.error,
        steps,
        metrics,
        parent: run.parent.map(|(workflow_id, step_id)| ParentRun {
            workflow_id,
            step_id,
        }),
    }
}

fn encode_cursor(run: &RunRecord) -> String {
    format!("{}_{}", run.created_at.timestamp_micros(), run.id)
}

fn decode_cursor(text: &str) -> Result<Cursor, BackendError> {
    let bad = || BackendError::Invalid(format!("cursor `{text}` is not one this API gave out"));
    let (micros, id) = text.split_once('_').ok_or_else(bad)?;
    let at = DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok((at, id.parse::<Uuid>().map_err(|_| bad())?))
}

fn summary(r: definitions::Registered) -> DefinitionSummary {
    DefinitionSummary {
        name: r.name,
        version: r.version,
        revision: i64::from(r.revision),
        description: r.description,
        steps: usize::try_from(r.steps).unwrap_or(0),
        hash: r.hash,
        created_at: r.created_at,
    }
}

impl CoordinatorBackend {
    /// Refuses a plan whose sub-workflow steps name a definition that is not registered (or a
    /// version it does not have), naming each such step; `own` is the name being registered,
    /// which its own steps may name (a recursion, bounded by the engine's depth limit).
    async fn check_sub_workflows(
        &self,
        namespace: &str,
        plan: &Plan,
        own: Option<&str>,
    ) -> Result<(), BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let mut problems = Vec::new();
        for (step, workflow) in plan.sub_workflows() {
            let (name, version) = (workflow.name.as_str(), workflow.version.as_deref());
            if own == Some(name) && version.is_none() {
                continue;
            }
            let found = match version {
                Some(version) => definitions::version(&client, namespace, name, version).await,
                None => definitions::latest(&client, namespace, name).await,
            }
            .map_err(store_error)?;
            if found.is_none() {
                problems.push(match version {
                    Some(version) => format!(
                        "step `{step}`: workflow `{name}` has no version or revision `{version}`"
                    ),
                    None => {
                        format!("step `{step}`: workflow `{name}` is not a registered definition")
                    }
                });
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(BackendError::Definition(PlanError {
            workflow: plan.name.clone(),
            problems,
        }))
    }
}

impl CoordinatorBackend {
    /// What the audit reads of Postgres, within the health checks' timeout; why not, as text.
    async fn audit_postgres(&self) -> Result<audit::PostgresFacts, String> {
        let read = async {
            let started = std::time::Instant::now();
            self.store.ping().await?;
            let latency = started.elapsed();
            let client = self.store.client().await?;
            Ok::<_, flotilla_store::Error>(audit::PostgresFacts {
                latency,
                migrations: flotilla_store::migrate::status(&client).await?,
                pool: self.store.pool_use(),
                outbox: outbox::backlog(&client).await?,
                outbox_oldest: outbox::oldest(&client).await?,
                dead_letters: dead_letters::pending(&client).await?,
                statistics: flotilla_store::statistics::statistics(&client).await?,
            })
        };
        match tokio::time::timeout(crate::health::CHECK_TIMEOUT, read).await {
            Ok(Ok(facts)) => Ok(facts),
            Ok(Err(e)) => Err(format!("Postgres is unavailable: {e}")),
            Err(_) => Err(format!(
                "Postgres did not answer within {:?}",
                crate::health::CHECK_TIMEOUT
            )),
        }
    }
}

impl Backend for CoordinatorBackend {
    async fn submit(&self, submission: Submission) -> Result<Submitted, BackendError> {
        let namespace = submission.namespace;
        if let Some(limit) = self.quotas.of(&namespace).steps_per_run {
            let steps = steps_bound(&submission.plan, &submission.params, self.max_instances);
            if steps > limit {
                return Err(BackendError::QuotaExceeded(QuotaExceeded {
                    message: format!(
                        "a run of `{}` may have {steps} steps (for_each instances included), \
                         over namespace `{namespace}`'s quota of {limit} steps per run \
                         (stepsPerRun)",
                        submission.plan.name
                    ),
                    namespace,
                    quota: "stepsPerRun",
                    limit: limit.into(),
                    retry_after: STEP_QUOTA_RETRY_AFTER,
                }));
            }
        }
        self.check_sub_workflows(&namespace, &submission.plan, None)
            .await?;
        let submitted = self
            .engine
            .submit(NewRun {
                definition: submission.definition,
                plan: Arc::new(submission.plan),
                params: submission.params,
                subset: submission.subset,
                priority: submission.priority.map(|p| match p {
                    RunPriority::Normal => Priority::Normal,
                    RunPriority::High => Priority::High,
                }),
                idempotency_key: submission
                    .idempotency_key
                    .map(|key| namespaced_key(&namespace, &key)),
                namespace,
                latest: submission.latest,
            })
            .await;
        if let Err(flotilla_engine::Error::StaleDefinition { namespace, name }) = &submitted {
            self.definitions.forget(namespace, name);
        }
        submitted
            .map(|s| Submitted {
                workflow_id: s.id,
                replayed: s.replayed,
            })
            .map_err(engine_error)
    }

    async fn run(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<WorkflowResult>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let Some((run, steps)) = queries::run(&client, namespaces.filter(), id)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        let served = if steps.iter().any(|s| s.queued_for.is_some()) {
            let now = Utc::now();
            registry::workers(&client, None)
                .await
                .map_err(store_error)?
                .into_iter()
                .filter(|w| self.registry.health(w.last_seen, now) == Some(WorkerHealth::Healthy))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Some(workflow_result(
            run,
            steps,
            &served,
            &self.agent_limits,
        )))
    }

    async fn report(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<RunReport>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let Some((run, steps)) = queries::run(&client, namespaces.filter(), id)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        let Some((body, attempts)) = queries::run_attempts(&client, id)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        let plan = Definition::from_value(body)
            .map_err(|e| e.to_string())
            .and_then(|d| Plan::compile(&d).map_err(|e| e.to_string()))
            .map_err(|e| {
                BackendError::Internal(format!("run {id}'s stored definition is unreadable: {e}"))
            })?;
        let events = queries::run_events(&client, id)
            .await
            .map_err(store_error)?;
        Ok(Some(run_report(run, steps, &plan, attempts, &events)))
    }

    async fn runs(
        &self,
        namespaces: &Namespaces,
        query: RunQuery,
    ) -> Result<RunPage, BackendError> {
        let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
        let limit = i64::from(query.limit.unwrap_or(50));
        let client = self.store.client().await.map_err(store_error)?;
        let filter = queries::RunFilter {
            namespaces: namespaces.filter(),
            status: query.status.as_deref(),
            name: query.name.as_deref(),
            since: query.since,
        };
        let rows = queries::list_runs(&client, filter, limit, cursor)
            .await
            .map_err(store_error)?;
        let next_cursor = (rows.len() as i64 == limit)
            .then(|| rows.last().map(encode_cursor))
            .flatten();
        Ok(RunPage {
            workflows: rows
                .into_iter()
                .map(|r| RunSummary {
                    workflow_id: r.id,
                    duration: millis_between(r.created_at, r.ended_at),
                    name: r.name,
                    status: r.status,
                    start_time: r.created_at,
                    end_time: r.ended_at,
                })
                .collect(),
            next_cursor,
        })
    }

    async fn register_definition(
        &self,
        namespace: &str,
        definition: Definition,
    ) -> Result<DefinitionSummary, BackendError> {
        let plan = Plan::compile(&definition)?;
        self.check_sub_workflows(namespace, &plan, Some(&definition.name))
            .await?;
        let mut client = self.store.client().await.map_err(store_error)?;
        let registered = definitions::register(&mut client, namespace, &definition)
            .await
            .map_err(store_error)?;
        // Submitted through this coordinator next, the new revision is read without a refusal.
        self.definitions.forget(namespace, &definition.name);
        // The latest revision decides: a `schedule:` (re)schedules the name, none unschedules it.
        match &definition.schedule {
            Some(spec) => {
                let schedule = Schedule::from_spec(spec).map_err(BackendError::Invalid)?;
                let row = schedule_row(namespace, &definition.name, &schedule, Map::new())?;
                schedules::put(&client, &row).await.map_err(store_error)?;
                tracing::info!(definition = %definition.name, cron = %schedule.cron, next_at = %row.next_at, "scheduled");
            }
            None => {
                if schedules::delete(&client, namespace, &definition.name)
                    .await
                    .map_err(store_error)?
                {
                    tracing::info!(definition = %definition.name, "unscheduled");
                }
            }
        }
        Ok(summary(registered))
    }

    async fn definitions(
        &self,
        namespaces: &Namespaces,
    ) -> Result<Vec<DefinitionSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let list = definitions::list(&client, namespaces.filter())
            .await
            .map_err(store_error)?;
        Ok(list.into_iter().map(summary).collect())
    }

    async fn definition(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<LatestDefinition>, BackendError> {
        if let Some(found) = self.definitions.get(namespace, name) {
            return Ok(Some(found));
        }
        let client = self.store.client().await.map_err(store_error)?;
        let Some((registered, body)) = definitions::latest(&client, namespace, name)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        let definition = Definition::from_value(body).map_err(|e| {
            BackendError::Internal(format!("stored definition `{name}` is unreadable: {e}"))
        })?;
        let found = LatestDefinition {
            definition,
            hash: registered.hash,
        };
        self.definitions.put(namespace, found.clone());
        Ok(Some(found))
    }

    async fn definition_versions(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<DefinitionSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let revisions = definitions::revisions(&client, namespace, name)
            .await
            .map_err(store_error)?;
        Ok(revisions.into_iter().map(summary).collect())
    }

    async fn definition_detail(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<DefinitionDetail>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let found = match version {
            Some(version) => definitions::version(&client, namespace, name, version).await,
            None => definitions::latest(&client, namespace, name).await,
        }
        .map_err(store_error)?;
        Ok(found.map(|(registered, definition)| DefinitionDetail {
            summary: summary(registered),
            definition,
        }))
    }

    async fn dead_letters(
        &self,
        query: DeadLetterQuery,
    ) -> Result<Vec<DeadLetterSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let pending = query.pending.unwrap_or(true);
        let limit = i64::from(query.limit.unwrap_or(50));
        let letters = dead_letters::list(&client, pending, limit)
            .await
            .map_err(store_error)?;
        Ok(letters
            .into_iter()
            .map(|l| DeadLetterSummary {
                id: l.id,
                workflow_id: l.run_id,
                step_id: l.step_id,
                attempt: l.attempt.and_then(|a| u32::try_from(a).ok()),
                task_id: l.task_id,
                reason: l.reason,
                deliveries: l.deliveries.and_then(|d| u64::try_from(d).ok()),
                created_at: l.created_at,
                redriven_at: l.redriven_at,
                body: serde_json::from_slice(&l.body).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&l.body).into_owned())
                }),
            })
            .collect())
    }

    async fn redrive(&self, ids: Vec<Uuid>) -> Result<Vec<RedriveOutcome>, BackendError> {
        let done = self.engine.redrive(ids).await.map_err(engine_error)?;
        Ok(done
            .into_iter()
            .map(|r| RedriveOutcome {
                dead_letter: r.dead_letter,
                workflow_id: r.run_id,
                step_id: r.step_id,
                attempt: r.retried.as_ref().ok().copied(),
                error: r.retried.err(),
            })
            .collect())
    }

    async fn operate(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
        operation: Operation,
        actor: String,
    ) -> Result<String, BackendError> {
        // A run's namespace never changes, so a run seen here is one the caller may act on.
        if namespaces != &Namespaces::All {
            let client = self.store.client().await.map_err(store_error)?;
            if queries::run(&client, namespaces.filter(), id)
                .await
                .map_err(store_error)?
                .is_none()
            {
                return Err(BackendError::NotFound(format!(
                    "workflow run {id} not found"
                )));
            }
        }
        let operation = match operation {
            Operation::Cancel => EngineOperation::Cancel,
            Operation::Pause => EngineOperation::Pause,
            Operation::Resume => EngineOperation::Resume,
            Operation::Retry { step } => EngineOperation::Retry { step },
            Operation::Skip { step } => EngineOperation::Skip { step },
            Operation::Complete { step, output } => EngineOperation::Complete { step, output },
            Operation::Rollback => EngineOperation::Rollback,
        };
        let status = self
            .engine
            .operate(id, operation, actor)
            .await
            .map_err(engine_error)?;
        Ok(status.as_str().to_string())
    }

    async fn agents(&self, agent: Option<&str>) -> Result<Vec<AgentStatus>, BackendError> {
        let (workers, queued) = {
            let client = self.store.client().await.map_err(store_error)?;
            let workers = registry::workers(&client, agent)
                .await
                .map_err(store_error)?;
            let queued = registry::queued(&client).await.map_err(store_error)?;
            (workers, queued)
        };
        let now = Utc::now();
        let mut agents: BTreeMap<String, AgentStatus> = BTreeMap::new();
        for w in workers {
            let Some(health) = self.registry.health(w.last_seen, now) else {
                continue;
            };
            let status = worker_status(w, health);
            for name in status
                .agents
                .iter()
                .filter(|a| agent.is_none_or(|n| n == *a))
            {
                let listed = agents
                    .entry(name.clone())
                    .or_insert_with(|| empty_agent(name));
                listed.workers.push(status.clone());
                listed.health = match (listed.health.as_str(), health) {
                    (_, WorkerHealth::Healthy) | (AGENT_HEALTHY, _) => AGENT_HEALTHY,
                    _ => AGENT_UNHEALTHY,
                }
                .to_owned();
            }
        }
        for q in queued
            .into_iter()
            .filter(|q| agent.is_none_or(|n| n == q.agent))
        {
            let listed = agents
                .entry(q.agent.clone())
                .or_insert_with(|| empty_agent(&q.agent));
            listed.waiting_steps = u64::try_from(q.attempts).unwrap_or(0);
            listed.oldest_waiting_ms = millis_between(q.oldest, Some(now));
        }
        let depths = self
            .probe
            .agent_queue_depths(agents.keys().cloned().collect())
            .await;
        for (name, depth) in depths {
            if let Some(listed) = agents.get_mut(&name) {
                listed.queue_depth = Some(depth);
            }
        }
        Ok(agents.into_values().collect())
    }

    async fn health_audit(
        &self,
        since: DateTime<Utc>,
        targets: HealthTargets,
    ) -> Result<Vec<HealthAuditCheck>, BackendError> {
        let postgres = self.audit_postgres().await;
        // Without Postgres, what it holds is unknown, not absent.
        let (agents, attempts, schedules) = match &postgres {
            Ok(_) => (
                self.agents(None).await?,
                self.attempts_since(since).await?,
                {
                    let client = self.store.client().await.map_err(store_error)?;
                    schedules::list(&client, None).await.map_err(store_error)?
                },
            ),
            Err(_) => Default::default(),
        };
        let names = self.probe.names();
        let mut queues = vec![names.results(), names.dead_letters()];
        queues.extend(agents.iter().map(|a| names.agent(&a.name)));
        let rabbitmq = self.probe.queue_counts(queues).await.map(|mut counts| {
            let agent_queues = counts.split_off(2.min(counts.len()));
            let mut fixed = counts.into_iter().map(|(_, c)| c);
            audit::RabbitFacts {
                results: fixed.next().flatten(),
                dead_letter_queue: fixed.next().flatten(),
                agent_queues: agents
                    .iter()
                    .map(|a| a.name.clone())
                    .zip(agent_queues.into_iter().map(|(_, c)| c))
                    .collect(),
            }
        });
        let facts = audit::Facts {
            postgres,
            rabbitmq,
            agents,
            attempts,
            schedules: schedules.into_iter().map(|s| (s.name, s.next_at)).collect(),
            lease: self.lease,
            now: Utc::now(),
        };
        Ok(audit::grade(&facts, &targets))
    }

    async fn attempts_since(
        &self,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<AgentSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let rows = queries::attempts_since(&client, since)
            .await
            .map_err(store_error)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let [p50, p95, p99] = r.run_time_ms.map_or([None; 3], |p| p.map(Some));
                let executions = u64::try_from(r.executions).unwrap_or(0);
                let successes = u64::try_from(r.successes).unwrap_or(0);
                AgentSummary {
                    agent: r.agent,
                    executions,
                    successes,
                    success_rate: successes as f64 / executions.max(1) as f64,
                    p50_ms: p50,
                    p95_ms: p95,
                    p99_ms: p99,
                }
            })
            .collect())
    }

    async fn logs(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
        query: LogQuery,
    ) -> Result<Option<StepLogs>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let Some((run, steps)) = queries::run(&client, namespaces.filter(), id)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        if let Some(step) = &query.step
            && !steps.iter().any(|s| &s.step_id == step)
        {
            return Err(BackendError::NotFound(format!(
                "run {id} has no step `{step}`"
            )));
        }
        let after = query.after.unwrap_or(0);
        let attempt = query.attempt.map(|a| i32::try_from(a).unwrap_or(i32::MAX));
        let read = logs::LogQuery {
            step_id: query.step.clone(),
            attempt,
            after: i64::try_from(after).unwrap_or(i64::MAX),
            limit: i64::from(query.limit.unwrap_or(u32::MAX)),
        };
        let lines = logs::read(&client, id, &read).await.map_err(store_error)?;
        let truncated = logs::truncated(&client, id, query.step.as_deref(), attempt)
            .await
            .map_err(store_error)?;
        let lines: Vec<StepLogLine> = lines
            .into_iter()
            .map(|l| StepLogLine {
                seq: u64::try_from(l.seq).unwrap_or(0),
                step_id: l.step_id,
                attempt: u32::try_from(l.attempt).unwrap_or(0),
                stream: l.stream,
                line: l.line,
                at: l.at,
            })
            .collect();
        Ok(Some(StepLogs {
            workflow_id: id,
            next_after: lines.last().map_or(after, |l| l.seq),
            lines,
            truncated: truncated
                .into_iter()
                .map(|t| TruncatedLog {
                    step_id: t.step_id,
                    attempt: u32::try_from(t.attempt).unwrap_or(0),
                    bytes: u64::try_from(t.bytes).unwrap_or(0),
                })
                .collect(),
            ended: run.ended_at.is_some(),
        }))
    }

    async fn agent_attempts(
        &self,
        agent: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        bucket: std::time::Duration,
    ) -> Result<(AttemptFigures, Vec<(u64, AttemptFigures)>), BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let (total, buckets) = queries::agent_attempts(&client, agent, since, until, bucket)
            .await
            .map_err(store_error)?;
        let figures = |f: queries::AttemptFigures| AttemptFigures {
            executions: u64::try_from(f.executions).unwrap_or(0),
            errors: u64::try_from(f.errors).unwrap_or(0),
            run_time_ms: f.run_time_ms,
        };
        Ok((
            figures(total),
            buckets
                .into_iter()
                .filter_map(|(n, f)| Some((u64::try_from(n).ok()?, figures(f))))
                .collect(),
        ))
    }

    fn changes(
        &self,
        namespaces: Namespaces,
    ) -> impl futures_util::Stream<Item = RunsChanged> + Send + use<> {
        use futures_util::StreamExt;
        let changes = self.changes.subscribe();
        let Namespaces::Only(names) = namespaces else {
            return changes.left_stream();
        };
        // Run ids of other tenants are not told: each named change is narrowed in Postgres
        // (a run's namespace never changes). A failed lookup says "anything may have changed",
        // which names no run.
        let store = self.store.clone();
        changes
            .filter_map(move |changed| {
                let (store, names) = (store.clone(), names.clone());
                async move {
                    let Some(runs) = changed.runs else {
                        return Some(changed);
                    };
                    let visible = async {
                        let client = store.client().await?;
                        queries::runs_in(&client, Some(&names), &runs).await
                    };
                    match visible.await {
                        Ok(runs) if runs.is_empty() => None,
                        Ok(runs) => Some(RunsChanged { runs: Some(runs) }),
                        Err(_) => Some(RunsChanged { runs: None }),
                    }
                }
            })
            .right_stream()
    }

    async fn events(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<Vec<RunEvent>>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        if queries::run(&client, namespaces.filter(), id)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Ok(None);
        }
        let events = queries::run_events(&client, id)
            .await
            .map_err(store_error)?;
        Ok(Some(events.into_iter().map(|e| api_event(&e)).collect()))
    }

    async fn put_schedule(&self, new: NewSchedule) -> Result<ScheduleSummary, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        if definitions::latest(&client, &new.namespace, &new.definition)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Err(BackendError::NotFound(format!(
                "no workflow definition named `{}` is registered",
                new.definition
            )));
        }
        let row = schedule_row(&new.namespace, &new.definition, &new.schedule, new.params)?;
        let stored = schedules::put(&client, &row).await.map_err(store_error)?;
        Ok(schedule_summary(stored))
    }

    async fn schedules(
        &self,
        namespaces: &Namespaces,
    ) -> Result<Vec<ScheduleSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let rows = schedules::list(&client, namespaces.filter())
            .await
            .map_err(store_error)?;
        Ok(rows.into_iter().map(schedule_summary).collect())
    }

    async fn schedule(
        &self,
        namespace: &str,
        id: &str,
    ) -> Result<Option<ScheduleSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let row = schedules::get(&client, namespace, id)
            .await
            .map_err(store_error)?;
        Ok(row.map(schedule_summary))
    }

    async fn delete_schedule(&self, namespace: &str, id: &str) -> Result<bool, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        schedules::delete(&client, namespace, id)
            .await
            .map_err(store_error)
    }

    async fn breakers(&self) -> Result<Vec<BreakerSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let list = breakers::list(&client).await.map_err(store_error)?;
        Ok(list.into_iter().map(breaker_summary).collect())
    }

    async fn reset_breaker(
        &self,
        agent: &str,
        actor: String,
    ) -> Result<Option<BreakerSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        if !breakers::reset(&client, agent, &actor, Utc::now())
            .await
            .map_err(store_error)?
        {
            return Ok(None);
        }
        let list = breakers::list(&client).await.map_err(store_error)?;
        Ok(list
            .into_iter()
            .find(|b| b.agent == agent)
            .map(breaker_summary))
    }
}

/// The stored form of a schedule of definition `name`, due at its next tick from now.
fn empty_agent(name: &str) -> AgentStatus {
    AgentStatus {
        name: name.to_owned(),
        health: AGENT_NO_WORKERS.to_owned(),
        workers: Vec::new(),
        queue_depth: None,
        waiting_steps: 0,
        oldest_waiting_ms: None,
    }
}

fn worker_status(w: WorkerRecord, health: WorkerHealth) -> WorkerStatus {
    WorkerStatus {
        worker_id: w.worker_id,
        health: health.as_str().to_owned(),
        agents: w.agents,
        actions: w.actions,
        concurrency: u32::try_from(w.concurrency).unwrap_or(0),
        in_flight: u32::try_from(w.in_flight).unwrap_or(0),
        last_seen: w.last_seen,
        sdk: w.sdk,
        host: w.host,
        pid: w.pid.and_then(|p| u32::try_from(p).ok()),
        labels: w
            .labels
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
        started_at: w.started_at,
    }
}

fn schedule_row(
    namespace: &str,
    name: &str,
    schedule: &Schedule,
    params: Map<String, Value>,
) -> Result<ScheduleRow, BackendError> {
    let now = Utc::now();
    let next_at = schedule.next_after(now).ok_or_else(|| {
        BackendError::Invalid(format!("schedule `{}` never fires", schedule.cron))
    })?;
    // The policies are stored by their names in the definition format.
    let policy = |p: serde_json::Result<Value>| {
        p.ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    Ok(ScheduleRow {
        namespace: namespace.to_string(),
        name: name.to_string(),
        cron: schedule.cron.clone(),
        timezone: schedule.timezone.clone(),
        missed: policy(serde_json::to_value(schedule.missed)),
        overlap: policy(serde_json::to_value(schedule.overlap)),
        params,
        next_at,
        last_run_id: None,
        created_at: now,
    })
}

fn schedule_summary(row: ScheduleRow) -> ScheduleSummary {
    ScheduleSummary {
        id: row.name.clone(),
        definition: row.name,
        cron: row.cron,
        timezone: row.timezone,
        missed: row.missed,
        overlap: row.overlap,
        params: row.params,
        next_at: row.next_at,
        last_run_id: row.last_run_id,
        created_at: row.created_at,
    }
}

fn api_event(e: &queries::RunEvent) -> RunEvent {
    RunEvent {
        at: e.at,
        actor: e.actor.clone(),
        action: e.action.clone(),
        step_id: e.step_id.clone(),
        detail: e.detail.clone(),
    }
}

/// Who the engine's own entries in a run's history name.
const ENGINE_ACTOR: &str = "flotilla";

/// What each strike of a step did, in order, from its attempts (in attempt order) and the
/// history entries about it or its whole run (in time order). Attempts of one strike form one
/// entry until the strike changes or the step escalates; each escalation is an entry with its
/// channel, how its notification went and the operator action that followed it.
/// What a step with `expect:` was told and what it verified: every successful attempt claimed
/// success and met the expectations; an attempt failed by them claimed it without.
fn evidence(
    node: &flotilla_core::plan::Node,
    attempts: &[&queries::AttemptRecord],
) -> Option<Evidence> {
    if node.expect.is_empty() {
        return None;
    }
    let verified = attempts.iter().filter(|a| a.status == "success").count();
    let failures: Vec<String> = attempts
        .iter()
        .filter_map(|a| a.error.clone())
        .filter(|e| condition::is_expectation_failure(e))
        .collect();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Some(Evidence {
        expect: node.expect.iter().map(|c| c.source().to_string()).collect(),
        claimed: count(verified + failures.len()),
        verified: count(verified),
        failures,
    })
}

fn strike_reports(
    node: &flotilla_core::plan::Node,
    attempts: &[&queries::AttemptRecord],
    events: &[&queries::RunEvent],
) -> Vec<StrikeReport> {
    let escalations: Vec<&queries::RunEvent> = events
        .iter()
        .copied()
        .filter(|e| e.actor == ENGINE_ACTOR && e.action == "escalate")
        .collect();
    let mut out: Vec<(DateTime<Utc>, StrikeReport)> = Vec::new();
    let mut previous: Option<&queries::AttemptRecord> = None;
    for &a in attempts {
        let strike = u8::try_from(a.strike).unwrap_or(1);
        let escalated_since = previous.is_some_and(|p| {
            escalations
                .iter()
                .any(|e| e.at >= p.dispatched_at && e.at <= a.dispatched_at)
        });
        let continues = previous.is_some_and(|p| p.strike == a.strike) && !escalated_since;
        if !continues {
            let (agent, action) = node.target(strike == 2);
            out.push((
                a.dispatched_at,
                StrikeReport {
                    strike,
                    agent: Some(a.agent.clone().unwrap_or_else(|| agent.to_string())),
                    action: Some(action.to_string()),
                    attempts: Vec::new(),
                    errors: Vec::new(),
                    result: None,
                    channel: None,
                    operator: None,
                },
            ));
        }
        let (_, report) = out.last_mut().expect("an entry was pushed");
        report.attempts.push(u32::try_from(a.attempt).unwrap_or(0));
        report.errors.extend(a.error.clone());
        report.result = Some(a.status.clone());
        previous = Some(a);
    }
    for (n, escalation) in escalations.iter().enumerate() {
        let until = escalations.get(n + 1).map(|e| e.at);
        let after =
            |e: &&&queries::RunEvent| e.at >= escalation.at && until.is_none_or(|u| e.at < u);
        let notice = events.iter().filter(after).find(|e| {
            e.actor == ENGINE_ACTOR && matches!(e.action.as_str(), "notified" | "notify_failed")
        });
        let operator = events.iter().filter(after).find(|e| {
            e.actor != ENGINE_ACTOR
                && matches!(e.action.as_str(), "retry" | "skip" | "complete" | "cancel")
        });
        let channel = escalation
            .detail
            .as_ref()
            .and_then(|d| d.get("channel"))
            .and_then(Value::as_str)
            .map(str::to_string);
        out.push((
            escalation.at,
            StrikeReport {
                strike: 3,
                agent: None,
                action: None,
                attempts: Vec::new(),
                errors: Vec::new(),
                result: notice.map(|e| e.action.clone()),
                channel,
                operator: operator.map(|e| api_event(e)),
            },
        ));
    }
    // Stable: an escalation recorded at the same instant as an attempt's dispatch follows it.
    out.sort_by_key(|(at, _)| *at);
    out.into_iter().map(|(_, r)| r).collect()
}

/// A run's report from its rows: per step its attempts, queue wait and run time, and what each
/// strike did; for a `for_each` step, its instances' span and counts; the critical path and
/// parallelism as `flotilla_core::report` computes them.
fn run_report(
    run: RunRecord,
    steps: Vec<StepRecord>,
    plan: &Plan,
    attempts: Vec<queries::AttemptRecord>,
    events: &[queries::RunEvent],
) -> RunReport {
    let spans: Vec<Option<report::Span>> = steps
        .iter()
        .map(|s| match (s.started_at, s.ended_at) {
            (Some(start), Some(end)) => Some(report::Span { start, end }),
            _ => None,
        })
        .collect();
    let critical_path = report::critical_path(plan, &spans)
        .into_iter()
        .filter_map(|i| steps.get(i).map(|s| s.step_id.clone()))
        .collect();
    let parallelism = report::parallelism(&spans);
    let millis = |d: chrono::Duration| u64::try_from(d.num_milliseconds()).unwrap_or(0);
    let slots_of = |node: usize| -> Vec<usize> {
        (0..steps.len())
            .filter(|&i| steps[i].instance_of.and_then(|n| usize::try_from(n).ok()) == Some(node))
            .collect()
    };
    let attempts_of = |slots: &[usize]| -> Vec<&queries::AttemptRecord> {
        attempts
            .iter()
            .filter(|a| usize::try_from(a.idx).is_ok_and(|i| slots.contains(&i)))
            .collect()
    };
    let times = |own: &[&queries::AttemptRecord]| -> Vec<report::AttemptTimes> {
        own.iter()
            .map(|a| report::AttemptTimes {
                dispatched: a.dispatched_at,
                started: a.started_at,
                finished: a.finished_at,
            })
            .collect()
    };
    let instance_slots: Vec<Vec<usize>> = (0..steps.len())
        .map(|i| {
            if i < plan.nodes.len() && plan.nodes[i].for_each.is_some() {
                slots_of(i)
            } else {
                Vec::new()
            }
        })
        .collect();
    let instance_counts: Vec<std::collections::BTreeMap<String, usize>> = instance_slots
        .iter()
        .map(|slots| {
            let mut counts = std::collections::BTreeMap::new();
            for &i in slots {
                *counts
                    .entry(api_step_status(&steps[i].status).to_string())
                    .or_insert(0) += 1;
            }
            counts
        })
        .collect();
    let node_of = |i: usize| {
        steps[i]
            .instance_of
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(i)
    };
    let steps = steps
        .iter()
        .enumerate()
        .map(|(idx, step)| {
            let own = attempts_of(&[idx]);
            let (queued, ran) = if instance_slots[idx].is_empty() {
                report::step_times(&times(&own))
            } else {
                // A fan-out's own slot makes no attempt: it spans its instances'.
                let all = times(&attempts_of(&instance_slots[idx]));
                let (queued, _) = report::step_times(&all);
                (queued, report::span_of(&all))
            };
            let about: Vec<&queries::RunEvent> = events
                .iter()
                .filter(|e| e.step_id.as_ref().is_none_or(|s| *s == step.step_id))
                .collect();
            let strikes = match plan.nodes.get(node_of(idx)) {
                Some(node) => strike_reports(node, &own, &about),
                None => Vec::new(),
            };
            let evidence = plan.nodes.get(node_of(idx)).and_then(|node| {
                if instance_slots[idx].is_empty() {
                    evidence(node, &own)
                } else {
                    evidence(node, &attempts_of(&instance_slots[idx]))
                }
            });
            let depends_on = plan.nodes.get(node_of(idx)).map_or_else(Vec::new, |node| {
                node.deps
                    .iter()
                    .filter_map(|&d| plan.nodes.get(d).map(|n| n.id.clone()))
                    .collect()
            });
            StepReport {
                depends_on,
                strikes,
                evidence,
                instances: instance_counts[idx].clone(),
                status: api_step_status(&step.status).to_string(),
                step_id: step.step_id.clone(),
                queue_wait_ms: millis(queued),
                run_ms: millis(ran),
                attempts: own
                    .into_iter()
                    .map(|a| AttemptReport {
                        attempt: u32::try_from(a.attempt).unwrap_or(0),
                        status: a.status.clone(),
                        dispatched_at: a.dispatched_at,
                        started_at: a.started_at,
                        finished_at: a.finished_at,
                        worker: a.worker.clone().filter(|w| !w.is_empty()),
                        error: a.error.clone(),
                    })
                    .collect(),
                error: step.error.clone(),
            }
        })
        .collect();
    RunReport {
        workflow_id: run.id,
        duration_ms: millis(run.ended_at.unwrap_or_else(Utc::now) - run.created_at),
        name: run.name,
        status: run.status,
        parallelism,
        critical_path,
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    fn attempt(n: i32, strike: i16, agent: &str, status: &str) -> queries::AttemptRecord {
        queries::AttemptRecord {
            idx: 0,
            attempt: n,
            status: status.into(),
            dispatched_at: at(i64::from(n) * 100),
            started_at: None,
            finished_at: None,
            worker: None,
            error: (status == "failure").then(|| format!("boom {n}")),
            strike,
            agent: Some(agent.into()),
        }
    }

    fn event(ms: i64, actor: &str, action: &str, detail: Value) -> queries::RunEvent {
        queries::RunEvent {
            run_id: Uuid::nil(),
            at: at(ms),
            actor: actor.into(),
            action: action.into(),
            step_id: Some("build".into()),
            detail: Some(detail),
        }
    }

    #[test]
    fn strikes_say_what_each_did_through_an_escalation_and_a_retry() {
        use serde_json::json;
        let plan = Plan::compile(
            &Definition::from_yaml(
                "name: s\nsteps:\n  - {id: build, agent: primary, action: compile, fallback: {agent: spare, action: slow}, escalate: ops}\n",
            )
            .unwrap(),
        )
        .unwrap();
        let attempts = [
            attempt(1, 1, "primary", "failure"),
            attempt(2, 1, "primary", "failure"),
            attempt(3, 2, "spare", "failure"),
            // After an operator's retry: strike 1 again.
            attempt(9, 1, "primary", "success"),
        ];
        let events = [
            event(250, "flotilla", "fallback", json!({"strike": 2})),
            event(
                400,
                "flotilla",
                "escalate",
                json!({"strike": 3, "channel": "ops"}),
            ),
            event(500, "flotilla", "notified", json!({})),
            event(800, "alice", "retry", json!(null)),
        ];
        let attempts: Vec<&queries::AttemptRecord> = attempts.iter().collect();
        let events: Vec<&queries::RunEvent> = events.iter().collect();
        let strikes = strike_reports(&plan.nodes[0], &attempts, &events);
        let summary: Vec<_> = strikes
            .iter()
            .map(|s| {
                (
                    s.strike,
                    s.agent.as_deref().or(s.channel.as_deref()),
                    s.action.as_deref(),
                    s.attempts.clone(),
                    s.result.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    1,
                    Some("primary"),
                    Some("compile"),
                    vec![1, 2],
                    Some("failure")
                ),
                (2, Some("spare"), Some("slow"), vec![3], Some("failure")),
                (3, Some("ops"), None, vec![], Some("notified")),
                (
                    1,
                    Some("primary"),
                    Some("compile"),
                    vec![9],
                    Some("success")
                ),
            ]
        );
        assert_eq!(strikes[0].errors, ["boom 1", "boom 2"]);
        let operator = strikes[2].operator.as_ref().unwrap();
        assert_eq!(
            (operator.actor.as_str(), operator.action.as_str()),
            ("alice", "retry")
        );
        assert!(strikes[1].operator.is_none());
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let run = RunRecord {
            id: Uuid::now_v7(),
            name: "n".into(),
            status: "running".into(),
            params: Value::Null,
            created_at: DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap(),
            ended_at: None,
            error: None,
            subset: Default::default(),
            parent: None,
        };
        assert_eq!(
            decode_cursor(&encode_cursor(&run)).unwrap(),
            (run.created_at, run.id)
        );
        assert!(matches!(
            decode_cursor("yesterday"),
            Err(BackendError::Invalid(_))
        ));
    }
}
