use proptest::prelude::*;

use super::*;

fn at_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
}

fn limits(text: &str) -> Limits {
    Limits::new(AgentLimits::parse(text).unwrap(), BTreeMap::new())
}

#[test]
fn entries_are_read() {
    let limits =
        AgentLimits::parse(" echo=max_concurrency:4, rate_limit:100/s ; http=rate_limit:30/m")
            .unwrap();
    assert_eq!(
        limits.get("echo"),
        Some(&Limit {
            max_concurrency: Some(4),
            rate: Some(Rate {
                count: 100,
                per: Duration::from_secs(1)
            }),
        })
    );
    assert_eq!(limits.get("http").unwrap().rate.unwrap().per_second(), 0.5);
    assert_eq!(limits.agents().collect::<Vec<_>>(), ["echo", "http"]);
    assert!(AgentLimits::parse("").unwrap().is_empty());
}

#[test]
fn faults_are_named() {
    for (text, says) in [
        ("echo", "is not `agent=key:value"),
        ("=max_concurrency:1", "names no agent"),
        (
            "echo=max_concurrency",
            "`max_concurrency` of agent `echo` is not `key:value`",
        ),
        (
            "echo=max_concurrency:0",
            "max_concurrency `0` of agent `echo`",
        ),
        ("echo=rate_limit:5", "rate_limit of agent `echo`: rate `5`"),
        ("echo=rate_limit:0/s", "whole number above 0"),
        ("echo=rate_limit:5/d", "`N/s`, `N/m` or `N/h`"),
        ("echo=burst:5", "unknown limit `burst` of agent `echo`"),
        ("echo=", "sets no limit"),
        (
            "echo=max_concurrency:1;echo=rate_limit:1/s",
            "two limit entries",
        ),
    ] {
        let err = AgentLimits::parse(text).unwrap_err();
        assert!(err.contains(says), "{text}: {err}");
    }
}

#[test]
fn concurrency_is_capped_until_an_attempt_ends() {
    let mut l = limits("echo=max_concurrency:2");
    let now = at_ms(0);
    for _ in 0..2 {
        assert!(l.allows("echo", now));
        l.take("echo", now);
    }
    assert!(!l.allows("echo", now));
    assert!(!l.freed());
    assert!(l.allows("other", now), "an agent without a limit is free");
    l.release("echo");
    assert!(l.freed());
    assert!(l.allows("echo", now));
    assert_eq!(l.get("echo").unwrap().running, 1);
    assert_eq!(l.changed().count(), 1);
}

#[test]
fn the_rate_allows_a_burst_then_one_token_at_a_time() {
    let mut l = limits("echo=rate_limit:2/s");
    for _ in 0..2 {
        assert!(l.allows("echo", at_ms(0)));
        l.take("echo", at_ms(0));
    }
    assert!(!l.allows("echo", at_ms(0)));
    assert_eq!(l.refills().collect::<Vec<_>>(), [at_ms(500)]);
    assert!(!l.allows("echo", at_ms(499)));
    assert!(l.allows("echo", at_ms(500)));
}

#[test]
fn a_release_never_counts_below_zero() {
    let mut l = limits("echo=max_concurrency:1");
    l.release("echo");
    assert_eq!(l.get("echo").unwrap().running, 0);
    l.release("unlimited");
    assert!(l.get("unlimited").is_none());
}

proptest! {
    /// However dispatches and ends interleave, no more than `max` run at once, and no window
    /// of time sees more dispatches than the burst plus the tokens it refills.
    #[test]
    fn limits_hold(steps in proptest::collection::vec((0i64..300, any::<bool>()), 1..200)) {
        let mut l = limits("a=max_concurrency:3,rate_limit:5/s");
        let mut now = 0;
        let mut running = 0u32;
        let mut dispatched = Vec::new();
        for (gap, end) in steps {
            now += gap;
            if end && running > 0 {
                l.release("a");
                running -= 1;
            } else if l.allows("a", at_ms(now)) {
                l.take("a", at_ms(now));
                running += 1;
                dispatched.push(now);
            }
            prop_assert!(running <= 3);
        }
        for (i, &from) in dispatched.iter().enumerate() {
            for (j, &to) in dispatched.iter().enumerate().skip(i) {
                let allowed = 5.0 + 5.0 * (to - from) as f64 / 1000.0;
                prop_assert!((j - i + 1) as f64 <= allowed + 1e-9, "{} dispatches in {}ms", j - i + 1, to - from);
            }
        }
    }
}
