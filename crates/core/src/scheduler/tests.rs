use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::definition::Definition;

fn plan(yaml: &str) -> Plan {
    Plan::compile(&Definition::from_yaml(yaml).unwrap()).unwrap()
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

/// The tasks a transition dispatched, as (step id, attempt, task id).
fn dispatched(plan: &Plan, t: &Transition) -> Vec<(String, u32, Uuid)> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch {
                step,
                attempt,
                task_id,
            } => Some((plan.nodes[*step].id.clone(), *attempt, *task_id)),
            _ => None,
        })
        .collect()
}

fn finished(plan: &Plan, id: &str, attempt: u32, task_id: Uuid, outcome: Outcome) -> Event {
    Event::AttemptFinished {
        step: plan.node_index(id).unwrap(),
        attempt,
        task_id,
        outcome,
        worker: "w1".into(),
        started_at: at(0),
        finished_at: at(1),
    }
}

fn fail(retryable: bool) -> Outcome {
    Outcome::Failure {
        message: "boom".into(),
        retryable,
    }
}

const SEED: &str = include_str!("../../../../examples/workflow.yml");

#[test]
fn the_seed_workflow_runs_to_success_with_its_condition_true() {
    let plan = plan(SEED);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let mut queue = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)));
    assert_eq!(
        queue.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["scaffold"]
    );
    let mut order = Vec::new();
    while let Some((id, attempt, task_id)) = queue.pop() {
        order.push(id.clone());
        let output = if id == "security_scan" {
            json!({"passed": true})
        } else {
            json!({})
        };
        let t = run.apply(
            &plan,
            finished(&plan, &id, attempt, task_id, Outcome::Success(output)),
            at(1),
        );
        queue.extend(dispatched(&plan, &t));
    }
    assert_eq!(run.status, RunStatus::Success);
    assert_eq!(order.last().map(String::as_str), Some("deploy"));
    let handlers =
        ["log_error", "notify_slack"].map(|id| run.steps[plan.node_index(id).unwrap()].status);
    assert_eq!(handlers, [StepStatus::Skipped; 2]);
}

#[test]
fn a_false_condition_skips_the_step_and_the_run_still_succeeds() {
    let plan = plan(SEED);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let mut queue = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)));
    while let Some((id, attempt, task_id)) = queue.pop() {
        let t = run.apply(
            &plan,
            finished(
                &plan,
                &id,
                attempt,
                task_id,
                Outcome::Success(json!({"passed": false})),
            ),
            at(1),
        );
        queue.extend(dispatched(&plan, &t));
    }
    let deploy = &run.steps[plan.node_index("deploy").unwrap()];
    assert_eq!(deploy.status, StepStatus::Skipped);
    assert!(
        deploy
            .error
            .as_deref()
            .unwrap()
            .contains("condition is false")
    );
    assert_eq!(run.status, RunStatus::Success);
}

#[test]
fn two_failures_then_success_on_the_third_attempt() {
    let plan = plan(
        "name: r\nsteps:\n  - {id: a, agent: x, action: y, retry: {max_attempts: 3, backoff: fixed, delay: 2s}}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, mut task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    for attempt in 1..=2 {
        let t = run.apply(
            &plan,
            finished(&plan, "a", attempt, task, fail(true)),
            at(10),
        );
        assert!(
            dispatched(&plan, &t).is_empty(),
            "the retry waits for its delay"
        );
        assert_eq!(run.steps[0].status, StepStatus::Waiting);
        assert_eq!(run.steps[0].wake_at, Some(at(12)));
        let t = run.apply(&plan, Event::Wake { step: 0, attempt }, at(12));
        let d = dispatched(&plan, &t);
        assert_eq!(d[0].1, attempt + 1);
        task = d[0].2;
    }
    run.apply(
        &plan,
        finished(&plan, "a", 3, task, Outcome::Success(json!(1))),
        at(20),
    );
    assert_eq!(
        (run.status, run.steps[0].status, run.steps[0].attempt),
        (RunStatus::Success, StepStatus::Success, 3)
    );
}

#[test]
fn a_failed_step_skips_its_dependents_and_runs_the_failure_handlers() {
    let plan = plan(SEED);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    for attempt in 1..=3 {
        let t = run.apply(
            &plan,
            finished(
                &plan,
                "scaffold",
                attempt,
                if attempt == 1 {
                    task
                } else {
                    run.steps[0].task_id.unwrap()
                },
                fail(true),
            ),
            at(5),
        );
        if attempt < 3 {
            run.apply(&plan, Event::Wake { step: 0, attempt }, at(100));
        } else {
            let handlers: Vec<String> = dispatched(&plan, &t).into_iter().map(|d| d.0).collect();
            assert_eq!(handlers, ["log_error", "notify_slack"]);
        }
    }
    assert_eq!(run.status, RunStatus::Failing);
    let deploy = &run.steps[plan.node_index("deploy").unwrap()];
    assert_eq!(deploy.status, StepStatus::UpstreamFailed);
    for id in ["log_error", "notify_slack"] {
        let s = &run.steps[plan.node_index(id).unwrap()];
        let t = run.clone().apply(
            &plan,
            finished(&plan, id, 1, s.task_id.unwrap(), fail(false)),
            at(6),
        );
        assert!(t.effects.iter().all(|e| !matches!(e, Effect::Stale { .. })));
    }
    let (log, notify) = (
        plan.node_index("log_error").unwrap(),
        plan.node_index("notify_slack").unwrap(),
    );
    let (lt, nt) = (
        run.steps[log].task_id.unwrap(),
        run.steps[notify].task_id.unwrap(),
    );
    run.apply(
        &plan,
        finished(&plan, "log_error", 1, lt, Outcome::Success(json!({}))),
        at(6),
    );
    assert_eq!(run.status, RunStatus::Failing);
    let t = run.apply(
        &plan,
        finished(&plan, "notify_slack", 1, nt, Outcome::Success(json!({}))),
        at(7),
    );
    assert_eq!(run.status, RunStatus::Failure);
    assert!(t.effects.contains(&Effect::RunEnded(RunStatus::Failure)));
}

#[test]
fn duplicate_and_stale_results_change_nothing() {
    let plan = plan(
        "name: d\nsteps:\n  - {id: a, agent: x, action: y, retry: {max_attempts: 2, delay: 0}}\n  - {id: b, agent: x, action: y}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, first) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    // Attempt 1 fails and, with no delay, attempt 2 is dispatched at once.
    let second = dispatched(
        &plan,
        &run.apply(&plan, finished(&plan, "a", 1, first, fail(true)), at(1)),
    )[0]
    .2;
    let before = run.clone();
    for (attempt, task) in [(1, first), (2, Uuid::new_v4()), (3, second)] {
        let t = run.apply(
            &plan,
            finished(&plan, "a", attempt, task, Outcome::Success(json!("late"))),
            at(2),
        );
        assert!(matches!(t.effects[..], [Effect::Stale { .. }]));
        assert_eq!(run, before);
    }
    run.apply(
        &plan,
        finished(&plan, "a", 2, second, Outcome::Success(json!("ok"))),
        at(3),
    );
    let again = run.apply(
        &plan,
        finished(&plan, "a", 2, second, Outcome::Success(json!("ok"))),
        at(4),
    );
    assert!(matches!(again.effects[..], [Effect::Stale { .. }]));
    assert_eq!(run.steps[1].attempt, 1, "b was dispatched once");
}

#[test]
fn inputs_carry_the_outputs_of_dependencies() {
    let plan = plan(
        "name: i\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    run.apply(
        &plan,
        finished(
            &plan,
            "a",
            1,
            task,
            Outcome::Success(json!({"artifact": "x.tar"})),
        ),
        at(1),
    );
    assert_eq!(
        Value::Object(run.inputs_for(&plan, 1)),
        json!({"a": {"artifact": "x.tar"}})
    );
}

#[test]
fn restore_derives_the_same_counters() {
    let plan = plan(SEED);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    run.apply(
        &plan,
        finished(&plan, "scaffold", 1, task, fail(false)),
        at(1),
    );
    let restored = RunState::restore(
        run.id,
        &plan,
        run.status,
        run.params.clone(),
        run.steps.clone(),
        run.ended_at,
    );
    assert_eq!(restored, run);
}

/// A random workflow with retries and conditions on its steps' outputs.
fn random_plan() -> impl Strategy<Value = (Plan, u64)> {
    (
        prop::collection::vec((prop::collection::vec(any::<prop::sample::Index>(), 0..3), any::<bool>(), 1u32..4, any::<bool>(), 0usize..3), 1..15),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(steps, handlers, seed)| {
            let mut yaml = String::from("name: random\nsteps:\n");
            for (i, (picks, explicit, max, conditional, subs)) in steps.iter().enumerate() {
                yaml += &format!("  - id: s{i}\n    agent: a\n    action: b\n    retry: {{max_attempts: {max}, delay: 1s}}\n");
                let mut deps: Vec<usize> = Vec::new();
                if *explicit && i > 0 {
                    deps = picks.iter().map(|p| p.index(i)).collect();
                    let names: Vec<String> = deps.iter().map(|d| format!("s{d}")).collect();
                    yaml += &format!("    depends_on: [{}]\n", names.join(", "));
                } else if i > 0 {
                    deps.push(i - 1);
                }
                if *conditional && !deps.is_empty() {
                    yaml += &format!("    condition: \"s{}.failed || s{}.output == 1\"\n", deps[0], deps[0]);
                }
                if *subs > 0 {
                    yaml += "    parallel:\n";
                    for j in 0..*subs {
                        yaml += &format!("      - {{id: s{i}_p{j}, agent: a, action: b}}\n");
                    }
                }
            }
            if handlers {
                yaml += "error_handling:\n  on_failure:\n    - {agent: h, action: log}\n    - notify: ops\n";
            }
            (plan(&yaml), seed)
        })
}

/// A tiny deterministic generator, so a failing case replays exactly.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

proptest! {
    /// Drive random runs with random outcomes, duplicates and stale results, and check the
    /// promises: every run ends; no step starts before its dependencies finished; no attempt is
    /// accepted twice; no step gets more attempts than its policy; the run fails exactly when a
    /// step failed; failure handlers run only for failed runs.
    #[test]
    fn random_runs_keep_their_promises((plan, seed) in random_plan()) {
        let mut rng = Lcg(seed);
        let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
        run.window = 1 + rng.next(4);
        let mut inflight: Vec<(usize, u32, Uuid)> = Vec::new();
        let mut answered: Vec<(usize, u32, Uuid)> = Vec::new();
        let mut accepted: HashMap<(usize, u32), usize> = HashMap::new();
        let mut dispatches: HashMap<usize, u32> = HashMap::new();
        let mut clock = 0;
        let mut t = run.apply(&plan, Event::Start, at(clock));
        for _ in 0..10_000 {
            for e in &t.effects {
                match e {
                    Effect::Dispatch { step, attempt, task_id } => {
                        for &d in &plan.nodes[*step].deps {
                            prop_assert!(run.steps[d].status.is_terminal(), "{} started before {}", plan.nodes[*step].id, plan.nodes[d].id);
                        }
                        *dispatches.entry(*step).or_default() += 1;
                        inflight.push((*step, *attempt, *task_id));
                    }
                    Effect::AttemptEnded { step, attempt, .. } => *accepted.entry((*step, *attempt)).or_default() += 1,
                    _ => {}
                }
            }
            if run.status.is_terminal() {
                break;
            }
            clock += 1;
            let waiting: Vec<usize> = (0..run.steps.len()).filter(|&i| run.steps[i].status == StepStatus::Waiting).collect();
            t = if !inflight.is_empty() && rng.next(4) > 0 {
                let (step, attempt, task_id) = inflight.swap_remove(rng.next(inflight.len()));
                answered.push((step, attempt, task_id));
                let outcome = match rng.next(3) {
                    0 => fail(rng.next(2) == 0),
                    _ => Outcome::Success(json!(rng.next(2))),
                };
                run.apply(&plan, Event::AttemptFinished { step, attempt, task_id, outcome, worker: "w".into(), started_at: at(clock), finished_at: at(clock) }, at(clock))
            } else if !answered.is_empty() && rng.next(2) == 0 {
                // A duplicate delivery of a result already given.
                let (step, attempt, task_id) = answered[rng.next(answered.len())];
                let before = run.clone();
                let t = run.apply(&plan, Event::AttemptFinished { step, attempt, task_id, outcome: Outcome::Success(json!(0)), worker: "w".into(), started_at: at(clock), finished_at: at(clock) }, at(clock));
                prop_assert_eq!(&run, &before);
                t
            } else if let Some(&step) = waiting.first() {
                let attempt = run.steps[step].attempt;
                run.apply(&plan, Event::Wake { step, attempt }, at(clock + 3_600))
            } else {
                prop_assert!(!inflight.is_empty(), "run {:?} is stuck", run.status);
                Transition::default()
            };
        }
        prop_assert!(run.status.is_terminal(), "run did not end: {:?}", run.status);
        prop_assert!(accepted.values().all(|&n| n == 1), "an attempt was accepted twice");
        for (i, node) in plan.nodes.iter().enumerate() {
            prop_assert!(dispatches.get(&i).copied().unwrap_or(0) <= node.retry.max_attempts);
            prop_assert!(run.steps[i].status.is_terminal());
        }
        let main_failed = plan.nodes.iter().zip(&run.steps).any(|(n, s)| n.role == Role::Main && s.status.blocks_dependents());
        prop_assert_eq!(run.status == RunStatus::Failure, main_failed);
        for (i, node) in plan.nodes.iter().enumerate() {
            if node.role == Role::OnFailure {
                prop_assert_eq!(dispatches.contains_key(&i), main_failed);
            }
        }
    }
}

#[test]
fn a_failed_step_of_a_failed_run_can_be_retried() {
    let plan = plan(
        "name: redo\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y}\nerror_handling:\n  on_failure:\n    - {id: h, agent: x, action: log}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    // Retrying while the run is still going is refused.
    let early = run.apply(&plan, Event::Retry { step: Some(0) }, at(1));
    assert!(matches!(early.effects[..], [Effect::Refused(_)]));
    let t = run.apply(&plan, finished(&plan, "a", 1, task, fail(false)), at(2));
    let (_, _, handler) = dispatched(&plan, &t)[0].clone();
    run.apply(
        &plan,
        finished(&plan, "h", 1, handler, Outcome::Success(json!({}))),
        at(3),
    );
    assert_eq!(run.status, RunStatus::Failure);

    let t = run.apply(&plan, Event::Retry { step: Some(0) }, at(4));
    let again = dispatched(&plan, &t);
    assert_eq!(id_attempts(&again), [("a", 2)]);
    assert_eq!((run.status, run.ended_at), (RunStatus::Running, None));
    assert_eq!(
        run.steps[1].status,
        StepStatus::Pending,
        "b waits for a again"
    );
    assert_eq!(
        run.steps[2].status,
        StepStatus::Pending,
        "the handler may run again"
    );
    let restored = RunState::restore(
        run.id,
        &plan,
        run.status,
        run.params.clone(),
        run.steps.clone(),
        run.ended_at,
    );
    assert_eq!(restored, run, "counters are consistent after reopening");

    let t = run.apply(
        &plan,
        finished(&plan, "a", 2, again[0].2, Outcome::Success(json!(1))),
        at(5),
    );
    let (_, _, b) = dispatched(&plan, &t)[0].clone();
    run.apply(
        &plan,
        finished(&plan, "b", 1, b, Outcome::Success(json!(2))),
        at(6),
    );
    assert_eq!(run.status, RunStatus::Success);
    assert_eq!(run.steps[2].status, StepStatus::Skipped);
}

#[test]
fn a_paused_run_records_results_but_dispatches_nothing_until_resumed() {
    let plan = plan(
        "name: p\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    let t = run.apply(&plan, Event::Pause, at(1));
    assert!(t.run_changed);
    assert_eq!(run.status, RunStatus::Paused);
    let refused = run.apply(&plan, Event::Pause, at(1));
    assert!(matches!(refused.effects[..], [Effect::Refused(_)]));

    let t = run.apply(
        &plan,
        finished(&plan, "a", 1, task, Outcome::Success(json!(1))),
        at(2),
    );
    assert!(dispatched(&plan, &t).is_empty(), "paused: b is held");
    assert_eq!(
        (run.steps[0].status, run.steps[1].status),
        (StepStatus::Success, StepStatus::Pending)
    );

    let t = run.apply(&plan, Event::Resume, at(3));
    assert_eq!(
        dispatched(&plan, &t)
            .iter()
            .map(|d| d.0.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(run.status, RunStatus::Running);
}

#[test]
fn a_retry_due_while_paused_goes_out_on_resume() {
    let plan = plan(
        "name: p\nsteps:\n  - {id: a, agent: x, action: y, retry: {max_attempts: 2, delay: 1s}}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    run.apply(&plan, Event::Pause, at(0));
    run.apply(&plan, finished(&plan, "a", 1, task, fail(true)), at(1));
    let t = run.apply(
        &plan,
        Event::Wake {
            step: 0,
            attempt: 1,
        },
        at(2),
    );
    assert!(dispatched(&plan, &t).is_empty());
    assert_eq!(
        (run.steps[0].status, run.steps[0].wake_at),
        (StepStatus::Waiting, None)
    );
    let t = run.apply(&plan, Event::Resume, at(3));
    assert_eq!(dispatched(&plan, &t)[0].1, 2);
}

#[test]
fn cancelling_ends_every_unfinished_step_and_fences_late_results() {
    let plan = plan(
        "name: c\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y}\nerror_handling:\n  on_failure:\n    - {id: h, agent: x, action: log}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    let t = run.apply(&plan, Event::Cancel, at(1));
    assert!(t.effects.contains(&Effect::Cancelled {
        step: 0,
        attempt: 1,
        task_id: task
    }));
    assert!(t.effects.contains(&Effect::RunEnded(RunStatus::Cancelled)));
    assert!(run.steps.iter().all(|s| s.status == StepStatus::Cancelled));
    assert!(
        dispatched(&plan, &t).is_empty(),
        "no failure handler runs for a cancelled run"
    );
    let late = run.apply(
        &plan,
        finished(&plan, "a", 1, task, Outcome::Success(json!(1))),
        at(2),
    );
    assert!(matches!(late.effects[..], [Effect::Stale { .. }]));
    let again = run.apply(&plan, Event::Cancel, at(3));
    assert!(matches!(again.effects[..], [Effect::Refused(_)]));
}

#[test]
fn an_operator_can_skip_or_complete_a_step() {
    let plan = plan(
        "name: s\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y}\n  - {id: c, agent: x, action: y}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    // Complete the running step by hand: b starts with that output as its input.
    let t = run.apply(
        &plan,
        Event::Settle {
            step: 0,
            output: Some(json!({"by": "hand"})),
        },
        at(1),
    );
    let (_, _, b) = dispatched(&plan, &t)[0].clone();
    assert_eq!(
        Value::Object(run.inputs_for(&plan, 1)),
        json!({"a": {"by": "hand"}})
    );
    let late = run.apply(
        &plan,
        finished(&plan, "a", 1, task, Outcome::Success(json!(0))),
        at(2),
    );
    assert!(matches!(late.effects[..], [Effect::Stale { .. }]));
    // Skip the next one: c runs.
    let t = run.apply(
        &plan,
        Event::Settle {
            step: 1,
            output: None,
        },
        at(3),
    );
    let (_, _, c) = dispatched(&plan, &t)[0].clone();
    assert_eq!(
        run.steps[1].error.as_deref(),
        Some("skipped by an operator")
    );
    assert!(matches!(
        run.apply(
            &plan,
            finished(&plan, "b", 1, b, Outcome::Success(json!(0))),
            at(4)
        )
        .effects[..],
        [Effect::Stale { .. }]
    ));
    run.apply(
        &plan,
        finished(&plan, "c", 1, c, Outcome::Success(json!(0))),
        at(5),
    );
    assert_eq!(run.status, RunStatus::Success);
    let refused = run.apply(
        &plan,
        Event::Settle {
            step: 2,
            output: None,
        },
        at(6),
    );
    assert!(matches!(refused.effects[..], [Effect::Refused(_)]));
}

#[test]
fn skipping_the_failed_step_of_a_failed_run_lets_the_rest_run() {
    let plan = plan(
        "name: s\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    run.apply(&plan, finished(&plan, "a", 1, task, fail(false)), at(1));
    assert_eq!(
        (run.status, run.steps[1].status),
        (RunStatus::Failure, StepStatus::UpstreamFailed)
    );
    let t = run.apply(
        &plan,
        Event::Settle {
            step: 0,
            output: None,
        },
        at(2),
    );
    assert_eq!(
        dispatched(&plan, &t)
            .iter()
            .map(|d| d.0.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(run.status, RunStatus::Running);
}

#[test]
fn templates_render_when_the_step_becomes_ready_and_a_missing_value_fails_it() {
    let plan = plan(
        "name: t\nsteps:\n  - {id: build, agent: x, action: y}\n  - {id: ship, agent: x, action: y, params: {file: '${{ steps.build.output.artifact }}', to: '${{ params.env }}'}}\n",
    );
    let params = json!({"env": "staging"}).as_object().unwrap().clone();
    let mut run = RunState::new(Uuid::new_v4(), &plan, params);
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    let t = run.apply(
        &plan,
        finished(
            &plan,
            "build",
            1,
            task,
            Outcome::Success(json!({"artifact": "app.tar"})),
        ),
        at(1),
    );
    assert_eq!(dispatched(&plan, &t).len(), 1);
    assert_eq!(
        Value::Object(run.task_params(&plan, 1).unwrap()),
        json!({"file": "app.tar", "to": "staging"})
    );

    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    let t = run.apply(
        &plan,
        finished(&plan, "build", 1, task, Outcome::Success(json!({}))),
        at(1),
    );
    assert!(dispatched(&plan, &t).is_empty());
    let ship = &run.steps[1];
    assert_eq!(ship.status, StepStatus::Failure);
    assert!(
        ship.error.as_deref().unwrap().contains("artifact"),
        "{ship:?}"
    );
}

#[test]
fn templates_may_only_read_steps_that_finish_first() {
    let err = Plan::compile(
        &Definition::from_yaml("name: t\nsteps:\n  - {id: a, agent: x, action: y, params: {v: '${{ steps.b.output }}'}}\n  - {id: b, agent: x, action: y}\n").unwrap(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("params read `steps.b`"), "{err}");
}

#[test]
fn retrying_a_failed_run_retries_every_failed_step() {
    let plan = plan(
        "name: r\nsteps:\n  - {id: a, agent: x, action: y, depends_on: []}\n  - {id: b, agent: x, action: y, depends_on: []}\n  - {id: c, agent: x, action: y, depends_on: [a, b]}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let first = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)));
    for (id, attempt, task) in first {
        run.apply(
            &plan,
            finished(&plan, &id, attempt, task, fail(false)),
            at(1),
        );
    }
    assert_eq!(run.status, RunStatus::Failure);
    let t = run.apply(&plan, Event::Retry { step: None }, at(2));
    let mut again: Vec<_> = dispatched(&plan, &t)
        .into_iter()
        .map(|d| (d.0, d.1))
        .collect();
    again.sort();
    assert_eq!(again, [("a".to_string(), 2), ("b".to_string(), 2)]);
    assert_eq!(run.steps[2].status, StepStatus::Pending);
}

/// Runs a plan to its end, answering every task with `output`.
fn drive(plan: &Plan, params: Value, output: Value) -> RunState {
    let mut run = RunState::new(Uuid::new_v4(), plan, params.as_object().unwrap().clone());
    let mut queue = dispatched(plan, &run.apply(plan, Event::Start, at(0)));
    while let Some((id, attempt, task)) = queue.pop() {
        let t = run.apply(
            plan,
            finished(plan, &id, attempt, task, Outcome::Success(output.clone())),
            at(1),
        );
        queue.extend(dispatched(plan, &t));
    }
    run
}

#[test]
fn a_branch_takes_then_or_else_by_a_bare_name_from_outputs_or_params() {
    let plan = plan(
        "name: m\nsteps:\n  - {agent: agent8, action: collect_metrics}\n  - condition: \"error_rate > 0.05\"\n    then:\n      - {agent: agent19, action: rollback}\n    else:\n      - {agent: agent9, action: all_clear}\n",
    );
    let status = |run: &RunState, id: &str| run.steps[plan.node_index(id).unwrap()].status;
    // From the output of collect_metrics.
    let high = drive(&plan, json!({}), json!({"error_rate": 0.2}));
    assert_eq!(
        (status(&high, "rollback"), status(&high, "all_clear")),
        (StepStatus::Success, StepStatus::Skipped)
    );
    // From the run's params when no output has it.
    let low = drive(&plan, json!({"error_rate": 0.01}), json!({}));
    assert_eq!(
        (status(&low, "rollback"), status(&low, "all_clear")),
        (StepStatus::Skipped, StepStatus::Success)
    );
    assert_eq!(low.status, RunStatus::Success);
    // Nowhere: the branch's steps fail with the reason.
    let none = drive(&plan, json!({}), json!({}));
    assert_eq!(none.status, RunStatus::Failure);
    assert!(
        none.steps[plan.node_index("rollback").unwrap()]
            .error
            .as_deref()
            .unwrap()
            .contains("error_rate")
    );
}

#[test]
fn an_attempt_carries_a_deadline_only_while_it_runs() {
    let plan = plan(
        "name: t\nsteps:\n  - {id: a, agent: x, action: y, timeout: 30s, retry: {max_attempts: 2, delay: 5s}}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    assert_eq!(run.steps[0].deadline, Some(at(30)));
    // The timer reports the attempt late: it fails like any attempt and is retried.
    let late = Outcome::Failure {
        message: "timed out".into(),
        retryable: true,
    };
    run.apply(&plan, finished(&plan, "a", 1, task, late), at(30));
    assert_eq!(
        (run.steps[0].status, run.steps[0].deadline),
        (StepStatus::Waiting, None)
    );
    let t = run.apply(
        &plan,
        Event::Wake {
            step: 0,
            attempt: 1,
        },
        at(35),
    );
    assert_eq!(dispatched(&plan, &t)[0].1, 2);
    assert_eq!(run.steps[0].deadline, Some(at(65)));
}

fn dead_lettered() -> Outcome {
    Outcome::Lost {
        message: "dead-lettered".into(),
    }
}

/// Loses attempt `attempt` (task `task`) of the run's only step at `secs`: the step waits half a
/// second to two and a half, then the wake dispatches its next attempt, returned.
fn lose(plan: &Plan, run: &mut RunState, attempt: u32, task: Uuid, secs: i64) -> (u32, Uuid) {
    let t = run.apply(
        plan,
        slot_finished(0, attempt, task, dead_lettered()),
        at(secs),
    );
    assert!(dispatched(plan, &t).is_empty(), "not at once");
    let s = &run.steps[0];
    assert_eq!(s.status, StepStatus::Waiting);
    let pause = s.wake_at.expect("a lost attempt's step waits") - at(secs);
    assert!(
        (500..2_500).contains(&pause.num_milliseconds()),
        "{pause:?}"
    );
    let wake = Event::Wake {
        step: 0,
        attempt: s.attempt,
    };
    let t = run.apply(plan, wake, s.wake_at.unwrap());
    let (_, attempt, task) = dispatched(plan, &t)[0].clone();
    (attempt, task)
}

#[test]
fn lost_attempts_of_tasks_lost_together_are_retried_apart() {
    let plan = plan("name: l\nsteps:\n  - {id: a, agent: x, action: y}\n");
    // Twenty tasks dead-lettered by one crash: their retries are due at different times.
    let due: std::collections::BTreeSet<_> = (0..20)
        .map(|_| {
            let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
            let t = run.apply(&plan, Event::Start, at(0));
            let (_, _, task) = dispatched(&plan, &t)[0].clone();
            run.apply(&plan, slot_finished(0, 1, task, dead_lettered()), at(1));
            run.steps[0].wake_at
        })
        .collect();
    // To the millisecond, two of twenty may meet by chance; a third almost never.
    assert!(due.len() >= 18, "{due:?}");
    // Spread over the two seconds, not bunched in a corner of them.
    let (first, last) = (due.first().unwrap().unwrap(), due.last().unwrap().unwrap());
    assert!(last - first > chrono::Duration::seconds(1), "{due:?}");
}

#[test]
fn a_lost_attempt_is_retried_outside_the_budget_but_only_once() {
    let plan = plan("name: l\nsteps:\n  - {id: a, agent: x, action: y}\n");
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    // max_attempts is 1, yet the lost attempt gets a successor.
    let (attempt, task) = lose(&plan, &mut run, 1, task, 1);
    assert_eq!((attempt, run.steps[0].lost), (2, 1));
    // A second loss fails the step.
    run.apply(&plan, finished(&plan, "a", 2, task, dead_lettered()), at(9));
    assert_eq!(run.steps[0].status, StepStatus::Failure);
    assert!(run.steps[0].error.as_deref().unwrap().contains("lost too"));
}

#[test]
fn a_lost_attempt_does_not_use_up_the_retry_budget() {
    let plan = plan(
        "name: l\nsteps:\n  - {id: a, agent: x, action: y, retry: {max_attempts: 2, delay: 0}}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    let (_, task) = lose(&plan, &mut run, 1, task, 1);
    // Attempt 2 fails: one retry is still left, since attempt 1 was lost, not failed.
    let t = run.apply(&plan, finished(&plan, "a", 2, task, fail(true)), at(9));
    assert_eq!(dispatched(&plan, &t)[0].1, 3);
}

const STRIKES: &str = "name: strikes
steps:
  - id: a
    agent: main
    action: build
    retry: {max_attempts: 2, delay: 0}
    fallback:
      agent: spare
      action: build_slowly
      params: {from: \"${{ params.origin }}\"}
      retry: {max_attempts: 1}
    escalate: ops
  - {id: b, agent: x, action: after_a, depends_on: [a]}
  - {id: c, agent: x, action: independent, depends_on: []}
";

fn strikes_of(t: &Transition) -> Vec<(usize, Strike)> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Strike { step, strike } => Some((*step, *strike)),
            _ => None,
        })
        .collect()
}

fn assert_restores(plan: &Plan, run: &RunState) {
    let mut restored = RunState::restore(
        run.id,
        plan,
        run.status,
        run.params.clone(),
        run.steps.clone(),
        run.ended_at,
    );
    // Stored with the run, as its params are; the window is the coordinator's setting.
    restored.subset = run.subset.clone();
    restored.error = run.error.clone();
    restored.window = run.window;
    assert_eq!(&restored, run, "counters are consistent");
}

/// Five independent steps and one that waits for them all.
const WIDE: &str = "name: wide\nsteps:\n  - {id: s0, agent: x, action: y, depends_on: []}\n  - {id: s1, agent: x, action: y, depends_on: []}\n  - {id: s2, agent: x, action: y, depends_on: []}\n  - {id: s3, agent: x, action: y, depends_on: []}\n  - {id: s4, agent: x, action: y, depends_on: [], retry: {max_attempts: 2, delay: 0}}\n  - {id: join, agent: x, action: y, depends_on: [s0, s1, s2, s3, s4]}\n";

/// Starts a run of `plan` with a window of `window`: the run and the ids it dispatched.
fn start_windowed(plan: &Plan, window: usize) -> (RunState, Vec<(String, u32, Uuid)>) {
    let mut run = RunState::new(Uuid::new_v4(), plan, Map::new());
    run.window = window;
    let t = run.apply(plan, Event::Start, at(0));
    (run, dispatched(plan, &t))
}

/// Dispatches as (step id, attempt).
fn id_attempts(dispatched: &[(String, u32, Uuid)]) -> Vec<(&str, u32)> {
    dispatched.iter().map(|d| (d.0.as_str(), d.1)).collect()
}

fn ids(plan: &Plan, t: &Transition) -> Vec<String> {
    dispatched(plan, t).into_iter().map(|d| d.0).collect()
}

/// Ends the first attempt of step `id` (task `task`) with `outcome` at `secs`: what it dispatched.
fn end_first(
    plan: &Plan,
    run: &mut RunState,
    id: &str,
    task: Uuid,
    outcome: Outcome,
    secs: i64,
) -> Vec<(String, u32, Uuid)> {
    let t = run.apply(plan, finished(plan, id, 1, task, outcome), at(secs));
    assert_restores(plan, run);
    dispatched(plan, &t)
}

#[test]
fn steps_ready_beyond_the_window_start_in_order_as_earlier_attempts_end() {
    let plan = plan(WIDE);
    let (mut run, first) = start_windowed(&plan, 2);
    assert_eq!(
        first.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["s0", "s1"]
    );
    assert!(
        run.steps[2..]
            .iter()
            .all(|s| s.status == StepStatus::Pending),
        "the rest wait, pending, with no attempt"
    );
    assert_restores(&plan, &run);

    // Each end makes room for one: the lowest waiting.
    let ok = |n: i32| Outcome::Success(json!(n));
    let s2 = end_first(&plan, &mut run, "s1", first[1].2, ok(1), 1);
    assert_eq!(s2[0].0, "s2");
    let s3 = end_first(&plan, &mut run, "s0", first[0].2, ok(0), 2);
    assert_eq!(s3[0].0, "s3");
    let s4 = end_first(&plan, &mut run, "s2", s2[0].2, ok(2), 3);
    assert_eq!(s4[0].0, "s4");

    // A retry is not held back by a full window: it had its place.
    let retry = end_first(&plan, &mut run, "s4", s4[0].2, fail(true), 4);
    assert_eq!(id_attempts(&retry), [("s4", 2)]);

    end_first(&plan, &mut run, "s3", s3[0].2, ok(3), 5);
    let t = run.apply(&plan, finished(&plan, "s4", 2, retry[0].2, ok(4)), at(6));
    let join = dispatched(&plan, &t);
    assert_eq!(ids(&plan, &t), ["join"]);
    assert_eq!(
        Value::Object(run.inputs_for(&plan, 5)),
        json!({"s0": 0, "s1": 1, "s2": 2, "s3": 3, "s4": 4})
    );
    end_first(&plan, &mut run, "join", join[0].2, ok(5), 7);
    assert_eq!(run.status, RunStatus::Success);
}

#[test]
fn a_waiting_step_can_be_skipped_and_a_paused_run_resumes_its_waiting_steps() {
    let plan = plan(WIDE);
    let (mut run, s0) = start_windowed(&plan, 1);
    assert_eq!(s0[0].0, "s0");

    // An operator skips s1 while it waits for room: it never runs.
    let t = run.apply(
        &plan,
        Event::Settle {
            step: 1,
            output: None,
        },
        at(1),
    );
    assert!(dispatched(&plan, &t).is_empty(), "the window is still full");
    assert_eq!(run.steps[1].status, StepStatus::Skipped);
    assert_restores(&plan, &run);

    // Paused, the run dispatches nothing as s0 ends; resumed, it goes on with s2.
    run.apply(&plan, Event::Pause, at(2));
    let t = run.apply(
        &plan,
        finished(&plan, "s0", 1, s0[0].2, Outcome::Success(json!(0))),
        at(3),
    );
    assert!(dispatched(&plan, &t).is_empty());
    assert_restores(&plan, &run);
    let t = run.apply(&plan, Event::Resume, at(4));
    assert_eq!(ids(&plan, &t), ["s2"]);
    assert_restores(&plan, &run);

    // Cancelled, the waiting steps end with the run.
    run.apply(&plan, Event::Cancel, at(5));
    assert_eq!(run.status, RunStatus::Cancelled);
    assert!(
        run.steps[3..]
            .iter()
            .all(|s| s.status == StepStatus::Cancelled)
    );
    assert_restores(&plan, &run);
}

#[test]
fn a_run_that_times_out_never_dispatches_its_waiting_steps() {
    let plan = plan(
        "name: timed\ntimeout: 10s\nsteps:\n  - {id: a, agent: x, action: y, depends_on: []}\n  - {id: b, agent: x, action: y, depends_on: []}\nerror_handling:\n  on_failure:\n    - {id: h, agent: x, action: log}\n",
    );
    let (mut run, first) = start_windowed(&plan, 1);
    assert_eq!(first[0].0, "a");
    let t = run.apply(&plan, Event::TimedOut, at(10));
    assert_eq!(ids(&plan, &t), ["h"], "only the failure handler runs");
    assert_eq!(run.steps[1].status, StepStatus::Cancelled);
    assert_restores(&plan, &run);
}

#[test]
fn for_each_instances_share_the_run_window() {
    let plan = plan(
        "name: p\nparams: {items: [1, 2, 3, 4, 5]}\nsteps:\n  - {id: other, agent: x, action: y, depends_on: []}\n  - id: each\n    agent: x\n    action: work\n    depends_on: []\n    for_each: \"${{ params.items }}\"\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, plan.params.clone());
    run.window = 3;
    let t = run.apply(&plan, Event::Start, at(0));
    let mut inflight = dispatched_slots(&t);
    assert_eq!(inflight.len(), 3, "`other` and two instances");
    let mut clock = 0;
    while let Some((slot, attempt, task_id)) = inflight.pop() {
        clock += 1;
        let t = run.apply(
            &plan,
            slot_finished(slot, attempt, task_id, Outcome::Success(json!(slot))),
            at(clock),
        );
        inflight.extend(dispatched_slots(&t));
        assert!(inflight.len() <= 3, "never more than the window at once");
        assert_restores(&plan, &run);
    }
    assert_eq!(run.status, RunStatus::Success);
    assert_eq!(
        run.steps[1]
            .output
            .as_ref()
            .map(|o| o.as_array().unwrap().len()),
        Some(5)
    );
}

#[test]
fn the_fallback_runs_after_the_retries_and_then_the_step_escalates_and_waits() {
    let plan = plan(STRIKES);
    let params = json!({"origin": "mirror"}).as_object().unwrap().clone();
    let mut run = RunState::new(Uuid::new_v4(), &plan, params);
    let first = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)));
    let (a, c) = (first[0].2, first[1].2);
    assert_eq!(
        first.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );

    // Strike 1: the step's own attempts.
    let t = run.apply(&plan, finished(&plan, "a", 1, a, fail(true)), at(1));
    let (_, _, a2) = dispatched(&plan, &t)[0].clone();
    assert!(strikes_of(&t).is_empty());
    assert_eq!(run.steps[0].strike, Strike::Retries);

    // Strike 2: its retries are exhausted, the fallback runs with its own params.
    let t = run.apply(&plan, finished(&plan, "a", 2, a2, fail(true)), at(2));
    assert_eq!(strikes_of(&t), [(0, Strike::Fallback)]);
    let (_, attempt, a3) = dispatched(&plan, &t)[0].clone();
    assert_eq!(attempt, 3);
    assert_eq!(run.steps[0].strike, Strike::Fallback);
    assert_eq!(plan.nodes[0].target(true), ("spare", "build_slowly"));
    assert_eq!(
        Value::Object(run.task_params(&plan, 0).unwrap()),
        json!({"from": "mirror"})
    );
    assert_eq!(run.steps[0].strike_of(&plan.nodes[0], 2), Strike::Retries);
    assert_eq!(run.steps[0].strike_of(&plan.nodes[0], 3), Strike::Fallback);

    // Strike 3: the fallback's one attempt fails too; the step waits for a person.
    let t = run.apply(&plan, finished(&plan, "a", 3, a3, fail(true)), at(3));
    assert_eq!(strikes_of(&t), [(0, Strike::Escalated)]);
    assert!(dispatched(&plan, &t).is_empty());
    assert_eq!(run.steps[0].status, StepStatus::NeedsAttention);
    assert_eq!(run.steps[0].error.as_deref(), Some("boom"));
    assert_eq!(run.status, RunStatus::NeedsAttention);
    assert_eq!(run.steps[1].status, StepStatus::Pending, "b waits for a");
    assert_restores(&plan, &run);

    // The independent branch goes on; the run still waits.
    run.apply(
        &plan,
        finished(&plan, "c", 1, c, Outcome::Success(json!({}))),
        at(4),
    );
    assert_eq!(run.steps[2].status, StepStatus::Success);
    assert_eq!(
        (run.status, run.ended_at),
        (RunStatus::NeedsAttention, None)
    );

    // An operator completes the step: its dependents go on and the run can succeed.
    let t = run.apply(
        &plan,
        Event::Settle {
            step: 0,
            output: Some(json!({"by": "hand"})),
        },
        at(5),
    );
    assert_eq!(run.status, RunStatus::Running);
    let (id, _, b) = dispatched(&plan, &t)[0].clone();
    assert_eq!(id, "b");
    assert_eq!(run.steps[0].strike, Strike::Escalated, "history keeps it");
    run.apply(
        &plan,
        finished(&plan, "b", 1, b, Outcome::Success(json!({}))),
        at(6),
    );
    assert_eq!(run.status, RunStatus::Success);
}

#[test]
fn a_successful_fallback_completes_the_step_and_a_failed_one_fails_it_without_escalate() {
    let yaml = "name: fb\nsteps:\n  - {id: a, agent: m, action: x, retry: {max_attempts: 1}, fallback: {agent: s, action: y}}\n";
    let plan = plan(yaml);
    // No retry setting of its own: the fallback takes the step's (one attempt).
    assert_eq!(
        plan.nodes[0].fallback.as_ref().unwrap().retry.max_attempts,
        1
    );
    for (outcome, step_status, run_status) in [
        (
            Outcome::Success(json!({"v": 1})),
            StepStatus::Success,
            RunStatus::Success,
        ),
        (fail(true), StepStatus::Failure, RunStatus::Failure),
    ] {
        let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
        let (_, _, t1) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
        let t = run.apply(&plan, finished(&plan, "a", 1, t1, fail(false)), at(1));
        let (_, _, t2) = dispatched(&plan, &t)[0].clone();
        let t = run.apply(&plan, finished(&plan, "a", 2, t2, outcome), at(2));
        assert!(
            strikes_of(&t).is_empty(),
            "no escalation without `escalate`"
        );
        assert_eq!((run.steps[0].status, run.status), (step_status, run_status));
        assert_eq!(run.steps[0].strike, Strike::Fallback);
    }
}

#[test]
fn without_a_fallback_an_exhausted_step_escalates_and_a_retry_starts_it_over() {
    let yaml = "name: esc\nsteps:\n  - {id: a, agent: m, action: x, retry: {max_attempts: 2, delay: 0}, escalate: ops}\n";
    let plan = plan(yaml);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, t1) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    let t = run.apply(&plan, finished(&plan, "a", 1, t1, fail(true)), at(1));
    let (_, _, t2) = dispatched(&plan, &t)[0].clone();
    let t = run.apply(&plan, finished(&plan, "a", 2, t2, fail(true)), at(2));
    assert_eq!(strikes_of(&t), [(0, Strike::Escalated)]);
    assert_eq!(run.status, RunStatus::NeedsAttention);
    assert_eq!(run.steps[0].strike_of(&plan.nodes[0], 2), Strike::Retries);

    // Pausing and resuming keeps the run waiting for its person.
    run.apply(&plan, Event::Pause, at(3));
    assert_eq!(run.status, RunStatus::Paused);
    run.apply(&plan, Event::Resume, at(4));
    assert_eq!(run.status, RunStatus::NeedsAttention);

    // A retry starts the step over with its whole budget: two more attempts before escalating.
    let t = run.apply(&plan, Event::Retry { step: Some(0) }, at(5));
    let (_, attempt, t3) = dispatched(&plan, &t)[0].clone();
    assert_eq!(attempt, 3);
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.steps[0].strike, Strike::Retries);
    let t = run.apply(&plan, finished(&plan, "a", 3, t3, fail(true)), at(6));
    let (_, _, t4) = dispatched(&plan, &t)[0].clone();
    run.apply(
        &plan,
        finished(&plan, "a", 4, t4, Outcome::Success(json!(1))),
        at(7),
    );
    assert_eq!(run.status, RunStatus::Success);
}

#[test]
fn strikes_are_validated_with_their_place() {
    let err = |yaml: &str| {
        Plan::compile(&Definition::from_yaml(yaml).unwrap())
            .unwrap_err()
            .problems
            .join("\n")
    };
    let problems = err(
        "name: v\nsteps:\n  - {id: a, agent: m, action: x, fallback: {action: y, params: {p: \"${{ steps.b.output }}\"}}, escalate: \"no way\"}\n  - {id: b, agent: m, action: x}\nerror_handling:\n  on_failure:\n    - {agent: m, action: z, escalate: ops}\n",
    );
    for expected in [
        "steps[0] (`a`).fallback: missing `agent`",
        "steps[0] (`a`): escalate channel `no way`",
        "params read `steps.b`, which is not a step that finishes before this one",
        "error_handling.on_failure[0]: `escalate` is not allowed in a failure handler",
    ] {
        assert!(problems.contains(expected), "{expected}\n in:\n{problems}");
    }
    assert!(
        Definition::from_yaml(
            "name: v\nsteps:\n  - {agent: m, action: x, fallback: {agent: s, action: y, depends_on: []}}\n"
        )
        .unwrap_err()
        .to_string()
        .contains("unknown field `depends_on`")
    );
}

proptest! {
    /// Whatever the attempts of a step with a fallback and an escalation answer, it never
    /// makes more attempts than its two budgets (plus one lost attempt per strike), it ends
    /// succeeded or waiting for a person, and the run's status says so.
    #[test]
    fn strikes_keep_their_budgets(outcomes in proptest::collection::vec(0u8..4, 1..20)) {
        let plan = plan(
            "name: p\nsteps:\n  - {id: a, agent: m, action: x, retry: {max_attempts: 3, delay: 0}, fallback: {agent: s, action: y, retry: {max_attempts: 2}}, escalate: ops}\n",
        );
        let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
        let mut next = dispatched(&plan, &run.apply(&plan, Event::Start, at(0))).pop();
        let mut by_strike: HashMap<Strike, u32> = HashMap::new();
        let mut outcomes = outcomes.into_iter().cycle();
        while let Some((_, attempt, task_id)) = next.take() {
            let strike = run.steps[0].strike_of(&plan.nodes[0], attempt);
            *by_strike.entry(strike).or_default() += 1;
            let outcome = match outcomes.next().unwrap() {
                0 => Outcome::Success(json!({})),
                1 => fail(true),
                2 => fail(false),
                _ => Outcome::Lost { message: "gone".into() },
            };
            let mut t = run.apply(&plan, finished(&plan, "a", attempt, task_id, outcome), at(1));
            assert_restores(&plan, &run);
            if let Some(due) = run.steps[0].wake_at {
                // A lost attempt's step waits a moment.
                t = run.apply(&plan, Event::Wake { step: 0, attempt }, due);
            }
            next = dispatched(&plan, &t).pop();
        }
        prop_assert!(by_strike.get(&Strike::Retries).copied().unwrap_or(0) <= 3 + MAX_LOST_ATTEMPTS);
        prop_assert!(by_strike.get(&Strike::Fallback).copied().unwrap_or(0) <= 2 + MAX_LOST_ATTEMPTS);
        prop_assert!(!by_strike.contains_key(&Strike::Escalated));
        match run.steps[0].status {
            StepStatus::Success => prop_assert_eq!(run.status, RunStatus::Success),
            StepStatus::NeedsAttention => {
                prop_assert_eq!(run.status, RunStatus::NeedsAttention);
                prop_assert_eq!(run.steps[0].strike, Strike::Escalated);
            }
            other => prop_assert!(false, "the step ended {other:?}"),
        }
    }
}

/// The slots a transition dispatched, as (slot, attempt, task id).
pub(super) fn dispatched_slots(t: &Transition) -> Vec<(usize, u32, Uuid)> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch {
                step,
                attempt,
                task_id,
            } => Some((*step, *attempt, *task_id)),
            _ => None,
        })
        .collect()
}

fn slot_finished(slot: usize, attempt: u32, task_id: Uuid, outcome: Outcome) -> Event {
    Event::AttemptFinished {
        step: slot,
        attempt,
        task_id,
        outcome,
        worker: "w1".into(),
        started_at: at(0),
        finished_at: at(1),
    }
}

const FAN_OUT: &str = "name: fan\nparams: {items: [a, b, c, d, e]}\nsteps:\n  - id: each\n    agent: x\n    action: work\n    for_each: \"${{ params.items }}\"\n    max_parallel: 2\n    retry: {max_attempts: 2, delay: 0}\n    params: {name: \"${{ item }}\", at: \"${{ index }}\"}\n  - id: after\n    agent: x\n    action: sum\n    params: {all: \"${{ steps.each.output }}\"}\n";

fn fan_out_run(plan: &Plan) -> RunState {
    let defaults = plan.params.clone();
    RunState::new(Uuid::new_v4(), plan, defaults)
}

#[test]
fn for_each_runs_one_instance_per_item_at_most_max_parallel_at_once() {
    let plan = plan(FAN_OUT);
    let mut run = fan_out_run(&plan);
    let mut inflight = dispatched_slots(&run.apply(&plan, Event::Start, at(0)));
    assert_eq!(inflight.len(), 2, "max_parallel instances start");
    assert_eq!(run.steps[0].status, StepStatus::Running);
    assert_eq!(run.steps.len(), 2 + 5, "one slot per item after the nodes");
    assert_eq!(
        (0..5)
            .map(|k| run.slot_id(&plan, 2 + k))
            .collect::<Vec<_>>(),
        ["each[0]", "each[1]", "each[2]", "each[3]", "each[4]"]
    );
    assert_eq!(run.slot_of(&plan, "each[3]"), Some(5));
    assert_eq!(run.slot_of(&plan, "each[5]"), None);
    assert_eq!(run.slot_of(&plan, "after"), Some(1));
    assert_eq!(
        run.task_params(&plan, inflight[1].0).unwrap(),
        json!({"name": "b", "at": 1}).as_object().unwrap().clone()
    );

    let mut seen = Vec::new();
    let mut clock = 1;
    // Answer the newest first, so outputs arrive out of item order.
    while let Some((slot, attempt, task)) = inflight.pop() {
        seen.push(slot);
        let item = run.steps[slot].instance.as_ref().unwrap().item.clone();
        let t = run.apply(
            &plan,
            slot_finished(
                slot,
                attempt,
                task,
                Outcome::Success(json!({ "done": item })),
            ),
            at(clock),
        );
        clock += 1;
        let next = dispatched_slots(&t);
        if seen.len() < 5 {
            assert!(
                t.changed.len() <= 3,
                "an instance's end touches {:?}",
                t.changed
            );
            inflight.extend(next);
        } else {
            assert_eq!(next.iter().map(|d| d.0).collect::<Vec<_>>(), [1]);
        }
        let running = (2..7)
            .filter(|&s| run.steps[s].status == StepStatus::Running)
            .count();
        assert!(running <= 2, "{running} instances run at once");
    }
    seen.sort_unstable();
    assert_eq!(seen, [2, 3, 4, 5, 6], "every instance ran once");
    assert_eq!(run.steps[0].status, StepStatus::Success);
    let expected =
        json!([{"done": "a"}, {"done": "b"}, {"done": "c"}, {"done": "d"}, {"done": "e"}]);
    assert_eq!(
        run.steps[0].output,
        Some(expected.clone()),
        "outputs in item order"
    );
    assert_eq!(
        run.steps[1].status,
        StepStatus::Running,
        "the dependent runs"
    );
    assert_eq!(
        run.task_params(&plan, 1).unwrap()["all"],
        expected,
        "dependents read the list"
    );
    assert_eq!(run.inputs_for(&plan, 1)["each"], expected);
}

#[test]
fn a_failing_instance_is_retried_then_fails_its_step_and_stops_the_others() {
    let plan = plan(FAN_OUT);
    let mut run = fan_out_run(&plan);
    let first = dispatched_slots(&run.apply(&plan, Event::Start, at(0)));
    let (slot, attempt, task) = first[0];
    let retried =
        dispatched_slots(&run.apply(&plan, slot_finished(slot, attempt, task, fail(true)), at(1)));
    assert_eq!(
        retried.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
        [(slot, 2)],
        "the instance's retry policy applies"
    );
    let t = run.apply(
        &plan,
        slot_finished(slot, 2, retried[0].2, fail(true)),
        at(2),
    );
    assert!(dispatched_slots(&t).is_empty());
    assert_eq!(run.steps[0].status, StepStatus::Failure);
    assert_eq!(run.steps[0].error.as_deref(), Some("item 0 failed: boom"));
    let (other, other_attempt, other_task) = first[1];
    assert!(
        t.effects.contains(&Effect::Cancelled {
            step: other,
            attempt: other_attempt,
            task_id: other_task
        }),
        "the running sibling is told to stop"
    );
    assert!((2..7).all(|s| run.steps[s].status.is_terminal()));
    assert_eq!(run.steps[1].status, StepStatus::UpstreamFailed);
    assert_eq!(run.status, RunStatus::Failure);
    // A late result of the cancelled sibling is fenced off.
    let late = run.apply(
        &plan,
        slot_finished(other, other_attempt, other_task, Outcome::Success(json!(1))),
        at(3),
    );
    assert!(matches!(late.effects[..], [Effect::Stale { .. }]));

    // An operator's retry runs again only the instances that did not succeed.
    let t = run.apply(&plan, Event::Retry { step: Some(0) }, at(4));
    let again = dispatched_slots(&t);
    assert_eq!(
        again.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
        [(2, 3), (3, 2)]
    );
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.steps[0].status, StepStatus::Running);
}

#[test]
fn for_each_over_a_value_that_is_not_a_list_or_too_long_fails_the_step() {
    let plan = plan(FAN_OUT);
    for (items, limit, expected) in [
        (
            json!("abc"),
            10,
            "for_each: `${{ params.items }}` gives a string, not a list",
        ),
        (json!({"a": 1}), 10, "gives an object, not a list"),
        (
            json!([1, 2, 3]),
            2,
            "gives 3 items; a step may have at most 2 instances",
        ),
    ] {
        let mut run = RunState::new(
            Uuid::new_v4(),
            &plan,
            json!({"items": items}).as_object().unwrap().clone(),
        );
        run.max_instances = limit;
        let t = run.apply(&plan, Event::Start, at(0));
        assert!(dispatched_slots(&t).is_empty());
        assert_eq!(run.steps.len(), 2, "no instance was made");
        assert_eq!(run.steps[0].status, StepStatus::Failure);
        let error = run.steps[0].error.clone().unwrap();
        assert!(error.contains(expected), "{error}");
        assert_eq!(run.status, RunStatus::Failure);
    }
}

#[test]
fn for_each_over_an_empty_list_succeeds_with_an_empty_output() {
    let plan = plan(FAN_OUT);
    let mut run = RunState::new(
        Uuid::new_v4(),
        &plan,
        json!({"items": []}).as_object().unwrap().clone(),
    );
    let t = run.apply(&plan, Event::Start, at(0));
    assert_eq!(run.steps[0].status, StepStatus::Success);
    assert_eq!(run.steps[0].output, Some(json!([])));
    assert_eq!(
        dispatched_slots(&t).iter().map(|d| d.0).collect::<Vec<_>>(),
        [1]
    );
}

#[test]
fn a_paused_fan_out_starts_no_instance_until_resumed_and_restores_mid_way() {
    let plan = plan(FAN_OUT);
    let mut run = fan_out_run(&plan);
    let first = dispatched_slots(&run.apply(&plan, Event::Start, at(0)));
    run.apply(&plan, Event::Pause, at(1));
    let (slot, attempt, task) = first[0];
    let t = run.apply(
        &plan,
        slot_finished(slot, attempt, task, Outcome::Success(json!(0))),
        at(2),
    );
    assert!(
        dispatched_slots(&t).is_empty(),
        "a paused run starts nothing"
    );
    let restored = RunState::restore(
        run.id,
        &plan,
        run.status,
        run.params.clone(),
        run.steps.clone(),
        run.ended_at,
    );
    assert_eq!(
        restored, run,
        "the fan-out's counters are derived from its slots"
    );
    let mut run = restored;
    let t = run.apply(&plan, Event::Resume, at(3));
    assert_eq!(
        dispatched_slots(&t).iter().map(|d| d.0).collect::<Vec<_>>(),
        [4],
        "one more fits under max_parallel"
    );
}

#[test]
fn cancelling_a_run_cancels_its_running_instances() {
    let plan = plan(FAN_OUT);
    let mut run = fan_out_run(&plan);
    let first = dispatched_slots(&run.apply(&plan, Event::Start, at(0)));
    let t = run.apply(&plan, Event::Cancel, at(1));
    let cancelled: Vec<usize> = t
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Cancelled { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, first.iter().map(|d| d.0).collect::<Vec<_>>());
    assert!(run.steps.iter().all(|s| s.status == StepStatus::Cancelled));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any list, any max_parallel, instances answered in any order with failures retried: no
    /// more than max_parallel run at once, each item is accepted once, and the step's output is
    /// the outputs in item order.
    #[test]
    fn fan_outs_keep_their_promises(n in 0usize..40, max_parallel in 1usize..8, seed in any::<u64>()) {
        let yaml = format!("name: p\nsteps:\n  - id: each\n    agent: x\n    action: work\n    for_each: \"${{{{ params.items }}}}\"\n    max_parallel: {max_parallel}\n    retry: {{max_attempts: 3, delay: 0}}\n    params: {{v: \"${{{{ item }}}}\"}}\n");
        let plan = plan(&yaml);
        let items: Vec<Value> = (0..n).map(|k| json!(k * 10)).collect();
        let mut run = RunState::new(Uuid::new_v4(), &plan, json!({"items": items}).as_object().unwrap().clone());
        let mut rng = Lcg(seed);
        let mut inflight = dispatched_slots(&run.apply(&plan, Event::Start, at(0)));
        let mut successes: HashMap<usize, usize> = HashMap::new();
        let mut clock = 0;
        while !inflight.is_empty() {
            clock += 1;
            let (slot, attempt, task) = inflight.swap_remove(rng.next(inflight.len()));
            // Fail only a first attempt, so every item succeeds in the end.
            let outcome = if attempt == 1 && rng.next(3) == 0 { fail(true) } else { Outcome::Success(run.task_params(&plan, slot).unwrap()["v"].clone()) };
            let success = matches!(outcome, Outcome::Success(_));
            let t = run.apply(&plan, slot_finished(slot, attempt, task, outcome), at(clock));
            if success {
                *successes.entry(slot).or_default() += 1;
            }
            inflight.extend(dispatched_slots(&t));
            let running = run.steps.iter().filter(|s| s.instance.is_some() && s.status == StepStatus::Running).count();
            prop_assert!(running <= max_parallel);
        }
        prop_assert_eq!(run.status, RunStatus::Success);
        prop_assert_eq!(successes.len(), n);
        prop_assert!(successes.values().all(|&c| c == 1));
        prop_assert_eq!(run.steps[0].output.clone(), Some(Value::Array(items)));
    }
}

const TIMED: &str = "name: timed\ntimeout: 10s\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y}\nerror_handling:\n  on_failure:\n    - {id: h, agent: x, action: log}\n";

#[test]
fn a_run_past_its_timeout_stops_its_steps_runs_its_handlers_and_fails() {
    let plan = plan(TIMED);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    assert_eq!(run.deadline, Some(at(10)));

    let early = run.apply(&plan, Event::TimedOut, at(9));
    assert_eq!(early, Transition::default(), "not due yet");

    let t = run.apply(&plan, Event::TimedOut, at(10));
    assert!(t.effects.contains(&Effect::Cancelled {
        step: 0,
        attempt: 1,
        task_id: task
    }));
    for i in [0, 1] {
        assert_eq!(run.steps[i].status, StepStatus::Cancelled);
        assert_eq!(
            run.steps[i].error.as_deref(),
            Some("workflow timed out after 10s")
        );
    }
    assert_eq!(run.status, RunStatus::Failing);
    assert_eq!(run.deadline, None, "the timeout fires once");
    let handler = dispatched(&plan, &t);
    assert_eq!(
        handler.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["h"]
    );

    let late = run.apply(
        &plan,
        finished(&plan, "a", 1, task, Outcome::Success(json!(1))),
        at(11),
    );
    assert!(matches!(late.effects[..], [Effect::Stale { .. }]));
    assert_eq!(
        run.apply(&plan, Event::TimedOut, at(12)),
        Transition::default()
    );
    let t = run.apply(
        &plan,
        finished(&plan, "h", 1, handler[0].2, Outcome::Success(json!(1))),
        at(13),
    );
    assert!(t.effects.contains(&Effect::RunEnded(RunStatus::Failure)));
    assert_eq!(run.error.as_deref(), Some("workflow timed out after 10s"));
}

#[test]
fn a_run_that_ends_in_time_or_without_handlers_keeps_its_promises() {
    let plan = plan(TIMED);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, a) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    let (_, _, b) = dispatched(
        &plan,
        &run.apply(
            &plan,
            finished(&plan, "a", 1, a, Outcome::Success(json!(1))),
            at(1),
        ),
    )[0]
    .clone();
    run.apply(
        &plan,
        finished(&plan, "b", 1, b, Outcome::Success(json!(1))),
        at(2),
    );
    assert_eq!((run.status, run.deadline), (RunStatus::Success, None));
    assert_eq!(
        run.apply(&plan, Event::TimedOut, at(20)),
        Transition::default()
    );

    // A paused run times out too; with no handler it fails at once.
    let plan =
        super::tests::plan("name: t\ntimeout: 1.5s\nsteps:\n  - {id: a, agent: x, action: y}\n");
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    run.apply(&plan, Event::Start, at(0));
    run.apply(&plan, Event::Pause, at(1));
    let t = run.apply(&plan, Event::TimedOut, at(2));
    assert!(t.effects.contains(&Effect::RunEnded(RunStatus::Failure)));
    assert_eq!(
        run.error.as_deref(),
        Some("workflow timed out after 1500ms")
    );
}

fn subset_run(plan: &Plan, only: &[&str], skip: &[&str]) -> RunState {
    let mut run = RunState::new(Uuid::new_v4(), plan, plan.params.clone());
    run.subset = Subset {
        only: only.iter().map(|s| s.to_string()).collect(),
        skip: skip.iter().map(|s| s.to_string()).collect(),
    };
    run.subset.check(plan).unwrap();
    run
}

/// Answers every task with `output` until the run has nothing in flight.
fn drive_run(plan: &Plan, run: &mut RunState, output: Value) -> Vec<usize> {
    let mut ran = Vec::new();
    let mut queue = dispatched_slots(&run.apply(plan, Event::Start, at(0)));
    while let Some((slot, attempt, task)) = queue.pop() {
        ran.push(slot);
        let event = slot_finished(slot, attempt, task, Outcome::Success(output.clone()));
        queue.extend(dispatched_slots(&run.apply(plan, event, at(1))));
    }
    ran.sort_unstable();
    ran
}

const FOUR: &str = "name: four\nsteps:\n  - {id: fetch, agent: x, action: y}\n  - {id: build, agent: x, action: y}\n  - {id: test, agent: x, action: y}\n  - {id: deploy, agent: x, action: y}\nerror_handling:\n  on_failure:\n    - {id: cleanup, agent: x, action: y}\n";

fn status_and_reason(plan: &Plan, run: &RunState, id: &str) -> (StepStatus, Option<String>) {
    let s = &run.steps[plan.node_index(id).unwrap()];
    (s.status, s.error.clone())
}

#[test]
fn only_runs_the_selected_steps_even_when_their_dependencies_are_left_out() {
    let plan = plan(FOUR);
    let mut run = subset_run(&plan, &["build", "deploy"], &[]);
    let t = run.apply(&plan, Event::Start, at(0));
    // The dependencies of both are left out, so both start at once, as after an operator's
    // skip of those dependencies.
    let started = dispatched(&plan, &t);
    assert_eq!(
        started.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["build", "deploy"]
    );
    assert_restores(&plan, &run);
    for (id, attempt, task) in started {
        let event = finished(&plan, &id, attempt, task, Outcome::Success(json!({})));
        assert!(dispatched(&plan, &run.apply(&plan, event, at(1))).is_empty());
    }
    assert_eq!(run.status, RunStatus::Success);
    let not_selected = Some("not selected: --only build, deploy".to_string());
    for id in ["fetch", "test", "cleanup"] {
        assert_eq!(
            status_and_reason(&plan, &run, id),
            (StepStatus::Skipped, not_selected.clone()),
            "{id}"
        );
        let s = &run.steps[plan.node_index(id).unwrap()];
        assert_eq!((s.attempt, s.started_at, s.ended_at), (0, None, None));
    }
    assert_eq!(
        status_and_reason(&plan, &run, "deploy").0,
        StepStatus::Success
    );
}

#[test]
fn skip_leaves_a_step_out_and_its_dependents_run_after_it() {
    let plan = plan(FOUR);
    let mut run = subset_run(&plan, &[], &["build", "test"]);
    let ran = drive_run(&plan, &mut run, json!({}));
    let ids: Vec<&str> = ran.iter().map(|&i| plan.nodes[i].id.as_str()).collect();
    assert_eq!(ids, ["fetch", "deploy"]);
    assert_eq!(run.status, RunStatus::Success);
    assert_eq!(
        status_and_reason(&plan, &run, "test"),
        (StepStatus::Skipped, Some("skipped: --skip test".into()))
    );
    // The failure handler, not left out, is skipped because the run did not fail.
    assert_eq!(
        status_and_reason(&plan, &run, "cleanup"),
        (StepStatus::Skipped, Some("the run did not fail".into()))
    );
}

#[test]
fn a_step_whose_dependencies_are_all_left_out_starts_with_the_roots() {
    let plan = plan(
        "name: j\nsteps:\n  - {id: a, agent: x, action: y, depends_on: []}\n  - {id: b, agent: x, action: y, depends_on: []}\n  - {id: join, agent: x, action: y, depends_on: [a, b]}\n  - {id: other, agent: x, action: y, depends_on: []}\n",
    );
    let mut run = subset_run(&plan, &[], &["a", "b"]);
    let t = run.apply(&plan, Event::Start, at(0));
    let mut started: Vec<String> = dispatched(&plan, &t).into_iter().map(|d| d.0).collect();
    started.sort();
    assert_eq!(started, ["join", "other"]);
    // Start again (a duplicate) changes nothing.
    assert_eq!(run.apply(&plan, Event::Start, at(0)), Transition::default());
}

#[test]
fn failure_handlers_run_only_when_selected_and_stay_left_out_through_a_retry() {
    let plan = plan(FOUR);
    let mut run = subset_run(&plan, &["fetch"], &[]);
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    run.apply(&plan, finished(&plan, "fetch", 1, task, fail(false)), at(1));
    assert_eq!(run.status, RunStatus::Failure, "no selected handler to run");
    let t = run.apply(&plan, Event::Retry { step: None }, at(2));
    assert_eq!(dispatched(&plan, &t).len(), 1);
    assert_eq!(
        status_and_reason(&plan, &run, "cleanup"),
        (
            StepStatus::Skipped,
            Some("not selected: --only fetch".into())
        )
    );
    assert_restores(&plan, &run);

    let mut run = subset_run(&plan, &["fetch", "cleanup"], &[]);
    let (_, _, task) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0].clone();
    let t = run.apply(&plan, finished(&plan, "fetch", 1, task, fail(false)), at(1));
    assert_eq!(run.status, RunStatus::Failing);
    assert_eq!(
        dispatched(&plan, &t)
            .iter()
            .map(|d| d.0.as_str())
            .collect::<Vec<_>>(),
        ["cleanup"]
    );
}

#[test]
fn a_branch_step_left_out_is_skipped_while_its_condition_still_decides_the_other() {
    let plan = plan(
        "name: m\nsteps:\n  - {agent: agent8, action: collect_metrics}\n  - condition: \"error_rate > 0.05\"\n    then:\n      - {agent: agent19, action: rollback}\n    else:\n      - {agent: agent9, action: all_clear}\n",
    );
    let mut run = subset_run(&plan, &[], &["rollback"]);
    drive_run(&plan, &mut run, json!({"error_rate": 0.01}));
    assert_eq!(
        status_and_reason(&plan, &run, "rollback"),
        (StepStatus::Skipped, Some("skipped: --skip rollback".into()))
    );
    assert_eq!(
        status_and_reason(&plan, &run, "all_clear").0,
        StepStatus::Success
    );
    // Only the branch: the metrics step it reads is left out, so the bare name comes from
    // the run's params.
    let mut run = subset_run(&plan, &["rollback", "all_clear"], &[]);
    run.params.insert("error_rate".into(), json!(0.5));
    drive_run(&plan, &mut run, json!({}));
    assert_eq!(
        status_and_reason(&plan, &run, "collect_metrics").0,
        StepStatus::Skipped
    );
    assert_eq!(
        status_and_reason(&plan, &run, "rollback").0,
        StepStatus::Success
    );
    assert_eq!(
        status_and_reason(&plan, &run, "all_clear"),
        (
            StepStatus::Skipped,
            Some("condition is false: !(error_rate > 0.05)".into())
        )
    );
}

#[test]
fn a_for_each_step_left_out_never_expands_and_its_dependent_sees_no_output() {
    let plan = plan(FAN_OUT);
    let mut run = subset_run(&plan, &["after"], &[]);
    let t = run.apply(&plan, Event::Start, at(0));
    assert_eq!(run.steps.len(), 2, "no instance slots");
    assert_eq!(run.steps[0].status, StepStatus::Skipped);
    // `after` runs at once and reads the left-out step's output as null, as after an
    // operator's skip.
    assert_eq!(dispatched_slots(&t).len(), 1);
    assert_eq!(run.steps[1].status, StepStatus::Running);
    assert_eq!(
        run.task_params(&plan, 1).unwrap(),
        json!({"all": null}).as_object().unwrap().clone()
    );

    let mut run = subset_run(&plan, &[], &["after"]);
    let ran = drive_run(&plan, &mut run, json!(1));
    assert_eq!(ran, (2..7).collect::<Vec<_>>(), "every instance ran");
    assert_eq!(run.status, RunStatus::Success);
}

const PARENT: &str = "name: parent\nsteps:\n  - {id: deploy, workflow: child, retry: {max_attempts: 2, delay: 0s}}\n  - {id: after, agent: a, action: b}\n";

#[test]
fn a_workflow_step_dispatches_like_an_agent_step_and_a_retry_gets_a_new_task_id() {
    let plan = plan(PARENT);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let first = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)));
    let [(id, 1, child)] = first.as_slice() else {
        panic!("{first:?}")
    };
    assert_eq!(id, "deploy");
    let failed = Outcome::Failure {
        message: "sub-workflow run failed".into(),
        retryable: true,
    };
    let again = dispatched(
        &plan,
        &run.apply(&plan, finished(&plan, "deploy", 1, *child, failed), at(1)),
    );
    let [(_, 2, second)] = again.as_slice() else {
        panic!("{again:?}")
    };
    assert_ne!(second, child, "the retry starts another child run");
    // The first child's late result is fenced off.
    let late = run.apply(
        &plan,
        finished(&plan, "deploy", 1, *child, Outcome::Success(json!({}))),
        at(2),
    );
    assert!(matches!(late.effects[..], [Effect::Stale { .. }]));
}

#[test]
fn an_operator_ending_a_running_step_stops_its_attempt() {
    let plan = plan(PARENT);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let [(_, _, task_id)] = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[..] else {
        panic!()
    };
    let t = run.apply(
        &plan,
        Event::Settle {
            step: 0,
            output: None,
        },
        at(1),
    );
    assert!(
        t.effects.contains(&Effect::Cancelled {
            step: 0,
            attempt: 1,
            task_id
        }),
        "{:?}",
        t.effects
    );
}

#[test]
fn an_ended_run_reports_its_outputs_or_its_failed_step_to_its_parent() {
    let plan = plan(
        "name: child\nsteps:\n  - {id: build, agent: a, action: b}\n  - {id: skip, agent: a, action: b, condition: 'false'}\n  - {id: ship, agent: a, action: c, depends_on: [build]}\nerror_handling:\n  on_failure: [{id: log, agent: a, action: log}]\n",
    );
    let id = Uuid::new_v4();
    let mut run = RunState::new(id, &plan, Map::new());
    let mut queue = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)));
    while let Some((step, attempt, task_id)) = queue.pop() {
        let output = Outcome::Success(json!({ "from": step }));
        let t = run.apply(
            &plan,
            finished(&plan, &step, attempt, task_id, output),
            at(1),
        );
        queue.extend(dispatched(&plan, &t));
    }
    assert_eq!(run.status, RunStatus::Success);
    assert_eq!(
        run.outcome_for_parent(&plan),
        Outcome::Success(json!({"build": {"from": "build"}, "ship": {"from": "ship"}}))
    );

    let mut run = RunState::new(id, &plan, Map::new());
    let [(_, _, build)] = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[..] else {
        panic!()
    };
    let t = run.apply(
        &plan,
        finished(&plan, "build", 1, build, fail(false)),
        at(1),
    );
    let [(_, _, log)] = dispatched(&plan, &t)[..] else {
        panic!()
    };
    run.apply(
        &plan,
        finished(&plan, "log", 1, log, Outcome::Success(json!({}))),
        at(2),
    );
    assert_eq!(run.status, RunStatus::Failure);
    assert_eq!(
        run.outcome_for_parent(&plan),
        Outcome::Failure {
            message: format!("sub-workflow run {id} (child) failed: step `build` failed: boom"),
            retryable: true,
        }
    );

    let mut run = RunState::new(id, &plan, Map::new());
    run.apply(&plan, Event::Start, at(0));
    run.apply(&plan, Event::Cancel, at(1));
    assert_eq!(
        run.outcome_for_parent(&plan),
        Outcome::Failure {
            message: format!("sub-workflow run {id} (child) was cancelled"),
            retryable: false,
        }
    );
}

proptest! {
    /// Readiness by counting: through random outcomes and operator actions (pause, resume,
    /// skip, complete, retry, cancel), the run's counters of unfinished dependencies equal those
    /// derived from its steps, and readiness by counter equals the definition it replaced: a
    /// step starts only once every dependency has ended, and no main step of a moving run is
    /// left pending once they all have.
    #[test]
    fn readiness_by_counter_matches_the_dependencies((plan, seed) in random_plan()) {
        let mut rng = Lcg(seed);
        let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
        run.window = 1 + rng.next(4);
        let mut inflight: Vec<(usize, u32, Uuid)> = Vec::new();
        let mut t = run.apply(&plan, Event::Start, at(0));
        for clock in 1..2_000 {
            for e in &t.effects {
                if let Effect::Dispatch { step, attempt, task_id } = e {
                    for &d in &plan.nodes[*step].deps {
                        prop_assert!(run.steps[d].status.is_terminal(), "{} started before {}", plan.nodes[*step].id, plan.nodes[d].id);
                    }
                    inflight.push((*step, *attempt, *task_id));
                }
            }
            let restored = RunState::restore(run.id, &plan, run.status, run.params.clone(), run.steps.clone(), run.ended_at);
            prop_assert_eq!(&restored.unfinished_deps, &run.unfinished_deps);
            prop_assert_eq!(restored.outstanding, run.outstanding);
            prop_assert_eq!(&restored.deferred, &run.deferred);
            if matches!(run.status, RunStatus::Running | RunStatus::NeedsAttention | RunStatus::Failing) {
                for (i, node) in plan.nodes.iter().enumerate() {
                    let all_ended = node.deps.iter().all(|&d| run.steps[d].status.is_terminal());
                    // Only a full window keeps a ready step waiting.
                    prop_assert!(
                        !(node.role == Role::Main && run.steps[i].status == StepStatus::Pending && all_ended)
                            || (run.deferred.contains(&i) && run.outstanding >= run.window),
                        "{} is pending though its dependencies ended", node.id
                    );
                }
            }
            if run.status.is_terminal() && rng.next(4) > 0 {
                t = run.apply(&plan, Event::Retry { step: None }, at(clock));
                continue;
            }
            let step = rng.next(plan.nodes.len());
            t = match rng.next(12) {
                0 => run.apply(&plan, Event::Pause, at(clock)),
                1 => run.apply(&plan, Event::Resume, at(clock)),
                2 => run.apply(&plan, Event::Settle { step, output: None }, at(clock)),
                3 => run.apply(&plan, Event::Settle { step, output: Some(json!(1)) }, at(clock)),
                4 => run.apply(&plan, Event::Retry { step: Some(step) }, at(clock)),
                5 if rng.next(10) == 0 => run.apply(&plan, Event::Cancel, at(clock)),
                _ if !inflight.is_empty() => {
                    let (step, attempt, task_id) = inflight.swap_remove(rng.next(inflight.len()));
                    let outcome = match rng.next(3) {
                        0 => fail(rng.next(2) == 0),
                        _ => Outcome::Success(json!(rng.next(2))),
                    };
                    run.apply(&plan, Event::AttemptFinished { step, attempt, task_id, outcome, worker: "w".into(), started_at: at(clock), finished_at: at(clock) }, at(clock))
                }
                _ => match (0..run.steps.len()).find(|&i| run.steps[i].status == StepStatus::Waiting) {
                    Some(step) => {
                        let attempt = run.steps[step].attempt;
                        run.apply(&plan, Event::Wake { step, attempt }, at(clock + 3_600))
                    }
                    None => Transition::default(),
                },
            };
        }
    }
}

/// The errors of the attempts a transition ended, as (attempt, success, error).
fn attempts_ended(t: &Transition) -> Vec<(u32, bool, Option<String>)> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::AttemptEnded {
                attempt,
                success,
                error,
                ..
            } => Some((*attempt, *success, error.clone())),
            _ => None,
        })
        .collect()
}

const EXPECTING: &str = "name: e\nparams: {min: 0.85}\nsteps:\n  - id: test\n    agent: x\n    action: y\n    retry: {max_attempts: 2, delay: 0}\n    expect: [\"output.tests_failed == 0\", \"output.coverage >= params.min\"]\n";

#[test]
fn a_claimed_success_that_fails_its_expectation_is_a_failed_attempt_retried_by_the_policy() {
    let plan = plan(EXPECTING);
    let mut run = RunState::new(Uuid::new_v4(), &plan, plan.params.clone());
    let (_, _, t1) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0];
    let claim = Outcome::Success(json!({"tests_failed": 0, "coverage": 0.7}));
    let t = run.apply(&plan, finished(&plan, "test", 1, t1, claim), at(1));
    let expected = "expectation failed: output.coverage >= params.min (output.coverage was 0.7)";
    assert_eq!(attempts_ended(&t), [(1, false, Some(expected.to_string()))]);
    let (_, attempt, t2) = dispatched(&plan, &t)[0];
    assert_eq!(attempt, 2, "retried at once, as the policy says");
    assert_eq!(
        run.steps[0].output, None,
        "an unverified output is not kept"
    );

    let verified = json!({"tests_failed": 0, "coverage": 0.9});
    let t = run.apply(
        &plan,
        finished(&plan, "test", 2, t2, Outcome::Success(verified.clone())),
        at(2),
    );
    assert_eq!(attempts_ended(&t), [(2, true, None)]);
    assert_eq!(run.steps[0].status, StepStatus::Success);
    assert_eq!(run.steps[0].output, Some(verified));
    assert_eq!(run.status, RunStatus::Success);
}

#[test]
fn an_expectation_never_met_fails_the_step_and_the_run_with_it() {
    let plan = plan(EXPECTING);
    let mut run = RunState::new(Uuid::new_v4(), &plan, plan.params.clone());
    let mut next = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)));
    // The second attempt's output lacks the field: an expectation that cannot be evaluated
    // fails the attempt as well.
    for (attempt, output) in [
        (1, json!({"tests_failed": 3, "coverage": 0.9})),
        (2, json!({"tests_failed": 0})),
    ] {
        let (_, a, task) = next[0];
        assert_eq!(a, attempt);
        let t = run.apply(
            &plan,
            finished(&plan, "test", a, task, Outcome::Success(output)),
            at(i64::from(attempt)),
        );
        next = dispatched(&plan, &t);
    }
    assert!(next.is_empty());
    assert_eq!(run.steps[0].status, StepStatus::Failure);
    assert_eq!(run.status, RunStatus::Failure);
    let error = run.steps[0].error.as_deref().unwrap();
    assert!(error.starts_with("expectation failed: "), "{error}");
    assert!(error.contains("output.coverage >= params.min"), "{error}");
    assert!(error.contains("cannot be evaluated"), "{error}");
}

#[test]
fn a_fallback_and_the_instances_of_a_fan_out_are_held_to_the_expectation_too() {
    let plan = plan(
        "name: fb\nsteps:\n  - {id: a, agent: m, action: x, retry: {max_attempts: 1}, expect: output.ok, fallback: {agent: s, action: y}}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let (_, _, t1) = dispatched(&plan, &run.apply(&plan, Event::Start, at(0)))[0];
    let claim = || Outcome::Success(json!({"ok": false}));
    let t = run.apply(&plan, finished(&plan, "a", 1, t1, claim()), at(1));
    assert_eq!(run.steps[0].strike, Strike::Fallback, "strike 2 begins");
    let (_, _, t2) = dispatched(&plan, &t)[0];
    let t = run.apply(&plan, finished(&plan, "a", 2, t2, claim()), at(2));
    assert_eq!(
        attempts_ended(&t),
        [(
            2,
            false,
            Some("expectation failed: output.ok (output.ok was false)".into())
        )]
    );
    assert_eq!(run.status, RunStatus::Failure);

    let fan_out = FAN_OUT.replace(
        "max_parallel: 2\n",
        "max_parallel: 2\n    expect: output.done == item_done\n",
    );
    assert!(
        Plan::compile(&Definition::from_yaml(&fan_out).unwrap())
            .unwrap_err()
            .to_string()
            .contains("reads `item_done`")
    );
    let fan_out = FAN_OUT.replace(
        "max_parallel: 2\n",
        "max_parallel: 2\n    expect: output.done\n",
    );
    let fan = self::plan(&fan_out);
    let mut run = fan_out_run(&fan);
    let (slot, attempt, task) = dispatched_slots(&run.apply(&fan, Event::Start, at(0)))[0];
    let t = run.apply(
        &fan,
        slot_finished(
            slot,
            attempt,
            task,
            Outcome::Success(json!({"done": false})),
        ),
        at(1),
    );
    assert_eq!(
        dispatched_slots(&t),
        [(slot, 2, dispatched_slots(&t)[0].2)],
        "the instance is retried"
    );
    assert!(
        run.steps[slot]
            .error
            .as_deref()
            .is_some_and(condition::is_expectation_failure)
    );
}
