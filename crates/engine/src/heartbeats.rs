//! Consumes worker heartbeats, registrations and deregistrations: renews the leases of the
//! attempts heartbeats list and keeps the registry of workers, many messages per statement, so
//! that hundreds of workers cost Postgres a few writes per second.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_broker::{Connection, ReconnectingConsumer, declare_heartbeats_queue};
use flotilla_core::registry::RegistryPolicy;
use flotilla_proto::{QueueNames, WorkerMessage};
use flotilla_store::Store;
use flotilla_store::engine as db;
use flotilla_store::registry::{self, Announcement, Sighting};
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

/// The most heartbeats folded into one write.
const BATCH: usize = 256;

/// Consumes `{prefix}.heartbeats` until `shutdown`, reconnecting when the connection is lost;
/// each listed attempt's lease is renewed to `lease` from now, and the registry records the
/// workers heard of and forgets, per `policy`, those silent too long.
pub async fn run(
    connection: &Connection,
    names: &QueueNames,
    store: Store,
    lease: Duration,
    policy: RegistryPolicy,
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
        let now = Utc::now();
        let mut fleet = Fleet::default();
        for d in &deliveries {
            match WorkerMessage::decode(&d.body) {
                Ok(message) => fleet.hear(message, now),
                Err(e) => tracing::warn!(error = %e, "unreadable heartbeat dropped"),
            }
        }
        let renewed = async {
            let client = store.client().await?;
            if db::pulse(&client, now, lease).await? {
                tracing::warn!("heartbeats resumed after a gap; every lease is extended once");
            }
            db::renew_leases(&client, &fleet.held, now, lease).await?;
            let seen: Vec<Sighting> = fleet.seen.into_values().collect();
            let gone: Vec<String> = fleet.gone.into_iter().collect();
            registry::record(&client, &seen, &gone, policy.forget_before(now)).await
        };
        if let Err(e) = renewed.await {
            tracing::warn!(error = %e, "could not renew leases and record the workers");
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

/// What one batch of the heartbeats queue says, folded per worker.
#[derive(Default)]
struct Fleet {
    /// The attempts heartbeats list: (run id, step id, task id).
    held: Vec<(uuid::Uuid, String, uuid::Uuid)>,
    seen: BTreeMap<String, Sighting>,
    /// Workers that said goodbye, and were not heard of again in the batch.
    gone: BTreeSet<String>,
}

impl Fleet {
    /// The batch's record of `worker_id`, which is heard of again if it said goodbye.
    fn sighting(&mut self, worker_id: String, now: DateTime<Utc>) -> &mut Sighting {
        self.gone.remove(&worker_id);
        self.seen
            .entry(worker_id.clone())
            .or_insert_with(|| Sighting {
                worker_id,
                agents: Vec::new(),
                concurrency: 0,
                in_flight: None,
                seen_at: now,
                registration: None,
            })
    }

    fn hear(&mut self, message: WorkerMessage, now: DateTime<Utc>) {
        let concurrency = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        match message {
            WorkerMessage::Heartbeat(beat) => {
                let in_flight = i32::try_from(beat.tasks.len()).unwrap_or(i32::MAX);
                self.held.extend(
                    beat.tasks
                        .into_iter()
                        .map(|t| (t.run_id, t.step_id, t.task_id)),
                );
                let sighting = self.sighting(beat.worker_id, now);
                sighting.agents = beat.agents;
                sighting.concurrency = concurrency(beat.concurrency);
                sighting.in_flight = Some(in_flight);
            }
            WorkerMessage::Registration(r) => {
                let registration = Some(Announcement {
                    actions: r.actions,
                    sdk: r.sdk,
                    host: r.host,
                    pid: i32::try_from(r.pid).unwrap_or(i32::MAX),
                    labels: r.labels,
                    started_at: r.started_at,
                });
                let sighting = self.sighting(r.worker_id, now);
                sighting.agents = r.agents;
                sighting.concurrency = concurrency(r.concurrency);
                sighting.registration = registration;
            }
            WorkerMessage::Deregistration(goodbye) => {
                self.seen.remove(&goodbye.worker_id);
                self.gone.insert(goodbye.worker_id);
            }
        }
    }
}
