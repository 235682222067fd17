use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{SystemTime, UNIX_EPOCH},
};

use futures_util::future::join_all;
use lapin::{
    BasicProperties, PublisherConfirm,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::warn;
use uuid::Uuid;

use crate::{
    CONTENT_TYPE_JSON, Connection,
    connection::close_channel,
    error::{Error, PublishError, bounded, short_string},
};

/// Confirm channels kept open between batches; more are opened while more batches run at once.
const MAX_IDLE_CHANNELS: usize = 16;

/// AMQP `delivery_mode` 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// A message to publish to the default exchange, i.e. straight to the queue named
/// `routing_key`, or to a fanout exchange ([`OutgoingMessage::broadcast`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The name of the destination queue, or of the fanout exchange when `broadcast`.
    pub routing_key: String,
    /// Published to the fanout exchange named `routing_key`, without `mandatory`: a broadcast
    /// that reaches no queue had nobody to tell, and counts as delivered.
    pub broadcast: bool,
    /// The JSON body.
    pub body: Vec<u8>,
    /// The AMQP `type` property: the message type (`task`, `result`, `heartbeat`).
    pub kind: String,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// String headers, e.g. a W3C `traceparent`.
    pub headers: BTreeMap<String, String>,
}

impl OutgoingMessage {
    pub fn new(routing_key: impl Into<String>, kind: impl Into<String>, body: Vec<u8>) -> Self {
        Self {
            routing_key: routing_key.into(),
            broadcast: false,
            body,
            kind: kind.into(),
            correlation_id: None,
            reply_to: None,
            headers: BTreeMap::new(),
        }
    }

    /// A message for every queue bound to the fanout exchange `exchange`.
    pub fn broadcast(exchange: impl Into<String>, kind: impl Into<String>, body: Vec<u8>) -> Self {
        Self {
            broadcast: true,
            ..Self::new(exchange, kind, body)
        }
    }

    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    #[must_use]
    pub fn with_reply_to(mut self, reply_to: impl Into<String>) -> Self {
        self.reply_to = Some(reply_to.into());
        self
    }

    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The AMQP exchange, routing key and properties. `message_id` is how a returned message is
    /// matched back to the publish it came from.
    fn to_amqp(
        &self,
        message_id: &str,
    ) -> Result<(ShortString, ShortString, BasicProperties), Error> {
        let (exchange, routing_key) = if self.broadcast {
            (short_string("exchange name", &self.routing_key)?, "".into())
        } else {
            ("".into(), short_string("routing key", &self.routing_key)?)
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_type(short_string("message type", &self.kind)?)
            .with_message_id(message_id.into())
            .with_timestamp(timestamp);
        if let Some(correlation_id) = &self.correlation_id {
            properties =
                properties.with_correlation_id(short_string("correlation id", correlation_id)?);
        }
        if let Some(reply_to) = &self.reply_to {
            properties = properties.with_reply_to(short_string("reply-to", reply_to)?);
        }
        if !self.headers.is_empty() {
            let mut headers = FieldTable::default();
            for (name, value) in &self.headers {
                headers.insert(
                    short_string("header name", name)?,
                    AMQPValue::LongString(LongString::from(value.as_str())),
                );
            }
            properties = properties.with_headers(headers);
        }
        Ok((exchange, routing_key, properties))
    }
}

/// Publishes persistent, `mandatory` messages (broadcasts excepted) with publisher confirms, and
/// reports for each one whether the broker took responsibility for it.
///
/// Safe to share between tasks. Each batch runs on a confirm-mode channel of its own (taken
/// from a small pool), because lapin hands a returned message to whichever confirmation of the
/// channel resolves next, not necessarily the one of the message returned: with one batch per
/// channel, returns are matched to their message by `message_id` within the batch.
///
/// Messages published one at a time by tasks running together ([`Publisher::publish_one`])
/// share batches: a worker finishing 64 tasks at once publishes their results on a channel or
/// two, not on 64 channels opened and closed for the purpose.
#[derive(Debug, Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connection: Connection,
    idle: Mutex<Vec<lapin::Channel>>,
    /// Messages of [`Publisher::publish_one`] waiting for the next batch, with where to answer.
    queued: Mutex<Vec<Queued>>,
}

type Queued = (OutgoingMessage, oneshot::Sender<Result<(), PublishError>>);

impl Publisher {
    /// Opens a publisher on `connection`. Opens one confirm channel at once, so that a broken
    /// connection shows here rather than at the first publish.
    pub async fn new(connection: &Connection) -> Result<Self, Error> {
        let inner = Inner {
            connection: connection.clone(),
            idle: Mutex::new(Vec::new()),
            queued: Mutex::new(Vec::new()),
        };
        let channel = inner.open_confirm_channel().await?;
        inner.check_in(channel);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Publishes one message and waits for its confirm. It goes in one batch with the messages
    /// other tasks publish meanwhile: the first of them starts the batch, published by a task
    /// of its own, so that a caller that gives up waiting does not take the others' with it.
    pub async fn publish_one(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        let (answer, answered) = oneshot::channel();
        let starts_batch = {
            let mut queued = self.inner.lock_queued();
            queued.push((message.clone(), answer));
            queued.len() == 1
        };
        if starts_batch {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                // The tasks ready to run now may add theirs first.
                tokio::task::yield_now().await;
                let (messages, answers): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut *inner.lock_queued())
                        .into_iter()
                        .unzip();
                let results = inner.publish_batch(&messages).await;
                for (answer, result) in answers.into_iter().zip(results) {
                    // The caller stopped waiting; its message went all the same.
                    let _ = answer.send(result);
                }
            });
        }
        // Closed only if the runtime shuts down under the batch: the message's fate is unknown,
        // as when a connection drops under a publish.
        answered.await.unwrap_or_else(|_| {
            Err(Error::Amqp {
                operation: "basic.publish",
                reason: "the batch publishing the message was stopped".into(),
                transient: true,
            }
            .into())
        })
    }

    /// Publishes all `messages`, then waits for all their confirms together: the broker confirms
    /// persistent messages after a batched fsync, so waiting for each in turn would cost one
    /// fsync per message.
    ///
    /// Returns one result per message, in order. A message counts as delivered only when the
    /// broker acked it and did not return it as unroutable.
    pub async fn publish_batch(
        &self,
        messages: &[OutgoingMessage],
    ) -> Vec<Result<(), PublishError>> {
        self.inner.publish_batch(messages).await
    }

    /// Closes the publisher's idle channels. Publishing afterwards opens new ones.
    pub async fn close(&self) -> Result<(), Error> {
        let channels = std::mem::take(&mut *self.inner.lock_idle());
        for channel in channels {
            close_channel(&channel, self.inner.connection.operation_timeout()).await?;
        }
        Ok(())
    }
}

impl Inner {
    async fn publish_batch(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), PublishError>> {
        if messages.is_empty() {
            return Vec::new();
        }
        let channel = match self.check_out().await {
            Ok(channel) => channel,
            Err(error) => return messages.iter().map(|_| Err(error.clone().into())).collect(),
        };
        let timeout = self.connection.operation_timeout();

        let mut pending = Vec::with_capacity(messages.len());
        let mut broken: Option<PublishError> = None;
        for message in messages {
            // Once a send failed on the channel the others would too, each only after its own
            // timeout when the connection hangs (lapin#409): fail them at once.
            let sent = match &broken {
                Some(error) => Err(error.clone()),
                None => send(&channel, message, timeout).await,
            };
            if let Err(error) = &sent
                && taints_channel(error)
            {
                broken.get_or_insert_with(|| error.clone());
            }
            pending.push(sent);
        }
        let mut healthy = broken.is_none();

        let deadline = Instant::now() + timeout;
        let confirmed = join_all(pending.into_iter().map(|sent| async move {
            let (message_id, confirm) = sent?;
            match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(confirmation)) => Ok((message_id, confirmation)),
                Ok(Err(error)) => Err(Error::amqp("publisher confirm", &error).into()),
                Err(_) => Err(Error::Timeout {
                    operation: "publisher confirm",
                    timeout,
                }
                .into()),
            }
        }))
        .await;

        // Any confirmation of the batch may carry any of the batch's returned messages.
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut returned: HashMap<String, BasicReturnMessage> = HashMap::new();
        for result in confirmed {
            match result {
                Ok((message_id, confirmation)) => {
                    let acked = confirmation.is_ack();
                    if let Some(message) = confirmation.take_message() {
                        match message.delivery.properties.message_id() {
                            Some(id) => {
                                returned.insert(id.to_string(), message);
                            }
                            None => warn!(
                                routing_key = %message.delivery.routing_key,
                                "rabbitmq returned a message without message id"
                            ),
                        }
                    }
                    outcomes.push(Ok((message_id, acked)));
                }
                Err(error) => {
                    healthy &= !taints_channel(&error);
                    outcomes.push(Err(error));
                }
            }
        }

        let results = outcomes
            .into_iter()
            .zip(messages)
            .map(|(outcome, message)| {
                let (message_id, acked) = outcome?;
                if let Some(returned) = returned.remove(&message_id) {
                    Err(PublishError::Returned {
                        routing_key: message.routing_key.clone(),
                        reply_code: returned.reply_code,
                        reply_text: returned.reply_text.to_string(),
                    })
                } else if acked {
                    Ok(())
                } else {
                    Err(PublishError::Nacked {
                        routing_key: message.routing_key.clone(),
                    })
                }
            })
            .collect();

        // A channel with a failed or timed-out publish may still have confirms in flight that
        // would be mistaken for the next batch's: drop it (which closes it).
        if healthy {
            self.check_in(channel);
        }
        results
    }

    async fn check_out(&self) -> Result<lapin::Channel, Error> {
        loop {
            let Some(channel) = self.lock_idle().pop() else {
                break;
            };
            if channel.status().connected() {
                return Ok(channel);
            }
        }
        self.open_confirm_channel().await
    }

    fn check_in(&self, channel: lapin::Channel) {
        let mut idle = self.lock_idle();
        if channel.status().connected() && idle.len() < MAX_IDLE_CHANNELS {
            idle.push(channel);
        }
    }

    async fn open_confirm_channel(&self) -> Result<lapin::Channel, Error> {
        let channel = self.connection.create_lapin_channel().await?;
        bounded(
            "confirm.select",
            self.connection.operation_timeout(),
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(channel)
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<lapin::Channel>> {
        // The list stays consistent even if a holder panicked: every operation is a push or pop.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_queued(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        // Pushed to, or taken whole: consistent even if a holder panicked.
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether an error leaves the channel in doubt. A message refused before it was sent (a name
/// too long) or answered by the broker (returned, nacked) does not.
fn taints_channel(error: &PublishError) -> bool {
    matches!(error, PublishError::Broker(error) if !matches!(error, Error::TooLong { .. }))
}

/// Sends one message on `channel`, returning its message id and the future of its confirm.
async fn send(
    channel: &lapin::Channel,
    message: &OutgoingMessage,
    timeout: std::time::Duration,
) -> Result<(String, PublisherConfirm), PublishError> {
    let message_id = Uuid::new_v4().to_string();
    let (exchange, routing_key, properties) = message.to_amqp(&message_id)?;
    let options = BasicPublishOptions {
        mandatory: !message.broadcast,
        immediate: false,
    };
    let confirm = bounded(
        "basic.publish",
        timeout,
        channel.basic_publish(exchange, routing_key, options, &message.body, properties),
    )
    .await?;
    Ok((message_id, confirm))
}
