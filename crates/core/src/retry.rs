//! Retry policy: how many attempts a step gets and how long to wait between them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::RetrySpec;

/// How the wait grows from one retry to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// The same `delay` every time.
    Fixed,
    /// `delay × n` after the n-th failed attempt.
    Linear,
    /// `delay × 2^(n-1)` after the n-th failed attempt.
    Exponential,
}

/// A resolved retry policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub delay: Duration,
    pub max_delay: Duration,
    /// Fraction (0 to 1) of each delay that is randomised downwards, so that many steps failing
    /// together do not retry together.
    pub jitter: f64,
}

/// The most attempts a step may be given; more is almost always a mistake in the definition.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff: Backoff::Exponential,
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            jitter: 0.0,
        }
    }
}

impl RetryPolicy {
    /// Resolves a step's policy: the step's fields first, then the workflow's, then defaults.
    pub fn resolve(step: Option<&RetrySpec>, workflow: Option<&RetrySpec>) -> Result<Self, String> {
        let base = Self::default();
        let policy = Self {
            max_attempts: step
                .and_then(|s| s.max_attempts)
                .or_else(|| workflow.and_then(|s| s.max_attempts))
                .unwrap_or(base.max_attempts),
            backoff: step
                .and_then(|s| s.backoff)
                .or_else(|| workflow.and_then(|s| s.backoff))
                .unwrap_or(base.backoff),
            delay: step
                .and_then(|s| s.delay)
                .or_else(|| workflow.and_then(|s| s.delay))
                .map_or(base.delay, |d| d.0),
            max_delay: step
                .and_then(|s| s.max_delay)
                .or_else(|| workflow.and_then(|s| s.max_delay))
                .map_or(base.max_delay, |d| d.0),
            jitter: step
                .and_then(|s| s.jitter)
                .or_else(|| workflow.and_then(|s| s.jitter))
                .unwrap_or(base.jitter),
        };
        if policy.max_attempts == 0 || policy.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(format!(
                "retry.max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, not {}",
                policy.max_attempts
            ));
        }
        if !(0.0..=1.0).contains(&policy.jitter) {
            return Err(format!(
                "retry.jitter must be a fraction between 0 and 1, not {}",
                policy.jitter
            ));
        }
        if policy.max_delay < policy.delay {
            return Err(format!(
                "retry.max_delay ({:?}) is shorter than retry.delay ({:?})",
                policy.max_delay, policy.delay
            ));
        }
        Ok(policy)
    }

    /// Whether a step whose attempt `attempt` just failed gets another attempt.
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The wait after failed attempt `attempt` (1-based). `unit` is a number in `[0, 1)` that
    /// picks the jitter; callers derive it from the attempt so the result is reproducible.
    pub fn delay_after(&self, attempt: u32, unit: f64) -> Duration {
        let n = attempt.max(1);
        let raw = match self.backoff {
            Backoff::Fixed => self.delay,
            Backoff::Linear => self.delay.saturating_mul(n),
            Backoff::Exponential => self.delay.saturating_mul(2u32.saturating_pow(n - 1)),
        };
        let capped = raw.min(self.max_delay);
        let cut = capped.as_secs_f64() * self.jitter * unit.clamp(0.0, 1.0);
        capped.saturating_sub(Duration::from_secs_f64(cut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::UserDuration;
    use proptest::prelude::*;

    fn spec(max: u32, backoff: Backoff, delay_ms: u64) -> RetrySpec {
        RetrySpec {
            max_attempts: Some(max),
            backoff: Some(backoff),
            delay: Some(UserDuration(Duration::from_millis(delay_ms))),
            ..RetrySpec::default()
        }
    }

    #[test]
    fn step_fields_override_workflow_fields_one_by_one() {
        let workflow = spec(3, Backoff::Exponential, 100);
        let step = RetrySpec {
            max_attempts: Some(5),
            ..RetrySpec::default()
        };
        let p = RetryPolicy::resolve(Some(&step), Some(&workflow)).unwrap();
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.backoff, Backoff::Exponential);
        assert_eq!(p.delay, Duration::from_millis(100));
    }

    #[test]
    fn backoff_shapes() {
        let p = |b| RetryPolicy::resolve(Some(&spec(9, b, 100)), None).unwrap();
        let ms = |p: RetryPolicy, n| p.delay_after(n, 0.0).as_millis();
        assert_eq!([1, 2, 3].map(|n| ms(p(Backoff::Fixed), n)), [100, 100, 100]);
        assert_eq!(
            [1, 2, 3].map(|n| ms(p(Backoff::Linear), n)),
            [100, 200, 300]
        );
        assert_eq!(
            [1, 2, 3].map(|n| ms(p(Backoff::Exponential), n)),
            [100, 200, 400]
        );
    }

    #[test]
    fn nonsense_is_refused() {
        assert!(RetryPolicy::resolve(Some(&spec(0, Backoff::Fixed, 1)), None).is_err());
        let jitter = RetrySpec {
            jitter: Some(1.5),
            ..RetrySpec::default()
        };
        assert!(
            RetryPolicy::resolve(Some(&jitter), None)
                .unwrap_err()
                .contains("jitter")
        );
    }

    proptest! {
        #[test]
        fn delays_stay_within_cap_and_jitter(
            delay_ms in 0u64..10_000,
            cap_extra in 0u64..100_000,
            jitter in 0.0f64..=1.0,
            unit in 0.0f64..1.0,
            attempt in 1u32..200,
            backoff in prop_oneof![Just(Backoff::Fixed), Just(Backoff::Linear), Just(Backoff::Exponential)],
        ) {
            let p = RetryPolicy {
                max_attempts: 100,
                backoff,
                delay: Duration::from_millis(delay_ms),
                max_delay: Duration::from_millis(delay_ms + cap_extra),
                jitter,
            };
            let d = p.delay_after(attempt, unit);
            let undisturbed = p.delay_after(attempt, 0.0);
            prop_assert!(d <= p.max_delay);
            prop_assert!(d <= undisturbed);
            prop_assert!(d.as_secs_f64() >= undisturbed.as_secs_f64() * (1.0 - jitter) - 1e-6);
            // Without jitter the wait never shrinks from one attempt to the next.
            prop_assert!(p.delay_after(attempt + 1, 0.0) >= undisturbed);
        }
    }
}
