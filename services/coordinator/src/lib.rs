//! The Flotilla coordinator service: wires the store, the engine, the outbox relay, the retry
//! timer, the results and step log consumers, the notify agent and the HTTP API together, and
//! shuts them down in order.

mod access;
mod audit;
mod backend;
pub mod config;
mod events;
mod health;
mod notify;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_broker::BrokerConfig;
use flotilla_core::plan::{NOTIFY_ACTION, NOTIFY_AGENT};
use flotilla_engine::relay::{Relay, RelayConfig};
use flotilla_engine::{Engine, EngineConfig};
use flotilla_store::{Store, StoreConfig};
use flotilla_telemetry::metrics::CoordinatorMetrics;
use flotilla_worker::{Worker, WorkerConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// How often the retry timer looks for retries scheduled by other coordinators.
const TIMER_POLL: Duration = Duration::from_secs(1);

/// Runs the coordinator on `listener` until `shutdown` is cancelled, then drains: the API stops
/// taking requests, results stop being consumed, the engine records what it holds, and the relay
/// publishes what the engine committed.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let breaker = config.breaker()?;
    let registry = config.registry();
    registry.validate().map_err(anyhow::Error::msg)?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(flotilla_api::tls::server_config(cert, key)?),
        _ => None,
    };
    let store = Store::open(&StoreConfig {
        url: config.database_url.clone(),
        pool_size: config.db_pool_size,
        connect_timeout: Duration::from_secs(10),
    })
    .await?;
    access::ensure_admin(&store, &config).await?;
    let broker = BrokerConfig {
        url: config.amqp_url.clone(),
        prefix: config.queue_prefix.clone(),
        delivery_limit: config.delivery_limit,
        ..BrokerConfig::default()
    };
    let names = broker.queue_names();
    let connection = flotilla_broker::connect(&broker, "flotilla-coordinator").await?;
    {
        let channel = connection.open_channel().await?;
        flotilla_broker::declare_topology(
            &channel,
            &names,
            &[NOTIFY_AGENT.to_string()],
            broker.delivery_limit,
        )
        .await?;
        channel.close().await?;
    }

    let metrics = Arc::new(CoordinatorMetrics::new());
    // Its queue is declared above, so its depth is read from the first scrape on.
    metrics.agent_seen(NOTIFY_AGENT);
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let (wake_tx, wake_rx) = mpsc::unbounded_channel();
    let agent_limits = config.agent_limits().map_err(anyhow::Error::msg)?;
    let (engine, handle) = Engine::new(
        store.clone(),
        EngineConfig {
            names: names.clone(),
            max_batch: config.max_batch,
            idempotency_retention: config.idempotency_retention(),
            max_instances: config.max_instances,
            dispatch_window: config.dispatch_window,
            breaker,
            max_workflow_depth: config.max_workflow_depth,
            schedule_to_start: config.schedule_to_start(),
            quotas: config.quotas().map_err(anyhow::Error::msg)?,
            limits: agent_limits.clone(),
            ..EngineConfig::default()
        },
        outbox_tx,
        wake_tx,
    );
    let engine = engine.with_metrics(metrics.clone());
    let relay = Relay::new(
        store.clone(),
        RelayConfig {
            broker: broker.clone(),
            // Another coordinator's relay publishes within milliseconds of its commit; what is
            // still unsent after a few seconds was left by a crash and is taken over quickly.
            sweep_interval: Duration::from_secs(1),
            sweep_after: Duration::from_secs(3),
        },
    );

    // The engine stops after its inputs are drained; everything feeding it stops first.
    let intake = shutdown.child_token();
    let engine_task = tokio::spawn(engine.run(shutdown.clone()));
    let relay_task = tokio::spawn(relay.run(outbox_rx));
    let timer_task = tokio::spawn(flotilla_engine::timer::run(
        store.clone(),
        handle.clone(),
        wake_rx,
        TIMER_POLL,
        agent_limits.clone(),
        intake.clone(),
    ));
    let results_task = {
        let (connection, names, handle, intake) = (
            connection.clone(),
            names.clone(),
            handle.clone(),
            intake.clone(),
        );
        let limits = flotilla_engine::results::Limits {
            prefetch: config.results_prefetch,
            max_output_bytes: config.max_output_bytes,
        };
        tokio::spawn(async move {
            flotilla_engine::results::run(&connection, &names, handle, limits, intake).await
        })
    };
    let heartbeats_task = {
        let (connection, names, store, intake) = (
            connection.clone(),
            names.clone(),
            store.clone(),
            intake.clone(),
        );
        let lease = config.lease_timeout();
        tokio::spawn(async move {
            flotilla_engine::heartbeats::run(&connection, &names, store, lease, registry, intake)
                .await
        })
    };
    let logs_task = {
        let (connection, names, store, intake) = (
            connection.clone(),
            names.clone(),
            store.clone(),
            intake.clone(),
        );
        let max_bytes = config.max_step_log_bytes;
        tokio::spawn(async move {
            flotilla_engine::logs::run(&connection, &names, store, max_bytes, intake).await
        })
    };
    let dead_task = {
        let (connection, names, handle, intake) = (
            connection.clone(),
            names.clone(),
            handle.clone(),
            intake.clone(),
        );
        let limit = config.delivery_limit;
        tokio::spawn(async move {
            flotilla_engine::dead::run(&connection, &names, handle, limit, intake).await
        })
    };
    let schedules_task = tokio::spawn(flotilla_engine::schedules::run(
        store.clone(),
        handle.clone(),
        TIMER_POLL,
        intake.clone(),
    ));
    let housekeeping_task = tokio::spawn(housekeeping(
        store.clone(),
        config.idempotency_retention(),
        intake.clone(),
    ));
    let notify_task = {
        let http = reqwest::Client::builder()
            .build()
            .context("cannot build the HTTP client for notifications")?;
        let worker = Worker::builder(WorkerConfig {
            amqp_url: config.amqp_url.clone(),
            prefix: config.queue_prefix.clone(),
            concurrency: 8,
            worker_id: None,
            shutdown_grace: config.shutdown_grace(),
            ..WorkerConfig::default()
        })
        .agent(NOTIFY_AGENT)
        .action(NOTIFY_ACTION, move |ctx| notify::handle(http.clone(), ctx))
        .delivery_limit(config.delivery_limit)
        .build();
        tokio::spawn(worker.run(intake.clone()))
    };

    let probe = Arc::new(health::CoordinatorProbe::new(
        store.clone(),
        broker.clone(),
        metrics,
    ));
    let changes = events::Changes::new(shutdown.clone());
    let events_task = tokio::spawn(
        changes
            .clone()
            .listen(config.database_url.clone(), intake.clone()),
    );
    let backend = Arc::new(backend::CoordinatorBackend {
        store: store.clone(),
        engine: handle,
        registry,
        probe: probe.clone(),
        audit: access::AuditWriter::start(store.clone()),
        tokens: access::TokenCache::default(),
        changes,
        lease: config.lease_timeout(),
        quotas: config.quotas().map_err(anyhow::Error::msg)?,
        agent_limits: agent_limits.clone(),
        max_instances: config.max_instances,
        definitions: backend::DefinitionCache::default(),
    });
    let limits = flotilla_api::Limits {
        max_body_bytes: config.max_body_bytes,
        max_definition_bytes: config.max_definition_bytes,
        max_steps: config.max_steps,
        max_params_bytes: config.max_params_bytes,
    };
    let guard = access::guard(&config, backend.clone())?;
    let app = flotilla_api::secure(
        flotilla_api::router_with_health(backend, probe, limits),
        guard,
        limits,
    );
    let address = listener.local_addr()?;
    tracing::info!(%address, tls = tls.is_some(), database = %flotilla_core::redact_url(&config.database_url), broker = %broker.redacted_url(), prefix = %names.prefix(), "coordinator ready");
    match &tls {
        Some(tls) => {
            flotilla_api::tls::serve(
                listener,
                tls.clone(),
                app,
                shutdown.clone().cancelled_owned(),
            )
            .await
        }
        None => {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
        }
    }
    .context("the HTTP server failed")?;

    tracing::info!("shutting down");
    intake.cancel();
    let consumer = results_task.await?;
    let dead_consumer = dead_task.await?;
    let _ = timer_task.await;
    let _ = housekeeping_task.await;
    let _ = schedules_task.await;
    let _ = events_task.await;
    if let Err(e) = heartbeats_task.await? {
        tracing::warn!(error = %e, "heartbeat consumer stopped with an error");
    }
    if let Err(e) = logs_task.await? {
        tracing::warn!(error = %e, "step log consumer stopped with an error");
    }
    match notify_task.await? {
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e, "notify agent stopped with an error"),
    }
    engine_task.await?;
    relay_task.await?;
    for (what, consumer) in [("results", consumer), ("dead-letter", dead_consumer)] {
        match consumer {
            Ok(consumer) => {
                let _ = consumer.close().await;
            }
            Err(e) => tracing::warn!(error = %e, "{what} consumer stopped with an error"),
        }
    }
    connection.close().await?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Forgets idempotency keys past their retention, every few minutes.
async fn housekeeping(store: Store, retention: Duration, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(300));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let before = chrono::Utc::now()
            - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let purged = match store.client().await {
            Ok(client) => flotilla_store::idempotency::purge(&client, before).await,
            Err(e) => Err(e),
        };
        match purged {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "forgot expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "could not purge idempotency keys"),
        }
    }
}
