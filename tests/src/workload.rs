//! Workloads for the fault tests: definitions built in code, and waiting for many runs to end
//! with a deadline and a stall detector, through Postgres (so that it works whichever
//! coordinator is down).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;

use crate::Fleet;

/// A workflow definition built step by step, rendered as YAML (flow mappings of JSON values,
/// which YAML reads as they are).
#[derive(Debug, Clone)]
pub struct Workflow {
    name: String,
    retry: Option<Value>,
    steps: Vec<Value>,
}

impl Workflow {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            retry: None,
            steps: Vec::new(),
        }
    }

    /// The workflow's retry policy (`error_handling.retry`).
    #[must_use]
    pub fn retry(mut self, max_attempts: u32, delay_ms: u64) -> Self {
        self.retry = Some(json!({"max_attempts": max_attempts, "delay": delay_ms}));
        self
    }

    /// Adds a step. `depends_on: None` follows the previous step (the format's default);
    /// `Some(&[])` starts at once.
    #[must_use]
    pub fn step(
        mut self,
        id: &str,
        agent: &str,
        depends_on: Option<&[&str]>,
        params: Value,
    ) -> Self {
        let mut step = json!({"id": id, "agent": agent, "action": "work", "params": params});
        if let Some(deps) = depends_on {
            step["depends_on"] = json!(deps);
        }
        self.steps.push(step);
        self
    }

    /// How many steps the workflow has.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// `steps` independent steps (all start at once), step `i` working `sleep_ms(i)` ms.
    pub fn fan_out(name: &str, agent: &str, steps: usize, sleep_ms: impl Fn(usize) -> u64) -> Self {
        (0..steps).fold(Self::new(name), |w, i| {
            w.step(
                &format!("s{i}"),
                agent,
                Some(&[]),
                json!({"sleep_ms": sleep_ms(i), "n": i}),
            )
        })
    }

    /// `steps` steps in a chain, each one starting when the one before has succeeded.
    pub fn chain(name: &str, agent: &str, steps: usize, sleep_ms: impl Fn(usize) -> u64) -> Self {
        (0..steps).fold(Self::new(name), |w, i| {
            w.step(
                &format!("s{i}"),
                agent,
                None,
                json!({"sleep_ms": sleep_ms(i), "n": i}),
            )
        })
    }

    /// The YAML text to submit.
    pub fn yaml(&self) -> String {
        let mut yaml = format!("name: {}\n", json!(self.name));
        if let Some(retry) = &self.retry {
            let _ = writeln!(yaml, "error_handling:\n  retry: {retry}");
        }
        yaml.push_str("steps:\n");
        for step in &self.steps {
            let _ = writeln!(yaml, "  - {step}");
        }
        yaml
    }
}

/// A small deterministic pseudo-random sequence (SplitMix64), so that a failing fault test can be
/// replayed with the same choices.
#[derive(Debug, Clone)]
pub struct Dice(u64);

impl Dice {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }
}

/// How long [`wait_for_runs`] may wait.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// The most it waits in all.
    pub deadline: Duration,
    /// It gives up when no attempt finished and no run ended for this long.
    pub stall: Duration,
}

/// What [`wait_for_runs`] saw.
#[derive(Debug, Clone)]
pub struct Waited {
    /// From the call to the end of the last run (or to giving up).
    pub elapsed: Duration,
    /// Whether every run ended.
    pub all_ended: bool,
    /// Why it gave up, when it did.
    pub gave_up: Option<String>,
}

/// Progress of a set of runs, read from Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub ended_runs: i64,
    /// Attempts that finished (success or failure): the work done so far.
    pub finished_attempts: i64,
}

/// Reads how far `runs` have got.
pub async fn progress(db: &tokio_postgres::Client, runs: &[Uuid]) -> anyhow::Result<Progress> {
    let ended: i64 = db
        .query_one(
            "SELECT count(*) FROM runs WHERE id = ANY($1) AND status IN ('success', 'failure')",
            &[&runs],
        )
        .await?
        .get(0);
    let finished: i64 = db
        .query_one(
            "SELECT count(*) FROM attempts WHERE run_id = ANY($1) AND status <> 'dispatched'",
            &[&runs],
        )
        .await?
        .get(0);
    Ok(Progress {
        ended_runs: ended,
        finished_attempts: finished,
    })
}

/// Waits until every run in `runs` has ended, watching Postgres (reconnecting when it restarts).
/// Gives up at the deadline, or when nothing moved for `patience.stall`; the caller audits what
/// it finds either way.
pub async fn wait_for_runs(fleet: &Fleet, runs: &[Uuid], patience: Patience) -> Waited {
    let started = Instant::now();
    let mut db: Option<tokio_postgres::Client> = None;
    let mut last = Progress::default();
    let mut last_change = Instant::now();
    let mut last_error = None;
    let total = i64::try_from(runs.len()).unwrap_or(i64::MAX);
    loop {
        if db.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            db = fleet.db().await.map_err(|e| last_error = Some(e)).ok();
        }
        if let Some(client) = &db {
            match progress(client, runs).await {
                Ok(now) => {
                    if now.ended_runs >= total {
                        return Waited {
                            elapsed: started.elapsed(),
                            all_ended: true,
                            gave_up: None,
                        };
                    }
                    if now != last {
                        last = now;
                        last_change = Instant::now();
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
        let why = if started.elapsed() > patience.deadline {
            Some(format!("the deadline of {:?} passed", patience.deadline))
        } else if last_change.elapsed() > patience.stall {
            Some(format!(
                "nothing moved for {:?} ({} of {total} runs ended, {} attempts finished{})",
                patience.stall,
                last.ended_runs,
                last.finished_attempts,
                last_error
                    .as_ref()
                    .map(|e| format!("; last database error: {e}"))
                    .unwrap_or_default()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Waited {
                elapsed: started.elapsed(),
                all_ended: false,
                gave_up: Some(why),
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `condition` every 100 ms until it holds, at most `timeout` (see [`eventually`]).
pub async fn poll_until<F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    eventually(timeout, what, || {
        let holds = condition();
        async move { Ok(holds.await?.then_some(())) }
    })
    .await
}

/// Polls `check` every 100 ms until it answers `Some`, at most `timeout`. Errors of the check (a
/// database restarting) count as "not yet"; the last one is reported on timeout.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{what}: not within {timeout:?}{}",
                last_error
                    .map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until at least `attempts` attempts of `runs` have finished.
pub async fn wait_for_progress(
    fleet: &Fleet,
    runs: &[Uuid],
    attempts: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    poll_until(
        timeout,
        &format!("{attempts} attempts finished"),
        || async {
            let db = fleet.db().await?;
            Ok(progress(&db, runs).await?.finished_attempts >= attempts)
        },
    )
    .await
}
