//! The spans of runs and attempts, emitted once the batch that ended them has committed, and
//! the trace context of each task (see [`flotilla_telemetry::trace`] for the design: the trace
//! id is the run id, and span ids are derived from the run, step and attempt).

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use flotilla_core::RunState;
use flotilla_core::scheduler::ParentLink;
use flotilla_store::engine::OutboxRow;
use flotilla_telemetry::trace;
use uuid::Uuid;

/// A span to emit once its batch has committed.
pub(crate) enum Ended {
    Attempt {
        run_id: Uuid,
        step_id: String,
        agent: String,
        attempt: u32,
        task_id: Uuid,
        worker: String,
        error: Option<String>,
        /// When the worker says it started; `None` when the coordinator ended the attempt.
        started_at: Option<DateTime<Utc>>,
        finished_at: DateTime<Utc>,
    },
    Run {
        run_id: Uuid,
        workflow: String,
        status: &'static str,
        created_at: DateTime<Utc>,
        ended_at: DateTime<Utc>,
        /// For a sub-workflow's run: the attempt that started it.
        parent: Option<ParentLink>,
    },
}

impl Ended {
    /// Emits the span. An attempt spans from its dispatch, when this coordinator dispatched it
    /// (`dispatched`), else from the start its worker reported, else it is an instant.
    pub(crate) fn emit(self, dispatched: &HashMap<Uuid, DateTime<Utc>>) {
        match self {
            Ended::Attempt {
                run_id,
                step_id,
                agent,
                attempt,
                task_id,
                worker,
                error,
                started_at,
                finished_at,
            } => {
                let start = dispatched
                    .get(&task_id)
                    .copied()
                    .or(started_at)
                    .unwrap_or(finished_at);
                trace::attempt_ended(&trace::AttemptEnd {
                    run_id: run_id.as_u128(),
                    step_id: &step_id,
                    agent: &agent,
                    attempt,
                    task_id: task_id.as_u128(),
                    dispatched_at: start.into(),
                    ended_at: finished_at.into(),
                    worker: &worker,
                    error: error.as_deref(),
                });
            }
            Ended::Run {
                run_id,
                workflow,
                status,
                created_at,
                ended_at,
                parent,
            } => trace::run_ended(
                run_id.as_u128(),
                &workflow,
                status,
                created_at.into(),
                ended_at.into(),
                parent
                    .as_ref()
                    .map(|p| (p.run_id.as_u128(), p.step_id.as_str(), p.attempt)),
            ),
        }
    }
}

/// `Some` only when traces are exported, so that nothing is built for them otherwise.
pub(crate) fn when_enabled(ended: impl FnOnce() -> Ended) -> Option<Ended> {
    trace::enabled().then(ended)
}

/// The root span of a run that ended at `now` after `duration`. It starts no later than its
/// first step: the run id's timestamp, from which the duration counts, is taken after the
/// `now` of the batch that dispatched the first steps.
pub(crate) fn run(
    state: &RunState,
    workflow: &str,
    status: &'static str,
    duration: std::time::Duration,
    now: DateTime<Utc>,
) -> Option<Ended> {
    when_enabled(|| {
        let created = now - duration;
        Ended::Run {
            run_id: state.id,
            workflow: workflow.to_owned(),
            status,
            created_at: state
                .steps
                .iter()
                .filter_map(|s| s.started_at)
                .fold(created, DateTime::min),
            ended_at: now,
            parent: state.parent.clone(),
        }
    })
}

/// The W3C `traceparent` and `tracestate` headers of a task: its attempt's span, and the run's
/// root. Reads the ids from the body only when traces are exported.
pub(crate) fn trace_headers(row: &OutboxRow) -> Option<[(&'static str, String); 2]> {
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        run_id: Uuid,
        #[serde(borrow)]
        step_id: Cow<'a, str>,
        attempt: u32,
    }
    if !trace::enabled() || row.kind != "task" {
        return None;
    }
    let ids: Ids<'_> = serde_json::from_slice(&row.body).ok()?;
    let run_id = ids.run_id.as_u128();
    Some([
        (
            trace::TRACEPARENT,
            trace::attempt_traceparent(run_id, &ids.step_id, ids.attempt)?,
        ),
        (trace::TRACESTATE, trace::attempt_tracestate(run_id)?),
    ])
}
