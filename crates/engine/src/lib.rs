//! The coordinator's engine.
//!
//! - [`engine`]: one task that owns the cached state of active runs and turns batches of inputs
//!   (submissions, results, due retries) into one Postgres transaction each;
//! - [`relay`]: publishes what a committed batch put in the outbox, with confirms, and deletes it
//!   once confirmed; a sweeper re-publishes what a crash or disconnect left behind;
//! - [`timer`]: wakes waiting steps when their retry is due;
//! - [`results`]: consumes worker results and hands them to the engine;
//! - [`logs`]: consumes the lines of steps' logs and stores them;
//! - `trace`: the spans of runs and attempts, and the trace context each task carries.
//!
//! **Architecture invariant:** a task is published only after the transaction that dispatched
//! it has committed, and a result is acknowledged to RabbitMQ only after the transaction that
//! recorded it has committed.

mod breakers;
pub mod dead;
pub mod engine;
pub mod heartbeats;
mod limits;
pub mod logs;
pub mod relay;
pub mod results;
pub mod schedules;
pub mod timer;
mod trace;

pub use engine::{
    Due, Engine, EngineConfig, EngineHandle, Error, NewRun, Operation, Redriven, Submitted,
};
