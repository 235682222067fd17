//! Idempotency keys of submissions: a repeated submission with the same key answers the run the
//! first one started, for as long as the key is kept.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::Error;

/// Serialises submissions that share a key (across coordinators) until the transaction ends, and
/// returns the runs already started under those keys since `since`.
pub async fn claim(
    tx: &impl GenericClient,
    keys: &[&str],
    since: DateTime<Utc>,
) -> Result<HashMap<String, Uuid>, Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let mut sorted: Vec<&str> = keys.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let lock = tx
        .prepare_cached(
            "SELECT pg_advisory_xact_lock(hashtext('idempotency:' || k))
             FROM unnest($1::text[]) AS k ORDER BY k",
        )
        .await?;
    tx.query(&lock, &[&sorted]).await?;
    let select = tx
        .prepare_cached(
            "SELECT key, run_id FROM idempotency_keys WHERE key = ANY($1) AND created_at >= $2",
        )
        .await?;
    Ok(tx
        .query(&select, &[&sorted, &since])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Records the runs started under keys; an expired record of the same key is replaced.
pub async fn record(
    tx: &impl GenericClient,
    started: &[(String, Uuid)],
    at: DateTime<Utc>,
) -> Result<(), Error> {
    if started.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = started.iter().map(|(k, _)| k.as_str()).collect();
    let runs: Vec<Uuid> = started.iter().map(|(_, r)| *r).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO idempotency_keys (key, run_id, created_at)
             SELECT k, r, $3 FROM unnest($1::text[], $2::uuid[]) AS u(k, r)
             ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id, created_at = excluded.created_at",
        )
        .await?;
    tx.execute(&stmt, &[&keys, &runs, &at]).await?;
    Ok(())
}

/// Forgets keys recorded before `before`.
pub async fn purge(client: &impl GenericClient, before: DateTime<Utc>) -> Result<u64, Error> {
    let stmt = client
        .prepare_cached("DELETE FROM idempotency_keys WHERE created_at < $1")
        .await?;
    Ok(client.execute(&stmt, &[&before]).await?)
}
