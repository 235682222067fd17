use proptest::prelude::*;

use super::*;

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

fn config() -> BreakerConfig {
    BreakerConfig {
        failure_rate: 0.5,
        window: 4,
        min_attempts: 4,
        cool_down: Duration::from_secs(10),
    }
}

fn probe() -> Probe {
    Probe {
        run_id: Uuid::new_v4(),
        step: 0,
        task_id: Uuid::new_v4(),
    }
}

fn opened(config: &BreakerConfig, when: DateTime<Utc>) -> Breaker {
    let mut b = Breaker::default();
    for _ in 0..config.min_attempts {
        b.record(config, Uuid::new_v4(), true, when);
    }
    assert_eq!(b.state, BreakerState::Open);
    b
}

#[test]
fn opens_once_the_window_has_enough_failures() {
    let config = config();
    let mut b = Breaker::default();
    for (n, failed) in [true, false, true].into_iter().enumerate() {
        b.record(&config, Uuid::new_v4(), failed, at(n as i64));
        assert_eq!(b.state, BreakerState::Closed, "only {} outcomes", n + 1);
    }
    b.record(&config, Uuid::new_v4(), true, at(5));
    assert_eq!(b.state, BreakerState::Open);
    assert_eq!(b.opened_at, Some(at(5)));
    assert_eq!(b.failure_rate(), 0.75);
}

#[test]
fn a_share_equal_to_the_rate_does_not_open() {
    let config = config();
    let mut b = Breaker::default();
    for failed in [true, false, true, false] {
        b.record(&config, Uuid::new_v4(), failed, at(0));
    }
    assert_eq!(b.state, BreakerState::Closed);
}

#[test]
fn the_window_keeps_only_the_latest_outcomes() {
    let config = config();
    let mut b = Breaker::default();
    for failed in [true, true, false, false, false, false] {
        b.record(&config, Uuid::new_v4(), failed, at(0));
    }
    assert_eq!(b.window, [false, false, false, false]);
    assert_eq!(b.state, BreakerState::Closed);
}

#[test]
fn an_open_breaker_holds_until_its_cool_down_then_lets_one_probe_through() {
    let config = config();
    let mut b = opened(&config, at(0));
    assert_eq!(b.probe_at(&config), Some(at(10)));
    assert_eq!(b.admit(&config, probe(), at(9)), Admission::Hold);
    assert_eq!(b.state, BreakerState::Open);
    let first = probe();
    assert_eq!(b.admit(&config, first, at(10)), Admission::Probe);
    assert_eq!(b.state, BreakerState::HalfOpen);
    assert_eq!(b.probe, Some(first));
    assert_eq!(b.admit(&config, probe(), at(11)), Admission::Hold);
}

#[test]
fn the_probes_success_closes_the_breaker_and_clears_its_window() {
    let config = config();
    let mut b = opened(&config, at(0));
    let p = probe();
    b.admit(&config, p, at(10));
    // An attempt dispatched before the breaker opened ends: it is not the probe.
    b.record(&config, Uuid::new_v4(), false, at(11));
    assert_eq!(b.state, BreakerState::HalfOpen);
    b.record(&config, p.task_id, false, at(12));
    assert_eq!(b, Breaker::default());
    assert_eq!(b.admit(&config, probe(), at(12)), Admission::Go);
}

#[test]
fn the_probes_failure_opens_the_breaker_for_another_cool_down() {
    let config = config();
    let mut b = opened(&config, at(0));
    let p = probe();
    b.admit(&config, p, at(10));
    b.record(&config, p.task_id, true, at(12));
    assert_eq!(b.state, BreakerState::Open);
    assert_eq!(b.probe, None);
    assert_eq!(b.probe_at(&config), Some(at(22)));
    assert_eq!(b.admit(&config, probe(), at(21)), Admission::Hold);
    assert_eq!(b.admit(&config, probe(), at(22)), Admission::Probe);
}

#[test]
fn a_probe_that_ends_without_an_outcome_frees_the_way_for_the_next() {
    let config = config();
    let mut b = opened(&config, at(0));
    let p = probe();
    b.admit(&config, p, at(10));
    b.forget_probe(Uuid::new_v4());
    assert_eq!(b.probe, Some(p));
    b.forget_probe(p.task_id);
    assert_eq!(b.state, BreakerState::HalfOpen);
    assert_eq!(b.admit(&config, probe(), at(11)), Admission::Probe);
}

#[test]
fn breakers_admit_agents_they_do_not_hold_and_report_what_changed() {
    let config = config();
    let mut breakers = Breakers::new(
        config,
        [
            ("open".to_string(), opened(&config, at(0))),
            ("calm".to_string(), Breaker::default()),
        ]
        .into(),
    );
    assert_eq!(breakers.admit("unknown", probe(), at(1)), Admission::Go);
    assert_eq!(breakers.admit("calm", probe(), at(1)), Admission::Go);
    assert_eq!(breakers.admit("open", probe(), at(1)), Admission::Hold);
    assert_eq!(breakers.changed().count(), 0);
    breakers.record("calm", Uuid::new_v4(), false, at(1));
    breakers.record("unknown", Uuid::new_v4(), true, at(1));
    let changed: Vec<&str> = breakers.changed().map(|(agent, _)| agent).collect();
    assert_eq!(changed, ["calm"]);
    assert_eq!(breakers.moved().count(), 0, "calm is still closed");
    let probe = probe();
    assert_eq!(breakers.admit("open", probe, at(10)), Admission::Probe);
    let moved: Vec<BreakerState> = breakers.moved().map(|b| b.state).collect();
    assert_eq!(moved, [BreakerState::HalfOpen]);
    breakers.forget_probe(probe.task_id);
    assert_eq!(breakers.get("open").unwrap().probe, None);
}

#[test]
fn bad_configurations_are_refused_with_the_reason() {
    let bad = |f: fn(&mut BreakerConfig)| {
        let mut c = BreakerConfig::default();
        f(&mut c);
        c.validate().unwrap_err()
    };
    assert!(BreakerConfig::default().validate().is_ok());
    assert!(bad(|c| c.failure_rate = 1.0).contains("failure rate"));
    assert!(bad(|c| c.window = 0).contains("window"));
    assert!(bad(|c| c.min_attempts = 21).contains("minimum"));
}

/// What happens to one agent's breaker next.
#[derive(Debug, Clone)]
enum Step {
    /// Ask to dispatch a step, `secs` later.
    Admit { secs: i64 },
    /// An attempt in flight (by position, wrapping) ends.
    End { which: usize, failed: bool },
    /// An attempt in flight is cancelled.
    Cancel { which: usize },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            (0i64..8).prop_map(|secs| Step::Admit { secs }),
            (any::<usize>(), any::<bool>()).prop_map(|(which, failed)| Step::End { which, failed }),
            any::<usize>().prop_map(|which| Step::Cancel { which }),
        ],
        1..200,
    )
}

fn configs() -> impl Strategy<Value = BreakerConfig> {
    (1usize..8, 0.0f64..0.95, 1u64..10).prop_flat_map(|(window, failure_rate, cool_down)| {
        (1..=window).prop_map(move |min_attempts| BreakerConfig {
            failure_rate,
            window,
            min_attempts,
            cool_down: Duration::from_secs(cool_down),
        })
    })
}

proptest! {
    /// Whatever the attempts answer: at most one probe is in flight while half-open, and only
    /// while half-open; the breaker never opens on fewer outcomes than `min_attempts`, nor on a
    /// share of failures at or below the rate; the window never outgrows its size; a held step
    /// is never the probe.
    #[test]
    fn the_breaker_keeps_its_promises(config in configs(), steps in steps()) {
        let mut b = Breaker::default();
        let mut clock = 0;
        // Attempts admitted and not ended: (task id, was the probe).
        let mut inflight: Vec<(Uuid, bool)> = Vec::new();
        for step in steps {
            let before = b.clone();
            match step {
                Step::Admit { secs } => {
                    clock += secs;
                    let p = probe();
                    match b.admit(&config, p, at(clock)) {
                        Admission::Go => {
                            prop_assert_eq!(b.state, BreakerState::Closed);
                            inflight.push((p.task_id, false));
                        }
                        Admission::Probe => {
                            prop_assert_eq!(b.state, BreakerState::HalfOpen);
                            prop_assert!(!inflight.iter().any(|(_, probe)| *probe));
                            inflight.push((p.task_id, true));
                        }
                        Admission::Hold => {
                            prop_assert_ne!(b.state, BreakerState::Closed);
                            prop_assert_ne!(b.probe.map(|p| p.task_id), Some(p.task_id));
                        }
                    }
                }
                Step::End { which, failed } if !inflight.is_empty() => {
                    let (task_id, was_probe) = inflight.remove(which % inflight.len());
                    b.record(&config, task_id, failed, at(clock));
                    if was_probe {
                        let expected = if failed { BreakerState::Open } else { BreakerState::Closed };
                        prop_assert_eq!(b.state, expected);
                    }
                    if before.state == BreakerState::Closed && b.state == BreakerState::Open {
                        prop_assert!(b.window.len() >= config.min_attempts);
                        prop_assert!(b.failure_rate() > config.failure_rate);
                    }
                }
                Step::Cancel { which } if !inflight.is_empty() => {
                    let (task_id, _) = inflight.remove(which % inflight.len());
                    b.forget_probe(task_id);
                }
                Step::End { .. } | Step::Cancel { .. } => {}
            }
            prop_assert!(b.window.len() <= config.window);
            prop_assert_eq!(b.probe.is_some(), inflight.iter().any(|(_, probe)| *probe));
            if b.probe.is_some() {
                prop_assert_eq!(b.state, BreakerState::HalfOpen);
            }
            prop_assert_eq!(b.opened_at.is_some(), b.state != BreakerState::Closed);
        }
    }

    /// A closed breaker whose attempts all succeed stays closed.
    #[test]
    fn successes_keep_a_breaker_closed(config in configs(), n in 0usize..100) {
        let mut b = Breaker::default();
        for i in 0..n {
            prop_assert_eq!(b.admit(&config, probe(), at(i as i64)), Admission::Go);
            b.record(&config, Uuid::new_v4(), false, at(i as i64));
        }
        prop_assert_eq!(b.state, BreakerState::Closed);
    }
}
