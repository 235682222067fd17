//! The coordinator's configuration: defaults, overridden by environment variables, overridden by
//! flags.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flotilla_api_model::check_namespace;
use flotilla_core::breaker::BreakerConfig;
use flotilla_core::limits::AgentLimits;
use flotilla_core::quota::Quotas;

/// The shortest `FLOTILLA_ADMIN_TOKEN` accepted, so that a placeholder left in a deployment
/// (`CHANGE-ME`) stops the start instead of becoming the admin's password.
const MIN_ADMIN_TOKEN_CHARS: usize = 32;
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

    /// Bytes of log lines kept per step attempt; past it, the attempt's later lines are
    /// dropped and its log is marked truncated.
    #[arg(long, env = "FLOTILLA_MAX_STEP_LOG_BYTES", default_value_t = 1_048_576)]
    pub max_step_log_bytes: u64,

    /// Bytes of JSON a step's output may take; a result with a larger output fails its attempt
    /// (retried as the step's policy says).
    #[arg(long, env = "FLOTILLA_MAX_OUTPUT_BYTES", default_value_t = 1_048_576)]
    pub max_output_bytes: usize,

    /// The most instances one `for_each` step may expand to; a longer list fails the step.
    #[arg(long, env = "FLOTILLA_MAX_INSTANCES", default_value_t = flotilla_core::scheduler::DEFAULT_MAX_INSTANCES)]
    pub max_instances: usize,

    /// The most attempts one run has outstanding; steps that become ready beyond it wait for
    /// earlier attempts to end.
    #[arg(long, env = "FLOTILLA_DISPATCH_WINDOW", default_value_t = flotilla_core::scheduler::DEFAULT_DISPATCH_WINDOW, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub dispatch_window: usize,

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

    /// How deep sub-workflows may nest; a step that would start a run deeper fails.
    #[arg(long, env = "FLOTILLA_MAX_WORKFLOW_DEPTH", default_value_t = flotilla_core::scheduler::DEFAULT_MAX_WORKFLOW_DEPTH)]
    pub max_workflow_depth: u32,

    /// Largest request body the API accepts, in bytes.
    #[arg(long, env = "FLOTILLA_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest definition a request may give (its YAML or JSON), in bytes.
    #[arg(long, env = "FLOTILLA_MAX_DEFINITION_BYTES", default_value_t = 1024 * 1024)]
    pub max_definition_bytes: usize,

    /// Most steps a definition may have (`on_failure` handlers included).
    #[arg(long, env = "FLOTILLA_MAX_STEPS", default_value_t = 10_000)]
    pub max_steps: usize,

    /// Largest `params` of a run request, as JSON, in bytes.
    #[arg(long, env = "FLOTILLA_MAX_PARAMS_BYTES", default_value_t = 256 * 1024)]
    pub max_params_bytes: usize,

    /// Seconds a shutdown waits for work in progress.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Serve the API to anyone, without credentials, as `anonymous` with every scope: for local
    /// experiments only, so the API must listen on a loopback address.
    #[arg(long, env = "FLOTILLA_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// An API token with scope `admin` to create at start (if no token of that value exists),
    /// instead of the one generated and printed at a first start.
    #[arg(long, env = "FLOTILLA_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Accept JWTs signed with HS256 by this secret (at least 32 bytes).
    #[arg(long, env = "FLOTILLA_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,

    /// Accept JWTs signed with RS256 by the keys of these PEM public key files
    /// (comma-separated).
    #[arg(long, env = "FLOTILLA_JWT_RS256_KEYS", value_delimiter = ',')]
    pub jwt_rs256_keys: Vec<PathBuf>,

    /// Accept JWTs signed with ES256 (P-256) by the keys of these PEM public key files
    /// (comma-separated).
    #[arg(long, env = "FLOTILLA_JWT_ES256_KEYS", value_delimiter = ',')]
    pub jwt_es256_keys: Vec<PathBuf>,

    /// The `iss` every JWT must have; needed when JWT keys are configured.
    #[arg(long, env = "FLOTILLA_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// The `aud` every JWT must have; needed when JWT keys are configured.
    #[arg(long, env = "FLOTILLA_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Require a credential (scope `read`) for `/metrics` too.
    #[arg(long, env = "FLOTILLA_PROTECT_METRICS")]
    pub protect_metrics: bool,

    /// Take the client's address for the audit log from the last `X-Forwarded-For` entry: only
    /// behind a proxy that sets it.
    #[arg(long, env = "FLOTILLA_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,

    /// Serve the API over TLS with this PEM certificate chain (the server's certificate first);
    /// needs FLOTILLA_TLS_KEY.
    #[arg(long, env = "FLOTILLA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The PEM private key of FLOTILLA_TLS_CERT.
    #[arg(long, env = "FLOTILLA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Quotas per namespace, `;`-separated entries `namespace:key=value,…` with keys `runs`
    /// (runs in flight), `steps` (steps per run, `for_each` instances included) and `rps` (API
    /// requests per second, counted per coordinator); `*` is every namespace without an entry
    /// of its own, e.g. `*:runs=100,rps=50;team-a:runs=5` [default: no quota]
    #[arg(long, env = "FLOTILLA_QUOTAS", default_value = "")]
    pub quotas: String,

    /// Limits per agent, across all its workers: `;`-separated entries `agent=key:value,…`
    /// with keys `max_concurrency` (attempts running at once) and `rate_limit` (dispatches per
    /// second, minute or hour: `100/s`, `30/m`, `500/h`), e.g.
    /// `echo=max_concurrency:4,rate_limit:100/s;http=rate_limit:30/m`. Every coordinator of a
    /// fleet must be given the same [default: no limit]
    #[arg(long, env = "FLOTILLA_AGENT_LIMITS", default_value = "")]
    pub agent_limits: String,

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

    /// The namespaces' quotas; an error names what cannot be read.
    pub fn quotas(&self) -> Result<Quotas, String> {
        let quotas = Quotas::parse(&self.quotas).map_err(|e| format!("FLOTILLA_QUOTAS: {e}"))?;
        for namespace in quotas.named() {
            check_namespace(namespace).map_err(|e| format!("FLOTILLA_QUOTAS: {e}"))?;
        }
        Ok(quotas)
    }

    /// The agents' limits; an error names what cannot be read.
    pub fn agent_limits(&self) -> Result<AgentLimits, String> {
        AgentLimits::parse(&self.agent_limits).map_err(|e| format!("FLOTILLA_AGENT_LIMITS: {e}"))
    }

    /// Whether any JWT key is configured.
    pub fn accepts_jwts(&self) -> bool {
        self.jwt_hs256_secret.is_some()
            || !self.jwt_rs256_keys.is_empty()
            || !self.jwt_es256_keys.is_empty()
    }

    /// Refuses settings that cannot work together, before anything starts.
    pub fn check(&self) -> Result<(), String> {
        if self.insecure_no_auth && !self.bind.is_loopback() {
            return Err(format!(
                "--insecure-no-auth (FLOTILLA_INSECURE_NO_AUTH) serves the API to anyone, so it \
                 listens only on a loopback address, not {}: set FLOTILLA_BIND=127.0.0.1, or \
                 leave authentication on",
                self.bind
            ));
        }
        if let Some(token) = self.admin_token.as_ref().filter(|t| !t.is_empty())
            && token.chars().count() < MIN_ADMIN_TOKEN_CHARS
        {
            return Err(format!(
                "FLOTILLA_ADMIN_TOKEN has {} characters: an admin token needs at least \
                 {MIN_ADMIN_TOKEN_CHARS} (e.g. `flt_` and 64 random hex digits)",
                token.chars().count()
            ));
        }
        self.quotas()?;
        self.agent_limits()?;
        if self.accepts_jwts() && (self.jwt_issuer.is_none() || self.jwt_audience.is_none()) {
            return Err("JWT keys are configured, so FLOTILLA_JWT_ISSUER and \
                        FLOTILLA_JWT_AUDIENCE must say which tokens are meant for this API"
                .into());
        }
        Ok(())
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
            ("FLOTILLA_DISPATCH_WINDOW", self.dispatch_window.to_string()),
            (
                "FLOTILLA_MAX_STEP_LOG_BYTES",
                self.max_step_log_bytes.to_string(),
            ),
            (
                "FLOTILLA_MAX_OUTPUT_BYTES",
                self.max_output_bytes.to_string(),
            ),
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
            (
                "FLOTILLA_MAX_WORKFLOW_DEPTH",
                self.max_workflow_depth.to_string(),
            ),
            ("FLOTILLA_MAX_BODY_BYTES", self.max_body_bytes.to_string()),
            (
                "FLOTILLA_MAX_DEFINITION_BYTES",
                self.max_definition_bytes.to_string(),
            ),
            ("FLOTILLA_MAX_STEPS", self.max_steps.to_string()),
            (
                "FLOTILLA_MAX_PARAMS_BYTES",
                self.max_params_bytes.to_string(),
            ),
            (
                "FLOTILLA_SHUTDOWN_GRACE_SECS",
                self.shutdown_grace_secs.to_string(),
            ),
            (
                "FLOTILLA_INSECURE_NO_AUTH",
                self.insecure_no_auth.to_string(),
            ),
            ("FLOTILLA_ADMIN_TOKEN", hidden(self.admin_token.is_some())),
            (
                "FLOTILLA_JWT_HS256_SECRET",
                hidden(self.jwt_hs256_secret.is_some()),
            ),
            ("FLOTILLA_JWT_RS256_KEYS", paths(&self.jwt_rs256_keys)),
            ("FLOTILLA_JWT_ES256_KEYS", paths(&self.jwt_es256_keys)),
            (
                "FLOTILLA_JWT_ISSUER",
                self.jwt_issuer.clone().unwrap_or_default(),
            ),
            (
                "FLOTILLA_JWT_AUDIENCE",
                self.jwt_audience.clone().unwrap_or_default(),
            ),
            ("FLOTILLA_PROTECT_METRICS", self.protect_metrics.to_string()),
            ("FLOTILLA_QUOTAS", self.quotas.clone()),
            ("FLOTILLA_AGENT_LIMITS", self.agent_limits.clone()),
            (
                "FLOTILLA_TRUST_FORWARDED_FOR",
                self.trust_forwarded_for.to_string(),
            ),
            (
                "FLOTILLA_TLS_CERT",
                self.tls_cert
                    .as_ref()
                    .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
            ),
            (
                "FLOTILLA_TLS_KEY",
                self.tls_key
                    .as_ref()
                    .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
            ),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect()
    }
}

/// A secret's place in the dump: whether it is set, never its value.
fn hidden(set: bool) -> String {
    if set { "***".into() } else { String::new() }
}

fn paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(",")
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

    fn config(args: &[&str]) -> Config {
        parse(args).unwrap()
    }

    #[test]
    fn insecure_no_auth_is_for_loopback_addresses_only() {
        assert!(config(&["--insecure-no-auth"]).check().is_ok());
        assert!(
            config(&["--insecure-no-auth", "--bind", "::1"])
                .check()
                .is_ok()
        );
        let err = config(&["--insecure-no-auth", "--bind", "0.0.0.0"])
            .check()
            .unwrap_err();
        assert!(err.contains("loopback") && err.contains("0.0.0.0"), "{err}");
        assert!(config(&["--bind", "0.0.0.0"]).check().is_ok());
    }

    #[test]
    fn a_tls_certificate_needs_its_key_and_the_other_way_round() {
        for args in [["--tls-cert", "cert.pem"], ["--tls-key", "key.pem"]] {
            let error = parse(&args).unwrap_err().to_string();
            assert!(error.contains("required"), "{error}");
        }
        assert!(parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).is_ok());
    }

    #[test]
    fn a_placeholder_admin_token_and_jwt_keys_without_issuer_are_refused() {
        let err = config(&["--admin-token", "CHANGE-ME"]).check().unwrap_err();
        assert!(err.contains("at least 32"), "{err}");
        let long = format!("flt_{}", "a".repeat(64));
        assert!(config(&["--admin-token", &long]).check().is_ok());
        let secret = "s".repeat(32);
        let err = config(&["--jwt-hs256-secret", &secret])
            .check()
            .unwrap_err();
        assert!(err.contains("FLOTILLA_JWT_ISSUER"), "{err}");
        let with_claims = config(&[
            "--jwt-hs256-secret",
            &secret,
            "--jwt-issuer",
            "i",
            "--jwt-audience",
            "a",
        ]);
        assert!(with_claims.check().is_ok());
    }

    #[test]
    fn the_dump_hides_the_admin_token_and_the_jwt_secret() {
        let token = format!("flt_{}", "b".repeat(64));
        let secret = "the secret of the coordinator's HS256 JWTs";
        let dump = config(&["--admin-token", &token, "--jwt-hs256-secret", secret]).dump();
        assert!(!dump.contains(&token) && !dump.contains(secret), "{dump}");
        assert!(dump.contains("FLOTILLA_ADMIN_TOKEN=***\n"), "{dump}");
        assert!(dump.contains("FLOTILLA_JWT_HS256_SECRET=***\n"), "{dump}");
    }
}
