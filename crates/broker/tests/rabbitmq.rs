//! Against the real RabbitMQ (`AMQP_URL`, default the local one). Each test uses its own queue
//! prefix and deletes its queues at the end, so tests run in parallel.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla_broker::{
    Backoff, BrokerConfig, Connection, Consumer, Delivery, Error, OutgoingMessage, PublishError,
    Publisher, QueueNames, ReconnectingConsumer, connect, declare_agent_queue,
    declare_control_queue, declare_topology,
    testing::{self, Proxy},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Bounds every wait in these tests, so a broken broker fails a test instead of hanging it.
const WAIT: Duration = Duration::from_secs(15);

fn broker_config() -> BrokerConfig {
    let mut config = BrokerConfig::new(
        std::env::var("AMQP_URL").unwrap_or_else(|_| flotilla_broker::DEFAULT_URL.to_owned()),
    );
    config.prefix = format!("test-{}", Uuid::new_v4());
    config
}

struct Fixture {
    config: BrokerConfig,
    names: QueueNames,
    agents: Vec<String>,
    connection: Connection,
}

impl Fixture {
    async fn new(agents: &[&str]) -> Result<Self> {
        let config = broker_config();
        let connection = connect(&config, "flotilla-broker-test").await?;
        let names = config.queue_names();
        let agents: Vec<String> = agents.iter().map(|a| (*a).to_owned()).collect();
        let channel = connection.open_channel().await?;
        declare_topology(&channel, &names, &agents, config.delivery_limit).await?;
        channel.close().await?;
        Ok(Self {
            config,
            names,
            agents,
            connection,
        })
    }

    fn agent_queue(&self) -> String {
        self.names.agent(&self.agents[0])
    }

    async fn cleanup(self) -> Result<()> {
        let queues = testing::queues_of(&self.names, self.agents.iter().map(String::as_str));
        testing::delete_topology(&self.connection, &self.names, &queues).await?;
        self.connection.close().await?;
        Ok(())
    }
}

async fn next_delivery(consumer: &mut Consumer) -> Result<Delivery> {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(delivery)) => Ok(delivery?),
        Ok(None) => bail!("consumer of {} ended", consumer.queue()),
        Err(_) => bail!("no delivery from {} within {WAIT:?}", consumer.queue()),
    }
}

#[tokio::test]
async fn published_batch_is_confirmed_and_consumed_back_with_acks() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.agent_queue();
    let publisher = Publisher::new(&fixture.connection).await?;

    let messages: Vec<OutgoingMessage> = (0..50)
        .map(|i| {
            OutgoingMessage::new(&queue, "task", format!(r#"{{"n":{i}}}"#).into_bytes())
                .with_correlation_id(format!("task-{i}"))
                .with_reply_to(fixture.names.results())
                .with_header("traceparent", format!("00-{i:032x}-{i:016x}-01"))
        })
        .collect();
    let results = publisher.publish_batch(&messages).await;
    assert_eq!(results.len(), messages.len());
    for result in &results {
        assert!(result.is_ok(), "{result:?}");
    }

    let mut consumer = Consumer::start(&fixture.connection, &queue, "test-consumer", 10).await?;
    for (i, sent) in messages.iter().enumerate() {
        let delivery = next_delivery(&mut consumer).await?;
        assert_eq!(delivery.body, sent.body, "message {i}");
        assert!(!delivery.redelivered);
        assert_eq!(delivery.routing_key, queue);
        assert_eq!(delivery.kind.as_deref(), Some("task"));
        assert_eq!(delivery.content_type.as_deref(), Some("application/json"));
        assert_eq!(delivery.correlation_id, sent.correlation_id);
        assert_eq!(delivery.reply_to, sent.reply_to);
        assert_eq!(delivery.headers, sent.headers);
        assert!(delivery.message_id.is_some());
        delivery.ack().await?;
    }
    // Closing the channel would requeue anything left unacked.
    consumer.close().await?;
    let channel = fixture.connection.open_channel().await?;
    assert_eq!(channel.message_count(&queue).await?, 0);

    publisher.close().await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn the_last_delivery_of_each_channel_acks_them_all() -> Result<()> {
    let fixture = Fixture::new(&["left", "right"]).await?;
    let publisher = Publisher::new(&fixture.connection).await?;
    let mut consumers = Vec::new();
    let mut taken = Vec::new();
    for (agent, n) in [("left", 12), ("right", 5)] {
        let queue = fixture.names.agent(agent);
        let messages: Vec<OutgoingMessage> = (0..n)
            .map(|i| OutgoingMessage::new(&queue, "task", format!("{i}").into_bytes()))
            .collect();
        for result in publisher.publish_batch(&messages).await {
            result?;
        }
        let mut consumer = Consumer::start(&fixture.connection, &queue, "", 20).await?;
        for _ in 0..n {
            taken.push(next_delivery(&mut consumer).await?);
        }
        consumers.push(consumer);
    }
    // Handed over out of order, as batches of both channels would be.
    let order = [3, 14, 0, 16, 11, 7, 12, 1, 15, 9, 2, 13, 4, 10, 5, 8, 6];
    let mut slots: Vec<Option<Delivery>> = taken.into_iter().map(Some).collect();
    let shuffled: Vec<Delivery> = order.iter().filter_map(|&i| slots[i].take()).collect();
    assert_eq!(shuffled.len(), 17);

    let last = Delivery::last_of_each_channel(&shuffled);
    let mut acking: Vec<(String, u64)> = last
        .iter()
        .map(|d| (d.routing_key.clone(), d.delivery_tag))
        .collect();
    acking.sort();
    assert_eq!(
        acking,
        [
            (fixture.names.agent("left"), 12),
            (fixture.names.agent("right"), 5)
        ]
    );
    for delivery in last {
        delivery.ack_multiple().await?;
    }
    // Closing the channels would requeue anything left unacked.
    for consumer in consumers {
        consumer.close().await?;
    }
    let channel = fixture.connection.open_channel().await?;
    for agent in ["left", "right"] {
        let queue = fixture.names.agent(agent);
        assert_eq!(channel.message_count(&queue).await?, 0, "{queue}");
    }
    publisher.close().await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn frames_are_small_unless_the_url_asks_and_big_messages_still_pass() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    assert_eq!(
        fixture.connection.frame_max(),
        flotilla_broker::DEFAULT_FRAME_MAX
    );
    let mut asked = broker_config();
    asked.url.push_str("?frame_max=65536");
    let asking = connect(&asked, "flotilla-broker-test-frames").await?;
    assert_eq!(asking.frame_max(), 65536);
    asking.close().await?;

    // A body of many frames arrives whole.
    let queue = fixture.agent_queue();
    let publisher = Publisher::new(&fixture.connection).await?;
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = OutgoingMessage::new(&queue, "task", body.clone());
    publisher.publish_batch(std::slice::from_ref(&sent)).await[0]
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut consumer = Consumer::start(&fixture.connection, &queue, "test-frames", 1).await?;
    let delivery = next_delivery(&mut consumer).await?;
    assert!(delivery.body == body, "the body came back altered");
    delivery.ack().await?;
    consumer.close().await?;
    publisher.close().await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn message_to_a_missing_queue_is_reported_not_delivered() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.agent_queue();
    let missing = format!("{}.agent.nobody", fixture.config.prefix);
    let publisher = Publisher::new(&fixture.connection).await?;

    let batch = [
        OutgoingMessage::new(&queue, "task", b"{}".to_vec()),
        OutgoingMessage::new(&missing, "task", b"{}".to_vec()),
        OutgoingMessage::new(&queue, "task", b"{}".to_vec()),
        OutgoingMessage::new(&missing, "task", b"{}".to_vec()),
    ];
    let results = publisher.publish_batch(&batch).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(results[2].is_ok(), "{:?}", results[2]);
    for result in [&results[1], &results[3]] {
        match result {
            Err(PublishError::Returned {
                routing_key,
                reply_code,
                ..
            }) => {
                assert_eq!(routing_key, &missing);
                assert_eq!(*reply_code, 312);
            }
            other => panic!("expected a returned message, got {other:?}"),
        }
    }

    let single = publisher
        .publish_one(&OutgoingMessage::new(&missing, "task", b"{}".to_vec()))
        .await;
    assert!(
        matches!(single, Err(PublishError::Returned { .. })),
        "{single:?}"
    );

    let channel = fixture.connection.open_channel().await?;
    assert_eq!(channel.message_count(&queue).await?, 2);
    fixture.cleanup().await
}

/// A control message reaches the queue of every worker bound to the control exchange, and one
/// that no worker listens to still counts as delivered.
#[tokio::test]
async fn broadcast_reaches_every_control_queue_and_none_is_not_an_error() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let publisher = Publisher::new(&fixture.connection).await?;
    let broadcast = OutgoingMessage::broadcast(fixture.names.control(), "cancel", b"{}".to_vec());
    publisher.publish_one(&broadcast).await?;

    let mut consumers = Vec::new();
    for worker in ["w1", "w2"] {
        let connection = connect(&fixture.config, worker).await?;
        let channel = connection.open_channel().await?;
        let queue = declare_control_queue(&channel, &fixture.names, worker).await?;
        assert_eq!(queue, fixture.names.control_queue(worker));
        channel.close().await?;
        let consumer = Consumer::start(&connection, &queue, worker, 10).await?;
        consumers.push((connection, consumer));
    }
    let message =
        OutgoingMessage::broadcast(fixture.names.control(), "cancel", br#"{"n":1}"#.to_vec());
    publisher.publish_one(&message).await?;
    for (connection, consumer) in &mut consumers {
        // The broadcast made before the queues existed is not there: only this one.
        let delivery = next_delivery(consumer).await?;
        assert_eq!(delivery.body, message.body);
        assert_eq!(delivery.kind.as_deref(), Some("cancel"));
        delivery.ack().await?;
        connection.close().await?;
    }
    // The queues went with their connections.
    let channel = fixture.connection.open_channel().await?;
    assert!(
        channel
            .message_count(&fixture.names.control_queue("w1"))
            .await
            .is_err()
    );

    publisher.close().await?;
    fixture.cleanup().await
}

/// Many tasks publishing at once through one publisher, a third of them to a missing queue:
/// each learns the fate of its own message.
#[tokio::test]
async fn concurrent_publishes_each_get_their_own_outcome() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.agent_queue();
    let missing = format!("{}.agent.nobody", fixture.config.prefix);
    let publisher = std::sync::Arc::new(Publisher::new(&fixture.connection).await?);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let publisher = publisher.clone();
        let target = if i % 3 == 0 {
            missing.clone()
        } else {
            queue.clone()
        };
        tasks.spawn(async move {
            let message = OutgoingMessage::new(&target, "task", format!("{i}").into_bytes());
            (i, publisher.publish_one(&message).await)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined?;
        if i % 3 == 0 {
            assert!(
                matches!(result, Err(PublishError::Returned { .. })),
                "{i}: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "{i}: {result:?}");
        }
    }
    let channel = fixture.connection.open_channel().await?;
    assert_eq!(channel.message_count(&queue).await?, 40);
    fixture.cleanup().await
}

#[tokio::test]
async fn redeclaring_the_topology_is_idempotent() -> Result<()> {
    let fixture = Fixture::new(&["echo", "agent6"]).await?;

    // Again on the same connection, and from another process's point of view.
    let channel = fixture.connection.open_channel().await?;
    declare_topology(
        &channel,
        &fixture.names,
        &fixture.agents,
        fixture.config.delivery_limit,
    )
    .await?;
    let other = connect(&fixture.config, "flotilla-broker-test-2").await?;
    let other_channel = other.open_channel().await?;
    declare_topology(
        &other_channel,
        &fixture.names,
        &fixture.agents,
        fixture.config.delivery_limit,
    )
    .await?;
    other.close().await?;

    // The arguments are really compared: a different delivery limit is refused.
    let refused = declare_agent_queue(
        &channel,
        &fixture.names,
        "echo",
        fixture.config.delivery_limit + 1,
    )
    .await;
    match refused {
        Err(Error::Amqp { reason, .. }) => {
            assert!(reason.contains("PRECONDITION_FAILED"), "{reason}");
        }
        other => panic!("expected the redeclaration to be refused, got {other:?}"),
    }
    fixture.cleanup().await
}

#[tokio::test]
async fn unacked_delivery_comes_back_redelivered_after_its_channel_closes() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.agent_queue();
    let publisher = Publisher::new(&fixture.connection).await?;
    publisher
        .publish_one(&OutgoingMessage::new(&queue, "task", b"{\"n\":1}".to_vec()))
        .await?;

    let mut first = Consumer::start(&fixture.connection, &queue, "first", 1).await?;
    let delivery = next_delivery(&mut first).await?;
    assert!(!delivery.redelivered);
    assert_eq!(delivery.delivery_count, None);
    first.close().await?;
    // The channel is gone, so the delivery can no longer be settled through it.
    assert!(matches!(
        delivery.ack().await,
        Err(Error::DeliveryGone { .. })
    ));

    let mut second = Consumer::start(&fixture.connection, &queue, "second", 1).await?;
    let again = next_delivery(&mut second).await?;
    assert!(again.redelivered);
    assert_eq!(again.delivery_count, Some(1));
    assert_eq!(again.body, b"{\"n\":1}");
    again.ack().await?;
    second.close().await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn rejected_task_is_dead_lettered() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.agent_queue();
    let publisher = Publisher::new(&fixture.connection).await?;
    publisher
        .publish_one(&OutgoingMessage::new(&queue, "task", b"not json".to_vec()))
        .await?;

    let mut consumer = Consumer::start(&fixture.connection, &queue, "", 1).await?;
    next_delivery(&mut consumer).await?.nack(false).await?;

    let mut dead =
        Consumer::start(&fixture.connection, &fixture.names.dead_letters(), "", 1).await?;
    let delivery = next_delivery(&mut dead).await?;
    assert_eq!(delivery.body, b"not json");
    delivery.ack().await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn task_over_the_delivery_limit_is_dead_lettered() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.agent_queue();
    let publisher = Publisher::new(&fixture.connection).await?;
    publisher
        .publish_one(&OutgoingMessage::new(&queue, "task", b"poison".to_vec()))
        .await?;

    // Delivered once, then requeued `delivery_limit` times: the next requeue dead-letters it.
    let mut consumer = Consumer::start(&fixture.connection, &queue, "", 1).await?;
    for _ in 0..=fixture.config.delivery_limit {
        next_delivery(&mut consumer).await?.nack(true).await?;
    }
    let mut dead =
        Consumer::start(&fixture.connection, &fixture.names.dead_letters(), "", 1).await?;
    let delivery = next_delivery(&mut dead).await?;
    assert_eq!(delivery.body, b"poison");
    delivery.ack().await?;
    consumer.close().await?;
    let channel = fixture.connection.open_channel().await?;
    assert_eq!(channel.message_count(&queue).await?, 0);
    fixture.cleanup().await
}

/// `amqps://` speaks TLS or nothing: against the plaintext port, the connection fails (the
/// handshake gets an AMQP header back) instead of carrying on in clear.
#[tokio::test]
async fn amqps_to_a_plaintext_port_fails_instead_of_falling_back() -> Result<()> {
    let plain =
        std::env::var("AMQP_URL").unwrap_or_else(|_| flotilla_broker::DEFAULT_URL.to_owned());
    let tls = plain.replacen("amqp://", "amqps://", 1);
    anyhow::ensure!(
        tls.starts_with("amqps://"),
        "AMQP_URL is not an amqp:// URL: {plain}"
    );
    let mut config = BrokerConfig::new(tls);
    config.connect_timeout = Duration::from_secs(5);
    let error = connect(&config, "amqps-test")
        .await
        .err()
        .context("amqps to the plaintext port connected")?;
    let message = error.to_string();
    assert!(message.contains("amqps://"), "{message}");
    assert!(
        message.contains("needs a port that speaks TLS"),
        "{message}"
    );
    assert!(!message.contains(":guest@"), "{message}");
    Ok(())
}

#[tokio::test]
async fn unreachable_broker_fails_fast_with_a_redacted_url() -> Result<()> {
    let mut config = BrokerConfig::new("amqp://flotilla:s3cret-pw@127.0.0.1:1/%2f");
    config.connect_timeout = Duration::from_secs(5);
    let started = Instant::now();
    let error = connect(&config, "unreachable-test")
        .await
        .err()
        .context("connecting to port 1 succeeded")?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let message = error.to_string();
    assert!(matches!(error, Error::Unreachable { .. }), "{error:?}");
    assert!(
        message.contains("amqp://flotilla:***@127.0.0.1:1/%2f"),
        "{message}"
    );
    assert!(message.contains("rabbitmq-server -detached"), "{message}");
    assert!(
        message.contains("docker compose -f deploy/compose.yaml up -d rabbitmq"),
        "{message}"
    );
    assert!(!message.contains("s3cret-pw"), "{message}");
    assert!(!format!("{error:?}").contains("s3cret-pw"));
    Ok(())
}

#[tokio::test]
async fn malformed_url_is_refused_without_showing_the_password() {
    let config = BrokerConfig::new("http://flotilla:s3cret-pw@127.0.0.1:5672/%2f");
    let error = connect(&config, "bad-url-test").await.unwrap_err();
    assert!(matches!(error, Error::InvalidUrl { .. }), "{error:?}");
    assert!(!error.to_string().contains("s3cret-pw"), "{error}");
}

#[tokio::test]
async fn wrong_password_is_refused_without_showing_it() -> Result<()> {
    let mut config = broker_config();
    let url = config
        .url
        .replacen("guest:guest@", "guest:not-the-password@", 1);
    if url == config.url {
        // A custom AMQP_URL without the stock credentials: nothing to falsify.
        return Ok(());
    }
    config.url = url;
    let error = connect(&config, "wrong-password-test")
        .await
        .err()
        .context("connected with a wrong password")?;
    assert!(matches!(error, Error::Refused { .. }), "{error:?}");
    assert!(error.to_string().contains("ACCESS_REFUSED"), "{error}");
    assert!(!error.to_string().contains("not-the-password"), "{error}");
    Ok(())
}

/// `config` through `proxy`, reconnecting quickly.
fn through(config: &BrokerConfig, proxy: &Proxy) -> BrokerConfig {
    BrokerConfig {
        url: proxy.url().to_owned(),
        reconnect: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        ..config.clone()
    }
}

async fn next_reconnecting(consumer: &mut ReconnectingConsumer) -> Result<Delivery> {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .with_context(|| format!("no delivery from {} within {WAIT:?}", consumer.queue()))?
        .context("the consumer stopped")
}

/// A consumer of `{prefix}.agent.{agent}` through `proxy`, declaring that queue itself.
async fn reconnecting_consumer(
    fixture: &Fixture,
    proxy: &Proxy,
    agent: &'static str,
    shutdown: &CancellationToken,
) -> Result<ReconnectingConsumer> {
    let connection = connect(&through(&fixture.config, proxy), "flotilla-broker-test").await?;
    let (names, limit) = (fixture.names.clone(), fixture.config.delivery_limit);
    let declare = move |channel| {
        let names = names.clone();
        async move { declare_agent_queue(&channel, &names, agent, limit).await }
    };
    Ok(ReconnectingConsumer::start(
        &connection,
        &fixture.names.agent(agent),
        "",
        10,
        declare,
        shutdown.clone(),
    )
    .await?)
}

/// Waits until `queue` exists, which only a declaration can make true.
async fn wait_for_queue(fixture: &Fixture, queue: &str) -> Result<()> {
    tokio::time::timeout(WAIT, async {
        loop {
            // A failed passive declaration closes its channel: one channel per try.
            let channel = fixture.connection.open_channel().await?;
            if channel.message_count(queue).await.is_ok() {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .with_context(|| format!("{queue} not declared again within {WAIT:?}"))?
}

#[tokio::test]
async fn reconnecting_consumer_resumes_after_its_connection_is_cut() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let proxy = Proxy::start(&fixture.config.url).await?;
    let shutdown = CancellationToken::new();
    let mut consumer = reconnecting_consumer(&fixture, &proxy, "volatile", &shutdown).await?;
    let queue = fixture.names.agent("volatile");
    let publisher = Publisher::new(&fixture.connection).await?;
    let message = |n: u8| OutgoingMessage::new(&queue, "task", vec![n]);

    publisher.publish_one(&message(1)).await?;
    let first = next_reconnecting(&mut consumer).await?;
    assert_eq!(first.body, [1]);
    first.ack().await?;
    publisher.publish_one(&message(2)).await?;
    let unacked = next_reconnecting(&mut consumer).await?;
    assert_eq!(unacked.body, [2]);

    proxy.cut();
    // It reconnects while asked for the next delivery.
    let mut next = Box::pin(next_reconnecting(&mut consumer));
    tokio::select! {
        delivery = &mut next => bail!("a delivery while cut off: {delivery:?}"),
        waited = tokio::time::timeout(WAIT, proxy.wait_for(|counts| counts.refused >= 1)) => {
            waited.context("no attempt to reconnect")?;
        }
    }
    proxy.restore();
    // The unacked message comes back on the new connection; the old delivery is dead.
    let again = next.await?;
    assert_eq!(again.body, [2]);
    assert!(again.redelivered);
    assert!(unacked.ack().await.is_err());
    again.ack().await?;
    assert!(proxy.counts().forwarded >= 2);

    // Deleted while the consumer is away, the queue exists again only if it declares it.
    proxy.cut();
    let channel = fixture.connection.open_channel().await?;
    channel.delete_queue(&queue).await?;
    proxy.restore();
    let (third, published) = tokio::join!(next_reconnecting(&mut consumer), async {
        wait_for_queue(&fixture, &queue).await?;
        publisher.publish_one(&message(3)).await?;
        anyhow::Ok(())
    });
    published?;
    let third = third?;
    assert_eq!(third.body, [3]);

    // A shutdown stops the consumer, and the channel stays open for what it handed over.
    shutdown.cancel();
    let last = tokio::time::timeout(WAIT, consumer.next())
        .await
        .context("next did not return after the shutdown")?;
    assert!(last.is_none(), "{last:?}");
    third.ack().await?;
    consumer.into_consumer()?.close().await?;
    assert_eq!(channel.message_count(&queue).await?, 0);
    channel.delete_queue(&queue).await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn reconnecting_consumer_stops_when_shut_down_while_disconnected() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let proxy = Proxy::start(&fixture.config.url).await?;
    let shutdown = CancellationToken::new();
    let mut consumer = reconnecting_consumer(&fixture, &proxy, "echo", &shutdown).await?;

    proxy.cut();
    let mut next = Box::pin(consumer.next());
    // It keeps trying while the broker is away.
    tokio::select! {
        delivery = &mut next => bail!("a delivery while cut off: {delivery:?}"),
        _ = tokio::time::timeout(WAIT, proxy.wait_for(|counts| counts.refused >= 3)) => {}
    }
    assert!(proxy.counts().refused >= 3, "no attempts to reconnect");
    shutdown.cancel();
    let stopped = tokio::time::timeout(WAIT, next)
        .await
        .context("next did not return after the shutdown")?;
    assert!(stopped.is_none(), "{stopped:?}");
    let error = consumer
        .into_consumer()
        .err()
        .context("a consumer after a shutdown while disconnected")?;
    assert!(error.to_string().contains("not replaced"), "{error}");
    fixture.cleanup().await
}

/// A connection that stops answering (a network partition) fails a batch within about one
/// operation timeout, not one per message (lapin's `basic_publish` waits until its frames are
/// written, which a partition stops).
#[tokio::test]
async fn batch_on_a_frozen_connection_fails_within_its_timeout() -> Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.agent_queue();
    let proxy = Proxy::start(&fixture.config.url).await?;
    let connection = connect(
        &through(&fixture.config, &proxy),
        "flotilla-broker-test-frozen",
    )
    .await?
    .with_operation_timeout(TIMEOUT);
    let publisher = Publisher::new(&connection).await?;
    publisher
        .publish_one(&OutgoingMessage::new(&queue, "task", b"{}".to_vec()))
        .await?;

    proxy.freeze();
    // Far more than the socket buffers between here and the proxy hold, so that sends block.
    let batch: Vec<OutgoingMessage> = (0..32)
        .map(|_| OutgoingMessage::new(&queue, "task", vec![b'x'; 1 << 20]))
        .collect();
    let started = Instant::now();
    let results = publisher.publish_batch(&batch).await;
    let elapsed = started.elapsed();
    assert!(results.iter().all(Result::is_err), "{results:?}");
    // One timeout for the send that blocked, one for the confirms of the sends before it.
    assert!(elapsed < 4 * TIMEOUT, "took {elapsed:?}");

    drop(proxy);
    let channel = fixture.connection.open_channel().await?;
    assert_eq!(channel.message_count(&queue).await?, 1);
    fixture.cleanup().await
}
