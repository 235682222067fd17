//! Consumes worker heartbeats and renews the leases of the attempts they list, many heartbeats
//! per statement, so that hundreds of workers cost Postgres a few writes per second.

use std::time::Duration;

use chrono::Utc;
use flotilla_broker::{Connection, ReconnectingConsumer, declare_heartbeats_queue};
use flotilla_proto::{Heartbeat, QueueNames};
use flotilla_store::Store;
use flotilla_store::engine as db;
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

/// The most heartbeats folded into one write.
const BATCH: usize = 256;

/// Consumes `{prefix}.heartbeats` until `shutdown`, reconnecting when the connection is lost;
/// each listed attempt's lease is renewed to `lease` from now.
pub async fn run(
    connection: &Connection,
    names: &QueueNames,
    store: Store,
    lease: Duration,
    shutdown: CancellationToken,
) -> Result<(), flotilla_broker::Error> {
    let declare_names = names.clone();
    let declare = move |channel| {
        let names = declare_names.clone();
        async move { declare_heartbeats_queue(&channel, &names).await }
    };
    let mut consumer = ReconnectingConsumer::start(
        connection,
        &names.heartbeats(),
        "",
        BATCH as u16,
        declare,
        shutdown,
    )
    .await?;
    let lease = chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
    while let Some(first) = consumer.next().await {
        let mut deliveries = vec![first];
        // Take whatever else is already here without waiting for more.
        while deliveries.len() < BATCH {
            match consumer.next().now_or_never() {
                Some(Some(next)) => deliveries.push(next),
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
        let renewed = async {
            let client = store.client().await?;
            let now = Utc::now();
            if db::pulse(&client, now, lease).await? {
                tracing::warn!("heartbeats resumed after a gap; every lease is extended once");
            }
            db::renew_leases(&client, &held, now, lease).await
        };
        if let Err(e) = renewed.await {
            tracing::warn!(error = %e, "could not renew leases");
        }
        // A lost heartbeat costs nothing: the next one renews the same leases.
        if let Some(last) = deliveries.last()
            && let Err(e) = last.ack_multiple().await
        {
            tracing::debug!(error = %e, "heartbeats not acked; they come again");
        }
    }
    if let Ok(consumer) = consumer.into_consumer() {
        let _ = consumer.close().await;
    }
    Ok(())
}
