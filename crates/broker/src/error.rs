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
        /// The connection failed under the operation (dropped, or closed by the broker with an
        /// internal error such as a quorum queue's timeout), rather than the broker refusing the
        /// operation itself: the same operation on a new connection may well succeed.
        transient: bool,
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
            transient: connection_failed(error),
        }
    }

    /// Whether retrying on a new connection may succeed: the connection broke or the broker was
    /// too slow, as opposed to a refusal (access, a queue declared with other arguments, a bad
    /// URL) that would only be refused again.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Amqp { transient, .. } => *transient,
            Self::Timeout { .. } | Self::Unreachable { .. } => true,
            Self::Refused { .. }
            | Self::InvalidUrl { .. }
            | Self::TooLong { .. }
            | Self::DeliveryGone { .. } => false,
        }
    }
}

fn connection_failed(error: &lapin::Error) -> bool {
    use lapin::ErrorKind;
    use lapin::protocol::{AMQPErrorKind, AMQPHardError};
    match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidConnectionState(_) => true,
        ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR | AMQPHardError::CONNECTIONFORCED)
        ),
        _ => false,
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

#[cfg(test)]
mod tests {
    use lapin::ErrorKind;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

    use super::*;

    fn closed_with(kind: AMQPErrorKind) -> Error {
        let error = AMQPError::new(kind, "closed".into());
        Error::amqp("basic.consume", &ErrorKind::ProtocolError(error).into())
    }

    #[test]
    fn a_broken_connection_is_worth_retrying_and_a_refusal_is_not() {
        // What RabbitMQ answers when a quorum queue times out a consume under load.
        assert!(closed_with(AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR)).is_transient());
        assert!(closed_with(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)).is_transient());
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(Error::amqp("queue.declare", &reset.into()).is_transient());

        // A queue declared with other arguments, or a user without rights, stays refused.
        assert!(
            !closed_with(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)).is_transient()
        );
        assert!(!closed_with(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)).is_transient());
        assert!(!closed_with(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)).is_transient());
    }
}
