//! Plans and reports: what a definition will do before it runs (stages of steps that can run
//! together), and what a run did after (the critical path, how parallel it was).

use chrono::{DateTime, Utc};

use crate::plan::{Plan, Role};
use crate::subset::Subset;

impl Plan {
    /// The main steps in stages: each stage holds the steps whose dependencies all lie in
    /// earlier stages, so the steps of one stage can run at the same time. Failure handlers are
    /// not part of any stage.
    pub fn stages(&self) -> Vec<Vec<usize>> {
        self.stages_of(&Subset::default())
    }

    /// [`Plan::stages`] of a run of `subset`: the steps it leaves out are in no stage, and a
    /// step does not wait for them (they are skipped before the run starts).
    pub fn stages_of(&self, subset: &Subset) -> Vec<Vec<usize>> {
        let left_out: Vec<bool> = (0..self.nodes.len())
            .map(|i| subset.left_out(self, i).is_some())
            .collect();
        let mut level = vec![usize::MAX; self.nodes.len()];
        // Nodes are not stored in topological order (a step may depend on a later one), so
        // settle levels by repeated passes; a valid plan has no cycle, so this ends.
        let mut changed = true;
        while changed {
            changed = false;
            for (i, node) in self.nodes.iter().enumerate() {
                if node.role != Role::Main || left_out[i] || level[i] != usize::MAX {
                    continue;
                }
                let deps: Option<Vec<usize>> = node
                    .deps
                    .iter()
                    .filter(|&&d| !left_out[d])
                    .map(|&d| (level[d] != usize::MAX).then_some(level[d]))
                    .collect();
                if let Some(deps) = deps {
                    level[i] = deps.into_iter().max().map_or(0, |l| l + 1);
                    changed = true;
                }
            }
        }
        let depth = level
            .iter()
            .filter(|&&l| l != usize::MAX)
            .max()
            .map_or(0, |l| l + 1);
        let mut stages = vec![Vec::new(); depth];
        for (i, &l) in level.iter().enumerate() {
            if l != usize::MAX {
                stages[l].push(i);
            }
        }
        stages
    }
}

/// When a step ran, for a report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// The chain of steps that decided the run's length: from the step that ended last, back through
/// the dependency that ended last each time. Steps that did not run are absent from `spans`.
pub fn critical_path(plan: &Plan, spans: &[Option<Span>]) -> Vec<usize> {
    let ended = |i: usize| spans.get(i).copied().flatten().map(|s| s.end);
    let Some(mut current) = (0..plan.nodes.len())
        .filter(|&i| plan.nodes[i].role == Role::Main)
        .filter(|&i| ended(i).is_some())
        .max_by_key(|&i| ended(i))
    else {
        return Vec::new();
    };
    let mut path = vec![current];
    while let Some(previous) = plan.nodes[current]
        .deps
        .iter()
        .copied()
        .filter(|&d| ended(d).is_some())
        .max_by_key(|&d| ended(d))
    {
        path.push(previous);
        current = previous;
    }
    path.reverse();
    path
}

/// How parallel a run was: the summed time of its steps over the time from the first start to
/// the last end (1.0 for a pipeline; up to the number of steps for a fan-out).
pub fn parallelism(spans: &[Option<Span>]) -> f64 {
    let ran: Vec<Span> = spans.iter().flatten().copied().collect();
    let (Some(first), Some(last)) = (
        ran.iter().map(|s| s.start).min(),
        ran.iter().map(|s| s.end).max(),
    ) else {
        return 0.0;
    };
    let wall = (last - first).num_microseconds().unwrap_or(i64::MAX) as f64;
    if wall <= 0.0 {
        return 0.0;
    }
    let busy: f64 = ran
        .iter()
        .map(|s| (s.end - s.start).num_microseconds().unwrap_or(0) as f64)
        .sum();
    busy / wall
}

/// When one attempt of a step was dispatched, started and finished (as its worker reported).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttemptTimes {
    pub dispatched: DateTime<Utc>,
    pub started: Option<DateTime<Utc>>,
    pub finished: Option<DateTime<Utc>>,
}

/// How long a step's attempts waited in their queue (dispatch to start) and ran (start to
/// finish), summed over its attempts. An attempt that has not started or finished adds nothing
/// to what it has not reached.
pub fn step_times(attempts: &[AttemptTimes]) -> (chrono::Duration, chrono::Duration) {
    let mut queued = chrono::Duration::zero();
    let mut ran = chrono::Duration::zero();
    for a in attempts {
        if let Some(started) = a.started {
            queued += (started - a.dispatched).max(chrono::Duration::zero());
            if let Some(finished) = a.finished {
                ran += (finished - started).max(chrono::Duration::zero());
            }
        }
    }
    (queued, ran)
}

/// From the first start to the last finish of the attempts that started: the time a group of
/// attempts (the instances of a `for_each` step) spans; zero when none finished.
pub fn span_of(attempts: &[AttemptTimes]) -> chrono::Duration {
    let first = attempts.iter().filter_map(|a| a.started).min();
    let last = attempts
        .iter()
        .filter(|a| a.started.is_some())
        .filter_map(|a| a.finished)
        .max();
    match (first, last) {
        (Some(first), Some(last)) => (last - first).max(chrono::Duration::zero()),
        _ => chrono::Duration::zero(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Definition;

    fn plan(yaml: &str) -> Plan {
        Plan::compile(&Definition::from_yaml(yaml).unwrap()).unwrap()
    }

    fn ids(plan: &Plan, nodes: &[usize]) -> Vec<String> {
        nodes.iter().map(|&i| plan.nodes[i].id.clone()).collect()
    }

    #[test]
    fn the_seed_workflow_runs_in_four_stages() {
        let plan = plan(include_str!("../../../examples/workflow.yml"));
        let stages: Vec<Vec<String>> = plan.stages().iter().map(|s| ids(&plan, s)).collect();
        assert_eq!(
            stages,
            [
                vec!["scaffold"],
                vec!["build_api"],
                vec!["quality_check", "security_scan", "performance_test"],
                vec!["deploy"],
            ]
        );
    }

    #[test]
    fn stages_follow_dependencies_declared_out_of_order() {
        let plan = plan(
            "name: o\nsteps:\n  - {id: late, agent: x, action: y, depends_on: [early]}\n  - {id: early, agent: x, action: y, depends_on: []}\n",
        );
        let stages: Vec<Vec<String>> = plan.stages().iter().map(|s| ids(&plan, s)).collect();
        assert_eq!(stages, [vec!["early"], vec!["late"]]);
    }

    #[test]
    fn the_stages_of_a_subset_leave_steps_out_and_do_not_wait_for_them() {
        let plan = plan(include_str!("../../../examples/workflow.yml"));
        let subset = Subset {
            only: vec!["scaffold".into(), "security_scan".into(), "deploy".into()],
            skip: vec!["deploy".into()],
        };
        let stages: Vec<Vec<String>> = plan
            .stages_of(&subset)
            .iter()
            .map(|s| ids(&plan, s))
            .collect();
        // security_scan's dependency (build_api) is left out, so it starts with scaffold.
        assert_eq!(stages, [vec!["scaffold", "security_scan"]]);
    }

    #[test]
    fn the_critical_path_follows_the_latest_dependency() {
        let plan = plan(
            "name: c\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: quick, agent: x, action: y, depends_on: [a]}\n  - {id: slow, agent: x, action: y, depends_on: [a]}\n  - {id: end, agent: x, action: y, depends_on: [quick, slow]}\n",
        );
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let span = |a, b| {
            Some(Span {
                start: t(a),
                end: t(b),
            })
        };
        let spans = [span(0, 1), span(1, 2), span(1, 5), span(5, 6)];
        assert_eq!(
            ids(&plan, &critical_path(&plan, &spans)),
            ["a", "slow", "end"]
        );
        // 1 + 1 + 4 + 1 seconds of work over 6 seconds.
        assert!((parallelism(&spans) - 7.0 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn step_times_sum_the_queue_wait_and_run_time_of_every_attempt() {
        let t = |ms: i64| DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap();
        let attempts = [
            // Waited 100 ms, ran 400 ms, failed.
            AttemptTimes {
                dispatched: t(0),
                started: Some(t(100)),
                finished: Some(t(500)),
            },
            // Retried: waited 50 ms, ran 200 ms.
            AttemptTimes {
                dispatched: t(1_000),
                started: Some(t(1_050)),
                finished: Some(t(1_250)),
            },
            // Lost before it started: counts for neither.
            AttemptTimes {
                dispatched: t(2_000),
                started: None,
                finished: None,
            },
        ];
        let (queued, ran) = step_times(&attempts);
        assert_eq!(
            (queued.num_milliseconds(), ran.num_milliseconds()),
            (150, 600)
        );
        // As instances of one step: from the first start to the last finish.
        assert_eq!(span_of(&attempts).num_milliseconds(), 1_150);
        assert_eq!(span_of(&attempts[2..]), chrono::Duration::zero());
        assert_eq!(
            step_times(&[]),
            (chrono::Duration::zero(), chrono::Duration::zero())
        );
    }
}
