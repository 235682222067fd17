//! The I/O-free heart of Flotilla.
//!
//! - [`breaker`]: the circuit breaker of an agent (closed, open, half-open).
//! - [`definition`]: the user's workflow format (YAML or JSON) and its parsing.
//! - [`plan`]: validation, and compilation of a definition into a DAG of nodes.
//! - [`condition`]: `condition:` expressions (CEL) over earlier steps, and `expect:` over a
//!   step's own output.
//! - [`expression`]: the bounds of CEL expressions, and the one place they are parsed and run.
//! - [`json`]: whether JSON text holds what Postgres cannot store (a NUL).
//! - [`retry`]: retry policy and backoff.
//! - [`subset`]: running part of a definition (`only` / `skip`).
//! - [`scheduler`]: a run as a state machine — an event in, the new state and the effects out.
//! - [`labels`]: the labels a step asks of its worker, and their checks.
//! - [`limits`]: per-agent concurrency caps and rate limits on dispatch.
//! - [`quota`]: per-namespace quotas and the token bucket of requests per second.
//! - [`registry`]: when a worker of the registry counts as healthy, unhealthy or gone.
//!
//! **Architecture invariant:** nothing here performs I/O or reads the clock; time comes in as an
//! argument, so every transition is reproducible in tests.

pub mod breaker;
pub mod condition;
pub mod definition;
pub mod duration;
pub mod expression;
pub mod json;
pub mod labels;
pub mod limits;
pub mod plan;
pub mod quota;
mod redact;
pub mod registry;
pub mod report;
pub mod retry;
pub mod schedule;
pub mod scheduler;
pub mod subset;
pub mod template;

pub use definition::{Definition, DefinitionError};
pub use plan::{Plan, PlanError};
pub use redact::redact_url;
pub use scheduler::{Effect, Event, Outcome, RunState, RunStatus, StepState, StepStatus, Strike};
pub use subset::{Subset, SubsetError};
