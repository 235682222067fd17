use std::{str::FromStr, sync::Arc, time::Duration};

use lapin::{
    ConnectionProperties, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{FieldTable, ShortString},
    uri::{AMQPScheme, AMQPUri},
};
use tracing::{debug, info};

use crate::{
    BrokerConfig, DEFAULT_OPERATION_TIMEOUT,
    error::{Error, bounded, short_string},
};
use flotilla_core::redact_url;

/// An open connection to RabbitMQ. Cheap to clone: clones share one TCP connection, which is
/// closed by [`Connection::close`] or when the last clone is dropped (and the channels opened on
/// it are closed).
///
/// It does not recover by itself: after the connection is lost every operation fails, and
/// consumers end. The owner decides whether to exit or to open a new connection, with
/// [`Connection::reopen`] or [`crate::reconnect`]. lapin's own recovery is left off on purpose:
/// it reuses channel numbers, and acks of deliveries received before the recovery would then
/// be sent on a channel that never delivered them.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<lapin::Connection>,
    operation_timeout: Duration,
    /// How the connection was opened, so that it can be opened again.
    config: Arc<BrokerConfig>,
    name: Arc<str>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("name", &self.name)
            .field("url", &self.config.redacted_url())
            .field("connected", &self.is_connected())
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

/// Connects to the broker at `config.url`, naming the connection `name` (RabbitMQ shows it in
/// `rabbitmqctl list_connections user_provided_name` and the management UI).
///
/// Gives up after `config.connect_timeout`. Errors name the URL with its password redacted, and
/// an unreachable broker gets an error that says how to start one.
pub async fn connect(config: &BrokerConfig, name: &str) -> Result<Connection, Error> {
    let url = redact_url(&config.url);
    // Parsed here rather than by lapin because lapin's parse error quotes the whole URL,
    // password included.
    let mut uri =
        AMQPUri::from_str(&config.url).map_err(|_| Error::InvalidUrl { url: url.clone() })?;
    uri.query.frame_max.get_or_insert(crate::DEFAULT_FRAME_MAX);
    let tls = uri.scheme == AMQPScheme::AMQPS;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connecting = lapin::Connection::connect_uri(uri, properties);
    let connection = match tokio::time::timeout(config.connect_timeout, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) if error.is_io_error() => {
            // TLS is verified against the platform's roots (SSL_CERT_FILE names another bundle).
            let reason = if tls {
                format!(
                    "{error} (amqps:// needs a port that speaks TLS, RabbitMQ's 5671 by default, and a certificate the platform's roots or SSL_CERT_FILE verify)"
                )
            } else {
                error.to_string()
            };
            return Err(Error::Unreachable { url, reason });
        }
        Ok(Err(error)) => {
            return Err(Error::Refused {
                url,
                reason: error.to_string(),
            });
        }
        Err(_) => {
            return Err(Error::Unreachable {
                url,
                reason: format!("no answer within {:?}", config.connect_timeout),
            });
        }
    };
    info!(url = %url, connection = name, "connected to rabbitmq");
    Ok(Connection {
        inner: Arc::new(connection),
        operation_timeout: DEFAULT_OPERATION_TIMEOUT,
        config: Arc::new(config.clone()),
        name: name.into(),
    })
}

impl Connection {
    /// Sets how long each operation on this connection (and the channels, publishers and
    /// consumers opened from it afterwards) may take.
    #[must_use]
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    pub fn operation_timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// The config the connection was opened with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The largest frame agreed with the broker.
    pub fn frame_max(&self) -> u32 {
        self.inner.configuration().frame_max()
    }

    /// The name the connection was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens a new connection like this one: same broker, name and operation timeout. This one
    /// is left as it is.
    pub async fn reopen(&self) -> Result<Connection, Error> {
        Ok(connect(&self.config, &self.name)
            .await?
            .with_operation_timeout(self.operation_timeout))
    }

    /// False once the connection is closed or lost.
    pub fn is_connected(&self) -> bool {
        self.inner.status().connected()
    }

    /// Opens a channel, for declaring topology and other administrative calls.
    pub async fn open_channel(&self) -> Result<Channel, Error> {
        Ok(Channel {
            inner: self.create_lapin_channel().await?,
            operation_timeout: self.operation_timeout,
        })
    }

    pub(crate) async fn create_lapin_channel(&self) -> Result<lapin::Channel, Error> {
        bounded(
            "channel.open",
            self.operation_timeout,
            self.inner.create_channel(),
        )
        .await
    }

    /// Closes the connection cleanly. Unacked deliveries on its channels go back to their queues.
    /// Closing a connection that is already closed or lost succeeds.
    pub async fn close(&self) -> Result<(), Error> {
        if !self.is_connected() {
            return Ok(());
        }
        bounded(
            "connection.close",
            self.operation_timeout,
            self.inner.close(200, "OK".into()),
        )
        .await?;
        debug!("rabbitmq connection closed");
        Ok(())
    }
}

/// A queue's ready messages and consumers, as RabbitMQ counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub messages: u32,
    pub consumers: u32,
}

/// A channel for administrative calls: declaring, inspecting and deleting queues. Closed by
/// [`Channel::close`] or when dropped.
///
/// RabbitMQ closes a channel on which a call fails (a queue that does not exist, a redeclaration
/// with different arguments); open a new one after an error.
#[derive(Debug, Clone)]
pub struct Channel {
    pub(crate) inner: lapin::Channel,
    pub(crate) operation_timeout: Duration,
}

impl Channel {
    /// False once the channel is closed, by [`Channel::close`], by the broker after a failed
    /// call, or with its connection.
    pub fn is_open(&self) -> bool {
        self.inner.status().connected()
    }

    /// Declares a durable queue with `arguments` (idempotent when the arguments are the same).
    pub(crate) async fn declare_durable(
        &self,
        queue: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        bounded(
            "queue.declare",
            self.operation_timeout,
            self.inner
                .queue_declare(short_string("queue name", queue)?, options, arguments),
        )
        .await?;
        Ok(())
    }

    /// Declares a durable fanout exchange (idempotent).
    pub(crate) async fn declare_fanout(&self, exchange: &str) -> Result<(), Error> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        bounded(
            "exchange.declare",
            self.operation_timeout,
            self.inner.exchange_declare(
                short_string("exchange name", exchange)?,
                ExchangeKind::Fanout,
                options,
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(())
    }

    /// Declares a queue owned by this channel's connection (exclusive, deleted with it) and
    /// binds it to `exchange`.
    pub(crate) async fn declare_exclusive_bound(
        &self,
        queue: &str,
        exchange: &str,
    ) -> Result<(), Error> {
        let queue = short_string("queue name", queue)?;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        bounded(
            "queue.declare",
            self.operation_timeout,
            self.inner
                .queue_declare(queue.clone(), options, FieldTable::default()),
        )
        .await?;
        bounded(
            "queue.bind",
            self.operation_timeout,
            self.inner.queue_bind(
                queue,
                short_string("exchange name", exchange)?,
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(())
    }

    /// How many messages in `queue` are ready for delivery (not counting those delivered and not
    /// yet acked). Fails, and closes this channel, if the queue does not exist.
    pub async fn message_count(&self, queue: &str) -> Result<u32, Error> {
        Ok(self.queue_counts(queue).await?.messages)
    }

    /// What a passive declare of `queue` tells: its ready messages and its consumers. Fails,
    /// and closes this channel, if the queue does not exist.
    pub async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, Error> {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = bounded(
            "queue.declare (passive)",
            self.operation_timeout,
            self.inner.queue_declare(
                short_string("queue name", queue)?,
                options,
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(QueueCounts {
            messages: declared.message_count(),
            consumers: declared.consumer_count(),
        })
    }

    /// Deletes `queue` and the messages in it, returning how many there were. Deleting a queue
    /// that does not exist succeeds.
    pub async fn delete_queue(&self, queue: &str) -> Result<u32, Error> {
        bounded(
            "queue.delete",
            self.operation_timeout,
            self.inner.queue_delete(
                short_string("queue name", queue)?,
                QueueDeleteOptions::default(),
            ),
        )
        .await
    }

    /// Deletes `exchange`. Deleting an exchange that does not exist succeeds.
    pub async fn delete_exchange(&self, exchange: &str) -> Result<(), Error> {
        bounded(
            "exchange.delete",
            self.operation_timeout,
            self.inner.exchange_delete(
                short_string("exchange name", exchange)?,
                ExchangeDeleteOptions::default(),
            ),
        )
        .await
    }

    /// Closes the channel. Closing a channel that is already closed succeeds.
    pub async fn close(&self) -> Result<(), Error> {
        close_channel(&self.inner, self.operation_timeout).await
    }
}

pub(crate) async fn close_channel(
    channel: &lapin::Channel,
    timeout: Duration,
) -> Result<(), Error> {
    if !channel.status().connected() {
        return Ok(());
    }
    bounded("channel.close", timeout, channel.close(200, "OK".into())).await
}
