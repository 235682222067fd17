//! Consumes worker results and hands them to the engine, which acknowledges each one only after
//! the transaction that recorded it has committed.

use flotilla_broker::{Connection, Consumer, ReconnectingConsumer, declare_results_queue};
use flotilla_core::json::holds_nul;
use flotilla_proto::{QueueNames, ResultStatus, TaskError, TaskResult};
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineHandle, Input};

/// What the results consumer takes in.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unacknowledged results held at once.
    pub prefetch: u16,
    /// Bytes of JSON a step's output (and a failure's message) may take.
    pub max_output_bytes: usize,
}

/// Consumes `{prefix}.results` until `shutdown`, starting on `connection`.
///
/// Every result is made recordable first (see [`admit`]): one that Postgres would refuse would
/// otherwise fail the engine's batch, be delivered again and fail it again, forever.
///
/// Each delivery goes to the engine in the order received, or is acked here before the next is
/// taken: the engine acks many at once by acking the last (see `acknowledge` in the engine).
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
    limits: Limits,
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
        limits.prefetch,
        declare,
        shutdown,
    )
    .await?;
    while let Some(delivery) = consumer.next().await {
        match serde_json::from_slice::<TaskResult>(&delivery.body) {
            Ok(result) => {
                let input = Input::Result {
                    result: Box::new(admit(result, &delivery.body, limits.max_output_bytes)),
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

/// Makes `result` (read from `body`) one the engine can record. A successful output over
/// `max_output_bytes`, or one holding a NUL character (which Postgres stores in neither text nor
/// jsonb), becomes a retryable failure that says why, so the step's retry policy decides what
/// follows; a failure's message is cut to `max_output_bytes`; a NUL anywhere else (the message,
/// the ids) is written `\0`.
fn admit(mut result: TaskResult, body: &[u8], max_output_bytes: usize) -> TaskResult {
    let nul = holds_nul(body);
    if let Some(error) = &mut result.error
        && error.message.len() > max_output_bytes
    {
        let mut end = max_output_bytes;
        while !error.message.is_char_boundary(end) {
            end -= 1;
        }
        error.message.truncate(end);
    }
    // The body holds the output: only a body over the limit needs the output measured.
    let fault = match (&result.status, &result.output) {
        (ResultStatus::Success, Some(output)) if nul || body.len() > max_output_bytes => {
            let json = serde_json::to_vec(output).unwrap_or_default();
            if json.len() > max_output_bytes {
                Some(format!(
                    "the step's output is {} bytes, over the limit of {max_output_bytes} bytes (FLOTILLA_MAX_OUTPUT_BYTES)",
                    json.len()
                ))
            } else if holds_nul(&json) {
                Some(
                    "the step's output holds a NUL character (\\u0000), which cannot be stored"
                        .to_owned(),
                )
            } else {
                None
            }
        }
        _ => None,
    };
    if let Some(message) = fault {
        tracing::warn!(run_id = %result.run_id, step_id = %result.step_id.replace('\0', "\\0"), attempt = result.attempt, error = %message, "result refused");
        result.status = ResultStatus::Failure;
        result.output = None;
        result.error = Some(TaskError {
            message,
            retryable: true,
        });
    }
    if nul {
        for text in [&mut result.step_id, &mut result.worker_id]
            .into_iter()
            .chain(result.error.as_mut().map(|e| &mut e.message))
        {
            *text = text.replace('\0', "\\0");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    fn result(status: ResultStatus, output: Option<serde_json::Value>) -> TaskResult {
        TaskResult {
            v: 1,
            task_id: Uuid::nil(),
            run_id: Uuid::nil(),
            step_id: "build".into(),
            attempt: 1,
            status,
            output,
            error: None,
            worker_id: "w".into(),
            started_at: Utc::now(),
            finished_at: Utc::now(),
        }
    }

    fn admitted(result: &TaskResult, max: usize) -> TaskResult {
        let body = serde_json::to_vec(result).unwrap();
        admit(result.clone(), &body, max)
    }

    #[test]
    fn an_output_within_the_limit_passes_unchanged() {
        let ok = result(ResultStatus::Success, Some(json!({"k": "v".repeat(50)})));
        assert_eq!(admitted(&ok, 64), ok);
        assert_eq!(admitted(&ok, 1 << 20), ok);
    }

    #[test]
    fn an_output_over_the_limit_fails_the_attempt_naming_size_and_limit() {
        let big = result(ResultStatus::Success, Some(json!({"k": "v".repeat(100)})));
        let failed = admitted(&big, 64);
        assert_eq!(failed.status, ResultStatus::Failure);
        assert_eq!(failed.output, None);
        let error = failed.error.unwrap();
        assert!(error.retryable);
        assert_eq!(
            error.message,
            "the step's output is 108 bytes, over the limit of 64 bytes (FLOTILLA_MAX_OUTPUT_BYTES)"
        );
    }

    #[test]
    fn a_nul_fails_an_output_and_is_escaped_elsewhere() {
        let mut nul = result(ResultStatus::Success, Some(json!({"k\u{0}": 1})));
        nul.worker_id = "w\u{0}".into();
        let failed = admitted(&nul, 1 << 20);
        assert_eq!(failed.status, ResultStatus::Failure);
        assert!(failed.error.unwrap().message.contains("NUL"));
        assert_eq!(failed.worker_id, "w\\0");

        let mut failure = result(ResultStatus::Failure, None);
        failure.error = Some(TaskError {
            message: "é\u{0}".repeat(10),
            retryable: false,
        });
        let kept = admitted(&failure, 7);
        // Cut at a character boundary, then the NUL escaped.
        assert_eq!(kept.error.unwrap().message, "é\\0é\\0");
        assert_eq!(kept.status, ResultStatus::Failure);
    }
}
