//! A circuit breaker per agent, as a state machine: closed (attempts go through and their
//! outcomes fill a window), open (new steps for the agent are held), half-open (after the
//! cool-down, exactly one probe attempt goes through; its success closes the breaker, its failure
//! opens it again).
//!
//! Which outcomes count is the caller's: failed, timed-out and lost attempts are failures;
//! cancelled attempts, stale results and failures before any dispatch (a template error) are not
//! outcomes at all. Time comes in as an argument.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// The breaker opens when the share of failures in the window exceeds this.
    pub failure_rate: f64,
    /// How many of the agent's latest attempt outcomes the window keeps.
    pub window: usize,
    /// The fewest outcomes in the window before the breaker may open.
    pub min_attempts: usize,
    /// How long an open breaker holds steps before it lets a probe through.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            window: 20,
            min_attempts: 10,
            cool_down: Duration::from_secs(30),
        }
    }
}

impl BreakerConfig {
    /// Checks the values make sense together; answers what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.failure_rate) {
            return Err(format!(
                "the breaker's failure rate must be at least 0 and below 1, not {}",
                self.failure_rate
            ));
        }
        if self.window == 0 {
            return Err("the breaker's window must hold at least one attempt".into());
        }
        if self.min_attempts == 0 || self.min_attempts > self.window {
            return Err(format!(
                "the breaker's minimum of attempts must be between 1 and its window ({}), not {}",
                self.window, self.min_attempts
            ));
        }
        Ok(())
    }
}

/// Where a breaker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BreakerState {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "closed" => Self::Closed,
            "open" => Self::Open,
            "half_open" => Self::HalfOpen,
            _ => return None,
        })
    }
}

/// The attempt a half-open breaker let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub run_id: Uuid,
    pub step: usize,
    pub task_id: Uuid,
}

/// One agent's breaker.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Breaker {
    pub state: BreakerState,
    /// The latest outcomes, oldest first: `true` for a failure.
    pub window: VecDeque<bool>,
    /// When it last opened, while open or half-open.
    pub opened_at: Option<DateTime<Utc>>,
    /// The probe in flight, while half-open.
    pub probe: Option<Probe>,
}

/// Whether a step may be dispatched to an agent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Dispatch it.
    Go,
    /// Dispatch it: it is the probe of a half-open breaker.
    Probe,
    /// Hold it until the breaker lets it through.
    Hold,
}

impl Breaker {
    /// The share of failures in the window.
    pub fn failure_rate(&self) -> f64 {
        if self.window.is_empty() {
            return 0.0;
        }
        self.window.iter().filter(|&&f| f).count() as f64 / self.window.len() as f64
    }

    /// When an open breaker lets its probe through.
    pub fn probe_at(&self, config: &BreakerConfig) -> Option<DateTime<Utc>> {
        match self.state {
            BreakerState::Open => self.opened_at.map(|at| at + to_chrono(config.cool_down)),
            _ => None,
        }
    }

    /// Asks to dispatch attempt `probe.task_id` to the agent at `now`. An open breaker past its
    /// cool-down turns half-open; a half-open one without a probe in flight takes this attempt
    /// as its probe.
    pub fn admit(&mut self, config: &BreakerConfig, probe: Probe, now: DateTime<Utc>) -> Admission {
        if self.state == BreakerState::Open && self.probe_at(config).is_some_and(|at| at <= now) {
            self.state = BreakerState::HalfOpen;
            self.probe = None;
        }
        match self.state {
            BreakerState::Closed => Admission::Go,
            BreakerState::Open => Admission::Hold,
            BreakerState::HalfOpen if self.probe.is_some() => Admission::Hold,
            BreakerState::HalfOpen => {
                self.probe = Some(probe);
                Admission::Probe
            }
        }
    }

    /// Records how attempt `task_id` of the agent ended at `now`. A closed breaker opens when
    /// the window holds at least `min_attempts` outcomes and too many failed; the probe of a
    /// half-open one closes it (clearing the window) or opens it again. Other outcomes while not
    /// closed, of attempts dispatched before it opened, only fill the window.
    pub fn record(
        &mut self,
        config: &BreakerConfig,
        task_id: Uuid,
        failed: bool,
        now: DateTime<Utc>,
    ) {
        let probe = self.probe.is_some_and(|p| p.task_id == task_id);
        if self.state == BreakerState::HalfOpen && probe {
            self.probe = None;
            if failed {
                self.state = BreakerState::Open;
                self.opened_at = Some(now);
            } else {
                *self = Self::default();
            }
            return;
        }
        self.window.push_back(failed);
        while self.window.len() > config.window {
            self.window.pop_front();
        }
        if self.state == BreakerState::Closed
            && self.window.len() >= config.min_attempts
            && self.failure_rate() > config.failure_rate
        {
            self.state = BreakerState::Open;
            self.opened_at = Some(now);
        }
    }

    /// The probe's attempt ended without an outcome (cancelled, or its step settled by hand):
    /// the next step for the agent becomes the probe.
    pub fn forget_probe(&mut self, task_id: Uuid) {
        if self.probe.is_some_and(|p| p.task_id == task_id) {
            self.probe = None;
        }
    }
}

/// The breakers a transaction holds (locked), by agent, with the configuration they follow.
/// An agent without one here is treated as closed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Breakers {
    pub config: BreakerConfig,
    by_agent: BTreeMap<String, Breaker>,
    /// Agents whose breaker changed since it was loaded.
    changed: BTreeSet<String>,
    /// Agents whose breaker changed state since it was loaded.
    moved: BTreeSet<String>,
}

impl Breakers {
    pub fn new(config: BreakerConfig, by_agent: BTreeMap<String, Breaker>) -> Self {
        Self {
            config,
            by_agent,
            changed: BTreeSet::new(),
            moved: BTreeSet::new(),
        }
    }

    pub fn get(&self, agent: &str) -> Option<&Breaker> {
        self.by_agent.get(agent)
    }

    /// See [`Breaker::admit`].
    pub fn admit(&mut self, agent: &str, probe: Probe, now: DateTime<Utc>) -> Admission {
        let config = self.config;
        self.update(agent, |b| b.admit(&config, probe, now))
            .unwrap_or(Admission::Go)
    }

    /// See [`Breaker::record`].
    pub fn record(&mut self, agent: &str, task_id: Uuid, failed: bool, now: DateTime<Utc>) {
        let config = self.config;
        self.update(agent, |b| b.record(&config, task_id, failed, now));
    }

    /// See [`Breaker::forget_probe`]; for whichever breaker `task_id` is the probe of.
    pub fn forget_probe(&mut self, task_id: Uuid) {
        let agent = self
            .by_agent
            .iter()
            .find(|(_, b)| b.probe.is_some_and(|p| p.task_id == task_id))
            .map(|(agent, _)| agent.clone());
        if let Some(agent) = agent {
            self.update(&agent, |b| b.forget_probe(task_id));
        }
    }

    /// The breakers that changed state (closed, open, half-open) since they were loaded.
    pub fn moved(&self) -> impl Iterator<Item = &Breaker> {
        self.moved.iter().map(|agent| &self.by_agent[agent])
    }

    /// The breakers that changed, to be written.
    pub fn changed(&self) -> impl Iterator<Item = (&str, &Breaker)> {
        self.changed
            .iter()
            .map(|agent| (agent.as_str(), &self.by_agent[agent]))
    }

    fn update<T>(&mut self, agent: &str, f: impl FnOnce(&mut Breaker) -> T) -> Option<T> {
        let breaker = self.by_agent.get_mut(agent)?;
        let before = breaker.clone();
        let answer = f(breaker);
        if *breaker != before {
            self.changed.insert(agent.to_string());
        }
        if breaker.state != before.state {
            self.moved.insert(agent.to_string());
        }
        Some(answer)
    }
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests;
