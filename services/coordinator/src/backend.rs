//! The API's backend: reads from Postgres, submissions through the engine.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use flotilla_api::{Backend, BackendError, NewSchedule, Submission};
use flotilla_api_model::{
    AGENT_HEALTHY, AGENT_NO_WORKERS, AGENT_UNHEALTHY, AgentStatus, AgentSummary, AttemptReport,
    DeadLetterQuery, DeadLetterSummary, DefinitionDetail, DefinitionSummary, Metrics, Operation,
    RedriveOutcome, RunEvent, RunPage, RunQuery, RunReport, RunSummary, ScheduleSummary,
    StepReport, StepResult, Submitted, WorkerStatus, WorkflowResult,
};
use flotilla_core::registry::{RegistryPolicy, WorkerHealth};
use flotilla_core::schedule::Schedule;
use flotilla_core::{Definition, Plan, report};
use flotilla_engine::Operation as EngineOperation;
use flotilla_engine::{EngineHandle, NewRun};
use flotilla_store::queries::{self, Cursor, RunRecord, StepRecord};
use flotilla_store::registry::{self, WorkerRecord};
use flotilla_store::schedules::{self, ScheduleRow};
use flotilla_store::{Store, dead_letters, definitions};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::health::CoordinatorProbe;

pub struct CoordinatorBackend {
    pub store: Store,
    pub engine: EngineHandle,
    /// When a registered worker counts as healthy.
    pub registry: RegistryPolicy,
    /// Asks RabbitMQ for queue depths.
    pub probe: Arc<CoordinatorProbe>,
}

fn store_error(e: flotilla_store::Error) -> BackendError {
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
        _ => {}
    }
    if e.is_unavailable() {
        BackendError::Unavailable(e.to_string())
    } else {
        BackendError::Internal(e.to_string())
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

/// `served`: the agents a healthy worker serves.
fn workflow_result(
    run: RunRecord,
    steps: Vec<StepRecord>,
    served: &HashSet<String>,
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
                waiting_for_worker: s
                    .queued_for
                    .as_ref()
                    .is_some_and(|agent| !served.contains(agent.as_str())),
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
        steps,
        metrics,
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

impl Backend for CoordinatorBackend {
    async fn submit(&self, submission: Submission) -> Result<Submitted, BackendError> {
        self.engine
            .submit(NewRun {
                definition: submission.definition,
                plan: Arc::new(submission.plan),
                params: submission.params,
                idempotency_key: submission.idempotency_key,
            })
            .await
            .map(|s| Submitted {
                workflow_id: s.id,
                replayed: s.replayed,
            })
            .map_err(engine_error)
    }

    async fn run(&self, id: Uuid) -> Result<Option<WorkflowResult>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let Some((run, steps)) = queries::run(&client, id).await.map_err(store_error)? else {
            return Ok(None);
        };
        let served = if steps.iter().any(|s| s.queued_for.is_some()) {
            let now = Utc::now();
            registry::workers(&client, None)
                .await
                .map_err(store_error)?
                .into_iter()
                .filter(|w| self.registry.health(w.last_seen, now) == Some(WorkerHealth::Healthy))
                .flat_map(|w| w.agents)
                .collect()
        } else {
            HashSet::new()
        };
        Ok(Some(workflow_result(run, steps, &served)))
    }

    async fn report(&self, id: Uuid) -> Result<Option<RunReport>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let Some((run, steps)) = queries::run(&client, id).await.map_err(store_error)? else {
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
        Ok(Some(run_report(run, steps, &plan, attempts)))
    }

    async fn runs(&self, query: RunQuery) -> Result<RunPage, BackendError> {
        let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
        let limit = i64::from(query.limit.unwrap_or(50));
        let client = self.store.client().await.map_err(store_error)?;
        let rows = queries::list_runs(&client, query.status.as_deref(), limit, cursor)
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
        definition: Definition,
    ) -> Result<DefinitionSummary, BackendError> {
        let mut client = self.store.client().await.map_err(store_error)?;
        let registered = definitions::register(&mut client, &definition)
            .await
            .map_err(store_error)?;
        // The latest revision decides: a `schedule:` (re)schedules the name, none unschedules it.
        match &definition.schedule {
            Some(spec) => {
                let schedule = Schedule::from_spec(spec).map_err(BackendError::Invalid)?;
                let row = schedule_row(&definition.name, &schedule, Map::new())?;
                schedules::put(&client, &row).await.map_err(store_error)?;
                tracing::info!(definition = %definition.name, cron = %schedule.cron, next_at = %row.next_at, "scheduled");
            }
            None => {
                if schedules::delete(&client, &definition.name)
                    .await
                    .map_err(store_error)?
                {
                    tracing::info!(definition = %definition.name, "unscheduled");
                }
            }
        }
        Ok(summary(registered))
    }

    async fn definitions(&self) -> Result<Vec<DefinitionSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let list = definitions::list(&client).await.map_err(store_error)?;
        Ok(list.into_iter().map(summary).collect())
    }

    async fn definition(&self, name: &str) -> Result<Option<Definition>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let Some((_, body)) = definitions::latest(&client, name)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        Definition::from_value(body).map(Some).map_err(|e| {
            BackendError::Internal(format!("stored definition `{name}` is unreadable: {e}"))
        })
    }

    async fn definition_versions(
        &self,
        name: &str,
    ) -> Result<Vec<DefinitionSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let revisions = definitions::revisions(&client, name)
            .await
            .map_err(store_error)?;
        Ok(revisions.into_iter().map(summary).collect())
    }

    async fn definition_detail(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<DefinitionDetail>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let found = match version {
            Some(version) => definitions::version(&client, name, version).await,
            None => definitions::latest(&client, name).await,
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
        id: Uuid,
        operation: Operation,
        actor: String,
    ) -> Result<String, BackendError> {
        let operation = match operation {
            Operation::Cancel => EngineOperation::Cancel,
            Operation::Pause => EngineOperation::Pause,
            Operation::Resume => EngineOperation::Resume,
            Operation::Retry { step } => EngineOperation::Retry { step },
            Operation::Skip { step } => EngineOperation::Skip { step },
            Operation::Complete { step, output } => EngineOperation::Complete { step, output },
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

    async fn events(&self, id: Uuid) -> Result<Option<Vec<RunEvent>>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        if queries::run(&client, id)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Ok(None);
        }
        let events = queries::run_events(&client, id)
            .await
            .map_err(store_error)?;
        Ok(Some(
            events
                .into_iter()
                .map(|e| RunEvent {
                    at: e.at,
                    actor: e.actor,
                    action: e.action,
                    step_id: e.step_id,
                    detail: e.detail,
                })
                .collect(),
        ))
    }

    async fn put_schedule(&self, new: NewSchedule) -> Result<ScheduleSummary, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        if definitions::latest(&client, &new.definition)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Err(BackendError::NotFound(format!(
                "no workflow definition named `{}` is registered",
                new.definition
            )));
        }
        let row = schedule_row(&new.definition, &new.schedule, new.params)?;
        let stored = schedules::put(&client, &row).await.map_err(store_error)?;
        Ok(schedule_summary(stored))
    }

    async fn schedules(&self) -> Result<Vec<ScheduleSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let rows = schedules::list(&client).await.map_err(store_error)?;
        Ok(rows.into_iter().map(schedule_summary).collect())
    }

    async fn schedule(&self, id: &str) -> Result<Option<ScheduleSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        let row = schedules::get(&client, id).await.map_err(store_error)?;
        Ok(row.map(schedule_summary))
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        schedules::delete(&client, id).await.map_err(store_error)
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

/// A run's report from its rows: per step its attempts, queue wait and run time; the critical
/// path and parallelism as `flotilla_core::report` computes them.
fn run_report(
    run: RunRecord,
    steps: Vec<StepRecord>,
    plan: &Plan,
    attempts: Vec<queries::AttemptRecord>,
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
    let steps = steps
        .into_iter()
        .enumerate()
        .map(|(idx, step)| {
            let own: Vec<&queries::AttemptRecord> = attempts
                .iter()
                .filter(|a| usize::try_from(a.idx).ok() == Some(idx))
                .collect();
            let times: Vec<report::AttemptTimes> = own
                .iter()
                .map(|a| report::AttemptTimes {
                    dispatched: a.dispatched_at,
                    started: a.started_at,
                    finished: a.finished_at,
                })
                .collect();
            let (queued, ran) = report::step_times(&times);
            StepReport {
                status: api_step_status(&step.status).to_string(),
                step_id: step.step_id,
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
                error: step.error,
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

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let run = RunRecord {
            id: Uuid::now_v7(),
            name: "n".into(),
            status: "running".into(),
            params: Value::Null,
            created_at: DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap(),
            ended_at: None,
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
