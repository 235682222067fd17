//! The worker's health and metrics routes (see [`WorkerBuilder::serve_health`]):
//! `/health/live`, `/health/ready` (connected to RabbitMQ and consuming) and `/metrics`.
//!
//! [`WorkerBuilder::serve_health`]: crate::WorkerBuilder::serve_health

use std::net::SocketAddr;
use std::sync::Arc;

use flotilla_api::Probe;
use flotilla_api_model::HealthCheck;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Error;
use crate::worker::Shared;

/// What the worker's readiness is made of.
pub(crate) struct WorkerProbe {
    pub(crate) shared: Arc<Shared>,
    /// Cancelled once the worker stops taking tasks.
    pub(crate) shutdown: CancellationToken,
    pub(crate) agents: usize,
}

impl Probe for WorkerProbe {
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    async fn checks(&self) -> Vec<HealthCheck> {
        let check = if self.shutdown.is_cancelled() {
            HealthCheck::failing("rabbitmq", "shutting down: no longer taking tasks")
        } else if self.shared.consuming() {
            HealthCheck::ok(
                "rabbitmq",
                format!("connected, consuming the queues of {} agents", self.agents),
            )
        } else {
            HealthCheck::failing("rabbitmq", "not connected: reconnecting to RabbitMQ")
        };
        vec![check]
    }

    async fn metrics(&self) -> String {
        self.shared.metrics.render()
    }
}

/// Binds the health server's address, so that a port in use stops the worker before it
/// connects.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Health { addr, source })
}

/// Serves the routes of `probe` on `listener` until `stop`.
pub(crate) fn serve(
    listener: TcpListener,
    probe: WorkerProbe,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let router = flotilla_api::health_router(Arc::new(probe));
    tokio::spawn(async move {
        if let Ok(address) = listener.local_addr() {
            info!(%address, "serving health and metrics");
        }
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            warn!(%error, "the health and metrics server stopped");
        }
    })
}
