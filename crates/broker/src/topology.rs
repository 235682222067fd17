//! The queues of a Flotilla fleet. All are durable quorum queues on the default exchange, so a
//! message's routing key is the name of its queue; except the control messages, broadcast on a
//! fanout exchange to one exclusive queue per worker.
//!
//! RabbitMQ accepts a redeclaration only with exactly the same arguments (the same values *and*
//! AMQP types), so every process must declare through these functions with the same settings.

use std::time::Duration;

use flotilla_proto::QueueNames;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::{Channel, error::Error};

/// How long an unconsumed heartbeat stays in the heartbeats queue (`x-message-ttl`): heartbeats
/// are only worth reading fresh, and must not pile up while no coordinator runs.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(60);

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), string("quorum"));
    arguments
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Declares the task queue of `agent`, `{prefix}.agent.{agent}`.
///
/// A task delivered `delivery_limit` times without being acked (a poison message, or a worker
/// that keeps crashing on it) is dead-lettered to `{prefix}.dead`. Dead-lettering is
/// at-least-once, which RabbitMQ only allows together with `x-overflow: reject-publish`.
pub async fn declare_agent_queue(
    channel: &Channel,
    names: &QueueNames,
    agent: &str,
    delivery_limit: u32,
) -> Result<(), Error> {
    declare_task_queue(channel, names, &names.agent(agent), delivery_limit).await
}

/// Declares a queue of tasks, an agent's or one of its label sets' ([`QueueNames::tasks`]),
/// with the arguments of [`declare_agent_queue`].
pub async fn declare_task_queue(
    channel: &Channel,
    names: &QueueNames,
    queue: &str,
    delivery_limit: u32,
) -> Result<(), Error> {
    let mut arguments = quorum_arguments();
    arguments.insert("x-dead-letter-exchange".into(), string(""));
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        string(&names.dead_letters()),
    );
    arguments.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    arguments.insert("x-overflow".into(), string("reject-publish"));
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(delivery_limit)),
    );
    channel.declare_durable(queue, arguments).await
}

/// Declares `{prefix}.results`, where workers publish task results.
pub async fn declare_results_queue(channel: &Channel, names: &QueueNames) -> Result<(), Error> {
    channel
        .declare_durable(&names.results(), quorum_arguments())
        .await
}

/// Declares `{prefix}.heartbeats`, whose messages expire after [`HEARTBEAT_TTL`].
pub async fn declare_heartbeats_queue(channel: &Channel, names: &QueueNames) -> Result<(), Error> {
    let mut arguments = quorum_arguments();
    let ttl_ms = i64::try_from(HEARTBEAT_TTL.as_millis()).unwrap_or(i64::MAX);
    arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
    channel
        .declare_durable(&names.heartbeats(), arguments)
        .await
}

/// Declares `{prefix}.logs`, where workers publish the lines of their steps' logs.
pub async fn declare_logs_queue(channel: &Channel, names: &QueueNames) -> Result<(), Error> {
    channel
        .declare_durable(&names.logs(), quorum_arguments())
        .await
}

/// Declares `{prefix}.dead`, which collects tasks dead-lettered by the agent queues.
pub async fn declare_dead_letter_queue(channel: &Channel, names: &QueueNames) -> Result<(), Error> {
    channel
        .declare_durable(&names.dead_letters(), quorum_arguments())
        .await
}

/// Declares `{prefix}.control`, the fanout exchange that carries control messages to workers.
pub async fn declare_control_exchange(channel: &Channel, names: &QueueNames) -> Result<(), Error> {
    channel.declare_fanout(&names.control()).await
}

/// Declares the control exchange and the control queue of worker `worker_id`, bound to it. The
/// queue is exclusive to the channel's connection and goes away with it: a worker that
/// reconnects declares a new one, and control messages sent meanwhile are lost with the old one
/// (they only concern tasks running on that worker, whose deliveries died with it too).
pub async fn declare_control_queue(
    channel: &Channel,
    names: &QueueNames,
    worker_id: &str,
) -> Result<String, Error> {
    declare_control_exchange(channel, names).await?;
    let queue = names.control_queue(worker_id);
    channel
        .declare_exclusive_bound(&queue, &names.control())
        .await?;
    Ok(queue)
}

/// Declares every queue a fleet serving `agents` needs: the dead-letter queue first (so nothing
/// dead-lettered is lost), then results, heartbeats, logs, the control exchange and one queue
/// per agent.
pub async fn declare_topology(
    channel: &Channel,
    names: &QueueNames,
    agents: &[String],
    delivery_limit: u32,
) -> Result<(), Error> {
    declare_dead_letter_queue(channel, names).await?;
    declare_results_queue(channel, names).await?;
    declare_heartbeats_queue(channel, names).await?;
    declare_logs_queue(channel, names).await?;
    declare_control_exchange(channel, names).await?;
    for agent in agents {
        declare_agent_queue(channel, names, agent, delivery_limit).await?;
    }
    Ok(())
}
