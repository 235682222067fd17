//! Whether Postgres keeps the planner's statistics of the engine's tables current. The engine's
//! statements are planned on them: on tables that grew since their last `ANALYZE` (or were never
//! analyzed) Postgres picks sequential scans and hash joins, so a step's cost grows with the
//! history instead of staying flat. Autovacuum analyzes a table once 50 rows and 10 % of it
//! changed (its default thresholds); with autovacuum off, nothing does.

use crate::Error;

/// The tables the engine's statements touch on every step.
const HOT_TABLES: &[&str] = &["attempts", "outbox", "runs", "steps"];

/// How current the statistics of the engine's tables are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statistics {
    /// Whether autovacuum analyzes tables as they change (it is on, and so is `track_counts`,
    /// which it needs).
    pub autovacuum: bool,
    /// The engine's tables with more rows changed since their last `ANALYZE` (or ever, if never
    /// analyzed) than autovacuum's default thresholds allow: 50 and 10 % of the table.
    pub stale: Vec<String>,
}

/// Reads the settings and the tables' counts of changes (`pg_stat_user_tables`). It takes the
/// driver's client, which a pooled one derefs to, so that the benchmark's plain connection can
/// ask too.
pub async fn statistics(client: &tokio_postgres::Client) -> Result<Statistics, Error> {
    let row = client
        .query_one(
            "SELECT current_setting('autovacuum')::bool AND current_setting('track_counts')::bool,
                    coalesce(array_agg(relname::text ORDER BY relname)
                                 FILTER (WHERE n_mod_since_analyze > 50 + 0.1 * n_live_tup),
                             '{}')
             FROM pg_stat_user_tables
             WHERE schemaname = current_schema() AND relname = ANY($1)",
            &[&HOT_TABLES],
        )
        .await?;
    Ok(Statistics {
        autovacuum: row.get(0),
        stale: row.get(1),
    })
}
