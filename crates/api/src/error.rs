//! [`ApiError`]: every way a request can fail, and the one place that maps failures to HTTP
//! status codes and error codes.

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_api_model::{ErrorBody, ErrorDetail};
use flotilla_core::{DefinitionError, PlanError};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::backend::BackendError;
use crate::routes::Limits;

/// The kinds of failure a client can tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    InvalidRequest,
    InvalidYaml,
    InvalidDefinition,
    /// No credential, or one that is not valid: 401 with `WWW-Authenticate: Bearer`.
    Unauthorized,
    /// A valid credential without the scope the route needs.
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    /// Over a namespace's quota: 429 with `Retry-After`.
    QuotaExceeded,
    Unavailable,
    /// A readiness check failed: an expected answer while a dependency is away, so it is not
    /// logged as an error on every probe.
    NotReady,
    Internal,
}

impl Kind {
    fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest | Self::InvalidYaml | Self::InvalidDefinition => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable | Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error.code` clients match on; changing one breaks them.
    fn code(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidYaml => "invalid_yaml",
            Self::InvalidDefinition => "invalid_definition",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict => "conflict",
            Self::PayloadTooLarge => "payload_too_large",
            Self::QuotaExceeded => "quota_exceeded",
            Self::Unavailable | Self::NotReady => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// A failed request, answered as an [`ErrorBody`].
#[derive(Debug)]
pub(crate) struct ApiError {
    kind: Kind,
    message: String,
    details: Option<Value>,
    /// Whole seconds, answered as `Retry-After`.
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidRequest, message)
    }

    /// A request over one of the coordinator's limits; `details` names it.
    pub(crate) fn too_large(message: impl Into<String>, details: Value) -> Self {
        Self::new(Kind::PayloadTooLarge, message).with_details(details)
    }

    /// A request that holds a NUL character, which Postgres can store in neither text nor JSON:
    /// refused before anything of it is stored. `what` says where ("the path holds"), `written`
    /// how the client wrote it there.
    pub(crate) fn holds_nul(what: &str, written: &str) -> Self {
        Self::invalid_request(format!(
            "{what} a NUL character (`{written}`), which no name, id, param or output may contain"
        ))
    }

    /// A request over a namespace's quota (`details` names it), to be tried again after
    /// `retry_after` (rounded up to whole seconds, at least one).
    pub(crate) fn quota_exceeded(
        message: impl Into<String>,
        details: Value,
        retry_after: std::time::Duration,
    ) -> Self {
        let mut error = Self::new(Kind::QuotaExceeded, message).with_details(details);
        error.retry_after = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
        error
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(Kind::Forbidden, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    /// A failed readiness check; `details` is what was checked.
    pub(crate) fn not_ready(message: impl Into<String>, details: &impl serde::Serialize) -> Self {
        let details = serde_json::to_value(details).unwrap_or(Value::Null);
        Self::new(Kind::NotReady, message).with_details(details)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.kind.status();
        let code = self.kind.code();
        let message = match self.kind {
            // An internal message may hold anything (SQL, hosts, paths): it goes to the log only,
            // and the client gets an id to find it there.
            Kind::Internal => {
                let incident = Uuid::new_v4();
                tracing::error!(%status, code, %incident, error = %self.message, "request failed");
                format!(
                    "internal error in the coordinator (incident {incident}); its log has the details"
                )
            }
            Kind::NotReady => {
                tracing::debug!(%status, code, error = %self.message, "not ready");
                self.message
            }
            _ if status.is_server_error() => {
                tracing::error!(%status, code, error = %self.message, "request failed");
                self.message
            }
            _ => {
                tracing::debug!(%status, code, error = %self.message, "request refused");
                self.message
            }
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message,
                details: self.details,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        if self.kind == Kind::Unauthorized {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(r#"Bearer realm="flotilla""#),
            );
        }
        response
    }
}

impl From<BackendError> for ApiError {
    fn from(err: BackendError) -> Self {
        match err {
            BackendError::Invalid(m) => Self::new(Kind::InvalidRequest, m),
            BackendError::Definition(e) => e.into(),
            BackendError::NotFound(m) => Self::new(Kind::NotFound, m),
            BackendError::Conflict(m) | BackendError::StaleDefinition(m) => {
                Self::new(Kind::Conflict, m)
            }
            BackendError::QuotaExceeded(q) => Self::quota_exceeded(
                q.message,
                json!({ "quota": q.quota, "namespace": q.namespace, "limit": q.limit }),
                q.retry_after,
            ),
            BackendError::Unavailable(m) => Self::new(Kind::Unavailable, m),
            BackendError::Internal(m) => Self::new(Kind::Internal, m),
        }
    }
}

impl From<DefinitionError> for ApiError {
    fn from(err: DefinitionError) -> Self {
        let message = err.to_string();
        match err {
            DefinitionError::Yaml { line, column, .. } => Self::new(Kind::InvalidYaml, message)
                .with_details(json!({ "line": line, "column": column })),
            DefinitionError::YamlNoLocation(_) => Self::new(Kind::InvalidYaml, message),
            DefinitionError::Json { line, column, .. } => {
                Self::new(Kind::InvalidDefinition, message)
                    .with_details(json!({ "line": line, "column": column }))
            }
            DefinitionError::Shape(_) => Self::new(Kind::InvalidDefinition, message),
        }
    }
}

impl From<PlanError> for ApiError {
    fn from(err: PlanError) -> Self {
        let message = err.to_string();
        Self::new(Kind::InvalidDefinition, message)
            .with_details(json!({ "workflow": err.workflow, "problems": err.problems }))
    }
}

impl ApiError {
    /// A JSON body that could not be read.
    pub(crate) fn from_json_rejection(rejection: JsonRejection, limits: Limits) -> Self {
        Self::from_body_rejection(rejection.status(), rejection.body_text(), limits)
    }

    /// A body that could not be buffered.
    pub(crate) fn from_bytes_rejection(rejection: BytesRejection, limits: Limits) -> Self {
        Self::from_body_rejection(rejection.status(), rejection.body_text(), limits)
    }

    /// The body limit surfaces as a failure to buffer the body, with axum's 413; everything else
    /// is the client's body (JSON syntax, shape, content type).
    fn from_body_rejection(status: StatusCode, text: String, limits: Limits) -> Self {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            let limit = limits.max_body_bytes;
            Self::new(
                Kind::PayloadTooLarge,
                format!("the request body is larger than the coordinator's limit of {limit} bytes"),
            )
            .with_details(json!({ "limitBytes": limit }))
        } else {
            Self::invalid_request(text)
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::invalid_request(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        // A route that matched but whose parameters cannot be read is a bad request; a missing
        // parameter would be a routing bug and is reported as such by axum's status.
        let kind = if rejection.status().is_server_error() {
            Kind::Internal
        } else {
            Kind::InvalidRequest
        };
        Self::new(kind, rejection.body_text())
    }
}
