//! Consumes the dead-letter queue: each task RabbitMQ gave up on is recorded, and its step fails
//! with the reason, in one transaction; the message is acknowledged after that commits.

use chrono::Utc;
use flotilla_broker::{
    Connection, Consumer, Delivery, ReconnectingConsumer, declare_dead_letter_queue,
};
use flotilla_proto::{QueueNames, Task};
use flotilla_store::dead_letters::DeadLetter;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::engine::{EngineHandle, Input};

/// Consumes `{prefix}.dead` until `shutdown`, reconnecting when the connection is lost. Every
/// delivery goes to the engine, in the order received (see [`crate::results::run`]).
/// Returns the consumer, whose channel must stay open until the engine has settled what it was
/// handed (see [`crate::results::run`]).
pub async fn run(
    connection: &Connection,
    names: &QueueNames,
    engine: EngineHandle,
    delivery_limit: u32,
    shutdown: CancellationToken,
) -> Result<Consumer, flotilla_broker::Error> {
    let declare_names = names.clone();
    let declare = move |channel| {
        let names = declare_names.clone();
        async move { declare_dead_letter_queue(&channel, &names).await }
    };
    let mut consumer =
        ReconnectingConsumer::start(connection, &names.dead_letters(), "", 64, declare, shutdown)
            .await?;
    while let Some(delivery) = consumer.next().await {
        let (letter, task) = dead_letter(&delivery, delivery_limit);
        tracing::warn!(
            run_id = letter.run_id.as_ref().map(tracing::field::display),
            step_id = letter.step_id.as_deref(),
            reason = %letter.reason,
            "task dead-lettered"
        );
        let input = Input::DeadLetter {
            letter: Box::new(letter),
            task: task.map(Box::new),
            delivery: Box::new(delivery),
        };
        if engine.send(input).await.is_err() {
            break;
        }
    }
    consumer.into_consumer()
}

/// What a dead-lettered message says, and the task it carries if it is one.
fn dead_letter(delivery: &Delivery, delivery_limit: u32) -> (DeadLetter, Option<Task>) {
    let task = serde_json::from_slice::<Task>(&delivery.body).ok();
    let reason = match delivery
        .headers
        .get("x-first-death-reason")
        .map(String::as_str)
    {
        Some("delivery_limit") => format!(
            "dead-lettered: delivered {delivery_limit} times without being acknowledged (the worker crashed or lost its connection each time)"
        ),
        Some("rejected") => "dead-lettered: a worker rejected the task".to_string(),
        Some(other) => format!("dead-lettered by RabbitMQ ({other})"),
        None => "dead-lettered".to_string(),
    };
    let letter = DeadLetter {
        // A redelivered dead letter keeps its id, so it is recorded once.
        id: task.as_ref().map_or_else(Uuid::new_v4, |t| t.task_id),
        run_id: task.as_ref().map(|t| t.run_id),
        step_id: task.as_ref().map(|t| t.step_id.clone()),
        attempt: task
            .as_ref()
            .map(|t| i32::try_from(t.attempt).unwrap_or(i32::MAX)),
        task_id: task.as_ref().map(|t| t.task_id),
        reason,
        deliveries: delivery
            .delivery_count
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        body: delivery.body.clone(),
        created_at: Utc::now(),
        redriven_at: None,
    };
    (letter, task)
}
