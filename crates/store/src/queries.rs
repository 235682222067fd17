//! Read-only views of runs for the API.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use flotilla_core::labels::Labels;
use serde_json::Value;
use uuid::Uuid;

use crate::Error;

/// A run's row.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub params: Value,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Why the run failed, when no step's failure says it.
    pub error: Option<String>,
    /// The steps its submission selected or left out.
    pub subset: flotilla_core::Subset,
    /// The run and step that started this run as a sub-workflow (read by [`run`] only).
    pub parent: Option<(Uuid, String)>,
}

/// A step's row.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub step_id: String,
    pub agent: String,
    pub action: String,
    pub status: String,
    pub attempt: i32,
    pub wake_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// The strike the step reached: 1 its retries, 2 its fallback, 3 escalated.
    pub strike: i16,
    /// The agent whose circuit breaker holds the step, while it does.
    pub held_for: Option<String>,
    /// For an instance of a `for_each` step, the position of its step in the plan.
    pub instance_of: Option<i32>,
    /// The definition a sub-workflow step runs.
    pub workflow: Option<String>,
    /// The run its current attempt started, for a sub-workflow step.
    pub child_run_id: Option<Uuid>,
    /// The agent of the step's attempt, while that attempt is queued: dispatched and not yet
    /// started by any worker.
    pub queued_for: Option<String>,
    /// The labels a worker must have to start that queued attempt (none for a fallback's).
    pub queued_labels: Labels,
}

fn run_record(r: &tokio_postgres::Row) -> RunRecord {
    RunRecord {
        id: r.get(0),
        name: r.get(1),
        status: r.get(2),
        params: r.get(3),
        created_at: r.get(4),
        ended_at: r.get(5),
        error: r.get(6),
        subset: crate::engine::subset_from_json(r.get(7)),
        parent: None,
    }
}

/// A run of `namespaces` (of any when `None`) and its steps in plan order.
pub async fn run(
    client: &impl GenericClient,
    namespaces: Option<&[String]>,
    id: Uuid,
) -> Result<Option<(RunRecord, Vec<StepRecord>)>, Error> {
    let run_stmt = client
        .prepare_cached(
            "SELECT id, name, status, params, created_at, ended_at, error, subset, parent_run_id,
                    parent_step_id
             FROM runs WHERE id = $1 AND ($2::text[] IS NULL OR namespace = ANY($2))",
        )
        .await?;
    let Some(run) = client.query_opt(&run_stmt, &[&id, &namespaces]).await? else {
        return Ok(None);
    };
    let steps_stmt = client
        .prepare_cached(
            "SELECT s.step_id, s.agent, s.action, s.status, s.attempt, s.wake_at, s.started_at,
                    s.ended_at, s.output, s.error, s.strike, s.held_for, s.instance_of, s.workflow,
                    child.id, a.agent, CASE WHEN a.strike <> 2 THEN s.labels END
             FROM steps s LEFT JOIN runs child ON child.id = s.task_id AND child.parent_run_id = s.run_id
             LEFT JOIN attempts a ON s.queued_at IS NOT NULL AND a.task_id = s.task_id
             WHERE s.run_id = $1 ORDER BY s.idx",
        )
        .await?;
    let steps = client
        .query(&steps_stmt, &[&id])
        .await?
        .iter()
        .map(|r| StepRecord {
            step_id: r.get(0),
            agent: r.get(1),
            action: r.get(2),
            status: r.get(3),
            attempt: r.get(4),
            wake_at: r.get(5),
            started_at: r.get(6),
            ended_at: r.get(7),
            output: r.get(8),
            error: r.get(9),
            strike: r.get(10),
            held_for: r.get(11),
            instance_of: r.get(12),
            workflow: r.get(13),
            child_run_id: r.get(14),
            queued_for: r.get(15),
            queued_labels: r
                .get::<_, Option<Value>>(16)
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default(),
        })
        .collect();
    let mut record = run_record(&run);
    record.parent = run.get::<_, Option<Uuid>>(8).zip(run.get(9));
    Ok(Some((record, steps)))
}

/// One attempt of a step, for a run's report.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// The step's position in the plan.
    pub idx: i32,
    pub attempt: i32,
    pub status: String,
    pub dispatched_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub error: Option<String>,
    /// The strike the attempt belonged to (1 retries, 2 fallback).
    pub strike: i16,
    /// The agent it called; absent for attempts recorded before this was.
    pub agent: Option<String>,
}

/// Of `ids`, the runs in `namespaces` (all of them for `None`).
pub async fn runs_in(
    client: &impl GenericClient,
    namespaces: Option<&[String]>,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT id FROM runs WHERE id = ANY($1) AND ($2::text[] IS NULL OR namespace = ANY($2))",
        )
        .await?;
    let rows = client.query(&stmt, &[&ids, &namespaces]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// The definition a run started with (its stored content), and every attempt of its steps in
/// plan and attempt order; `None` when there is no such run.
pub async fn run_attempts(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<(Value, Vec<AttemptRecord>)>, Error> {
    let definition_stmt = client
        .prepare_cached(
            "SELECT c.body FROM runs r JOIN definition_contents c ON c.hash = r.definition_hash
             WHERE r.id = $1",
        )
        .await?;
    let Some(definition) = client.query_opt(&definition_stmt, &[&id]).await? else {
        return Ok(None);
    };
    let stmt = client
        .prepare_cached(
            "SELECT idx, attempt, status, dispatched_at, started_at, finished_at, worker, error,
                    strike, agent
             FROM attempts WHERE run_id = $1 ORDER BY idx, attempt",
        )
        .await?;
    let attempts = client
        .query(&stmt, &[&id])
        .await?
        .iter()
        .map(|r| AttemptRecord {
            idx: r.get(0),
            attempt: r.get(1),
            status: r.get(2),
            dispatched_at: r.get(3),
            started_at: r.get(4),
            finished_at: r.get(5),
            worker: r.get(6),
            error: r.get(7),
            strike: r.get(8),
            agent: r.get(9),
        })
        .collect();
    Ok(Some((definition.get(0), attempts)))
}

/// Where a page of runs starts: after the run with this creation time and id.
pub type Cursor = (DateTime<Utc>, Uuid);

/// Which runs a listing shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunFilter<'a> {
    /// Of these namespaces; of all when `None`.
    pub namespaces: Option<&'a [String]>,
    pub status: Option<&'a str>,
    /// The definition's name.
    pub name: Option<&'a str>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
}

/// Runs, newest first, that pass `filter`, after `cursor`.
pub async fn list_runs(
    client: &impl GenericClient,
    filter: RunFilter<'_>,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<Vec<RunRecord>, Error> {
    let (after_time, after_id) = match cursor {
        Some((t, id)) => (Some(t), Some(id)),
        None => (None, None),
    };
    let stmt = client
        .prepare_cached(
            "SELECT id, name, status, params, created_at, ended_at, error, subset FROM runs
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
               AND ($5::text IS NULL OR name = $5)
               AND ($6::timestamptz IS NULL OR created_at >= $6)
               AND ($7::text[] IS NULL OR namespace = ANY($7))
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .await?;
    let RunFilter {
        namespaces,
        status,
        name,
        since,
    } = filter;
    Ok(client
        .query(
            &stmt,
            &[
                &status,
                &after_time,
                &after_id,
                &limit,
                &name,
                &since,
                &namespaces,
            ],
        )
        .await?
        .iter()
        .map(run_record)
        .collect())
}

/// An operator's action on a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEvent {
    pub run_id: Uuid,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub step_id: Option<String>,
    pub detail: Option<Value>,
}

/// Appends to runs' histories.
pub async fn record_events(client: &impl GenericClient, events: &[RunEvent]) -> Result<(), Error> {
    for e in events {
        let stmt = client
            .prepare_cached(
                "INSERT INTO run_events (run_id, at, actor, action, step_id, detail)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        client
            .execute(
                &stmt,
                &[&e.run_id, &e.at, &e.actor, &e.action, &e.step_id, &e.detail],
            )
            .await?;
    }
    Ok(())
}

/// A run's history of operator actions, oldest first.
pub async fn run_events(client: &impl GenericClient, run_id: Uuid) -> Result<Vec<RunEvent>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT run_id, at, actor, action, step_id, detail FROM run_events
             WHERE run_id = $1 ORDER BY id",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&run_id])
        .await?
        .iter()
        .map(|r| RunEvent {
            run_id: r.get(0),
            at: r.get(1),
            actor: r.get(2),
            action: r.get(3),
            step_id: r.get(4),
            detail: r.get(5),
        })
        .collect())
}

/// How many runs have not ended.
pub async fn active_runs(client: &impl GenericClient) -> Result<i64, Error> {
    let active: Vec<&str> = flotilla_core::RunStatus::ALL
        .iter()
        .filter(|s| !s.is_terminal())
        .map(|s| s.as_str())
        .collect();
    let stmt = client
        .prepare_cached("SELECT count(*) FROM runs WHERE status = ANY($1)")
        .await?;
    Ok(client.query_one(&stmt, &[&active]).await?.get(0))
}

/// The attempts of one agent that ended in a range.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentAttempts {
    pub agent: String,
    pub executions: i64,
    pub successes: i64,
    /// p50, p95 and p99 of the run time workers reported, in milliseconds; `None` when no
    /// worker reported one (the coordinator ended them all).
    pub run_time_ms: Option<[f64; 3]>,
}

/// The attempts that ended at or after `since`, by agent (in name order).
pub async fn attempts_since(
    client: &impl GenericClient,
    since: DateTime<Utc>,
) -> Result<Vec<AgentAttempts>, Error> {
    let stmt = client
        .prepare_cached(
            // An attempt names the agent it called (a fallback may call another); attempts
            // recorded before that column existed take their step's.
            "SELECT coalesce(a.agent, s.agent) AS agent, count(*),
                count(*) FILTER (WHERE a.status = 'success'),
                percentile_cont(ARRAY[0.5, 0.95, 0.99]::float8[]) WITHIN GROUP (
                    ORDER BY extract(epoch FROM a.finished_at - a.started_at)::float8 * 1000
                ) FILTER (WHERE a.worker <> '' AND a.started_at IS NOT NULL)
             FROM attempts a
             JOIN steps s ON s.run_id = a.run_id AND s.idx = a.idx
             WHERE a.finished_at >= $1
             GROUP BY 1
             ORDER BY 1",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&since])
        .await?
        .iter()
        .map(|r| {
            let percentiles: Option<Vec<f64>> = r.get(3);
            AgentAttempts {
                agent: r.get(0),
                executions: r.get(1),
                successes: r.get(2),
                run_time_ms: percentiles.and_then(|p| p.try_into().ok()),
            }
        })
        .collect())
}

/// One agent's attempts that ended in a span of time.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptFigures {
    pub executions: i64,
    pub errors: i64,
    /// p50, p95 and p99 of the run time workers reported, in milliseconds; `None` when no
    /// worker reported one.
    pub run_time_ms: Option<[f64; 3]>,
}

/// The attempts of `agent` that ended in `since..until`: over the whole range, and per bucket
/// of `bucket` (by its number from `since`: 0, 1…; buckets without any are left out).
pub async fn agent_attempts(
    client: &impl GenericClient,
    agent: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    bucket: std::time::Duration,
) -> Result<(AttemptFigures, Vec<(i64, AttemptFigures)>), Error> {
    let stmt = client
        .prepare_cached(
            // As in `attempts_since`; the grouping set `()` is the whole range (bucket NULL).
            "SELECT bucket, count(*), count(*) FILTER (WHERE status = 'failure'),
                percentile_cont(ARRAY[0.5, 0.95, 0.99]::float8[]) WITHIN GROUP (ORDER BY run_ms)
                    FILTER (WHERE run_ms IS NOT NULL)
             FROM (SELECT floor(extract(epoch FROM a.finished_at - $2::timestamptz)::float8 * 1000 / $3::float8)::int8 AS bucket,
                          a.status,
                          CASE WHEN a.worker <> '' AND a.started_at IS NOT NULL
                               THEN extract(epoch FROM a.finished_at - a.started_at)::float8 * 1000
                          END AS run_ms
                   FROM attempts a
                   JOIN steps s ON s.run_id = a.run_id AND s.idx = a.idx
                   WHERE a.finished_at >= $2 AND a.finished_at < $4
                     AND coalesce(a.agent, s.agent) = $1::text) ended
             GROUP BY GROUPING SETS ((bucket), ())
             ORDER BY bucket NULLS FIRST",
        )
        .await?;
    let bucket_ms = bucket.as_millis().max(1) as f64;
    let mut total = AttemptFigures {
        executions: 0,
        errors: 0,
        run_time_ms: None,
    };
    let mut buckets = Vec::new();
    for r in client
        .query(&stmt, &[&agent, &since, &bucket_ms, &until])
        .await?
    {
        let percentiles: Option<Vec<f64>> = r.get(3);
        let figures = AttemptFigures {
            executions: r.get(1),
            errors: r.get(2),
            run_time_ms: percentiles.and_then(|p| p.try_into().ok()),
        };
        match r.get::<_, Option<i64>>(0) {
            Some(n) => buckets.push((n, figures)),
            None => total = figures,
        }
    }
    Ok((total, buckets))
}
