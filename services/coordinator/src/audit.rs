//! The fleet audit behind `GET /api/health/audit` and `flotilla doctor`: [`Facts`] gathered from
//! Postgres and RabbitMQ by the backend, graded by [`grade`] (no I/O) against targets.
//!
//! A part that is broken — unreachable, a missing queue, an agent nobody consumes for, no
//! coordinator consuming results, a stuck outbox — fails; a number past its target, stale
//! workers, dead letters or missed schedule ticks warn.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_api_model::{
    AGENT_HEALTHY, AgentStatus, AgentSummary, HEALTH_FAIL, HEALTH_PASS, HEALTH_WARN,
    HealthAuditCheck, HealthTargets,
};
use flotilla_broker::QueueCounts;
use flotilla_store::PoolUse;
use flotilla_store::migrate::Migrations;
use flotilla_store::statistics::Statistics;

/// An outbox message older than this means the relay is behind.
const OUTBOX_WARN_AGE: Duration = Duration::from_secs(10);
/// An outbox message older than this means nothing publishes.
const OUTBOX_FAIL_AGE: Duration = Duration::from_secs(60);
/// A tick overdue by more than this was missed: no coordinator's timer claimed it.
const TICK_GRACE: Duration = Duration::from_secs(60);
/// A rate or latency this many times over its target fails rather than warns.
const FAIL_FACTOR: f64 = 10.0;

/// What the audit looked at.
pub(crate) struct Facts {
    pub postgres: Result<PostgresFacts, String>,
    pub rabbitmq: Result<RabbitFacts, String>,
    /// The agents with a registered worker or a step waiting for one, as `GET /api/agents`.
    pub agents: Vec<AgentStatus>,
    /// The attempts that ended in the window, by agent.
    pub attempts: Vec<AgentSummary>,
    /// Each schedule's next tick, by definition name.
    pub schedules: Vec<(String, DateTime<Utc>)>,
    /// How long a worker may go silent before its attempts run again elsewhere.
    pub lease: Duration,
    pub now: DateTime<Utc>,
}

pub(crate) struct PostgresFacts {
    /// How long `SELECT 1` took.
    pub latency: Duration,
    pub migrations: Migrations,
    pub pool: PoolUse,
    pub outbox: i64,
    pub outbox_oldest: Option<DateTime<Utc>>,
    /// Dead letters not redriven.
    pub dead_letters: i64,
    /// Whether the planner's statistics of the engine's tables are kept current.
    pub statistics: Statistics,
}

pub(crate) struct RabbitFacts {
    /// The results queue: its consumers are the coordinators' engines.
    pub results: Option<QueueCounts>,
    pub dead_letter_queue: Option<QueueCounts>,
    /// Each audited agent's queue; `None` when it does not exist.
    pub agent_queues: BTreeMap<String, Option<QueueCounts>>,
}

fn check(
    area: &str,
    name: impl Into<String>,
    status: &str,
    value: Option<f64>,
    message: String,
) -> HealthAuditCheck {
    HealthAuditCheck {
        area: area.into(),
        name: name.into(),
        status: status.into(),
        value,
        message,
    }
}

/// `pass` within `target`, `warn` past it, `fail` past `fail`.
fn against(value: f64, target: f64, fail: f64) -> &'static str {
    if value > fail {
        HEALTH_FAIL
    } else if value > target {
        HEALTH_WARN
    } else {
        HEALTH_PASS
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn age(now: DateTime<Utc>, since: DateTime<Utc>) -> Duration {
    (now - since).to_std().unwrap_or_default()
}

/// Grades every check, in a fixed order: Postgres, RabbitMQ, coordinators, workers, agents,
/// failover, schedules.
pub(crate) fn grade(facts: &Facts, targets: &HealthTargets) -> Vec<HealthAuditCheck> {
    let mut out = Vec::new();
    postgres(facts, targets, &mut out);
    rabbitmq(facts, &mut out);
    workers(facts, &mut out);
    agents(facts, targets, &mut out);
    let lease = facts.lease.as_secs_f64();
    out.push(check(
        "workers",
        "failover",
        if lease <= targets.max_failover_secs { HEALTH_PASS } else { HEALTH_WARN },
        Some(lease),
        format!(
            "a lost worker's steps run again after its lease of {} (target {} s); coordinators share every run's state, so another takes over at once",
            secs(facts.lease),
            targets.max_failover_secs
        ),
    ));
    for (name, next) in &facts.schedules {
        let overdue = age(facts.now, *next);
        let (status, message) = if overdue > TICK_GRACE {
            (
                HEALTH_WARN,
                format!(
                    "tick due at {next} missed ({} overdue): no coordinator's timer claimed it",
                    secs(overdue)
                ),
            )
        } else {
            (HEALTH_PASS, format!("next tick at {next}"))
        };
        out.push(check(
            "schedules",
            format!("schedule {name}"),
            status,
            None,
            message,
        ));
    }
    out
}

fn postgres(facts: &Facts, targets: &HealthTargets, out: &mut Vec<HealthAuditCheck>) {
    let pg = match &facts.postgres {
        Ok(pg) => pg,
        Err(e) => {
            out.push(check("postgres", "reachable", HEALTH_FAIL, None, e.clone()));
            return;
        }
    };
    let ms = pg.latency.as_secs_f64() * 1000.0;
    out.push(check(
        "postgres",
        "reachable",
        HEALTH_PASS,
        Some(ms),
        format!("answers in {ms:.1} ms"),
    ));
    let m = &pg.migrations;
    let (status, message) = match (m.pending.as_slice(), m.unknown.as_slice()) {
        ([], []) => (HEALTH_PASS, format!("current: latest {} applied", m.latest)),
        (pending, []) => (
            HEALTH_FAIL,
            format!("not applied: {pending:?} (restart a coordinator to apply them)"),
        ),
        (_, unknown) => (
            HEALTH_WARN,
            format!(
                "the database has migrations this coordinator does not know, {unknown:?}: a newer coordinator applied them"
            ),
        ),
    };
    out.push(check("postgres", "migrations", status, None, message));
    let stats = &pg.statistics;
    let (status, message) = match (stats.autovacuum, stats.stale.as_slice()) {
        (true, _) => (
            HEALTH_PASS,
            "autovacuum keeps the planner's statistics of the engine's tables current".into(),
        ),
        (false, []) => (
            HEALTH_PASS,
            "autovacuum is off, but the engine's tables changed little since their last ANALYZE"
                .into(),
        ),
        (false, stale) => (
            HEALTH_WARN,
            format!(
                "autovacuum is off (or track_counts is) and {} changed by over 10 % since their \
                 last ANALYZE: the engine's statements are planned on stale statistics and dead \
                 rows are not reclaimed, so a step costs more as the history grows; turn \
                 autovacuum on, or run VACUUM ANALYZE regularly",
                stale.join(", ")
            ),
        ),
    };
    out.push(check(
        "postgres",
        "statistics",
        status,
        Some(stats.stale.len() as f64),
        message,
    ));
    let used = pg.pool.in_use as f64 / pg.pool.max.max(1) as f64;
    let status = if pg.pool.waiting > 0 {
        HEALTH_FAIL
    } else {
        against(used, targets.max_pool_use, 1.0)
    };
    out.push(check(
        "postgres",
        "pool",
        status,
        Some(used),
        format!(
            "{} of {} connections in use ({:.0} %, target under {:.0} %), {} waiting",
            pg.pool.in_use,
            pg.pool.max,
            used * 100.0,
            targets.max_pool_use * 100.0,
            pg.pool.waiting
        ),
    ));
    let oldest = pg.outbox_oldest.map(|at| age(facts.now, at));
    let status = match oldest {
        Some(a) if a > OUTBOX_FAIL_AGE => HEALTH_FAIL,
        Some(a) if a > OUTBOX_WARN_AGE => HEALTH_WARN,
        _ => HEALTH_PASS,
    };
    let message = match oldest {
        Some(a) => format!(
            "{} messages not yet published, the oldest for {}",
            pg.outbox,
            secs(a)
        ),
        None => "empty: everything committed was published".into(),
    };
    out.push(check(
        "coordinators",
        "outbox backlog",
        status,
        Some(pg.outbox as f64),
        message,
    ));
    let (status, message) = match pg.dead_letters {
        0 => (
            HEALTH_PASS,
            "no dead letter waits for a redrive".to_string(),
        ),
        n => (
            HEALTH_WARN,
            format!("{n} dead letters not redriven: see `flotilla dlq list`"),
        ),
    };
    out.push(check(
        "rabbitmq",
        "dead letters",
        status,
        Some(pg.dead_letters as f64),
        message,
    ));
}

fn rabbitmq(facts: &Facts, out: &mut Vec<HealthAuditCheck>) {
    let rabbit = match &facts.rabbitmq {
        Ok(r) => r,
        Err(e) => {
            out.push(check("rabbitmq", "reachable", HEALTH_FAIL, None, e.clone()));
            return;
        }
    };
    out.push(check(
        "rabbitmq",
        "reachable",
        HEALTH_PASS,
        None,
        "answers".into(),
    ));
    let (status, consumers, message) = match rabbit.results {
        None => (
            HEALTH_FAIL,
            None,
            "the results queue does not exist".to_string(),
        ),
        Some(c) if c.consumers == 0 => (
            HEALTH_FAIL,
            Some(0.0),
            format!("no coordinator consumes results; {} wait", c.messages),
        ),
        Some(c) => (
            HEALTH_PASS,
            Some(f64::from(c.consumers)),
            format!("{} consuming results, {} waiting", c.consumers, c.messages),
        ),
    };
    out.push(check("coordinators", "alive", status, consumers, message));
    if let Some(dlq) = rabbit.dead_letter_queue {
        let status = if dlq.messages == 0 {
            HEALTH_PASS
        } else {
            HEALTH_WARN
        };
        out.push(check(
            "rabbitmq",
            "dead-letter queue",
            status,
            Some(f64::from(dlq.messages)),
            format!(
                "{} messages not yet recorded by a coordinator",
                dlq.messages
            ),
        ));
    }
    let waiting: BTreeMap<&str, &AgentStatus> =
        facts.agents.iter().map(|a| (a.name.as_str(), a)).collect();
    for (agent, counts) in &rabbit.agent_queues {
        let oldest = waiting
            .get(agent.as_str())
            .and_then(|a| a.oldest_waiting_ms)
            .map(|ms| format!(", the oldest waiting {}", secs(Duration::from_millis(ms))))
            .unwrap_or_default();
        let (status, value, message) = match counts {
            None => (
                HEALTH_FAIL,
                None,
                "does not exist: no worker or coordinator declared it".to_string(),
            ),
            Some(c) if c.consumers == 0 => (
                HEALTH_FAIL,
                Some(0.0),
                format!(
                    "no consumer: no worker takes its tasks; {} ready{oldest}",
                    c.messages
                ),
            ),
            Some(c) => (
                HEALTH_PASS,
                Some(f64::from(c.consumers)),
                format!("{} consumers, {} ready{oldest}", c.consumers, c.messages),
            ),
        };
        out.push(check(
            "rabbitmq",
            format!("queue {agent}"),
            status,
            value,
            message,
        ));
    }
}

fn workers(facts: &Facts, out: &mut Vec<HealthAuditCheck>) {
    let mut seen: BTreeMap<&str, bool> = BTreeMap::new();
    for w in facts.agents.iter().flat_map(|a| &a.workers) {
        seen.insert(&w.worker_id, w.health == AGENT_HEALTHY);
    }
    let stale: Vec<&str> = seen
        .iter()
        .filter(|(_, healthy)| !**healthy)
        .map(|(id, _)| *id)
        .collect();
    let healthy = seen.len() - stale.len();
    let (status, message) = match (healthy, stale.as_slice()) {
        (0, []) => (HEALTH_WARN, "no worker is registered".to_string()),
        (0, stale) => (
            HEALTH_FAIL,
            format!(
                "no worker is healthy; stale heartbeats: {}",
                stale.join(", ")
            ),
        ),
        (n, []) => (HEALTH_PASS, format!("{n} healthy")),
        (n, stale) => (
            HEALTH_WARN,
            format!("{n} healthy; stale heartbeats: {}", stale.join(", ")),
        ),
    };
    out.push(check(
        "workers",
        "alive",
        status,
        Some(healthy as f64),
        message,
    ));
}

fn agents(facts: &Facts, targets: &HealthTargets, out: &mut Vec<HealthAuditCheck>) {
    for a in &facts.attempts {
        let failed = a.executions - a.successes;
        let rate = failed as f64 / a.executions.max(1) as f64;
        out.push(check(
            "agents",
            format!("error rate {}", a.agent),
            against(
                rate,
                targets.max_error_rate,
                targets.max_error_rate * FAIL_FACTOR,
            ),
            Some(rate),
            format!(
                "{failed} of {} attempts failed ({:.2} %, target under {} %)",
                a.executions,
                rate * 100.0,
                targets.max_error_rate * 100.0
            ),
        ));
        if let Some(p95) = a.p95_ms {
            out.push(check(
                "agents",
                format!("latency {}", a.agent),
                against(p95, targets.max_p95_ms, targets.max_p95_ms * FAIL_FACTOR),
                Some(p95),
                format!("p95 {p95:.0} ms (target under {} ms)", targets.max_p95_ms),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use flotilla_api_model::{AGENT_UNHEALTHY, WorkerStatus};

    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn counts(messages: u32, consumers: u32) -> Option<QueueCounts> {
        Some(QueueCounts {
            messages,
            consumers,
        })
    }

    fn worker(id: &str, health: &str) -> WorkerStatus {
        WorkerStatus {
            worker_id: id.into(),
            health: health.into(),
            agents: vec!["build".into()],
            actions: Vec::new(),
            concurrency: 1,
            in_flight: 0,
            last_seen: at(0),
            sdk: None,
            host: None,
            pid: None,
            labels: Default::default(),
            started_at: None,
        }
    }

    fn healthy() -> Facts {
        Facts {
            postgres: Ok(PostgresFacts {
                latency: Duration::from_millis(2),
                migrations: Migrations {
                    latest: 45,
                    pending: Vec::new(),
                    unknown: Vec::new(),
                },
                pool: PoolUse {
                    max: 16,
                    in_use: 2,
                    waiting: 0,
                },
                outbox: 0,
                outbox_oldest: None,
                dead_letters: 0,
                statistics: Statistics {
                    autovacuum: true,
                    stale: Vec::new(),
                },
            }),
            rabbitmq: Ok(RabbitFacts {
                results: counts(0, 1),
                dead_letter_queue: counts(0, 1),
                agent_queues: [("build".to_string(), counts(0, 1))].into(),
            }),
            agents: vec![AgentStatus {
                name: "build".into(),
                health: AGENT_HEALTHY.into(),
                workers: vec![worker("w1", AGENT_HEALTHY)],
                queue_depth: Some(0),
                waiting_steps: 0,
                oldest_waiting_ms: None,
            }],
            attempts: vec![AgentSummary {
                agent: "build".into(),
                executions: 2000,
                successes: 2000,
                success_rate: 1.0,
                p50_ms: Some(3.0),
                p95_ms: Some(12.0),
                p99_ms: Some(20.0),
            }],
            schedules: vec![("nightly".into(), at(100))],
            lease: Duration::from_secs(15),
            now: at(0),
        }
    }

    fn status_of<'a>(checks: &'a [HealthAuditCheck], name: &str) -> &'a str {
        &checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
            .status
    }

    #[test]
    fn a_healthy_fleet_passes_every_check() {
        let checks = grade(&healthy(), &HealthTargets::default());
        assert!(
            checks.iter().all(|c| c.status == HEALTH_PASS),
            "{checks:#?}"
        );
        assert_eq!(checks.len(), 15, "{checks:#?}");
    }

    #[test]
    fn numbers_past_their_targets_warn_and_far_past_them_fail() {
        let mut facts = healthy();
        facts.attempts[0].successes = 1990; // 0.5 %
        facts.attempts[0].p95_ms = Some(6000.0);
        if let Ok(pg) = &mut facts.postgres {
            pg.pool.in_use = 14;
            pg.outbox = 3;
            pg.outbox_oldest = Some(at(-20));
        }
        facts.lease = Duration::from_secs(45);
        facts.schedules[0].1 = at(-300);
        let checks = grade(&facts, &HealthTargets::default());
        for (name, status) in [
            ("error rate build", HEALTH_WARN),
            ("latency build", HEALTH_FAIL),
            ("pool", HEALTH_WARN),
            ("outbox backlog", HEALTH_WARN),
            ("failover", HEALTH_WARN),
            ("schedule nightly", HEALTH_WARN),
        ] {
            assert_eq!(status_of(&checks, name), status, "{name}");
        }
        let rate = checks
            .iter()
            .find(|c| c.name == "error rate build")
            .unwrap();
        assert_eq!(
            rate.message,
            "10 of 2000 attempts failed (0.50 %, target under 0.1 %)"
        );
        // Looser targets pass the same numbers.
        let loose = HealthTargets {
            max_error_rate: 0.01,
            max_p95_ms: 10_000.0,
            max_pool_use: 0.9,
            max_failover_secs: 60.0,
        };
        let checks = grade(&facts, &loose);
        for name in ["error rate build", "latency build", "pool", "failover"] {
            assert_eq!(status_of(&checks, name), HEALTH_PASS, "{name}");
        }
    }

    #[test]
    fn stale_statistics_warn_only_when_nothing_analyzes_the_tables() {
        let mut facts = healthy();
        if let Ok(pg) = &mut facts.postgres {
            pg.statistics.stale = vec!["attempts".into(), "steps".into()];
        }
        // Autovacuum will analyze them.
        let checks = grade(&facts, &HealthTargets::default());
        assert_eq!(status_of(&checks, "statistics"), HEALTH_PASS);
        if let Ok(pg) = &mut facts.postgres {
            pg.statistics.autovacuum = false;
        }
        let checks = grade(&facts, &HealthTargets::default());
        let stats = checks.iter().find(|c| c.name == "statistics").unwrap();
        assert_eq!(stats.status, HEALTH_WARN);
        assert_eq!(stats.value, Some(2.0));
        assert!(
            stats.message.starts_with(
                "autovacuum is off (or track_counts is) and attempts, steps changed by over 10 %"
            ),
            "{}",
            stats.message
        );
        if let Ok(pg) = &mut facts.postgres {
            pg.statistics.stale.clear();
        }
        let checks = grade(&facts, &HealthTargets::default());
        assert_eq!(status_of(&checks, "statistics"), HEALTH_PASS);
    }

    #[test]
    fn broken_parts_fail_and_say_what_is_broken() {
        let mut facts = healthy();
        facts.agents[0].workers = vec![worker("w1", AGENT_UNHEALTHY)];
        facts.agents[0].oldest_waiting_ms = Some(4_000);
        if let Ok(r) = &mut facts.rabbitmq {
            r.agent_queues.insert("build".into(), counts(3, 0));
            r.agent_queues.insert("gone".into(), None);
            r.results = counts(0, 0);
        }
        let checks = grade(&facts, &HealthTargets::default());
        let queue = checks.iter().find(|c| c.name == "queue build").unwrap();
        assert_eq!(
            (queue.status.as_str(), queue.message.as_str()),
            (
                HEALTH_FAIL,
                "no consumer: no worker takes its tasks; 3 ready, the oldest waiting 4.0 s"
            )
        );
        assert_eq!(status_of(&checks, "queue gone"), HEALTH_FAIL);
        assert_eq!(status_of(&checks, "alive"), HEALTH_FAIL);
        let workers = checks
            .iter()
            .find(|c| c.area == "workers" && c.name == "alive")
            .unwrap();
        assert_eq!(
            workers.message,
            "no worker is healthy; stale heartbeats: w1"
        );

        let down = Facts {
            postgres: Err("Postgres is unavailable: connection refused".into()),
            rabbitmq: Err("connection refused".into()),
            ..healthy()
        };
        let checks = grade(&down, &HealthTargets::default());
        let failed: Vec<(&str, &str)> = checks
            .iter()
            .filter(|c| c.status == HEALTH_FAIL)
            .map(|c| (c.area.as_str(), c.name.as_str()))
            .collect();
        assert_eq!(
            failed,
            [("postgres", "reachable"), ("rabbitmq", "reachable")]
        );
    }
}
