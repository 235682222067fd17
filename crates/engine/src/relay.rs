//! The outbox relay: publishes what committed batches put in the outbox, with publisher
//! confirms, and deletes each row only once the broker has confirmed its message. What it could
//! not publish stays in the outbox, where the sweeper finds it again — after a broker outage, or
//! after a coordinator crashed between its commit and its publish. The deletes run beside the
//! publishing, batched, so that the next publish does not wait for them; the sweeper waits for
//! them, so it does not publish a confirmed message again.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use flotilla_broker::{BrokerConfig, Connection, OutgoingMessage, Publisher, QueueNames};
use flotilla_store::engine::OutboxRow;
use flotilla_store::{Store, outbox};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// How the relay behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub broker: BrokerConfig,
    /// How often the sweeper looks for messages left behind.
    pub sweep_interval: Duration,
    /// How old a message must be before the sweeper takes it over from the relay that wrote it.
    pub sweep_after: Duration,
}

struct Link {
    connection: Connection,
    publisher: Publisher,
    channel: flotilla_broker::Channel,
    /// Task queues declared on this connection.
    declared: HashSet<String>,
}

/// Publishes outbox rows until the engine drops its sender.
pub struct Relay {
    store: Store,
    config: RelayConfig,
    names: QueueNames,
    link: Option<Link>,
}

/// What the relay asks of its forgetter.
enum Forget {
    /// Delete the rows of these confirmed messages.
    Confirmed(Vec<Uuid>),
    /// Answer, once every row named before is deleted, whether they all are.
    Flush(oneshot::Sender<bool>),
}

/// The most confirmed ids kept for a later delete; past that the sweeper's duplicates (which
/// results fencing makes harmless) are cheaper than the memory.
const MAX_UNFORGOTTEN: usize = 100_000;

impl Relay {
    pub fn new(store: Store, config: RelayConfig) -> Self {
        let names = config.broker.queue_names();
        Self {
            store,
            config,
            names,
            link: None,
        }
    }

    /// Runs until `rows` is closed (the engine has stopped), then publishes what is left.
    pub async fn run(mut self, mut rows: mpsc::UnboundedReceiver<Vec<OutboxRow>>) {
        let (forget, confirmed) = mpsc::unbounded_channel();
        let forgetter = tokio::spawn(forget_confirmed(self.store.clone(), confirmed));
        let mut sweep = tokio::time::interval(self.config.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = rows.recv() => {
                    let Some(mut batch) = batch else { break };
                    while let Ok(more) = rows.try_recv() {
                        batch.extend(more);
                    }
                    let confirmed = self.publish(&batch).await;
                    if !confirmed.is_empty() {
                        let _ = forget.send(Forget::Confirmed(confirmed));
                    }
                }
                _ = sweep.tick() => {
                    let (flushed, all_deleted) = oneshot::channel();
                    let _ = forget.send(Forget::Flush(flushed));
                    if all_deleted.await != Ok(true) {
                        continue;
                    }
                    if let Err(e) = self.sweep().await {
                        tracing::warn!(error = %e, "outbox sweep failed");
                    }
                }
            }
        }
        drop(forget);
        let _ = forgetter.await;
        if let Some(link) = self.link.take() {
            let _ = link.publisher.close().await;
            let _ = link.channel.close().await;
            let _ = link.connection.close().await;
        }
        tracing::info!("outbox relay stopped");
    }

    /// Publishes messages left in the outbox by a relay that crashed or lost the broker.
    async fn sweep(&mut self) -> Result<(), flotilla_store::Error> {
        let before =
            Utc::now() - chrono::Duration::from_std(self.config.sweep_after).unwrap_or_default();
        loop {
            let mut client = self.store.client().await?;
            let tx = client.transaction().await?;
            let rows = outbox::take_unsent(&tx, before, 500).await?;
            if rows.is_empty() {
                return Ok(());
            }
            tracing::info!(
                messages = rows.len(),
                "re-publishing messages left in the outbox"
            );
            let confirmed = self.publish(&rows).await;
            outbox::delete(&tx, &confirmed).await?;
            tx.commit().await?;
            if confirmed.len() < rows.len() {
                return Ok(());
            }
        }
    }

    /// Publishes rows and returns the ids the broker confirmed.
    async fn publish(&mut self, rows: &[OutboxRow]) -> Vec<Uuid> {
        if rows.is_empty() {
            return Vec::new();
        }
        let names = self.names.clone();
        let delivery_limit = self.config.broker.delivery_limit;
        let link = match self.link().await {
            Ok(link) => link,
            Err(e) => {
                tracing::warn!(error = %e, messages = rows.len(), "cannot reach RabbitMQ; messages stay in the outbox");
                return Vec::new();
            }
        };
        let agent_prefix = format!("{}.agent.", names.prefix());
        let control = names.control();
        for row in rows {
            // An agent's queue, or one of its label sets'.
            let queue = &row.routing_key;
            if queue.starts_with(&agent_prefix) && !link.declared.contains(queue) {
                match flotilla_broker::declare_task_queue(
                    &link.channel,
                    &names,
                    queue,
                    delivery_limit,
                )
                .await
                {
                    Ok(()) => {
                        link.declared.insert(queue.clone());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, queue, "could not declare the task queue")
                    }
                }
            }
        }
        let messages: Vec<OutgoingMessage> = rows
            .iter()
            .map(|r| {
                // Control messages are the one kind for the fanout exchange, not a queue.
                let mut m = if r.routing_key == control {
                    OutgoingMessage::broadcast(
                        r.routing_key.clone(),
                        r.kind.clone(),
                        r.body.clone(),
                    )
                } else {
                    OutgoingMessage::new(r.routing_key.clone(), r.kind.clone(), r.body.clone())
                };
                m.correlation_id.clone_from(&r.correlation_id);
                m.reply_to.clone_from(&r.reply_to);
                for (name, value) in crate::trace::trace_headers(r).into_iter().flatten() {
                    m.headers.insert(name.to_owned(), value);
                }
                m
            })
            .collect();
        let outcomes = link.publisher.publish_batch(&messages).await;
        let mut confirmed = Vec::with_capacity(rows.len());
        let mut broken = false;
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Ok(()) => confirmed.push(row.id),
                Err(e) => {
                    broken |= matches!(e, flotilla_broker::PublishError::Broker(_));
                    // Parsed only here: a failure is rare, and its line must name the step.
                    let task = serde_json::from_slice::<flotilla_proto::Task>(&row.body).ok();
                    tracing::warn!(
                        run_id = task.as_ref().map(|t| tracing::field::display(t.run_id)),
                        step_id = task.as_ref().map(|t| t.step_id.as_str()),
                        error = %e,
                        routing_key = %row.routing_key,
                        "message not confirmed; it stays in the outbox"
                    );
                }
            }
        }
        if broken {
            // Reconnect on the next publish rather than keep a dead channel.
            self.link = None;
        }
        confirmed
    }

    async fn link(&mut self) -> Result<&mut Link, flotilla_broker::Error> {
        if self
            .link
            .as_ref()
            .is_some_and(|l| !l.connection.is_connected())
        {
            self.link = None;
        }
        if self.link.is_none() {
            let connection =
                flotilla_broker::connect(&self.config.broker, "flotilla-coordinator-relay").await?;
            let publisher = Publisher::new(&connection).await?;
            let channel = connection.open_channel().await?;
            // Publishing to an exchange that does not exist would close the channel.
            flotilla_broker::declare_control_exchange(&channel, &self.names).await?;
            self.link = Some(Link {
                connection,
                publisher,
                channel,
                declared: HashSet::new(),
            });
        }
        let link = self.link.as_mut().expect("link was just set");
        // RabbitMQ closes the channel on which a declaration failed: declare on a new one.
        if !link.channel.is_open() {
            link.channel = link.connection.open_channel().await?;
        }
        Ok(link)
    }
}

/// Deletes the outbox rows of confirmed messages, all those confirmed meanwhile in one
/// statement, until the relay stops. Rows it could not delete (Postgres away) are kept, up to
/// [`MAX_UNFORGOTTEN`], and tried again with the next ones.
async fn forget_confirmed(store: Store, mut requests: mpsc::UnboundedReceiver<Forget>) {
    let mut unforgotten: Vec<Uuid> = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = requests.recv().await {
        let mut next = Some(first);
        while let Some(request) = next {
            match request {
                Forget::Confirmed(ids) => {
                    let room = MAX_UNFORGOTTEN.saturating_sub(unforgotten.len());
                    unforgotten.extend(ids.into_iter().take(room));
                }
                Forget::Flush(answer) => flushes.push(answer),
            }
            next = requests.try_recv().ok();
        }
        if !unforgotten.is_empty() {
            let deleted = match store.client().await {
                Ok(client) => outbox::delete(&client, &unforgotten).await,
                Err(e) => Err(e),
            };
            match deleted {
                Ok(_) => unforgotten.clear(),
                Err(e) => {
                    tracing::warn!(error = %e, rows = unforgotten.len(), "could not delete confirmed outbox rows yet; trying again before the next sweep");
                }
            }
        }
        for answer in flushes.drain(..) {
            let _ = answer.send(unforgotten.is_empty());
        }
    }
}
