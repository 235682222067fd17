//! The coordinator's configuration: defaults, overridden by environment variables, overridden by
//! flags.

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use flotilla_core::registry::RegistryPolicy;

/// Configuration of `flotilla-coordinator`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "flotilla-coordinator",
    version,
    about = "The Flotilla coordinator: HTTP API, scheduler and outbox relay"
)]
pub struct Config {
    /// Postgres URL; the database is created if it does not exist.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/flotilla"
    )]
    pub database_url: String,

    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = flotilla_broker::DEFAULT_URL)]
    pub amqp_url: String,

    /// HTTP port of the API.
    #[arg(long, env = "PORT", default_value_t = 3020)]
    pub port: u16,

    /// Address the API listens on; loopback unless told otherwise.
    #[arg(long, env = "FLOTILLA_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Prefix of every queue name; fleets sharing a broker use different prefixes.
    #[arg(long, env = "FLOTILLA_QUEUE_PREFIX", default_value = "flotilla")]
    pub queue_prefix: String,

    /// Postgres connections in the pool.
    #[arg(long, env = "FLOTILLA_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,

    /// Most inputs (results, submissions, retries) recorded in one transaction.
    #[arg(long, env = "FLOTILLA_MAX_BATCH", default_value_t = 512)]
    pub max_batch: usize,

    /// Unacknowledged results the coordinator may hold at once.
    #[arg(long, env = "FLOTILLA_RESULTS_PREFETCH", default_value_t = 1000)]
    pub results_prefetch: u16,

    /// Deliveries of a task before RabbitMQ dead-letters it.
    #[arg(long, env = "FLOTILLA_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// Milliseconds a running attempt stays leased to its worker without a heartbeat; past that
    /// it is re-dispatched as a new attempt. Workers heartbeat every 5 s.
    #[arg(long, env = "FLOTILLA_LEASE_TIMEOUT_MS", default_value_t = 15_000)]
    pub lease_timeout_ms: u64,

    /// Milliseconds without a heartbeat after which a worker of the registry shows as
    /// unhealthy (`flotilla agents`).
    #[arg(
        long,
        env = "FLOTILLA_WORKER_UNHEALTHY_AFTER_MS",
        default_value_t = 15_000
    )]
    pub worker_unhealthy_after_ms: u64,

    /// Milliseconds without a heartbeat after which the registry forgets a worker (one that
    /// stops gracefully is forgotten at once).
    #[arg(
        long,
        env = "FLOTILLA_WORKER_FORGET_AFTER_MS",
        default_value_t = 300_000
    )]
    pub worker_forget_after_ms: u64,

    /// Milliseconds a dispatched attempt may wait for a worker to start it before it fails
    /// (and is retried by its step's policy), for steps without `schedule_to_start`
    /// [default: no limit]
    #[arg(long, env = "FLOTILLA_SCHEDULE_TO_START_MS")]
    pub schedule_to_start_ms: Option<u64>,

    /// Seconds a repeated `Idempotency-Key` answers the run its first submission started.
    #[arg(
        long,
        env = "FLOTILLA_IDEMPOTENCY_RETENTION_SECS",
        default_value_t = 86_400
    )]
    pub idempotency_retention_secs: u64,

    /// The most instances one `for_each` step may expand to; a longer list fails the step.
    #[arg(long, env = "FLOTILLA_MAX_INSTANCES", default_value_t = flotilla_core::scheduler::DEFAULT_MAX_INSTANCES)]
    pub max_instances: usize,

    /// Largest request body the API accepts, in bytes.
    #[arg(long, env = "FLOTILLA_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Seconds a shutdown waits for work in progress.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Print the effective configuration (passwords hidden) and exit.
    #[arg(long)]
    pub dump_config: bool,
}

impl Config {
    pub fn lease_timeout(&self) -> Duration {
        Duration::from_millis(self.lease_timeout_ms)
    }

    pub fn registry(&self) -> RegistryPolicy {
        RegistryPolicy {
            unhealthy_after: Duration::from_millis(self.worker_unhealthy_after_ms),
            forget_after: Duration::from_millis(self.worker_forget_after_ms),
        }
    }

    pub fn schedule_to_start(&self) -> Option<Duration> {
        self.schedule_to_start_ms.map(Duration::from_millis)
    }

    pub fn idempotency_retention(&self) -> Duration {
        Duration::from_secs(self.idempotency_retention_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The effective configuration as `KEY=value` lines, passwords hidden.
    pub fn dump(&self) -> String {
        [
            (
                "DATABASE_URL",
                flotilla_core::redact_url(&self.database_url),
            ),
            ("AMQP_URL", flotilla_core::redact_url(&self.amqp_url)),
            ("PORT", self.port.to_string()),
            ("FLOTILLA_BIND", self.bind.to_string()),
            ("FLOTILLA_QUEUE_PREFIX", self.queue_prefix.clone()),
            ("FLOTILLA_DB_POOL_SIZE", self.db_pool_size.to_string()),
            ("FLOTILLA_MAX_BATCH", self.max_batch.to_string()),
            (
                "FLOTILLA_RESULTS_PREFETCH",
                self.results_prefetch.to_string(),
            ),
            ("FLOTILLA_DELIVERY_LIMIT", self.delivery_limit.to_string()),
            (
                "FLOTILLA_LEASE_TIMEOUT_MS",
                self.lease_timeout_ms.to_string(),
            ),
            (
                "FLOTILLA_WORKER_UNHEALTHY_AFTER_MS",
                self.worker_unhealthy_after_ms.to_string(),
            ),
            (
                "FLOTILLA_WORKER_FORGET_AFTER_MS",
                self.worker_forget_after_ms.to_string(),
            ),
            (
                "FLOTILLA_SCHEDULE_TO_START_MS",
                self.schedule_to_start_ms
                    .map_or_else(|| "off".to_owned(), |ms| ms.to_string()),
            ),
            (
                "FLOTILLA_IDEMPOTENCY_RETENTION_SECS",
                self.idempotency_retention_secs.to_string(),
            ),
            ("FLOTILLA_MAX_INSTANCES", self.max_instances.to_string()),
            ("FLOTILLA_MAX_BODY_BYTES", self.max_body_bytes.to_string()),
            (
                "FLOTILLA_SHUTDOWN_GRACE_SECS",
                self.shutdown_grace_secs.to_string(),
            ),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect()
    }
}
