//! Step logs: the lines handlers wrote, appended in batches by the coordinator's logs consumer
//! and read by the API.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::{Client, Error};

/// A line a worker sent, as the consumer hands it over.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLine {
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: i32,
    /// The execution of the attempt that wrote it, and its number there: a line is stored once
    /// per pair.
    pub execution_id: Uuid,
    pub line_no: i64,
    pub stream: String,
    pub line: String,
    pub at: DateTime<Utc>,
}

/// Appends `lines` (in the order given, within each run) to their runs' logs in one
/// transaction; answers how many were stored.
///
/// A line already stored is skipped, so a batch delivered again changes nothing; so is a line
/// of a run that does not exist. Each attempt's log keeps at most `max_bytes` bytes of lines:
/// the first line past that, and every line after it, is dropped, and the attempt is marked
/// truncated.
pub async fn append(client: &mut Client, lines: &[NewLine], max_bytes: i64) -> Result<u64, Error> {
    // The same line twice in one batch (a worker that published a batch twice) is one line.
    let mut seen = HashSet::new();
    let lines: Vec<&NewLine> = lines
        .iter()
        .filter(|l| seen.insert((l.run_id, &l.step_id, l.attempt, l.execution_id, l.line_no)))
        .collect();
    if lines.is_empty() {
        return Ok(0);
    }
    let run_ids: Vec<Uuid> = lines.iter().map(|l| l.run_id).collect();
    let step_ids: Vec<&str> = lines.iter().map(|l| l.step_id.as_str()).collect();
    let attempts: Vec<i32> = lines.iter().map(|l| l.attempt).collect();
    let executions: Vec<Uuid> = lines.iter().map(|l| l.execution_id).collect();
    let line_nos: Vec<i64> = lines.iter().map(|l| l.line_no).collect();
    let streams: Vec<&str> = lines.iter().map(|l| l.stream.as_str()).collect();
    let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
    let ats: Vec<DateTime<Utc>> = lines.iter().map(|l| l.at).collect();

    let tx = client.transaction().await?;
    // Locks the log of every run the batch writes to, in id order so that coordinators writing
    // logs at once never deadlock; every later statement reads under these locks.
    let lock = tx
        .prepare_cached(
            "INSERT INTO step_log_runs (run_id)
             SELECT id FROM runs WHERE id = ANY($1) ORDER BY id
             ON CONFLICT (run_id) DO UPDATE SET lines = step_log_runs.lines",
        )
        .await?;
    tx.execute(&lock, &[&run_ids]).await?;
    let attempts_stmt = tx
        .prepare_cached(
            "INSERT INTO step_log_attempts (run_id, step_id, attempt)
             SELECT DISTINCT u.run_id, u.step_id, u.attempt
             FROM unnest($1::uuid[], $2::text[], $3::int4[]) AS u(run_id, step_id, attempt)
             JOIN step_log_runs r ON r.run_id = u.run_id
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&attempts_stmt, &[&run_ids, &step_ids, &attempts])
        .await?;
    let insert = tx
        .prepare_cached(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::uuid[], $5::int8[],
                                      $6::text[], $7::text[], $8::timestamptz[])
                     WITH ORDINALITY
                     AS u(run_id, step_id, attempt, execution_id, line_no, stream, line, at, ord)
             ),
             fresh AS (
                 SELECT i.*, a.truncated,
                        a.bytes + sum(octet_length(i.line)) OVER (
                            PARTITION BY i.run_id, i.step_id, i.attempt ORDER BY i.ord) AS upto
                 FROM input i
                 JOIN step_log_attempts a
                   ON (a.run_id, a.step_id, a.attempt) = (i.run_id, i.step_id, i.attempt)
                 WHERE NOT EXISTS (
                     SELECT 1 FROM step_logs l
                     WHERE (l.run_id, l.step_id, l.attempt, l.execution_id, l.line_no)
                         = (i.run_id, i.step_id, i.attempt, i.execution_id, i.line_no))
             ),
             kept AS (
                 SELECT f.*, r.lines + row_number() OVER (PARTITION BY f.run_id ORDER BY f.ord) AS seq
                 FROM fresh f JOIN step_log_runs r ON r.run_id = f.run_id
                 WHERE NOT f.truncated AND f.upto <= $9
             ),
             stored AS (
                 INSERT INTO step_logs (run_id, seq, step_id, attempt, execution_id, line_no,
                                        stream, line, at)
                 SELECT run_id, seq, step_id, attempt, execution_id, line_no, stream, line, at
                 FROM kept
             ),
             numbered AS (
                 UPDATE step_log_runs r SET lines = r.lines + k.n
                 FROM (SELECT run_id, count(*) AS n FROM kept GROUP BY run_id) k
                 WHERE r.run_id = k.run_id
             ),
             sized AS (
                 UPDATE step_log_attempts a
                 SET bytes = a.bytes + s.added, truncated = a.truncated OR s.dropped
                 FROM (SELECT run_id, step_id, attempt,
                              coalesce(sum(octet_length(line))
                                       FILTER (WHERE NOT truncated AND upto <= $9), 0) AS added,
                              bool_or(truncated OR upto > $9) AS dropped
                       FROM fresh GROUP BY run_id, step_id, attempt) s
                 WHERE (a.run_id, a.step_id, a.attempt) = (s.run_id, s.step_id, s.attempt)
             )
             SELECT count(*) FROM kept",
        )
        .await?;
    let stored: i64 = tx
        .query_one(
            &insert,
            &[
                &run_ids,
                &step_ids,
                &attempts,
                &executions,
                &line_nos,
                &streams,
                &texts,
                &ats,
                &max_bytes,
            ],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(u64::try_from(stored).unwrap_or(0))
}

/// Which lines of a run's log to read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogQuery {
    /// Only this step's lines.
    pub step_id: Option<String>,
    /// Only this attempt's lines.
    pub attempt: Option<i32>,
    /// Only lines after the one numbered so in the run's log (0: from the start).
    pub after: i64,
    pub limit: i64,
}

/// A stored line.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLine {
    /// Its place in the run's log, from 1.
    pub seq: i64,
    pub step_id: String,
    pub attempt: i32,
    pub stream: String,
    pub line: String,
    pub at: DateTime<Utc>,
}

/// An attempt whose log went past the cap.
#[derive(Debug, Clone, PartialEq)]
pub struct Truncated {
    pub step_id: String,
    pub attempt: i32,
    /// What its log kept.
    pub bytes: i64,
}

/// The lines of run `run_id` that `query` asks for, in order.
pub async fn read(
    client: &impl GenericClient,
    run_id: Uuid,
    query: &LogQuery,
) -> Result<Vec<StoredLine>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT seq, step_id, attempt, stream, line, at FROM step_logs
             WHERE run_id = $1 AND seq > $2
               AND ($3::text IS NULL OR step_id = $3) AND ($4::int4 IS NULL OR attempt = $4)
             ORDER BY seq LIMIT $5",
        )
        .await?;
    let rows = client
        .query(
            &stmt,
            &[
                &run_id,
                &query.after,
                &query.step_id,
                &query.attempt,
                &query.limit,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| StoredLine {
            seq: r.get(0),
            step_id: r.get(1),
            attempt: r.get(2),
            stream: r.get(3),
            line: r.get(4),
            at: r.get(5),
        })
        .collect())
}

/// The attempts of run `run_id` (of `step_id` and `attempt`, when given) whose logs were cut at
/// the cap, in step and attempt order.
pub async fn truncated(
    client: &impl GenericClient,
    run_id: Uuid,
    step_id: Option<&str>,
    attempt: Option<i32>,
) -> Result<Vec<Truncated>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT step_id, attempt, bytes FROM step_log_attempts
             WHERE run_id = $1 AND truncated
               AND ($2::text IS NULL OR step_id = $2) AND ($3::int4 IS NULL OR attempt = $3)
             ORDER BY step_id, attempt",
        )
        .await?;
    let rows = client.query(&stmt, &[&run_id, &step_id, &attempt]).await?;
    Ok(rows
        .iter()
        .map(|r| Truncated {
            step_id: r.get(0),
            attempt: r.get(1),
            bytes: r.get(2),
        })
        .collect())
}
