//! Consumes the lines workers send for their steps' logs and stores them, many messages per
//! transaction, apart from results so that a step that prints a lot never delays them.

use flotilla_broker::{Backoff, Connection, ReconnectingConsumer, declare_logs_queue};
use flotilla_proto::{LogBatch, QueueNames};
use flotilla_store::Store;
use flotilla_store::logs::{self, NewLine};
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

/// The most messages stored in one transaction.
const BATCH: usize = 128;

/// Consumes `{prefix}.logs` until `shutdown`, reconnecting when the connection is lost, and
/// stores each attempt's lines up to `max_bytes`. A batch is acknowledged once committed; while
/// Postgres refuses it, it is tried again, so no line is lost to an outage.
pub async fn run(
    connection: &Connection,
    names: &QueueNames,
    store: Store,
    max_bytes: u64,
    shutdown: CancellationToken,
) -> Result<(), flotilla_broker::Error> {
    let declare_names = names.clone();
    let declare = move |channel| {
        let names = declare_names.clone();
        async move { declare_logs_queue(&channel, &names).await }
    };
    let mut consumer = ReconnectingConsumer::start(
        connection,
        &names.logs(),
        "",
        BATCH as u16,
        declare,
        shutdown.clone(),
    )
    .await?;
    let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
    let backoff = Backoff::default();
    'batches: while let Some(first) = consumer.next().await {
        let mut deliveries = vec![first];
        // Take whatever else is already here without waiting for more.
        while deliveries.len() < BATCH {
            match consumer.next().now_or_never() {
                Some(Some(next)) => deliveries.push(next),
                _ => break,
            }
        }
        let lines: Vec<NewLine> = deliveries
            .iter()
            .filter_map(|d| match serde_json::from_slice::<LogBatch>(&d.body) {
                Ok(batch) => Some(batch),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable log message dropped");
                    None
                }
            })
            .flat_map(new_lines)
            .collect();
        let mut failures = 0;
        loop {
            let stored = async {
                let mut client = store.client().await?;
                logs::append(&mut client, &lines, max_bytes).await
            };
            match stored.await {
                Ok(stored) => {
                    tracing::debug!(stored, sent = lines.len(), "step log lines stored");
                    break;
                }
                Err(e) => {
                    let delay = backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "could not store step log lines");
                    tokio::select! {
                        // Left unacked: RabbitMQ gives them to the next coordinator.
                        () = shutdown.cancelled() => break 'batches,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if let Some(last) = deliveries.last()
            && let Err(e) = last.ack_multiple().await
        {
            tracing::debug!(error = %e, "log lines not acked; they come again and are stored once");
        }
    }
    if let Ok(consumer) = consumer.into_consumer() {
        let _ = consumer.close().await;
    }
    Ok(())
}

fn new_lines(batch: LogBatch) -> impl Iterator<Item = NewLine> {
    let LogBatch {
        run_id,
        step_id,
        attempt,
        execution_id,
        lines,
        ..
    } = batch;
    let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
    lines.into_iter().map(move |l| NewLine {
        run_id,
        step_id: step_id.clone(),
        attempt,
        execution_id,
        line_no: i64::try_from(l.seq).unwrap_or(i64::MAX),
        stream: l.stream.as_str().to_owned(),
        line: l.line,
        at: l.at,
    })
}
