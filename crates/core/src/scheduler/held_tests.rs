//! Steps held by an agent's circuit breaker.

use std::collections::VecDeque;
use std::time::Duration;

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
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch { step, .. } => Some(*step),
            _ => None,
        })
        .collect()
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
        agent: "flaky".into()
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
