//! `broker-roundtrip`: the ceiling of the fleet, the bare broker round trip of one step written
//! directly on `flotilla-broker`, with no Postgres and no scheduling: a persistent task published
//! with confirms → consumed and acked by a worker, which first publishes a persistent result
//! with confirms → the result consumed and acked. Both queues are quorum queues declared as the
//! fleet declares them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_broker::{
    BrokerConfig, Connection, Consumer, Delivery, OutgoingMessage, Publisher, QueueNames,
};
use futures_util::FutureExt;
use serde_json::json;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::machine::{CpuTimes, Spenders};
use crate::{Latency, Report, Sizes};

/// The most messages published, or deliveries drained, at once.
const BATCH: usize = 256;
/// The agent of the bench's task queue.
const AGENT: &str = "bench";
/// How long one round trip may take before the scenario gives up.
const STALL: Duration = Duration::from_secs(30);

/// Runs the scenario: `sizes.steps` round trips with `sizes.in_flight` in flight for the
/// throughput, then round trips one at a time for the latency.
pub async fn roundtrip(sizes: &Sizes) -> anyhow::Result<Report> {
    let config = BrokerConfig::new(flotilla_tests::amqp_url());
    let names = QueueNames::new(format!(
        "bench-{}",
        &Uuid::new_v4().simple().to_string()[..16]
    ));
    let connection = flotilla_broker::connect(&config, "flotilla-bench").await?;
    let channel = connection.open_channel().await?;
    flotilla_broker::declare_agent_queue(&channel, &names, AGENT, config.delivery_limit).await?;
    flotilla_broker::declare_results_queue(&channel, &names).await?;

    let measured = measure(&connection, &config, &names, sizes).await;

    for queue in [names.agent(AGENT), names.results()] {
        channel.delete_queue(&queue).await?;
    }
    connection.close().await?;
    measured
}

async fn measure(
    connection: &Connection,
    config: &BrokerConfig,
    names: &QueueNames,
    sizes: &Sizes,
) -> anyhow::Result<Report> {
    let worker_connection = flotilla_broker::connect(config, "flotilla-bench-worker").await?;
    let prefetch = u16::try_from(sizes.in_flight.min(usize::from(u16::MAX)))?;
    let (stop, stopped) = oneshot::channel();
    let worker = tokio::spawn(echo_worker(
        worker_connection.clone(),
        names.clone(),
        prefetch,
        stopped,
    ));
    let mut client = Client {
        publisher: Arc::new(Publisher::new(connection).await?),
        results: Consumer::start(connection, &names.results(), "", prefetch).await?,
        tasks: names.agent(AGENT),
        base: Instant::now(),
    };
    let outcome = client.run_both(sizes).await;
    client.results.close().await?;
    client.publisher.close().await?;
    // A worker that failed already has returned; the send fails then, and its error tells why.
    let _ = stop.send(());
    let worker_outcome = worker.await?;
    worker_connection.close().await?;
    match (outcome, worker_outcome) {
        (Err(error), Err(worker_error)) => {
            Err(error.context(format!("the echo worker failed: {worker_error:#}")))
        }
        (outcome, worker_outcome) => {
            worker_outcome?;
            outcome
        }
    }
}

/// The echo worker of the scenario: for each task, publish the task's body back as the result
/// (confirmed), then ack the task; deliveries that arrive together are handled as one batch.
async fn echo_worker(
    connection: Connection,
    names: QueueNames,
    prefetch: u16,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let publisher = Publisher::new(&connection).await?;
    let mut tasks = Consumer::start(&connection, &names.agent(AGENT), "", prefetch).await?;
    let results = names.results();
    loop {
        let batch = tokio::select! {
            _ = &mut stop => break,
            batch = next_batch(&mut tasks) => batch?,
        };
        let messages: Vec<_> = batch
            .iter()
            .map(|task| OutgoingMessage::new(&results, "result", task.body.clone()))
            .collect();
        for published in publisher.publish_batch(&messages).await {
            published.context("publishing a result")?;
        }
        for task in &batch {
            task.ack().await?;
        }
    }
    tasks.close().await?;
    publisher.close().await?;
    Ok(())
}

/// The next delivery, and every other one already received, up to [`BATCH`].
async fn next_batch(consumer: &mut Consumer) -> anyhow::Result<Vec<Delivery>> {
    let first = consumer
        .next()
        .await
        .context("the consumer was cancelled")??;
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match consumer.next().now_or_never() {
            Some(Some(delivery)) => batch.push(delivery?),
            _ => break,
        }
    }
    Ok(batch)
}

struct Client {
    publisher: Arc<Publisher>,
    results: Consumer,
    tasks: String,
    /// Each task carries the nanoseconds since `base` at which it was published.
    base: Instant,
}

impl Client {
    async fn run_both(&mut self, sizes: &Sizes) -> anyhow::Result<Report> {
        let cpu = CpuTimes::read();
        let pipelined = self.run(sizes.steps, sizes.in_flight).await?;
        // RabbitMQ's own cost of a step at its ceiling, for the fleet scenarios' to be read
        // against (the bench is both the client and the worker here).
        let cpu = CpuTimes::read().since(
            &cpu,
            &Spenders {
                coordinators: &[],
                workers: &[],
            },
            sizes.steps,
        );
        let one_at_a_time = self.run(sizes.steps.clamp(1, 1000), 1).await?;
        let report = Report::new("broker-roundtrip", sizes.steps, "steps", pipelined.elapsed)
            .latency(Latency::of(
                "one round trip, one step in flight",
                one_at_a_time.latencies,
            ))
            .details(json!({
                "in_flight": sizes.in_flight,
                "pipelined_latency": Latency::of(
                    &format!("one round trip, {} in flight", sizes.in_flight),
                    pipelined.latencies,
                ),
                "one_at_a_time_steps_per_s":
                    one_at_a_time.count as f64 / one_at_a_time.elapsed.as_secs_f64(),
                "cpu": cpu,
            }));
        Ok(report)
    }

    /// `count` round trips with at most `in_flight` at a time.
    async fn run(&mut self, count: usize, in_flight: usize) -> anyhow::Result<Round> {
        let slots = Arc::new(Semaphore::new(in_flight.max(1)));
        let started = Instant::now();
        let sender = self.send(count, slots.clone());
        let mut latencies = Vec::with_capacity(count);
        while latencies.len() < count {
            let delivery = match tokio::time::timeout(STALL, self.results.next()).await {
                Ok(Some(delivery)) => delivery?,
                Ok(None) => bail!("the results consumer was cancelled"),
                Err(_) => {
                    sender.abort();
                    bail!(
                        "no result for {STALL:?} ({} of {count} round trips done)",
                        latencies.len()
                    );
                }
            };
            let sent: u64 = serde_json::from_slice::<serde_json::Value>(&delivery.body)?["sent_ns"]
                .as_u64()
                .context("sent_ns in the result")?;
            latencies.push(self.base.elapsed() - Duration::from_nanos(sent));
            delivery.ack().await?;
            slots.add_permits(1);
        }
        let elapsed = started.elapsed();
        sender.await??;
        Ok(Round {
            count,
            elapsed,
            latencies,
        })
    }

    /// Publishes `count` tasks, each when a slot is free, in batches of whatever is free.
    fn send(&self, count: usize, slots: Arc<Semaphore>) -> JoinHandle<anyhow::Result<()>> {
        let publisher = self.publisher.clone();
        let queue = self.tasks.clone();
        let base = self.base;
        // About the size of a real task's body.
        let padding = "x".repeat(200);
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < count {
                slots.acquire().await?.forget();
                let mut batch = 1;
                while batch < BATCH && sent + batch < count {
                    match slots.try_acquire() {
                        Ok(permit) => permit.forget(),
                        Err(_) => break,
                    }
                    batch += 1;
                }
                let messages: Vec<_> = (sent..sent + batch)
                    .map(|seq| {
                        let sent_ns = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        let body = json!({"seq": seq, "sent_ns": sent_ns, "params": padding});
                        OutgoingMessage::new(&queue, "task", body.to_string().into_bytes())
                    })
                    .collect();
                for published in publisher.publish_batch(&messages).await {
                    published.context("publishing a task")?;
                }
                sent += batch;
            }
            Ok(())
        })
    }
}

struct Round {
    count: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}
