//! The OpenAPI 3 document of the HTTP API, served at [`PATH`] without credentials.
//!
//! It is generated from the code: each handler's `#[utoipa::path]` annotation (route, parameters,
//! body, answers) and the models' schemas (`flotilla-api-model` with its `openapi` feature). What
//! every operation shares is added here from the code that decides it, not written per handler:
//! the bearer security and the scope each route needs ([`required_scope`]), and the error answers,
//! all in the one [`ErrorBody`] shape.

use axum::http::Method;
use flotilla_api_model::{ErrorBody, OperateResponse};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::auth::{is_open, required_scope};
use crate::{auth, dashboard, health, routes};

/// Where the document is served.
pub const PATH: &str = "/api/openapi.json";

/// The name of the security scheme in the document.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flotilla",
        description = "The HTTP API of the Flotilla coordinator. Every failure answers \
                       `{\"error\": {\"code\", \"message\", \"details\"}}` (`ErrorBody`)."
    ),
    paths(
        routes::execute,
        routes::list_runs,
        routes::get_run,
        routes::cancel,
        routes::pause,
        routes::resume,
        routes::retry,
        routes::rollback,
        routes::skip,
        routes::complete,
        routes::run_events,
        routes::run_report,
        routes::run_logs,
        routes::register_definition,
        routes::list_definitions,
        routes::get_definition,
        routes::definition_versions,
        routes::create_schedule,
        routes::list_schedules,
        routes::get_schedule,
        routes::delete_schedule,
        routes::list_dead_letters,
        routes::redrive,
        routes::metrics_summary,
        routes::health_audit,
        routes::list_breakers,
        routes::reset_breaker,
        routes::list_agents,
        routes::get_agent,
        routes::agent_health,
        routes::agent_metrics,
        routes::events,
        dashboard::page,
        dashboard::asset,
        auth::create_token,
        auth::list_tokens,
        auth::revoke_token,
        auth::list_audit,
        health::live,
        health::ready,
        health::health,
        health::metrics,
        serve,
    ),
    components(schemas(ErrorBody, OperateResponse)),
    modifiers(&Shared),
)]
struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    summary = "This document: the OpenAPI 3 description of every route",
    responses(
        (
            status = 200, description = "The document",
            content_type = "application/json", body = Object
        )
    )
)]
pub(crate) async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(document())
}

/// Adds what every operation shares: security, scopes and error answers.
struct Shared;

impl Modify for Shared {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description =
            Some("An API token (`flt_…`) or a JWT, as `Authorization: Bearer <credential>`".into());
        components.add_security_scheme(BEARER, SecurityScheme::Http(scheme));
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                (Method::GET, &mut item.get),
                (Method::PUT, &mut item.put),
                (Method::POST, &mut item.post),
                (Method::DELETE, &mut item.delete),
                (Method::PATCH, &mut item.patch),
            ];
            for (method, operation) in operations {
                if let Some(operation) = operation {
                    share(path, &method, operation);
                }
            }
        }
    }
}

/// The security and error answers of the operation `method path`.
fn share(path: &str, method: &Method, operation: &mut Operation) {
    let takes_input = operation.request_body.is_some()
        || operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let mut errors = vec![(
        500,
        "Internal error; the message gives an incident id to find in the coordinator's log",
    )];
    if takes_input {
        errors.push((
            400,
            "The request is malformed or invalid \
             (`invalid_request`, `invalid_yaml`, `invalid_definition`)",
        ));
    }
    if operation.request_body.is_some() {
        errors.push((
            413,
            "The request is over one of the coordinator's limits (`payload_too_large`); \
             `details` names it",
        ));
    }
    // `/metrics` as served by default: open (see the `/metrics` operation's description).
    if !is_open(path, false) {
        let scope = required_scope(method, path).as_str();
        operation.security = Some(vec![SecurityRequirement::new(BEARER, [scope])]);
        let needs = format!("Needs scope `{scope}` (`admin` allows everything).");
        operation.description = Some(match operation.description.take() {
            Some(description) => format!("{description}\n\n{needs}"),
            None => needs,
        });
        errors.push((
            401,
            "No credential, or one that is not valid (`unauthorized`)",
        ));
        errors.push((
            403,
            "The credential lacks the scope this route needs, or may not act in the namespace \
             the request names (`forbidden`)",
        ));
        errors.push((
            429,
            "The namespace is over its requests-per-second quota (`quota_exceeded`); \
             `Retry-After` says when to try again",
        ));
        errors.push((
            503,
            "A dependency (the database) is unavailable (`unavailable`)",
        ));
    }
    for (status, description) in errors {
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| error_response(description));
    }
}

/// An answer in the one error shape.
fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

#[cfg(test)]
mod tests;
