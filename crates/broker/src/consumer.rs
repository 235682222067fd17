use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::{future::Future, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Acker,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    Connection,
    connection::close_channel,
    error::{Error, bounded, short_string},
};

/// Consumes one queue with manual acks on a channel of its own.
///
/// At most `prefetch` deliveries are unacked at a time. Deliveries left unacked when the
/// consumer's channel closes (by [`Consumer::close`], by dropping the consumer, or by losing the
/// connection) go back to the queue and are delivered again with `redelivered` set. Keep the
/// consumer alive until every delivery taken from it has been acked or nacked; once its channel
/// is known to be gone, settling them fails at once with [`Error::DeliveryGone`].
#[derive(Debug)]
pub struct Consumer {
    channel: lapin::Channel,
    inner: lapin::Consumer,
    queue: String,
    tag: String,
    operation_timeout: Duration,
    /// Cancelled, for the deliveries of this consumer, when its channel is gone: the stream
    /// failed, or the consumer was closed or dropped.
    gone: CancellationToken,
    _gone_on_drop: DropGuard,
    /// A connection opened for this consumer alone (by [`crate::ReconnectingConsumer`]),
    /// closed with it.
    own_connection: Option<Connection>,
    /// See [`Delivery::channel`].
    serial: u64,
}

/// The serial of the next consumer started in this process.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

impl Consumer {
    /// Starts consuming `queue` as `consumer_tag` (empty: the broker picks one), with at most
    /// `prefetch` unacked deliveries (0 would mean no limit).
    pub async fn start(
        connection: &Connection,
        queue: &str,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<Self, Error> {
        let timeout = connection.operation_timeout();
        let queue_name = short_string("queue name", queue)?;
        let tag = short_string("consumer tag", consumer_tag)?;
        let channel = connection.create_lapin_channel().await?;
        bounded(
            "basic.qos",
            timeout,
            channel.basic_qos(prefetch, BasicQosOptions { global: false }),
        )
        .await?;
        let options = BasicConsumeOptions {
            no_ack: false,
            ..BasicConsumeOptions::default()
        };
        let inner = bounded(
            "basic.consume",
            timeout,
            channel.basic_consume(queue_name, tag, options, FieldTable::default()),
        )
        .await?;
        let gone = CancellationToken::new();
        Ok(Self {
            tag: inner.tag().to_string(),
            channel,
            inner,
            queue: queue.to_owned(),
            operation_timeout: timeout,
            gone: gone.clone(),
            _gone_on_drop: gone.drop_guard(),
            own_connection: None,
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Makes [`Consumer::close`] close `connection` too.
    pub(crate) fn owning(mut self, connection: Connection) -> Self {
        self.own_connection = Some(connection);
        self
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The next delivery. `None` once the consumer is cancelled and the deliveries it had
    /// already received are all taken; an error when the channel or connection failed (the
    /// stream ends after it).
    ///
    /// Cancel-safe: dropping the future loses no delivery.
    pub async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        match self.inner.next().await? {
            Ok(delivery) => Some(Ok(Delivery::new(
                delivery,
                self.operation_timeout,
                self.gone.clone(),
                self.serial,
            ))),
            Err(error) => {
                // lapin may never answer an ack queued as the channel died.
                self.gone.cancel();
                Some(Err(Error::amqp("basic.consume", &error)))
            }
        }
    }

    /// Asks the broker to stop sending deliveries (`basic.cancel`). Deliveries it already sent
    /// are still returned by [`Consumer::next`], which then returns `None`; the channel stays
    /// open so they and earlier ones can still be acked.
    pub async fn cancel(&self) -> Result<(), Error> {
        bounded(
            "basic.cancel",
            self.operation_timeout,
            self.channel.basic_cancel(
                short_string("consumer tag", &self.tag)?,
                BasicCancelOptions::default(),
            ),
        )
        .await
    }

    /// Closes the consumer's channel: unacked deliveries go back to the queue. A consumer that
    /// [`crate::ReconnectingConsumer`] started on a connection of its own closes that too.
    pub async fn close(&self) -> Result<(), Error> {
        self.gone.cancel();
        close_channel(&self.channel, self.operation_timeout).await?;
        if let Some(connection) = &self.own_connection {
            connection.close().await?;
        }
        Ok(())
    }
}

/// One message received from a queue. Settle it exactly once, with [`Delivery::ack`],
/// [`Delivery::ack_multiple`] or [`Delivery::nack`].
#[derive(Debug)]
pub struct Delivery {
    pub body: Vec<u8>,
    /// Identifies the delivery on its channel; increases with every delivery.
    pub delivery_tag: u64,
    /// Set when the message may have been delivered before (to this or another consumer).
    pub redelivered: bool,
    pub exchange: String,
    pub routing_key: String,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub message_id: Option<String>,
    /// The string-valued headers; others (numbers, tables) are left out.
    pub headers: BTreeMap<String, String>,
    /// How many times a quorum queue delivered the message before (`x-delivery-count`); absent
    /// on a first delivery.
    pub delivery_count: Option<u64>,
    acker: Acker,
    operation_timeout: Duration,
    /// Cancelled when the channel the delivery came on is gone.
    gone: CancellationToken,
    channel: u64,
}

impl Delivery {
    fn new(
        delivery: lapin::message::Delivery,
        operation_timeout: Duration,
        gone: CancellationToken,
        channel: u64,
    ) -> Self {
        let properties = &delivery.properties;
        let text =
            |value: &Option<lapin::types::ShortString>| value.as_ref().map(|v| v.to_string());
        let mut headers = BTreeMap::new();
        let mut delivery_count = None;
        if let Some(table) = properties.headers() {
            for (name, value) in table {
                match value {
                    AMQPValue::LongString(text) => {
                        headers.insert(name.to_string(), text.to_string());
                    }
                    AMQPValue::ShortString(text) => {
                        headers.insert(name.to_string(), text.to_string());
                    }
                    _ if name.as_str() == "x-delivery-count" => {
                        delivery_count = as_count(value);
                    }
                    _ => {}
                }
            }
        }
        Self {
            kind: text(properties.kind()),
            content_type: text(properties.content_type()),
            correlation_id: text(properties.correlation_id()),
            reply_to: text(properties.reply_to()),
            message_id: text(properties.message_id()),
            headers,
            delivery_count,
            delivery_tag: delivery.delivery_tag,
            redelivered: delivery.redelivered,
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            body: delivery.data,
            acker: delivery.acker,
            operation_timeout,
            gone,
            channel,
        }
    }

    /// Names the consumer (and so the channel) the delivery came on, uniquely in the process:
    /// an [`Delivery::ack_multiple`] settles the earlier deliveries with the same `channel`.
    pub fn channel(&self) -> u64 {
        self.channel
    }

    /// Of `deliveries`, all to be acked, those whose [`Delivery::ack_multiple`] acks them all:
    /// the last of each channel. Every earlier delivery of those channels must be among them or
    /// settled already, or it is acked too.
    pub fn last_of_each_channel<D: Borrow<Delivery>>(
        deliveries: impl IntoIterator<Item = D>,
    ) -> Vec<D> {
        let mut last: HashMap<u64, D> = HashMap::new();
        for delivery in deliveries {
            let d = delivery.borrow();
            match last.get(&d.channel) {
                Some(later) if later.borrow().delivery_tag > d.delivery_tag => {}
                _ => {
                    last.insert(d.channel, delivery);
                }
            }
        }
        last.into_values().collect()
    }

    /// Tells the broker the message is handled; it is removed from the queue.
    pub async fn ack(&self) -> Result<(), Error> {
        self.settle(
            "basic.ack",
            self.acker.ack(BasicAckOptions { multiple: false }),
        )
        .await
    }

    /// Acks this delivery and every earlier unsettled delivery of the same consumer channel in
    /// one frame. The earlier deliveries must not be settled again afterwards: the broker would
    /// close the channel for an unknown delivery tag.
    pub async fn ack_multiple(&self) -> Result<(), Error> {
        self.settle(
            "basic.ack",
            self.acker.ack(BasicAckOptions { multiple: true }),
        )
        .await
    }

    /// Gives the message back: to the queue when `requeue` (it is delivered again, counting
    /// towards the queue's delivery limit), else to the queue's dead-letter target.
    pub async fn nack(&self, requeue: bool) -> Result<(), Error> {
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        self.settle("basic.nack", self.acker.nack(options)).await
    }

    /// Awaits an ack or nack, unless the delivery's channel is gone first: lapin may never
    /// answer one queued as its connection died, and the broker has requeued the message anyway.
    async fn settle(
        &self,
        operation: &'static str,
        settling: impl Future<Output = lapin::Result<bool>>,
    ) -> Result<(), Error> {
        let gone = Error::DeliveryGone {
            delivery_tag: self.delivery_tag,
        };
        if self.gone.is_cancelled() {
            return Err(gone);
        }
        tokio::select! {
            biased;
            settled = bounded(operation, self.operation_timeout, settling) => {
                if settled? { Ok(()) } else { Err(gone) }
            }
            () = self.gone.cancelled() => Err(gone),
        }
    }
}

fn as_count(value: &AMQPValue) -> Option<u64> {
    match *value {
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        _ => None,
    }
}
