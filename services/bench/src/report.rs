//! What a scenario reports: one JSON line.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::machine::{Load, Machine};

/// Latency percentiles in milliseconds, and what was timed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// What one sample is, e.g. "one hop of the chain: a step's end to the next step's end".
    pub of: String,
    pub samples: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// The percentiles of `samples` (nearest rank); `None` when there are none.
    pub fn of(what: &str, mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |q: f64| {
            // Nearest rank: the smallest sample with at least q of them at or below it.
            let n = samples.len();
            let index = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            ms(samples[index])
        };
        Some(Self {
            of: what.into(),
            samples: samples.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: ms(samples[samples.len() - 1]),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Peak resident memory (`VmHWM` from `/proc/<pid>/status`) of the fleet's processes, in MiB.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Rss {
    pub coordinator_mb: Option<f64>,
    /// One per worker process, in the order they were started.
    pub workers_mb: Vec<f64>,
}

/// A fleet scenario as a fraction of the broker's ceiling measured in the same invocation:
/// `throughput` is the scenario's rate over the broker's pipelined rate (1.0 = as fast as the
/// bare broker), `latency_p50` the scenario's median over the broker's one-at-a-time median
/// (1.0 = no cost above the broker's round trip).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ratio {
    pub throughput: Option<f64>,
    pub latency_p50: Option<f64>,
}

/// One scenario's result: one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub scenario: String,
    /// The scenario's size: steps, hops, runs or requests.
    pub n: usize,
    /// What `n` and `throughput` count: "steps", "hops", "runs", "commits", "requests".
    pub unit: String,
    /// `n` over `elapsed_s`; for `memory`, runs submitted per second.
    pub throughput: f64,
    pub elapsed_s: f64,
    /// Steps per second, where the scenario's throughput is one of steps: what is compared with
    /// the broker's rate.
    pub step_rate: Option<f64>,
    pub latency: Option<Latency>,
    pub rss: Option<Rss>,
    pub ratio_to_broker: Option<Ratio>,
    /// Settings and figures of this scenario only.
    pub details: Value,
    pub machine: Machine,
    /// The machine's load average when the scenario started: figures taken under load are
    /// provisional.
    pub load: Load,
    /// Whether the sizes were the `--quick` ones.
    pub quick: bool,
    /// When the scenario ended (RFC 3339, UTC).
    pub at: String,
}

impl Report {
    /// A report of `n` `unit` done in `elapsed`, to be completed by the scenario.
    pub fn new(scenario: &str, n: usize, unit: &str, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64();
        Self {
            scenario: scenario.into(),
            n,
            unit: unit.into(),
            throughput: if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            },
            elapsed_s: seconds,
            step_rate: None,
            latency: None,
            rss: None,
            ratio_to_broker: None,
            details: Value::Null,
            machine: Machine::default(),
            load: Load::default(),
            quick: false,
            at: String::new(),
        }
    }

    #[must_use]
    pub fn latency(mut self, latency: Option<Latency>) -> Self {
        self.latency = latency;
        self
    }

    #[must_use]
    pub fn rss(mut self, rss: Rss) -> Self {
        self.rss = Some(rss);
        self
    }

    #[must_use]
    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// Sets [`Report::ratio_to_broker`] from the broker's report of the same invocation.
    pub fn compare_with(&mut self, broker: &Report) {
        let throughput = self
            .step_rate
            .filter(|_| broker.throughput > 0.0)
            .map(|rate| rate / broker.throughput);
        let latency_p50 = match (&self.latency, &broker.latency) {
            (Some(ours), Some(theirs)) if theirs.p50 > 0.0 => Some(ours.p50 / theirs.p50),
            _ => None,
        };
        self.ratio_to_broker = Some(Ratio {
            throughput,
            latency_p50,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(values: &[u64]) -> Vec<Duration> {
        values.iter().copied().map(Duration::from_millis).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let latency = Latency::of("x", millis(&(1..=100).rev().collect::<Vec<_>>())).unwrap();
        assert_eq!(
            (latency.p50, latency.p90, latency.p99, latency.max),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(latency.samples, 100);
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let latency = Latency::of("x", millis(&[7])).unwrap();
        assert_eq!((latency.p50, latency.p99, latency.max), (7.0, 7.0, 7.0));
        assert!(Latency::of("x", Vec::new()).is_none());
    }

    #[test]
    fn ratios_divide_by_the_broker() {
        let broker = Report::new("broker-roundtrip", 1000, "steps", Duration::from_secs(1))
            .latency(Latency::of("x", millis(&[2])));
        let mut fanout = Report::new("fanout", 500, "steps", Duration::from_secs(1))
            .latency(Latency::of("x", millis(&[6])));
        fanout.step_rate = Some(fanout.throughput);
        fanout.compare_with(&broker);
        assert_eq!(
            fanout.ratio_to_broker,
            Some(Ratio {
                throughput: Some(0.5),
                latency_p50: Some(3.0)
            })
        );
        let mut chain = Report::new("chain", 10, "hops", Duration::from_secs(1))
            .latency(Latency::of("x", millis(&[4])));
        chain.compare_with(&broker);
        assert_eq!(
            chain.ratio_to_broker,
            Some(Ratio {
                throughput: None,
                latency_p50: Some(2.0)
            })
        );
    }
}
