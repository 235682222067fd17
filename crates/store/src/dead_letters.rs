//! Tasks RabbitMQ dead-lettered, kept for operators to inspect and redrive.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::Error;

/// A dead-lettered task.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: Uuid,
    /// Absent when the body could not be read as a task.
    pub run_id: Option<Uuid>,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
    pub task_id: Option<Uuid>,
    pub reason: String,
    pub deliveries: Option<i64>,
    pub body: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub redriven_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str =
    "id, run_id, step_id, attempt, task_id, reason, deliveries, body, created_at, redriven_at";

fn dead_letter(r: &tokio_postgres::Row) -> DeadLetter {
    DeadLetter {
        id: r.get(0),
        run_id: r.get(1),
        step_id: r.get(2),
        attempt: r.get(3),
        task_id: r.get(4),
        reason: r.get(5),
        deliveries: r.get(6),
        body: r.get(7),
        created_at: r.get(8),
        redriven_at: r.get(9),
    }
}

/// How many dead letters were not redriven.
pub async fn pending(client: &impl GenericClient) -> Result<i64, Error> {
    let stmt = client
        .prepare_cached("SELECT count(*) FROM dead_letters WHERE redriven_at IS NULL")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// Records dead letters; one already recorded (the same id) is left alone, so a redelivered
/// dead letter is recorded once.
pub async fn insert(client: &impl GenericClient, letters: &[DeadLetter]) -> Result<(), Error> {
    for l in letters {
        let stmt = client
            .prepare_cached(&format!(
                "INSERT INTO dead_letters ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (id) DO NOTHING"
            ))
            .await?;
        client
            .execute(
                &stmt,
                &[
                    &l.id,
                    &l.run_id,
                    &l.step_id,
                    &l.attempt,
                    &l.task_id,
                    &l.reason,
                    &l.deliveries,
                    &l.body,
                    &l.created_at,
                    &l.redriven_at,
                ],
            )
            .await?;
    }
    Ok(())
}

/// Dead letters, newest first; with `pending_only`, those not redriven yet.
pub async fn list(
    client: &impl GenericClient,
    pending_only: bool,
    limit: i64,
) -> Result<Vec<DeadLetter>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM dead_letters WHERE (NOT $1 OR redriven_at IS NULL)
             ORDER BY created_at DESC LIMIT $2"
        ))
        .await?;
    Ok(client
        .query(&stmt, &[&pending_only, &limit])
        .await?
        .iter()
        .map(dead_letter)
        .collect())
}

/// Locks the given dead letters that are not redriven yet (all of them when `ids` is empty).
pub async fn lock_pending(
    client: &impl GenericClient,
    ids: &[Uuid],
) -> Result<Vec<DeadLetter>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM dead_letters
             WHERE redriven_at IS NULL AND (cardinality($1::uuid[]) = 0 OR id = ANY($1))
             ORDER BY created_at FOR UPDATE"
        ))
        .await?;
    Ok(client
        .query(&stmt, &[&ids])
        .await?
        .iter()
        .map(dead_letter)
        .collect())
}

/// Marks dead letters as redriven.
pub async fn mark_redriven(
    client: &impl GenericClient,
    ids: &[Uuid],
    at: DateTime<Utc>,
) -> Result<(), Error> {
    let stmt = client
        .prepare_cached("UPDATE dead_letters SET redriven_at = $2 WHERE id = ANY($1)")
        .await?;
    client.execute(&stmt, &[&ids, &at]).await?;
    Ok(())
}
