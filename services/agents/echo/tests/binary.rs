//! The `flotilla-agent-echo` binary as an operator runs it: against the real RabbitMQ
//! (`AMQP_URL`, default the local one), stopped with signals, judged by its exit code.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use flotilla_broker::{
    BrokerConfig, Connection, Consumer, OutgoingMessage, Publisher, QueueNames, connect,
    declare_topology,
    testing::{self, Proxy},
};
use flotilla_proto::{PROTOCOL_VERSION, ResultStatus, Task, TaskResult};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStderr, Command},
};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| flotilla_broker::DEFAULT_URL.to_owned())
}

struct Fleet {
    names: QueueNames,
    connection: Connection,
    publisher: Publisher,
}

impl Fleet {
    async fn new() -> Result<Self> {
        let mut config = BrokerConfig::new(amqp_url());
        config.prefix = format!("test-{}", Uuid::new_v4());
        let connection = connect(&config, "flotilla-agent-echo-test").await?;
        let names = config.queue_names();
        let channel = connection.open_channel().await?;
        declare_topology(
            &channel,
            &names,
            &["echo".to_owned()],
            config.delivery_limit,
        )
        .await?;
        channel.close().await?;
        let publisher = Publisher::new(&connection).await?;
        Ok(Self {
            names,
            connection,
            publisher,
        })
    }

    fn spawn_agent(&self) -> Result<(Child, Lines<BufReader<ChildStderr>>)> {
        self.spawn_agent_at(&amqp_url())
    }

    fn spawn_agent_at(&self, url: &str) -> Result<(Child, Lines<BufReader<ChildStderr>>)> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-agent-echo"))
            .args(["--agent", "echo", "--queue-prefix", self.names.prefix()])
            .env("AMQP_URL", url)
            .env("RUST_LOG", "debug")
            .env_remove("FLOTILLA_LOG_FORMAT")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stderr = child.stderr.take().context("no stderr")?;
        Ok((child, BufReader::new(stderr).lines()))
    }

    async fn publish(&self, action: &str, attempt: u32, params: Value) -> Result<Task> {
        let run_id = Uuid::now_v7();
        let task = Task {
            v: PROTOCOL_VERSION,
            task_id: Uuid::now_v7(),
            run_id,
            step_id: "step".into(),
            attempt,
            agent: "echo".into(),
            action: action.into(),
            idempotency_key: format!("{run_id}/step"),
            params: params.as_object().cloned().unwrap_or_default(),
            run_params: json!({"region": "eu", "size": 1})
                .as_object()
                .cloned()
                .unwrap(),
            inputs: serde_json::Map::new(),
            dispatched_at: Utc::now(),
            heartbeat_timeout_ms: None,
            ack_early: false,
        };
        let message =
            OutgoingMessage::new(self.names.agent("echo"), "task", serde_json::to_vec(&task)?)
                .with_reply_to(self.names.results())
                .with_correlation_id(task.task_id.to_string());
        self.publisher.publish_one(&message).await?;
        Ok(task)
    }

    async fn next_result(&self, results: &mut Consumer) -> Result<TaskResult> {
        let delivery = tokio::time::timeout(WAIT, results.next())
            .await
            .context("no result in time")?
            .context("results consumer ended")??;
        delivery.ack().await?;
        Ok(serde_json::from_slice(&delivery.body)?)
    }

    async fn cleanup(self) -> Result<()> {
        let queues = testing::queues_of(&self.names, ["echo"]);
        testing::delete_topology(&self.connection, &self.names, &queues).await?;
        self.connection.close().await?;
        Ok(())
    }
}

async fn wait_for_line(lines: &mut Lines<BufReader<ChildStderr>>, needle: &str) -> Result<String> {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(needle) {
                return Ok(line);
            }
        }
        bail!("stderr ended before a line with {needle:?}")
    });
    found
        .await
        .with_context(|| format!("no line with {needle:?} in time"))?
}

fn send_signal(child: &Child, signal: &str) -> Result<()> {
    let pid = child.id().context("agent already exited")?;
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

async fn exit_code(child: &mut Child) -> Result<Option<i32>> {
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .context("agent did not exit")??;
    Ok(status.code())
}

#[tokio::test]
async fn answers_any_action_and_exits_zero_on_sigterm() -> Result<()> {
    let fleet = Fleet::new().await?;
    let (mut agent, mut stderr) = fleet.spawn_agent()?;
    let mut results = Consumer::start(&fleet.connection, &fleet.names.results(), "", 10).await?;

    let echoed = fleet
        .publish("whatever_action", 1, json!({"size": 2, "sleep_ms": 1}))
        .await?;
    let result = fleet.next_result(&mut results).await?;
    assert_eq!(result.task_id, echoed.task_id);
    assert_eq!(result.status, ResultStatus::Success);
    assert_eq!(result.output, Some(json!({"region": "eu", "size": 2})));

    let failing = fleet
        .publish("deploy", 2, json!({"fail_attempts": 3}))
        .await?;
    let result = fleet.next_result(&mut results).await?;
    assert_eq!(result.task_id, failing.task_id);
    assert_eq!(result.status, ResultStatus::Failure);
    let error = result.error.context("failure without error")?;
    assert_eq!(
        error.message,
        "echo: failing attempt 2 of 3 as asked by fail_attempts"
    );
    assert!(error.retryable);

    send_signal(&agent, "TERM")?;
    assert_eq!(exit_code(&mut agent).await?, Some(0));
    wait_for_line(&mut stderr, "worker stopped").await?;
    fleet.cleanup().await
}

#[tokio::test]
async fn second_signal_exits_at_once_with_130() -> Result<()> {
    let fleet = Fleet::new().await?;
    let (mut agent, mut stderr) = fleet.spawn_agent()?;
    let slow = fleet
        .publish("slow", 1, json!({"sleep_ms": 600_000}))
        .await?;
    wait_for_line(&mut stderr, "task started").await?;

    send_signal(&agent, "INT")?;
    wait_for_line(&mut stderr, "shutdown requested").await?;
    send_signal(&agent, "TERM")?;
    assert_eq!(exit_code(&mut agent).await?, Some(130));
    // The task it was running goes back to its queue.
    let mut tasks = Consumer::start(&fleet.connection, &fleet.names.agent("echo"), "", 1).await?;
    let redelivery = tokio::time::timeout(WAIT, tasks.next())
        .await
        .context("task not redelivered in time")?
        .context("task consumer ended")??;
    let redelivered: Task = serde_json::from_slice(&redelivery.body)?;
    assert_eq!(redelivered.task_id, slow.task_id);
    assert!(redelivery.redelivered);
    tasks.close().await?;
    fleet.cleanup().await
}

#[tokio::test]
async fn survives_a_lost_connection_and_logs_reconnects_without_the_password() -> Result<()> {
    let fleet = Fleet::new().await?;
    let proxy = Proxy::start(&amqp_url()).await?;
    let (mut agent, mut stderr) = fleet.spawn_agent_at(proxy.url())?;
    let mut results = Consumer::start(&fleet.connection, &fleet.names.results(), "", 10).await?;
    let before = fleet.publish("before", 1, json!({})).await?;
    assert_eq!(
        fleet.next_result(&mut results).await?.task_id,
        before.task_id
    );

    proxy.cut();
    let line = wait_for_line(&mut stderr, "could not reconnect to rabbitmq").await?;
    assert!(line.contains("amqp://guest:***@127.0.0.1:"), "{line}");
    assert!(!line.contains("guest:guest"), "{line}");
    proxy.restore();
    let after = fleet.publish("after", 1, json!({})).await?;
    // The task before may come again: its ack may have been lost in the cut.
    while fleet.next_result(&mut results).await?.task_id != after.task_id {}

    send_signal(&agent, "TERM")?;
    assert_eq!(exit_code(&mut agent).await?, Some(0));
    fleet.cleanup().await
}

#[tokio::test]
async fn unreachable_broker_exits_2_with_a_clear_message() -> Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla-agent-echo"))
        .args(["--agent", "echo"])
        .env("AMQP_URL", "amqp://guest:pw-not-shown@127.0.0.1:1/%2f")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("amqp://guest:***@127.0.0.1:1/%2f"),
        "{stderr}"
    );
    assert!(stderr.contains("rabbitmq-server -detached"), "{stderr}");
    assert!(!stderr.contains("pw-not-shown"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn agents_are_required() -> Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla-agent-echo"))
        .env_remove("FLOTILLA_AGENTS")
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--agent"));
    Ok(())
}
