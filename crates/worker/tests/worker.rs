//! A real `Worker` against the real RabbitMQ (`AMQP_URL`, default the local one): tasks are
//! published straight onto agent queues and results read back from the results queue. Each test
//! has its own queue prefix and deletes its queues at the end.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use flotilla_broker::{
    BrokerConfig, Connection, Consumer, OutgoingMessage, Publisher, QueueNames, connect,
    declare_topology,
    testing::{self, Proxy},
};
use flotilla_proto::{
    Cancel, LogBatch, LogStream, PROTOCOL_VERSION, ResultStatus, Task, TaskResult, WorkerMessage,
};
use flotilla_worker::{HandlerError, TaskContext, Worker, WorkerBuilder, WorkerConfig};
use serde_json::{Value, json};
use tokio::{
    sync::{Notify, Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Bounds every wait, so that a broken worker fails a test instead of hanging it.
const WAIT: Duration = Duration::from_secs(20);

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| flotilla_broker::DEFAULT_URL.to_owned())
}

struct Fixture {
    names: QueueNames,
    agents: Vec<String>,
    connection: Connection,
    publisher: Publisher,
}

impl Fixture {
    async fn new(agents: &[&str]) -> Result<Self> {
        let mut config = BrokerConfig::new(amqp_url());
        config.prefix = format!("test-{}", Uuid::new_v4());
        let connection = connect(&config, "flotilla-worker-test").await?;
        let names = config.queue_names();
        let agents: Vec<String> = agents.iter().map(|a| (*a).to_owned()).collect();
        // Declared before the worker starts so that tasks published first are routed.
        let channel = connection.open_channel().await?;
        declare_topology(&channel, &names, &agents, config.delivery_limit).await?;
        channel.close().await?;
        let publisher = Publisher::new(&connection).await?;
        Ok(Self {
            names,
            agents,
            connection,
            publisher,
        })
    }

    fn config(&self, concurrency: usize) -> WorkerConfig {
        WorkerConfig {
            amqp_url: amqp_url(),
            prefix: self.names.prefix().to_owned(),
            concurrency,
            worker_id: Some(format!("test-worker-{}", Uuid::new_v4())),
            heartbeat_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            secrets_dir: None,
        }
    }

    fn builder(&self, config: WorkerConfig) -> WorkerBuilder {
        self.agents
            .iter()
            .fold(Worker::builder(config), |builder, agent| {
                builder.agent(agent)
            })
    }

    fn task(&self, agent: &str, action: &str, params: Value) -> Task {
        let run_id = Uuid::now_v7();
        Task {
            v: PROTOCOL_VERSION,
            task_id: Uuid::now_v7(),
            run_id,
            step_id: format!("step-{action}"),
            attempt: 1,
            agent: agent.to_owned(),
            action: action.to_owned(),
            idempotency_key: format!("{run_id}/step-{action}"),
            params: params.as_object().cloned().unwrap_or_default(),
            run_params: json!({"region": "eu", "name": "from-run"})
                .as_object()
                .cloned()
                .unwrap(),
            inputs: serde_json::Map::new(),
            dispatched_at: Utc::now(),
            heartbeat_timeout_ms: None,
            ack_early: false,
        }
    }

    /// Publishes tasks the way the coordinator does.
    async fn publish(&self, tasks: &[Task]) -> Result<()> {
        let messages: Vec<OutgoingMessage> = tasks
            .iter()
            .map(|task| {
                OutgoingMessage::new(
                    self.names.agent(&task.agent),
                    "task",
                    serde_json::to_vec(task).unwrap(),
                )
                .with_reply_to(self.names.results())
                .with_correlation_id(task.task_id.to_string())
            })
            .collect();
        for result in self.publisher.publish_batch(&messages).await {
            result?;
        }
        Ok(())
    }

    async fn publish_raw(&self, agent: &str, body: &[u8]) -> Result<()> {
        let message = OutgoingMessage::new(self.names.agent(agent), "task", body.to_vec())
            .with_reply_to(self.names.results());
        Ok(self.publisher.publish_one(&message).await?)
    }

    async fn results(&self) -> Result<Consumer> {
        Ok(Consumer::start(&self.connection, &self.names.results(), "", 100).await?)
    }

    async fn message_count(&self, queue: &str) -> Result<u32> {
        let channel = self.connection.open_channel().await?;
        let count = channel.message_count(queue).await?;
        channel.close().await?;
        Ok(count)
    }

    /// The ready messages of `queue` once they are `expected`, or the last count after [`WAIT`]:
    /// RabbitMQ requeues a closed connection's unacked deliveries shortly after the close.
    async fn settled_count(&self, queue: &str, expected: u32) -> Result<u32> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let count = self.message_count(queue).await?;
            if count == expected || tokio::time::Instant::now() >= deadline {
                return Ok(count);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn cleanup(self) -> Result<()> {
        let queues = testing::queues_of(&self.names, self.agents.iter().map(String::as_str));
        testing::delete_topology(&self.connection, &self.names, &queues).await?;
        self.connection.close().await?;
        Ok(())
    }
}

/// Reads `n` results, acking them, keyed by task id. Checks the AMQP properties on the way.
async fn read_results(consumer: &mut Consumer, n: usize) -> Result<HashMap<Uuid, TaskResult>> {
    let mut results = HashMap::new();
    while results.len() < n {
        let delivery = match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => bail!("results consumer ended"),
            Err(_) => bail!("only {} of {n} results within {WAIT:?}", results.len()),
        };
        let result: TaskResult = serde_json::from_slice(&delivery.body)?;
        assert_eq!(delivery.kind.as_deref(), Some("result"));
        assert_eq!(delivery.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            delivery.correlation_id.as_deref(),
            Some(result.task_id.to_string().as_str())
        );
        delivery.ack().await?;
        results.insert(result.task_id, result);
    }
    Ok(results)
}

fn spawn_worker(
    worker: Worker,
    shutdown: &CancellationToken,
) -> JoinHandle<Result<(), flotilla_worker::Error>> {
    tokio::spawn(worker.run(shutdown.clone()))
}

async fn stop(
    run: JoinHandle<Result<(), flotilla_worker::Error>>,
    shutdown: &CancellationToken,
) -> Result<()> {
    shutdown.cancel();
    tokio::time::timeout(WAIT, run)
        .await
        .context("worker did not stop")???;
    Ok(())
}

/// A cancel broadcast on the control exchange reaches the handler of the task it names, which
/// stops; the worker reports the attempt as cancelled. A task whose cancel came before it
/// starts cancelled.
#[tokio::test]
async fn a_cancel_stops_the_handler_and_the_attempt_is_reported_cancelled() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let worker = fixture
        .builder(fixture.config(2))
        .action("wait", move |ctx: TaskContext| {
            let started_tx = started_tx.clone();
            async move {
                let _ = started_tx.send(ctx.task().task_id);
                ctx.cancelled().await;
                Err(HandlerError::retryable("stopped on request"))
            }
        })
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);
    let cancel = |task: &Task| -> Result<OutgoingMessage> {
        let cancel = Cancel {
            v: PROTOCOL_VERSION,
            task_id: task.task_id,
            run_id: task.run_id,
            step_id: task.step_id.clone(),
            attempt: task.attempt,
            reason: "the run was cancelled".into(),
            sent_at: Utc::now(),
        };
        let body = serde_json::to_vec(&cancel)?;
        Ok(OutgoingMessage::broadcast(
            fixture.names.control(),
            "cancel",
            body,
        ))
    };

    let running = fixture.task("echo", "wait", json!({}));
    let late = fixture.task("echo", "wait", json!({}));
    fixture.publish(std::slice::from_ref(&running)).await?;
    let first = tokio::time::timeout(WAIT, started.recv()).await?;
    assert_eq!(first, Some(running.task_id));
    // In this order on the worker's control queue: once `running` is cancelled, the worker has
    // seen the cancel of `late` too.
    fixture.publisher.publish_one(&cancel(&late)?).await?;
    fixture.publisher.publish_one(&cancel(&running)?).await?;

    let mut results_consumer = fixture.results().await?;
    let mut results = read_results(&mut results_consumer, 1).await?;
    fixture.publish(std::slice::from_ref(&late)).await?;
    results.extend(read_results(&mut results_consumer, 1).await?);

    for task in [&running, &late] {
        let result = results.get(&task.task_id).context("no result for a task")?;
        assert_eq!(result.status, ResultStatus::Cancelled, "{result:?}");
        let error = result
            .error
            .as_ref()
            .context("a cancelled result says why")?;
        assert_eq!(error.message, "stopped on request");
        assert!(!error.retryable);
    }

    stop(run, &shutdown).await?;
    assert_eq!(
        fixture.message_count(&fixture.names.agent("echo")).await?,
        0
    );
    fixture.cleanup().await
}

#[tokio::test]
async fn handled_tasks_report_their_results() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let config = fixture.config(4);
    let worker_id = config.worker_id.clone().unwrap();
    let worker = fixture
        .builder(config)
        .action("double", |ctx: TaskContext| async move {
            let n = ctx.params()["n"]
                .as_i64()
                .ok_or_else(|| HandlerError::fatal("n"))?;
            Ok(json!({
                "doubled": n * 2,
                "region": ctx.run_params()["region"],
                "agent": ctx.agent(),
                "attempt": ctx.attempt(),
                "key": ctx.idempotency_key(),
                "redelivered": ctx.redelivered(),
            }))
        })
        .build();
    assert_eq!(worker.worker_id(), worker_id);
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    let mut tasks: Vec<Task> = (1..=5)
        .map(|n| fixture.task("echo", "double", json!({ "n": n })))
        .collect();
    tasks[4].attempt = 3;
    fixture.publish(&tasks).await?;
    let mut results_consumer = fixture.results().await?;
    let results = read_results(&mut results_consumer, tasks.len()).await?;

    for (n, task) in (1..).zip(&tasks) {
        let result = &results[&task.task_id];
        assert_eq!(result.status, ResultStatus::Success, "{result:?}");
        assert_eq!(result.run_id, task.run_id);
        assert_eq!(result.step_id, task.step_id);
        assert_eq!(result.attempt, task.attempt);
        assert_eq!(result.worker_id, worker_id);
        assert!(result.started_at <= result.finished_at);
        assert_eq!(result.error, None);
        assert_eq!(
            result.output,
            Some(json!({
                "doubled": n * 2,
                "region": "eu",
                "agent": "echo",
                "attempt": task.attempt,
                "key": task.idempotency_key,
                "redelivered": false,
            }))
        );
    }

    stop(run, &shutdown).await?;
    // Every task was acked.
    assert_eq!(
        fixture.message_count(&fixture.names.agent("echo")).await?,
        0
    );
    fixture.cleanup().await
}

/// What a handler writes to its step's log reaches `{prefix}.logs` in a few batches, numbered
/// without a gap, all of them before the result.
#[tokio::test]
async fn a_handlers_log_lines_are_sent_in_batches_before_its_result() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let worker = fixture
        .builder(fixture.config(1))
        .action("build", |ctx: TaskContext| async move {
            for i in 1..=600 {
                ctx.log().stdout(format!("compiling unit {i}"));
            }
            ctx.log().stderr("warning: done\n");
            Ok(json!({}))
        })
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);
    let task = fixture.task("echo", "build", json!({}));
    fixture.publish(std::slice::from_ref(&task)).await?;
    let mut results = fixture.results().await?;
    read_results(&mut results, 1).await?;

    // The result was published after the last batch: every batch is queued by now.
    let sent = fixture.message_count(&fixture.names.logs()).await?;
    let mut logs = Consumer::start(&fixture.connection, &fixture.names.logs(), "", 100).await?;
    let mut batches = Vec::new();
    while batches.len() < sent as usize {
        let delivery = tokio::time::timeout(WAIT, logs.next())
            .await?
            .context("logs consumer ended")??;
        assert_eq!(delivery.kind.as_deref(), Some("log"));
        batches.push(serde_json::from_slice::<LogBatch>(&delivery.body)?);
        delivery.ack().await?;
    }
    assert!(
        (3..=20).contains(&batches.len()),
        "{sent} batches for 601 lines"
    );
    let lines: Vec<_> = batches.iter().flat_map(|b| &b.lines).collect();
    assert_eq!(
        lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (1..=601).collect::<Vec<_>>()
    );
    assert_eq!(lines[0].line, "compiling unit 1");
    assert_eq!(
        (lines[600].stream, lines[600].line.as_str()),
        (LogStream::Stderr, "warning: done")
    );
    for batch in &batches {
        assert_eq!(
            (batch.task_id, batch.run_id, &batch.step_id, batch.attempt),
            (task.task_id, task.run_id, &task.step_id, task.attempt)
        );
        assert_eq!(batch.execution_id, batches[0].execution_id);
    }
    drop(logs);
    stop(run, &shutdown).await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn concurrency_is_capped_across_agents() -> Result<()> {
    const CONCURRENCY: usize = 3;
    // Two agents, each with prefetch 3: only the shared semaphore keeps it at 3, not 6.
    let fixture = Fixture::new(&["alpha", "beta"]).await?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();

    let handler = {
        let (in_flight, max_in_flight, gate) =
            (in_flight.clone(), max_in_flight.clone(), gate.clone());
        move |_ctx: TaskContext| {
            let (in_flight, max_in_flight, gate, started_tx) = (
                in_flight.clone(),
                max_in_flight.clone(),
                gate.clone(),
                started_tx.clone(),
            );
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_in_flight.fetch_max(now, Ordering::SeqCst);
                started_tx.send(()).unwrap();
                gate.acquire().await.unwrap().forget();
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(json!({}))
            }
        }
    };
    let worker = fixture
        .builder(fixture.config(CONCURRENCY))
        .action("hold", handler)
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    let tasks: Vec<Task> = ["alpha", "beta"]
        .iter()
        .flat_map(|agent| (0..4).map(|_| fixture.task(agent, "hold", json!({}))))
        .collect();
    fixture.publish(&tasks).await?;

    for _ in 0..CONCURRENCY {
        tokio::time::timeout(WAIT, started.recv()).await?.unwrap();
    }
    assert_eq!(in_flight.load(Ordering::SeqCst), CONCURRENCY);
    // Release one task at a time: each release lets exactly one more start.
    for _ in CONCURRENCY..tasks.len() {
        gate.add_permits(1);
        tokio::time::timeout(WAIT, started.recv()).await?.unwrap();
        assert!(in_flight.load(Ordering::SeqCst) <= CONCURRENCY);
    }
    gate.add_permits(CONCURRENCY);
    let mut results_consumer = fixture.results().await?;
    let results = read_results(&mut results_consumer, tasks.len()).await?;
    assert!(results.values().all(|r| r.status == ResultStatus::Success));
    assert_eq!(max_in_flight.load(Ordering::SeqCst), CONCURRENCY);

    stop(run, &shutdown).await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn panicking_handler_fails_its_task_and_the_worker_goes_on() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let worker = fixture
        .builder(fixture.config(2))
        .action("boom", |ctx: TaskContext| async move {
            if ctx.attempt() > 0 {
                panic!("kaboom in {}", ctx.task().step_id);
            }
            Ok(json!(null))
        })
        .action("ok", |_ctx: TaskContext| async { Ok(json!("fine")) })
        // Panics while making its future, not inside it.
        .action("eager", |ctx: TaskContext| {
            assert!(ctx.attempt() == 0, "eager panic");
            async { Ok(json!(null)) }
        })
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    let tasks = vec![
        fixture.task("echo", "boom", json!({})),
        fixture.task("echo", "ok", json!({})),
        fixture.task("echo", "boom", json!({})),
        fixture.task("echo", "ok", json!({})),
        fixture.task("echo", "eager", json!({})),
    ];
    fixture.publish(&tasks).await?;
    let mut results_consumer = fixture.results().await?;
    let results = read_results(&mut results_consumer, tasks.len()).await?;
    for task in &tasks {
        let result = &results[&task.task_id];
        if task.action == "boom" || task.action == "eager" {
            assert_eq!(result.status, ResultStatus::Failure);
            let error = result.error.as_ref().unwrap();
            assert!(error.message.contains("panicked"), "{error:?}");
            let expected = if task.action == "boom" {
                "kaboom in step-boom"
            } else {
                "eager panic"
            };
            assert!(error.message.contains(expected), "{error:?}");
            assert!(error.retryable);
        } else {
            assert_eq!(result.status, ResultStatus::Success);
            assert_eq!(result.output, Some(json!("fine")));
        }
    }
    assert!(!run.is_finished());
    stop(run, &shutdown).await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn unknown_action_fails_without_retry_and_fallback_answers_the_rest() -> Result<()> {
    let fixture = Fixture::new(&["echo", "other"]).await?;
    // One worker without a fallback on `echo`, one with a fallback on `other`.
    let strict = Worker::builder(fixture.config(2))
        .agent("echo")
        .action("known", |_ctx: TaskContext| async { Ok(json!(1)) })
        .build();
    let lenient = Worker::builder(fixture.config(2))
        .agent("other")
        .action("known", |_ctx: TaskContext| async { Ok(json!(1)) })
        .fallback(|ctx: TaskContext| async move { Ok(json!({ "fallback": ctx.action() })) })
        .build();
    let shutdown = CancellationToken::new();
    let strict_run = spawn_worker(strict, &shutdown);
    let lenient_run = spawn_worker(lenient, &shutdown);

    let unknown = fixture.task("echo", "mystery", json!({}));
    let known = fixture.task("echo", "known", json!({}));
    let fallen_back = fixture.task("other", "mystery", json!({}));
    fixture
        .publish(&[unknown.clone(), known.clone(), fallen_back.clone()])
        .await?;
    let mut results_consumer = fixture.results().await?;
    let results = read_results(&mut results_consumer, 3).await?;

    let failed = &results[&unknown.task_id];
    assert_eq!(failed.status, ResultStatus::Failure);
    let error = failed.error.as_ref().unwrap();
    assert!(!error.retryable);
    assert!(error.message.contains("`mystery`"), "{error:?}");
    assert!(error.message.contains("`echo`"), "{error:?}");
    assert_eq!(results[&known.task_id].output, Some(json!(1)));
    assert_eq!(
        results[&fallen_back.task_id].output,
        Some(json!({ "fallback": "mystery" }))
    );

    stop(strict_run, &shutdown).await?;
    stop(lenient_run, &shutdown).await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn undecodable_task_is_dead_lettered_not_retried() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let worker = fixture
        .builder(fixture.config(1))
        .fallback(|_ctx: TaskContext| async { Ok(json!("ok")) })
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    fixture
        .publish_raw("echo", b"{\"type\":\"task\",\"v\":1}")
        .await?;
    let valid = fixture.task("echo", "anything", json!({}));
    fixture.publish(std::slice::from_ref(&valid)).await?;
    let mut results_consumer = fixture.results().await?;
    let results = read_results(&mut results_consumer, 1).await?;
    assert!(results.contains_key(&valid.task_id));

    let mut dead =
        Consumer::start(&fixture.connection, &fixture.names.dead_letters(), "", 1).await?;
    let delivery = tokio::time::timeout(WAIT, dead.next())
        .await?
        .context("dead-letter consumer ended")??;
    assert_eq!(delivery.body, b"{\"type\":\"task\",\"v\":1}");
    delivery.ack().await?;

    stop(run, &shutdown).await?;
    // Nothing was published for it: the only result was the valid task's.
    assert_eq!(fixture.message_count(&fixture.names.results()).await?, 0);
    fixture.cleanup().await
}

/// A result that cannot be delivered (its reply-to queue does not exist) must not ack the task:
/// it is requeued and runs again, until the queue's delivery limit dead-letters it.
#[tokio::test]
async fn task_whose_result_cannot_be_published_is_requeued_not_acked() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let redeliveries = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (calls, redeliveries) = (calls.clone(), redeliveries.clone());
        move |ctx: TaskContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            if ctx.redelivered() {
                redeliveries.fetch_add(1, Ordering::SeqCst);
            }
            async { Ok(json!(null)) }
        }
    };
    let worker = fixture.builder(fixture.config(1)).fallback(handler).build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    let task = fixture.task("echo", "anything", json!({}));
    let message = OutgoingMessage::new(
        fixture.names.agent("echo"),
        "task",
        serde_json::to_vec(&task)?,
    )
    .with_reply_to(format!("{}.nowhere", fixture.names.prefix()));
    fixture.publisher.publish_one(&message).await?;

    let mut dead =
        Consumer::start(&fixture.connection, &fixture.names.dead_letters(), "", 1).await?;
    let delivery = tokio::time::timeout(WAIT, dead.next())
        .await?
        .context("dead-letter consumer ended")??;
    let dead_task: Task = serde_json::from_slice(&delivery.body)?;
    assert_eq!(dead_task.task_id, task.task_id);
    delivery.ack().await?;
    stop(run, &shutdown).await?;

    // The first delivery and one per allowed redelivery (the default limit is 5).
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(redeliveries.load(Ordering::SeqCst), 5);
    assert_eq!(fixture.message_count(&fixture.names.results()).await?, 0);
    fixture.cleanup().await
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_task_in_progress() -> Result<()> {
    // Concurrency 1 over two agents: one task runs, the other waits for the slot.
    let fixture = Fixture::new(&["first", "second"]).await?;
    let (started_tx, mut started) = mpsc::unbounded_channel::<Uuid>();
    let release = Arc::new(Notify::new());
    let handler = {
        let release = release.clone();
        move |ctx: TaskContext| {
            let (release, started_tx) = (release.clone(), started_tx.clone());
            async move {
                started_tx.send(ctx.task().task_id).unwrap();
                release.notified().await;
                Ok(json!({ "finished": ctx.agent() }))
            }
        }
    };
    let mut config = fixture.config(1);
    config.heartbeat_interval = Duration::from_millis(50);
    let worker = fixture.builder(config).action("work", handler).build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    let first = fixture.task("first", "work", json!({}));
    let second = fixture.task("second", "work", json!({}));
    fixture.publish(&[first.clone(), second.clone()]).await?;
    let running = tokio::time::timeout(WAIT, started.recv()).await?.unwrap();
    let (finished, waiting) = if running == first.task_id {
        (&first, &second)
    } else {
        (&second, &first)
    };

    let mut heartbeats =
        Consumer::start(&fixture.connection, &fixture.names.heartbeats(), "", 10).await?;
    let shutdown_at = Utc::now();
    shutdown.cancel();
    // A heartbeat sent after the shutdown request that still lists the task shows the worker
    // draining rather than gone; only then may the task finish.
    loop {
        let delivery = tokio::time::timeout(WAIT, heartbeats.next())
            .await?
            .context("heartbeat consumer ended")??;
        delivery.ack().await?;
        let WorkerMessage::Heartbeat(heartbeat) = WorkerMessage::decode(&delivery.body)? else {
            continue;
        };
        if heartbeat.sent_at > shutdown_at && heartbeat.tasks.iter().any(|t| t.task_id == running) {
            break;
        }
    }
    release.notify_one();
    stop(run, &shutdown).await?;
    // Drained, it said goodbye to the registry.
    loop {
        let delivery = tokio::time::timeout(WAIT, heartbeats.next())
            .await
            .context("no deregistration after the shutdown")?
            .context("heartbeat consumer ended")??;
        delivery.ack().await?;
        if let WorkerMessage::Deregistration(_) = WorkerMessage::decode(&delivery.body)? {
            break;
        }
    }
    heartbeats.close().await?;

    let mut results_consumer = fixture.results().await?;
    let results = read_results(&mut results_consumer, 1).await?;
    assert_eq!(results[&running].status, ResultStatus::Success);
    results_consumer.close().await?;
    assert_eq!(fixture.message_count(&fixture.names.results()).await?, 0);
    // The waiting task never started and is back in its queue; the finished one was acked.
    assert!(started.try_recv().is_err());
    assert_eq!(
        fixture
            .settled_count(&fixture.names.agent(&waiting.agent), 1)
            .await?,
        1
    );
    assert_eq!(
        fixture
            .message_count(&fixture.names.agent(&finished.agent))
            .await?,
        0
    );
    fixture.cleanup().await
}

#[tokio::test]
async fn shutdown_grace_expiry_leaves_the_task_to_be_redelivered() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let mut config = fixture.config(1);
    config.shutdown_grace = Duration::from_millis(200);
    let worker = fixture
        .builder(config)
        .action("forever", move |_ctx: TaskContext| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.send(()).unwrap();
                std::future::pending::<()>().await;
                Ok(json!(null))
            }
        })
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    fixture
        .publish(&[fixture.task("echo", "forever", json!({}))])
        .await?;
    tokio::time::timeout(WAIT, started.recv()).await?.unwrap();
    stop(run, &shutdown).await?;

    assert_eq!(fixture.message_count(&fixture.names.results()).await?, 0);
    assert_eq!(
        fixture
            .settled_count(&fixture.names.agent("echo"), 1)
            .await?,
        1
    );
    fixture.cleanup().await
}

#[tokio::test]
async fn heartbeats_report_the_worker_and_its_tasks() -> Result<()> {
    let fixture = Fixture::new(&["echo", "agent6"]).await?;
    let shutdown = CancellationToken::new();
    let mut config = fixture.config(7);
    config.heartbeat_interval = Duration::from_millis(100);
    let worker_id = config.worker_id.clone().unwrap();
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let handler = {
        let shutdown = shutdown.clone();
        move |_ctx: TaskContext| {
            let (shutdown, started_tx) = (shutdown.clone(), started_tx.clone());
            async move {
                started_tx.send(()).unwrap();
                shutdown.cancelled().await;
                Ok(json!(null))
            }
        }
    };
    let worker = fixture.builder(config).fallback(handler).build();
    let run = spawn_worker(worker, &shutdown);

    let task = fixture.task("agent6", "hold", json!({}));
    fixture.publish(std::slice::from_ref(&task)).await?;
    tokio::time::timeout(WAIT, started.recv()).await?.unwrap();

    let mut heartbeats =
        Consumer::start(&fixture.connection, &fixture.names.heartbeats(), "", 10).await?;
    let mut registration = None;
    let heartbeat = loop {
        let delivery = tokio::time::timeout(WAIT, heartbeats.next())
            .await?
            .context("heartbeat consumer ended")??;
        delivery.ack().await?;
        match WorkerMessage::decode(&delivery.body)? {
            WorkerMessage::Registration(r) => {
                assert_eq!(delivery.kind.as_deref(), Some("registration"));
                registration = Some(r);
            }
            WorkerMessage::Heartbeat(heartbeat) => {
                assert_eq!(delivery.kind.as_deref(), Some("heartbeat"));
                if !heartbeat.tasks.is_empty() {
                    break heartbeat;
                }
            }
            WorkerMessage::Deregistration(_) => bail!("a goodbye from a running worker"),
        }
    };
    // It announced itself before its first heartbeat.
    let registration = registration.context("no registration before the heartbeats")?;
    assert_eq!(registration.worker_id, worker_id);
    assert_eq!(registration.agents, ["echo", "agent6"]);
    assert_eq!(registration.concurrency, 7);
    assert_eq!(registration.pid, std::process::id());
    assert!(registration.sdk.starts_with("flotilla-worker/"));
    assert_eq!(heartbeat.worker_id, worker_id);
    assert_eq!(heartbeat.agents, ["echo", "agent6"]);
    assert_eq!(heartbeat.concurrency, 7);
    assert_eq!(heartbeat.tasks.len(), 1);
    assert_eq!(heartbeat.tasks[0].task_id, task.task_id);
    assert_eq!(heartbeat.tasks[0].step_id, task.step_id);
    assert_eq!(heartbeat.tasks[0].attempt, task.attempt);

    heartbeats.close().await?;
    stop(run, &shutdown).await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn a_task_with_a_lease_is_heartbeaten_at_a_third_of_it_and_acked_once_started() -> Result<()>
{
    let fixture = Fixture::new(&["echo"]).await?;
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let mut config = fixture.config(1);
    // Far longer than the test: only the task's lease can bring heartbeats this often.
    config.heartbeat_interval = Duration::from_secs(600);
    config.shutdown_grace = Duration::from_millis(200);
    let worker = fixture
        .builder(config)
        .action("forever", move |_ctx: TaskContext| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.send(()).unwrap();
                std::future::pending::<()>().await;
                Ok(json!(null))
            }
        })
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    let mut task = fixture.task("echo", "forever", json!({}));
    task.heartbeat_timeout_ms = Some(1_200);
    task.ack_early = true;
    fixture.publish(std::slice::from_ref(&task)).await?;
    tokio::time::timeout(WAIT, started.recv()).await?.unwrap();
    let mut heartbeats =
        Consumer::start(&fixture.connection, &fixture.names.heartbeats(), "", 10).await?;
    let mut listing = 0;
    while listing < 3 {
        let delivery = tokio::time::timeout(WAIT, heartbeats.next())
            .await?
            .context("heartbeat consumer ended")??;
        delivery.ack().await?;
        let WorkerMessage::Heartbeat(heartbeat) = WorkerMessage::decode(&delivery.body)? else {
            continue;
        };
        if heartbeat.tasks.iter().any(|t| t.task_id == task.task_id) {
            listing += 1;
        }
    }
    heartbeats.close().await?;
    // The task was acked once it started: abandoning it gives nothing back to the queue (its
    // lease, no longer renewed, is what gets it retried).
    stop(run, &shutdown).await?;
    assert_eq!(fixture.message_count(&fixture.names.results()).await?, 0);
    assert_eq!(
        fixture.message_count(&fixture.names.agent("echo")).await?,
        0
    );
    fixture.cleanup().await
}

/// A worker of `fixture` whose connection goes through `proxy`, reconnecting quickly.
fn through(fixture: &Fixture, proxy: &Proxy, config: WorkerConfig) -> WorkerBuilder {
    let config = WorkerConfig {
        amqp_url: proxy.url().to_owned(),
        ..config
    };
    fixture
        .builder(config)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// Cuts the proxy's connections and waits until the worker has tried to reconnect `attempts`
/// times.
async fn cut(proxy: &Proxy, attempts: usize) -> Result<()> {
    proxy.cut();
    tokio::time::timeout(WAIT, proxy.wait_for(|counts| counts.refused >= attempts))
        .await
        .context("the worker did not try to reconnect")?;
    Ok(())
}

/// Waits until `queue` holds `ready` messages ready for delivery.
async fn wait_for_ready(fixture: &Fixture, queue: &str, ready: u32) -> Result<()> {
    tokio::time::timeout(WAIT, async {
        while fixture.message_count(queue).await? != ready {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("{queue} never held {ready} ready messages"))?
}

/// Adds the action `work`, whose handler reports each start, waits for a permit of `gate`,
/// and answers whether its task was redelivered.
fn gated_work(
    builder: WorkerBuilder,
    gate: &Arc<Semaphore>,
) -> (WorkerBuilder, mpsc::UnboundedReceiver<(Uuid, bool)>) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let gate = gate.clone();
    let builder = builder.action("work", move |ctx: TaskContext| {
        let (gate, started_tx) = (gate.clone(), started_tx.clone());
        async move {
            started_tx
                .send((ctx.task().task_id, ctx.redelivered()))
                .unwrap();
            gate.acquire().await.unwrap().forget();
            Ok(json!({ "redelivered": ctx.redelivered() }))
        }
    });
    (builder, started)
}

#[tokio::test]
async fn worker_keeps_serving_after_its_connection_is_cut() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let proxy = Proxy::start(&amqp_url()).await?;
    let mut config = fixture.config(2);
    config.heartbeat_interval = Duration::from_millis(100);
    let worker = through(&fixture, &proxy, config)
        .fallback(|ctx: TaskContext| async move { Ok(json!({ "action": ctx.action() })) })
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);
    let mut results_consumer = fixture.results().await?;

    let before = fixture.task("echo", "before", json!({}));
    fixture.publish(std::slice::from_ref(&before)).await?;
    assert!(
        read_results(&mut results_consumer, 1)
            .await?
            .contains_key(&before.task_id)
    );

    cut(&proxy, 2).await?;
    let during = fixture.task("echo", "during", json!({}));
    fixture.publish(std::slice::from_ref(&during)).await?;
    let restored_at = Utc::now();
    proxy.restore();
    let after = fixture.task("echo", "after", json!({}));
    fixture.publish(std::slice::from_ref(&after)).await?;

    // The task before may come too: its ack may have been lost in the cut.
    let mut results = HashMap::new();
    while !(results.contains_key(&during.task_id) && results.contains_key(&after.task_id)) {
        results.extend(read_results(&mut results_consumer, 1).await?);
    }
    for task in [&during, &after] {
        let result = &results[&task.task_id];
        assert_eq!(result.status, ResultStatus::Success);
        assert_eq!(result.output, Some(json!({ "action": task.action })));
    }
    // It registers and heartbeats again too.
    let mut heartbeats =
        Consumer::start(&fixture.connection, &fixture.names.heartbeats(), "", 10).await?;
    let mut registered = false;
    loop {
        let delivery = tokio::time::timeout(WAIT, heartbeats.next())
            .await
            .context("no heartbeat after the reconnect")?
            .context("heartbeat consumer ended")??;
        delivery.ack().await?;
        match WorkerMessage::decode(&delivery.body)? {
            WorkerMessage::Registration(r) => registered |= r.sent_at > restored_at,
            WorkerMessage::Heartbeat(h) if h.sent_at > restored_at => break,
            _ => {}
        }
    }
    assert!(registered, "no registration on the new connection");
    heartbeats.close().await?;

    assert!(!run.is_finished());
    stop(run, &shutdown).await?;
    assert_eq!(
        fixture.message_count(&fixture.names.agent("echo")).await?,
        0
    );
    fixture.cleanup().await
}

/// The task in progress when the connection drops goes on; its result is published on the new
/// connection. RabbitMQ, which requeued the task, delivers it again to the worker, whose run in
/// progress settles that delivery too: the handler runs once.
#[tokio::test]
async fn task_running_during_a_cut_reports_after_the_reconnect_and_runs_once() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.names.agent("echo");
    let proxy = Proxy::start(&amqp_url()).await?;
    let gate = Arc::new(Semaphore::new(0));
    let (builder, mut started) = gated_work(through(&fixture, &proxy, fixture.config(1)), &gate);
    let worker = builder.build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    let task = fixture.task("echo", "work", json!({}));
    fixture.publish(std::slice::from_ref(&task)).await?;
    let first = tokio::time::timeout(WAIT, started.recv()).await?.unwrap();
    assert_eq!(first, (task.task_id, false));

    cut(&proxy, 1).await?;
    // Requeued by RabbitMQ when the connection dropped...
    wait_for_ready(&fixture, &queue, 1).await?;
    proxy.restore();
    // ... and delivered again once the worker is back.
    wait_for_ready(&fixture, &queue, 0).await?;
    gate.add_permits(1);

    let mut results_consumer = fixture.results().await?;
    let results = read_results(&mut results_consumer, 1).await?;
    let result = &results[&task.task_id];
    assert_eq!(result.status, ResultStatus::Success);
    assert_eq!(result.output, Some(json!({ "redelivered": false })));
    stop(run, &shutdown).await?;

    assert!(started.try_recv().is_err(), "the handler ran twice");
    // The redelivery was acked with the first run's result; nothing is left to run.
    assert_eq!(fixture.message_count(&queue).await?, 0);
    results_consumer.close().await?;
    assert_eq!(fixture.message_count(&fixture.names.results()).await?, 0);
    fixture.cleanup().await
}

/// A shutdown while reconnecting still lets the task in progress report, on the connection
/// made after it; the worker takes no new task, and leaves the old delivery alone.
#[tokio::test]
async fn shutdown_while_reconnecting_still_reports_the_task_in_progress() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let queue = fixture.names.agent("echo");
    let proxy = Proxy::start(&amqp_url()).await?;
    let gate = Arc::new(Semaphore::new(0));
    let (builder, mut started) = gated_work(through(&fixture, &proxy, fixture.config(1)), &gate);
    let worker = builder.build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);

    let task = fixture.task("echo", "work", json!({}));
    fixture.publish(std::slice::from_ref(&task)).await?;
    tokio::time::timeout(WAIT, started.recv()).await?.unwrap();
    cut(&proxy, 1).await?;
    wait_for_ready(&fixture, &queue, 1).await?;
    shutdown.cancel();
    // Finished while cut off: the result waits for a connection.
    gate.add_permits(1);
    let later = fixture.task("echo", "work", json!({}));
    fixture.publish(std::slice::from_ref(&later)).await?;
    proxy.restore();
    stop(run, &shutdown).await?;

    let mut results_consumer = fixture.results().await?;
    let results = read_results(&mut results_consumer, 1).await?;
    assert_eq!(
        results[&task.task_id].output,
        Some(json!({ "redelivered": false }))
    );
    results_consumer.close().await?;
    assert_eq!(fixture.message_count(&fixture.names.results()).await?, 0);
    // Neither the requeued task nor the later one was taken after the shutdown request.
    assert!(started.try_recv().is_err());
    assert_eq!(fixture.message_count(&queue).await?, 2);
    fixture.cleanup().await
}

#[tokio::test]
async fn shutdown_while_the_broker_stays_away_returns_ok() -> Result<()> {
    let fixture = Fixture::new(&["echo"]).await?;
    let proxy = Proxy::start(&amqp_url()).await?;
    let worker = through(&fixture, &proxy, fixture.config(1))
        .fallback(|_ctx: TaskContext| async { Ok(json!(null)) })
        .build();
    let shutdown = CancellationToken::new();
    let run = spawn_worker(worker, &shutdown);
    let task = fixture.task("echo", "anything", json!({}));
    fixture.publish(std::slice::from_ref(&task)).await?;
    let mut results_consumer = fixture.results().await?;
    read_results(&mut results_consumer, 1).await?;

    cut(&proxy, 3).await?;
    assert!(!run.is_finished());
    stop(run, &shutdown).await?;
    fixture.cleanup().await
}

#[tokio::test]
async fn unreachable_broker_is_reported_at_start() -> Result<()> {
    let config = WorkerConfig {
        amqp_url: "amqp://guest:pw-not-shown@127.0.0.1:1/%2f".into(),
        ..WorkerConfig::default()
    };
    let worker = Worker::builder(config)
        .agent("echo")
        .fallback(|_ctx: TaskContext| async { Ok(json!(null)) })
        .build();
    let error = worker
        .run(CancellationToken::new())
        .await
        .err()
        .context("run succeeded without a broker")?;
    assert!(
        matches!(error, flotilla_worker::Error::Connect(_)),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("amqp://guest:***@127.0.0.1:1/%2f"),
        "{message}"
    );
    assert!(!message.contains("pw-not-shown"), "{message}");
    Ok(())
}
