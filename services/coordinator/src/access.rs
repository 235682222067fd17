//! Credentials and the audit log: the API's [`Access`] over Postgres, the guard built from the
//! configuration, and the admin token a coordinator makes sure exists at start.

use std::time::Duration;

use anyhow::Context;
use flotilla_api::auth::{AuditRecord, JwtKeys, NewToken};
use flotilla_api::{Access, BackendError, Guard, Namespaces, RateLimiter};
use flotilla_api_model::{AuditEntry, AuditPage, AuditQuery, TokenSummary};
use flotilla_store::Store;
use flotilla_store::access::{self, Seeded, Token};
use uuid::Uuid;

use crate::Config;
use crate::backend::{CoordinatorBackend, store_error};

/// How stale a token's `last_used_at` may get before a request writes it again.
const LAST_USED_RESOLUTION: Duration = Duration::from_secs(60);

/// The name of the admin token a coordinator creates at start.
const ADMIN_TOKEN_NAME: &str = "admin";

fn summary(t: Token) -> TokenSummary {
    TokenSummary {
        id: t.id,
        name: t.name,
        scopes: t.scopes,
        namespaces: t.namespaces,
        created_at: t.created_at,
        last_used_at: t.last_used_at,
        revoked_at: t.revoked_at,
    }
}

impl Access for CoordinatorBackend {
    async fn token(&self, hash: [u8; 32]) -> Result<Option<TokenSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        access::active_token(&client, &hash, LAST_USED_RESOLUTION)
            .await
            .map(|t| t.map(summary))
            .map_err(store_error)
    }

    async fn create_token(
        &self,
        name: String,
        scopes: Vec<String>,
        namespaces: Vec<String>,
        hash: [u8; 32],
    ) -> Result<TokenSummary, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        access::create_token(&client, &name, &hash, &scopes, &namespaces)
            .await
            .map(summary)
            .map_err(store_error)
    }

    async fn tokens(&self, namespaces: &Namespaces) -> Result<Vec<TokenSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        Ok(access::tokens(&client, namespaces.filter())
            .await
            .map_err(store_error)?
            .into_iter()
            .map(summary)
            .collect())
    }

    async fn revoke_token(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> Result<Option<TokenSummary>, BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        access::revoke_token(&client, namespaces.filter(), id)
            .await
            .map(|t| t.map(summary))
            .map_err(store_error)
    }

    async fn record(&self, entry: AuditRecord) -> Result<(), BackendError> {
        let client = self.store.client().await.map_err(store_error)?;
        access::record(
            &client,
            &access::AuditRecord {
                actor: entry.actor,
                credential: entry.credential.as_str().to_string(),
                action: entry.action,
                target: serde_json::Value::Object(entry.target),
                peer: entry.peer,
                status: i16::try_from(entry.status).unwrap_or(i16::MAX),
            },
        )
        .await
        .map_err(store_error)
    }

    async fn audit(&self, query: AuditQuery) -> Result<AuditPage, BackendError> {
        let limit = query
            .limit
            .unwrap_or(flotilla_api::auth::DEFAULT_AUDIT_LIMIT);
        let client = self.store.client().await.map_err(store_error)?;
        let rows = access::audit(
            &client,
            query.since,
            query.actor.as_deref(),
            query.cursor,
            i64::from(limit) + 1,
        )
        .await
        .map_err(store_error)?;
        // One more than asked for tells whether there is a next page.
        let more = rows.len() > limit as usize;
        let entries: Vec<AuditEntry> = rows
            .into_iter()
            .take(limit as usize)
            .map(|row| AuditEntry {
                id: row.id,
                at: row.at,
                actor: row.record.actor,
                credential: row.record.credential,
                action: row.record.action,
                target: match row.record.target {
                    serde_json::Value::Object(map) => map,
                    _ => Default::default(),
                },
                peer: row.record.peer,
                status: u16::try_from(row.record.status).unwrap_or(0),
            })
            .collect();
        let next_cursor = if more {
            entries.last().map(|e| e.id)
        } else {
            None
        };
        Ok(AuditPage {
            entries,
            next_cursor,
        })
    }
}

/// The guard of the API, as configured: JWT keys read from their files.
pub fn guard<A>(config: &Config, access: std::sync::Arc<A>) -> anyhow::Result<Guard<A>> {
    let jwt = if config.accepts_jwts() {
        let (Some(issuer), Some(audience)) = (&config.jwt_issuer, &config.jwt_audience) else {
            anyhow::bail!("JWT keys need FLOTILLA_JWT_ISSUER and FLOTILLA_JWT_AUDIENCE");
        };
        let mut keys = JwtKeys::new(issuer, audience);
        if let Some(secret) = &config.jwt_hs256_secret {
            keys = keys
                .hs256(secret.as_bytes())
                .context("FLOTILLA_JWT_HS256_SECRET")?;
        }
        for path in &config.jwt_rs256_keys {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            keys = keys
                .rs256_pem(&pem)
                .with_context(|| format!("RS256 key {}", path.display()))?;
        }
        for path in &config.jwt_es256_keys {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            keys = keys
                .es256_pem(&pem)
                .with_context(|| format!("ES256 key {}", path.display()))?;
        }
        Some(keys)
    } else {
        None
    };
    Ok(Guard {
        access,
        jwt,
        enabled: !config.insecure_no_auth,
        protect_metrics: config.protect_metrics,
        trust_forwarded_for: config.trust_forwarded_for,
        rate: RateLimiter::new(config.quotas().map_err(anyhow::Error::msg)?),
    })
}

/// Makes sure an admin can get in: stores `FLOTILLA_ADMIN_TOKEN` if it is set; otherwise, unless
/// JWTs are accepted or an admin token exists, creates one and prints it once, on stderr.
pub async fn ensure_admin(store: &Store, config: &Config) -> anyhow::Result<()> {
    if config.insecure_no_auth {
        tracing::warn!(
            "authentication is off (--insecure-no-auth): anyone who reaches the API may do anything"
        );
        return Ok(());
    }
    let mut client = store.client().await?;
    // An empty value (a variable set to nothing) is no token.
    if let Some(value) = config.admin_token.as_ref().filter(|v| !v.is_empty()) {
        let token = NewToken::of(value.clone());
        let scopes = ["admin".to_string()];
        match access::seed_token(&client, ADMIN_TOKEN_NAME, &token.hash, &scopes).await? {
            Seeded::Created(t) => {
                tracing::info!(token_id = %t.id, "admin token from FLOTILLA_ADMIN_TOKEN stored")
            }
            Seeded::Exists(t) if t.revoked_at.is_some() => {
                tracing::warn!(token_id = %t.id, "the token of FLOTILLA_ADMIN_TOKEN was revoked; it stays revoked")
            }
            Seeded::Exists(_) => {}
        }
        return Ok(());
    }
    if config.accepts_jwts() {
        return Ok(());
    }
    let token = NewToken::generate();
    if let Some(created) =
        access::create_admin_unless_any(&mut client, ADMIN_TOKEN_NAME, &token.hash).await?
    {
        tracing::info!(token_id = %created.id, "admin token created");
        // Deliberately not a log line: the value is shown once, to whoever started the
        // coordinator, and is kept nowhere else.
        eprintln!(
            "\n==================== FLOTILLA ADMIN TOKEN (shown once) ====================\n\
             {}\n\
             Use it as FLOTILLA_API_TOKEN for the CLI, or send `Authorization: Bearer <token>`.\n\
             Create tokens with less power with `flotilla tokens create`.\n\
             ===========================================================================\n",
            token.value
        );
    }
    Ok(())
}
