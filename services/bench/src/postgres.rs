//! `postgres-commit`: the other floor of a step, one durable commit. A single client commits
//! one small row at a time (the latency of a commit), then 8 clients commit side by side for a
//! while (how many commits per second the server's WAL flushes allow).

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{Latency, Report, Sizes};

/// Concurrent clients of the second half.
const CLIENTS: usize = 8;

/// Runs the scenario in a database of its own, dropped after.
pub async fn commit(sizes: &Sizes) -> anyhow::Result<Report> {
    let database = format!(
        "flotilla_bench_{}",
        &Uuid::new_v4().simple().to_string()[..16]
    );
    let admin = connect("postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{database}\""))
        .await?;
    let measured = measure(&database, sizes).await;
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await?;
    measured
}

async fn connect(database: &str) -> anyhow::Result<tokio_postgres::Client> {
    let url = flotilla_tests::postgres_url(database);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {}", flotilla_tests::postgres_url("")))?;
    tokio::spawn(connection);
    Ok(client)
}

/// The row each commit writes: about the size of a step's update.
const INSERT: &str = "INSERT INTO commits (at, body) VALUES (now(), $1)";

async fn measure(database: &str, sizes: &Sizes) -> anyhow::Result<Report> {
    let client = connect(database).await?;
    client
        .batch_execute(
            "CREATE TABLE commits (id bigserial PRIMARY KEY, at timestamptz NOT NULL, body text NOT NULL)",
        )
        .await?;
    let body = "x".repeat(200);

    // One client: each statement is its own transaction, so each one waits for its WAL flush.
    let insert = client.prepare(INSERT).await?;
    let mut latencies = Vec::with_capacity(sizes.commits);
    let started = Instant::now();
    for _ in 0..sizes.commits {
        let at = Instant::now();
        client.execute(&insert, &[&body]).await?;
        latencies.push(at.elapsed());
    }
    let single_elapsed = started.elapsed();

    // Eight clients, each committing as fast as it can until the time is up.
    let window = Duration::from_secs(sizes.commit_seconds);
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let client = connect(database).await?;
        let insert = client.prepare(INSERT).await?;
        let body = body.clone();
        clients.push(tokio::spawn(async move {
            let deadline = Instant::now() + window;
            let mut commits = 0usize;
            while Instant::now() < deadline {
                client.execute(&insert, &[&body]).await?;
                commits += 1;
            }
            anyhow::Ok(commits)
        }));
    }
    let started = Instant::now();
    let mut commits = 0;
    for handle in clients {
        commits += handle.await??;
    }
    let concurrent_elapsed = started.elapsed();

    let report = Report::new("postgres-commit", commits, "commits", concurrent_elapsed)
        .latency(Latency::of("one commit of one client", latencies))
        .details(json!({
            "clients": CLIENTS,
            "single_client_commits": sizes.commits,
            "single_client_commits_per_s": sizes.commits as f64 / single_elapsed.as_secs_f64(),
        }));
    Ok(report)
}
