//! What a fault test checks once its workload is over, in Postgres and in RabbitMQ: every step
//! completed exactly once, no run stuck, nothing left in the outbox, nothing left on a queue.
//! And the one line of figures each fault test prints and appends to
//! `target/fault-figures.txt`.

use std::collections::HashSet;
use std::fmt;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use uuid::Uuid;

use crate::Fleet;

/// What the workload should have produced.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Every run submitted.
    pub runs: Vec<Uuid>,
    /// How many steps of those runs must succeed, in all.
    pub steps: usize,
    /// Steps that must end `failure` (by run and step id), never with a successful attempt;
    /// their runs must end `failure`, every other run `success`.
    pub failing: Vec<(Uuid, String)>,
    /// Whether `{prefix}.dead` may hold messages (the poison scenario).
    pub dead_letters_allowed: bool,
}

impl Expected {
    /// Every step of `runs` (`steps` in all) succeeds, and nothing is dead-lettered.
    pub fn all_succeed(runs: Vec<Uuid>, steps: usize) -> Self {
        Self {
            runs,
            steps,
            ..Self::default()
        }
    }
}

/// One step that did not complete exactly once, for the failure message.
#[derive(Debug, Clone)]
pub struct Finding {
    pub run_id: Uuid,
    pub step_id: String,
    pub status: String,
    pub successes: i64,
    pub attempts: i64,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}: {} with {} successful of {} attempts",
            self.run_id, self.step_id, self.status, self.successes, self.attempts
        )
    }
}

/// What the audit found.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Steps that had to succeed.
    pub steps: usize,
    /// Steps that had to succeed and did not, or that have no successful attempt on record;
    /// `lost_missing` more were not found at all.
    pub lost: Vec<Finding>,
    pub lost_missing: usize,
    /// Runs that did not end (each counts as lost too: a run stuck with every step done is
    /// work that never reaches its user).
    pub stuck_runs: Vec<Uuid>,
    /// Steps with more than one successful attempt.
    pub double_completed: Vec<Finding>,
    /// Runs not in their expected status.
    pub wrong_runs: Vec<String>,
    /// Steps that had to fail and did not, or failed with a successful attempt on record.
    pub wrong_failures: Vec<Finding>,
    /// Rows left in the outbox.
    pub outbox: i64,
    /// Queues of the fleet holding messages they should not.
    pub queues: Vec<(String, u32)>,
    /// Messages in `{prefix}.dead`.
    pub dead_letters: u32,
}

impl Audit {
    /// The figure `lost`: steps that did not complete, plus runs that did not end.
    pub fn lost(&self) -> usize {
        self.lost.len() + self.lost_missing + self.stuck_runs.len()
    }

    /// The figure `double-completed`.
    pub fn double_completed(&self) -> usize {
        self.double_completed.len()
    }

    /// Everything that is wrong, one problem a line; empty when the audit passed.
    pub fn problems(&self) -> Vec<String> {
        const SHOWN: usize = 10;
        let mut problems = Vec::new();
        if !self.lost.is_empty() || self.lost_missing > 0 {
            problems.push(format!(
                "{} steps lost{}: {}",
                self.lost.len() + self.lost_missing,
                if self.lost_missing > 0 {
                    format!(" ({} not found at all)", self.lost_missing)
                } else {
                    String::new()
                },
                list(&self.lost, SHOWN)
            ));
        }
        if !self.stuck_runs.is_empty() {
            problems.push(format!(
                "{} runs did not end: {}",
                self.stuck_runs.len(),
                list(&self.stuck_runs, SHOWN)
            ));
        }
        if !self.double_completed.is_empty() {
            problems.push(format!(
                "{} steps completed more than once: {}",
                self.double_completed.len(),
                list(&self.double_completed, SHOWN)
            ));
        }
        if !self.wrong_runs.is_empty() {
            problems.push(format!(
                "{} runs not in the expected status: {}",
                self.wrong_runs.len(),
                list(&self.wrong_runs, SHOWN)
            ));
        }
        if !self.wrong_failures.is_empty() {
            problems.push(format!(
                "steps that had to fail: {}",
                list(&self.wrong_failures, SHOWN)
            ));
        }
        if self.outbox > 0 {
            problems.push(format!("{} rows left in the outbox", self.outbox));
        }
        if !self.queues.is_empty() {
            problems.push(format!("messages left on queues: {:?}", self.queues));
        }
        problems
    }
}

fn list<T: fmt::Display>(items: &[T], shown: usize) -> String {
    let mut text: Vec<String> = items.iter().take(shown).map(ToString::to_string).collect();
    if items.len() > shown {
        text.push(format!("… and {} more", items.len() - shown));
    }
    text.join("; ")
}

/// Counts every step of the expected runs in Postgres.
pub async fn steps(db: &tokio_postgres::Client, expected: &Expected) -> anyhow::Result<Audit> {
    let failing: HashSet<(Uuid, &str)> = expected
        .failing
        .iter()
        .map(|(run, step)| (*run, step.as_str()))
        .collect();
    let failing_runs: HashSet<Uuid> = expected.failing.iter().map(|(run, _)| *run).collect();
    let rows = db
        .query(
            "SELECT s.run_id, s.step_id, s.status,
                    count(a.task_id) FILTER (WHERE a.status = 'success'), count(a.task_id)
             FROM steps s
             LEFT JOIN attempts a ON a.run_id = s.run_id AND a.idx = s.idx
             WHERE s.run_id = ANY($1)
             GROUP BY s.run_id, s.idx, s.step_id, s.status
             ORDER BY s.run_id, s.idx",
            &[&expected.runs],
        )
        .await
        .context("reading steps and attempts")?;
    let mut audit = Audit {
        steps: expected.steps,
        ..Audit::default()
    };
    let mut found = 0;
    for row in &rows {
        let finding = Finding {
            run_id: row.get(0),
            step_id: row.get(1),
            status: row.get(2),
            successes: row.get(3),
            attempts: row.get(4),
        };
        if failing.contains(&(finding.run_id, finding.step_id.as_str())) {
            if finding.status != "failure" || finding.successes > 0 {
                audit.wrong_failures.push(finding);
            }
            continue;
        }
        found += 1;
        if finding.successes > 1 {
            audit.double_completed.push(finding);
        } else if finding.status != "success" || finding.successes == 0 {
            audit.lost.push(finding);
        }
    }
    audit.lost_missing = expected.steps.saturating_sub(found);

    let runs = db
        .query(
            "SELECT id, status FROM runs WHERE id = ANY($1)",
            &[&expected.runs],
        )
        .await
        .context("reading runs")?;
    let mut seen = HashSet::new();
    for row in &runs {
        let (id, status): (Uuid, String) = (row.get(0), row.get(1));
        seen.insert(id);
        if !matches!(status.as_str(), "success" | "failure") {
            audit.stuck_runs.push(id);
        }
        let want = if failing_runs.contains(&id) {
            "failure"
        } else {
            "success"
        };
        if status != want {
            audit
                .wrong_runs
                .push(format!("{id} is {status}, expected {want}"));
        }
    }
    for id in expected.runs.iter().filter(|id| !seen.contains(*id)) {
        audit.wrong_runs.push(format!("{id} is missing"));
        audit.stuck_runs.push(*id);
    }
    audit.outbox = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0);
    Ok(audit)
}

/// Ready messages on each queue of the fleet (0 for a queue that does not exist).
pub async fn queue_counts(fleet: &Fleet) -> anyhow::Result<Vec<(String, u32)>> {
    let connection = fleet.broker().await?;
    let mut counts = Vec::new();
    for queue in fleet.queues() {
        // A failed passive declare closes its channel: one channel per queue.
        let channel = connection.open_channel().await?;
        let count = channel.message_count(&queue).await.unwrap_or(0);
        let _ = channel.close().await;
        counts.push((queue, count));
    }
    connection.close().await?;
    Ok(counts)
}

/// Waits, at most `timeout`, until the outbox is empty and no queue of the fleet (heartbeats
/// and, when allowed, dead letters aside) holds a ready message: the fleet has settled. Returns
/// whether it did.
pub async fn settle(fleet: &Fleet, expected: &Expected, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(true) = settled(fleet, expected).await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn settled(fleet: &Fleet, expected: &Expected) -> anyhow::Result<bool> {
    let db = fleet.db().await?;
    let outbox: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0);
    let queues = checked_queues(fleet, expected, queue_counts(fleet).await?);
    Ok(outbox == 0 && queues.is_empty())
}

/// The queues that must be empty and are not.
fn checked_queues(
    fleet: &Fleet,
    expected: &Expected,
    counts: Vec<(String, u32)>,
) -> Vec<(String, u32)> {
    let names = fleet.queue_names();
    counts
        .into_iter()
        .filter(|(queue, count)| {
            *count > 0
                && *queue != names.heartbeats()
                && !(expected.dead_letters_allowed && *queue == names.dead_letters())
        })
        .collect()
}

/// The whole audit, once the workload is over: lets the fleet settle (at most `settle_for`),
/// stops its processes (so that what they held unacked goes back to the queues and is
/// counted), then counts steps, runs, the outbox and the queues.
pub async fn audit(
    fleet: &mut Fleet,
    expected: &Expected,
    settle_for: Duration,
) -> anyhow::Result<Audit> {
    settle(fleet, expected, settle_for).await;
    fleet.shutdown().await;
    let db = fleet.db().await?;
    let mut audit = steps(&db, expected).await?;
    let counts = queue_counts(fleet).await?;
    let names = fleet.queue_names();
    audit.dead_letters = counts
        .iter()
        .find(|(q, _)| *q == names.dead_letters())
        .map_or(0, |(_, n)| *n);
    audit.queues = checked_queues(fleet, expected, counts);
    Ok(audit)
}

/// The figures line of one fault test:
/// `scenario: N steps, M faults, lost L, double-completed D, seconds S`.
#[derive(Debug, Clone)]
pub struct Figures {
    pub scenario: String,
    pub steps: usize,
    pub faults: usize,
    pub lost: usize,
    pub double_completed: usize,
    pub seconds: f64,
    /// Further figures of the scenario, appended as `, name value`.
    pub extra: Vec<(String, String)>,
}

impl Figures {
    pub fn new(scenario: &str, audit: &Audit, faults: usize, elapsed: Duration) -> Self {
        Self {
            scenario: scenario.into(),
            steps: audit.steps,
            faults,
            lost: audit.lost(),
            double_completed: audit.double_completed(),
            seconds: elapsed.as_secs_f64(),
            extra: Vec::new(),
        }
    }

    #[must_use]
    pub fn with(mut self, name: &str, value: impl fmt::Display) -> Self {
        self.extra.push((name.into(), value.to_string()));
        self
    }

    /// Prints the line and appends it to `target/fault-figures.txt`.
    pub fn publish(&self) {
        let line = self.to_string();
        println!("{line}");
        let path = crate::target_dir().join("fault-figures.txt");
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            // One write of the whole line, so lines of concurrent writers never interleave.
            .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = appended {
            eprintln!("cannot append to {}: {e}", path.display());
        }
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} steps, {} faults, lost {}, double-completed {}, seconds {:.1}",
            self.scenario, self.steps, self.faults, self.lost, self.double_completed, self.seconds
        )?;
        for (name, value) in &self.extra {
            write!(f, ", {name} {value}")?;
        }
        Ok(())
    }
}
