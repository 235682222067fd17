//! What the quotas of namespaces count in Postgres.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;

use crate::Error;

/// The first key of the advisory locks of namespaces' run quotas (the second is the
/// namespace's hash), apart from every other advisory lock.
const RUN_QUOTA_LOCK: i32 = 55;

/// Locks the run quotas of `namespaces` until the transaction ends, so that submissions to one
/// namespace are counted one transaction after another on every coordinator, and answers how
/// many runs each has in flight: submitted and not ended (a sub-workflow's run is part of its
/// parent's). The caller takes these locks after its other locks, in the same order everywhere.
pub async fn lock_runs_in_flight(
    tx: &impl GenericClient,
    namespaces: &[String],
) -> Result<HashMap<String, i64>, Error> {
    let mut sorted: Vec<&String> = namespaces.iter().collect();
    sorted.sort();
    sorted.dedup();
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .await?;
    for namespace in &sorted {
        tx.execute(&lock, &[&RUN_QUOTA_LOCK, namespace]).await?;
    }
    let count = tx
        .prepare_cached(
            "SELECT namespace, count(*) FROM runs
             WHERE namespace = ANY($1) AND ended_at IS NULL AND parent_run_id IS NULL
             GROUP BY namespace",
        )
        .await?;
    let mut counts: HashMap<String, i64> = sorted.iter().map(|n| ((*n).clone(), 0)).collect();
    for row in tx.query(&count, &[&sorted]).await? {
        counts.insert(row.get(0), row.get(1));
    }
    Ok(counts)
}
