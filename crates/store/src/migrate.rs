//! Numbered migrations, applied in order under an advisory lock so that several coordinators
//! starting together apply each one once.

use crate::Error;

const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (
        2,
        include_str!("../migrations/0002_leases_dead_letters_idempotency.sql"),
    ),
    (3, include_str!("../migrations/0003_run_events.sql")),
    (4, include_str!("../migrations/0004_step_deadlines.sql")),
    (5, include_str!("../migrations/0005_fleet_pulse.sql")),
    (6, include_str!("../migrations/0006_schedules.sql")),
    (7, include_str!("../migrations/0007_lost_attempts.sql")),
    (8, include_str!("../migrations/0008_for_each_instances.sql")),
    (9, include_str!("../migrations/0009_run_deadlines.sql")),
    (11, include_str!("../migrations/0011_strikes.sql")),
    (
        14,
        include_str!("../migrations/0014_attempts_by_finish.sql"),
    ),
    (15, include_str!("../migrations/0015_step_leases.sql")),
    (16, include_str!("../migrations/0016_sub_workflows.sql")),
    (20, include_str!("../migrations/0020_breakers.sql")),
    (24, include_str!("../migrations/0024_run_subsets.sql")),
    (30, include_str!("../migrations/0030_tokens_audit.sql")),
    (40, include_str!("../migrations/0040_hot_updates.sql")),
    (45, include_str!("../migrations/0045_workers.sql")),
    (55, include_str!("../migrations/0055_namespaces.sql")),
    (65, include_str!("../migrations/0065_runs_by_name.sql")),
    (70, include_str!("../migrations/0070_step_logs.sql")),
    (75, include_str!("../migrations/0075_scaling.sql")),
    (
        80,
        include_str!("../migrations/0080_steps_by_step_id_order.sql"),
    ),
];

/// How the database's migrations compare with those this build knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrations {
    /// The latest migration this build knows.
    pub latest: i32,
    /// Known migrations the database lacks.
    pub pending: Vec<i32>,
    /// Migrations the database has that this build does not know (a newer build applied them).
    pub unknown: Vec<i32>,
}

/// Compares the database's applied migrations with this build's.
pub async fn status(client: &impl deadpool_postgres::GenericClient) -> Result<Migrations, Error> {
    let applied: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known: Vec<i32> = MIGRATIONS.iter().map(|&(v, _)| v).collect();
    Ok(Migrations {
        latest: known.iter().copied().max().unwrap_or(0),
        pending: known
            .iter()
            .copied()
            .filter(|v| !applied.contains(v))
            .collect(),
        unknown: applied.into_iter().filter(|v| !known.contains(v)).collect(),
    })
}

/// Any fixed number works; it only has to be the same in every coordinator.
const LOCK_KEY: i64 = 0x666c_6f74_696c_6c61;

pub(crate) async fn run(client: &mut deadpool_postgres::Object) -> Result<(), Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for &(version, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|source| Error::Migration { version, source })?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tracing::info!(version, "applied migration");
    }
    tx.commit().await?;
    Ok(())
}
