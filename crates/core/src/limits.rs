//! Per-agent limits on dispatch, shared by every worker of the agent: at most `max_concurrency`
//! of its attempts running at once, and at most `rate_limit` dispatches per period (a token
//! bucket that holds one period's worth, full at first).
//!
//! The caller keeps each agent's [`Slots`] (attempts running, tokens left) where every
//! dispatcher sees them, locked while a dispatch asks; a step these refuse waits like one an open
//! circuit breaker holds. Time comes in as an argument.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Dispatches per period: `100/s`, `30/m`, `500/h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// Reads `N/s`, `N/m` or `N/h`, N a whole number above 0.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad =
            || format!("rate `{text}` is not `N/s`, `N/m` or `N/h` with N a whole number above 0");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(bad)?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Self { count, per })
    }

    /// Tokens added a second.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

/// What one agent may use at once; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limit {
    pub max_concurrency: Option<u32>,
    pub rate: Option<Rate>,
}

/// The limits of every agent that has some. Shared, not copied: each engine batch takes one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentLimits(Arc<BTreeMap<String, Limit>>);

impl AgentLimits {
    /// Reads `;`-separated entries `agent=key:value,…`, the keys `max_concurrency` (a whole
    /// number above 0) and `rate_limit` (see [`Rate::parse`]). Empty text: no limit at all.
    ///
    /// `echo=max_concurrency:4,rate_limit:100/s;http=rate_limit:30/m`
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut limits = BTreeMap::new();
        for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (agent, values) = entry
                .split_once('=')
                .ok_or_else(|| format!("agent limit `{entry}` is not `agent=key:value,…`"))?;
            let agent = agent.trim();
            if agent.is_empty() {
                return Err(format!("agent limit `{entry}` names no agent"));
            }
            let mut limit = Limit::default();
            for pair in values.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once(':').ok_or_else(|| {
                    format!("limit `{pair}` of agent `{agent}` is not `key:value`")
                })?;
                let value = value.trim();
                match key.trim() {
                    "max_concurrency" => {
                        let n = value.parse().ok().filter(|&n: &u32| n > 0).ok_or_else(|| {
                            format!(
                                "max_concurrency `{value}` of agent `{agent}` must be a whole number above 0"
                            )
                        })?;
                        limit.max_concurrency = Some(n);
                    }
                    "rate_limit" => {
                        let rate = Rate::parse(value)
                            .map_err(|e| format!("rate_limit of agent `{agent}`: {e}"))?;
                        limit.rate = Some(rate);
                    }
                    other => {
                        return Err(format!(
                            "unknown limit `{other}` of agent `{agent}`: limits are max_concurrency and rate_limit"
                        ));
                    }
                }
            }
            if limit == Limit::default() {
                return Err(format!("agent limit `{entry}` sets no limit"));
            }
            if limits.insert(agent.to_string(), limit).is_some() {
                return Err(format!("agent `{agent}` has two limit entries"));
            }
        }
        Ok(Self(Arc::new(limits)))
    }

    pub fn get(&self, agent: &str) -> Option<&Limit> {
        self.0.get(agent)
    }

    /// The agents with limits, in order.
    pub fn agents(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What an agent uses of its limit: its attempts running, and its token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Slots {
    pub running: u32,
    /// Tokens left when last counted, at `counted_at`; `None`: a full bucket.
    pub tokens: Option<f64>,
    pub counted_at: Option<DateTime<Utc>>,
}

impl Slots {
    /// Tokens in the bucket at `now`.
    fn tokens_at(&self, rate: &Rate, now: DateTime<Utc>) -> f64 {
        let full = f64::from(rate.count);
        match (self.tokens, self.counted_at) {
            (Some(tokens), Some(at)) => {
                let elapsed = (now - at).to_std().unwrap_or_default().as_secs_f64();
                crate::quota::refill(tokens, elapsed, rate.per_second(), full)
            }
            _ => full,
        }
    }

    /// How many more attempts `limit` lets go at `now`.
    pub fn free(&self, limit: &Limit, now: DateTime<Utc>) -> u32 {
        let by_concurrency = limit
            .max_concurrency
            .map_or(u32::MAX, |max| max.saturating_sub(self.running));
        let by_rate = limit
            .rate
            .map_or(u32::MAX, |rate| self.tokens_at(&rate, now).floor() as u32);
        by_concurrency.min(by_rate)
    }

    /// When the bucket next holds a token, if it holds none at `now`.
    pub fn next_token(&self, limit: &Limit, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let rate = limit.rate?;
        let missing = 1.0 - self.tokens_at(&rate, now);
        (missing > 0.0).then(|| {
            now + chrono::Duration::microseconds((missing / rate.per_second() * 1e6).ceil() as i64)
        })
    }

    fn take(&mut self, limit: &Limit, now: DateTime<Utc>) {
        self.running += 1;
        if let Some(rate) = limit.rate {
            self.tokens = Some(self.tokens_at(&rate, now) - 1.0);
            self.counted_at = Some(now);
        }
    }
}

/// The slots a transaction holds (locked), by agent, with the limits they follow. An agent
/// without a limit is not limited.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits {
    config: AgentLimits,
    by_agent: BTreeMap<String, Slots>,
    changed: BTreeSet<String>,
    /// Agents an attempt of which ended: their held steps may go now.
    freed: BTreeSet<String>,
    /// When a step held for want of a token may go, by agent.
    refills: BTreeMap<String, DateTime<Utc>>,
}

impl Limits {
    pub fn new(config: AgentLimits, by_agent: BTreeMap<String, Slots>) -> Self {
        Self {
            config,
            by_agent,
            ..Self::default()
        }
    }

    /// Whether a step may be dispatched to `agent` at `now`; one that may not is held until
    /// [`Limits::freed`] or [`Limits::refills`] say it may try again.
    pub fn allows(&mut self, agent: &str, now: DateTime<Utc>) -> bool {
        let Some(limit) = self.config.get(agent) else {
            return true;
        };
        let slots = self.by_agent.get(agent).copied().unwrap_or_default();
        if slots.free(limit, now) > 0 {
            return true;
        }
        if let Some(at) = slots.next_token(limit, now) {
            self.refills.insert(agent.to_string(), at);
        }
        false
    }

    /// Counts a dispatch to `agent` at `now` (after [`Limits::allows`] said yes).
    pub fn take(&mut self, agent: &str, now: DateTime<Utc>) {
        let Some(limit) = self.config.get(agent) else {
            return;
        };
        self.by_agent
            .entry(agent.to_string())
            .or_default()
            .take(limit, now);
        self.changed.insert(agent.to_string());
    }

    /// Counts the end of an attempt of `agent` (however it ended). Never below zero: attempts
    /// dispatched before the agent had a limit were not counted.
    pub fn release(&mut self, agent: &str) {
        if self.config.get(agent).is_none() {
            return;
        }
        let slots = self.by_agent.entry(agent.to_string()).or_default();
        slots.running = slots.running.saturating_sub(1);
        self.changed.insert(agent.to_string());
        self.freed.insert(agent.to_string());
    }

    pub fn get(&self, agent: &str) -> Option<&Slots> {
        self.by_agent.get(agent)
    }

    /// The slots that changed, to be written.
    pub fn changed(&self) -> impl Iterator<Item = (&str, &Slots)> {
        self.changed
            .iter()
            .filter_map(|agent| Some((agent.as_str(), self.by_agent.get(agent)?)))
    }

    /// Whether an attempt of a limited agent ended.
    pub fn freed(&self) -> bool {
        !self.freed.is_empty()
    }

    /// When steps held for want of a token may go.
    pub fn refills(&self) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        self.refills.values().copied()
    }
}

#[cfg(test)]
mod tests;
