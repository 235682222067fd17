//! Running a subset of a definition: the steps a submission selects with `only` or leaves out
//! with `skip` (the CLI's `--only STEP` / `--skip STEP`).
//!
//! A step outside the subset never runs: it is `skipped` before the run starts, with the reason.
//! Everything else follows from how a skipped step already behaves (as after an operator's
//! skip): its dependents go on, so an `--only` step whose dependencies are left out runs at
//! once, and a template or condition that reads a left-out step sees a skipped step with no
//! output. `only` and `skip` may be given together: `skip` then leaves steps out of those
//! `only` selected. Both name plan nodes (the steps of branches and `parallel:` lists, and the
//! failure handlers, included): with `only`, a failure handler runs only when selected too.

use std::collections::HashSet;
use std::fmt;

use crate::plan::{Plan, Role};

/// The steps a submission selects (`only`; all when empty) and leaves out (`skip`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subset {
    pub only: Vec<String>,
    pub skip: Vec<String>,
}

/// Why a [`Subset`] cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubsetError {
    /// Names that are not steps of the workflow.
    #[error("{}", unknown_message(.workflow, .unknown))]
    Unknown {
        workflow: String,
        unknown: Vec<String>,
    },
    /// Every step of the workflow proper would be left out.
    #[error("the selection leaves out every step of workflow `{0}`: nothing would run")]
    Empty(String),
}

fn unknown_message(workflow: &str, unknown: &[String]) -> String {
    let names: Vec<String> = unknown.iter().map(|n| format!("`{n}`")).collect();
    let (what, verb) = if unknown.len() == 1 {
        ("step", "is not a step")
    } else {
        ("steps", "are not steps")
    };
    format!(
        "unknown {what} in the selection: {} {verb} of workflow `{workflow}`",
        names.join(", ")
    )
}

impl Subset {
    /// Whether the subset is the whole definition.
    pub fn is_empty(&self) -> bool {
        self.only.is_empty() && self.skip.is_empty()
    }

    /// Checks that every name is a step of `plan` and that something is left to run.
    pub fn check(&self, plan: &Plan) -> Result<(), SubsetError> {
        let mut seen = HashSet::new();
        let unknown: Vec<String> = self
            .only
            .iter()
            .chain(&self.skip)
            .filter(|name| {
                let step = plan.node_index(name);
                // A compensation follows its step: it is not selected by itself.
                let known = step.is_some_and(|i| plan.nodes[i].role != Role::Compensation);
                !known && seen.insert(*name)
            })
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(SubsetError::Unknown {
                workflow: plan.name.clone(),
                unknown,
            });
        }
        let runs_something = (0..plan.nodes.len())
            .any(|i| plan.nodes[i].role == Role::Main && self.left_out(plan, i).is_none());
        if runs_something {
            Ok(())
        } else {
            Err(SubsetError::Empty(plan.name.clone()))
        }
    }

    /// Why node `i` of `plan` is left out of the run, or `None` when it may run.
    pub fn left_out(&self, plan: &Plan, i: usize) -> Option<String> {
        if plan.nodes[i].role == Role::Compensation {
            return None;
        }
        let id = &plan.nodes[i].id;
        if self.skip.contains(id) {
            Some(format!("skipped: --skip {id}"))
        } else if !self.only.is_empty() && !self.only.contains(id) {
            Some(format!("not selected: --only {}", self.only.join(", ")))
        } else {
            None
        }
    }
}

impl fmt::Display for Subset {
    /// As the CLI's flags: `--only a --skip b`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags: Vec<String> = (self.only.iter().map(|s| format!("--only {s}")))
            .chain(self.skip.iter().map(|s| format!("--skip {s}")))
            .collect();
        f.write_str(&flags.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Definition;

    fn plan(yaml: &str) -> Plan {
        Plan::compile(&Definition::from_yaml(yaml).unwrap()).unwrap()
    }

    const PIPELINE: &str = "name: p\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y}\n  - {id: c, agent: x, action: y}\nerror_handling:\n  on_failure:\n    - {id: h, agent: x, action: y}\n";

    fn subset(only: &[&str], skip: &[&str]) -> Subset {
        Subset {
            only: only.iter().map(|s| s.to_string()).collect(),
            skip: skip.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn unknown_names_are_refused_by_name() {
        let plan = plan(PIPELINE);
        let err = subset(&["a", "nope"], &["zz"]).check(&plan).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown steps in the selection: `nope`, `zz` are not steps of workflow `p`"
        );
        let err = subset(&[], &["b[0]"]).check(&plan).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown step in the selection: `b[0]` is not a step of workflow `p`"
        );
    }

    #[test]
    fn a_compensation_follows_its_step_and_is_not_selected_by_itself() {
        let plan = plan(
            "name: p\nsteps:\n  - {id: a, agent: x, action: y, compensate: {agent: x, action: undo}}\n  - {id: b, agent: x, action: y}\n",
        );
        let err = subset(&["a:compensate"], &[]).check(&plan).unwrap_err();
        assert!(
            err.to_string().contains("`a:compensate` is not a step"),
            "{err}"
        );
        let only_b = subset(&["b"], &[]);
        let undo = plan.node_index("a:compensate").unwrap();
        assert_eq!(only_b.left_out(&plan, undo), None);
    }

    #[test]
    fn a_selection_that_runs_nothing_is_refused() {
        let plan = plan(PIPELINE);
        assert_eq!(
            subset(&[], &["a", "b", "c"]).check(&plan),
            Err(SubsetError::Empty("p".into()))
        );
        // Only the failure handler: no step of the workflow proper would run.
        assert_eq!(
            subset(&["h"], &[]).check(&plan),
            Err(SubsetError::Empty("p".into()))
        );
        assert_eq!(
            subset(&["a", "b"], &["a", "b"]).check(&plan),
            Err(SubsetError::Empty("p".into()))
        );
        assert_eq!(subset(&["b"], &[]).check(&plan), Ok(()));
    }

    #[test]
    fn skip_applies_inside_only_and_each_says_why() {
        let plan = plan(PIPELINE);
        let s = subset(&["a", "b"], &["b"]);
        let why: Vec<Option<String>> = (0..plan.nodes.len())
            .map(|i| s.left_out(&plan, i))
            .collect();
        assert_eq!(
            why,
            [
                None,
                Some("skipped: --skip b".into()),
                Some("not selected: --only a, b".into()),
                Some("not selected: --only a, b".into()),
            ]
        );
        assert_eq!(s.to_string(), "--only a --only b --skip b");
        assert!(Subset::default().is_empty());
        assert!((0..plan.nodes.len()).all(|i| Subset::default().left_out(&plan, i).is_none()));
    }
}
