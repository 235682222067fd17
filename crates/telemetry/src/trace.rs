//! OpenTelemetry traces, exported with OTLP over HTTP/protobuf.
//!
//! **One trace per run.** The trace id is the run id (both are 128 bits). The run's root span
//! and each attempt's span get span ids derived from the run id (and step id and attempt), so
//! that whichever coordinator ends an attempt or a run can emit its span, with no span state
//! shared between processes: an attempt span is emitted when the attempt ends (from its
//! dispatch to its end), the root span when the run ends. A task carries the W3C
//! `traceparent` of its attempt span in its AMQP headers, with a `tracestate` naming the run's
//! root span (`flotilla=r:<span id>`), and the worker's `worker.task` span is a child of it
//! that keeps the `tracestate`.
//!
//! Configured by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; without either, tracing is off and costs nothing),
//! `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`.
//! Spans go through a batch processor with a bounded queue: when the collector is slow or
//! down, spans past the queue are dropped rather than waited for, and counted (see
//! [`dropped_spans`]) together with those whose export failed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler,
    SamplingDecision, SdkTracerProvider, ShouldSample, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};

/// Span attribute names, one place for all of them.
pub mod attr {
    /// The run id (also the trace id).
    pub const WORKFLOW_ID: &str = "flotilla.workflow.id";
    /// The workflow definition's name.
    pub const WORKFLOW_NAME: &str = "flotilla.workflow.name";
    pub const STEP_ID: &str = "flotilla.step.id";
    pub const AGENT: &str = "flotilla.agent";
    pub const ACTION: &str = "flotilla.action";
    /// 1 for a step's first attempt.
    pub const ATTEMPT: &str = "flotilla.attempt";
    /// The attempt's fencing token.
    pub const TASK_ID: &str = "flotilla.task.id";
    pub const WORKER_ID: &str = "flotilla.worker.id";
    /// How a run or attempt ended (`success`, `failure`, `cancelled`).
    pub const STATUS: &str = "flotilla.status";
    /// Milliseconds from the dispatch of a task to the start of its run on a worker.
    pub const QUEUE_WAIT_MS: &str = "flotilla.queue_wait_ms";
    /// Whether RabbitMQ delivered the task before.
    pub const REDELIVERED: &str = "flotilla.redelivered";
}

/// The root span of a run, from its creation to its end.
pub const RUN_SPAN: &str = "workflow.run";
/// One attempt of one step, from its dispatch to its end, as the coordinator saw it.
pub const ATTEMPT_SPAN: &str = "step.attempt";
/// A worker running a task; a child of its attempt span.
pub const TASK_SPAN: &str = "worker.task";

/// The AMQP header (and HTTP header) carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The AMQP header (and HTTP header) carrying the W3C vendor trace state, with
/// [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";
/// Flotilla's key in a [`TRACESTATE`]: `r:<span id of the run's root span>`, so that a
/// participant knows the root of the run without deriving it.
const TRACESTATE_KEY: &str = "flotilla";

const INSTRUMENTATION: &str = "flotilla";

/// `OTEL_BSP_MAX_QUEUE_SIZE` of the OpenTelemetry SDK, which also bounds our queue count.
const MAX_QUEUE_ENV: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
const DEFAULT_MAX_QUEUE: usize = 2048;

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{variable}={value:?} is not valid: {reason}")]
    Config {
        variable: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The tracer provider of the process, when tracing is on. Shut it down at the end of `main` so
/// that the spans still queued are exported.
#[must_use = "dropping it leaves queued spans unexported; call shutdown"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// The layer that turns `tracing` spans into OpenTelemetry spans; `None` when off.
    pub(crate) fn layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S> + use<S>>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let tracer = self.provider.as_ref()?.tracer(INSTRUMENTATION);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    }

    /// Exports what is queued, waiting at most `timeout` (the collector may be down).
    pub fn shutdown(self, timeout: Duration) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(timeout)
        {
            tracing::warn!(%error, "spans not all exported at shutdown");
        }
    }
}

/// Whether traces are exported: set by [`init`], which a process calls once.
static SAMPLER: OnceLock<Sampler> = OnceLock::new();

/// Spans dropped: past the queue bound, or in a batch whose export failed.
static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Spans handed to the batch processor and not yet through an export.
static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// The process-wide count of spans dropped, registered by the metrics of coordinators and
/// workers (`orchestrator_spans_dropped_total`).
pub fn dropped_spans() -> Counter {
    DROPPED.clone()
}

/// Starts tracing if an OTLP endpoint is configured; `default_service` names the process
/// unless `OTEL_SERVICE_NAME` does.
pub fn init(default_service: &str) -> Result<Tracing, Error> {
    let configured = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !configured("OTEL_EXPORTER_OTLP_ENDPOINT")
        && !configured("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    {
        return Ok(Tracing { provider: None });
    }
    let sampler = sampler_from_env(
        std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
        std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
    )?;
    let max_queue = match std::env::var(MAX_QUEUE_ENV) {
        Ok(value) => value.parse().ok().filter(|&n| n > 0).ok_or(Error::Config {
            variable: MAX_QUEUE_ENV,
            value,
            reason: "expected a positive number of spans",
        })?,
        Err(_) => DEFAULT_MAX_QUEUE,
    };
    // The HTTP client of the exporter uses rustls, built without a provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let batch = BatchSpanProcessor::builder(Counted(exporter))
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(max_queue)
                .build(),
        )
        .build();
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| default_service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Bounded {
            inner: batch,
            max_queue,
        })
        .with_sampler(sampler.clone())
        .with_id_generator(PresetIds)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = SAMPLER.set(sampler);
    Ok(Tracing {
        provider: Some(provider),
    })
}

/// The sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` name, by the names of the
/// OpenTelemetry specification; `parentbased_always_on` when unset.
fn sampler_from_env(name: Option<&str>, arg: Option<&str>) -> Result<Sampler, Error> {
    let ratio = || -> Result<f64, Error> {
        let Some(arg) = arg else { return Ok(1.0) };
        arg.trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or(Error::Config {
                variable: "OTEL_TRACES_SAMPLER_ARG",
                value: arg.to_owned(),
                reason: "expected a ratio between 0 and 1",
            })
    };
    let parent_based = |root| Sampler::ParentBased(Box::new(root));
    Ok(
        match name.map(str::trim).unwrap_or("parentbased_always_on") {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
            "parentbased_always_on" => parent_based(Sampler::AlwaysOn),
            "parentbased_always_off" => parent_based(Sampler::AlwaysOff),
            "parentbased_traceidratio" => parent_based(Sampler::TraceIdRatioBased(ratio()?)),
            other => {
                return Err(Error::Config {
                    variable: "OTEL_TRACES_SAMPLER",
                    value: other.to_owned(),
                    reason: "expected always_on, always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off or parentbased_traceidratio",
                });
            }
        },
    )
}

/// Whether the run `run_id` is traced: the configured sampler's decision for its root span,
/// which depends on the trace id only, so every process takes the same one.
fn run_sampled(sampler: &Sampler, run_id: u128) -> bool {
    let decision = sampler
        .should_sample(
            None,
            TraceId::from(run_id),
            RUN_SPAN,
            &SpanKind::Internal,
            &[],
            &[],
        )
        .decision;
    decision == SamplingDecision::RecordAndSample
}

/// Whether this process exports traces.
pub fn enabled() -> bool {
    SAMPLER.get().is_some()
}

/// A span id derived from `parts`: stable across processes and releases, never the invalid 0.
fn derived_span_id(parts: &[&[u8]]) -> SpanId {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&digest[..8]);
    if bytes == [0; 8] {
        bytes[7] = 1;
    }
    SpanId::from_bytes(bytes)
}

fn run_span_id(run_id: u128) -> SpanId {
    derived_span_id(&[b"run", &run_id.to_be_bytes()])
}

fn attempt_span_id(run_id: u128, step_id: &str, attempt: u32) -> SpanId {
    derived_span_id(&[
        b"attempt",
        &run_id.to_be_bytes(),
        step_id.as_bytes(),
        &attempt.to_be_bytes(),
    ])
}

fn flags(sampled: bool) -> TraceFlags {
    if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::NOT_SAMPLED
    }
}

/// The W3C `traceparent` of an attempt's span, for the headers of its task; `None` when
/// tracing is off.
pub fn attempt_traceparent(run_id: u128, step_id: &str, attempt: u32) -> Option<String> {
    let sampler = SAMPLER.get()?;
    Some(format!(
        "00-{}-{}-{}",
        TraceId::from(run_id),
        attempt_span_id(run_id, step_id, attempt),
        if run_sampled(sampler, run_id) {
            "01"
        } else {
            "00"
        }
    ))
}

/// The trace id of a run, as a `trace_id` field of its log lines and as Jaeger shows it: the
/// run id's 32 hex digits.
pub fn trace_id_of(run_id: u128) -> String {
    TraceId::from(run_id).to_string()
}

/// The W3C `tracestate` that goes with [`attempt_traceparent`]; `None` when tracing is off.
pub fn attempt_tracestate(run_id: u128) -> Option<String> {
    SAMPLER.get()?;
    Some(run_tracestate(run_id))
}

fn run_tracestate(run_id: u128) -> String {
    format!("{TRACESTATE_KEY}=r:{}", run_span_id(run_id))
}

/// How an attempt ended, for its span.
#[derive(Debug)]
pub struct AttemptEnd<'a> {
    pub run_id: u128,
    pub step_id: &'a str,
    pub agent: &'a str,
    pub attempt: u32,
    pub task_id: u128,
    pub dispatched_at: SystemTime,
    pub ended_at: SystemTime,
    /// The worker's id; empty when the coordinator ended the attempt (lease, timeout).
    pub worker: &'a str,
    /// `None` for a success.
    pub error: Option<&'a str>,
}

/// Emits the span of an attempt that ended, a child of its run's root span.
pub fn attempt_ended(end: &AttemptEnd<'_>) {
    let Some(sampler) = SAMPLER.get() else { return };
    let sampled = run_sampled(sampler, end.run_id);
    let root = SpanContext::new(
        TraceId::from(end.run_id),
        run_span_id(end.run_id),
        flags(sampled),
        true,
        TraceState::default(),
    );
    let mut attributes = vec![
        KeyValue::new(attr::WORKFLOW_ID, uuid_text(end.run_id)),
        KeyValue::new(attr::STEP_ID, end.step_id.to_owned()),
        KeyValue::new(attr::AGENT, end.agent.to_owned()),
        KeyValue::new(attr::ATTEMPT, i64::from(end.attempt)),
        KeyValue::new(attr::TASK_ID, uuid_text(end.task_id)),
        KeyValue::new(
            attr::STATUS,
            if end.error.is_none() {
                "success"
            } else {
                "failure"
            },
        ),
    ];
    if !end.worker.is_empty() {
        attributes.push(KeyValue::new(attr::WORKER_ID, end.worker.to_owned()));
    }
    let status = end
        .error
        .map_or(Status::Ok, |message| Status::error(message.to_owned()));
    emit(
        Context::new().with_remote_span_context(root),
        attempt_span_id(end.run_id, end.step_id, end.attempt),
        ATTEMPT_SPAN,
        attributes,
        Vec::new(),
        status,
        end.dispatched_at..end.ended_at,
    );
}

/// The attempt of a sub-workflow step that started a run: (its run id, step id, attempt).
pub type ParentAttempt<'a> = (u128, &'a str, u32);

/// Emits the root span of a run that ended; a sub-workflow's root span links to the span of the
/// attempt that started it (in its parent's trace), as each run keeps its own trace.
pub fn run_ended(
    run_id: u128,
    workflow: &str,
    status: &str,
    created_at: SystemTime,
    ended_at: SystemTime,
    parent: Option<ParentAttempt<'_>>,
) {
    let Some(sampler) = SAMPLER.get() else {
        return;
    };
    let links = parent
        .map(|(run_id, step_id, attempt)| {
            Link::with_context(SpanContext::new(
                TraceId::from(run_id),
                attempt_span_id(run_id, step_id, attempt),
                flags(run_sampled(sampler, run_id)),
                true,
                TraceState::default(),
            ))
        })
        .into_iter()
        .collect();
    let attributes = vec![
        KeyValue::new(attr::WORKFLOW_ID, uuid_text(run_id)),
        KeyValue::new(attr::WORKFLOW_NAME, workflow.to_owned()),
        KeyValue::new(attr::STATUS, status.to_owned()),
    ];
    let span_status = if status == "success" {
        Status::Ok
    } else {
        Status::error(format!("run ended in {status}"))
    };
    PRESET_TRACE.with(|t| t.set(Some(TraceId::from(run_id))));
    emit(
        Context::new(),
        run_span_id(run_id),
        RUN_SPAN,
        attributes,
        links,
        span_status,
        created_at..ended_at,
    );
}

fn emit(
    parent: Context,
    span_id: SpanId,
    name: &'static str,
    attributes: Vec<KeyValue>,
    links: Vec<Link>,
    status: Status,
    std::ops::Range { start, end }: std::ops::Range<SystemTime>,
) {
    use opentelemetry::trace::Span as _;

    let tracer = opentelemetry::global::tracer(INSTRUMENTATION);
    let builder = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .with_links(links);
    PRESET_SPAN.with(|s| s.set(Some(span_id)));
    let mut span = tracer.build_with_context(builder, &parent);
    // Unused when the span was not sampled: not to leak into the next span of this thread.
    PRESET_SPAN.with(|s| s.set(None));
    PRESET_TRACE.with(|t| t.set(None));
    span.set_status(status);
    span.end_with_timestamp(end.max(start));
}

/// A run id in the hyphenated form the API and logs use.
fn uuid_text(id: u128) -> String {
    let h = format!("{id:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

thread_local! {
    /// The ids the next span built on this thread takes, set just before building it: the SDK
    /// takes span and trace ids from its id generator only.
    static PRESET_SPAN: Cell<Option<SpanId>> = const { Cell::new(None) };
    static PRESET_TRACE: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Random ids, unless [`emit`] preset the next ones.
#[derive(Debug)]
struct PresetIds;

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        PRESET_TRACE
            .with(Cell::take)
            .unwrap_or_else(|| RandomIdGenerator::default().new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        PRESET_SPAN
            .with(Cell::take)
            .unwrap_or_else(|| RandomIdGenerator::default().new_span_id())
    }
}

/// Counts the spans of failed exports as dropped, and those exported out of the queue.
#[derive(Debug)]
struct Counted<E>(E);

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.0.export(batch).await;
        QUEUED.fetch_sub(spans, Ordering::Relaxed);
        if result.is_err() {
            DROPPED.inc_by(spans as u64);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// Drops (and counts) a span rather than hand the batch processor more than its queue holds,
/// whose own drops cannot be counted from outside.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    max_queue: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if QUEUED.fetch_add(1, Ordering::Relaxed) >= self.max_queue {
            QUEUED.fetch_sub(1, Ordering::Relaxed);
            DROPPED.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// What a worker knows of a task as it starts it.
#[derive(Debug)]
pub struct TaskStart<'a> {
    pub run_id: u128,
    pub step_id: &'a str,
    pub agent: &'a str,
    pub action: &'a str,
    pub attempt: u32,
    pub worker_id: &'a str,
    pub redelivered: bool,
    /// From the dispatch to now; `None` when the clocks of coordinator and worker disagree.
    pub queue_wait: Option<Duration>,
}

/// Makes `span` (a worker's [`TASK_SPAN`]) a child of the attempt span whose W3C
/// `traceparent` (and `tracestate`, which the span keeps) is in the task's `headers`, and
/// gives it the task's attributes.
pub fn task_started(
    span: &tracing::Span,
    headers: &BTreeMap<String, String>,
    task: &TaskStart<'_>,
) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    if !enabled() {
        return;
    }
    let state = headers.get(TRACESTATE).map(String::as_str);
    if let Some(parent) = headers
        .get(TRACEPARENT)
        .and_then(|t| parse_trace_context(t, state))
    {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
    span.set_attribute(attr::WORKFLOW_ID, uuid_text(task.run_id));
    span.set_attribute(attr::STEP_ID, task.step_id.to_owned());
    span.set_attribute(attr::AGENT, task.agent.to_owned());
    span.set_attribute(attr::ACTION, task.action.to_owned());
    span.set_attribute(attr::ATTEMPT, i64::from(task.attempt));
    span.set_attribute(attr::WORKER_ID, task.worker_id.to_owned());
    span.set_attribute(attr::REDELIVERED, task.redelivered);
    if let Some(wait) = task.queue_wait {
        span.set_attribute(
            attr::QUEUE_WAIT_MS,
            i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
        );
    }
}

/// Marks a worker's task span as failed.
pub fn task_failed(span: &tracing::Span, message: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    if enabled() {
        span.set_status(Status::error(message.to_owned()));
    }
}

/// The W3C `traceparent` of `span`, for the headers of a request made on its behalf so that
/// the callee joins the trace; `None` when tracing is off.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let context = span.context();
    let sc = context.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The W3C `tracestate` of `span`, sent with [`traceparent_of`]; `None` when it has none.
pub fn tracestate_of(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let context = span.context();
    let header = context.span().span_context().trace_state().header();
    (!header.is_empty()).then_some(header)
}

/// Reads a W3C `traceparent` (version 00) and its `tracestate` (an unreadable one is dropped,
/// as the specification asks); `None` when the `traceparent` is malformed.
fn parse_trace_context(value: &str, state: Option<&str>) -> Option<SpanContext> {
    let state = state
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
    context.is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let run = 0x0193_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_4a5b_u128;
        assert_eq!(run_span_id(run), run_span_id(run));
        assert_eq!(attempt_span_id(run, "a", 1), attempt_span_id(run, "a", 1));
        assert_ne!(attempt_span_id(run, "a", 1), attempt_span_id(run, "a", 2));
        assert_ne!(attempt_span_id(run, "a", 1), attempt_span_id(run, "b", 1));
        assert_ne!(attempt_span_id(run, "a", 1), run_span_id(run));
        // Length-prefixed parts: ("ab", "") and ("a", "b") differ.
        assert_ne!(
            derived_span_id(&[b"ab", b""]),
            derived_span_id(&[b"a", b"b"])
        );
    }

    #[test]
    fn tracestate_travels_with_the_traceparent() {
        let run = 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128;
        let state = run_tracestate(run);
        assert_eq!(state, format!("flotilla=r:{}", run_span_id(run)));
        let parsed = parse_trace_context(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some(&format!("{state},other=x")),
        )
        .unwrap();
        assert_eq!(
            parsed.trace_state().get("flotilla"),
            Some(format!("r:{}", run_span_id(run)).as_str())
        );
        assert_eq!(parsed.trace_state().header(), format!("{state},other=x"));
        // An unreadable tracestate is dropped; the traceparent still counts.
        let parsed = parse_trace_context(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("not a list entry"),
        )
        .unwrap();
        assert_eq!(parsed.trace_state().header(), "");
    }

    #[test]
    fn traceparent_round_trips() {
        let parsed = parse_trace_context(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            None,
        )
        .unwrap();
        assert_eq!(
            parsed.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(parsed.span_id().to_string(), "b7ad6b7169203331");
        assert!(parsed.is_sampled() && parsed.is_remote());
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
        ] {
            assert!(parse_trace_context(bad, None).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sampler_names_follow_the_specification() {
        assert!(matches!(
            sampler_from_env(None, None).unwrap(),
            Sampler::ParentBased(_)
        ));
        assert!(matches!(
            sampler_from_env(Some("traceidratio"), Some("0.25")).unwrap(),
            Sampler::TraceIdRatioBased(r) if r == 0.25
        ));
        let error = sampler_from_env(Some("sometimes"), None).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("OTEL_TRACES_SAMPLER=\"sometimes\"")
        );
        let error = sampler_from_env(Some("traceidratio"), Some("2")).unwrap_err();
        assert!(error.to_string().contains("OTEL_TRACES_SAMPLER_ARG"));
    }

    #[test]
    fn sampling_of_a_run_depends_on_its_id_only() {
        let half = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.5)));
        let sampled = (0..200u128)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834))
            .filter(|&run| run_sampled(&half, run))
            .count();
        assert!((50..150).contains(&sampled), "{sampled} of 200 sampled");
        let run = 42u128 << 70;
        assert_eq!(run_sampled(&half, run), run_sampled(&half, run));
        assert!(run_sampled(&Sampler::AlwaysOn, run));
        assert!(!run_sampled(&Sampler::AlwaysOff, run));
    }

    #[test]
    fn uuid_text_is_hyphenated() {
        assert_eq!(
            uuid_text(0x0193_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_4a5b),
            "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
        );
    }
}
