//! Fires the timers kept in Postgres — retries that are due, leases of running attempts that
//! ran out, attempts past their timeout, attempts no worker started within their
//! `schedule_to_start`, runs past their workflow timeout, steps held by a circuit breaker or an
//! agent's limit that may go now — with indexed queries that never scan history, and sleeps in
//! between.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::limits::AgentLimits;
use flotilla_store::engine as db;
use flotilla_store::{Store, breakers, limits};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{Due, EngineHandle};

/// The most timers handed to the engine at once.
const BATCH: i64 = 1_000;

/// Runs until `shutdown`. `hints` carries the due time of every retry the engine schedules, so
/// the timer wakes on time without polling; `poll` bounds the sleep, for retries scheduled by
/// other coordinators. `agent_limits` are the limits whose held steps it releases.
pub async fn run(
    store: Store,
    engine: EngineHandle,
    mut hints: mpsc::UnboundedReceiver<DateTime<Utc>>,
    poll: Duration,
    agent_limits: AgentLimits,
    shutdown: CancellationToken,
) {
    let mut next: Option<DateTime<Utc>> = None;
    loop {
        let now = Utc::now();
        let ceiling = now + chrono::Duration::from_std(poll).unwrap_or(chrono::Duration::MAX);
        let deadline = next.map_or(ceiling, |n| n.min(ceiling));
        let sleep = (deadline - now).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = shutdown.cancelled() => return,
            hint = hints.recv() => {
                match hint {
                    Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                    None => return,
                }
                continue;
            }
            () = tokio::time::sleep(sleep) => {}
        }
        match fire(&store, &engine, &agent_limits).await {
            // A retry still due right after being handed over would make this loop spin; the
            // engine clears wake_at of every retry it handles, so this only guards against bugs.
            Ok(after) => {
                next = after.map(|at| at.max(Utc::now() + chrono::Duration::milliseconds(50)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "retry timer could not read due retries");
                next = None;
            }
        }
    }
}

/// Hands every due timer to the engine; returns when the next one is due.
async fn fire(
    store: &Store,
    engine: &EngineHandle,
    agent_limits: &AgentLimits,
) -> Result<Option<DateTime<Utc>>, crate::Error> {
    let client = store.client().await?;
    let limited: Vec<&String> = agent_limits.agents().collect();
    loop {
        let now = Utc::now();
        let retries = db::due_wakeups(&client, now, BATCH).await?;
        let leases = db::expired_leases(&client, now, BATCH).await?;
        let late = db::past_deadlines(&client, now, BATCH).await?;
        let late_runs = db::past_run_deadlines(&client, now, BATCH).await?;
        let mut released = breakers::due_releases(&client, now, BATCH, &limited).await?;
        let (room, refill) = limits::due_releases(&client, agent_limits, now, BATCH).await?;
        released.extend(room);
        let unstarted = db::not_started(&client, now, BATCH).await?;
        let full = [
            retries.len(),
            leases.len(),
            late.len(),
            late_runs.len(),
            released.len().min(BATCH as usize),
            unstarted.len(),
        ]
        .iter()
        .any(|&n| n as i64 == BATCH);
        let index = |i: i32| usize::try_from(i).unwrap_or_default();
        let number = |n: i32| u32::try_from(n).unwrap_or_default();
        let due: Vec<Due> = retries
            .into_iter()
            .map(|(run_id, idx, attempt)| Due::Retry {
                run_id,
                step: index(idx),
                attempt: number(attempt),
            })
            // The engine logs each expiry, with the step's id.
            .chain(leases.into_iter().map(|l| Due::Lease {
                run_id: l.run_id,
                step: index(l.idx),
                attempt: number(l.attempt),
                task_id: l.task_id,
            }))
            .chain(late.into_iter().map(|l| Due::Timeout {
                run_id: l.run_id,
                step: index(l.idx),
                attempt: number(l.attempt),
                task_id: l.task_id,
            }))
            .chain(unstarted.into_iter().map(|l| Due::NotStarted {
                run_id: l.run_id,
                step: index(l.idx),
                attempt: number(l.attempt),
                task_id: l.task_id,
            }))
            .chain(
                late_runs
                    .into_iter()
                    .map(|run_id| Due::RunTimeout { run_id }),
            )
            .chain(released.into_iter().map(|(run_id, idx)| Due::Release {
                run_id,
                step: index(idx),
            }))
            .collect();
        if !due.is_empty() {
            engine.due(due).await?;
        }
        if !full {
            let next = [
                db::next_wakeup(&client).await?,
                db::next_lease_end(&client).await?,
                db::next_deadline(&client).await?,
                db::next_run_deadline(&client).await?,
                breakers::next_probe(&client).await?,
                db::next_start_by(&client).await?,
                refill,
            ];
            return Ok(next.into_iter().flatten().min());
        }
    }
}
