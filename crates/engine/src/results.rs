//! Consumes worker results and hands them to the engine, which acknowledges each one only after
//! the transaction that recorded it has committed.

use flotilla_broker::{Connection, Consumer, ReconnectingConsumer, declare_results_queue};
use flotilla_proto::{QueueNames, TaskResult};
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineHandle, Input};

/// Consumes `{prefix}.results` until `shutdown`, starting on `connection`.
///
/// A lost connection or channel is replaced by a new connection (with the backoff of
/// `connection.config()`) on which the queue is declared again. Results handed to the engine
/// before the loss can no longer be acked: RabbitMQ delivers them again, and the engine fences
/// them off as duplicates.
///
/// Fails if consuming cannot start on `connection`, or if the shutdown came while reconnecting
/// (nothing is left to close then). Returns the consumer, whose channel must stay open until
/// the engine has settled every delivery handed to it; closing it earlier only means those
/// results are delivered again (and fenced off as duplicates). Closing it also closes the
/// connection it was started on if that is not `connection`.
pub async fn run(
    connection: &Connection,
    names: &QueueNames,
    engine: EngineHandle,
    prefetch: u16,
    shutdown: CancellationToken,
) -> Result<Consumer, flotilla_broker::Error> {
    let declare_names = names.clone();
    let declare = move |channel| {
        let names = declare_names.clone();
        async move { declare_results_queue(&channel, &names).await }
    };
    let mut consumer = ReconnectingConsumer::start(
        connection,
        &names.results(),
        "",
        prefetch,
        declare,
        shutdown,
    )
    .await?;
    while let Some(delivery) = consumer.next().await {
        match serde_json::from_slice::<TaskResult>(&delivery.body) {
            Ok(result) => {
                let input = Input::Result {
                    result: Box::new(result),
                    delivery: Box::new(delivery),
                };
                if engine.send(input).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                // No retry can make it readable; keep it out of the way of good results.
                tracing::error!(error = %e, body = %String::from_utf8_lossy(&delivery.body), "unreadable result dropped");
                let _ = delivery.ack().await;
            }
        }
    }
    consumer.into_consumer()
}
