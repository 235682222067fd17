//! API tokens (kept as the SHA-256 of their value) and the append-only audit log.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use uuid::Uuid;

use crate::Error;

/// A stored API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    /// The namespaces it may see; `*` for all.
    pub namespaces: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const TOKEN_COLUMNS: &str = "id, name, scopes, created_at, last_used_at, revoked_at, namespaces";

fn token(r: &tokio_postgres::Row) -> Token {
    Token {
        id: r.get(0),
        name: r.get(1),
        scopes: r.get(2),
        created_at: r.get(3),
        last_used_at: r.get(4),
        revoked_at: r.get(5),
        namespaces: r.get(6),
    }
}

/// Stores a new token that may see `namespaces` (`*` for all).
pub async fn create_token(
    client: &impl GenericClient,
    name: &str,
    hash: &[u8],
    scopes: &[String],
    namespaces: &[String],
) -> Result<Token, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "INSERT INTO api_tokens (id, name, hash, scopes, namespaces) VALUES ($1, $2, $3, $4, $5)
             RETURNING {TOKEN_COLUMNS}"
        ))
        .await?;
    let row = client
        .query_one(
            &stmt,
            &[&Uuid::now_v7(), &name, &hash, &scopes, &namespaces],
        )
        .await?;
    Ok(token(&row))
}

/// What [`seed_token`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seeded {
    Created(Token),
    /// A token of that value was stored already (by an earlier start, or another coordinator).
    Exists(Token),
}

/// Stores a token of a given value, of every namespace, unless one of that value is stored
/// already: any number of coordinators may do this at once, and again at every start.
pub async fn seed_token(
    client: &impl GenericClient,
    name: &str,
    hash: &[u8],
    scopes: &[String],
) -> Result<Seeded, Error> {
    let insert = client
        .prepare_cached(&format!(
            "INSERT INTO api_tokens (id, name, hash, scopes, namespaces)
             VALUES ($1, $2, $3, $4, '{{*}}')
             ON CONFLICT (hash) DO NOTHING RETURNING {TOKEN_COLUMNS}"
        ))
        .await?;
    if let Some(row) = client
        .query_opt(&insert, &[&Uuid::now_v7(), &name, &hash, &scopes])
        .await?
    {
        return Ok(Seeded::Created(token(&row)));
    }
    let select = client
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE hash = $1"
        ))
        .await?;
    Ok(Seeded::Exists(token(
        &client.query_one(&select, &[&hash]).await?,
    )))
}

/// Stores a token with scope `admin` of every namespace unless a token with that scope, not
/// revoked, exists; answers whether it stored it. Coordinators starting together store one between them.
pub async fn create_admin_unless_any(
    client: &mut deadpool_postgres::Object,
    name: &str,
    hash: &[u8],
) -> Result<Option<Token>, Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('flotilla:first-admin-token'))",
        &[],
    )
    .await?;
    let exists = tx
        .query_opt(
            "SELECT 1 FROM api_tokens WHERE 'admin' = ANY (scopes) AND revoked_at IS NULL LIMIT 1",
            &[],
        )
        .await?
        .is_some();
    if exists {
        return Ok(None);
    }
    let created = create_token(&tx, name, hash, &["admin".to_string()], &["*".to_string()]).await?;
    tx.commit().await?;
    Ok(Some(created))
}

/// The token, not revoked, whose value has this hash. Its `last_used_at` is written when it is
/// older than `touch_after`, so that a busy token does not cost a write per request.
pub async fn active_token(
    client: &impl GenericClient,
    hash: &[u8],
    touch_after: std::time::Duration,
) -> Result<Option<Token>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "WITH found AS (
                 SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE hash = $1 AND revoked_at IS NULL
             ), touched AS (
                 UPDATE api_tokens SET last_used_at = now()
                 WHERE id = (SELECT id FROM found)
                   AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => $2))
             )
             SELECT {TOKEN_COLUMNS} FROM found"
        ))
        .await?;
    let secs = touch_after.as_secs_f64();
    Ok(client
        .query_opt(&stmt, &[&hash, &secs])
        .await?
        .map(|r| token(&r)))
}

/// Every token whose namespaces are all among `namespaces` (every token when `None`), oldest
/// first.
pub async fn tokens(
    client: &impl GenericClient,
    namespaces: Option<&[String]>,
) -> Result<Vec<Token>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens
             WHERE $1::text[] IS NULL OR namespaces <@ $1
             ORDER BY created_at, id"
        ))
        .await?;
    Ok(client
        .query(&stmt, &[&namespaces])
        .await?
        .iter()
        .map(token)
        .collect())
}

/// Revokes token `id` if its namespaces are all among `namespaces` (any when `None`); a revoked
/// token stays revoked as it was. `None` when there is no such token.
pub async fn revoke_token(
    client: &impl GenericClient,
    namespaces: Option<&[String]>,
    id: Uuid,
) -> Result<Option<Token>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())
             WHERE id = $1 AND ($2::text[] IS NULL OR namespaces <@ $2)
             RETURNING {TOKEN_COLUMNS}"
        ))
        .await?;
    Ok(client
        .query_opt(&stmt, &[&id, &namespaces])
        .await?
        .map(|r| token(&r)))
}

/// An entry of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub actor: String,
    pub credential: String,
    pub action: String,
    pub target: Value,
    pub peer: Option<String>,
    pub status: i16,
}

/// A stored entry of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub record: AuditRecord,
}

/// Appends entries to the audit log, in order, with one statement.
pub async fn record(client: &impl GenericClient, entries: &[AuditRecord]) -> Result<(), Error> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO audit_log (actor, credential, action, target, peer, status)
             SELECT actor, credential, action, target, peer, status
             FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::text[],
                                  $6::int2[])
             WITH ORDINALITY AS e(actor, credential, action, target, peer, status, n)
             ORDER BY n",
        )
        .await?;
    let column = |f: fn(&AuditRecord) -> &String| entries.iter().map(f).collect::<Vec<_>>();
    let targets: Vec<&Value> = entries.iter().map(|e| &e.target).collect();
    let peers: Vec<Option<&str>> = entries.iter().map(|e| e.peer.as_deref()).collect();
    let statuses: Vec<i16> = entries.iter().map(|e| e.status).collect();
    client
        .execute(
            &stmt,
            &[
                &column(|e| &e.actor),
                &column(|e| &e.credential),
                &column(|e| &e.action),
                &targets,
                &peers,
                &statuses,
            ],
        )
        .await?;
    Ok(())
}

/// Entries of the audit log, newest first: those at or after `since`, of `actor`, with an id
/// below `before`, at most `limit`.
pub async fn audit(
    client: &impl GenericClient,
    since: Option<DateTime<Utc>>,
    actor: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditRow>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT id, at, actor, credential, action, target, peer, status FROM audit_log
             WHERE ($1::timestamptz IS NULL OR at >= $1)
               AND ($2::text IS NULL OR actor = $2)
               AND ($3::bigint IS NULL OR id < $3)
             ORDER BY id DESC LIMIT $4",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&since, &actor, &before, &limit])
        .await?
        .iter()
        .map(|r| AuditRow {
            id: r.get(0),
            at: r.get(1),
            record: AuditRecord {
                actor: r.get(2),
                credential: r.get(3),
                action: r.get(4),
                target: r.get(5),
                peer: r.get(6),
                status: r.get(7),
            },
        })
        .collect())
}
