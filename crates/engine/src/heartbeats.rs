//! Consumes worker heartbeats and renews the leases of the attempts they list, many heartbeats
//! per statement, so that hundreds of workers cost Postgres a few writes per second.

use std::time::Duration;

use chrono::Utc;
use flotilla_broker::{Connection, Consumer};
use flotilla_proto::{Heartbeat, QueueNames};
use flotilla_store::Store;
use flotilla_store::engine as db;
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

/// The most heartbeats folded into one write.
const BATCH: usize = 256;

/// Consumes `{prefix}.heartbeats` until `shutdown`; each listed attempt's lease is renewed to
/// `lease` from now.
pub async fn run(
    connection: &Connection,
    names: &QueueNames,
    store: Store,
    lease: Duration,
    shutdown: CancellationToken,
) -> Result<(), flotilla_broker::Error> {
    let mut consumer = Consumer::start(connection, &names.heartbeats(), "", BATCH as u16).await?;
    let lease = chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
    loop {
        let first = tokio::select! {
            next = consumer.next() => next,
            () = shutdown.cancelled() => break,
        };
        let Some(first) = first else { break };
        let mut deliveries = vec![first?];
        // Take whatever else is already here without waiting for more.
        while deliveries.len() < BATCH {
            match consumer.next().now_or_never() {
                Some(Some(next)) => deliveries.push(next?),
                _ => break,
            }
        }
        let mut held = Vec::new();
        for d in &deliveries {
            match serde_json::from_slice::<Heartbeat>(&d.body) {
                Ok(beat) => held.extend(
                    beat.tasks
                        .into_iter()
                        .map(|t| (t.run_id, t.step_id, t.task_id)),
                ),
                Err(e) => tracing::warn!(error = %e, "unreadable heartbeat dropped"),
            }
        }
        match store.client().await {
            Ok(client) => {
                if let Err(e) = db::renew_leases(&client, &held, Utc::now() + lease).await {
                    tracing::warn!(error = %e, "could not renew leases");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew leases"),
        }
        // A lost heartbeat costs nothing: the next one renews the same leases.
        if let Some(last) = deliveries.last() {
            last.ack_multiple().await?;
        }
    }
    let _ = consumer.close().await;
    Ok(())
}
