//! Replacing a lost connection: [`reconnect`], and [`ReconnectingConsumer`] built on it.

use std::{future::Future, pin::Pin, sync::Arc};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Channel, Connection, Consumer, Delivery, Error};

/// Opens a new connection in place of `lost` (same broker, name and settings) and runs `setup`
/// on it. Both are retried, after the waits of `lost.config().reconnect`, until they succeed,
/// or until `stop` is cancelled: then `None`.
///
/// Every failed attempt is logged at warn with the broker's URL, its password hidden. `lost`
/// itself is left alone; close it first if it may still be open. A connection that `setup`
/// fails on is dropped, which closes it.
pub async fn reconnect<T, F, Fut>(
    lost: &Connection,
    stop: &CancellationToken,
    mut setup: F,
) -> Option<T>
where
    F: FnMut(Connection) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let backoff = lost.config().reconnect;
    let url = lost.config().redacted_url();
    let mut attempts: u32 = 0;
    let mut delay = backoff.delay(attempts);
    loop {
        let attempt = async {
            tokio::time::sleep(delay).await;
            setup(lost.reopen().await?).await
        };
        let outcome = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            outcome = attempt => outcome,
        };
        attempts = attempts.saturating_add(1);
        match outcome {
            Ok(value) => {
                info!(%url, connection = lost.name(), attempts, "reconnected to rabbitmq");
                return Some(value);
            }
            Err(error) => {
                delay = backoff.delay(attempts);
                warn!(
                    %url,
                    connection = lost.name(),
                    attempt = attempts,
                    retry_in = ?delay,
                    %error,
                    "could not reconnect to rabbitmq"
                );
            }
        }
    }
}

type DeclareFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;
type Declare = Arc<dyn Fn(Channel) -> DeclareFuture + Send + Sync>;

/// Consumes one queue with manual acks like [`Consumer`], and outlives its connection: when the
/// connection or the consumer's channel is lost, it opens a new connection (see
/// [`reconnect`]), declares the queue again and resumes consuming.
///
/// Deliveries received before a loss can no longer be settled: their acks fail with an error,
/// and RabbitMQ, which requeued them when the channel closed, delivers them again with
/// `redelivered` set. The consumer of a queue must therefore be idempotent; Flotilla's
/// coordinator fences duplicate results by task id and attempt.
pub struct ReconnectingConsumer {
    /// The connection consumed on now, or the one lost last.
    connection: Connection,
    /// `None` while reconnecting. After the first, each consumer owns its connection.
    consumer: Option<Consumer>,
    queue: String,
    tag: String,
    prefetch: u16,
    declare: Declare,
    shutdown: CancellationToken,
    /// `basic.cancel` was sent after the shutdown request.
    draining: bool,
    /// [`ReconnectingConsumer::next`] returned `None`, and always will.
    stopped: bool,
    /// Why the last consumer was lost.
    lost: Option<String>,
}

impl std::fmt::Debug for ReconnectingConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectingConsumer")
            .field("queue", &self.queue)
            .field("connection", &self.connection)
            .field("consuming", &self.consumer.is_some())
            .field("draining", &self.draining)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl ReconnectingConsumer {
    /// Declares `queue` with `declare` and starts consuming it on `connection` as
    /// `consumer_tag` (empty: the broker picks one), with at most `prefetch` unacked deliveries.
    /// `declare` runs again on every new connection.
    ///
    /// Fails at once, without retrying, if the broker refuses this first start: a process that
    /// cannot consume when it starts should say so rather than wait. A transient failure (see
    /// [`Error::is_transient`]) is retried like a lost consumer, on the first
    /// [`ReconnectingConsumer::next`]. Consuming stops after `shutdown` (see
    /// [`ReconnectingConsumer::next`]).
    pub async fn start<D, F>(
        connection: &Connection,
        queue: &str,
        consumer_tag: &str,
        prefetch: u16,
        declare: D,
        shutdown: CancellationToken,
    ) -> Result<Self, Error>
    where
        D: Fn(Channel) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let declare: Declare = Arc::new(move |channel| Box::pin(declare(channel)));
        let (consumer, lost) =
            match set_up(connection, queue, consumer_tag, prefetch, &declare).await {
                Ok(consumer) => (Some(consumer), None),
                Err(error) if error.is_transient() => {
                    warn!(%queue, %error, "could not start consuming; reconnecting");
                    (None, Some(error.to_string()))
                }
                Err(error) => return Err(error),
            };
        Ok(Self {
            connection: connection.clone(),
            consumer,
            queue: queue.to_owned(),
            tag: consumer_tag.to_owned(),
            prefetch,
            declare,
            shutdown,
            draining: false,
            stopped: false,
            lost,
        })
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery, reconnecting as often as it takes.
    ///
    /// After the shutdown request it asks the broker to stop sending (`basic.cancel`), returns
    /// the deliveries the broker had already sent, and then `None`; the channel stays open so
    /// that they can still be settled. Also `None` when the request comes while reconnecting.
    ///
    /// Cancel-safe: dropping the future loses no delivery.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.stopped {
                return None;
            }
            let Some(consumer) = self.consumer.as_mut() else {
                if !self.replace().await {
                    self.stopped = true;
                }
                continue;
            };
            let next = tokio::select! {
                biased;
                () = self.shutdown.cancelled(), if !self.draining => None,
                next = consumer.next() => Some(next),
            };
            let Some(next) = next else {
                self.draining = true;
                if let Err(error) = consumer.cancel().await {
                    warn!(queue = %self.queue, %error, "could not cancel the consumer; stopping");
                    self.stopped = true;
                }
                continue;
            };
            let reason = match next {
                Some(Ok(delivery)) => return Some(delivery),
                Some(Err(error)) => error.to_string(),
                None if self.draining => {
                    // The broker confirmed the cancel: every delivery it sent was handed over.
                    self.stopped = true;
                    continue;
                }
                None => "rabbitmq cancelled the consumer or closed the connection".to_owned(),
            };
            if self.draining {
                warn!(queue = %self.queue, %reason, "consumer lost while stopping");
                self.stopped = true;
            } else {
                warn!(queue = %self.queue, %reason, "consumer lost; reconnecting");
                if let Some(lost) = self.consumer.take()
                    && let Err(error) = lost.close().await
                {
                    // Only its channel may have failed: its own connection would stay open.
                    warn!(queue = %self.queue, %error, "could not close the lost consumer");
                }
                self.lost = Some(reason);
            }
        }
    }

    /// The consumer, to keep open until the deliveries taken from it are settled; closing it
    /// also closes the connection it was started on if that was opened here. An error if the
    /// last consumer was lost and not replaced before the shutdown: there is nothing to close.
    pub fn into_consumer(self) -> Result<Consumer, Error> {
        self.consumer.ok_or_else(|| Error::Amqp {
            operation: "basic.consume",
            reason: format!(
                "consumer of {} lost ({}) and not replaced before the shutdown",
                self.queue,
                self.lost.as_deref().unwrap_or("no reason given")
            ),
            transient: false,
        })
    }

    /// Consumes on a new connection. False if the shutdown request came first.
    async fn replace(&mut self) -> bool {
        let (queue, tag, prefetch, declare) =
            (&self.queue, &self.tag, self.prefetch, &self.declare);
        let replaced = reconnect(&self.connection, &self.shutdown, |connection| async move {
            let consumer = set_up(&connection, queue, tag, prefetch, declare).await?;
            Ok((connection.clone(), consumer.owning(connection)))
        })
        .await;
        let Some((connection, consumer)) = replaced else {
            return false;
        };
        info!(queue = %self.queue, "consuming again");
        self.connection = connection;
        self.consumer = Some(consumer);
        true
    }
}

async fn set_up(
    connection: &Connection,
    queue: &str,
    tag: &str,
    prefetch: u16,
    declare: &Declare,
) -> Result<Consumer, Error> {
    let channel = connection.open_channel().await?;
    declare(channel.clone()).await?;
    channel.close().await?;
    Consumer::start(connection, queue, tag, prefetch).await
}
