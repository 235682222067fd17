use super::*;
use proptest::prelude::*;

fn compile(yaml: &str) -> Result<Plan, PlanError> {
    Plan::compile(&Definition::from_yaml(yaml).expect("test YAML parses"))
}

fn deps_of<'p>(plan: &'p Plan, id: &str) -> Vec<&'p str> {
    let node = &plan.nodes[plan.node_index(id).unwrap()];
    let mut ids: Vec<&str> = node
        .deps
        .iter()
        .map(|&d| plan.nodes[d].id.as_str())
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn seed_workflow_runs_as_its_declared_dag() {
    let plan = compile(include_str!("../../../../examples/workflow.yml")).unwrap();
    let ids: Vec<&str> = plan.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "scaffold",
            "build_api",
            "quality_check",
            "security_scan",
            "performance_test",
            "deploy",
            "log_error",
            "notify_slack"
        ]
    );
    assert!(deps_of(&plan, "scaffold").is_empty());
    assert_eq!(deps_of(&plan, "build_api"), ["scaffold"]);
    assert_eq!(deps_of(&plan, "quality_check"), ["build_api"]);
    assert_eq!(deps_of(&plan, "security_scan"), ["build_api"]);
    assert_eq!(
        deps_of(&plan, "deploy"),
        ["performance_test", "quality_check", "security_scan"]
    );
    let notify = &plan.nodes[plan.node_index("notify_slack").unwrap()];
    assert_eq!(
        (notify.agent.as_str(), notify.role),
        (NOTIFY_AGENT, Role::OnFailure)
    );
    assert_eq!(notify.params["channel"], "slack");
    assert_eq!(plan.nodes[0].retry.max_attempts, 3);
}

#[test]
fn steps_without_depends_on_run_as_a_pipeline() {
    let plan = compile(include_str!(
        "../../../../examples/complete-project-build.yaml"
    ))
    .unwrap();
    assert!(deps_of(&plan, "scaffold_project").is_empty());
    assert_eq!(deps_of(&plan, "create_api"), ["scaffold_project"]);
    assert_eq!(deps_of(&plan, "quality_check"), ["create_api"]);
    assert_eq!(deps_of(&plan, "security_scan"), ["create_api"]);
    assert_eq!(deps_of(&plan, "deploy"), ["quality_check", "security_scan"]);
}

#[test]
fn empty_depends_on_starts_at_once() {
    let plan = compile(
        "name: t\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y, depends_on: []}\n  - {id: c, agent: x, action: y}\n",
    )
    .unwrap();
    assert!(deps_of(&plan, "b").is_empty());
    assert_eq!(deps_of(&plan, "c"), ["b"]);
}

#[test]
fn a_cycle_is_refused_with_the_cycle_named() {
    let err = compile(
        "name: loop\nsteps:\n  - {id: a, agent: x, action: y, depends_on: [c]}\n  - {id: b, agent: x, action: y, depends_on: [a]}\n  - {id: c, agent: x, action: y, depends_on: [b]}\n",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("dependency cycle: a → b → c → a"), "{text}");
}

#[test]
fn faults_name_their_place() {
    let err = compile(
        "name: bad\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: a, agent: x, action: z}\n  - {id: c, action: y, depends_on: [nope]}\n  - {id: d, agent: x, action: y, condition: 'a.success &&'}\n  - {id: e, agent: x, action: y, depends_on: [], condition: 'c.success'}\n",
    )
    .unwrap_err();
    let text = err.to_string();
    for expected in [
        "duplicate step id `a`: steps[0] and steps[1]",
        "steps[2] (`c`): missing `agent`",
        "steps[2]: depends_on names `nope`",
        "steps[3] (`d`): condition",
        "steps[4] (`e`): condition refers to `c`",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn expect_is_a_string_or_a_list_and_bad_expectations_are_refused_by_step() {
    let plan = compile(
        "name: e\nsteps:\n  - {id: a, agent: x, action: y, expect: 'output.ok'}\n  - {id: b, agent: x, action: y, expect: ['output.n > 1', 'output.n < params.max']}\n",
    )
    .unwrap();
    let sources =
        |i: usize| -> Vec<&str> { plan.nodes[i].expect.iter().map(|c| c.source()).collect() };
    assert_eq!(sources(0), ["output.ok"]);
    assert_eq!(sources(1), ["output.n > 1", "output.n < params.max"]);

    let err = compile(
        "name: e\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y, expect: ['output.ok', 'output.n >']}\n  - {id: c, agent: x, action: y, expect: 'a.success'}\n  - {condition: 'true', expect: output.ok, then: [{agent: x, action: z}]}\n",
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "steps[1] (`b`): expect[1] ",
        "steps[2] (`c`): expect[0] reads `a`",
        "steps[3]: a branch (with then/else) runs no action itself and cannot have `expect`",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("expect[0] reads `output`"), "{err}");
    let err =
        crate::Definition::from_yaml("name: e\nsteps:\n  - {agent: x, action: y, expect: 3}\n")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("expect must be a string or a list of strings"),
        "{err}"
    );
}

#[test]
fn notify_is_only_for_failure_handlers() {
    let err = compile("name: n\nsteps:\n  - {notify: slack}\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("only allowed in error_handling.on_failure")
    );
}

#[test]
fn conditions_may_read_ancestors_and_params() {
    compile(
        "name: c\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: y, condition: 'a.success && params.go'}\n",
    )
    .unwrap();
}

/// A random workflow: step i may depend on any earlier steps, or on none (then the implicit
/// edge applies), and may carry parallel sub-steps.
fn dag_yaml() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::collection::vec(any::<prop::sample::Index>(), 0..3),
            any::<bool>(),
            0usize..3,
        ),
        1..25,
    )
    .prop_map(|steps| {
        let mut yaml = String::from("name: random\nsteps:\n");
        for (i, (picks, explicit, subs)) in steps.iter().enumerate() {
            yaml += &format!("  - id: s{i}\n    agent: a\n    action: b\n");
            if *explicit && i > 0 {
                let deps: Vec<String> = picks.iter().map(|p| format!("s{}", p.index(i))).collect();
                yaml += &format!("    depends_on: [{}]\n", deps.join(", "));
            }
            if *subs > 0 {
                yaml += "    parallel:\n";
                for j in 0..*subs {
                    yaml += &format!("      - {{id: s{i}_p{j}, agent: a, action: b}}\n");
                }
            }
        }
        yaml
    })
}

proptest! {
    #[test]
    fn forward_only_dependencies_always_compile(yaml in dag_yaml()) {
        let plan = compile(&yaml).unwrap();
        for (i, node) in plan.nodes.iter().enumerate() {
            for &d in &node.deps {
                prop_assert!(d < i, "{} depends on later node {}", node.id, plan.nodes[d].id);
                prop_assert!(plan.nodes[d].dependents.contains(&i));
            }
        }
    }

    #[test]
    fn a_back_edge_is_always_reported_as_a_real_cycle(yaml in dag_yaml(), back in any::<prop::sample::Index>()) {
        let def = Definition::from_yaml(&yaml).unwrap();
        let n = def.steps.len();
        prop_assume!(n >= 2);
        let mut def = def;
        let from = back.index(n - 1);
        // The first step now waits for the last one, which (transitively) waits for it.
        def.steps[from].depends_on = Some(vec![format!("s{}", n - 1)]);
        let last = n - 1;
        def.steps[last].depends_on = Some(vec![format!("s{from}")]);
        let err = Plan::compile(&def).unwrap_err();
        let line = err.problems.iter().find(|p| p.starts_with("dependency cycle: ")).expect("cycle reported");
        let ids: Vec<&str> = line.trim_start_matches("dependency cycle: ").split(" → ").collect();
        prop_assert_eq!(ids.first(), ids.last());
        // Each consecutive pair is a real edge: the later step depends on the earlier one, where a
        // dependency on a step also covers its parallel sub-steps.
        let plan_deps = |id: &str| -> Vec<String> {
            let idx = def.steps.iter().position(|s| s.id.as_deref() == Some(id));
            match idx {
                Some(i) => def.steps[i].depends_on.clone().unwrap_or_else(|| if i > 0 { vec![format!("s{}", i - 1)] } else { vec![] }),
                // A sub-step `sN_pJ` starts with its step `sN`.
                None => plan_deps_of_parent(&def, id),
            }
        };
        for pair in ids.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            prop_assert!(
                plan_deps(after).iter().any(|d| d == before || before.starts_with(&format!("{d}_p"))),
                "{} does not depend on {}", after, before
            );
        }
    }
}

fn plan_deps_of_parent(def: &Definition, sub_id: &str) -> Vec<String> {
    let parent = sub_id.split("_p").next().unwrap_or_default();
    let i = def
        .steps
        .iter()
        .position(|s| s.id.as_deref() == Some(parent))
        .expect("sub-step has a parent");
    def.steps[i].depends_on.clone().unwrap_or_else(|| {
        if i > 0 {
            vec![format!("s{}", i - 1)]
        } else {
            vec![]
        }
    })
}

const MONITORING: &str = "name: Continuous Monitoring\nsteps:\n  - agent: agent8\n    action: collect_metrics\n  - agent: agent9\n    action: track_errors\n  - condition: \"error_rate > 0.05\"\n    then:\n      - agent: agent19\n        action: rollback\n    else:\n      - {agent: agent9, action: all_clear}\n      - {agent: agent9, action: report}\n  - {agent: agent8, action: archive}\n";

#[test]
fn a_branch_guards_each_of_its_steps_and_later_steps_wait_for_the_whole_branch() {
    let plan = compile(MONITORING).unwrap();
    let cond = |id: &str| {
        plan.nodes[plan.node_index(id).unwrap()]
            .condition
            .as_ref()
            .map(|c| c.source().to_string())
    };
    assert_eq!(deps_of(&plan, "rollback"), ["track_errors"]);
    assert_eq!(deps_of(&plan, "all_clear"), ["track_errors"]);
    assert_eq!(deps_of(&plan, "report"), ["all_clear"]);
    assert_eq!(
        deps_of(&plan, "archive"),
        ["all_clear", "report", "rollback"]
    );
    assert_eq!(cond("rollback").as_deref(), Some("(error_rate > 0.05)"));
    assert_eq!(cond("report").as_deref(), Some("!(error_rate > 0.05)"));
}

#[test]
fn a_branch_needs_a_condition_and_runs_nothing_itself() {
    let err =
        compile("name: b\nsteps:\n  - {agent: x, action: y, then: [{agent: x, action: z}]}\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("`then`/`else` need a `condition`"), "{err}");
    let err = compile(
        "name: b\nsteps:\n  - {condition: 'true', agent: x, then: [{agent: x, action: z}]}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cannot have `agent`"), "{err}");
}

#[test]
fn every_example_compiles() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let def =
                Definition::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            Plan::compile(&def).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 4, "only {seen} examples found");
}

#[test]
fn for_each_is_checked_when_compiled() {
    let ok = compile(
        "name: f\nsteps:\n  - {id: list, agent: a, action: ls}\n  - id: each\n    agent: a\n    action: work\n    for_each: \"${{ steps.list.output.files }}\"\n    max_parallel: 4\n    params: {file: \"${{ item }}\", n: \"${{ index }}\"}\n",
    )
    .unwrap();
    let each = &ok.nodes[ok.node_index("each").unwrap()];
    assert_eq!(
        each.for_each,
        Some(ForEach {
            items: "${{ steps.list.output.files }}".into(),
            reads: vec![0],
            max_parallel: 4
        })
    );
    assert_eq!(each.template_steps, Some(vec![]), "the params read no step");

    let err = compile(
        "name: f\nsteps:\n  - {id: late, agent: a, action: x, for_each: \"${{ steps.after.output }}\"}\n  - {id: after, agent: a, action: y}\n  - {id: zero, agent: a, action: x, for_each: \"${{ params.items }}\", max_parallel: 0}\n  - {id: bare, agent: a, action: x, for_each: \"params.items\"}\n  - {id: alone, agent: a, action: x, max_parallel: 2}\n  - {id: noloop, agent: a, action: x, params: {v: \"${{ item }}\"}}\n  - {id: odd, agent: a, action: x, for_each: \"${{ item }}\"}\nerror_handling:\n  on_failure:\n    - {notify: slack, for_each: \"${{ params.items }}\"}\n",
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "steps[0] (`late`): params or for_each read `steps.after`",
        "steps[2] (`zero`): `max_parallel` must be at least 1",
        "steps[3] (`bare`): for_each must be one `${{ … }}` template",
        "steps[4] (`alone`): `max_parallel` needs `for_each`",
        "steps[5] (`noloop`): params: template `item` reads `item`, which only the params of a `for_each` step may read",
        "steps[6] (`odd`): for_each: template `item` reads `item`",
        "error_handling.on_failure[0] (`notify_slack`): `for_each` is only allowed on an agent step",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn a_branch_cannot_loop() {
    let err = compile(
        "name: f\nsteps:\n  - condition: \"params.x\"\n    for_each: \"${{ params.items }}\"\n    then: [{agent: a, action: b}]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cannot have `for_each`"), "{err}");
}

#[test]
fn heartbeat_timeout_is_compiled_and_bounded() {
    let plan = compile(
        "name: h\nsteps:\n  - {id: long, agent: x, action: y, heartbeat_timeout: 3s}\n  - {id: plain, agent: x, action: y}\n",
    )
    .unwrap();
    assert_eq!(
        plan.nodes[0].heartbeat_timeout,
        Some(std::time::Duration::from_secs(3))
    );
    assert_eq!(plan.nodes[1].heartbeat_timeout, None);
    assert!(
        plan.nodes[0].acks_early(false),
        "no timeout: it may run for ever"
    );
    assert!(!plan.nodes[1].acks_early(false), "no lease of its own");
    let bounded = compile(
        "name: h\nsteps:\n  - {id: short, agent: x, action: y, heartbeat_timeout: 3s, timeout: 15m}\n  - {id: long, agent: x, action: y, heartbeat_timeout: 3s, timeout: 16m}\n",
    )
    .unwrap();
    assert!(!bounded.nodes[0].acks_early(false));
    assert!(bounded.nodes[1].acks_early(false));
    let err = compile(
        "name: h\nsteps:\n  - {id: fast, agent: x, action: y, heartbeat_timeout: 500ms}\n  - {id: slow, agent: x, action: y, heartbeat_timeout: 25h}\n",
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "steps[0] (`fast`): heartbeat_timeout 500ms must be between 1s and 24h",
        "steps[1] (`slow`): heartbeat_timeout 90000s must be between 1s and 24h",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn a_workflow_step_names_its_definition_instead_of_an_agent() {
    let plan = compile(
        "name: p\nsteps:\n  - {workflow: deploy, version: 3, params: {service: \"${{ params.s }}\"}}\n  - {id: check, agent: a, action: b, params: {v: \"${{ steps.deploy.output }}\"}}\n",
    )
    .unwrap();
    let deploy = &plan.nodes[0];
    assert_eq!(deploy.id, "deploy", "the id defaults to the name");
    assert_eq!(
        deploy.workflow,
        Some(SubWorkflow {
            name: "deploy".into(),
            version: Some("3".into()),
        })
    );
    assert!(deploy.agent.is_empty() && deploy.action.is_empty());
    assert_eq!(deploy.sub_workflow(false), deploy.workflow.as_ref());
    assert_eq!(deploy.sub_workflow(true), None, "a fallback calls an agent");
    let refs: Vec<(&str, &str)> = plan
        .sub_workflows()
        .map(|(step, w)| (step, w.name.as_str()))
        .collect();
    assert_eq!(refs, [("deploy", "deploy")]);
    assert_eq!(deps_of(&plan, "check"), ["deploy"]);
}

#[test]
fn a_step_runs_an_agent_or_a_workflow_never_both() {
    let err = compile(
        "name: p\nsteps:\n  - {id: d, workflow: w, agent: a, action: b}\n  - {id: e, agent: a, action: b, version: 2}\n  - {id: f, workflow: w, heartbeat_timeout: 10s}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("steps[0] (`d`): a step runs either an agent (`agent`, `action`, `notify`) or a workflow (`workflow`), never both"),
        "{err}"
    );
    assert!(
        err.contains("steps[1]: `version` needs `workflow`"),
        "{err}"
    );
    assert!(
        err.contains("steps[2] (`f`): `heartbeat_timeout` is for agent steps"),
        "{err}"
    );
    assert!(!err.contains("missing `agent`"), "{err}");
}

#[test]
fn schedule_to_start_is_compiled_and_bounded() {
    let plan = compile(
        "name: s\nsteps:\n  - {id: waits, agent: x, action: y, schedule_to_start: 30s}\n  - {id: plain, agent: x, action: y}\n",
    )
    .unwrap();
    assert_eq!(
        plan.nodes[0].schedule_to_start,
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(plan.nodes[1].schedule_to_start, None);
    let err = compile(
        "name: s\nsteps:\n  - {id: fast, agent: x, action: y, schedule_to_start: 10ms}\n  - {id: slow, agent: x, action: y, schedule_to_start: 48h}\n",
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "steps[0] (`fast`): schedule_to_start 10ms must be between 1s and 24h",
        "steps[1] (`slow`): schedule_to_start 172800s must be between 1s and 24h",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn a_compensation_is_a_node_after_the_others_named_after_its_step() {
    let plan = compile(
        "name: s\nsteps:\n  - {id: a, agent: x, action: do, retry: {max_attempts: 5}, timeout: 9s, compensate: {agent: y, action: undo, timeout: 2s}}\n  - {id: b, agent: x, action: do}\nerror_handling:\n  retry: {max_attempts: 2}\n  rollback: true\n  on_failure:\n    - {id: h, agent: x, action: log}\n",
    )
    .unwrap();
    let ids: Vec<&str> = plan.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "h", "a:compensate"]);
    assert!(plan.rollback);
    let undo = &plan.nodes[3];
    assert_eq!(
        (undo.agent.as_str(), undo.action.as_str(), undo.role),
        ("y", "undo", Role::Compensation)
    );
    assert_eq!(
        (undo.compensates, plan.nodes[0].compensation),
        (Some(0), Some(3))
    );
    assert!(undo.deps.is_empty() && plan.nodes[0].dependents == [1]);
    // Its own policy over the workflow's, not the step's.
    assert_eq!(undo.retry.max_attempts, 2);
    assert_eq!(undo.timeout, Some(std::time::Duration::from_secs(2)));
}

#[test]
fn compensations_are_checked_when_compiled() {
    let err = compile(
        "name: s\nsteps:\n  - {id: a, agent: x, action: do, compensate: {agent: y, params: {v: '${{ steps.b.output }}'}}}\n  - id: b\n    agent: x\n    action: do\n  - condition: 'true'\n    compensate: {agent: y, action: undo}\n    then: [{agent: x, action: t}]\nerror_handling:\n  on_failure:\n    - {id: h, agent: x, action: log, compensate: {agent: y, action: undo}}\n",
    )
    .unwrap_err();
    let text = err.to_string();
    for fault in [
        "steps[0] (`a`).compensate: missing `action`",
        "steps[0] (`a`).compensate: params read `steps.b`, which is neither this step nor one that finishes before it",
        "steps[2]: a branch (with then/else) runs no action itself and cannot have `compensate`",
        "error_handling.on_failure[0]: `compensate` is not allowed in a failure handler",
    ] {
        assert!(text.contains(fault), "{fault} not in {text}");
    }
    let err =
        compile("name: s\nsteps:\n  - {agent: x, action: do}\nerror_handling:\n  rollback: true\n")
            .unwrap_err();
    assert!(
        err.to_string().contains("no step has a `compensate:`"),
        "{err}"
    );
    // A compensation may read its own step.
    compile("name: s\nsteps:\n  - {id: a, agent: x, action: do, compensate: {agent: y, action: undo, params: {v: '${{ steps.a.output.id }}'}}}\n")
        .unwrap();
}

#[test]
fn secrets_are_read_only_in_step_params() {
    let yaml = r#"
name: s
steps:
  - {id: a, agent: x, action: y, params: {token: "${{ secrets.TOKEN }}"}}
  - {id: b, agent: x, action: y, condition: "secrets.TOKEN == 'x'"}
  - {id: c, agent: x, action: y, expect: "output.k == secrets.TOKEN"}
  - {id: d, agent: x, action: y, for_each: "${{ secrets.LIST }}"}
"#;
    let problems = compile(yaml).unwrap_err().problems;
    assert_eq!(problems.len(), 3, "{problems:?}");
    for (id, what) in [
        ("b", "condition reads `secrets`"),
        ("c", "expect[0] reads `secrets`"),
        (
            "d",
            "reads a secret; secrets may be read only in step params",
        ),
    ] {
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("`{id}`")) && p.contains(what)),
            "{id}: {problems:?}"
        );
    }
}
