//! axum's extractors, with their rejections answered as [`ApiError`]s so that a malformed body,
//! query, path or header gets the same error shape as every other failure.

use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use flotilla_api_model::{
    ACTOR_HEADER, DEFAULT_NAMESPACE, IDEMPOTENCY_KEY_HEADER, MAX_ACTOR_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS, NAMESPACE_HEADER, TokenError, check_actor, check_idempotency_key,
    check_namespace,
};
use flotilla_core::json::holds_nul;
use serde::de::DeserializeOwned;

use crate::auth::{Credential, Namespaces, Principal};
use crate::error::ApiError;
use crate::routes::Limits;

/// A JSON request body.
pub(crate) struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
    Limits: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limits = Limits::from_ref(state);
        // The body is buffered first to be searched for NUL, then read as `axum::Json` reads it
        // (content type, syntax, shape); the head is kept for that, body limit included.
        let (parts, body) = req.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(|rejection| ApiError::from_bytes_rejection(rejection, limits))?;
        if holds_nul(&bytes) {
            return Err(ApiError::holds_nul("the request body holds", "\\u0000"));
        }
        match axum::Json::<T>::from_request(Request::from_parts(parts, Body::from(bytes)), state)
            .await
        {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::from_json_rejection(rejection, limits)),
        }
    }
}

/// Refuses a path or query string that holds a NUL character (`%00`).
fn refuse_nul_in(what: &str, text: Option<&str>) -> Result<(), ApiError> {
    if text.is_some_and(|text| text.contains("%00")) {
        return Err(ApiError::holds_nul(what, "%00"));
    }
    Ok(())
}

/// A JSON request body that may be left out: an empty body (whatever its content type) reads as
/// `T::default()`, so that a client with nothing to say need not send `{}`. A body that is given
/// is read as strictly as [`Json`] reads it.
pub(crate) struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
    Limits: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limits = Limits::from_ref(state);
        // The head is kept, body limit included, to read a non-empty body as `Json` would.
        let (parts, body) = req.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(|rejection| ApiError::from_bytes_rejection(rejection, limits))?;
        // `null` is what a client that serializes "nothing" sends.
        if bytes.is_empty() || bytes.trim_ascii() == b"null" {
            return Ok(Self(T::default()));
        }
        let Json(value) =
            Json::from_request(Request::from_parts(parts, Body::from(bytes)), state).await?;
        Ok(Self(value))
    }
}

/// A query string.
pub(crate) struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        refuse_nul_in("the query string holds", parts.uri.query())?;
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// Path parameters.
pub(crate) struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        refuse_nul_in("the path holds", Some(parts.uri.path()))?;
        let axum::extract::Path(value) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// The optional [`IDEMPOTENCY_KEY_HEADER`] of a request, checked.
pub(crate) struct IdempotencyKey(pub Option<String>);

impl<S> FromRequestParts<S> for IdempotencyKey
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let key = token_header(
            parts,
            IDEMPOTENCY_KEY_HEADER,
            "a key",
            MAX_IDEMPOTENCY_KEY_CHARS,
            check_idempotency_key,
        )?;
        Ok(Self(key))
    }
}

/// Who makes an operator's request, to be recorded in the run's history: the authenticated
/// [`Principal`]'s name, followed by `as <header>` when the request also has an [`ACTOR_HEADER`]
/// (checked), which says who a client claims to act for (e.g. `user@host` of the CLI).
///
/// With authentication off, the header alone; without it, `anonymous@<the peer's IP address>`,
/// or `anonymous` when the server was not started with `into_make_service_with_connect_info`,
/// which alone tells the peer.
pub(crate) struct Actor(pub String);

impl<S> FromRequestParts<S> for Actor
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let claimed = token_header(
            parts,
            ACTOR_HEADER,
            "an actor",
            MAX_ACTOR_CHARS,
            check_actor,
        )?;
        let principal = parts
            .extensions
            .get::<Principal>()
            .filter(|p| p.credential != Credential::None);
        match (principal, claimed) {
            (Some(principal), Some(claimed)) => {
                return Ok(Self(format!("{} as {claimed}", principal.name)));
            }
            (Some(principal), None) => return Ok(Self(principal.name.clone())),
            (None, Some(claimed)) => return Ok(Self(claimed)),
            (None, None) => {}
        }
        // The IP alone: the port is a new one for every connection, so it would make one
        // anonymous client look like many in the history.
        let actor = match ConnectInfo::<SocketAddr>::from_request_parts(parts, state).await {
            Ok(ConnectInfo(peer)) => format!("anonymous@{}", peer.ip()),
            Err(_) => "anonymous".to_string(),
        };
        Ok(Self(actor))
    }
}

/// The value of the optional header `name`, given at most once and checked by `check`, whose
/// rule says a value is 1 to `max` visible ASCII characters; `what` names such a value ("a key").
fn token_header(
    parts: &Parts,
    name: &str,
    what: &str,
    max: usize,
    check: fn(&str) -> Result<(), TokenError>,
) -> Result<Option<String>, ApiError> {
    let invalid = |why: String| {
        ApiError::invalid_request(format!(
            "invalid `{name}` header: {why}; {what} is 1 to {max} visible ASCII characters, \
             given once"
        ))
    };
    let values: Vec<_> = parts.headers.get_all(name).iter().collect();
    let value = match values[..] {
        [] => return Ok(None),
        [value] => value,
        // Two values cannot both be honoured, and picking one would hide a client's bug.
        _ => return Err(invalid(format!("it is given {} times", values.len()))),
    };
    // Lossy decoding turns the first byte that is not ASCII into a character that is not
    // either, so the check below names its position.
    let text = String::from_utf8_lossy(value.as_bytes());
    check(&text).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(text.into_owned()))
}

/// The namespaces of a request: those its credential may see (all of them without a
/// credential, when the router is served without [`secure`](crate::secure)), and the one its
/// [`NAMESPACE_HEADER`] names, which must be among them (403 otherwise).
pub(crate) struct Tenant {
    pub(crate) namespaces: Namespaces,
    chosen: Option<String>,
    /// Who the credential is, for messages.
    who: String,
}

impl Tenant {
    /// What a read sees: the namespace the header names, or every one the credential may see.
    pub(crate) fn visible(&self) -> Namespaces {
        match &self.chosen {
            Some(namespace) => Namespaces::Only(vec![namespace.clone()]),
            None => self.namespaces.clone(),
        }
    }

    /// The one namespace a request acts in: the one the body names (`body`) or the header
    /// names (both, if given, alike); else the credential's, when it has exactly one, or
    /// `default` for a credential of all namespaces. Several to choose from is a 400.
    pub(crate) fn one(&self, body: Option<&str>) -> Result<String, ApiError> {
        if let Some(named) = body {
            check_namespace(named)
                .map_err(|e| ApiError::invalid_request(format!("`namespace`: {e}")))?;
            if let Some(header) = self.chosen.as_deref().filter(|h| *h != named) {
                return Err(ApiError::invalid_request(format!(
                    "the `{NAMESPACE_HEADER}` header names namespace `{header}` and `namespace` \
                     names `{named}`: name one"
                )));
            }
            self.check(named)?;
            return Ok(named.to_string());
        }
        if let Some(header) = &self.chosen {
            return Ok(header.clone());
        }
        match &self.namespaces {
            Namespaces::All => Ok(DEFAULT_NAMESPACE.to_string()),
            Namespaces::Only(names) if names.len() == 1 => Ok(names[0].clone()),
            Namespaces::Only(names) => Err(ApiError::invalid_request(format!(
                "`{}` may act in namespaces {}: name the one this request is for with the \
                 `{NAMESPACE_HEADER}` header (the CLI's --namespace)",
                self.who,
                names.join(", ")
            ))),
        }
    }

    fn check(&self, namespace: &str) -> Result<(), ApiError> {
        if self.namespaces.contains(namespace) {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "`{}` may not act in namespace `{namespace}`",
            self.who
        )))
    }
}

impl<S> FromRequestParts<S> for Tenant
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let (namespaces, who) = match parts.extensions.get::<Principal>() {
            Some(principal) => (principal.namespaces.clone(), principal.name.clone()),
            None => (Namespaces::All, "anonymous".to_string()),
        };
        let values: Vec<_> = parts.headers.get_all(NAMESPACE_HEADER).iter().collect();
        let chosen = match values[..] {
            [] => None,
            [value] => {
                let text = String::from_utf8_lossy(value.as_bytes());
                check_namespace(&text).map_err(|e| {
                    ApiError::invalid_request(format!("invalid `{NAMESPACE_HEADER}` header: {e}"))
                })?;
                Some(text.into_owned())
            }
            _ => {
                return Err(ApiError::invalid_request(format!(
                    "the `{NAMESPACE_HEADER}` header is given {} times: give it once",
                    values.len()
                )));
            }
        };
        let tenant = Self {
            namespaces,
            chosen,
            who,
        };
        if let Some(chosen) = &tenant.chosen {
            tenant.check(chosen)?;
        }
        Ok(tenant)
    }
}
