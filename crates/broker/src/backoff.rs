//! Exponential backoff with jitter, for reconnecting to RabbitMQ.

use std::time::Duration;

use uuid::Uuid;

/// How long to wait before each attempt to reconnect: `initial`, doubling after every failed
/// attempt up to `max`.
///
/// Each wait is shortened by a random part of up to half, so that the processes cut off by one
/// outage do not all knock on the broker's door at the same instant when it comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the first attempt. Must not be zero: doubling zero stays zero.
    pub initial: Duration,
    /// The longest wait, reached after a few failed attempts and kept until one succeeds.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait before attempt number `attempt` (0 for the first), with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        jittered(self.ceiling(attempt), random_fraction())
    }

    /// `initial × 2^attempt`, capped at `max`.
    fn ceiling(&self, attempt: u32) -> Duration {
        2_u32
            .checked_pow(attempt)
            .and_then(|factor| self.initial.checked_mul(factor))
            .map_or(self.max, |delay| delay.min(self.max))
    }
}

/// Shortens `ceiling` by `fraction` (in `[0, 1)`) of its half.
fn jittered(ceiling: Duration, fraction: f64) -> Duration {
    ceiling.mul_f64(1.0 - fraction / 2.0)
}

/// A uniform random number in `[0, 1)`. Jitter needs no better randomness than the 53 low bits
/// of a v4 UUID (all random), which this crate already generates for message ids.
fn random_fraction() -> f64 {
    const BITS: u32 = f64::MANTISSA_DIGITS;
    let bits = Uuid::new_v4().as_u128() & ((1_u128 << BITS) - 1);
    // Exact: both values fit in an f64's mantissa.
    #[allow(clippy::cast_precision_loss)]
    let fraction = bits as f64 / (1_u64 << BITS) as f64;
    fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_double_from_initial_up_to_max() {
        let backoff = Backoff::default();
        let ceilings: Vec<Duration> = (0..9).map(|n| backoff.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000].map(|ms| ms * MS)
        );
        // No overflow however long the outage.
        assert_eq!(backoff.ceiling(40), backoff.max);
        assert_eq!(backoff.ceiling(u32::MAX), backoff.max);
    }

    #[test]
    fn jitter_shortens_a_wait_by_at_most_half() {
        assert_eq!(jittered(1000 * MS, 0.0), 1000 * MS);
        assert_eq!(jittered(1000 * MS, 0.5), 750 * MS);
        assert!(jittered(1000 * MS, 0.999_999) > 500 * MS);

        let backoff = Backoff {
            initial: 10 * MS,
            max: 80 * MS,
        };
        let delays: Vec<Duration> = (0..200).map(|_| backoff.delay(2)).collect();
        assert!(delays.iter().all(|d| (20 * MS..=40 * MS).contains(d)));
        // Random, not a constant.
        assert!(delays.iter().any(|d| *d != delays[0]), "{delays:?}");
    }

    #[test]
    fn random_fractions_stay_in_the_unit_interval() {
        assert!(
            (0..1000)
                .map(|_| random_fraction())
                .all(|f| (0.0..1.0).contains(&f))
        );
    }
}
