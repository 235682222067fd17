//! Schedules of registered definitions.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::Error;

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRow {
    /// The namespace of the schedule and of its definition.
    pub namespace: String,
    /// The definition it runs (its latest revision at each tick).
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub missed: String,
    pub overlap: String,
    /// Params of every run it starts.
    pub params: Map<String, Value>,
    pub next_at: DateTime<Utc>,
    pub last_run_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "name, cron, timezone, missed, overlap, params, next_at, last_run_id, created_at, namespace";

fn row(r: &tokio_postgres::Row) -> ScheduleRow {
    let params: Value = r.get(5);
    ScheduleRow {
        name: r.get(0),
        cron: r.get(1),
        timezone: r.get(2),
        missed: r.get(3),
        overlap: r.get(4),
        params: match params {
            Value::Object(map) => map,
            _ => Map::new(),
        },
        next_at: r.get(6),
        last_run_id: r.get(7),
        created_at: r.get(8),
        namespace: r.get(9),
    }
}

/// Creates or replaces the schedule of a definition (in its namespace).
pub async fn put(client: &impl GenericClient, s: &ScheduleRow) -> Result<ScheduleRow, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "INSERT INTO schedules ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (namespace, name) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone,
                 missed = excluded.missed, overlap = excluded.overlap, params = excluded.params,
                 next_at = excluded.next_at
             RETURNING {COLUMNS}"
        ))
        .await?;
    let params = Value::Object(s.params.clone());
    let r = client
        .query_one(
            &stmt,
            &[
                &s.name,
                &s.cron,
                &s.timezone,
                &s.missed,
                &s.overlap,
                &params,
                &s.next_at,
                &s.last_run_id,
                &s.created_at,
                &s.namespace,
            ],
        )
        .await?;
    Ok(row(&r))
}

/// Every schedule of `namespaces` (of all when `None`), by name.
pub async fn list(
    client: &impl GenericClient,
    namespaces: Option<&[String]>,
) -> Result<Vec<ScheduleRow>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM schedules WHERE $1::text[] IS NULL OR namespace = ANY($1)
             ORDER BY name, namespace"
        ))
        .await?;
    Ok(client
        .query(&stmt, &[&namespaces])
        .await?
        .iter()
        .map(row)
        .collect())
}

/// The schedule of definition `name` of `namespace`, if it has one.
pub async fn get(
    client: &impl GenericClient,
    namespace: &str,
    name: &str,
) -> Result<Option<ScheduleRow>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM schedules WHERE namespace = $1 AND name = $2"
        ))
        .await?;
    Ok(client
        .query_opt(&stmt, &[&namespace, &name])
        .await?
        .as_ref()
        .map(row))
}

/// Removes a schedule; answers whether there was one.
pub async fn delete(
    client: &impl GenericClient,
    namespace: &str,
    name: &str,
) -> Result<bool, Error> {
    let stmt = client
        .prepare_cached("DELETE FROM schedules WHERE namespace = $1 AND name = $2")
        .await?;
    Ok(client.execute(&stmt, &[&namespace, &name]).await? > 0)
}

/// Locks the schedules due at `now` that no other coordinator holds.
pub async fn claim_due(
    tx: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<ScheduleRow>, Error> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM schedules WHERE next_at <= $1 ORDER BY next_at LIMIT $2
             FOR UPDATE SKIP LOCKED"
        ))
        .await?;
    Ok(tx
        .query(&stmt, &[&now, &limit])
        .await?
        .iter()
        .map(row)
        .collect())
}

/// Moves a schedule to its next tick, noting the run its last tick started.
pub async fn advance(
    tx: &impl GenericClient,
    namespace: &str,
    name: &str,
    next_at: DateTime<Utc>,
    last_run_id: Option<Uuid>,
) -> Result<(), Error> {
    let stmt = tx
        .prepare_cached(
            "UPDATE schedules SET next_at = $2, last_run_id = coalesce($3, last_run_id)
             WHERE name = $1 AND namespace = $4",
        )
        .await?;
    tx.execute(&stmt, &[&name, &next_at, &last_run_id, &namespace])
        .await?;
    Ok(())
}

/// The earliest tick of any schedule.
pub async fn next_tick(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached("SELECT min(next_at) FROM schedules")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// Whether a run has not ended yet.
pub async fn run_active(client: &impl GenericClient, run_id: Uuid) -> Result<bool, Error> {
    let stmt = client
        .prepare_cached("SELECT status FROM runs WHERE id = $1")
        .await?;
    Ok(client.query_opt(&stmt, &[&run_id]).await?.is_some_and(|r| {
        let status: String = r.get(0);
        flotilla_core::RunStatus::parse(&status).is_some_and(|s| !s.is_terminal())
    }))
}
