//! RabbitMQ for Flotilla: connection, topology, publishing with confirms, consuming with manual
//! acks.
//!
//! **Architecture Invariant:** this is the only crate that knows about AMQP and `lapin`. Its
//! public API names no `lapin` type, so callers never import it.
//!
//! Every call to the broker is bounded by a timeout: lapin can hang on `connect` when the broker
//! refuses `connection.open`, and on `basic_publish` when the server closes the connection.
//!
//! Delivery is at-least-once only when both sides acknowledge: [`Publisher`] waits for publisher
//! confirms (and treats a message the broker returned as unroutable as not delivered), and
//! [`Consumer`] uses manual acks, so a delivery that is never acked comes back.
//!
//! A lost connection is replaced by a new one, never repaired: [`reconnect`] opens it with
//! [`Backoff`] and sets it up again, and [`ReconnectingConsumer`] does so for one queue.
//! Deliveries received on the lost connection can no longer be settled; RabbitMQ has already
//! requeued them.

mod backoff;
mod connection;
mod consumer;
mod error;
mod publisher;
mod reconnect;
#[cfg(feature = "test-util")]
pub mod testing;
mod topology;

use std::time::Duration;

pub use backoff::Backoff;
pub use connection::{Channel, Connection, QueueCounts, connect};
pub use consumer::{Consumer, Delivery};
pub use error::{Error, PublishError};
pub use flotilla_proto::QueueNames;
pub use publisher::{OutgoingMessage, Publisher};
pub use reconnect::{ReconnectingConsumer, reconnect};
pub use topology::{
    HEARTBEAT_TTL, declare_agent_queue, declare_control_exchange, declare_control_queue,
    declare_dead_letter_queue, declare_heartbeats_queue, declare_logs_queue, declare_results_queue,
    declare_task_queue, declare_topology,
};

/// The broker URL used when none is configured: a RabbitMQ on this machine with its stock user.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long one broker operation (declare, publish and confirm, ack, close...) may take before it
/// counts as failed. [`Connection::with_operation_timeout`] changes it per connection.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest AMQP frame asked for when the URL does not say (`?frame_max=`). lapin keeps two
/// zero-filled buffers of 32 frames per connection: at RabbitMQ's default of 128 KiB that is
/// 8 MiB resident per connection, half an idle worker's memory. Tasks and results fit in a
/// 16 KiB frame; a bigger message is split into several frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// The `content_type` of every message Flotilla publishes: bodies are JSON.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Where and how to reach RabbitMQ.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// `amqp://user:password@host:port/vhost`. Never logged as is: see [`flotilla_core::redact_url`].
    pub url: String,
    /// Prefix of every queue name (see [`QueueNames`]), so that several fleets or tests can share
    /// a broker.
    pub prefix: String,
    /// How long [`connect`] waits for the broker before giving up.
    pub connect_timeout: Duration,
    /// How many times a task may be delivered before its agent queue dead-letters it
    /// (`x-delivery-limit`). Every process that declares the queue must use the same value:
    /// RabbitMQ refuses to redeclare a queue with different arguments.
    pub delivery_limit: u32,
    /// The waits between attempts to replace a lost connection (see [`reconnect`]).
    pub reconnect: Backoff,
}

impl BrokerConfig {
    /// A config for `url` with the default prefix and limits.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// The queue names derived from [`BrokerConfig::prefix`].
    pub fn queue_names(&self) -> QueueNames {
        QueueNames::new(self.prefix.clone())
    }

    /// The URL with its password replaced by `***`, fit for logs and error messages.
    pub fn redacted_url(&self) -> String {
        flotilla_core::redact_url(&self.url)
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_owned(),
            prefix: QueueNames::default().prefix().to_owned(),
            connect_timeout: Duration::from_secs(10),
            delivery_limit: 5,
            reconnect: Backoff::default(),
        }
    }
}

// By hand so that the password never reaches a log through `{:?}`.
impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("delivery_limit", &self.delivery_limit)
            .field("reconnect", &self.reconnect)
            .finish()
    }
}
