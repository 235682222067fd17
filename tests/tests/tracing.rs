//! Traces end to end: an OTLP/HTTP receiver of the test's own collects the spans a coordinator
//! and two echo workers export for a run, which must form one trace (root → attempts → worker
//! tasks → the handler's own span), the tasks keeping the `tracestate` their tasks carried; a
//! collector that does not answer neither stops nor slows runs, its spans being
//! dropped and counted; and spans still queued leave at graceful shutdown.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::extract::State;
use flotilla_tests::{Fleet, Launch};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message as _;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Two steps on agents served by different workers; the first fails its first attempt, the
/// second's handler sleeps in a span of its own (`echo.sleep`).
const RETRIED_RUN: &str = "
name: traced
steps:
  - id: flaky
    agent: trace-a
    action: build
    params: {fail_attempts: 1}
    retry: {max_attempts: 3, delay: 100ms}
  - id: steady
    agent: trace-b
    action: test
    params: {sleep_ms: 20}
";

/// One span as the receiver got it, ids in hex.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    trace_state: String,
    start: u64,
    end: u64,
    attributes: BTreeMap<String, String>,
    error: Option<String>,
    /// The spans it links to, as (trace id, span id).
    links: Vec<(String, String)>,
}

impl Received {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

type Spans = Arc<Mutex<Vec<Received>>>;

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /v1/traces` of OTLP/HTTP with a protobuf body.
async fn receive(
    State(spans): State<Spans>,
    body: Bytes,
) -> ([(&'static str, &'static str); 1], Vec<u8>) {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
    let mut received = Vec::new();
    for resource in request.resource_spans {
        let resource_attributes = attributes(
            resource
                .resource
                .as_ref()
                .map_or(&[][..], |r| &r.attributes[..]),
        );
        let service = resource_attributes
            .get("service.name")
            .cloned()
            .unwrap_or_default();
        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
            let error = span
                .status
                .as_ref()
                .filter(|s| s.code == StatusCode::Error as i32)
                .map(|s| s.message.clone());
            received.push(Received {
                service: service.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                trace_state: span.trace_state,
                start: span.start_time_unix_nano,
                end: span.end_time_unix_nano,
                attributes: attributes(&span.attributes),
                error,
                links: span
                    .links
                    .iter()
                    .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                    .collect(),
            });
        }
    }
    spans.lock().unwrap().extend(received);
    ([("content-type", "application/x-protobuf")], Vec::new())
}

/// Starts the receiver; returns its endpoint and what it collects.
async fn start_receiver() -> anyhow::Result<(String, Spans)> {
    let spans = Spans::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((endpoint, spans))
}

/// Environment of every process of a traced fleet: export every 100 ms.
fn traced(endpoint: &str) -> [(&'static str, String); 2] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

fn worker_launch(env: &[(&str, String)], service: &str) -> Launch {
    env.iter()
        .fold(Launch::once(), |launch, (k, v)| launch.env(k, v))
        .env("OTEL_SERVICE_NAME", service)
}

/// The spans of a trace, in `spans`.
fn spans_of(spans: &Spans, trace_id: &str) -> Vec<Received> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect()
}

/// Waits until the eight spans of a [`RETRIED_RUN`] are in (root, three attempts, three worker
/// tasks, one handler span), then answers them.
async fn whole_trace(spans: &Spans, trace_id: &str) -> anyhow::Result<Vec<Received>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let trace = spans_of(spans, trace_id);
        if trace.len() >= 8 {
            return Ok(trace);
        }
        if Instant::now() > deadline {
            bail!("spans of trace {trace_id} not all received: {trace:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A receiver, and a fleet exporting to it: a coordinator, and per name `x` in `workers` an
/// echo worker `echo-x` serving the agent `trace-x`.
async fn traced_fleet(workers: &[&str]) -> anyhow::Result<(Fleet, Spans)> {
    let (endpoint, spans) = start_receiver().await?;
    let env = traced(&endpoint);
    let mut fleet = env
        .iter()
        .fold(Fleet::new(), |fleet, (k, v)| fleet.coordinator_env(k, v));
    fleet.start_coordinator().await?;
    for name in workers {
        let id = format!("echo-{name}");
        let agent = format!("trace-{name}");
        fleet.start_worker(&id, &[&agent], 2, worker_launch(&env, &id))?;
    }
    Ok((fleet, spans))
}

#[tokio::test]
async fn a_run_is_one_trace_across_coordinator_and_workers() -> anyhow::Result<()> {
    let (fleet, spans) = traced_fleet(&["a", "b"]).await?;

    let id = fleet.execute_yaml(RETRIED_RUN, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    let trace_id = id.simple().to_string();
    assert_eq!(run.trace_id, trace_id, "the API names the run's trace");

    // Root, three attempts, three worker tasks; exported within a few schedule delays.
    let trace = whole_trace(&spans, &trace_id).await?;
    let named =
        |name: &str| -> Vec<&Received> { trace.iter().filter(|s| s.name == name).collect() };
    let (roots, attempts, tasks) = (
        named("workflow.run"),
        named("step.attempt"),
        named("worker.task"),
    );
    assert_eq!(
        (roots.len(), attempts.len(), tasks.len(), trace.len()),
        (1, 3, 3, 8),
        "{trace:#?}"
    );

    // One trace per run: every span naming the run is in its trace.
    let run_id = id.to_string();
    let elsewhere: Vec<Received> = spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.attr("flotilla.workflow.id") == run_id && s.trace_id != trace_id)
        .cloned()
        .collect();
    assert!(
        elsewhere.is_empty(),
        "spans of the run in other traces: {elsewhere:#?}"
    );

    let root = roots[0];
    assert_eq!(root.parent_span_id, "", "the root has no parent");
    assert_eq!(root.service, "flotilla-coordinator");
    assert_eq!(root.attr("flotilla.workflow.id"), run_id);
    assert_eq!(root.attr("flotilla.workflow.name"), "traced");
    assert_eq!(root.attr("flotilla.status"), "success");
    assert_eq!(root.error, None);

    let mut by_attempt = BTreeMap::new();
    for attempt in &attempts {
        assert_eq!(
            attempt.parent_span_id, root.span_id,
            "attempts are children of the root: {attempt:#?}"
        );
        assert_eq!(attempt.service, "flotilla-coordinator");
        assert_eq!(attempt.attr("flotilla.workflow.id"), run_id);
        assert!(
            root.start <= attempt.start && attempt.end <= root.end,
            "{root:#?} {attempt:#?}"
        );
        by_attempt.insert(
            (
                attempt.attr("flotilla.step.id").to_owned(),
                attempt.attr("flotilla.attempt").to_owned(),
            ),
            *attempt,
        );
    }
    let keys: Vec<(&str, &str)> = by_attempt
        .keys()
        .map(|(s, a)| (s.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        keys,
        [("flaky", "1"), ("flaky", "2"), ("steady", "1")],
        "a retry is a sibling attempt"
    );
    let first = by_attempt[&("flaky".to_owned(), "1".to_owned())];
    assert!(
        first.error.is_some(),
        "the failed attempt's span is an error: {first:#?}"
    );
    assert_eq!(first.attr("flotilla.status"), "failure");
    assert_eq!(first.attr("flotilla.agent"), "trace-a");
    assert_eq!(first.attr("flotilla.worker.id"), "echo-a");

    for task in &tasks {
        let step = task.attr("flotilla.step.id");
        let attempt = by_attempt
            .get(&(step.to_owned(), task.attr("flotilla.attempt").to_owned()))
            .with_context(|| format!("no attempt span for {task:#?}"))?;
        assert_eq!(
            task.parent_span_id, attempt.span_id,
            "a task is a child of its attempt: {task:#?}"
        );
        let (service, agent) = if step == "flaky" {
            ("echo-a", "trace-a")
        } else {
            ("echo-b", "trace-b")
        };
        assert_eq!(
            (task.service.as_str(), task.attr("flotilla.agent")),
            (service, agent)
        );
        assert_eq!(task.attr("flotilla.worker.id"), service);
        assert_eq!(task.attr("flotilla.workflow.id"), run_id);
        assert!(
            task.attr("flotilla.queue_wait_ms").parse::<i64>().is_ok(),
            "queue wait recorded: {task:#?}"
        );
        assert_eq!(task.error.is_some(), attempt.error.is_some(), "{task:#?}");
        // The task's tracestate came with its traceparent: it names the run's root span.
        assert_eq!(
            task.trace_state,
            format!("flotilla=r:{}", root.span_id),
            "{task:#?}"
        );
    }

    // The handler's own span is a child of its task's span, in the run's trace.
    let handler = named("echo.sleep");
    assert_eq!(handler.len(), 1, "{trace:#?}");
    let steady = tasks
        .iter()
        .find(|t| t.attr("flotilla.step.id") == "steady")
        .context("the steady task")?;
    assert_eq!(handler[0].parent_span_id, steady.span_id, "{handler:#?}");
    assert_eq!(handler[0].service, "echo-b");
    assert!(steady.start <= handler[0].start && handler[0].end <= steady.end);

    fleet.stop().await
}

/// A sub-workflow's run is a trace of its own whose root span links to the span of the parent
/// attempt that started it.
#[tokio::test]
async fn a_child_run_s_root_span_links_to_its_parent_attempt() -> anyhow::Result<()> {
    let (fleet, spans) = traced_fleet(&["a"]).await?;
    let registered = fleet
        .http()
        .post(format!("{}/api/definitions", fleet.url()))
        .json(&json!({"yaml": "name: child\nsteps:\n  - {id: work, agent: trace-a, action: build}\n"}))
        .send()
        .await?;
    anyhow::ensure!(registered.status().as_u16() == 201, "{registered:?}");
    let id = fleet
        .execute_yaml(
            "name: parent\nsteps:\n  - {id: call, workflow: child}\n",
            json!({}),
        )
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");
    let child = flotilla_tests::step(&run, "call")
        .child_workflow_id
        .context("the step names its child")?;

    let (parent_trace, child_trace) = (id.simple().to_string(), child.simple().to_string());
    let deadline = Instant::now() + WAIT;
    let (attempt, root) = loop {
        let named =
            |trace: &str, name: &str| spans_of(&spans, trace).into_iter().find(|s| s.name == name);
        if let (Some(attempt), Some(root)) = (
            named(&parent_trace, "step.attempt"),
            named(&child_trace, "workflow.run"),
        ) {
            break (attempt, root);
        }
        if Instant::now() > deadline {
            bail!("the parent's attempt span and the child's root span not both received");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(attempt.attr("flotilla.step.id"), "call");
    assert_eq!(
        root.parent_span_id, "",
        "the child's root starts its own trace"
    );
    assert_eq!(root.links, [(parent_trace, attempt.span_id)]);
    fleet.stop().await
}

#[tokio::test]
async fn a_collector_that_does_not_answer_neither_stops_nor_slows_runs() -> anyhow::Result<()> {
    // Accepts connections (the kernel does, from the backlog) and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", silent.local_addr()?);
    // One span in the queue at most, and each export waits 30 s for its answer.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "30000"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "1"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1"),
    ];
    let mut fleet = env
        .iter()
        .fold(Fleet::new(), |fleet, (k, v)| fleet.coordinator_env(k, v));
    fleet.start_coordinator().await?;
    let launch = env
        .iter()
        .fold(Launch::once(), |launch, (k, v)| launch.env(k, v));
    fleet.start_worker("echo-a", &["trace-a"], 2, launch.clone())?;
    fleet.start_worker("echo-b", &["trace-b"], 2, launch)?;

    let started = Instant::now();
    let id = fleet.execute_yaml(RETRIED_RUN, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success");
    // Far less than one export timeout: no step waited for the collector.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the run took {:?}",
        started.elapsed()
    );

    let http = fleet.http();
    let deadline = Instant::now() + WAIT;
    loop {
        let page = http
            .get(format!("{}/metrics", fleet.url()))
            .send()
            .await?
            .text()
            .await?;
        let dropped = page
            .lines()
            .find_map(|l| l.strip_prefix("orchestrator_spans_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if dropped >= 1.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("no dropped span counted:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(silent);
    fleet.stop().await
}

#[tokio::test]
async fn spans_still_queued_are_exported_at_graceful_shutdown() -> anyhow::Result<()> {
    let (endpoint, spans) = start_receiver().await?;
    // No export on schedule while the fleet runs: only the shutdown's flush sends the spans.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
    ];
    let mut fleet = env
        .iter()
        .fold(Fleet::new(), |fleet, (k, v)| fleet.coordinator_env(k, v));
    fleet.start_coordinator().await?;
    fleet.start_worker("echo-a", &["trace-a"], 2, worker_launch(&env, "echo-a"))?;
    fleet.start_worker("echo-b", &["trace-b"], 2, worker_launch(&env, "echo-b"))?;

    let id = fleet.execute_yaml(RETRIED_RUN, json!({})).await?;
    assert_eq!(fleet.wait_for_end(id, WAIT).await?.status, "success");
    let trace_id = id.simple().to_string();
    assert!(
        spans_of(&spans, &trace_id).is_empty(),
        "exported before shutdown"
    );

    fleet.shutdown().await;
    let processes = [fleet.coordinator(0), fleet.worker(0), fleet.worker(1)];
    for process in processes {
        let exits = process.state().exits;
        assert!(
            exits.len() == 1 && exits[0].success(),
            "{} exited {exits:?}",
            process.name()
        );
    }
    let trace = whole_trace(&spans, &trace_id).await?;
    let mut names: Vec<(&str, &str)> = trace
        .iter()
        .map(|s| (s.service.as_str(), s.name.as_str()))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            ("echo-a", "worker.task"),
            ("echo-a", "worker.task"),
            ("echo-b", "echo.sleep"),
            ("echo-b", "worker.task"),
            ("flotilla-coordinator", "step.attempt"),
            ("flotilla-coordinator", "step.attempt"),
            ("flotilla-coordinator", "step.attempt"),
            ("flotilla-coordinator", "workflow.run"),
        ]
    );
    fleet.cleanup().await
}
