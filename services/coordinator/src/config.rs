//! The coordinator's configuration: defaults, overridden by environment variables, overridden by
//! flags.

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use flotilla_core::breaker::BreakerConfig;

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

    /// Whether agents have circuit breakers (`false` dispatches every step at once).
    #[arg(long, env = "FLOTILLA_BREAKER_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub breaker_enabled: bool,

    /// An agent's breaker opens when more than this share of its recent attempts failed.
    #[arg(long, env = "FLOTILLA_BREAKER_FAILURE_RATE", default_value_t = 0.5)]
    pub breaker_failure_rate: f64,

    /// How many of an agent's latest attempt outcomes its breaker weighs.
    #[arg(long, env = "FLOTILLA_BREAKER_WINDOW", default_value_t = 20)]
    pub breaker_window: usize,

    /// The fewest outcomes in the window before a breaker may open.
    #[arg(long, env = "FLOTILLA_BREAKER_MIN_ATTEMPTS", default_value_t = 10)]
    pub breaker_min_attempts: usize,

    /// How long an open breaker holds its agent's steps before it lets one through as a probe
    /// (`30s`, `5m`).
    #[arg(long, env = "FLOTILLA_BREAKER_COOL_DOWN", default_value = "30s", value_parser = flotilla_core::duration::parse)]
    pub breaker_cool_down: Duration,

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

    pub fn idempotency_retention(&self) -> Duration {
        Duration::from_secs(self.idempotency_retention_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The agents' circuit breakers, `None` when they are off; an error names a setting that
    /// makes no sense.
    pub fn breaker(&self) -> anyhow::Result<Option<BreakerConfig>> {
        if !self.breaker_enabled {
            return Ok(None);
        }
        let breaker = BreakerConfig {
            failure_rate: self.breaker_failure_rate,
            window: self.breaker_window,
            min_attempts: self.breaker_min_attempts,
            cool_down: self.breaker_cool_down,
        };
        breaker.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(breaker))
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
                "FLOTILLA_IDEMPOTENCY_RETENTION_SECS",
                self.idempotency_retention_secs.to_string(),
            ),
            ("FLOTILLA_MAX_INSTANCES", self.max_instances.to_string()),
            ("FLOTILLA_BREAKER_ENABLED", self.breaker_enabled.to_string()),
            (
                "FLOTILLA_BREAKER_FAILURE_RATE",
                self.breaker_failure_rate.to_string(),
            ),
            ("FLOTILLA_BREAKER_WINDOW", self.breaker_window.to_string()),
            (
                "FLOTILLA_BREAKER_MIN_ATTEMPTS",
                self.breaker_min_attempts.to_string(),
            ),
            (
                "FLOTILLA_BREAKER_COOL_DOWN",
                format!("{}ms", self.breaker_cool_down.as_millis()),
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("flotilla-coordinator").chain(args.iter().copied()))
    }

    #[test]
    fn breaker_settings_are_checked_at_start_up_and_can_turn_it_off() {
        let config = |args: &[&str]| parse(args).unwrap().breaker();
        assert_eq!(config(&[]).unwrap(), Some(BreakerConfig::default()));
        assert_eq!(config(&["--breaker-enabled", "false"]).unwrap(), None);
        let breaker = config(&[
            "--breaker-window",
            "4",
            "--breaker-min-attempts",
            "4",
            "--breaker-failure-rate",
            "0.25",
            "--breaker-cool-down",
            "1.5s",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            breaker,
            BreakerConfig {
                failure_rate: 0.25,
                window: 4,
                min_attempts: 4,
                cool_down: Duration::from_millis(1500),
            }
        );
        let error = config(&["--breaker-min-attempts", "30"]).unwrap_err();
        assert!(error.to_string().contains("minimum of attempts"), "{error}");
        let error = parse(&["--breaker-cool-down", "soon"]).unwrap_err();
        assert!(error.to_string().contains("not a duration"), "{error}");
    }
}
