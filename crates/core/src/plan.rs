//! Validation, and compilation of a [`Definition`] into a [`Plan`]: a DAG of nodes, each one
//! agent/action call with its resolved dependencies, condition and retry policy.
//!
//! Ordering rules:
//! - steps run in the order listed: each depends on the step before it, unless it says
//!   `depends_on`, which replaces that implicit edge (`depends_on: []` starts it at once);
//! - `parallel:` sub-steps start together with their step, and a dependency on the step waits for
//!   the step and all of its sub-steps;
//! - `error_handling.on_failure` steps start together when the run has failed;
//! - a step's `compensate:` is a node of its own (role [`Role::Compensation`], after every other
//!   node) with no dependencies: only a rollback starts it (see [`crate::scheduler`]).

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_json::{Map, Value};

use crate::condition::{self, Condition};
use crate::definition::{CallDef, Definition, Priority, RetrySpec, StepDef};
use crate::labels::Labels;
use crate::retry::RetryPolicy;

/// The agent that delivers `notify:` messages; the coordinator serves it itself.
pub const NOTIFY_AGENT: &str = "flotilla-notify";
/// The action of [`NOTIFY_AGENT`].
pub const NOTIFY_ACTION: &str = "notify";
/// Appended to a step's id in the task that notifies a step's escalation, so that its result is
/// told apart from the step's own (a step id never holds `:`).
pub const ESCALATION_SUFFIX: &str = ":escalation";
/// Appended to a step's id to name the node of its `compensate:` (a step id never holds `:`).
pub const COMPENSATION_SUFFIX: &str = ":compensate";
/// The most nodes a plan may have.
pub const MAX_NODES: usize = 100_000;

/// What a node is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A step of the workflow proper.
    Main,
    /// A failure handler from `error_handling.on_failure`.
    OnFailure,
    /// A step's `compensate:`, run only by a rollback of its run.
    Compensation,
}

/// One agent/action call, or one sub-workflow, in a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: String,
    /// Empty for a sub-workflow step (see [`Node::workflow`]).
    pub agent: String,
    pub action: String,
    /// A sub-workflow step: its attempts start a run of this registered definition instead of
    /// sending a task to an agent (its fallback, if any, calls an agent as usual).
    pub workflow: Option<SubWorkflow>,
    pub params: Map<String, Value>,
    /// Nodes that must have finished before this one starts.
    pub deps: Vec<usize>,
    /// Nodes that list this one in `deps`.
    pub dependents: Vec<usize>,
    pub condition: Option<Condition>,
    /// What a result claiming success must meet to count as one (see
    /// [`crate::condition::check_expectations`]).
    pub expect: Vec<Condition>,
    /// When `params` hold `${{ … }}` templates: the steps they read (resolved when the step
    /// becomes ready; see [`crate::template`]).
    pub template_steps: Option<Vec<usize>>,
    pub retry: RetryPolicy,
    /// How long one attempt may take.
    pub timeout: Option<std::time::Duration>,
    /// How long the attempt's worker may go without a heartbeat (the attempt's lease).
    pub heartbeat_timeout: Option<std::time::Duration>,
    /// How long a dispatched attempt may wait for a worker to start it.
    pub schedule_to_start: Option<std::time::Duration>,
    /// The labels a worker must have to run the step's own attempts (not its fallback's).
    pub labels: Labels,
    pub role: Role,
    /// The step whose `parallel:` list holds this node.
    pub parent: Option<usize>,
    /// Strike 2: the alternative that runs once the retries are exhausted.
    pub fallback: Option<Fallback>,
    /// Strike 3: the notify channel told when the step needs a person.
    pub escalate: Option<String>,
    /// Runs one instance per item of a list (see [`ForEach`]).
    pub for_each: Option<ForEach>,
    /// The node of this step's `compensate:`.
    pub compensation: Option<usize>,
    /// For a [`Role::Compensation`] node: the step it undoes.
    pub compensates: Option<usize>,
}

/// The registered definition a sub-workflow step runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubWorkflow {
    pub name: String,
    /// A revision number or `version:`; the latest revision at dispatch when `None`.
    pub version: Option<String>,
}

/// A `for_each:` fan-out: the list's template and how many instances may run at once.
#[derive(Debug, Clone, PartialEq)]
pub struct ForEach {
    /// A `${{ … }}` template over `params` and `steps` that gives the list.
    pub items: String,
    /// The steps `items` reads.
    pub reads: Vec<usize>,
    pub max_parallel: usize,
}

/// A step's `fallback:`, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    pub agent: String,
    pub action: String,
    pub params: Map<String, Value>,
    /// As [`Node::template_steps`], for the fallback's params.
    pub template_steps: Option<Vec<usize>>,
    pub retry: RetryPolicy,
    pub timeout: Option<std::time::Duration>,
}

impl Node {
    /// The agent and action an attempt calls: the step's own, or its fallback's.
    pub fn target(&self, fallback: bool) -> (&str, &str) {
        match (&self.fallback, fallback) {
            (Some(f), true) => (&f.agent, &f.action),
            _ => (&self.agent, &self.action),
        }
    }

    /// The labels the worker of an attempt must have: the step's, unless the attempt calls its
    /// fallback, which any worker of its agent may run.
    pub fn labels(&self, fallback: bool) -> Option<&Labels> {
        (!fallback && !self.labels.is_empty()).then_some(&self.labels)
    }

    /// The sub-workflow an attempt starts: the step's, unless the attempt calls its fallback.
    pub fn sub_workflow(&self, fallback: bool) -> Option<&SubWorkflow> {
        self.workflow.as_ref().filter(|_| !fallback)
    }

    /// How long one attempt may take.
    pub fn attempt_timeout(&self, fallback: bool) -> Option<std::time::Duration> {
        match (&self.fallback, fallback) {
            (Some(f), true) => f.timeout,
            _ => self.timeout,
        }
    }

    /// The retry policy of the step's own attempts, or of its fallback's.
    /// Whether the worker acks an attempt's task once started rather than at its end: when the
    /// step has a lease of its own to detect the worker's loss and its attempt may run longer
    /// than [`ACK_EARLY_AFTER`] (half RabbitMQ's default consumer timeout).
    pub fn acks_early(&self, fallback: bool) -> bool {
        self.heartbeat_timeout.is_some()
            && self
                .attempt_timeout(fallback)
                .is_none_or(|timeout| timeout > ACK_EARLY_AFTER)
    }

    pub fn retry_policy(&self, fallback: bool) -> &RetryPolicy {
        match (&self.fallback, fallback) {
            (Some(f), true) => &f.retry,
            _ => &self.retry,
        }
    }

    /// The params an attempt carries before templates are rendered, and the steps they read.
    pub fn call_params(&self, fallback: bool) -> (&Map<String, Value>, Option<&[usize]>) {
        match (&self.fallback, fallback) {
            (Some(f), true) => (&f.params, f.template_steps.as_deref()),
            _ => (&self.params, self.template_steps.as_deref()),
        }
    }
}

/// A compiled, valid workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub name: String,
    pub version: Option<String>,
    /// Default run params.
    pub params: Map<String, Value>,
    /// How long a run may take (the definition's `timeout`).
    pub timeout: Option<std::time::Duration>,
    pub nodes: Vec<Node>,
    /// Whether a failed run is rolled back (`error_handling.rollback`).
    pub rollback: bool,
    /// The priority of its runs unless their submission says otherwise.
    pub priority: Priority,
    /// Node index by id; results name their step by id, and a plan may have many nodes.
    index: HashMap<String, usize>,
    /// Every agent its steps and their fallbacks call, sorted, each once: asked for on every
    /// batch that touches a run (its breakers are locked), so computed once, not per node.
    agents: Vec<String>,
}

/// Why a definition is not a valid workflow: every fault found, each naming its place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PlanError {
    pub workflow: String,
    pub problems: Vec<String>,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workflow `{}` is not valid:", self.workflow)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// A node being built, with where it came from in the definition.
struct Draft<'d> {
    place: String,
    def: &'d StepDef,
    role: Role,
    parent: Option<usize>,
    /// The top-level entry (index in `steps`) this node belongs to.
    entry: Option<usize>,
    /// Within a `then:` or `else:` list: the node it runs after. Nodes without it take their
    /// entry's dependencies.
    follows: Option<usize>,
    /// The condition of the branch this node is in (negated in `else:`).
    branch: Option<String>,
}

impl Plan {
    /// Validates a definition and compiles it.
    pub fn compile(def: &Definition) -> Result<Plan, PlanError> {
        let mut problems = Vec::new();
        if def.name.trim().is_empty() {
            problems.push("`name` is empty".to_string());
        }
        if let Some(spec) = &def.schedule
            && let Err(e) = crate::schedule::Schedule::from_spec(spec)
        {
            problems.push(e);
        }
        if def.steps.is_empty() {
            problems.push("`steps` is empty: a workflow needs at least one step".to_string());
        }

        let drafts = flatten(def, &mut problems);
        if drafts.len() > MAX_NODES {
            problems.push(format!(
                "the workflow has {} steps; at most {MAX_NODES} are allowed",
                drafts.len()
            ));
            return Err(PlanError {
                workflow: def.name.clone(),
                problems,
            });
        }

        let workflow_retry = def.error_handling.as_ref().and_then(|e| e.retry.as_ref());
        let mut nodes: Vec<Node> = drafts
            .iter()
            .map(|d| build_node(d, workflow_retry, &mut problems))
            .collect();

        let mut index = index_ids(&drafts, &nodes, &mut problems);
        let rollback = def.error_handling.as_ref().is_some_and(|e| e.rollback);
        compensations(
            &drafts,
            &mut nodes,
            &mut index,
            workflow_retry,
            &mut problems,
        );
        if rollback && !nodes.iter().any(|n| n.role == Role::Compensation) {
            problems.push(
                "error_handling.rollback: no step has a `compensate:`, so there is nothing to roll back".into(),
            );
        }
        // Members of each top-level entry: a step and its parallel sub-steps, or the steps of a
        // branch. A dependency on an entry waits for all of them.
        let mut members: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, d) in drafts.iter().enumerate() {
            if let (Some(entry), Role::Main) = (d.entry, d.role) {
                members.entry(entry).or_default().push(i);
            }
        }
        // Names a `depends_on` may use for a whole entry: a step's id, or a branch's own `id`.
        let mut entry_names: HashMap<String, usize> = HashMap::new();
        for (e, step) in def.steps.iter().enumerate() {
            if let Some(&first) = members.get(&e).and_then(|m| m.first()) {
                let name = if drafts[first].branch.is_none() {
                    Some(nodes[first].id.clone())
                } else {
                    step.id.clone()
                };
                if let Some(name) = name {
                    entry_names.insert(name, e);
                }
            }
        }
        let entries: Vec<usize> = (0..def.steps.len())
            .filter(|e| members.contains_key(e))
            .collect();
        for (position, &e) in entries.iter().enumerate() {
            let place = format!("steps[{e}]");
            let deps: Vec<usize> = match &def.steps[e].depends_on {
                Some(names) => {
                    let mut deps = Vec::new();
                    for name in names {
                        if let Some(target) = entry_names.get(name.as_str()) {
                            deps.extend(&members[target]);
                        } else if let Some(&node) =
                            index.get(name).filter(|&&n| drafts[n].role == Role::Main)
                        {
                            deps.push(node);
                        } else {
                            problems.push(format!(
                                "{place}: depends_on names `{name}`, which is not a step of this workflow"
                            ));
                        }
                    }
                    deps
                }
                None if position > 0 => members[&entries[position - 1]].clone(),
                None => Vec::new(),
            };
            for &member in &members[&e] {
                nodes[member].deps = match drafts[member].follows {
                    Some(previous) => vec![previous],
                    None => dedup(deps.clone()),
                };
            }
        }
        for i in 0..nodes.len() {
            for d in nodes[i].deps.clone() {
                nodes[d].dependents.push(i);
            }
        }

        if let Some(cycle) = find_cycle(&nodes) {
            let names: Vec<&str> = cycle.iter().map(|&i| nodes[i].id.as_str()).collect();
            problems.push(format!("dependency cycle: {}", names.join(" → ")));
        } else {
            check_condition_references(&drafts, &nodes, &index, &mut problems);
            check_compensation_references(&drafts, &nodes, &index, &mut problems);
        }

        let resolve = |ids: std::collections::BTreeSet<String>| -> Vec<usize> {
            ids.iter().filter_map(|id| index.get(id).copied()).collect()
        };
        for node in &mut nodes {
            if node.template_steps.is_some() {
                let ids = crate::template::check(&node.params, node.for_each.is_some());
                node.template_steps = Some(resolve(ids.unwrap_or_default()));
            }
            let in_loop = node.for_each.is_some();
            if let Some(f) = node
                .fallback
                .as_mut()
                .filter(|f| f.template_steps.is_some())
            {
                let ids = crate::template::check(&f.params, in_loop);
                f.template_steps = Some(resolve(ids.unwrap_or_default()));
            }
            if let Some(f) = &mut node.for_each {
                f.reads = resolve(for_each_reads(&f.items).unwrap_or_default());
            }
        }
        if problems.is_empty() {
            let agents: std::collections::BTreeSet<&str> = nodes
                .iter()
                .flat_map(|node| [node.target(false).0, node.target(true).0])
                .collect();
            let agents = agents.into_iter().map(str::to_owned).collect();
            Ok(Plan {
                name: def.name.clone(),
                version: def.version.clone(),
                params: def.params.clone(),
                timeout: def.timeout.map(|t| t.0),
                nodes,
                rollback,
                priority: def.priority.unwrap_or_default(),
                index,
                agents,
            })
        } else {
            Err(PlanError {
                workflow: def.name.clone(),
                problems,
            })
        }
    }

    /// Every agent the plan's steps (and their fallbacks) call, sorted, each once.
    pub fn agents(&self) -> &[String] {
        &self.agents
    }

    /// The index of the node with this id.
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The sub-workflows the plan's steps run, each with the id of its step: the names the
    /// store must know for the plan to run.
    pub fn sub_workflows(&self) -> impl Iterator<Item = (&str, &SubWorkflow)> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.id.as_str(), n.workflow.as_ref()?)))
    }

    /// A run's params: the plan's defaults overlaid, key by key, with those `given`.
    pub fn run_params(&self, given: Map<String, Value>) -> Map<String, Value> {
        let mut params = self.params.clone();
        params.extend(given);
        params
    }
}

fn flatten<'d>(def: &'d Definition, problems: &mut Vec<String>) -> Vec<Draft<'d>> {
    let mut drafts: Vec<Draft<'d>> = Vec::new();
    let only_for_failure = |place: &str, step: &StepDef, problems: &mut Vec<String>| {
        if step.notify.is_some() {
            problems.push(format!(
                "{place}: `notify` is only allowed in error_handling.on_failure"
            ));
        }
    };
    for (i, step) in def.steps.iter().enumerate() {
        let place = format!("steps[{i}]");
        only_for_failure(&place, step, problems);
        if !step.then.is_empty() || !step.otherwise.is_empty() {
            branch(i, step, &mut drafts, problems);
            continue;
        }
        let top = drafts.len();
        drafts.push(Draft {
            place,
            def: step,
            role: Role::Main,
            parent: None,
            entry: Some(i),
            follows: None,
            branch: None,
        });
        for (j, sub) in step.parallel.iter().enumerate() {
            let place = format!("steps[{i}].parallel[{j}]");
            if sub.depends_on.is_some() {
                problems.push(format!(
                    "{place}: a parallel sub-step starts with its step and cannot have depends_on"
                ));
            }
            if !sub.parallel.is_empty() || !sub.then.is_empty() || !sub.otherwise.is_empty() {
                problems.push(format!(
                    "{place}: a parallel sub-step cannot hold parallel, then or else steps"
                ));
            }
            only_for_failure(&place, sub, problems);
            drafts.push(Draft {
                place,
                def: sub,
                role: Role::Main,
                parent: Some(top),
                entry: Some(i),
                follows: None,
                branch: None,
            });
        }
    }
    if let Some(eh) = &def.error_handling {
        for (k, step) in eh.on_failure.iter().enumerate() {
            let place = format!("error_handling.on_failure[{k}]");
            for (set, field) in [
                (step.depends_on.is_some(), "depends_on"),
                (!step.parallel.is_empty(), "parallel"),
                (step.condition.is_some(), "condition"),
                (
                    !step.then.is_empty() || !step.otherwise.is_empty(),
                    "then/else",
                ),
                (step.fallback.is_some(), "fallback"),
                (step.escalate.is_some(), "escalate"),
                (step.compensate.is_some(), "compensate"),
            ] {
                if set {
                    problems.push(format!(
                        "{place}: `{field}` is not allowed in a failure handler"
                    ));
                }
            }
            drafts.push(Draft {
                place,
                def: step,
                role: Role::OnFailure,
                parent: None,
                entry: None,
                follows: None,
                branch: None,
            });
        }
    }
    drafts
}

/// A `condition:` with `then:`/`else:` lists: each list runs as a pipeline, its steps guarded by
/// the condition (or its negation), so a branch not taken is skipped step by step.
fn branch<'d>(
    i: usize,
    step: &'d StepDef,
    drafts: &mut Vec<Draft<'d>>,
    problems: &mut Vec<String>,
) {
    let place = format!("steps[{i}]");
    let Some(condition) = &step.condition else {
        problems.push(format!("{place}: `then`/`else` need a `condition`"));
        return;
    };
    for (set, field) in [
        (step.agent.is_some(), "agent"),
        (step.action.is_some(), "action"),
        (!step.params.is_empty(), "params"),
        (!step.parallel.is_empty(), "parallel"),
        (step.retry.is_some(), "retry"),
        (step.fallback.is_some(), "fallback"),
        (step.escalate.is_some(), "escalate"),
        (step.for_each.is_some(), "for_each"),
        (!step.expect.is_empty(), "expect"),
        (step.compensate.is_some(), "compensate"),
    ] {
        if set {
            problems.push(format!(
                "{place}: a branch (with then/else) runs no action itself and cannot have `{field}`"
            ));
        }
    }
    for (list, steps, guard) in [
        ("then", &step.then, format!("({condition})")),
        ("else", &step.otherwise, format!("!({condition})")),
    ] {
        let mut previous = None;
        for (j, sub) in steps.iter().enumerate() {
            let place = format!("{place}.{list}[{j}]");
            if sub.depends_on.is_some()
                || !sub.parallel.is_empty()
                || !sub.then.is_empty()
                || !sub.otherwise.is_empty()
                || sub.notify.is_some()
            {
                problems.push(format!(
                    "{place}: a step of a branch runs after the one before it and cannot have depends_on, parallel, then, else or notify"
                ));
            }
            let index = drafts.len();
            drafts.push(Draft {
                place,
                def: sub,
                role: Role::Main,
                parent: None,
                entry: Some(i),
                follows: previous,
                branch: Some(guard.clone()),
            });
            previous = Some(index);
        }
    }
}

/// Attempts that may run longer than this are acked early (see [`Node::acks_early`]).
pub const ACK_EARLY_AFTER: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Bounds of a step's `heartbeat_timeout`: workers heartbeat at a third of it, and no more than
/// a few times a second; the lease is stored in milliseconds.
const MIN_HEARTBEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_HEARTBEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Bounds of a step's `schedule_to_start`, stored in milliseconds.
const MIN_SCHEDULE_TO_START: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_SCHEDULE_TO_START: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn build_node(
    d: &Draft<'_>,
    workflow_retry: Option<&RetrySpec>,
    problems: &mut Vec<String>,
) -> Node {
    let def = d.def;
    let workflow = sub_workflow(d, problems);
    let (agent, action, params) = match (&def.notify, &def.agent, &def.action) {
        _ if workflow.is_some() => (String::new(), String::new(), def.params.clone()),
        (Some(channel), None, None) => {
            let mut params = def.params.clone();
            params.insert("channel".into(), Value::from(channel.as_str()));
            (NOTIFY_AGENT.to_string(), NOTIFY_ACTION.to_string(), params)
        }
        (Some(_), _, _) => {
            problems.push(format!(
                "{}: a `notify` step cannot also name an agent or action",
                d.place
            ));
            (String::new(), String::new(), Map::new())
        }
        (None, agent, action) => {
            let name = def.id.as_deref().or(action.as_deref());
            let at = match name {
                Some(id) => format!("{} (`{id}`)", d.place),
                None => d.place.clone(),
            };
            if agent.is_none() {
                problems.push(format!("{at}: missing `agent`"));
            }
            if action.is_none() {
                problems.push(format!("{at}: missing `action`"));
            }
            (
                agent.clone().unwrap_or_default(),
                action.clone().unwrap_or_default(),
                def.params.clone(),
            )
        }
    };
    for (what, value) in [("agent", &agent), ("action", &action)] {
        if !value.is_empty() && !is_name(value) {
            problems.push(format!(
                "{}: {what} `{value}` may only use letters, digits, `_`, `-` and `.`",
                d.place
            ));
        }
    }
    let id = match (&def.id, &def.notify, &workflow) {
        (Some(id), _, _) => id.clone(),
        (None, Some(channel), _) => format!("notify_{channel}"),
        (None, None, Some(w)) => w.name.clone(),
        (None, None, None) => action.clone(),
    };
    if !id.is_empty() && !is_id(&id) {
        problems.push(format!(
            "{}: step id `{id}` must start with a letter or `_` and use only letters, digits, `_` and `-` (give the step an explicit `id`)",
            d.place
        ));
    }
    let own = def.condition.as_deref();
    let composed = match (&d.branch, own) {
        (Some(guard), Some(own)) => Some(format!("{guard} && ({own})")),
        (Some(guard), None) => Some(guard.clone()),
        (None, own) => own.map(str::to_string),
    };
    let condition = composed.as_deref().and_then(|src| {
        Condition::parse(src)
            .map_err(|e| problems.push(format!("{} (`{id}`): condition {e}", d.place)))
            .ok()
    });
    let expect = def
        .expect
        .iter()
        .enumerate()
        .filter_map(|(k, src)| {
            condition::parse_expectation(src)
                .map_err(|e| problems.push(format!("{} (`{id}`): expect[{k}] {e}", d.place)))
                .ok()
        })
        .collect();
    let retry = RetryPolicy::resolve(def.retry.as_ref(), workflow_retry).unwrap_or_else(|e| {
        problems.push(format!("{} (`{id}`): {e}", d.place));
        RetryPolicy::default()
    });
    let for_each = for_each(d, &id, problems);
    let template_steps = crate::template::has_templates(&params).then(Vec::new);
    if let Err(e) = crate::template::check(&params, for_each.is_some()) {
        problems.push(format!("{} (`{id}`): params: {e}", d.place));
    }
    if let Some(beat) = def.heartbeat_timeout
        && !(MIN_HEARTBEAT_TIMEOUT..=MAX_HEARTBEAT_TIMEOUT).contains(&beat.0)
    {
        problems.push(format!(
            "{} (`{id}`): heartbeat_timeout {:?} must be between 1s and 24h",
            d.place, beat.0
        ));
    }
    let fallback = def.fallback.as_ref().map(|f| {
        build_call(
            &format!("{} (`{id}`).fallback", d.place),
            f,
            def,
            Some(def),
            workflow_retry,
            problems,
        )
    });
    if let Some(wait) = def.schedule_to_start
        && !(MIN_SCHEDULE_TO_START..=MAX_SCHEDULE_TO_START).contains(&wait.0)
    {
        problems.push(format!(
            "{} (`{id}`): schedule_to_start {:?} must be between 1s and 24h",
            d.place, wait.0
        ));
    }
    if !def.labels.is_empty() && (def.agent.is_none() || workflow.is_some()) {
        problems.push(format!(
            "{} (`{id}`): labels route a step to an agent's workers; this step names no agent",
            d.place
        ));
    }
    if let Err(e) = crate::labels::check(&def.labels) {
        problems.push(format!("{} (`{id}`): {e}", d.place));
    }
    if let Some(channel) = &def.escalate
        && !is_name(channel)
    {
        problems.push(format!(
            "{} (`{id}`): escalate channel `{channel}` may only use letters, digits, `_`, `-` and `.`",
            d.place
        ));
    }
    Node {
        id,
        agent,
        action,
        workflow,
        params,
        deps: Vec::new(),
        dependents: Vec::new(),
        condition,
        expect,
        template_steps,
        retry,
        timeout: def.timeout.map(|t| t.0),
        heartbeat_timeout: def.heartbeat_timeout.map(|t| t.0),
        schedule_to_start: def.schedule_to_start.map(|t| t.0),
        labels: def.labels.clone(),
        role: d.role,
        parent: d.parent,
        for_each,
        fallback,
        escalate: def.escalate.clone(),
        compensation: None,
        compensates: None,
    }
}

/// Appends a node for each step's `compensate:`, after every other node, so that the nodes of
/// the steps keep their places; each is named `<step id>:compensate`.
fn compensations(
    drafts: &[Draft<'_>],
    nodes: &mut Vec<Node>,
    index: &mut HashMap<String, usize>,
    workflow_retry: Option<&RetrySpec>,
    problems: &mut Vec<String>,
) {
    for (i, d) in drafts.iter().enumerate() {
        let Some(undo) = d.def.compensate.as_ref().filter(|_| d.role == Role::Main) else {
            continue;
        };
        let step = &nodes[i];
        let place = format!("{} (`{}`).compensate", d.place, step.id);
        let call = build_call(&place, undo, d.def, None, workflow_retry, problems);
        let node = Node {
            id: format!("{}{COMPENSATION_SUFFIX}", step.id),
            agent: call.agent,
            action: call.action,
            workflow: None,
            params: call.params,
            deps: Vec::new(),
            dependents: Vec::new(),
            condition: None,
            expect: Vec::new(),
            template_steps: call.template_steps,
            retry: call.retry,
            timeout: call.timeout,
            heartbeat_timeout: None,
            schedule_to_start: None,
            labels: Labels::new(),
            role: Role::Compensation,
            parent: None,
            fallback: None,
            escalate: None,
            for_each: None,
            compensation: None,
            compensates: Some(i),
        };
        let at = nodes.len();
        index.insert(node.id.clone(), at);
        nodes[i].compensation = Some(at);
        nodes.push(node);
    }
}

/// Compiles a step's `fallback:` or `compensate:`. A fallback (`inherit` is its step) takes
/// unset retry fields and its timeout from its step; a compensation, from nothing but the
/// workflow's retry settings.
fn build_call(
    place: &str,
    f: &CallDef,
    step: &StepDef,
    inherit: Option<&StepDef>,
    workflow_retry: Option<&RetrySpec>,
    problems: &mut Vec<String>,
) -> Fallback {
    for (what, value) in [("agent", &f.agent), ("action", &f.action)] {
        match value {
            None => problems.push(format!("{place}: missing `{what}`")),
            Some(v) if !is_name(v) => problems.push(format!(
                "{place}: {what} `{v}` may only use letters, digits, `_`, `-` and `.`"
            )),
            Some(_) => {}
        }
    }
    // A fallback's retry settings, field by field over the step's.
    let own = match (&f.retry, inherit.and_then(|s| s.retry.as_ref())) {
        (Some(f), Some(s)) => Some(RetrySpec {
            max_attempts: f.max_attempts.or(s.max_attempts),
            backoff: f.backoff.or(s.backoff),
            delay: f.delay.or(s.delay),
            max_delay: f.max_delay.or(s.max_delay),
            jitter: f.jitter.or(s.jitter),
        }),
        (f, s) => f.clone().or_else(|| s.cloned()),
    };
    let retry = RetryPolicy::resolve(own.as_ref(), workflow_retry).unwrap_or_else(|e| {
        problems.push(format!("{place}: {e}"));
        RetryPolicy::default()
    });
    // A compensation runs once for its step, so it reads no `item`.
    let in_loop = inherit.is_some() && step.for_each.is_some();
    if let Err(e) = crate::template::check(&f.params, in_loop) {
        problems.push(format!("{place}: params: {e}"));
    }
    Fallback {
        agent: f.agent.clone().unwrap_or_default(),
        action: f.action.clone().unwrap_or_default(),
        params: f.params.clone(),
        template_steps: crate::template::has_templates(&f.params).then(Vec::new),
        retry,
        timeout: f.timeout.or(inherit.and_then(|s| s.timeout)).map(|t| t.0),
    }
}

/// Validates a step's `workflow` and `version`: a step calls an agent or runs a workflow, never
/// both; whether the name is registered is the store's to check.
fn sub_workflow(d: &Draft<'_>, problems: &mut Vec<String>) -> Option<SubWorkflow> {
    let def = d.def;
    let Some(name) = &def.workflow else {
        if def.version.is_some() {
            problems.push(format!("{}: `version` needs `workflow`", d.place));
        }
        return None;
    };
    let at = format!("{} (`{}`)", d.place, def.id.as_deref().unwrap_or(name));
    if def.agent.is_some() || def.action.is_some() || def.notify.is_some() {
        problems.push(format!(
            "{at}: a step runs either an agent (`agent`, `action`, `notify`) or a workflow (`workflow`), never both"
        ));
    }
    if name.trim().is_empty() {
        problems.push(format!("{at}: `workflow` is empty"));
    }
    if def.heartbeat_timeout.is_some() {
        problems.push(format!(
            "{at}: `heartbeat_timeout` is for agent steps; a workflow step's child run has none"
        ));
    }
    Some(SubWorkflow {
        name: name.clone(),
        version: def.version.clone(),
    })
}

/// Validates a step's `for_each` and `max_parallel`.
fn for_each(d: &Draft<'_>, id: &str, problems: &mut Vec<String>) -> Option<ForEach> {
    let def = d.def;
    let at = format!("{} (`{id}`)", d.place);
    let Some(items) = &def.for_each else {
        if def.max_parallel.is_some() {
            problems.push(format!("{at}: `max_parallel` needs `for_each`"));
        }
        return None;
    };
    if def.notify.is_some() || d.role == Role::OnFailure {
        problems.push(format!(
            "{at}: `for_each` is only allowed on an agent step of the workflow"
        ));
    }
    let trimmed = items.trim();
    if !(trimmed.starts_with("${{") && trimmed.ends_with("}}")) {
        problems.push(format!(
            "{at}: for_each must be one `${{{{ … }}}}` template giving a list, like `${{{{ params.items }}}}`; got `{items}`"
        ));
    } else if let Err(e) = for_each_reads(items) {
        problems.push(format!("{at}: for_each: {e}"));
    }
    if def.max_parallel == Some(0) {
        problems.push(format!("{at}: `max_parallel` must be at least 1"));
    }
    Some(ForEach {
        items: items.clone(),
        reads: Vec::new(),
        max_parallel: def.max_parallel.unwrap_or(usize::MAX),
    })
}

fn index_ids(
    drafts: &[Draft<'_>],
    nodes: &[Node],
    problems: &mut Vec<String>,
) -> HashMap<String, usize> {
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        if node.id.is_empty() {
            continue;
        }
        if let Some(&first) = index.get(node.id.as_str()) {
            problems.push(format!(
                "duplicate step id `{}`: {} and {} (give one of them another `id`)",
                node.id, drafts[first].place, drafts[i].place
            ));
        } else {
            index.insert(node.id.clone(), i);
        }
    }
    index
}

fn check_condition_references(
    drafts: &[Draft<'_>],
    nodes: &[Node],
    index: &HashMap<String, usize>,
    problems: &mut Vec<String>,
) {
    // Compensations (after the drafts' nodes) are checked on their own.
    for (i, node) in nodes.iter().enumerate().take(drafts.len()) {
        if node.template_steps.is_some()
            || node.for_each.is_some()
            || node
                .fallback
                .as_ref()
                .is_some_and(|f| f.template_steps.is_some())
        {
            let ancestors = ancestors(nodes, i);
            for id in template_reads(node) {
                let known = index.get(&id).is_some_and(|j| ancestors.contains(j));
                if !known {
                    let what = if node.for_each.is_some() {
                        "params or for_each read"
                    } else {
                        "params read"
                    };
                    problems.push(format!(
                        "{} (`{}`): {what} `steps.{id}`, which is not a step that finishes before this one",
                        drafts[i].place, node.id
                    ));
                }
            }
        }
        let Some(cond) = &node.condition else {
            continue;
        };
        let ancestors = ancestors(nodes, i);
        for var in cond.variables() {
            if var == condition::PARAMS {
                continue;
            }
            // A name that is no step's id is a bare name, resolved when the condition is
            // evaluated (an output field of an earlier step, or a run param).
            let unreachable_step = index.get(&var).is_some_and(|j| !ancestors.contains(j));
            if unreachable_step {
                problems.push(format!(
                    "{} (`{}`): condition refers to `{var}`, which is not a step that finishes before this one",
                    drafts[i].place, node.id
                ));
            }
        }
    }
}

/// A compensation's params may read the step it undoes and the steps that finish before it.
fn check_compensation_references(
    drafts: &[Draft<'_>],
    nodes: &[Node],
    index: &HashMap<String, usize>,
    problems: &mut Vec<String>,
) {
    for node in nodes.iter().filter(|n| n.template_steps.is_some()) {
        let Some(step) = node.compensates else {
            continue;
        };
        let mut readable = ancestors(nodes, step);
        readable.insert(step);
        for id in crate::template::check(&node.params, false).unwrap_or_default() {
            if !index.get(&id).is_some_and(|j| readable.contains(j)) {
                problems.push(format!(
                    "{} (`{}`).compensate: params read `steps.{id}`, which is neither this step nor one that finishes before it",
                    drafts[step].place, nodes[step].id
                ));
            }
        }
    }
}

/// The step ids a node's templates read: those of its params, its fallback's params and its
/// `for_each` list.
fn template_reads(node: &Node) -> std::collections::BTreeSet<String> {
    let in_loop = node.for_each.is_some();
    let mut ids = crate::template::check(&node.params, in_loop).unwrap_or_default();
    if let Some(f) = &node.fallback {
        ids.extend(crate::template::check(&f.params, in_loop).unwrap_or_default());
    }
    if let Some(f) = &node.for_each {
        ids.extend(for_each_reads(&f.items).unwrap_or_default());
    }
    ids
}

/// Checks a `for_each` list's template and returns the step ids it reads.
fn for_each_reads(items: &str) -> Result<std::collections::BTreeSet<String>, String> {
    if !crate::template::secret_references(items).is_empty() {
        return Err(format!(
            "`{items}` reads a secret; secrets may be read only in step params"
        ));
    }
    let mut wrapped = Map::new();
    wrapped.insert("for_each".into(), Value::from(items));
    crate::template::check(&wrapped, false)
}

/// Every node `i` transitively depends on.
pub fn ancestors(nodes: &[Node], i: usize) -> HashSet<usize> {
    let mut seen = HashSet::new();
    let mut stack = nodes[i].deps.clone();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(&nodes[n].deps);
        }
    }
    seen
}

/// A cycle as a path that starts and ends at the same node, if the graph has one.
fn find_cycle(nodes: &[Node]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; nodes.len()];
    for start in 0..nodes.len() {
        if mark[start] != Mark::New {
            continue;
        }
        // Iterative DFS over deps; `path` holds the open nodes in order.
        let mut path: Vec<usize> = vec![start];
        let mut next: Vec<usize> = vec![0];
        mark[start] = Mark::Open;
        while let Some(&node) = path.last() {
            let k = next.last_mut().expect("next parallels path");
            if let Some(&dep) = nodes[node].deps.get(*k) {
                *k += 1;
                match mark[dep] {
                    Mark::New => {
                        mark[dep] = Mark::Open;
                        path.push(dep);
                        next.push(0);
                    }
                    Mark::Open => {
                        // `dep` is on the path: the cycle runs from it to `node` and back. The path
                        // follows "depends on" edges, so reverse it to read in execution order.
                        let from = path
                            .iter()
                            .position(|&n| n == dep)
                            .expect("open node is on the path");
                        let mut cycle: Vec<usize> = path[from..].to_vec();
                        cycle.reverse();
                        // Start at the step declared first, so the same cycle always reads the same.
                        let first = (0..cycle.len()).min_by_key(|&i| cycle[i]).unwrap_or(0);
                        cycle.rotate_left(first);
                        cycle.push(cycle[0]);
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                path.pop();
                next.pop();
            }
        }
    }
    None
}

fn dedup(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

fn is_id(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_name(s: &str) -> bool {
    s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests;
