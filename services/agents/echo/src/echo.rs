//! What the echo agent answers: the task's params back, with a few reserved params that make it
//! sleep, fail or answer something else, so that tests can script a step's behaviour.

use std::time::Duration;

use flotilla_proto::Task;
use flotilla_worker::{HandlerError, TaskContext};
use serde_json::{Map, Value};
use tracing::Instrument as _;

/// Sleep this many milliseconds before answering, as work time.
pub const SLEEP_MS: &str = "sleep_ms";
/// Fail attempts `1..=N` with a retryable error.
pub const FAIL_ATTEMPTS: &str = "fail_attempts";
/// Answer with this JSON value.
pub const OUTPUT: &str = "output";
/// `true`: abort the worker process (`std::process::abort`, as a segfault or an OOM kill would)
/// as soon as it runs the step, on every attempt. Makes a poison task for the fault tests: it is
/// never acknowledged, so RabbitMQ dead-letters it after the queue's delivery limit.
pub const CRASH: &str = "crash";

/// `true`: add the attempt's number to the output (an object) as `attempt`, so that a step's
/// output can differ from one attempt to the next.
pub const WITH_ATTEMPT: &str = "with_attempt";

const RESERVED: [&str; 5] = [SLEEP_MS, FAIL_ATTEMPTS, OUTPUT, CRASH, WITH_ATTEMPT];

/// What to do for one task, read from the step's params.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Abort the process instead of answering.
    pub crash: bool,
    pub sleep: Duration,
    /// `Some(message)` when this attempt must fail.
    pub failure: Option<String>,
    pub output: Value,
}

impl Plan {
    /// Reads the reserved params of `task`. A reserved param of the wrong type is an error that
    /// retrying cannot fix.
    pub fn for_task(task: &Task) -> Result<Self, HandlerError> {
        let sleep_ms = count_param(&task.params, SLEEP_MS)?;
        let fail_attempts = count_param(&task.params, FAIL_ATTEMPTS)?;
        let crash = flag_param(&task.params, CRASH)?;
        let failure = fail_attempts
            .filter(|&n| u64::from(task.attempt) <= n)
            .map(|n| {
                format!(
                    "echo: failing attempt {} of {n} as asked by fail_attempts",
                    task.attempt
                )
            });
        let mut output = match task.params.get(OUTPUT) {
            Some(output) => output.clone(),
            None => default_output(&task.run_params, &task.params),
        };
        if flag_param(&task.params, WITH_ATTEMPT)? {
            let Value::Object(fields) = &mut output else {
                return Err(HandlerError::fatal(format!(
                    "echo: param `{WITH_ATTEMPT}` needs an object output, not {output}"
                )));
            };
            fields.insert("attempt".into(), Value::from(task.attempt));
        }
        Ok(Self {
            crash,
            sleep: Duration::from_millis(sleep_ms.unwrap_or(0)),
            failure,
            output,
        })
    }
}

/// The run's params overlaid with the step's (the step wins), without the reserved keys.
pub fn default_output(run_params: &Map<String, Value>, params: &Map<String, Value>) -> Value {
    let mut output = run_params.clone();
    output.extend(params.iter().map(|(k, v)| (k.clone(), v.clone())));
    output.retain(|key, _| !RESERVED.contains(&key.as_str()));
    Value::Object(output)
}

fn flag_param(params: &Map<String, Value>, name: &str) -> Result<bool, HandlerError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(flag)) => Ok(*flag),
        Some(value) => Err(HandlerError::fatal(format!(
            "echo: param `{name}` must be a boolean, not {value}"
        ))),
    }
}

fn count_param(params: &Map<String, Value>, name: &str) -> Result<Option<u64>, HandlerError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            HandlerError::fatal(format!(
                "echo: param `{name}` must be a non-negative integer, not {value}"
            ))
        }),
    }
}

/// The handler: answers any action by its plan.
pub async fn handle(ctx: TaskContext) -> Result<Value, HandlerError> {
    let plan = Plan::for_task(ctx.task())?;
    if plan.crash {
        tracing::error!(task_id = %ctx.task().task_id, "echo: crashing as asked by the crash param");
        std::process::abort();
    }
    if !plan.sleep.is_zero() {
        let started = tokio::time::Instant::now();
        // The handler's own span: a child of the task's, in the run's trace.
        let work = tracing::info_span!("echo.sleep", sleep_ms = plan.sleep.as_millis() as u64);
        tokio::select! {
            () = tokio::time::sleep(plan.sleep).instrument(work) => {}
            () = ctx.cancelled() => {
                return Err(HandlerError::fatal(format!(
                    "echo: cancelled after {} ms of its {} ms sleep",
                    started.elapsed().as_millis(),
                    plan.sleep.as_millis()
                )));
            }
        }
    }
    match plan.failure {
        Some(message) => Err(HandlerError::retryable(message)),
        None => Ok(plan.output),
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use flotilla_proto::PROTOCOL_VERSION;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    fn task(attempt: u32, params: Value, run_params: Value) -> Task {
        Task {
            v: PROTOCOL_VERSION,
            task_id: Uuid::now_v7(),
            run_id: Uuid::now_v7(),
            step_id: "step".into(),
            attempt,
            agent: "echo".into(),
            action: "anything".into(),
            idempotency_key: "run/step".into(),
            params: params.as_object().cloned().unwrap(),
            run_params: run_params.as_object().cloned().unwrap(),
            inputs: Map::new(),
            dispatched_at: Utc::now(),
            heartbeat_timeout_ms: None,
            ack_early: false,
        }
    }

    #[test]
    fn default_output_is_run_params_overlaid_with_step_params_minus_reserved() {
        let task = task(
            1,
            json!({"name": "step", "size": 3, "sleep_ms": 5, "fail_attempts": 0, "crash": false}),
            json!({"name": "run", "region": "eu", "output": "not this"}),
        );
        let plan = Plan::for_task(&task).unwrap();
        assert_eq!(
            plan.output,
            json!({"name": "step", "size": 3, "region": "eu"})
        );
        assert_eq!(plan.sleep, Duration::from_millis(5));
        assert_eq!(plan.failure, None);
        assert!(!plan.crash);
    }

    #[test]
    fn crash_is_read_from_a_boolean_param() {
        let plan = Plan::for_task(&task(3, json!({"crash": true}), json!({}))).unwrap();
        assert!(plan.crash, "every attempt crashes");
        assert!(
            !Plan::for_task(&task(1, json!({}), json!({})))
                .unwrap()
                .crash
        );
    }

    #[test]
    fn output_param_is_returned_as_is() {
        for output in [
            json!({"files": ["a.rs"]}),
            json!(42),
            json!(null),
            json!("text"),
        ] {
            let task = task(1, json!({"output": output, "other": 1}), json!({"x": 1}));
            assert_eq!(Plan::for_task(&task).unwrap().output, output);
        }
    }

    #[test]
    fn fail_attempts_fails_the_first_n_attempts_only() {
        for attempt in 1..=2 {
            let plan = Plan::for_task(&task(attempt, json!({"fail_attempts": 2}), json!({})));
            assert_eq!(
                plan.unwrap().failure.as_deref(),
                Some(
                    format!("echo: failing attempt {attempt} of 2 as asked by fail_attempts")
                        .as_str()
                )
            );
        }
        let plan = Plan::for_task(&task(3, json!({"fail_attempts": 2}), json!({}))).unwrap();
        assert_eq!(plan.failure, None);
        assert_eq!(plan.output, json!({}));
    }

    #[test]
    fn with_attempt_adds_the_attempt_number_to_an_object_output() {
        for attempt in 1..=2 {
            let task = task(attempt, json!({"with_attempt": true, "n": 1}), json!({}));
            assert_eq!(
                Plan::for_task(&task).unwrap().output,
                json!({"n": 1, "attempt": attempt})
            );
        }
        let task = task(1, json!({"with_attempt": true, "output": 7}), json!({}));
        let error = Plan::for_task(&task).unwrap_err();
        assert!(error.message.contains("needs an object output"), "{error}");
    }

    #[test]
    fn malformed_reserved_params_are_fatal() {
        for params in [
            json!({"sleep_ms": "soon"}),
            json!({"sleep_ms": -1}),
            json!({"fail_attempts": 1.5}),
            json!({"crash": "yes"}),
            json!({"with_attempt": 1}),
        ] {
            let error = Plan::for_task(&task(1, params.clone(), json!({}))).unwrap_err();
            assert!(!error.retryable, "{params}");
            assert!(error.message.starts_with("echo: param `"), "{error}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_ms_takes_that_long() {
        let task = task(1, json!({"sleep_ms": 1500, "output": "done"}), json!({}));
        let ctx = TaskContext::new(task, "echo", "test-worker", false);
        let started = tokio::time::Instant::now();
        assert_eq!(handle(ctx).await.unwrap(), json!("done"));
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_ms_stops_when_cancelled() {
        let task = task(1, json!({"sleep_ms": 60_000}), json!({}));
        let cancel = tokio_util::sync::CancellationToken::new();
        let ctx =
            TaskContext::new(task, "echo", "test-worker", false).with_cancellation(cancel.clone());
        let started = tokio::time::Instant::now();
        let handler = tokio::spawn(handle(ctx));
        tokio::time::sleep(Duration::from_millis(250)).await;
        cancel.cancel();
        let error = handler.await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(
            error.message,
            "echo: cancelled after 250 ms of its 60000 ms sleep"
        );
    }
}
