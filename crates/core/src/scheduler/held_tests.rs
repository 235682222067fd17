//! Steps held by an agent's circuit breaker.

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;

use super::tests::dispatched_slots;
use super::*;
use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::definition::Definition;

fn plan() -> Plan {
    let yaml = "name: p\nsteps:\n  - {id: a, agent: flaky, action: x}\n  - {id: b, agent: calm, action: x, depends_on: []}\n  - {id: c, agent: flaky, action: x, depends_on: [b]}\n";
    Plan::compile(&Definition::from_yaml(yaml).unwrap()).unwrap()
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

/// Breakers with `flaky` open since `at(0)` (cool-down 10 s) and `calm` closed.
fn breakers() -> Breakers {
    let open = Breaker {
        state: BreakerState::Open,
        window: VecDeque::from([true, true]),
        opened_at: Some(at(0)),
        probe: None,
    };
    let config = BreakerConfig {
        cool_down: Duration::from_secs(10),
        ..BreakerConfig::default()
    };
    Breakers::new(
        config,
        [
            ("flaky".to_string(), open),
            ("calm".to_string(), Breaker::default()),
        ]
        .into(),
    )
}

fn dispatched(t: &Transition) -> Vec<usize> {
    dispatched_slots(t).iter().map(|d| d.0).collect()
}

#[test]
fn a_step_for_an_open_breaker_is_held_without_an_attempt() {
    let plan = plan();
    let mut b = breakers();
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = run.apply_gated(&plan, Event::Start, at(1), &mut b);
    assert_eq!(dispatched(&t), [1], "only the closed agent's step goes");
    assert!(t.effects.contains(&Effect::Held {
        step: 0,
        agent: "flaky".into(),
        by_limit: false,
    }));
    let a = &run.steps[0];
    assert_eq!(a.status, StepStatus::Waiting);
    assert_eq!(a.held.as_deref(), Some("flaky"));
    assert_eq!(
        (a.attempt, a.task_id, a.deadline, a.started_at),
        (0, None, None, None)
    );
    // Still open: a release leaves it held and changes nothing.
    let t = run.apply_gated(&plan, Event::Release { step: 0 }, at(5), &mut b);
    assert!(t.changed.is_empty() && t.effects.is_empty(), "{t:?}");
    // Not held: a release is stale.
    let t = run.apply_gated(&plan, Event::Release { step: 1 }, at(5), &mut b);
    assert!(matches!(t.effects[..], [Effect::Stale { step: 1, .. }]));
}

#[test]
fn after_the_cool_down_one_held_step_goes_as_the_probe() {
    let plan = plan();
    let mut b = breakers();
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = run.apply_gated(&plan, Event::Start, at(1), &mut b);
    let (attempt, task_id) = match t
        .effects
        .iter()
        .find(|e| matches!(e, Effect::Dispatch { step: 1, .. }))
    {
        Some(Effect::Dispatch {
            attempt, task_id, ..
        }) => (*attempt, *task_id),
        _ => panic!("b was not dispatched"),
    };
    // b succeeds: c becomes ready and is held too.
    let done = Event::AttemptFinished {
        step: 1,
        attempt,
        task_id,
        outcome: Outcome::Success(Value::Null),
        worker: "w".into(),
        started_at: at(2),
        finished_at: at(2),
    };
    let t = run.apply_gated(&plan, done, at(2), &mut b);
    assert!(dispatched(&t).is_empty());
    assert_eq!(run.steps[2].held.as_deref(), Some("flaky"));
    let t = run.apply_gated(&plan, Event::Release { step: 0 }, at(10), &mut b);
    assert_eq!(dispatched(&t), [0]);
    let flaky = b.get("flaky").unwrap();
    assert_eq!(flaky.state, BreakerState::HalfOpen);
    let probe = flaky.probe.unwrap();
    assert_eq!(
        (probe.run_id, probe.step, Some(probe.task_id)),
        (run.id, 0, run.steps[0].task_id)
    );
    assert_eq!(run.steps[0].held, None);
    assert_eq!(run.steps[0].attempt, 1);
    // The probe is in flight: the other held step stays held.
    let t = run.apply_gated(&plan, Event::Release { step: 2 }, at(11), &mut b);
    assert!(dispatched(&t).is_empty());
    assert_eq!(run.steps[2].held.as_deref(), Some("flaky"));
}

#[test]
fn a_paused_run_keeps_a_released_step_for_its_resume() {
    let plan = plan();
    let mut b = breakers();
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    run.apply_gated(&plan, Event::Start, at(1), &mut b);
    run.apply_gated(&plan, Event::Pause, at(2), &mut b);
    let mut closed = Breakers::default();
    let t = run.apply_gated(&plan, Event::Release { step: 0 }, at(3), &mut closed);
    assert!(dispatched(&t).is_empty());
    assert_eq!(
        (run.steps[0].status, run.steps[0].held.as_deref()),
        (StepStatus::Waiting, None)
    );
    let t = run.apply_gated(&plan, Event::Resume, at(4), &mut closed);
    assert_eq!(dispatched(&t), [0]);
}

#[test]
fn resuming_a_run_holds_its_steps_again_while_the_breaker_is_open() {
    let plan = plan();
    let mut b = breakers();
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    run.apply_gated(&plan, Event::Start, at(1), &mut b);
    run.apply_gated(&plan, Event::Pause, at(2), &mut b);
    run.apply_gated(
        &plan,
        Event::Release { step: 0 },
        at(3),
        &mut Breakers::default(),
    );
    let t = run.apply_gated(&plan, Event::Resume, at(4), &mut b);
    assert!(dispatched(&t).is_empty());
    assert_eq!(run.steps[0].held.as_deref(), Some("flaky"));
}

#[test]
fn cancelling_a_run_ends_its_held_steps_with_no_attempt_to_stop() {
    let plan = plan();
    let mut b = breakers();
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    run.apply_gated(&plan, Event::Start, at(1), &mut b);
    let t = run.apply_gated(&plan, Event::Cancel, at(2), &mut b);
    assert_eq!(
        (run.steps[0].status, run.steps[0].held.as_deref()),
        (StepStatus::Cancelled, None)
    );
    assert!(
        !t.effects
            .iter()
            .any(|e| matches!(e, Effect::Cancelled { step: 0, .. }))
    );
    let t = run.apply_gated(&plan, Event::Release { step: 0 }, at(20), &mut b);
    assert!(matches!(t.effects[..], [Effect::Stale { step: 0, .. }]));
}

/// What happens next to a run whose steps all call `flaky`.
#[derive(Debug, Clone)]
enum Step {
    /// An attempt in flight (by position, wrapping) ends.
    End { which: usize, failed: bool },
    /// Time passes.
    Wait { secs: i64 },
    /// The timer releases a held step (by position, wrapping).
    Release { which: usize },
}

proptest! {
    /// Whatever the attempts answer and whenever the timer releases held steps: while the
    /// breaker is not closed, the only attempt dispatched is its one probe; a held step has no
    /// attempt running; every attempt the breaker admitted is accounted for.
    #[test]
    fn a_breaker_lets_only_its_probe_through_while_not_closed(
        steps in prop::collection::vec(
            prop_oneof![
                (any::<usize>(), any::<bool>())
                    .prop_map(|(which, failed)| Step::End { which, failed }),
                (0i64..4).prop_map(|secs| Step::Wait { secs }),
                any::<usize>().prop_map(|which| Step::Release { which }),
            ],
            1..150,
        )
    ) {
        let yaml = format!(
            "name: p\nsteps:\n{}",
            (0..6)
                .map(|i| format!("  - {{id: s{i}, agent: flaky, action: x, retry: {{max_attempts: 4, delay: 0}}, depends_on: []}}\n"))
                .collect::<String>()
        );
        let plan = Plan::compile(&Definition::from_yaml(&yaml).unwrap()).unwrap();
        let config = BreakerConfig {
            failure_rate: 0.5,
            window: 4,
            min_attempts: 2,
            cool_down: Duration::from_secs(5),
        };
        let mut b = Breakers::new(config, [("flaky".to_string(), Breaker::default())].into());
        let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
        let mut clock = 0;
        // (step, attempt, task id) of attempts in flight.
        let mut inflight: Vec<(usize, u32, Uuid)> = Vec::new();
        let mut t = run.apply_gated(&plan, Event::Start, at(clock), &mut b);
        for step in steps {
            let dispatched: Vec<Uuid> = dispatched_slots(&t).iter().map(|d| d.2).collect();
            inflight.extend(dispatched_slots(&t));
            let breaker = b.get("flaky").unwrap().clone();
            if breaker.state == BreakerState::HalfOpen {
                prop_assert!(dispatched.len() <= 1, "{dispatched:?}");
                if let Some(task_id) = dispatched.first() {
                    prop_assert_eq!(breaker.probe.map(|p| p.task_id), Some(*task_id));
                }
            }
            if breaker.state == BreakerState::Open {
                prop_assert!(dispatched.is_empty(), "{:?}", t.effects);
            }
            let probes = inflight
                .iter()
                .filter(|(_, _, id)| breaker.probe.is_some_and(|p| p.task_id == *id))
                .count();
            prop_assert!(probes <= 1);
            for (i, s) in run.steps.iter().enumerate() {
                if s.held.is_some() {
                    prop_assert_eq!(s.status, StepStatus::Waiting);
                    prop_assert!(!inflight.iter().any(|(step, _, _)| *step == i));
                }
            }
            t = match step {
                Step::End { which, failed } if !inflight.is_empty() => {
                    let (step, attempt, task_id) = inflight.remove(which % inflight.len());
                    let outcome = if failed {
                        Outcome::Failure { message: "boom".into(), retryable: true }
                    } else {
                        Outcome::Success(Value::Null)
                    };
                    let event = Event::AttemptFinished {
                        step, attempt, task_id, outcome,
                        worker: "w".into(), started_at: at(clock), finished_at: at(clock),
                    };
                    run.apply_gated(&plan, event, at(clock), &mut b)
                }
                Step::Wait { secs } => {
                    clock += secs;
                    Transition::default()
                }
                Step::Release { which } => {
                    let held: Vec<usize> = (0..run.steps.len()).filter(|&i| run.steps[i].held.is_some()).collect();
                    if held.is_empty() {
                        Transition::default()
                    } else {
                        run.apply_gated(&plan, Event::Release { step: held[which % held.len()] }, at(clock), &mut b)
                    }
                }
                Step::End { .. } => Transition::default(),
            };
        }
    }
}

/// A chain behind two parallel steps of one agent capped at one attempt at a time.
fn capped_plan() -> Plan {
    let yaml = "name: p\nsteps:\n  - {id: a, agent: capped, action: x}\n  - {id: b, agent: capped, action: x, depends_on: []}\n  - {id: c, agent: capped, action: x, depends_on: [a]}\n";
    Plan::compile(&Definition::from_yaml(yaml).unwrap()).unwrap()
}

fn capped_limits() -> crate::limits::Limits {
    crate::limits::Limits::new(
        crate::limits::AgentLimits::parse("capped=max_concurrency:1").unwrap(),
        Default::default(),
    )
}

#[test]
fn a_limit_holds_steps_past_its_cap_and_an_end_frees_a_slot_for_the_next() {
    let plan = capped_plan();
    let mut b = Breakers::default();
    let mut l = capped_limits();
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = run.apply_limited(&plan, Event::Start, at(0), &mut b, &mut l);
    assert_eq!(dispatched(&t), [0]);
    assert!(t.effects.contains(&Effect::Held {
        step: 1,
        agent: "capped".into(),
        by_limit: true,
    }));
    assert_eq!(run.steps[1].held.as_deref(), Some("capped"));
    assert_eq!(l.get("capped").unwrap().running, 1);
    // `a` ends: its slot goes to `c`, which it made ready, in the same transition.
    let task_id = run.steps[0].task_id.unwrap();
    let done = Event::AttemptFinished {
        step: 0,
        attempt: 1,
        task_id,
        outcome: Outcome::Success(Value::Null),
        worker: "w".into(),
        started_at: at(1),
        finished_at: at(1),
    };
    let t = run.apply_limited(&plan, done, at(1), &mut b, &mut l);
    assert_eq!(dispatched(&t), [2]);
    assert!(l.freed());
    // Still full: a release leaves `b` held.
    let t = run.apply_limited(&plan, Event::Release { step: 1 }, at(2), &mut b, &mut l);
    assert!(dispatched(&t).is_empty());
    // A cancel frees the slot too, and then nothing is left to run.
    let t = run.apply_limited(&plan, Event::Cancel, at(3), &mut b, &mut l);
    assert!(
        t.effects
            .iter()
            .any(|e| matches!(e, Effect::Cancelled { step: 2, .. }))
    );
    assert_eq!(l.get("capped").unwrap().running, 0);
}
