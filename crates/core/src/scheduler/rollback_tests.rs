//! Rollback by compensation: the order, exactly-once, restarts and an operator's rollback.

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

/// The one task a transition dispatched, as (slot, attempt, task id).
fn only_dispatch(t: &Transition) -> (usize, u32, Uuid) {
    let all: Vec<(usize, u32, Uuid)> = t
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch {
                step,
                attempt,
                task_id,
            } => Some((*step, *attempt, *task_id)),
            _ => None,
        })
        .collect();
    assert_eq!(all.len(), 1, "{:?}", t.effects);
    all[0]
}

fn answer(
    run: &mut RunState,
    plan: &Plan,
    task: (usize, u32, Uuid),
    outcome: Outcome,
    now: i64,
) -> Transition {
    let (step, attempt, task_id) = task;
    run.apply(
        plan,
        Event::AttemptFinished {
            step,
            attempt,
            task_id,
            outcome,
            worker: "w".into(),
            started_at: at(now),
            finished_at: at(now),
        },
        at(now),
    )
}

fn fail(retryable: bool) -> Outcome {
    Outcome::Failure {
        message: "boom".into(),
        retryable,
    }
}

const THREE_PHASES: &str = "name: release
steps:
  - id: provision
    agent: infra
    action: create
    compensate: {agent: infra, action: destroy, params: {vm: '${{ steps.provision.output.vm }}'}}
  - id: configure
    agent: infra
    action: configure
    compensate: {agent: infra, action: unconfigure, retry: {max_attempts: 3}}
  - id: deploy
    agent: app
    action: deploy
    retry: {max_attempts: 1}
    compensate: {agent: app, action: undeploy}
error_handling:
  rollback: true
  on_failure:
    - {id: log, agent: ops, action: log}
";

/// Runs provision and configure to success and fails deploy; answers the failure handler.
/// Returns the transition that started the rollback.
fn fail_phase_three(run: &mut RunState, plan: &Plan) -> Transition {
    let t = run.apply(plan, Event::Start, at(0));
    let t = answer(
        run,
        plan,
        only_dispatch(&t),
        Outcome::Success(json!({"vm": "vm-7"})),
        1,
    );
    let t = answer(run, plan, only_dispatch(&t), Outcome::Success(json!({})), 2);
    let t = answer(run, plan, only_dispatch(&t), fail(false), 3);
    assert_eq!(run.status, RunStatus::Failing);
    let handler = only_dispatch(&t);
    assert_eq!(plan.nodes[handler.0].id, "log");
    answer(run, plan, handler, Outcome::Success(json!({})), 4)
}

#[test]
fn a_run_failing_in_phase_three_undoes_phases_two_and_one_in_that_order() {
    let plan = plan(THREE_PHASES);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = fail_phase_three(&mut run, &plan);
    assert_eq!(run.status, RunStatus::RollingBack);
    let undo_configure = only_dispatch(&t);
    assert_eq!(plan.nodes[undo_configure.0].id, "configure:compensate");
    assert_eq!(
        run.inputs_for(&plan, undo_configure.0)
            .keys()
            .collect::<Vec<_>>(),
        ["configure"]
    );

    let t = answer(
        &mut run,
        &plan,
        undo_configure,
        Outcome::Success(json!({})),
        5,
    );
    let undo_provision = only_dispatch(&t);
    assert_eq!(plan.nodes[undo_provision.0].id, "provision:compensate");
    // Templated like any step: it reads the output of the step it undoes.
    assert_eq!(
        run.task_params(&plan, undo_provision.0).unwrap(),
        json!({"vm": "vm-7"}).as_object().unwrap().clone()
    );

    let t = answer(
        &mut run,
        &plan,
        undo_provision,
        Outcome::Success(json!({})),
        6,
    );
    assert_eq!(run.status, RunStatus::RolledBack);
    assert!(t.effects.contains(&Effect::RunEnded(RunStatus::RolledBack)));
    let deploy_undo = &run.steps[plan.node_index("deploy:compensate").unwrap()];
    assert_eq!(deploy_undo.status, StepStatus::Skipped);
    assert_eq!(deploy_undo.attempt, 0, "a step that failed is not undone");
    assert_eq!(
        deploy_undo.error.as_deref(),
        Some("not run: its step did not succeed")
    );
}

#[test]
fn a_rollback_resumes_from_the_stored_steps() {
    let plan = plan(THREE_PHASES);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = fail_phase_three(&mut run, &plan);
    let undo_configure = only_dispatch(&t);
    // What a coordinator that starts afresh loads: the run's status and its steps.
    let mut restored = RunState::restore(
        run.id,
        &plan,
        run.status,
        run.params.clone(),
        run.steps.clone(),
        None,
    );
    let t = answer(
        &mut restored,
        &plan,
        undo_configure,
        Outcome::Success(json!({})),
        5,
    );
    let undo_provision = only_dispatch(&t);
    assert_eq!(plan.nodes[undo_provision.0].id, "provision:compensate");
    // A second delivery of the first compensation's result changes nothing.
    let again = answer(
        &mut restored,
        &plan,
        undo_configure,
        Outcome::Success(json!({})),
        6,
    );
    assert!(matches!(again.effects[..], [Effect::Stale { .. }]));
    answer(
        &mut restored,
        &plan,
        undo_provision,
        Outcome::Success(json!({})),
        7,
    );
    assert_eq!(restored.status, RunStatus::RolledBack);
}

#[test]
fn a_failed_compensation_names_its_step_and_a_second_rollback_finishes_the_job() {
    let plan = plan(THREE_PHASES);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = fail_phase_three(&mut run, &plan);
    let undo_configure = only_dispatch(&t);
    // Three attempts by its policy; the third failure ends the rollback.
    let mut task = undo_configure;
    for k in 0..2 {
        let t = answer(&mut run, &plan, task, fail(true), 5 + k);
        assert_eq!(run.steps[task.0].status, StepStatus::Waiting);
        let t2 = run.apply(
            &plan,
            Event::Wake {
                step: task.0,
                attempt: task.1,
            },
            at(100 + k),
        );
        assert!(
            t.effects
                .iter()
                .all(|e| !matches!(e, Effect::Dispatch { .. }))
        );
        task = only_dispatch(&t2);
    }
    answer(&mut run, &plan, task, fail(true), 200);
    assert_eq!(run.status, RunStatus::RollbackFailed);
    let error = run.error.clone().unwrap();
    assert!(
        error.starts_with("rollback failed: step `configure` could not be undone: boom"),
        "{error}"
    );
    let undo_provision = plan.node_index("provision:compensate").unwrap();
    assert_eq!(run.steps[undo_provision].status, StepStatus::Skipped);

    // Retry and pause are not for a run that failed to roll back; a rollback is.
    let refused = run.apply(&plan, Event::Retry { step: None }, at(201));
    assert!(matches!(refused.effects[..], [Effect::Refused(_)]));
    let t = run.apply(&plan, Event::Rollback, at(202));
    assert_eq!(run.status, RunStatus::RollingBack);
    assert_eq!(run.error, None);
    let again = only_dispatch(&t);
    assert_eq!((again.0, again.1), (undo_configure.0, 4));
    let t = answer(&mut run, &plan, again, Outcome::Success(json!({})), 203);
    let next = only_dispatch(&t);
    assert_eq!(next.0, undo_provision);
    answer(&mut run, &plan, next, Outcome::Success(json!({})), 204);
    assert_eq!(run.status, RunStatus::RolledBack);
    let refused = run.apply(&plan, Event::Rollback, at(205));
    assert!(matches!(&refused.effects[..], [Effect::Refused(r)] if r.contains("rolled_back")));
}

#[test]
fn an_operator_rolls_back_a_run_that_succeeded_but_not_one_that_runs() {
    let plan = plan(
        "name: ok\nsteps:\n  - {id: a, agent: x, action: do, compensate: {agent: x, action: undo}}\n  - {id: b, agent: x, action: do}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = run.apply(&plan, Event::Start, at(0));
    let refused = run.apply(&plan, Event::Rollback, at(1));
    assert!(matches!(&refused.effects[..], [Effect::Refused(r)] if r.contains("running")));
    let t = answer(
        &mut run,
        &plan,
        only_dispatch(&t),
        Outcome::Success(json!({})),
        1,
    );
    answer(
        &mut run,
        &plan,
        only_dispatch(&t),
        Outcome::Success(json!({})),
        2,
    );
    assert_eq!(run.status, RunStatus::Success);
    let undo = plan.node_index("a:compensate").unwrap();
    assert_eq!(
        run.steps[undo].error.as_deref(),
        Some("not run: the run was not rolled back")
    );
    // Not by hand outside a rollback either.
    let refused = run.apply(
        &plan,
        Event::Settle {
            step: undo,
            output: None,
        },
        at(3),
    );
    assert!(matches!(refused.effects[..], [Effect::Refused(_)]));

    let t = run.apply(&plan, Event::Rollback, at(4));
    assert_eq!((run.status, run.ended_at), (RunStatus::RollingBack, None));
    let task = only_dispatch(&t);
    assert_eq!(task.0, undo);
    answer(&mut run, &plan, task, Outcome::Success(json!({})), 5);
    assert_eq!(run.status, RunStatus::RolledBack);
}

#[test]
fn a_run_with_nothing_to_undo_is_refused_a_rollback() {
    let plan = plan(
        "name: ok\nsteps:\n  - {id: a, agent: x, action: do, retry: {max_attempts: 1}, compensate: {agent: x, action: undo}}\n",
    );
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = run.apply(&plan, Event::Start, at(0));
    answer(&mut run, &plan, only_dispatch(&t), fail(false), 1);
    assert_eq!(run.status, RunStatus::Failure);
    let refused = run.apply(&plan, Event::Rollback, at(2));
    assert!(
        matches!(&refused.effects[..], [Effect::Refused(r)] if r.starts_with("nothing to roll back"))
    );
}

#[test]
fn an_operator_may_skip_a_compensation_while_the_run_rolls_back() {
    let plan = plan(THREE_PHASES);
    let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
    let t = fail_phase_three(&mut run, &plan);
    let undo_configure = only_dispatch(&t);
    let t = run.apply(
        &plan,
        Event::Settle {
            step: undo_configure.0,
            output: None,
        },
        at(5),
    );
    assert!(t.effects.contains(&Effect::Cancelled {
        step: undo_configure.0,
        attempt: undo_configure.1,
        task_id: undo_configure.2
    }));
    let undo_provision = only_dispatch(&t);
    assert_eq!(plan.nodes[undo_provision.0].id, "provision:compensate");
}

/// A random workflow: each step depends on some earlier ones and may have a compensation.
fn random_saga() -> impl Strategy<Value = (Plan, u64)> {
    (2usize..8, any::<u64>()).prop_map(|(n, seed)| {
        let mut rng = seed;
        let mut next = |k: u64| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) % k
        };
        let mut yaml = String::from("name: saga\nsteps:\n");
        for i in 0..n {
            let deps: Vec<String> = (0..i).filter(|_| next(2) == 0).map(|j| format!("s{j}")).collect();
            yaml.push_str(&format!(
                "  - {{id: s{i}, agent: a, action: do, depends_on: [{}], retry: {{max_attempts: 1}}",
                deps.join(", ")
            ));
            if i == 0 || next(4) > 0 {
                yaml.push_str(", compensate: {agent: a, action: undo, retry: {max_attempts: 2, delay: 0}}");
            }
            yaml.push_str("}\n");
        }
        yaml.push_str("error_handling:\n  rollback: true\n");
        (plan(&yaml), seed)
    })
}

proptest! {
    /// Drives random runs whose steps and compensations succeed or fail at random, in random
    /// interleavings, reloading the run from its steps now and then and rolling it back again
    /// whenever its rollback failed: every step that succeeded and has a compensation is
    /// compensated exactly once, in the reverse order of the steps' completion, one at a time
    /// and only once every step has ended.
    #[test]
    fn every_succeeded_step_is_compensated_once_in_reverse_order((plan, seed) in random_saga()) {
        let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut next = |k: u64| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) % k
        };
        let mut run = RunState::new(Uuid::new_v4(), &plan, Map::new());
        let mut inflight: Vec<(usize, u32, Uuid)> = Vec::new();
        let mut completed: Vec<usize> = Vec::new();
        let mut compensated: Vec<usize> = Vec::new();
        let mut clock = 0;
        let mut t = run.apply(&plan, Event::Start, at(clock));
        for _ in 0..1_000 {
            for e in &t.effects {
                if let Effect::Dispatch { step, attempt, task_id } = e {
                    if plan.nodes[*step].role == Role::Compensation {
                        prop_assert!(inflight.is_empty(), "a compensation ran beside {:?}", inflight);
                        prop_assert!((0..plan.nodes.len()).all(|i| plan.nodes[i].role != Role::Main || run.steps[i].status.is_terminal()));
                    }
                    inflight.push((*step, *attempt, *task_id));
                }
            }
            match run.status {
                RunStatus::RollbackFailed => {
                    t = run.apply(&plan, Event::Rollback, at(clock));
                    continue;
                }
                status if status.is_terminal() => break,
                _ => {}
            }
            clock += 1;
            if next(5) == 0 {
                run = RunState::restore(run.id, &plan, run.status, run.params.clone(), run.steps.clone(), run.ended_at);
            }
            if let Some(step) = (0..run.steps.len()).find(|&i| run.steps[i].status == StepStatus::Waiting) {
                let attempt = run.steps[step].attempt;
                t = run.apply(&plan, Event::Wake { step, attempt }, at(clock));
                continue;
            }
            prop_assert!(!inflight.is_empty(), "the run is stuck: {:?}", run.status);
            let task = inflight.swap_remove(next(inflight.len() as u64) as usize);
            let compensation = plan.nodes[task.0].role == Role::Compensation;
            let outcome = match next(3) {
                0 if compensation => fail(next(2) == 0),
                0 => fail(false),
                _ => Outcome::Success(json!({})),
            };
            let success = matches!(outcome, Outcome::Success(_));
            t = answer(&mut run, &plan, task, outcome, clock);
            if success {
                if compensation {
                    compensated.push(plan.nodes[task.0].compensates.unwrap());
                } else {
                    completed.push(task.0);
                }
            }
        }
        let failed = completed.len() < plan.nodes.iter().filter(|n| n.role == Role::Main).count();
        let expected: Vec<usize> = completed
            .iter()
            .rev()
            .copied()
            .filter(|&i| failed && plan.nodes[i].compensation.is_some())
            .collect();
        prop_assert_eq!(compensated, expected);
        let end = if failed { RunStatus::RolledBack } else { RunStatus::Success };
        prop_assert_eq!(run.status, end);
        prop_assert!(run.steps.iter().all(|s| s.status.is_terminal()));
    }
}
