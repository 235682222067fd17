//! Logging set-up shared by every Flotilla binary.
//!
//! `RUST_LOG` filters (default `info`); `FLOTILLA_LOG_FORMAT=json` writes one JSON object per
//! line for log collectors, anything else a human-readable line. Logs go to standard error so
//! that a binary's standard output stays for its results.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("FLOTILLA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).with_current_span(false).init();
    } else {
        builder.init();
    }
}
