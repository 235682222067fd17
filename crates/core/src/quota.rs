//! Per-namespace quotas: what each namespace may use, as configured, and the token bucket that
//! bounds a namespace's requests per second.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What one namespace may use; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quota {
    /// Runs submitted and not ended yet (a sub-workflow's run is part of its parent's).
    pub runs_in_flight: Option<u64>,
    /// Steps one run may have: its plan's steps plus the instances its `for_each` steps may
    /// expand to.
    pub steps_per_run: Option<u64>,
    /// API requests per second, with bursts of as many.
    pub requests_per_second: Option<f64>,
}

/// The quotas of every namespace: those named, and `*`'s for the others.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quotas {
    default: Quota,
    namespaces: BTreeMap<String, Quota>,
}

impl Quotas {
    /// Reads quotas written as `;`-separated entries `namespace:key=value,…`, where `namespace`
    /// is `*` for every namespace without an entry of its own and the keys are `runs` (runs in
    /// flight), `steps` (steps per run) and `rps` (requests per second). A namespace's entry
    /// takes the values it leaves out from `*`'s. Empty text: no quota at all.
    ///
    /// `*:runs=100,rps=50;team-a:runs=5,steps=2000`
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut quotas = Self::default();
        let mut named: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (namespace, values) = entry
                .split_once(':')
                .ok_or_else(|| format!("quota entry `{entry}` is not `namespace:key=value,…`"))?;
            let namespace = namespace.trim();
            if namespace.is_empty() {
                return Err(format!("quota entry `{entry}` names no namespace"));
            }
            if named.iter().any(|(n, _)| n == namespace) {
                return Err(format!("namespace `{namespace}` has two quota entries"));
            }
            let mut pairs = Vec::new();
            for pair in values.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("quota `{pair}` of `{namespace}` is not `key=value`"))?;
                pairs.push((key.trim().to_string(), value.trim().to_string()));
            }
            named.push((namespace.to_string(), pairs));
        }
        // `*` first, so that the other entries start from it wherever it was written.
        named.sort_by_key(|(n, _)| n != "*");
        for (namespace, pairs) in named {
            let mut quota = quotas.default;
            for (key, value) in pairs {
                let bad = |what: &str| {
                    format!("quota `{key}={value}` of `{namespace}`: the value must be {what}")
                };
                match key.as_str() {
                    "runs" => {
                        quota.runs_in_flight =
                            Some(value.parse().map_err(|_| bad("a whole number"))?);
                    }
                    "steps" => {
                        quota.steps_per_run =
                            Some(value.parse().map_err(|_| bad("a whole number"))?);
                    }
                    "rps" => {
                        let rps: f64 = value
                            .parse()
                            .ok()
                            .filter(|r: &f64| r.is_finite() && *r > 0.0)
                            .ok_or_else(|| bad("a number above 0"))?;
                        quota.requests_per_second = Some(rps);
                    }
                    _ => {
                        return Err(format!(
                            "unknown quota `{key}` of `{namespace}`: quotas are runs, steps and rps"
                        ));
                    }
                }
            }
            if namespace == "*" {
                quotas.default = quota;
            } else {
                quotas.namespaces.insert(namespace, quota);
            }
        }
        Ok(quotas)
    }

    /// The quota of `namespace`.
    pub fn of(&self, namespace: &str) -> Quota {
        self.namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.default)
    }

    /// The namespaces with an entry of their own.
    pub fn named(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }
}

/// A token bucket's tokens after `elapsed_secs` at `per_second`, never above `capacity`.
pub(crate) fn refill(tokens: f64, elapsed_secs: f64, per_second: f64, capacity: f64) -> f64 {
    (tokens + elapsed_secs * per_second).min(capacity)
}

/// A token bucket: `rate` tokens a second, holding at most `rate` (at least 1), full at first.
/// Time comes in as an argument.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.max(1.0),
            at: now,
        }
    }

    /// Takes a token; without one, answers how long until there is one.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = refill(self.tokens, elapsed, self.rate, self.rate.max(1.0));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_start_from_the_default_wherever_it_is_written() {
        let quotas = Quotas::parse(" team-a:runs=5 ; *:runs=100,rps=2.5,steps=9 ").unwrap();
        assert_eq!(
            quotas.of("team-a"),
            Quota {
                runs_in_flight: Some(5),
                steps_per_run: Some(9),
                requests_per_second: Some(2.5),
            }
        );
        assert_eq!(quotas.of("other").runs_in_flight, Some(100));
        assert_eq!(quotas.named().collect::<Vec<_>>(), ["team-a"]);
        assert_eq!(Quotas::parse("").unwrap().of("x"), Quota::default());
    }

    #[test]
    fn faults_are_named() {
        for (text, says) in [
            ("team-a", "not `namespace:key=value"),
            ("a:runs=1;a:rps=1", "two quota entries"),
            ("a:runs=-1", "`runs=-1` of `a`"),
            ("a:rps=0", "a number above 0"),
            ("a:cpus=2", "unknown quota `cpus`"),
            (":runs=1", "names no namespace"),
        ] {
            let err = Quotas::parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, start);
        assert_eq!(bucket.take(start), Ok(()));
        assert_eq!(bucket.take(start), Ok(()));
        let wait = bucket.take(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(bucket.take(start + Duration::from_millis(499)).is_err());
        assert_eq!(bucket.take(start + Duration::from_millis(1000)), Ok(()));
    }

    #[test]
    fn a_slow_bucket_still_holds_one_request() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(0.5, start);
        assert_eq!(bucket.take(start), Ok(()));
        assert_eq!(bucket.take(start), Err(Duration::from_secs(2)));
        assert_eq!(bucket.take(start + Duration::from_secs(2)), Ok(()));
    }
}
