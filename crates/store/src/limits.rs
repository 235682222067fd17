//! What each agent with a limit uses of it: locked and written by the engine's batch
//! transaction, like the breakers, so every coordinator counts the same attempts and tokens;
//! and the held steps the timer releases when a limit has room again.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use flotilla_core::limits::{AgentLimits, Slots};
use uuid::Uuid;

use crate::Error;

/// Locks the slots of `agents` (sorted, after the batch's runs and breakers, so concurrent
/// coordinators cannot deadlock), creating those that do not exist yet, empty. Only batches
/// whose runs call a limited agent pay for it.
pub async fn lock(
    tx: &impl GenericClient,
    agents: &[String],
) -> Result<BTreeMap<String, Slots>, Error> {
    let select = tx
        .prepare_cached(
            "SELECT agent, running, tokens, counted_at FROM agent_limits
             WHERE agent = ANY($1) ORDER BY agent FOR UPDATE",
        )
        .await?;
    let locked = |rows: Vec<tokio_postgres::Row>| -> BTreeMap<String, Slots> {
        rows.iter().map(|r| (r.get(0), slots(r))).collect()
    };
    let found = locked(tx.query(&select, &[&agents]).await?);
    if found.len() == agents.len() {
        return Ok(found);
    }
    // An agent's row is made once, by the first batch that needs it; every later batch locks it
    // with the one statement above.
    let create = tx
        .prepare_cached(
            "INSERT INTO agent_limits (agent) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&create, &[&agents]).await?;
    Ok(locked(tx.query(&select, &[&agents]).await?))
}

/// Slots from the columns `running, tokens, counted_at` at positions 1 to 3.
fn slots(r: &tokio_postgres::Row) -> Slots {
    Slots {
        running: u32::try_from(r.get::<_, i32>(1)).unwrap_or_default(),
        tokens: r.get(2),
        counted_at: r.get(3),
    }
}

/// Writes slots that changed; the caller holds their locks (see [`lock`]).
pub async fn write<'a>(
    tx: &impl GenericClient,
    changed: impl Iterator<Item = (&'a str, &'a Slots)>,
) -> Result<(), Error> {
    let mut agents = Vec::new();
    let mut running = Vec::new();
    let mut tokens = Vec::new();
    let mut counted = Vec::new();
    for (agent, s) in changed {
        agents.push(agent);
        running.push(i32::try_from(s.running).unwrap_or(i32::MAX));
        tokens.push(s.tokens);
        counted.push(s.counted_at);
    }
    if agents.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE agent_limits l SET running = u.running, tokens = u.tokens,
                    counted_at = u.counted_at
             FROM unnest($1::text[], $2::int4[], $3::float8[], $4::timestamptz[])
                  AS u(agent, running, tokens, counted_at)
             WHERE l.agent = u.agent",
        )
        .await?;
    tx.execute(&stmt, &[&agents, &running, &tokens, &counted])
        .await?;
    Ok(())
}

/// Held steps that a limit now has room for, as (run id, step index): for each limited agent
/// whose breaker is closed, its oldest held steps, as many as its limit lets go at `now`. Also
/// answers when a token next frees a step still held for want of one.
pub async fn due_releases(
    client: &impl GenericClient,
    limits: &AgentLimits,
    now: DateTime<Utc>,
    max: i64,
) -> Result<(Vec<(Uuid, i32)>, Option<DateTime<Utc>>), Error> {
    if limits.is_empty() {
        return Ok((Vec::new(), None));
    }
    let agents: Vec<&String> = limits.agents().collect();
    let stmt = client
        .prepare_cached(
            "SELECT l.agent, l.running, l.tokens, l.counted_at FROM agent_limits l
             WHERE l.agent = ANY($1)
               AND EXISTS (SELECT 1 FROM steps s WHERE s.held_for = l.agent)
               AND NOT EXISTS (SELECT 1 FROM breakers b
                               WHERE b.agent = l.agent AND b.state <> 'closed')",
        )
        .await?;
    let rows = client.query(&stmt, &[&agents]).await?;
    let held = client
        .prepare_cached(
            "SELECT run_id, idx FROM steps WHERE held_for = $1 ORDER BY run_id, idx LIMIT $2",
        )
        .await?;
    let mut due = Vec::new();
    let mut next = None;
    for r in &rows {
        let agent: String = r.get(0);
        let Some(limit) = limits.get(&agent) else {
            continue;
        };
        let slots = slots(r);
        let free = i64::from(slots.free(limit, now)).min(max - due.len() as i64);
        if free <= 0 {
            next = next.into_iter().chain(slots.next_token(limit, now)).min();
            continue;
        }
        due.extend(
            client
                .query(&held, &[&agent, &free])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1))),
        );
    }
    Ok((due, next))
}
