//! The agents' circuit breakers: locked and written by the engine's batch transaction, so every
//! coordinator agrees on them; read for the API; and the held steps the timer releases.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use flotilla_core::breaker::{Breaker, BreakerConfig, BreakerState, Probe};
use uuid::Uuid;

use crate::Error;

/// Locks the breakers of `agents` (sorted, after the batch's runs, so concurrent coordinators
/// cannot deadlock), creating those that do not exist yet, closed. A probe whose attempt no
/// longer runs (its step was settled by hand, or its run ended) is forgotten.
pub async fn lock(
    tx: &impl GenericClient,
    agents: &[String],
) -> Result<BTreeMap<String, Breaker>, Error> {
    let mut locked = select_for_update(tx, agents).await?;
    let missing: Vec<&String> = agents.iter().filter(|a| !locked.contains_key(*a)).collect();
    if !missing.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO breakers (agent) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&stmt, &[&missing]).await?;
        let missing: Vec<String> = missing.into_iter().cloned().collect();
        locked.extend(select_for_update(tx, &missing).await?);
    }
    Ok(locked)
}

// Every engine batch runs this; whether a probe still runs is asked apart, only of the breakers
// that have one (rare): with that subquery joined in, planning the lock cost Postgres four times
// as much as without, on every batch.
const LOCK: &str = "SELECT b.agent, b.state, b.outcomes, b.opened_at, b.probe_run, b.probe_idx,
                           b.probe_task
                    FROM breakers b WHERE b.agent = ANY($1) ORDER BY b.agent FOR UPDATE OF b";

/// Prepares the statement of [`lock`] on this connection (once: it is cached), so that the lock
/// is sent at once when called: after a statement meant to precede it, whatever their preparing.
pub async fn prepare_lock(tx: &impl GenericClient) -> Result<(), Error> {
    tx.prepare_cached(LOCK).await?;
    Ok(())
}

async fn select_for_update(
    tx: &impl GenericClient,
    agents: &[String],
) -> Result<BTreeMap<String, Breaker>, Error> {
    let stmt = tx.prepare_cached(LOCK).await?;
    let mut locked = tx
        .query(&stmt, &[&agents])
        .await?
        .iter()
        .map(|r| {
            let agent: String = r.get(0);
            let breaker = breaker(r, &agent)?;
            Ok((agent, breaker))
        })
        .collect::<Result<BTreeMap<_, _>, Error>>()?;
    let probes: Vec<&Probe> = locked.values().filter_map(|b| b.probe.as_ref()).collect();
    if !probes.is_empty() {
        let running = running_probes(tx, &probes).await?;
        for breaker in locked.values_mut() {
            // A probe whose attempt is no longer running is over: the breaker may send another.
            breaker.probe = breaker.probe.take().filter(|p| running.contains(p));
        }
    }
    Ok(locked)
}

/// Which of `probes` are attempts still running.
async fn running_probes(tx: &impl GenericClient, probes: &[&Probe]) -> Result<Vec<Probe>, Error> {
    let stmt = tx
        .prepare_cached(
            "SELECT s.run_id, s.idx, s.task_id
             FROM unnest($1::uuid[], $2::int4[], $3::uuid[]) AS p(run_id, idx, task_id)
             JOIN steps s ON s.run_id = p.run_id AND s.idx = p.idx AND s.task_id = p.task_id
             WHERE s.status = 'running'",
        )
        .await?;
    let runs: Vec<Uuid> = probes.iter().map(|p| p.run_id).collect();
    let steps: Vec<i32> = probes
        .iter()
        .map(|p| i32::try_from(p.step).unwrap_or(i32::MAX))
        .collect();
    let tasks: Vec<Uuid> = probes.iter().map(|p| p.task_id).collect();
    Ok(tx
        .query(&stmt, &[&runs, &steps, &tasks])
        .await?
        .iter()
        .map(|r| Probe {
            run_id: r.get(0),
            step: usize::try_from(r.get::<_, i32>(1)).unwrap_or_default(),
            task_id: r.get(2),
        })
        .collect())
}

/// A breaker from the columns `state, outcomes, opened_at, probe_run, probe_idx, probe_task`
/// at positions 1 to 6.
fn breaker(r: &tokio_postgres::Row, agent: &str) -> Result<Breaker, Error> {
    let state: String = r.get(1);
    let outcomes: String = r.get(2);
    let probe = match (r.get(4), r.get::<_, Option<i32>>(5), r.get(6)) {
        (Some(run_id), Some(idx), Some(task_id)) => Some(Probe {
            run_id,
            step: usize::try_from(idx).unwrap_or_default(),
            task_id,
        }),
        _ => None,
    };
    Ok(Breaker {
        state: BreakerState::parse(&state).ok_or_else(|| {
            Error::Corrupt(format!(
                "the breaker of agent `{agent}` has state `{state}`"
            ))
        })?,
        window: outcomes.chars().map(|c| c == '1').collect::<VecDeque<_>>(),
        opened_at: r.get(3),
        probe,
    })
}

/// Writes breakers that changed; the caller holds their locks (see [`lock`]).
pub async fn write<'a>(
    tx: &impl GenericClient,
    config: &BreakerConfig,
    changed: impl Iterator<Item = (&'a str, &'a Breaker)>,
) -> Result<(), Error> {
    let mut agents = Vec::new();
    let mut states = Vec::new();
    let mut outcomes = Vec::new();
    let mut opened = Vec::new();
    let mut probe_at = Vec::new();
    let mut probe_run = Vec::new();
    let mut probe_idx = Vec::new();
    let mut probe_task = Vec::new();
    for (agent, b) in changed {
        agents.push(agent);
        states.push(b.state.as_str());
        outcomes.push(
            b.window
                .iter()
                .map(|&failed| if failed { '1' } else { '0' })
                .collect::<String>(),
        );
        opened.push(b.opened_at);
        probe_at.push(b.probe_at(config));
        probe_run.push(b.probe.map(|p| p.run_id));
        probe_idx.push(b.probe.map(|p| i32::try_from(p.step).unwrap_or(i32::MAX)));
        probe_task.push(b.probe.map(|p| p.task_id));
    }
    if agents.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE breakers b SET state = u.state, outcomes = u.outcomes, opened_at = u.opened_at,
                    probe_at = u.probe_at, probe_run = u.probe_run, probe_idx = u.probe_idx,
                    probe_task = u.probe_task
             FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                         $6::uuid[], $7::int4[], $8::uuid[])
                  AS u(agent, state, outcomes, opened_at, probe_at, probe_run, probe_idx, probe_task)
             WHERE b.agent = u.agent",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &agents,
            &states,
            &outcomes,
            &opened,
            &probe_at,
            &probe_run,
            &probe_idx,
            &probe_task,
        ],
    )
    .await?;
    Ok(())
}

/// One agent's breaker as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerRecord {
    pub agent: String,
    pub breaker: Breaker,
    /// When an open breaker lets its probe through.
    pub probe_at: Option<DateTime<Utc>>,
    /// Steps it holds.
    pub held: i64,
    /// The operator who last reset it, and when.
    pub reset: Option<(String, DateTime<Utc>)>,
}

/// Every agent's breaker, by agent name.
pub async fn list(client: &impl GenericClient) -> Result<Vec<BreakerRecord>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT b.agent, b.state, b.outcomes, b.opened_at, b.probe_run, b.probe_idx,
                    b.probe_task, b.probe_at,
                    (SELECT count(*) FROM steps s WHERE s.held_for = b.agent),
                    b.reset_by, b.reset_at
             FROM breakers b ORDER BY b.agent",
        )
        .await?;
    client
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| {
            let agent: String = r.get(0);
            Ok(BreakerRecord {
                breaker: breaker(r, &agent)?,
                agent,
                probe_at: r.get(7),
                held: r.get(8),
                reset: match (r.get(9), r.get(10)) {
                    (Some(by), Some(at)) => Some((by, at)),
                    _ => None,
                },
            })
        })
        .collect()
}

/// Closes an agent's breaker by an operator's hand (its held steps are then released by the
/// timer); answers whether the agent has a breaker.
pub async fn reset(
    client: &impl GenericClient,
    agent: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<bool, Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE breakers SET state = 'closed', outcomes = '', opened_at = NULL, probe_at = NULL,
                    probe_run = NULL, probe_idx = NULL, probe_task = NULL, reset_by = $2,
                    reset_at = $3
             WHERE agent = $1",
        )
        .await?;
    Ok(client.execute(&stmt, &[&agent, &actor, &now]).await? == 1)
}

/// Held steps whose breaker may let them through at `now`: every one held by a closed breaker
/// (but those of the `limited` agents, whose limits release them: see
/// [`crate::limits::due_releases`]), and the first one held by each breaker due to send a probe
/// (open past its cool-down, or half-open with no probe running). As (run id, step index).
pub async fn due_releases(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
    limited: &[&String],
) -> Result<Vec<(Uuid, i32)>, Error> {
    let stmt = client
        .prepare_cached(
            "(SELECT s.run_id, s.idx FROM steps s LEFT JOIN breakers b ON b.agent = s.held_for
              WHERE s.held_for IS NOT NULL AND (b.agent IS NULL OR b.state = 'closed')
                AND s.held_for <> ALL($3)
              ORDER BY s.run_id, s.idx LIMIT $2)
             UNION ALL
             (SELECT first.run_id, first.idx FROM breakers b
              CROSS JOIN LATERAL (SELECT s.run_id, s.idx FROM steps s WHERE s.held_for = b.agent
                                  ORDER BY s.run_id, s.idx LIMIT 1) first
              WHERE (b.state = 'open' AND b.probe_at <= $1)
                 OR (b.state = 'half_open' AND NOT EXISTS (
                        SELECT 1 FROM steps p
                        WHERE p.run_id = b.probe_run AND p.idx = b.probe_idx
                          AND p.task_id = b.probe_task AND p.status = 'running')))",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&now, &limit, &limited])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// When the next open breaker holding steps lets its probe through, if any.
pub async fn next_probe(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT min(b.probe_at) FROM breakers b
             WHERE b.state = 'open' AND EXISTS (SELECT 1 FROM steps s WHERE s.held_for = b.agent)",
        )
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}
