//! The benchmark harness of Flotilla. Each scenario starts what it needs against the configured
//! RabbitMQ and Postgres — its own database and queue prefix, cleaned up after — and yields one
//! [`Report`], printed as one JSON line.
//!
//! `broker-roundtrip` measures the ceiling the fleet is compared with: the bare round trip of a
//! step on RabbitMQ (persistent task with confirms, consumed and acked, persistent result with
//! confirms, consumed and acked). Every fleet scenario reports its throughput and latency as a
//! ratio to it, measured in the same invocation on the same machine.
//!
//! The fleets are those of the end-to-end tests (`flotilla-tests`): the real coordinator and
//! echo worker binaries, started from the profile directory the bench itself was built in.

pub mod broker;
pub mod fleet;
pub mod machine;
pub mod postgres;
pub mod report;

pub use report::{Latency, Ratio, Report, Rss};

/// The scenarios, in the order they run.
pub const SCENARIOS: &[&str] = &[
    "broker-roundtrip",
    "postgres-commit",
    "fanout",
    "chain",
    "many-runs",
    "submit-latency",
    "memory",
    "history",
    "scaling",
];

/// The scenarios that run a fleet and are reported as a ratio to `broker-roundtrip`.
pub fn is_fleet_scenario(name: &str) -> bool {
    !matches!(name, "broker-roundtrip" | "postgres-commit")
}

/// The sizes of the scenarios.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Steps of `fanout` (and of the fan-out after history); messages of `broker-roundtrip`.
    pub steps: usize,
    /// Sequential steps of `chain`.
    pub chain: usize,
    /// Runs of `many-runs`.
    pub runs: usize,
    /// Runs in flight in `memory`.
    pub memory_runs: usize,
    /// Seconds of submissions in `submit-latency`.
    pub submit_seconds: u64,
    /// Requests per second in `submit-latency`.
    pub submit_rate: u64,
    /// Finished steps seeded before `history`.
    pub history_steps: usize,
    /// Times `history` measures each of its scenarios before the seeding and after it.
    pub history_repeats: usize,
    /// Messages in flight in `broker-roundtrip`.
    pub in_flight: usize,
    /// Commits of the single Postgres client; seconds of the 8 concurrent clients.
    pub commits: usize,
    pub commit_seconds: u64,
    /// Echo worker processes.
    pub workers: usize,
    /// Tasks each echo worker runs at once.
    pub concurrency: usize,
    /// Steps of `scaling`, and the slots of each of its workers: few enough that the workers,
    /// not the coordinator, bound the rate.
    pub scaling_steps: usize,
    pub scaling_concurrency: usize,
}

impl Sizes {
    /// The sizes of the targets.
    pub fn full() -> Self {
        Self {
            steps: 10_000,
            chain: 200,
            runs: 10_000,
            memory_runs: 10_000,
            submit_seconds: 10,
            submit_rate: 200,
            history_steps: 1_000_000,
            history_repeats: 3,
            in_flight: 500,
            commits: 2_000,
            commit_seconds: 5,
            workers: 2,
            concurrency: 64,
            scaling_steps: 2_000,
            scaling_concurrency: 4,
        }
    }

    /// Sizes small enough for a smoke check in CI: they prove each scenario works, their
    /// figures mean little.
    pub fn quick() -> Self {
        Self {
            steps: 200,
            chain: 20,
            runs: 100,
            memory_runs: 200,
            submit_seconds: 1,
            submit_rate: 50,
            history_steps: 10_000,
            history_repeats: 1,
            in_flight: 50,
            commits: 100,
            commit_seconds: 1,
            workers: 2,
            concurrency: 16,
            scaling_steps: 100,
            scaling_concurrency: 4,
        }
    }
}
