//! Set-up shared by every Flotilla binary: logging, metrics ([`metrics`]) and the shutdown
//! signals.
//!
//! `RUST_LOG` filters (default `info`); `FLOTILLA_LOG_FORMAT=json` writes one JSON object per
//! line for log collectors, anything else a human-readable line. Logs go to standard error so
//! that a binary's standard output stays for its results.

pub mod metrics;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("FLOTILLA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
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
