//! Wakes waiting steps when their retry is due: one indexed query per wake-up, never a scan of
//! steps, and asleep in between.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_store::Store;
use flotilla_store::engine as db;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineHandle, Wake};

/// The most retries handed to the engine at once.
const BATCH: i64 = 1_000;

/// Runs until `shutdown`. `hints` carries the due time of every retry the engine schedules, so
/// the timer wakes on time without polling; `poll` bounds the sleep, for retries scheduled by
/// other coordinators.
pub async fn run(
    store: Store,
    engine: EngineHandle,
    mut hints: mpsc::UnboundedReceiver<DateTime<Utc>>,
    poll: Duration,
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
        match fire(&store, &engine).await {
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

/// Hands every due retry to the engine; returns when the next one is due.
async fn fire(store: &Store, engine: &EngineHandle) -> Result<Option<DateTime<Utc>>, crate::Error> {
    let client = store.client().await?;
    loop {
        let due = db::due_wakeups(&client, Utc::now(), BATCH).await?;
        let full = due.len() as i64 == BATCH;
        if !due.is_empty() {
            let wakes = due
                .into_iter()
                .map(|(run_id, idx, attempt)| Wake {
                    run_id,
                    step: usize::try_from(idx).unwrap_or_default(),
                    attempt: u32::try_from(attempt).unwrap_or_default(),
                })
                .collect();
            engine.wake(wakes).await?;
        }
        if !full {
            return Ok(db::next_wakeup(&client).await?);
        }
    }
}
