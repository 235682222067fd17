//! The transactional outbox: messages written in the same transaction as the state change that
//! caused them, deleted once the broker has confirmed them.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::Error;
use crate::engine::OutboxRow;

/// Part of an engine batch (see [`crate::engine::write`]), hence the driver's error.
pub(crate) async fn insert(
    tx: &impl GenericClient,
    rows: &[OutboxRow],
) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.routing_key.as_str()).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
    let corr: Vec<Option<&str>> = rows.iter().map(|r| r.correlation_id.as_deref()).collect();
    let reply: Vec<Option<&str>> = rows.iter().map(|r| r.reply_to.as_deref()).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|r| r.body.as_slice()).collect();
    let created: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO outbox (id, routing_key, kind, correlation_id, reply_to, body, created_at)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::bytea[], $7::timestamptz[])",
        )
        .await?;
    tx.execute(
        &stmt,
        &[&ids, &keys, &kinds, &corr, &reply, &bodies, &created],
    )
    .await
}

/// Forgets messages the broker has confirmed. The delete's commit does not wait for the WAL to
/// reach the disk: should Postgres crash before it does, the rows are only published again by
/// the sweeper, and receivers fence such duplicates off; meanwhile the commits that must be
/// durable do not queue behind these flushes.
pub async fn delete(client: &impl GenericClient, ids: &[Uuid]) -> Result<u64, Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let stmt = client
        .prepare_cached(
            "WITH lazy AS (SELECT set_config('synchronous_commit', 'off', true))
             DELETE FROM outbox WHERE id = ANY($1) AND EXISTS (SELECT FROM lazy)",
        )
        .await?;
    Ok(client.execute(&stmt, &[&ids]).await?)
}

/// Locks and returns up to `limit` messages created before `before` that nobody else holds:
/// those a crashed or disconnected relay left unconfirmed. Call inside a transaction and delete
/// what got confirmed before committing.
pub async fn take_unsent(
    tx: &impl GenericClient,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<OutboxRow>, Error> {
    let stmt = tx
        .prepare_cached(
            "SELECT id, routing_key, kind, correlation_id, reply_to, body, created_at FROM outbox
             WHERE created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .await?;
    Ok(tx
        .query(&stmt, &[&before, &limit])
        .await?
        .iter()
        .map(|r| OutboxRow {
            id: r.get(0),
            routing_key: r.get(1),
            kind: r.get(2),
            correlation_id: r.get(3),
            reply_to: r.get(4),
            body: r.get(5),
            created_at: r.get(6),
        })
        .collect())
}

/// When the oldest message waiting to be confirmed was committed.
pub async fn oldest(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached("SELECT min(created_at) FROM outbox")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// How many messages wait to be confirmed.
pub async fn backlog(client: &impl GenericClient) -> Result<i64, Error> {
    let stmt = client.prepare_cached("SELECT count(*) FROM outbox").await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}
