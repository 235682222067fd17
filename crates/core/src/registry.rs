//! The registry of workers: when a worker counts as healthy, unhealthy or gone, from when its
//! last heartbeat (or registration) arrived.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// How long a worker may stay silent before it counts as unhealthy, and before it is forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryPolicy {
    /// Past this without a heartbeat a worker is `unhealthy`: it may be stopped, frozen or cut
    /// off. Default 15 s: three heartbeats of the Rust SDK missed.
    pub unhealthy_after: Duration,
    /// Past this without a heartbeat a worker is forgotten. Default 5 minutes.
    pub forget_after: Duration,
}

impl Default for RegistryPolicy {
    fn default() -> Self {
        Self {
            unhealthy_after: Duration::from_secs(15),
            forget_after: Duration::from_secs(300),
        }
    }
}

/// A registered worker's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerHealth {
    Healthy,
    Unhealthy,
}

impl WorkerHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerHealth::Healthy => "healthy",
            WorkerHealth::Unhealthy => "unhealthy",
        }
    }
}

impl RegistryPolicy {
    /// Checks that the worker turns unhealthy before it is forgotten.
    pub fn validate(&self) -> Result<(), String> {
        if self.unhealthy_after.is_zero() || self.unhealthy_after > self.forget_after {
            return Err(format!(
                "a worker must turn unhealthy after a silence above zero and at most as long as \
                 the one after which it is forgotten, not {:?} and {:?}",
                self.unhealthy_after, self.forget_after
            ));
        }
        Ok(())
    }

    /// The health of a worker last heard of at `last_seen`, at `now`; `None` once it is to be
    /// forgotten. A `last_seen` after `now` (another coordinator's clock ahead) is healthy.
    pub fn health(&self, last_seen: DateTime<Utc>, now: DateTime<Utc>) -> Option<WorkerHealth> {
        let silent = (now - last_seen).to_std().unwrap_or_default();
        if silent > self.forget_after {
            None
        } else if silent > self.unhealthy_after {
            Some(WorkerHealth::Unhealthy)
        } else {
            Some(WorkerHealth::Healthy)
        }
    }

    /// Workers last heard of before this are to be forgotten.
    pub fn forget_before(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::from_std(self.forget_after).unwrap_or(chrono::Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn a_silent_worker_turns_unhealthy_then_is_forgotten() {
        let policy = RegistryPolicy {
            unhealthy_after: Duration::from_secs(15),
            forget_after: Duration::from_secs(60),
        };
        let seen = Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, 0).unwrap();
        let at = |secs| seen + chrono::Duration::seconds(secs);
        assert_eq!(policy.health(seen, at(0)), Some(WorkerHealth::Healthy));
        assert_eq!(policy.health(seen, at(15)), Some(WorkerHealth::Healthy));
        assert_eq!(policy.health(seen, at(16)), Some(WorkerHealth::Unhealthy));
        assert_eq!(policy.health(seen, at(60)), Some(WorkerHealth::Unhealthy));
        assert_eq!(policy.health(seen, at(61)), None);
        assert_eq!(policy.health(seen, at(-5)), Some(WorkerHealth::Healthy));
        assert_eq!(policy.forget_before(at(61)), at(1));
    }

    #[test]
    fn a_worker_must_turn_unhealthy_before_it_is_forgotten() {
        assert!(RegistryPolicy::default().validate().is_ok());
        let backwards = RegistryPolicy {
            unhealthy_after: Duration::from_secs(60),
            forget_after: Duration::from_secs(15),
        };
        assert!(backwards.validate().is_err());
        let never_healthy = RegistryPolicy {
            unhealthy_after: Duration::ZERO,
            ..RegistryPolicy::default()
        };
        assert!(never_healthy.validate().is_err());
    }
}
