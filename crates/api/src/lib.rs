//! The coordinator's HTTP API: axum routes over a [`Backend`] that the coordinator implements.
//!
//! | route                                            | answer                                   |
//! | ------------------------------------------------ | ---------------------------------------- |
//! | `POST /api/workflows/execute`                    | 202 [`ExecuteResponse`]; 200 when an `Idempotency-Key` replays an earlier run |
//! | `GET  /api/workflows/{id}`                       | 200 [`WorkflowResult`]                   |
//! | `GET  /api/workflows`                            | 200 [`RunPage`] (query: [`RunQuery`])    |
//! | `POST /api/workflows/{id}/cancel`                | 200 [`OperateResponse`] (no body, or `{}`) |
//! | `POST /api/workflows/{id}/pause`                 | 200 [`OperateResponse`] (no body, or `{}`) |
//! | `POST /api/workflows/{id}/resume`                | 200 [`OperateResponse`] (no body, or `{}`) |
//! | `POST /api/workflows/{id}/retry`                 | 200 [`OperateResponse`] (optional body: [`RetryRequest`]) |
//! | `POST /api/workflows/{id}/steps/{step}/skip`     | 200 [`OperateResponse`] (no body, or `{}`) |
//! | `POST /api/workflows/{id}/steps/{step}/complete` | 200 [`OperateResponse`] (body: [`CompleteRequest`]) |
//! | `GET  /api/workflows/{id}/events`                | 200 [`RunEventList`]                     |
//! | `POST /api/definitions`                          | 201 [`DefinitionSummary`]                |
//! | `GET  /api/definitions`                          | 200 [`DefinitionList`]                   |
//! | `GET  /api/dlq`                                  | 200 [`DeadLetterList`] (query: [`DeadLetterQuery`]) |
//! | `POST /api/dlq/redrive`                          | 200 [`RedriveResponse`] (body: [`RedriveRequest`]) |
//! | `GET  /api/agents/{name}/metrics`               | 200 [`AgentMetrics`] (query: `range`)    |
//! | `GET  /api/events`                               | 200 `text/event-stream` of [`RunsChanged`] |
//! | `GET  /dashboard`                                | 200, the dashboard's page (and `/dashboard/{asset}`); no credential needed |
//! | `GET  /api/openapi.json`                         | 200, the OpenAPI 3 document of every route (see [`openapi`]); no credential needed |
//!
//! [`router_with_health`] adds `/health/live`, `/health/ready`, `/health` and `/metrics` over a
//! [`Probe`] (see [`health`]); [`health_router`] serves those alone, for workers.
//!
//! Every failure, including malformed bodies, unknown routes and oversized requests, answers with
//! an [`ErrorBody`](flotilla_api_model::ErrorBody). The operator routes (cancel … complete) answer
//! 404 for an unknown run or step and 409 (`conflict`, with the reason) for an action the run's
//! state does not allow; they record who acted: the credential's name and the `Flotilla-Actor`
//! header it claims to act for; with authentication off, the header, or `anonymous@<peer IP>`
//! without one when the router is served with
//! [`into_make_service_with_connect_info`](axum::Router::into_make_service_with_connect_info)
//! (`anonymous` otherwise).
//!
//! Runs, registered definitions and schedules belong to a namespace: a request sees those of
//! its credential's namespaces and acts in the one its `Flotilla-Namespace` header names (see
//! [`auth`] and [`Backend`]); another namespace's answer 404.
//!
//! [`secure`] puts every route but `/health*`, `/api/openapi.json`, `/dashboard*` and `/metrics` behind credentials and scopes, audits
//! every state-changing request, and adds the token and audit routes (see [`auth`]).
//!
//! This crate parses and validates what clients send (definitions are compiled with
//! [`Plan::compile`](flotilla_core::Plan::compile) before the backend sees them) and turns backend
//! answers into HTTP; storing and running workflows is the backend's business.
//!
//! **Architecture invariant:** only this crate knows about HTTP status codes on the server side,
//! and only `error.rs` maps errors to them.
//!
//! [`ExecuteResponse`]: flotilla_api_model::ExecuteResponse
//! [`WorkflowResult`]: flotilla_api_model::WorkflowResult
//! [`RunPage`]: flotilla_api_model::RunPage
//! [`RunQuery`]: flotilla_api_model::RunQuery
//! [`OperateResponse`]: flotilla_api_model::OperateResponse
//! [`RetryRequest`]: flotilla_api_model::RetryRequest
//! [`CompleteRequest`]: flotilla_api_model::CompleteRequest
//! [`RunEventList`]: flotilla_api_model::RunEventList
//! [`DefinitionSummary`]: flotilla_api_model::DefinitionSummary
//! [`DefinitionList`]: flotilla_api_model::DefinitionList
//! [`DeadLetterList`]: flotilla_api_model::DeadLetterList
//! [`DeadLetterQuery`]: flotilla_api_model::DeadLetterQuery
//! [`RedriveResponse`]: flotilla_api_model::RedriveResponse
//! [`RedriveRequest`]: flotilla_api_model::RedriveRequest
//! [`AgentMetrics`]: flotilla_api_model::AgentMetrics
//! [`RunsChanged`]: flotilla_api_model::RunsChanged

pub mod auth;
mod backend;
mod dashboard;
mod error;
mod extract;
pub mod health;
pub mod openapi;
mod quota;
mod routes;
pub mod tls;

pub use auth::{Access, Guard, Namespaces, secure};
pub use backend::{
    AttemptFigures, Backend, BackendError, LatestDefinition, NewSchedule, QuotaExceeded, Submission,
};
pub use health::Probe;
pub use quota::RateLimiter;
pub use routes::{
    DEFAULT_DEAD_LETTER_LIMIT, DEFAULT_RUN_LIMIT, Limits, MAX_DEAD_LETTER_LIMIT, MAX_RUN_LIMIT,
    health_router, router, router_with_health,
};
