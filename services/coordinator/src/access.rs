//! Credentials and the audit log: the API's [`Access`] over Postgres, the guard built from the
//! configuration, and the admin token a coordinator makes sure exists at start.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_api::auth::{AuditRecord, JwtKeys, NewToken};
use flotilla_api::{Access, BackendError, Guard, Namespaces, RateLimiter};
use flotilla_api_model::{AuditEntry, AuditPage, AuditQuery, TokenSummary};
use flotilla_store::Store;
use flotilla_store::access::{self, Seeded, Token};
use tokio::sync::{mpsc, oneshot};
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
        if let Some(token) = self.tokens.get(&hash) {
            return Ok(Some(token));
        }
        let client = self.store.client().await.map_err(store_error)?;
        let token = access::active_token(&client, &hash, LAST_USED_RESOLUTION)
            .await
            .map(|t| t.map(summary))
            .map_err(store_error)?;
        if let Some(token) = &token {
            self.tokens.put(hash, token.clone());
        }
        Ok(token)
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
        let revoked = access::revoke_token(&client, namespaces.filter(), id)
            .await
            .map(|t| t.map(summary))
            .map_err(store_error)?;
        if revoked.is_some() {
            self.tokens.forget(id);
        }
        Ok(revoked)
    }

    async fn record(&self, entry: AuditRecord) -> Result<(), BackendError> {
        self.audit
            .record(access::AuditRecord {
                actor: entry.actor,
                credential: entry.credential.as_str().to_string(),
                action: entry.action,
                target: serde_json::Value::Object(entry.target),
                peer: entry.peer,
                status: i16::try_from(entry.status).unwrap_or(i16::MAX),
            })
            .await
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

/// How long a token found valid is trusted without asking Postgres again: most requests then
/// cost no query before their own. A token revoked through this coordinator is refused at once;
/// through another, here at the latest this long after.
const TOKEN_TRUST: Duration = Duration::from_secs(5);

/// The most tokens remembered; only valid ones are, so guessing cannot fill it with junk.
const TOKENS_REMEMBERED: usize = 1024;

/// Valid tokens seen lately, by hash.
#[derive(Default)]
pub struct TokenCache {
    found: Mutex<HashMap<[u8; 32], (Instant, TokenSummary)>>,
}

impl TokenCache {
    fn get(&self, hash: &[u8; 32]) -> Option<TokenSummary> {
        let found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        found
            .get(hash)
            .filter(|(at, _)| at.elapsed() < TOKEN_TRUST)
            .map(|(_, token)| token.clone())
    }

    fn put(&self, hash: [u8; 32], token: TokenSummary) {
        let mut found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        if found.len() >= TOKENS_REMEMBERED {
            found.retain(|_, (at, _)| at.elapsed() < TOKEN_TRUST);
            if found.len() >= TOKENS_REMEMBERED {
                found.clear();
            }
        }
        found.insert(hash, (Instant::now(), token));
    }

    fn forget(&self, id: Uuid) {
        let mut found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        found.retain(|_, (_, token)| token.id != id);
    }
}

/// The most entries one statement appends.
const AUDIT_BATCH: usize = 256;

type AuditReply = oneshot::Sender<Result<(), String>>;

/// Appends audit entries with group commit: the entries of requests that end together share one
/// statement and one commit, while each request still waits until its own entry is stored.
/// Under load that is one WAL flush for many requests instead of one each.
#[derive(Clone)]
pub struct AuditWriter {
    queue: mpsc::Sender<(access::AuditRecord, AuditReply)>,
}

impl AuditWriter {
    /// Starts the writer; it stops once every clone is dropped and the queued entries written.
    pub fn start(store: Store) -> Self {
        let (queue, mut incoming) = mpsc::channel(4 * AUDIT_BATCH);
        tokio::spawn(async move {
            let mut taken = Vec::with_capacity(AUDIT_BATCH);
            while incoming.recv_many(&mut taken, AUDIT_BATCH).await > 0 {
                let (entries, replies): (Vec<_>, Vec<AuditReply>) = taken.drain(..).unzip();
                let written = match store.client().await {
                    Ok(client) => access::record(&client, &entries).await,
                    Err(e) => Err(e),
                };
                let outcome = written.map_err(|e| e.to_string());
                for reply in replies {
                    // A request that gave up waiting has nobody to tell.
                    let _ = reply.send(outcome.clone());
                }
            }
        });
        Self { queue }
    }

    async fn record(&self, entry: access::AuditRecord) -> Result<(), BackendError> {
        let (reply, written) = oneshot::channel();
        let stopped = || BackendError::Unavailable("the audit log writer has stopped".into());
        self.queue
            .send((entry, reply))
            .await
            .map_err(|_| stopped())?;
        written
            .await
            .map_err(|_| stopped())?
            .map_err(BackendError::Internal)
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
