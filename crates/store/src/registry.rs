//! The registry of workers (`workers`), and what waits for them: attempts dispatched that no
//! worker has started yet.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;

use crate::Error;

/// What one batch of the heartbeats queue says about one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    pub worker_id: String,
    pub agents: Vec<String>,
    pub concurrency: i32,
    /// Tasks it holds, from its latest heartbeat; `None` when the batch had only its
    /// registration.
    pub in_flight: Option<i32>,
    pub seen_at: DateTime<Utc>,
    /// What its registration told, when the batch had one.
    pub registration: Option<Announcement>,
}

/// What a worker tells of itself when it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    pub actions: Vec<String>,
    pub sdk: String,
    pub host: String,
    pub pid: i32,
    pub labels: BTreeMap<String, String>,
    pub started_at: DateTime<Utc>,
}

/// Records a batch: upserts the workers seen (in `worker_id` order, so that coordinators
/// recording batches at once lock rows in one order), then deletes those that said goodbye and
/// those silent since before `forget_before`. Three statements, however many workers.
pub async fn record(
    client: &impl GenericClient,
    seen: &[Sighting],
    gone: &[String],
    forget_before: DateTime<Utc>,
) -> Result<(), Error> {
    if !seen.is_empty() {
        let mut sorted: Vec<&Sighting> = seen.iter().collect();
        sorted.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        let ids: Vec<&str> = sorted.iter().map(|s| s.worker_id.as_str()).collect();
        let agents: Vec<Value> = sorted
            .iter()
            .map(|s| Value::from(s.agents.clone()))
            .collect();
        let concurrency: Vec<i32> = sorted.iter().map(|s| s.concurrency).collect();
        let in_flight: Vec<Option<i32>> = sorted.iter().map(|s| s.in_flight).collect();
        let seen_at: Vec<DateTime<Utc>> = sorted.iter().map(|s| s.seen_at).collect();
        fn announced<'a>(s: &&'a Sighting) -> Option<&'a Announcement> {
            s.registration.as_ref()
        }
        let actions: Vec<Option<Value>> = sorted
            .iter()
            .map(|s| announced(s).map(|r| Value::from(r.actions.clone())))
            .collect();
        let sdk: Vec<Option<&str>> = sorted
            .iter()
            .map(|s| announced(s).map(|r| r.sdk.as_str()))
            .collect();
        let host: Vec<Option<&str>> = sorted
            .iter()
            .map(|s| announced(s).map(|r| r.host.as_str()))
            .collect();
        let pid: Vec<Option<i32>> = sorted.iter().map(|s| announced(s).map(|r| r.pid)).collect();
        let labels: Vec<Option<Value>> = sorted
            .iter()
            .map(|s| {
                announced(s).map(|r| {
                    Value::Object(
                        r.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                            .collect(),
                    )
                })
            })
            .collect();
        let started: Vec<Option<DateTime<Utc>>> = sorted
            .iter()
            .map(|s| announced(s).map(|r| r.started_at))
            .collect();
        let stmt = client
            .prepare_cached(
                "INSERT INTO workers AS w (worker_id, agents, concurrency, in_flight, last_seen,
                                           actions, sdk, host, pid, labels, started_at)
                 SELECT * FROM unnest($1::text[], $2::jsonb[], $3::int4[], $4::int4[], $5::timestamptz[],
                             $6::jsonb[], $7::text[], $8::text[], $9::int4[], $10::jsonb[],
                             $11::timestamptz[])
                      AS u(worker_id, agents, concurrency, in_flight, seen_at, actions, sdk, host,
                           pid, labels, started_at)
                 ON CONFLICT (worker_id) DO UPDATE SET
                     agents = excluded.agents, concurrency = excluded.concurrency,
                     last_seen = greatest(w.last_seen, excluded.last_seen),
                     -- A registration alone says nothing of the tasks held, nor a heartbeat of
                     -- what only the registration tells.
                     in_flight = coalesce(excluded.in_flight, w.in_flight),
                     actions = coalesce(excluded.actions, w.actions),
                     sdk = coalesce(excluded.sdk, w.sdk), host = coalesce(excluded.host, w.host),
                     pid = coalesce(excluded.pid, w.pid),
                     labels = coalesce(excluded.labels, w.labels),
                     started_at = coalesce(excluded.started_at, w.started_at)",
            )
            .await?;
        client
            .execute(
                &stmt,
                &[
                    &ids,
                    &agents,
                    &concurrency,
                    &in_flight,
                    &seen_at,
                    &actions,
                    &sdk,
                    &host,
                    &pid,
                    &labels,
                    &started,
                ],
            )
            .await?;
    }
    let stmt = client
        .prepare_cached("DELETE FROM workers WHERE worker_id = ANY($1) OR last_seen < $2")
        .await?;
    client.execute(&stmt, &[&gone, &forget_before]).await?;
    Ok(())
}

/// A worker of the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub worker_id: String,
    pub agents: Vec<String>,
    pub actions: Vec<String>,
    pub sdk: Option<String>,
    pub concurrency: i32,
    pub host: Option<String>,
    pub pid: Option<i32>,
    pub labels: BTreeMap<String, String>,
    pub started_at: Option<DateTime<Utc>>,
    pub in_flight: i32,
    pub last_seen: DateTime<Utc>,
}

/// Every worker of the registry (those of `agent` only, when given), by id.
pub async fn workers(
    client: &impl GenericClient,
    agent: Option<&str>,
) -> Result<Vec<WorkerRecord>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT worker_id, agents, actions, sdk, concurrency, host, pid, labels, started_at,
                    in_flight, last_seen
             FROM workers WHERE $1::text IS NULL OR agents ? $1 ORDER BY worker_id",
        )
        .await?;
    fn read<T: serde::de::DeserializeOwned + Default>(v: Option<Value>) -> Result<T, Error> {
        v.map_or_else(
            || Ok(T::default()),
            |v| serde_json::from_value(v).map_err(|e| Error::Corrupt(format!("a worker: {e}"))),
        )
    }
    client
        .query(&stmt, &[&agent])
        .await?
        .iter()
        .map(|r| {
            Ok(WorkerRecord {
                worker_id: r.get(0),
                agents: read(r.get(1))?,
                actions: read(r.get(2))?,
                sdk: r.get(3),
                concurrency: r.get(4),
                host: r.get(5),
                pid: r.get(6),
                labels: read(r.get(7))?,
                started_at: r.get(8),
                in_flight: r.get::<_, Option<i32>>(9).unwrap_or(0),
                last_seen: r.get(10),
            })
        })
        .collect()
}

/// The attempts of one agent that wait for a worker to start them.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub agent: String,
    pub attempts: i64,
    /// When the oldest of them was dispatched.
    pub oldest: DateTime<Utc>,
}

/// Dispatched attempts no worker has started yet, by agent (the agent the attempt calls: a
/// fallback's may differ from its step's), in name order. Reads only the queued steps.
pub async fn queued(client: &impl GenericClient) -> Result<Vec<Queued>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT a.agent, count(*), min(s.queued_at)
             FROM steps s JOIN attempts a ON a.task_id = s.task_id
             WHERE s.queued_at IS NOT NULL AND a.agent IS NOT NULL
             GROUP BY a.agent ORDER BY a.agent",
        )
        .await?;
    Ok(client
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| Queued {
            agent: r.get(0),
            attempts: r.get(1),
            oldest: r.get(2),
        })
        .collect())
}
