use std::{future::Future, time::Duration};

/// What went wrong talking to RabbitMQ.
///
/// Messages never contain a password: URLs in them are redacted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No broker answered at the URL: it is not running, not reachable, or too slow.
    #[error(
        "cannot reach RabbitMQ at {url}: {reason}; is it running? start it with \
         `rabbitmq-server -detached`, or `docker compose -f deploy/compose.yaml up -d rabbitmq`"
    )]
    Unreachable { url: String, reason: String },
    /// A broker answered but would not open the connection (credentials, vhost, limits).
    #[error(
        "RabbitMQ at {url} refused the connection ({reason}); check the user, password and vhost"
    )]
    Refused { url: String, reason: String },
    #[error("invalid AMQP URL {url}: expected amqp://user:password@host:port/vhost")]
    InvalidUrl { url: String },
    /// AMQP limits queue names, routing keys and most properties to 255 bytes.
    #[error("{what} is longer than 255 bytes: {value:?}")]
    TooLong { what: &'static str, value: String },
    #[error("RabbitMQ did not answer {operation} within {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
    #[error("{operation} failed: {reason}")]
    Amqp {
        operation: &'static str,
        reason: String,
    },
    /// The ack or nack could not be sent because the delivery was already settled or its channel
    /// is gone; in the latter case the broker redelivers the message.
    #[error(
        "delivery {delivery_tag} can no longer be settled (already settled, or its channel closed)"
    )]
    DeliveryGone { delivery_tag: u64 },
}

impl Error {
    pub(crate) fn amqp(operation: &'static str, error: &lapin::Error) -> Self {
        Self::Amqp {
            operation,
            reason: error.to_string(),
        }
    }
}

/// Why one message was not delivered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker had no queue to route the message to (`mandatory` publish returned).
    #[error(
        "RabbitMQ returned the message for `{routing_key}` as unroutable ({reply_code} {reply_text}): \
         no queue has that name"
    )]
    Returned {
        routing_key: String,
        reply_code: u16,
        reply_text: String,
    },
    /// The broker refused to take responsibility for the message, e.g. because the queue is
    /// full (`x-overflow: reject-publish`) or lost its quorum.
    #[error(
        "RabbitMQ refused the message for `{routing_key}` (nack): the queue may be full or unavailable"
    )]
    Nacked { routing_key: String },
    #[error(transparent)]
    Broker(#[from] Error),
}

/// Awaits a lapin operation for at most `timeout`.
pub(crate) async fn bounded<T>(
    operation: &'static str,
    timeout: Duration,
    future: impl Future<Output = lapin::Result<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Error::amqp(operation, &error)),
        Err(_) => Err(Error::Timeout { operation, timeout }),
    }
}

/// Converts a name to an AMQP short string, which cannot exceed 255 bytes.
pub(crate) fn short_string(
    what: &'static str,
    value: &str,
) -> Result<lapin::types::ShortString, Error> {
    lapin::types::ShortString::try_new(value).map_err(|_| Error::TooLong {
        what,
        value: value.to_owned(),
    })
}
