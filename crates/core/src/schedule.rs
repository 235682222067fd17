//! `schedule:` — when a definition runs by itself: a cron expression in a time zone, with a
//! policy for ticks missed while no coordinator ran and for ticks that come while the previous
//! run is still going.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What to do with ticks that passed while no coordinator was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Forget them; run at the next tick.
    #[default]
    Skip,
    /// Run once for all of them, at once, then follow the schedule.
    CatchUpOnce,
}

/// What to do with a tick while the schedule's previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Start no run for that tick.
    #[default]
    Skip,
    /// Start a run anyway.
    Allow,
}

/// `schedule:` as written: a cron string, or the long form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScheduleSpec {
    Cron(String),
    Full {
        cron: String,
        #[serde(default)]
        timezone: Option<String>,
        #[serde(default)]
        missed: Missed,
        #[serde(default)]
        overlap: Overlap,
    },
}

/// A checked schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub cron: String,
    pub timezone: String,
    pub missed: Missed,
    pub overlap: Overlap,
    parsed: croner::Cron,
    zone: chrono_tz::Tz,
}

impl Schedule {
    /// Checks a schedule: the cron expression (five fields, or six with seconds) and the time
    /// zone (an IANA name such as `Europe/Paris`; default UTC).
    pub fn new(
        cron: &str,
        timezone: Option<&str>,
        missed: Missed,
        overlap: Overlap,
    ) -> Result<Self, String> {
        let parsed = croner::Cron::from_str(cron)
            .map_err(|e| format!("schedule `{cron}` is not a cron expression: {e}"))?;
        let timezone = timezone.unwrap_or("UTC");
        let zone = chrono_tz::Tz::from_str(timezone).map_err(|_| {
            format!("`{timezone}` is not a time zone (use an IANA name such as Europe/Paris)")
        })?;
        Ok(Self {
            cron: cron.to_string(),
            timezone: timezone.to_string(),
            missed,
            overlap,
            parsed,
            zone,
        })
    }

    pub fn from_spec(spec: &ScheduleSpec) -> Result<Self, String> {
        match spec {
            ScheduleSpec::Cron(cron) => {
                Self::new(cron, None, Missed::default(), Overlap::default())
            }
            ScheduleSpec::Full {
                cron,
                timezone,
                missed,
                overlap,
            } => Self::new(cron, timezone.as_deref(), *missed, *overlap),
        }
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.zone);
        self.parsed
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// Decides what a due tick does. `tick` is the tick that came due; `now` is now. Answers
    /// whether to start a run for it, and the next tick to wait for. Missed ticks (more than
    /// one tick behind) are skipped, or caught up once, by the schedule's policy.
    pub fn fire(
        &self,
        tick: DateTime<Utc>,
        now: DateTime<Utc>,
        previous_running: bool,
    ) -> (bool, Option<DateTime<Utc>>) {
        let next = self.next_after(now);
        let missed = self.next_after(tick).is_some_and(|after| after <= now);
        let run = match (missed, self.missed) {
            (true, Missed::Skip) => false,
            _ => !(previous_running && self.overlap == Overlap::Skip),
        };
        (run, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-25T{h:02}:{m:02}:00Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn every_five_minutes() {
        let s = Schedule::new("*/5 * * * *", None, Missed::Skip, Overlap::Skip).unwrap();
        assert_eq!(s.next_after(at(10, 2)), Some(at(10, 5)));
        assert_eq!(s.next_after(at(10, 5)), Some(at(10, 10)));
    }

    #[test]
    fn a_time_zone_moves_the_ticks() {
        let s = Schedule::new(
            "0 9 * * *",
            Some("Europe/Paris"),
            Missed::Skip,
            Overlap::Skip,
        )
        .unwrap();
        // 09:00 in Paris is 08:00 UTC in November.
        assert_eq!(s.next_after(at(0, 0)), Some(at(8, 0)));
    }

    #[test]
    fn missed_ticks_follow_the_policy_and_overlap_is_skipped() {
        let skip = Schedule::new("*/5 * * * *", None, Missed::Skip, Overlap::Skip).unwrap();
        let catch_up =
            Schedule::new("*/5 * * * *", None, Missed::CatchUpOnce, Overlap::Allow).unwrap();
        // On time: runs.
        assert_eq!(
            skip.fire(at(10, 5), at(10, 5), false),
            (true, Some(at(10, 10)))
        );
        // Twenty minutes late: skipped, or run once, and the next tick is the next future one.
        assert_eq!(
            skip.fire(at(10, 5), at(10, 26), false),
            (false, Some(at(10, 30)))
        );
        assert_eq!(
            catch_up.fire(at(10, 5), at(10, 26), false),
            (true, Some(at(10, 30)))
        );
        // The previous run still going.
        assert!(!skip.fire(at(10, 5), at(10, 5), true).0);
        assert!(catch_up.fire(at(10, 5), at(10, 5), true).0);
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        assert!(
            Schedule::new("every five minutes", None, Missed::Skip, Overlap::Skip)
                .unwrap_err()
                .contains("not a cron expression")
        );
        assert!(
            Schedule::new(
                "* * * * *",
                Some("Mars/Olympus"),
                Missed::Skip,
                Overlap::Skip
            )
            .unwrap_err()
            .contains("not a time zone")
        );
    }
}
