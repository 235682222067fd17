//! Who may call the API: credentials (API tokens and JWTs), scopes, the layer that checks them
//! on every route, the audit of state-changing requests, and the admin routes of tokens and the
//! audit log.
//!
//! | route                      | answer                                              |
//! | -------------------------- | --------------------------------------------------- |
//! | `POST   /api/tokens`       | 201 [`CreatedToken`] (body: [`NewTokenRequest`]): the value, shown once |
//! | `GET    /api/tokens`       | 200 [`TokenList`]                                   |
//! | `DELETE /api/tokens/{id}`  | 200 [`TokenSummary`], revoked                       |
//! | `GET    /api/audit`        | 200 [`AuditPage`] (query: [`AuditQuery`])           |
//!
//! Every route but `/health*`, `/api/openapi.json`, `/dashboard*` (and `/metrics`, unless
//! [`Guard::protect_metrics`]) takes a credential as `Authorization: Bearer <credential>`: none, or
//! one that is not valid, is answered 401 (`unauthorized`, with `WWW-Authenticate: Bearer`); a
//! valid one without the route's scope, 403 (`forbidden`). The scope a route needs follows from its
//! method and path ([`required_scope`]): reads need `read`, submitting `execute`, the operator
//! actions on a run and dead-letter redrives `operate`, everything else (definitions, schedules,
//! tokens, the audit log, and any route not named here) `admin`, which implies every other scope.
//!
//! An API token is [`TOKEN_PREFIX`] and 64 hex digits (256 random bits); only its SHA-256 is
//! stored, and it is looked up by that hash, so the time a lookup takes says nothing about the
//! value. A JWT is accepted when it is signed with HS256 by the configured secret, or RS256 or
//! ES256 by one of the configured public keys, names the configured issuer and audience, is
//! within `nbf`..`exp` (30 s of leeway), has a `sub` (the actor) and grants scopes in its
//! space-separated `scope` claim. The key is chosen by the token's `alg` among the keys of that
//! algorithm only: `alg: none` is not an algorithm here, and an HS256 token cannot be checked
//! against an RSA or EC key (no algorithm confusion).
//!
//! A credential sees the namespaces it names (see [`Namespaces`]): an API token those it was
//! created with, a JWT those of its `namespaces` claim, an array of namespace names or `"*"`
//! for all of them (`["default"]` when the claim is absent). Runs, definitions and schedules
//! of other namespaces do not exist for it (404); the fleet-wide routes ([`fleet_wide`]: the
//! audit log, dead letters and breaker resets) need a credential of all namespaces (403
//! otherwise). A credential of some namespaces is held to their requests-per-second quotas
//! ([`RateLimiter`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use flotilla_api_model::{
    AuditPage, AuditQuery, CreatedToken, ErrorBody, NewTokenRequest, SCOPES, TokenList,
    TokenSummary,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::backend::BackendError;
use crate::error::{ApiError, Kind};
use crate::extract::{Json, Path, Query, Tenant};
use crate::quota::RateLimiter;
use crate::routes::Limits;

/// How every API token starts, so that a token is told from a JWT (and found by secret
/// scanners).
pub const TOKEN_PREFIX: &str = "flt_";

/// Audit entries listed when the query gives no `limit`.
pub const DEFAULT_AUDIT_LIMIT: u32 = 50;
/// The largest `limit` of an audit listing.
pub const MAX_AUDIT_LIMIT: u32 = 500;

/// The longest token name accepted.
const MAX_TOKEN_NAME_CHARS: usize = 100;

/// Seconds a JWT's `exp` and `nbf` may be off, for clocks that differ a little.
const JWT_LEEWAY_SECS: u64 = 30;

/// What a credential names for all namespaces.
pub const ALL_NAMESPACES: &str = "*";

/// The namespaces a credential may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// Every namespace: `*`.
    All,
    /// These, at least one.
    Only(Vec<String>),
}

impl Namespaces {
    /// From names as stored or claimed: `*` among them stands for all.
    pub fn from_names(names: Vec<String>) -> Self {
        if names.iter().any(|n| n == ALL_NAMESPACES) {
            Self::All
        } else {
            Self::Only(names)
        }
    }

    /// The names as stored: `["*"]` for all.
    pub fn names(&self) -> Vec<String> {
        match self {
            Self::All => vec![ALL_NAMESPACES.to_string()],
            Self::Only(names) => names.clone(),
        }
    }

    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => names.iter().any(|n| n == namespace),
        }
    }

    /// Whether every namespace of `other` is one of these.
    pub fn covers(&self, other: &Namespaces) -> bool {
        match (self, other) {
            (Self::All, _) => true,
            (Self::Only(_), Self::All) => false,
            (Self::Only(_), Self::Only(names)) => names.iter().all(|n| self.contains(n)),
        }
    }

    /// The namespaces a query is narrowed to: `None` for all of them.
    pub fn filter(&self) -> Option<&[String]> {
        match self {
            Self::All => None,
            Self::Only(names) => Some(names),
        }
    }
}

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Execute,
    Operate,
    Admin,
}

impl Scope {
    /// The scope of that name (see [`SCOPES`]).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Self::Read),
            "execute" => Some(Self::Execute),
            "operate" => Some(Self::Operate),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Execute => "execute",
            Self::Operate => "operate",
            Self::Admin => "admin",
        }
    }
}

/// The scope a request needs, by its method and route (the route's pattern, e.g.
/// `/api/workflows/{id}/cancel`). A route not named here needs `admin`, so that a new route is
/// closed until it is given a lesser scope.
pub fn required_scope(method: &Method, route: &str) -> Scope {
    if route.starts_with("/api/tokens") || route.starts_with("/api/audit") {
        return Scope::Admin;
    }
    if method == Method::GET || method == Method::HEAD {
        return Scope::Read;
    }
    if method == Method::POST {
        if route == "/api/workflows/execute" {
            return Scope::Execute;
        }
        if route.starts_with("/api/workflows/")
            || route.starts_with("/api/dlq/")
            || route == "/api/agents/{name}/breaker/reset"
        {
            return Scope::Operate;
        }
    }
    Scope::Admin
}

/// Whether a route acts on the whole fleet rather than on namespaces (the audit log, dead
/// letters, an agent's breaker, the fleet's health audit), so that only a credential of all
/// namespaces may call it.
pub fn fleet_wide(route: &str) -> bool {
    route.starts_with("/api/audit")
        || route == "/api/health/audit"
        || route.starts_with("/api/dlq")
        || route == "/api/agents/{name}/breaker/reset"
}

/// What kind of credential made a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Token,
    Jwt,
    /// Authentication is off.
    None,
}

impl Credential {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Jwt => "jwt",
            Self::None => "none",
        }
    }
}

/// Who makes a request, once authenticated; put in the request's extensions for the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name or the JWT's subject.
    pub name: String,
    pub credential: Credential,
    scopes: Vec<Scope>,
    pub namespaces: Namespaces,
}

impl Principal {
    /// Whether the principal may do what `scope` allows (`admin` allows everything).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// Everyone, when authentication is off.
    fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            credential: Credential::None,
            scopes: vec![Scope::Admin],
            namespaces: Namespaces::All,
        }
    }
}

/// A new API token: its value (to show once) and the SHA-256 of it (to store).
pub struct NewToken {
    pub value: String,
    pub hash: [u8; 32],
}

impl NewToken {
    /// 256 random bits.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::of(format!("{TOKEN_PREFIX}{hex}"))
    }

    /// A token of a value chosen elsewhere (`FLOTILLA_ADMIN_TOKEN`).
    pub fn of(value: String) -> Self {
        let hash = token_hash(&value);
        Self { value, hash }
    }
}

/// The SHA-256 of a token's value: what is stored and looked up.
pub fn token_hash(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// Where API tokens are kept and audit entries written: the coordinator's store.
pub trait Access: Send + Sync + 'static {
    /// The token, not revoked, whose value has this SHA-256.
    fn token(
        &self,
        hash: [u8; 32],
    ) -> impl Future<Output = Result<Option<TokenSummary>, BackendError>> + Send;

    /// Stores a new token (`scopes` are known scope names, `namespaces` checked names or `*`).
    fn create_token(
        &self,
        name: String,
        scopes: Vec<String>,
        namespaces: Vec<String>,
        hash: [u8; 32],
    ) -> impl Future<Output = Result<TokenSummary, BackendError>> + Send;

    /// Every token, revoked ones too, whose namespaces are all among `namespaces`.
    fn tokens(
        &self,
        namespaces: &Namespaces,
    ) -> impl Future<Output = Result<Vec<TokenSummary>, BackendError>> + Send;

    /// Revokes token `id` if its namespaces are all among `namespaces`; `None` when there is
    /// no such token.
    fn revoke_token(
        &self,
        namespaces: &Namespaces,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<TokenSummary>, BackendError>> + Send;

    /// Appends an entry to the audit log.
    fn record(&self, entry: AuditRecord) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// One page of the audit log, newest first; `query.limit` is set and in range.
    fn audit(
        &self,
        query: AuditQuery,
    ) -> impl Future<Output = Result<AuditPage, BackendError>> + Send;
}

/// An audit entry to append.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub actor: String,
    pub credential: Credential,
    /// `METHOD /route`.
    pub action: String,
    pub target: Map<String, Value>,
    pub peer: Option<String>,
    pub status: u16,
}

/// Ids a handler created, added to its request's audit entry (e.g. `workflowId`).
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditTarget(pub Map<String, Value>);

impl AuditTarget {
    pub(crate) fn one(key: &str, value: impl ToString) -> Self {
        let mut map = Map::new();
        map.insert(key.into(), Value::String(value.to_string()));
        Self(map)
    }
}

/// The keys JWTs are checked with, and what their claims must say.
pub struct JwtKeys {
    issuer: String,
    audience: String,
    hs256: Vec<DecodingKey>,
    rs256: Vec<DecodingKey>,
    es256: Vec<DecodingKey>,
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

impl JwtKeys {
    /// No keys yet; tokens must name `issuer` in `iss` and `audience` in `aud`.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            hs256: Vec::new(),
            rs256: Vec::new(),
            es256: Vec::new(),
        }
    }

    /// Accepts HS256 tokens signed with `secret` (at least 32 bytes).
    pub fn hs256(mut self, secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < 32 {
            return Err(KeyError(format!(
                "an HS256 secret must have at least 32 bytes, not {}",
                secret.len()
            )));
        }
        let key = DecodingKey::from_secret(secret).map_err(|e| KeyError(e.to_string()))?;
        self.hs256.push(key);
        Ok(self)
    }

    /// Accepts RS256 tokens signed with the private key of this PEM public key.
    pub fn rs256_pem(mut self, pem: &[u8]) -> Result<Self, KeyError> {
        let key = DecodingKey::from_rsa_pem(pem)
            .map_err(|e| KeyError(format!("not an RSA public key in PEM: {e}")))?;
        self.rs256.push(key);
        Ok(self)
    }

    /// Accepts ES256 tokens signed with the private key of this PEM public key (P-256).
    pub fn es256_pem(mut self, pem: &[u8]) -> Result<Self, KeyError> {
        let key = DecodingKey::from_ec_pem(pem)
            .map_err(|e| KeyError(format!("not an EC public key in PEM: {e}")))?;
        self.es256.push(key);
        Ok(self)
    }

    /// The principal of a valid token, or why it is not valid (for the log only: the client is
    /// told no more than that it is not valid).
    fn verify(&self, token: &str) -> Result<Principal, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let keys = match header.alg {
            Algorithm::HS256 => &self.hs256,
            Algorithm::RS256 => &self.rs256,
            Algorithm::ES256 => &self.es256,
            other => return Err(format!("algorithm {other:?} is not accepted")),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = JWT_LEEWAY_SECS;
        let mut last = format!("no {:?} key is configured", header.alg);
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    let Claims {
                        sub,
                        scope,
                        namespaces,
                    } = data.claims;
                    let namespaces = match namespaces {
                        None => vec![flotilla_api_model::DEFAULT_NAMESPACE.to_string()],
                        Some(NamespacesClaim::All(all)) if all == ALL_NAMESPACES => {
                            vec![all]
                        }
                        Some(NamespacesClaim::All(other)) => {
                            return Err(format!(
                                "`namespaces` is `{other}`, neither a list nor `*`"
                            ));
                        }
                        Some(NamespacesClaim::Names(names)) => {
                            if names.is_empty() {
                                return Err("`namespaces` names none".into());
                            }
                            for name in &names {
                                flotilla_api_model::check_namespace(name)?;
                            }
                            names
                        }
                    };
                    // Scopes of other services may share the claim; only ours count.
                    let scopes = scope
                        .as_deref()
                        .unwrap_or_default()
                        .split_ascii_whitespace()
                        .filter_map(Scope::parse)
                        .collect();
                    return Ok(Principal {
                        name: sub,
                        credential: Credential::Jwt,
                        scopes,
                        namespaces: Namespaces::from_names(namespaces),
                    });
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    namespaces: Option<NamespacesClaim>,
}

/// A JWT's `namespaces`: a list of names, or `"*"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum NamespacesClaim {
    Names(Vec<String>),
    All(String),
}

/// How requests are authenticated.
pub struct Guard<A> {
    pub access: Arc<A>,
    /// `None`: API tokens only.
    pub jwt: Option<JwtKeys>,
    /// Off: every request is served as `anonymous` with every scope (`--insecure-no-auth`).
    pub enabled: bool,
    /// Whether `/metrics` needs a credential (scope `read`).
    pub protect_metrics: bool,
    /// Whether the client's address is the last one of `X-Forwarded-For` (set by a proxy in
    /// front of the coordinator) rather than the peer's.
    pub trust_forwarded_for: bool,
    /// The requests-per-second quotas of namespaces.
    pub rate: RateLimiter,
}

/// `app` with every route but the open ones behind the guard, every state-changing request
/// audited, and the token and audit routes added.
pub fn secure<A: Access>(app: Router, guard: Guard<A>, limits: Limits) -> Router {
    let guard = Arc::new(guard);
    let state = AccessState {
        access: Arc::clone(&guard.access),
        limits,
    };
    let routes = Router::new()
        .route(
            "/api/tokens",
            axum::routing::post(create_token::<A>).get(list_tokens::<A>),
        )
        .route("/api/tokens/{id}", delete(revoke_token::<A>))
        .route("/api/audit", get(list_audit::<A>))
        .method_not_allowed_fallback(crate::routes::wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state);
    app.merge(routes)
        .route_layer(middleware::from_fn_with_state(guard, authorize::<A>))
}

/// Whether a path is served without a credential.
pub(crate) fn is_open(path: &str, protect_metrics: bool) -> bool {
    path == "/health"
        || path.starts_with("/health/")
        // The page and its assets hold no data: the browser asks for a credential, kept in the
        // tab's session storage, and sends it with every API request.
        || path == crate::dashboard::PATH
        || path.starts_with("/dashboard/")
        || path == crate::openapi::PATH
        || (path == "/metrics" && !protect_metrics)
}

async fn authorize<A: Access>(
    State(guard): State<Arc<Guard<A>>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if is_open(path, guard.protect_metrics) {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| path.to_string(), |m| m.as_str().to_string());
    let method = request.method().clone();
    let principal = match authenticate(&guard, request.headers()).await {
        Ok(principal) => principal,
        Err(refusal) => return refusal.into_response(),
    };
    let needed = required_scope(&method, &route);
    let (mut parts, body) = request.into_parts();
    let audited = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let mut target = Map::new();
    if audited && let Ok(params) = RawPathParams::from_request_parts(&mut parts, &()).await {
        for (key, value) in &params {
            // Postgres cannot store a NUL character: the entry keeps it escaped, as `\0`, so
            // that the request is recorded (and then refused).
            target.insert(key.to_string(), Value::String(value.replace('\0', "\\0")));
        }
    }
    let peer = peer(&parts, guard.trust_forwarded_for);
    let response = if !principal.allows(needed) {
        ApiError::new(
            Kind::Forbidden,
            format!(
                "`{}` may not {method} {route}: that needs scope `{}`",
                principal.name,
                needed.as_str()
            ),
        )
        .into_response()
    } else if fleet_wide(&route) && principal.namespaces != Namespaces::All {
        ApiError::forbidden(format!(
            "`{}` may not {method} {route}: it concerns every namespace, and needs a credential \
             of all namespaces (`*`)",
            principal.name
        ))
        .into_response()
    } else if let Err(refusal) = guard
        .rate
        .admit(&principal.namespaces, std::time::Instant::now())
    {
        refusal.into_response()
    } else {
        parts.extensions.insert(principal.clone());
        next.run(Request::from_parts(parts, body)).await
    };
    if audited {
        if let Some(AuditTarget(created)) = response.extensions().get::<AuditTarget>() {
            target.extend(created.clone());
        }
        let entry = AuditRecord {
            actor: principal.name,
            credential: principal.credential,
            action: format!("{method} {route}"),
            target,
            peer,
            status: response.status().as_u16(),
        };
        // The request is carried out already: a failure to record it is logged loudly, and the
        // answer stands.
        if let Err(e) = guard.access.record(entry.clone()).await {
            tracing::error!(error = %e, actor = %entry.actor, action = %entry.action, status = entry.status, "could not record an audit entry");
        }
    }
    response
}

/// The principal of a request's credential.
async fn authenticate<A: Access>(
    guard: &Guard<A>,
    headers: &HeaderMap,
) -> Result<Principal, ApiError> {
    if !guard.enabled {
        return Ok(Principal::anonymous());
    }
    let unauthorized = |message: &str| ApiError::new(Kind::Unauthorized, message);
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(unauthorized(
            "this route needs a credential: send `Authorization: Bearer <token>` (an API token \
             or a JWT; the CLI reads FLOTILLA_API_TOKEN)",
        ));
    };
    let credential = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|c| !c.is_empty())
        .ok_or_else(|| unauthorized("the `Authorization` header must be `Bearer <token>`"))?;
    let invalid = || unauthorized("the credential is not valid (unknown, revoked or expired)");
    if credential.starts_with(TOKEN_PREFIX) {
        let Some(token) = guard.access.token(token_hash(credential)).await? else {
            return Err(invalid());
        };
        return Ok(Principal {
            name: token.name,
            credential: Credential::Token,
            scopes: token
                .scopes
                .iter()
                .filter_map(|s| Scope::parse(s))
                .collect(),
            namespaces: Namespaces::from_names(token.namespaces),
        });
    }
    let Some(keys) = &guard.jwt else {
        return Err(invalid());
    };
    keys.verify(credential).map_err(|why| {
        tracing::debug!(reason = %why, "JWT refused");
        invalid()
    })
}

/// The client's address: the peer's, or the last `X-Forwarded-For` entry when a proxy in front
/// is trusted to set it.
fn peer(parts: &axum::http::request::Parts, trust_forwarded_for: bool) -> Option<String> {
    if trust_forwarded_for
        && let Some(last) = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|v| !v.is_empty())
    {
        return Some(last.to_string());
    }
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip().to_string())
}

/// What the token and audit routes share.
struct AccessState<A> {
    access: Arc<A>,
    limits: Limits,
}

impl<A> Clone for AccessState<A> {
    fn clone(&self) -> Self {
        Self {
            access: Arc::clone(&self.access),
            limits: self.limits,
        }
    }
}

impl<A> axum::extract::FromRef<AccessState<A>> for Limits {
    fn from_ref(state: &AccessState<A>) -> Self {
        state.limits
    }
}

#[utoipa::path(
    post,
    path = "/api/tokens",
    tag = "access",
    summary = "Create an API token; its value is shown only in this answer",
    request_body = NewTokenRequest,
    responses(
        (status = 201, description = "The token, with its value", body = CreatedToken)
    )
)]
async fn create_token<A: Access>(
    State(state): State<AccessState<A>>,
    tenant: Tenant,
    Json(NewTokenRequest {
        name,
        scopes,
        namespaces,
    }): Json<NewTokenRequest>,
) -> Result<Response, ApiError> {
    // The name becomes the actor of runs' histories and of the audit log.
    if name.is_empty()
        || name.len() > MAX_TOKEN_NAME_CHARS
        || !name.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(ApiError::invalid_request(format!(
            "a token's `name` is 1 to {MAX_TOKEN_NAME_CHARS} visible ASCII characters (no spaces)"
        )));
    }
    if scopes.is_empty() {
        return Err(ApiError::invalid_request(format!(
            "a token needs at least one scope among {}",
            SCOPES.join(", ")
        )));
    }
    if let Some(unknown) = scopes.iter().find(|s| Scope::parse(s).is_none()) {
        return Err(ApiError::invalid_request(format!(
            "unknown scope `{unknown}`: scopes are {}",
            SCOPES.join(", ")
        )));
    }
    let mut scopes = scopes;
    scopes.sort_by_key(|s| Scope::parse(s));
    scopes.dedup();
    let namespaces = token_namespaces(&tenant, namespaces)?;
    let token = NewToken::generate();
    let summary = state
        .access
        .create_token(name, scopes, namespaces.names(), token.hash)
        .await?;
    tracing::info!(token_id = %summary.id, name = %summary.name, scopes = ?summary.scopes, namespaces = ?summary.namespaces, "api token created");
    let target = AuditTarget::one("tokenId", summary.id);
    let mut response = (
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            summary,
            token: token.value,
        }),
    )
        .into_response();
    response.extensions_mut().insert(target);
    Ok(response)
}

/// The namespaces of a new token: those asked for (checked, and all among the creator's, since a
/// credential cannot hand out what it does not hold), or the one the creator acts in.
fn token_namespaces(tenant: &Tenant, asked: Vec<String>) -> Result<Namespaces, ApiError> {
    if asked.is_empty() {
        return Ok(Namespaces::Only(vec![tenant.one(None)?]));
    }
    for name in asked.iter().filter(|n| *n != ALL_NAMESPACES) {
        flotilla_api_model::check_namespace(name).map_err(ApiError::invalid_request)?;
    }
    let mut asked = asked;
    asked.sort();
    asked.dedup();
    let namespaces = Namespaces::from_names(asked);
    if !tenant.namespaces.covers(&namespaces) {
        return Err(ApiError::forbidden(format!(
            "a token may see only namespaces its creator sees; this credential sees {}",
            tenant.namespaces.names().join(", ")
        )));
    }
    Ok(namespaces)
}

#[utoipa::path(
    get,
    path = "/api/tokens",
    tag = "access",
    summary = "Every API token of the caller's namespaces, revoked ones too (never their values)",
    responses(
        (status = 200, description = "The tokens", body = TokenList)
    )
)]
async fn list_tokens<A: Access>(
    State(state): State<AccessState<A>>,
    tenant: Tenant,
) -> Result<axum::Json<TokenList>, ApiError> {
    Ok(axum::Json(TokenList {
        tokens: state.access.tokens(&tenant.visible()).await?,
    }))
}

#[utoipa::path(
    delete,
    path = "/api/tokens/{id}",
    tag = "access",
    summary = "Revoke an API token",
    params(("id" = String, Path, format = Uuid, description = "The token's id (a UUID)")),
    responses(
        (status = 200, description = "The revoked token", body = TokenSummary),
        (status = 404, description = "No token has this id", body = ErrorBody)
    )
)]
async fn revoke_token<A: Access>(
    State(state): State<AccessState<A>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<axum::Json<TokenSummary>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|e| {
        ApiError::invalid_request(format!("`{id}` is not a token id (a UUID): {e}"))
    })?;
    let revoked = state
        .access
        .revoke_token(&tenant.visible(), id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no token {id}")))?;
    tracing::info!(token_id = %id, name = %revoked.name, "api token revoked");
    Ok(axum::Json(revoked))
}

#[utoipa::path(
    get,
    path = "/api/audit",
    tag = "access",
    summary = "The audit log of state-changing requests, newest first",
    params(AuditQuery),
    responses(
        (status = 200, description = "One page of the audit log", body = AuditPage)
    )
)]
async fn list_audit<A: Access>(
    State(state): State<AccessState<A>>,
    Query(mut query): Query<AuditQuery>,
) -> Result<axum::Json<AuditPage>, ApiError> {
    query.limit = Some(crate::routes::page_limit(
        query.limit,
        DEFAULT_AUDIT_LIMIT,
        MAX_AUDIT_LIMIT,
    )?);
    Ok(axum::Json(state.access.audit(query).await?))
}

#[cfg(test)]
pub(crate) mod tests;
