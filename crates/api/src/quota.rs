//! The requests-per-second quotas of namespaces: a token bucket per namespace, in this process's
//! memory. Each coordinator counts the requests it serves, so behind a load balancer over N
//! coordinators a namespace may make up to N times its quota.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use flotilla_core::quota::{Quotas, TokenBucket};
use serde_json::json;

use crate::auth::Namespaces;
use crate::error::ApiError;

/// Admits requests within their namespaces' quotas.
#[derive(Debug, Default)]
pub struct RateLimiter {
    quotas: Quotas,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl RateLimiter {
    pub fn new(quotas: Quotas) -> Self {
        Self {
            quotas,
            buckets: Mutex::default(),
        }
    }

    /// Takes a request from the bucket of each of a credential's namespaces that has a quota;
    /// refuses it when one is empty. A credential of all namespaces (the fleet's operators) is
    /// not held to any.
    pub(crate) fn admit(&self, namespaces: &Namespaces, now: Instant) -> Result<(), ApiError> {
        let Namespaces::Only(names) = namespaces else {
            return Ok(());
        };
        let mut buckets = self
            .buckets
            .lock()
            .expect("no thread panics holding the buckets");
        for name in names {
            let Some(rate) = self.quotas.of(name).requests_per_second else {
                continue;
            };
            let bucket = buckets
                .entry(name.clone())
                .or_insert_with(|| TokenBucket::new(rate, now));
            if let Err(wait) = bucket.take(now) {
                return Err(ApiError::quota_exceeded(
                    format!(
                        "namespace `{name}` is over its quota of {rate} requests per second; \
                         try again later"
                    ),
                    json!({ "quota": "requestsPerSecond", "namespace": name, "limit": rate }),
                    wait,
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::response::IntoResponse;

    use super::*;

    #[test]
    fn a_namespace_over_its_rate_is_refused_with_retry_after_and_others_are_not() {
        let limiter = RateLimiter::new(Quotas::parse("team-a:rps=1").unwrap());
        let a = Namespaces::Only(vec!["team-a".into()]);
        let b = Namespaces::Only(vec!["team-b".into()]);
        let now = Instant::now();
        assert!(limiter.admit(&a, now).is_ok());
        let refused = limiter.admit(&a, now).unwrap_err().into_response();
        assert_eq!(refused.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()["retry-after"], "1");
        for _ in 0..10 {
            assert!(limiter.admit(&b, now).is_ok());
            assert!(limiter.admit(&Namespaces::All, now).is_ok());
        }
        assert!(limiter.admit(&a, now + Duration::from_secs(1)).is_ok());
    }
}
