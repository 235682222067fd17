//! Named definitions and their revisions, and definition contents by hash.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use flotilla_core::Definition;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::Error;

/// A definition's content as stored, with the hash that names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub hash: String,
    pub body: Value,
}

impl Content {
    /// The canonical JSON of a definition and its SHA-256. serde_json's maps are sorted, so the
    /// same definition always hashes the same, whichever format it was written in.
    pub fn of(definition: &Definition) -> Self {
        let body = serde_json::to_value(definition).expect("a definition always serialises");
        let bytes = serde_json::to_vec(&body).expect("a JSON value always serialises");
        let hash = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self { hash, body }
    }
}

/// One registered revision of a named definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub name: String,
    pub revision: i32,
    pub hash: String,
    pub version: Option<String>,
    pub description: Option<String>,
    pub steps: i32,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "name, revision, hash, version, description, steps, created_at";

fn registered(r: &tokio_postgres::Row) -> Registered {
    Registered {
        name: r.get(0),
        revision: r.get(1),
        hash: r.get(2),
        version: r.get(3),
        description: r.get(4),
        steps: r.get(5),
        created_at: r.get(6),
    }
}

/// Registers a definition under its name in `namespace` as the next revision.
pub async fn register(
    client: &mut deadpool_postgres::Object,
    namespace: &str,
    definition: &Definition,
) -> Result<Registered, Error> {
    let content = Content::of(definition);
    let tx = client.transaction().await?;
    // Serialise registrations of one name so revisions count up without gaps or clashes.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))",
        &[&namespace, &definition.name],
    )
    .await?;
    tx.execute(
        "INSERT INTO definition_contents (hash, body) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING",
        &[&content.hash, &content.body],
    )
    .await?;
    let steps = i32::try_from(definition.steps.len()).unwrap_or(i32::MAX);
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO definitions (namespace, name, revision, hash, version, description, steps)
                 SELECT $6, $1, coalesce(max(revision), 0) + 1, $2, $3, $4, $5
                 FROM definitions WHERE namespace = $6 AND name = $1
                 RETURNING {COLUMNS}"
            ),
            &[
                &definition.name,
                &content.hash,
                &definition.version,
                &definition.description,
                &steps,
                &namespace,
            ],
        )
        .await?;
    tx.commit().await?;
    Ok(registered(&row))
}

/// The latest revision of a named definition of `namespace`, with its content.
pub async fn latest(
    client: &impl GenericClient,
    namespace: &str,
    name: &str,
) -> Result<Option<(Registered, Value)>, Error> {
    // Every submission of a registered definition reads it: prepared once per connection, not
    // parsed and planned afresh (a round trip more) each time.
    let stmt = client
        .prepare_cached(
            "SELECT d.name, d.revision, d.hash, d.version, d.description, d.steps, d.created_at, c.body
             FROM definitions d JOIN definition_contents c ON c.hash = d.hash
             WHERE d.namespace = $2 AND d.name = $1 ORDER BY d.revision DESC LIMIT 1",
        )
        .await?;
    let row = client.query_opt(&stmt, &[&name, &namespace]).await?;
    Ok(row.map(|r| (registered(&r), r.get(7))))
}

/// The content hash of the latest revision of each named definition, by `(namespace, name)`;
/// names not registered are absent. One statement however many are asked: the engine checks
/// the submissions of a batch with it.
pub async fn latest_hashes(
    client: &impl GenericClient,
    names: &[(&str, &str)],
) -> Result<HashMap<(String, String), String>, Error> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let (namespaces, names): (Vec<&str>, Vec<&str>) = names.iter().copied().unzip();
    let stmt = client
        .prepare_cached(
            "SELECT n.namespace, n.name, latest.hash
             FROM unnest($1::text[], $2::text[]) AS n(namespace, name)
             CROSS JOIN LATERAL (SELECT d.hash FROM definitions d
                                 WHERE d.namespace = n.namespace AND d.name = n.name
                                 ORDER BY d.revision DESC LIMIT 1) AS latest",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&namespaces, &names])
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// The latest revision of every named definition of `namespaces` (of all when `None`), by
/// name.
pub async fn list(
    client: &impl GenericClient,
    namespaces: Option<&[String]>,
) -> Result<Vec<Registered>, Error> {
    let rows = client
        .query(
            &format!(
                "SELECT DISTINCT ON (name, namespace) {COLUMNS} FROM definitions
                 WHERE $1::text[] IS NULL OR namespace = ANY($1)
                 ORDER BY name, namespace, revision DESC"
            ),
            &[&namespaces],
        )
        .await?;
    Ok(rows.iter().map(registered).collect())
}

/// Every revision of a named definition of `namespace`, oldest first (none when the name is
/// not registered there).
pub async fn revisions(
    client: &impl GenericClient,
    namespace: &str,
    name: &str,
) -> Result<Vec<Registered>, Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM definitions WHERE namespace = $2 AND name = $1
                 ORDER BY revision"
            ),
            &[&name, &namespace],
        )
        .await?;
    Ok(rows.iter().map(registered).collect())
}

/// One revision of a named definition of `namespace`, with its content: the latest whose
/// `version:` is `version`, or else the revision numbered `version`.
pub async fn version(
    client: &impl GenericClient,
    namespace: &str,
    name: &str,
    version: &str,
) -> Result<Option<(Registered, Value)>, Error> {
    let revision: Option<i32> = version.parse().ok();
    let stmt = client
        .prepare_cached(
            "SELECT d.name, d.revision, d.hash, d.version, d.description, d.steps, d.created_at, c.body
             FROM definitions d JOIN definition_contents c ON c.hash = d.hash
             WHERE d.namespace = $4 AND d.name = $1 AND (d.version = $2 OR d.revision = $3)
             ORDER BY d.version = $2 DESC, d.revision DESC LIMIT 1",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&name, &version, &revision, &namespace])
        .await?;
    Ok(row.map(|r| (registered(&r), r.get(7))))
}
