use std::process::ExitCode;

use clap::Parser;
use flotilla_coordinator::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if config.dump_config {
        print!("{}", config.dump());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = config.check() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // One process-wide TLS provider for outgoing HTTPS (webhooks, OTLP).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tracing = match flotilla_telemetry::init("flotilla-coordinator") {
        Ok(tracing) => tracing,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };

    let address = (config.bind, config.port);
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error: cannot listen on {}:{}: {e} (set PORT or --port to use another port)",
                config.bind, config.port
            );
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    if let Err(e) = flotilla_telemetry::shutdown_on_signals(shutdown.clone()) {
        eprintln!("error: cannot watch for shutdown signals: {e}");
        return ExitCode::from(2);
    }
    let code = match flotilla_coordinator::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    tracing.shutdown(TRACES_FLUSH_TIMEOUT);
    code
}

/// How long the spans still queued at shutdown may take to export.
const TRACES_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
