//! Consumes worker results and hands them to the engine, which acknowledges each one only after
//! the transaction that recorded it has committed.

use flotilla_broker::{Connection, Consumer};
use flotilla_proto::{QueueNames, TaskResult};
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineHandle, Input};

/// Consumes `{prefix}.results` until `shutdown`. Returns the consumer, whose channel must stay
/// open until the engine has settled every delivery handed to it; closing it earlier only
/// means those results are delivered again (and fenced off as duplicates).
pub async fn run(
    connection: &Connection,
    names: &QueueNames,
    engine: EngineHandle,
    prefetch: u16,
    shutdown: CancellationToken,
) -> Result<Consumer, flotilla_broker::Error> {
    let mut consumer = Consumer::start(connection, &names.results(), "", prefetch).await?;
    let mut cancelled = false;
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            () = shutdown.cancelled(), if !cancelled => {
                cancelled = true;
                // Stop new deliveries; those already received are still handed over below.
                if let Err(e) = consumer.cancel().await {
                    tracing::warn!(error = %e, "could not cancel the results consumer");
                    break;
                }
                continue;
            }
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e),
            None => break,
        };
        match serde_json::from_slice::<TaskResult>(&delivery.body) {
            Ok(result) => {
                if engine
                    .send(Input::Result {
                        result: Box::new(result),
                        delivery: Box::new(delivery),
                    })
                    .await
                    .is_err()
                {
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
    Ok(consumer)
}
