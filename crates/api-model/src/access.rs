//! The shapes of the access routes: API tokens (`/api/tokens`) and the audit log (`/api/audit`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The environment variable the CLI reads its credential from: an API token or a JWT, sent as
/// `Authorization: Bearer <value>`.
pub const API_TOKEN_ENV: &str = "FLOTILLA_API_TOKEN";

/// Every scope, from least to most: `read` (every `GET` of the API), `execute` (submit runs),
/// `operate` (cancel, pause, resume, retry, skip, complete; dead-letter redrive) and `admin`
/// (definitions, schedules, tokens, the audit log; implies every other scope).
pub const SCOPES: [&str; 4] = ["read", "execute", "operate", "admin"];

/// `POST /api/tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewTokenRequest {
    /// Who or what holds the token; recorded as the actor of what it does: 1 to 100 visible
    /// ASCII characters.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[!-~]{1,100}$"))]
    pub name: String,
    /// Among [`SCOPES`]; at least one.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::scopes))]
    pub scopes: Vec<String>,
    /// The namespaces the token may see (see [`crate::check_namespace`]), or `["*"]` for all of
    /// them. Left out: the creating credential's namespace, when it has exactly one, or
    /// `default` for a credential of all namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::schemas::namespaces))]
    pub namespaces: Vec<String>,
}

/// An API token as listed: never its value, which is shown once, at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TokenSummary {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    /// The namespaces it may see; `*` stands for all of them.
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// When it was last used, to the minute or so (not written on every request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The answer to `POST /api/tokens`: the token's value, shown only this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    #[serde(flatten)]
    pub summary: TokenSummary,
    pub token: String,
}

/// `GET /api/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TokenList {
    pub tokens: Vec<TokenSummary>,
}

/// One state-changing request, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The token's name or the JWT's subject (`anonymous` when authentication is off).
    pub actor: String,
    /// `token`, `jwt` or `none`.
    pub credential: String,
    /// The method and route, e.g. `POST /api/workflows/{id}/cancel`.
    pub action: String,
    /// The ids the request named (the route's parameters) or created (`workflowId`, `tokenId`).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub target: serde_json::Map<String, serde_json::Value>,
    /// The client's address: the peer's, or the `X-Forwarded-For` a trusted proxy set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The HTTP status of the answer.
    pub status: u16,
}

/// `GET /api/audit` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Only entries of this actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// At most this many (1 to 500; 50 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 500))]
    pub limit: Option<u32>,
    /// The `nextCursor` of the page before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<i64>,
}

/// `GET /api/audit`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<i64>,
}
