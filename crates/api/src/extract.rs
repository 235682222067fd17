//! axum's extractors, with their rejections answered as [`ApiError`]s so that a malformed body,
//! query or path gets the same error shape as every other failure.

use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use flotilla_api_model::{
    IDEMPOTENCY_KEY_HEADER, MAX_IDEMPOTENCY_KEY_CHARS, check_idempotency_key,
};
use serde::de::DeserializeOwned;

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
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::from_json_rejection(
                rejection,
                Limits::from_ref(state),
            )),
        }
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
        let invalid = |why: String| {
            ApiError::invalid_request(format!(
                "invalid `{IDEMPOTENCY_KEY_HEADER}` header: {why}; a key is 1 to \
                 {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters, given once"
            ))
        };
        let values: Vec<_> = parts
            .headers
            .get_all(IDEMPOTENCY_KEY_HEADER)
            .iter()
            .collect();
        let value = match values[..] {
            [] => return Ok(Self(None)),
            [value] => value,
            // Two keys cannot both be honoured, and picking one would hide a client's bug.
            _ => return Err(invalid(format!("it is given {} times", values.len()))),
        };
        // Lossy decoding turns the first byte that is not ASCII into a character that is not
        // either, so the check below names its position.
        let key = String::from_utf8_lossy(value.as_bytes());
        check_idempotency_key(&key).map_err(|e| invalid(e.to_string()))?;
        Ok(Self(Some(key.into_owned())))
    }
}
