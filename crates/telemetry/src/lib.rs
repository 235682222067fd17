//! Set-up shared by every Flotilla binary: logging, metrics ([`metrics`]), traces ([`trace`])
//! and the shutdown signals.
//!
//! `RUST_LOG` filters (default `info`); `FLOTILLA_LOG_FORMAT=json` writes one JSON object per
//! line for log collectors, anything else a human-readable line. Logs go to standard error so
//! that a binary's standard output stays for its results.

pub mod metrics;
pub mod trace;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Installs the global subscriber: logs, and traces when an OTLP endpoint is configured (see
/// [`trace`]). Call once, first thing in `main`, and shut the result down at the end.
pub fn init(default_service: &str) -> Result<trace::Tracing, trace::Error> {
    let tracing = trace::init(default_service)?;
    // Filtered apart: `RUST_LOG` quietening the logs must not take spans out of traces.
    tracing_subscriber::registry()
        .with(log_layer().with_filter(filter()))
        .with(
            tracing
                .layer()
                .map(|layer| layer.with_filter(LevelFilter::INFO)),
        )
        .init();
    Ok(tracing)
}

/// Installs the global subscriber for logs only, for short-lived tools.
pub fn init_logging() {
    tracing_subscriber::registry()
        .with(log_layer())
        .with(filter())
        .init();
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

fn log_layer<S>() -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let json = std::env::var("FLOTILLA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed()
    } else {
        layer.boxed()
    }
}

/// The first SIGTERM or Ctrl-C cancels `shutdown` (drain, then exit 0); a second one exits at
/// once with 130, leaving work in progress to be redelivered.
pub fn shutdown_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!(
            "shutdown requested; finishing work in progress, signal again to exit at once"
        );
        shutdown.cancel();
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::warn!("second signal; exiting now");
        std::process::exit(130);
    });
    Ok(())
}

/// Fault injection for the fault-injection tests: `FLOTILLA_FAILPOINTS=name=N[,name=N…]` makes
/// the N-th pass through the failpoint `name` abort the process on the spot, as `kill -9` would,
/// at a moment no signal can hit reliably. Without the variable a failpoint costs one atomic
/// load.
pub fn failpoint(name: &str) {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static POINTS: OnceLock<HashMap<String, (u64, AtomicU64)>> = OnceLock::new();
    let points = POINTS.get_or_init(|| {
        std::env::var("FLOTILLA_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|spec| {
                let (point, n) = spec.trim().split_once('=')?;
                Some((point.to_string(), (n.parse().ok()?, AtomicU64::new(0))))
            })
            .collect()
    });
    if let Some((at, seen)) = points.get(name)
        && seen.fetch_add(1, Ordering::Relaxed) + 1 == *at
    {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}
