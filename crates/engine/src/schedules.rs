//! Starts the runs of schedules: each due tick starts one run, whichever coordinator claims it,
//! through an idempotency key that names the tick — so a coordinator that crashes between
//! starting the run and moving the schedule on cannot make the next one start a second run.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::schedule::{Missed, Overlap, Schedule};
use flotilla_core::{Definition, Plan};
use flotilla_store::schedules::{self, ScheduleRow};
use flotilla_store::{Store, definitions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::engine::{EngineHandle, NewRun};

/// Fires due schedules until `shutdown`, looking at least every `poll`.
pub async fn run(store: Store, engine: EngineHandle, poll: Duration, shutdown: CancellationToken) {
    loop {
        let wait = match fire(&store, &engine).await {
            Ok(Some(next)) => (next - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(poll),
            Ok(None) => poll,
            Err(e) => {
                tracing::warn!(error = %e, "schedules could not be fired");
                poll
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Fires every due schedule; answers when the next one is due.
async fn fire(store: &Store, engine: &EngineHandle) -> Result<Option<DateTime<Utc>>, crate::Error> {
    let mut client = store.client().await?;
    let tx = client
        .transaction()
        .await
        .map_err(flotilla_store::Error::from)?;
    let now = Utc::now();
    for due in schedules::claim_due(&tx, now, 100).await? {
        let (next, started) = match tick(&tx, engine, &due, now).await {
            Ok(outcome) => outcome,
            Err(e) => {
                // A broken schedule must not stop the others: it tries again at its next tick.
                tracing::warn!(schedule = %due.name, namespace = %due.namespace, error = %e, "scheduled run not started");
                (next_of(&due, now), None)
            }
        };
        let next = next.unwrap_or(DateTime::<Utc>::MAX_UTC);
        schedules::advance(&tx, &due.namespace, &due.name, next, started).await?;
    }
    tx.commit().await.map_err(flotilla_store::Error::from)?;
    Ok(schedules::next_tick(&client).await?)
}

/// The stored policies are the names the definition format uses.
fn parse(row: &ScheduleRow) -> Result<Schedule, String> {
    let missed: Missed = serde_json::from_value(row.missed.clone().into())
        .map_err(|e| format!("missed policy `{}`: {e}", row.missed))?;
    let overlap: Overlap = serde_json::from_value(row.overlap.clone().into())
        .map_err(|e| format!("overlap policy `{}`: {e}", row.overlap))?;
    Schedule::new(&row.cron, Some(&row.timezone), missed, overlap)
}

fn next_of(row: &ScheduleRow, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    parse(row).ok().and_then(|s| s.next_after(now))
}

/// Starts the run of one due tick, if its policies say so.
async fn tick(
    tx: &impl flotilla_store::GenericClient,
    engine: &EngineHandle,
    due: &ScheduleRow,
    now: DateTime<Utc>,
) -> Result<(Option<DateTime<Utc>>, Option<Uuid>), String> {
    let schedule = parse(due)?;
    let running = match due.last_run_id {
        Some(id) => schedules::run_active(tx, id)
            .await
            .map_err(|e| e.to_string())?,
        None => false,
    };
    let (start, next) = schedule.fire(due.next_at, now, running);
    if !start {
        tracing::info!(schedule = %due.name, tick = %due.next_at, running, "tick skipped by the schedule's policy");
        return Ok((next, None));
    }
    let (_, body) = definitions::latest(tx, &due.namespace, &due.name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no definition named `{}` is registered", due.name))?;
    let definition = Definition::from_value(body).map_err(|e| e.to_string())?;
    let plan = Plan::compile(&definition).map_err(|e| e.to_string())?;
    let params = plan.run_params(due.params.clone());
    let submitted = engine
        .submit(NewRun {
            definition,
            plan: Arc::new(plan),
            params,
            subset: Default::default(),
            priority: None,
            idempotency_key: Some(format!(
                "schedule:{}/{}:{}",
                due.namespace,
                due.name,
                due.next_at.to_rfc3339()
            )),
            namespace: due.namespace.clone(),
            // The tick read the latest revision itself, a moment before.
            latest: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(schedule = %due.name, tick = %due.next_at, run_id = %submitted.id, trace_id = %flotilla_telemetry::trace::trace_id_of(submitted.id.as_u128()), "scheduled run started");
    Ok((next, Some(submitted.id)))
}
