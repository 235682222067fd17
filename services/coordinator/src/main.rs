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
    flotilla_telemetry::init_logging();
    // One process-wide TLS provider for outgoing HTTPS (webhooks).
    let _ = rustls::crypto::ring::default_provider().install_default();

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
    match flotilla_coordinator::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
