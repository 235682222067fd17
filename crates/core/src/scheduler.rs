//! A run as a state machine: [`RunState::apply`] takes one [`Event`] and returns the
//! [`Transition`] — which steps changed and the effects to carry out (tasks to dispatch, attempts
//! to record, the run's end). The caller persists the changed state and the effects in one
//! transaction before acting on any of them.
//!
//! Fencing lives here: a result counts only for the current attempt of a running step, carrying
//! that attempt's task id; anything else is reported as [`Effect::Stale`] and changes nothing.
//!
//! A rollback runs the compensations (slots of [`Role::Compensation`] nodes) of the steps that
//! succeeded, one at a time, the step that ended last first (ties: the later slot first). The
//! order follows from the stored steps alone — they do not change while the run rolls back —
//! so a run restored mid-rollback goes on where it was: a compensation that succeeded (or that
//! an operator skipped) is done and never runs again; the first that fails ends the run
//! `rollback_failed`.
//!
//! A run keeps at most its `window` of attempts outstanding: a step that becomes ready while the
//! window is full is deferred — it stays pending, costing nothing stored — and is dispatched, in
//! slot order, as earlier attempts end. So a fan-out of 100,000 steps commits, queues and holds a
//! window at a time, not all of it at once. Retries, released steps and operators' retries are
//! never deferred: they already had their place. Which steps are deferred follows from the
//! stored steps (pending, every dependency ended, the run started and not paused).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::breaker::{Admission, Breakers, Probe};
use crate::condition::{self, Binding, Finished};
use crate::definition::Priority;
use crate::limits::Limits;
use crate::plan::{Plan, Role};
use crate::subset::Subset;

/// Where a step is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StepStatus {
    /// Waiting for its dependencies (or, for a failure handler, for the run to fail).
    #[default]
    Pending,
    /// An attempt is dispatched and not yet answered.
    Running,
    /// The last attempt failed; the next one is due at `wake_at`.
    Waiting,
    Success,
    Failure,
    /// Not run: its condition was false, or the run did not fail (failure handlers).
    Skipped,
    /// Not run because a step it depends on failed.
    UpstreamFailed,
    /// Stopped by an operator's cancel of the run.
    Cancelled,
    /// Its retries and fallback failed and it escalated (strike 3): it waits for an operator to
    /// retry, skip or complete it; its dependents wait with it.
    NeedsAttention,
}

impl StepStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Success | Self::Failure | Self::Skipped | Self::UpstreamFailed | Self::Cancelled
        )
    }

    /// Whether dependents of a step in this state must not run.
    fn blocks_dependents(self) -> bool {
        matches!(self, Self::Failure | Self::UpstreamFailed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Skipped => "skipped",
            Self::UpstreamFailed => "upstream_failed",
            Self::Cancelled => "cancelled",
            Self::NeedsAttention => "needs_attention",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "needs_attention" => Self::NeedsAttention,
            "pending" => Self::Pending,
            "running" => Self::Running,
            "waiting" => Self::Waiting,
            "success" => Self::Success,
            "failure" => Self::Failure,
            "skipped" => Self::Skipped,
            "upstream_failed" => Self::UpstreamFailed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Running,
    /// An operator paused the run: results are still recorded, but nothing new is dispatched.
    Paused,
    /// A step failed and every step has finished; the failure handlers are running.
    Failing,
    Success,
    Failure,
    /// An operator cancelled the run.
    Cancelled,
    /// A step escalated and waits for an operator; the steps that do not depend on it go on.
    NeedsAttention,
    /// The compensations of the steps that succeeded are running, the latest first.
    RollingBack,
    /// Every step that succeeded and has a compensation was undone.
    RolledBack,
    /// A compensation failed; the run's `error` names the step that could not be undone.
    RollbackFailed,
}

impl RunStatus {
    /// Every status a run can have.
    pub const ALL: [RunStatus; 10] = [
        Self::Running,
        Self::Paused,
        Self::Failing,
        Self::Success,
        Self::Failure,
        Self::Cancelled,
        Self::NeedsAttention,
        Self::RollingBack,
        Self::RolledBack,
        Self::RollbackFailed,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Success
                | Self::Failure
                | Self::Cancelled
                | Self::RolledBack
                | Self::RollbackFailed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Failing => "failing",
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Cancelled => "cancelled",
            Self::NeedsAttention => "needs_attention",
            Self::RollingBack => "rolling_back",
            Self::RolledBack => "rolled_back",
            Self::RollbackFailed => "rollback_failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "needs_attention" => Self::NeedsAttention,
            "rolling_back" => Self::RollingBack,
            "rolled_back" => Self::RolledBack,
            "rollback_failed" => Self::RollbackFailed,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "failing" => Self::Failing,
            "success" => Self::Success,
            "failure" => Self::Failure,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// How far a step went through its three strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strike {
    /// Strike 1: the step's own attempts and retries.
    #[default]
    Retries,
    /// Strike 2: the step's retries are exhausted; its `fallback:` runs.
    Fallback,
    /// Strike 3: the fallback failed too (or there was none); the step escalated.
    Escalated,
}

impl Strike {
    pub fn number(self) -> u8 {
        match self {
            Self::Retries => 1,
            Self::Fallback => 2,
            Self::Escalated => 3,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Some(match n {
            1 => Self::Retries,
            2 => Self::Fallback,
            3 => Self::Escalated,
            _ => return None,
        })
    }

    /// Whether attempts now call the step's fallback.
    pub fn is_fallback(self) -> bool {
        self != Self::Retries
    }
}

/// The state of one step (one plan node) in one run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepState {
    pub status: StepStatus,
    /// The latest dispatched attempt; 0 before the first.
    pub attempt: u32,
    /// The fencing token of the latest attempt.
    pub task_id: Option<Uuid>,
    /// When a waiting step's next attempt is due.
    pub wake_at: Option<DateTime<Utc>>,
    /// When the running attempt times out, if the step has a timeout.
    pub deadline: Option<DateTime<Utc>>,
    /// Attempts of the current strike lost to the infrastructure (see [`Outcome::Lost`]).
    pub lost: u32,
    pub strike: Strike,
    /// The attempts made before the current strike (or an operator's retry) began; the retry
    /// budget counts from there.
    pub strike_base: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub output: Option<Value>,
    /// The last failure's message, or why the step was skipped.
    pub error: Option<String>,
    /// Set on the slot of one instance of a `for_each` step.
    pub instance: Option<Instance>,
    /// The agent whose open circuit breaker (or whose limit) holds this waiting step: it has no
    /// attempt for the call it is to make yet, and waits for [`Event::Release`].
    pub held: Option<String>,
}

/// One instance of a `for_each` step: a slot of its own after the plan's nodes, so that its
/// attempts are fenced, retried, timed out and leased exactly like a step's.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The plan node it is an instance of.
    pub node: usize,
    /// The position of its item in the list.
    pub index: usize,
    pub item: Value,
}

/// The attempt of a sub-workflow step that started a run. The run's id is that attempt's task
/// id, and its end is reported to that attempt like a worker's result, fenced the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: u32,
    /// How deep the run is nested: 1 for the child of a run nobody started.
    pub depth: u32,
    /// When the attempt started the run: its creation (its id, a task id, carries no time).
    pub started_at: DateTime<Utc>,
}

/// How many levels of sub-workflows may nest, unless configured otherwise.
pub const DEFAULT_MAX_WORKFLOW_DEPTH: u32 = 8;

/// How many instances one `for_each` step may have, unless configured otherwise.
pub const DEFAULT_MAX_INSTANCES: usize = 10_000;

/// How many attempts one run keeps outstanding at most, unless configured otherwise: far more
/// than a fleet's slots, so that the window never starves a worker, and few enough that a
/// run's start commits and publishes in milliseconds.
pub const DEFAULT_DISPATCH_WINDOW: usize = 2_000;

/// The instances of one expanded `for_each` node: slots `first..first + len`, started in order.
/// Derived from the slots (see [`RunState::restore`]) and kept up to date, so that an instance's
/// end costs O(1), not a scan of its siblings.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FanOut {
    first: usize,
    len: usize,
    /// Instances started so far.
    started: usize,
    /// Started instances that have not ended.
    active: usize,
    succeeded: usize,
}

impl StepState {
    /// The strike attempt `attempt` of this step belonged to: those after `strike_base` are the
    /// current strike's (an escalated step's were its fallback's, if it has one).
    pub fn strike_of(&self, node: &crate::plan::Node, attempt: u32) -> Strike {
        match self.strike {
            _ if attempt <= self.strike_base => Strike::Retries,
            Strike::Escalated if node.fallback.is_none() => Strike::Retries,
            Strike::Escalated => Strike::Fallback,
            current => current,
        }
    }
}

/// The state of one run. `unfinished_*` and `failed_main` are derived from `steps` (see
/// [`RunState::restore`]) and kept up to date by every transition, so that finding the end of a
/// run costs O(1) per event rather than a scan of its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    pub id: Uuid,
    pub status: RunStatus,
    /// The run's params: the definition's defaults overlaid with those given at submission.
    pub params: Map<String, Value>,
    pub steps: Vec<StepState>,
    pub ended_at: Option<DateTime<Utc>>,
    /// When the run times out (its definition's `timeout` after its start); set only while
    /// the run's steps may still run.
    pub deadline: Option<DateTime<Utc>>,
    /// Why the run failed, when no step's failure says it (it timed out).
    pub error: Option<String>,
    /// The most instances a `for_each` step may expand to.
    pub max_instances: usize,
    /// The most attempts outstanding before steps that become ready are deferred; at least 1.
    pub window: usize,
    /// The steps the submission selected or left out: those left out are skipped at the start
    /// and stay so, even when an operator retries the run.
    pub subset: Subset,
    /// How soon its tasks are taken by workers: its plan's, unless its submission (or, for a
    /// sub-workflow, its parent's) said higher.
    pub priority: Priority,
    /// Set when the run is a sub-workflow: the attempt that started it.
    pub parent: Option<ParentLink>,
    unfinished_main: usize,
    unfinished_handlers: usize,
    failed_main: usize,
    /// Steps in [`StepStatus::NeedsAttention`].
    attention: usize,
    /// By plan node, how many of its dependencies have not ended: a step's end costs O(its
    /// dependents), not O(their dependencies), so a fan-in of N steps is linear.
    unfinished_deps: Vec<usize>,
    /// By `for_each` node, once it has expanded.
    fanouts: HashMap<usize, FanOut>,
    /// While the run rolls back: the compensation slots to run, in order (see
    /// [`RunState::rollback_order`]), and the position of the first not known to be done.
    rollback: Vec<usize>,
    rollback_next: usize,
    /// Attempts dispatched that have not ended (a `for_each` node is none: its instances are).
    outstanding: usize,
    /// Main steps ready to run that wait for room in the window, dispatched lowest slot first.
    deferred: BTreeSet<usize>,
    /// The agents' circuit breakers and limits, lent by [`RunState::apply_limited`] for one
    /// event.
    breakers: Breakers,
    limits: Limits,
}

/// Something that happened to a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The run was created: skip the steps its [`Subset`] leaves out, then start the steps
    /// that depend on nothing else.
    Start,
    /// A worker reported the end of an attempt.
    AttemptFinished {
        step: usize,
        attempt: u32,
        task_id: Uuid,
        outcome: Outcome,
        worker: String,
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
    },
    /// A waiting step's retry is due.
    Wake { step: usize, attempt: u32 },
    /// An operator asks to run a failed step of a failed run again (for instance after its task
    /// was dead-lettered), or every failed step when `step` is `None`: each gets a new attempt,
    /// the steps they had blocked wait for them again, and the failure handlers will run again
    /// should the run fail again.
    Retry { step: Option<usize> },
    /// An operator cancels the run: nothing more is dispatched, steps not finished end
    /// `cancelled`, and results still to come are ignored.
    Cancel,
    /// An operator pauses the run: results are recorded, nothing new is dispatched.
    Pause,
    /// An operator resumes a paused run: whatever became ready meanwhile is dispatched.
    Resume,
    /// An operator ends a step that has not succeeded as skipped, or as succeeded with the given
    /// output (`complete`); its dependents go on as if it had.
    Settle { step: usize, output: Option<Value> },
    /// The run's deadline passed: running attempts are cancelled, unfinished steps end
    /// `cancelled` with the reason, the failure handlers run and the run fails.
    TimedOut,
    /// The circuit breaker or limit that holds a step may let it through now: it is dispatched
    /// if its breaker and limit admit it (else it stays held), or waits for the resume of a
    /// paused run.
    Release { step: usize },
    /// An operator rolls back a run that ended (`success`, `failure`, `cancelled`, or
    /// `rollback_failed` to try the rest of its rollback again).
    Rollback,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Value),
    Failure {
        message: String,
        retryable: bool,
    },
    /// The attempt was lost to the infrastructure rather than failed by its handler: its lease
    /// ran out, or RabbitMQ dead-lettered its task (which also happens to a task that merely
    /// shared a crashing worker with a poison one). The step gets a new attempt after a short
    /// random pause (half a second to two and a half), outside its retry budget, up to
    /// [`MAX_LOST_ATTEMPTS`]; past that it fails.
    Lost {
        message: String,
    },
}

/// How many attempts of one step may be lost to the infrastructure before the step fails.
pub const MAX_LOST_ATTEMPTS: u32 = 1;

/// What a transition asks the outside world to do, once its state is committed.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish a task for this attempt.
    Dispatch {
        step: usize,
        attempt: u32,
        task_id: Uuid,
    },
    /// Record how an attempt ended.
    AttemptEnded {
        step: usize,
        attempt: u32,
        task_id: Uuid,
        success: bool,
        error: Option<String>,
        worker: String,
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
    },
    /// A result or timer that does not match the step's current attempt: nothing changed.
    Stale {
        step: usize,
        attempt: u32,
        reason: &'static str,
    },
    /// An operator's request that the run's state does not allow; nothing changed.
    Refused(String),
    /// A step moved on to strike 2 (its fallback runs) or 3 (it escalated: notify its
    /// `escalate` channel, once).
    Strike { step: usize, strike: Strike },
    /// A step that was to be dispatched is held by its agent's open circuit breaker, or by its
    /// limit (`by_limit`).
    Held {
        step: usize,
        agent: String,
        by_limit: bool,
    },
    /// A running attempt was cancelled; its worker may be told to stop.
    Cancelled {
        step: usize,
        attempt: u32,
        task_id: Uuid,
    },
    /// The run reached a final status.
    RunEnded(RunStatus),
}

/// The outcome of applying one event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transition {
    /// Steps whose state changed, in ascending order.
    pub changed: Vec<usize>,
    /// Whether the run's own status changed.
    pub run_changed: bool,
    pub effects: Vec<Effect>,
}

impl Transition {
    fn touch(&mut self, step: usize) {
        if let Err(pos) = self.changed.binary_search(&step) {
            self.changed.insert(pos, step);
        }
    }
}

impl RunState {
    /// A new run of `plan`, nothing started yet; apply [`Event::Start`] next.
    pub fn new(id: Uuid, plan: &Plan, params: Map<String, Value>) -> Self {
        Self::restore(
            id,
            plan,
            RunStatus::Running,
            params,
            vec![StepState::default(); plan.nodes.len()],
            None,
        )
    }

    /// Rebuilds a run from its stored parts, deriving the counters.
    pub fn restore(
        id: Uuid,
        plan: &Plan,
        status: RunStatus,
        params: Map<String, Value>,
        steps: Vec<StepState>,
        ended_at: Option<DateTime<Utc>>,
    ) -> Self {
        let mut run = Self {
            id,
            status,
            params,
            steps,
            ended_at,
            deadline: None,
            error: None,
            max_instances: DEFAULT_MAX_INSTANCES,
            window: DEFAULT_DISPATCH_WINDOW,
            subset: Subset::default(),
            priority: plan.priority,
            parent: None,
            unfinished_main: 0,
            unfinished_handlers: 0,
            failed_main: 0,
            attention: 0,
            unfinished_deps: Vec::new(),
            fanouts: HashMap::new(),
            rollback: Vec::new(),
            rollback_next: 0,
            outstanding: 0,
            deferred: BTreeSet::new(),
            breakers: Breakers::default(),
            limits: Limits::default(),
        };
        run.recount(plan);
        run.outstanding = run
            .steps
            .iter()
            .enumerate()
            .filter(|(slot, s)| s.status == StepStatus::Running && !run.fanouts.contains_key(slot))
            .count();
        // Before its start a run defers nothing: its roots are merely pending.
        let started = run
            .steps
            .iter()
            .any(|s| s.status != StepStatus::Pending || s.attempt > 0);
        if started && matches!(run.status, RunStatus::Running | RunStatus::NeedsAttention) {
            run.deferred = (0..plan.nodes.len())
                .filter(|&i| {
                    plan.nodes[i].role == Role::Main
                        && run.steps[i].status == StepStatus::Pending
                        && run.unfinished_deps[i] == 0
                })
                .collect();
        }
        run
    }

    /// Derives the counters and fan-outs from the slots.
    fn recount(&mut self, plan: &Plan) {
        let run = self;
        run.unfinished_main = 0;
        run.unfinished_handlers = 0;
        run.failed_main = 0;
        run.fanouts.clear();
        for (node, step) in plan.nodes.iter().zip(&run.steps) {
            match (node.role, step.status.is_terminal()) {
                (Role::Main, false) => run.unfinished_main += 1,
                (Role::OnFailure, false) => run.unfinished_handlers += 1,
                _ => {}
            }
            if node.role == Role::Main && step.status.blocks_dependents() {
                run.failed_main += 1;
            }
        }
        run.unfinished_deps = plan
            .nodes
            .iter()
            .map(|n| {
                n.deps
                    .iter()
                    .filter(|&&d| !run.steps[d].status.is_terminal())
                    .count()
            })
            .collect();
        // Instances escalate like steps, so every slot counts.
        run.attention = run
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::NeedsAttention)
            .count();
        for (slot, step) in run.steps.iter().enumerate().skip(plan.nodes.len()) {
            let Some(instance) = &step.instance else {
                continue;
            };
            let f = run.fanouts.entry(instance.node).or_insert(FanOut {
                first: slot,
                len: 0,
                started: 0,
                active: 0,
                succeeded: 0,
            });
            f.len += 1;
            if step.status != StepStatus::Pending {
                f.started += 1;
            }
            if !matches!(step.status, StepStatus::Pending) && !step.status.is_terminal() {
                f.active += 1;
            }
            if step.status == StepStatus::Success {
                f.succeeded += 1;
            }
        }
        if run.status == RunStatus::RollingBack {
            run.rollback = run.rollback_order(plan);
            run.rollback_next = 0;
        } else {
            run.rollback.clear();
        }
    }

    /// The compensation slots a rollback runs, in order: those of the steps that succeeded, the
    /// step that ended last first; of steps that ended at the same time, the later slot first.
    pub fn rollback_order(&self, plan: &Plan) -> Vec<usize> {
        let mut done: Vec<(Option<DateTime<Utc>>, usize, usize)> = plan
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| self.steps[*i].status == StepStatus::Success)
            .filter_map(|(i, n)| Some((self.steps[i].ended_at, i, n.compensation?)))
            .collect();
        done.sort_unstable_by(|a, b| b.cmp(a));
        done.into_iter().map(|(_, _, slot)| slot).collect()
    }

    /// How deep the run is nested in sub-workflows: 0 for a run nobody started.
    pub fn depth(&self) -> u32 {
        self.parent.as_ref().map_or(0, |p| p.depth)
    }

    /// What an ended sub-workflow run reports to the attempt that started it: on success, an
    /// object of the outputs of its steps that succeeded, by step id (failure handlers and
    /// skipped steps left out); else a failure naming the run and its failed step. A run cancelled
    /// by an operator is not retried by its parent.
    pub fn outcome_for_parent(&self, plan: &Plan) -> Outcome {
        match self.status {
            RunStatus::Success => Outcome::Success(Value::Object(
                plan.nodes
                    .iter()
                    .zip(&self.steps)
                    .filter(|(n, s)| n.role == Role::Main && s.status == StepStatus::Success)
                    .map(|(n, s)| (n.id.clone(), s.output.clone().unwrap_or(Value::Null)))
                    .collect(),
            )),
            RunStatus::Cancelled => Outcome::Failure {
                message: format!("sub-workflow run {} ({}) was cancelled", self.id, plan.name),
                retryable: false,
            },
            _ => {
                let failed = plan
                    .nodes
                    .iter()
                    .zip(&self.steps)
                    .filter(|(n, s)| n.role == Role::Main && s.status == StepStatus::Failure)
                    .min_by_key(|(_, s)| s.ended_at);
                let why = match (failed, &self.error) {
                    (_, Some(error)) => error.clone(),
                    (Some((n, s)), None) => format!(
                        "step `{}` failed: {}",
                        n.id,
                        s.error.as_deref().unwrap_or("no message")
                    ),
                    (None, None) => format!("it ended {}", self.status.as_str()),
                };
                Outcome::Failure {
                    message: format!("sub-workflow run {} ({}) failed: {why}", self.id, plan.name),
                    retryable: true,
                }
            }
        }
    }

    /// The plan node a slot belongs to: itself, or the node an instance is of.
    pub fn node_of(&self, slot: usize) -> usize {
        self.steps[slot].instance.as_ref().map_or(slot, |i| i.node)
    }

    /// A slot's step id: the node's id, or `<id>[<index>]` for an instance.
    pub fn slot_id(&self, plan: &Plan, slot: usize) -> String {
        match &self.steps[slot].instance {
            Some(i) => format!("{}[{}]", plan.nodes[i.node].id, i.index),
            None => plan.nodes[slot].id.clone(),
        }
    }

    /// The slot a step id names (see [`RunState::slot_id`]).
    pub fn slot_of(&self, plan: &Plan, step_id: &str) -> Option<usize> {
        if let Some(i) = plan.node_index(step_id) {
            return Some(i);
        }
        let (id, rest) = step_id.strip_suffix(']')?.rsplit_once('[')?;
        let index: usize = rest.parse().ok()?;
        let f = self.fanouts.get(&plan.node_index(id)?)?;
        (index < f.len).then_some(f.first + index)
    }

    /// [`RunState::apply_limited`] with no agent limited: the breaker's tests.
    #[cfg(test)]
    pub(crate) fn apply_gated(
        &mut self,
        plan: &Plan,
        event: Event,
        now: DateTime<Utc>,
        breakers: &mut Breakers,
    ) -> Transition {
        self.apply_limited(plan, event, now, breakers, &mut Limits::default())
    }

    /// Applies one event at time `now`, asking `breakers` (an agent they do not hold is
    /// closed) and `limits` (an agent without one is not limited) before each dispatch, taking
    /// the probes the breakers admit, and counting in the limits the attempts dispatched and
    /// ended.
    pub fn apply_limited(
        &mut self,
        plan: &Plan,
        event: Event,
        now: DateTime<Utc>,
        breakers: &mut Breakers,
        limits: &mut Limits,
    ) -> Transition {
        std::mem::swap(&mut self.breakers, breakers);
        std::mem::swap(&mut self.limits, limits);
        let t = self.apply(plan, event, now);
        // A cancelled attempt frees its slot too; counted here, where its agent is known, and
        // not where it was cancelled (a finished attempt frees its slot at once, for the steps
        // its end makes ready).
        for effect in &t.effects {
            if let Effect::Cancelled { step, attempt, .. } = effect {
                let node = &plan.nodes[self.node_of(*step)];
                let strike = self.steps[*step].strike_of(node, *attempt);
                self.limits.release(node.target(strike.is_fallback()).0);
            }
        }
        std::mem::swap(&mut self.limits, limits);
        std::mem::swap(&mut self.breakers, breakers);
        t
    }

    /// Applies one event at time `now`.
    pub fn apply(&mut self, plan: &Plan, event: Event, now: DateTime<Utc>) -> Transition {
        debug_assert!(plan.nodes.len() <= self.steps.len());
        let mut t = Transition::default();
        match event {
            Event::Start => {
                if self.status == RunStatus::Running
                    && self
                        .steps
                        .iter()
                        .all(|s| s.status == StepStatus::Pending && s.attempt == 0)
                {
                    self.leave_out(plan, &mut t);
                    if let Some(timeout) = plan.timeout {
                        self.deadline = Some(now + to_chrono(timeout));
                        t.run_changed = true;
                    }
                    // The roots, and the steps whose dependencies were all left out.
                    for i in 0..plan.nodes.len() {
                        if plan.nodes[i].role == Role::Main {
                            self.start_if_ready(plan, i, now, &mut t);
                        }
                    }
                }
            }
            Event::AttemptFinished {
                step,
                attempt,
                task_id,
                outcome,
                worker,
                started_at,
                finished_at,
            } => {
                let current = self.steps.get(step).is_some_and(|s| {
                    s.status == StepStatus::Running
                        && s.attempt == attempt
                        && s.task_id == Some(task_id)
                });
                if !current {
                    t.effects.push(Effect::Stale {
                        step,
                        attempt,
                        reason: "not the current attempt of a running step",
                    });
                    return t;
                }
                let node = &plan.nodes[self.node_of(step)];
                // A claim of success counts only if the output meets the step's `expect`; one
                // that does not is a failure like any other, retried by the step's policy.
                let outcome = match outcome {
                    Outcome::Success(output) if !node.expect.is_empty() => {
                        match condition::check_expectations(&node.expect, &self.params, &output) {
                            Ok(()) => Outcome::Success(output),
                            Err(message) => Outcome::Failure {
                                message,
                                retryable: true,
                            },
                        }
                    }
                    other => other,
                };
                let (success, error) = match &outcome {
                    Outcome::Success(_) => (true, None),
                    Outcome::Failure { message, .. } | Outcome::Lost { message } => {
                        (false, Some(message.clone()))
                    }
                };
                // Every attempt that ended counts for its agent's breaker (failures, timeouts
                // and lost attempts alike), before a retry asks the breaker again.
                let strike = self.steps[step].strike_of(node, attempt);
                let agent = node.target(strike.is_fallback()).0;
                self.breakers.record(agent, task_id, !success, now);
                self.limits.release(agent);
                self.attempt_over();
                t.effects.push(Effect::AttemptEnded {
                    step,
                    attempt,
                    task_id,
                    success,
                    error,
                    worker,
                    started_at,
                    finished_at,
                });
                match outcome {
                    Outcome::Success(output) => {
                        let s = &mut self.steps[step];
                        s.output = Some(output);
                        s.error = None;
                        self.settle(plan, step, StepStatus::Success, now, &mut t);
                    }
                    Outcome::Failure { message, retryable } => {
                        let s = &self.steps[step];
                        let policy =
                            plan.nodes[self.node_of(step)].retry_policy(s.strike.is_fallback());
                        // The budget counts the attempts of this strike; attempts lost to the
                        // infrastructure do not use it up.
                        let made = attempt.saturating_sub(s.strike_base);
                        let used = made.saturating_sub(s.lost);
                        self.steps[step].error = Some(message);
                        if retryable && policy.allows_retry_after(used) {
                            let delay = policy.delay_after(made, jitter_unit(task_id));
                            let due = now + to_chrono(delay);
                            let paused = self.status == RunStatus::Paused;
                            if due <= now && !paused {
                                self.dispatch(plan, step, now, &mut t);
                            } else {
                                let s = &mut self.steps[step];
                                s.status = StepStatus::Waiting;
                                s.deadline = None;
                                // A paused run's due retry waits for the resume.
                                s.wake_at = (due > now).then_some(due);
                                t.touch(step);
                            }
                        } else {
                            self.strike_out(plan, step, now, &mut t);
                        }
                    }
                    Outcome::Lost { message } => {
                        let s = &mut self.steps[step];
                        if s.lost < MAX_LOST_ATTEMPTS {
                            s.lost += 1;
                            s.error = Some(message);
                            s.status = StepStatus::Waiting;
                            s.deadline = None;
                            // A paused run's retry waits for the resume.
                            s.wake_at = (self.status != RunStatus::Paused)
                                .then(|| now + to_chrono(lost_retry_pause(task_id)));
                            t.touch(step);
                        } else {
                            s.error = Some(format!(
                                "{message} (an earlier attempt of this step was lost too)"
                            ));
                            self.strike_out(plan, step, now, &mut t);
                        }
                    }
                }
            }
            Event::Wake { step, attempt } => {
                let due = self
                    .steps
                    .get(step)
                    .is_some_and(|s| s.status == StepStatus::Waiting && s.attempt == attempt);
                if !due {
                    t.effects.push(Effect::Stale {
                        step,
                        attempt,
                        reason: "the step is not waiting for this retry",
                    });
                    return t;
                }
                if self.status == RunStatus::Paused {
                    // Dispatched on resume.
                    self.steps[step].wake_at = None;
                    t.touch(step);
                } else {
                    self.dispatch(plan, step, now, &mut t);
                }
            }
            Event::Retry { step } => {
                let waiting: Vec<usize> = match step {
                    Some(i) => self
                        .steps
                        .get(i)
                        .filter(|s| s.status == StepStatus::NeedsAttention)
                        .map(|_| i)
                        .into_iter()
                        .collect(),
                    None => (0..self.steps.len())
                        .filter(|&i| self.steps[i].status == StepStatus::NeedsAttention)
                        .collect(),
                };
                if !waiting.is_empty() {
                    for i in waiting {
                        self.attention -= 1;
                        self.restart(i);
                        if self.status == RunStatus::Paused {
                            let s = &mut self.steps[i];
                            s.status = StepStatus::Waiting;
                            s.wake_at = None;
                            t.touch(i);
                        } else {
                            self.dispatch(plan, i, now, &mut t);
                        }
                    }
                    self.settle_run(plan, now, &mut t);
                    return t;
                }
                let failed: Vec<usize> = match step {
                    // An instance of a `for_each` step is retried through its step.
                    Some(i) => (i < self.steps.len())
                        .then(|| self.node_of(i))
                        .filter(|&n| self.steps[n].status == StepStatus::Failure)
                        .into_iter()
                        .collect(),
                    None => (0..plan.nodes.len())
                        .filter(|&i| {
                            plan.nodes[i].role == Role::Main
                                && self.steps[i].status == StepStatus::Failure
                        })
                        .collect(),
                };
                if self.status != RunStatus::Failure || failed.is_empty() {
                    t.effects.push(Effect::Refused(
                        "only a step that needs attention, or a failed step of a failed run, can be retried".into(),
                    ));
                    return t;
                }
                self.reopen(plan, &failed, &mut t);
                for i in failed {
                    if self.fanouts.contains_key(&i) {
                        self.restart_instances(plan, i, now, &mut t);
                    } else if plan.nodes[i].for_each.is_some() {
                        // Its list could not be expanded: try again.
                        self.start_if_ready(plan, i, now, &mut t);
                    } else {
                        self.restart(i);
                        self.dispatch(plan, i, now, &mut t);
                    }
                }
            }
            Event::Release { step } => {
                let held = self
                    .steps
                    .get(step)
                    .is_some_and(|s| s.status == StepStatus::Waiting && s.held.is_some());
                if !held {
                    t.effects.push(Effect::Stale {
                        step,
                        attempt: self.steps.get(step).map_or(0, |s| s.attempt),
                        reason: "the step is not held by a circuit breaker or a limit",
                    });
                    return t;
                }
                if self.status == RunStatus::Paused {
                    // Dispatched (or held again) on resume.
                    self.steps[step].held = None;
                    t.touch(step);
                } else {
                    self.dispatch(plan, step, now, &mut t);
                }
            }
            Event::Rollback => {
                if !matches!(
                    self.status,
                    RunStatus::Success
                        | RunStatus::Failure
                        | RunStatus::Cancelled
                        | RunStatus::RollbackFailed
                ) {
                    t.effects.push(Effect::Refused(format!(
                        "only a run that ended success, failure, cancelled or rollback_failed can be rolled back; this one is {}",
                        self.status.as_str()
                    )));
                    return t;
                }
                if self.rollback_order(plan).is_empty() {
                    t.effects.push(Effect::Refused(
                        "nothing to roll back: no step of this run that succeeded has a `compensate:`".into(),
                    ));
                    return t;
                }
                if self.status == RunStatus::RollbackFailed {
                    // It named the compensation that failed, which runs again now.
                    self.error = None;
                }
                self.ended_at = None;
                self.roll_back(plan, now, &mut t);
                return t;
            }
            Event::Cancel => {
                if self.status.is_terminal() {
                    t.effects.push(Effect::Refused(format!(
                        "the run has already ended ({})",
                        self.status.as_str()
                    )));
                    return t;
                }
                for i in 0..self.steps.len() {
                    self.cancel_slot(i, "cancelled", now, &mut t);
                }
                self.recount(plan);
                self.end(plan, RunStatus::Cancelled, now, &mut t);
                return t;
            }
            Event::TimedOut => {
                let due = self.deadline.is_some_and(|at| at <= now)
                    && matches!(
                        self.status,
                        RunStatus::Running | RunStatus::Paused | RunStatus::NeedsAttention
                    );
                if !due {
                    return t;
                }
                let reason = format!(
                    "workflow timed out after {}",
                    human(plan.timeout.unwrap_or_default())
                );
                for i in 0..self.steps.len() {
                    if plan.nodes[self.node_of(i)].role == Role::Main {
                        self.cancel_slot(i, &reason, now, &mut t);
                    }
                }
                self.error = Some(reason);
                self.deadline = None;
                self.status = RunStatus::Running;
                t.run_changed = true;
                self.recount(plan);
            }
            Event::Pause => {
                if !matches!(self.status, RunStatus::Running | RunStatus::NeedsAttention) {
                    t.effects.push(Effect::Refused(format!(
                        "only a running run can be paused; this one is {}",
                        self.status.as_str()
                    )));
                    return t;
                }
                self.status = RunStatus::Paused;
                // Nothing is dispatched while paused; the resume looks at every pending step.
                self.deferred.clear();
                t.run_changed = true;
                return t;
            }
            Event::Resume => {
                if self.status != RunStatus::Paused {
                    t.effects.push(Effect::Refused(format!(
                        "only a paused run can be resumed; this one is {}",
                        self.status.as_str()
                    )));
                    return t;
                }
                self.status = if self.attention > 0 {
                    RunStatus::NeedsAttention
                } else {
                    RunStatus::Running
                };
                t.run_changed = true;
                for i in 0..self.steps.len() {
                    match self.steps[i].status {
                        StepStatus::Pending
                            if i < plan.nodes.len() && plan.nodes[i].role == Role::Main =>
                        {
                            self.start_if_ready(plan, i, now, &mut t)
                        }
                        // A retry that came due while paused.
                        StepStatus::Waiting if self.steps[i].wake_at.is_none_or(|at| at <= now) => {
                            self.dispatch(plan, i, now, &mut t)
                        }
                        _ => {}
                    }
                }
                let mut fanouts: Vec<usize> = self.fanouts.keys().copied().collect();
                fanouts.sort_unstable();
                for node in fanouts {
                    self.start_instances(plan, node, now, &mut t);
                }
            }
            Event::Settle { step, output } => {
                let Some(current) = self.steps.get(step).map(|s| s.status) else {
                    t.effects
                        .push(Effect::Refused(format!("the run has no step {step}")));
                    return t;
                };
                if plan.nodes[step].role == Role::Compensation
                    && self.status != RunStatus::RollingBack
                {
                    t.effects.push(Effect::Refused(format!(
                        "`{}` is a compensation: it can be skipped or completed only while its run rolls back",
                        plan.nodes[step].id
                    )));
                    return t;
                }
                let reopen = self.status == RunStatus::Failure && current == StepStatus::Failure;
                if !reopen && (self.status.is_terminal() || current.is_terminal()) {
                    t.effects.push(Effect::Refused(format!(
                        "step `{}` is {} in a run that is {}; only a step that has not ended, or a failed step of a failed run, can be skipped or completed",
                        plan.nodes[step].id,
                        current.as_str(),
                        self.status.as_str()
                    )));
                    return t;
                }
                if reopen {
                    self.reopen(plan, &[step], &mut t);
                }
                // A running attempt it ends is told to stop, as a cancel would.
                if let (StepStatus::Running, Some(task_id)) = (current, self.steps[step].task_id) {
                    self.cancel_attempt(step, task_id, &mut t);
                }
                let (status, reason) = match output {
                    Some(output) => {
                        self.steps[step].output = Some(output);
                        (StepStatus::Success, None)
                    }
                    None => (
                        StepStatus::Skipped,
                        Some("skipped by an operator".to_string()),
                    ),
                };
                self.steps[step].error = reason;
                self.finish(plan, step, status, now, &mut t);
            }
        }
        self.fill_window(plan, now, &mut t);
        self.settle_run(plan, now, &mut t);
        t
    }

    /// Skips the steps the run's subset leaves out, before anything started. They never ran,
    /// so they have no start or end time.
    fn leave_out(&mut self, plan: &Plan, t: &mut Transition) {
        if self.subset.is_empty() {
            return;
        }
        for i in 0..plan.nodes.len() {
            if let Some(reason) = self.subset.left_out(plan, i) {
                let s = &mut self.steps[i];
                s.status = StepStatus::Skipped;
                s.error = Some(reason);
                t.touch(i);
            }
        }
        self.recount(plan);
    }

    /// The outputs of the steps `step` depends on, by step id: the `inputs` of its task. A
    /// compensation's are the output of the step it undoes.
    pub fn inputs_for(&self, plan: &Plan, step: usize) -> Map<String, Value> {
        let node = &plan.nodes[self.node_of(step)];
        node.deps
            .iter()
            .chain(&node.compensates)
            .filter_map(|&d| {
                let output = self.steps[d].output.clone()?;
                Some((plan.nodes[d].id.clone(), output))
            })
            .collect()
    }

    /// Puts a failed run back to running around `steps`: they, the steps that were skipped
    /// because of them and the failure handlers become pending again.
    fn reopen(&mut self, plan: &Plan, steps: &[usize], t: &mut Transition) {
        let mut stack = steps.to_vec();
        while let Some(i) = stack.pop() {
            let s = &mut self.steps[i];
            if !steps.contains(&i) && s.status != StepStatus::UpstreamFailed {
                continue;
            }
            s.status = StepStatus::Pending;
            s.ended_at = None;
            s.error = None;
            t.touch(i);
            stack.extend(&plan.nodes[i].dependents);
        }
        for (i, node) in plan.nodes.iter().enumerate() {
            if node.role == Role::OnFailure && self.subset.left_out(plan, i).is_none() {
                self.steps[i] = StepState {
                    attempt: self.steps[i].attempt,
                    ..StepState::default()
                };
                t.touch(i);
            }
        }
        self.status = RunStatus::Running;
        self.ended_at = None;
        self.error = None;
        self.recount(plan);
        t.run_changed = true;
    }

    /// A step whose attempts of the current strike are used up moves to the next strike: its
    /// fallback runs (strike 2), else it escalates when it has a channel to (strike 3), else it
    /// fails. Its `error` already says why the last attempt failed.
    fn strike_out(&mut self, plan: &Plan, step: usize, now: DateTime<Utc>, t: &mut Transition) {
        let node = &plan.nodes[self.node_of(step)];
        if self.steps[step].strike == Strike::Retries && node.fallback.is_some() {
            let s = &mut self.steps[step];
            s.strike = Strike::Fallback;
            s.strike_base = s.attempt;
            s.lost = 0;
            t.effects.push(Effect::Strike {
                step,
                strike: Strike::Fallback,
            });
            match self.task_params(plan, step) {
                Ok(_) if self.status == RunStatus::Paused => {
                    let s = &mut self.steps[step];
                    s.status = StepStatus::Waiting;
                    s.deadline = None;
                    s.wake_at = None;
                    t.touch(step);
                    return;
                }
                Ok(_) => return self.dispatch(plan, step, now, t),
                Err(e) => self.steps[step].error = Some(format!("fallback params: {e}")),
            }
        }
        if node.escalate.is_some() {
            let s = &mut self.steps[step];
            s.strike = Strike::Escalated;
            s.status = StepStatus::NeedsAttention;
            s.deadline = None;
            s.wake_at = None;
            t.touch(step);
            self.attention += 1;
            if self.status == RunStatus::Running {
                self.status = RunStatus::NeedsAttention;
                t.run_changed = true;
            }
            t.effects.push(Effect::Strike {
                step,
                strike: Strike::Escalated,
            });
        } else {
            self.settle(plan, step, StepStatus::Failure, now, t);
        }
    }

    /// An operator's retry starts a step over at strike 1, with its whole retry budget.
    fn restart(&mut self, step: usize) {
        let s = &mut self.steps[step];
        s.strike = Strike::Retries;
        s.strike_base = s.attempt;
        s.lost = 0;
        s.ended_at = None;
    }

    /// Dispatches a step, or defers it if it is to start and the window is full (or steps
    /// deferred before it wait).
    fn dispatch(&mut self, plan: &Plan, step: usize, now: DateTime<Utc>, t: &mut Transition) {
        let s = &self.steps[step];
        let starts = s.status == StepStatus::Pending
            && s.instance.is_none()
            && plan.nodes[step].role == Role::Main;
        let full = self.outstanding >= self.window
            || self.deferred.first().is_some_and(|&first| first < step);
        if starts && full {
            self.deferred.insert(step);
            return;
        }
        self.dispatch_now(plan, step, now, t);
    }

    /// Tells the worker of the running attempt of `slot` to stop; its place in the window frees.
    fn cancel_attempt(&mut self, slot: usize, task_id: Uuid, t: &mut Transition) {
        t.effects.push(Effect::Cancelled {
            step: slot,
            attempt: self.steps[slot].attempt,
            task_id,
        });
        self.attempt_over();
    }

    /// An outstanding attempt ended or was cancelled: its place in the window frees.
    fn attempt_over(&mut self) {
        debug_assert!(
            self.outstanding > 0,
            "an attempt ended that was not counted"
        );
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    /// Dispatches deferred steps, then instances of fan-outs, while the window has room.
    fn fill_window(&mut self, plan: &Plan, now: DateTime<Utc>, t: &mut Transition) {
        if !matches!(self.status, RunStatus::Running | RunStatus::NeedsAttention) {
            return;
        }
        while self.outstanding < self.window {
            let Some(step) = self.deferred.pop_first() else {
                break;
            };
            self.dispatch_now(plan, step, now, t);
        }
        if self.outstanding < self.window {
            let mut waiting: Vec<usize> = self
                .fanouts
                .iter()
                .filter(|(_, f)| f.started < f.len)
                .map(|(&node, _)| node)
                .collect();
            waiting.sort_unstable();
            for node in waiting {
                self.start_instances(plan, node, now, t);
            }
        }
    }

    fn dispatch_now(&mut self, plan: &Plan, step: usize, now: DateTime<Utc>, t: &mut Transition) {
        self.deferred.remove(&step);
        let node = &plan.nodes[self.node_of(step)];
        let fallback = self.steps[step].strike.is_fallback();
        let task_id = Uuid::new_v4();
        let agent = node.target(fallback).0;
        let probe = Probe {
            run_id: self.id,
            step,
            task_id,
        };
        // The limits first: a breaker takes the dispatch it admits as its probe.
        if !self.limits.allows(agent, now) {
            return self.hold(step, agent, true, t);
        }
        if self.breakers.admit(agent, probe, now) == Admission::Hold {
            return self.hold(step, agent, false, t);
        }
        self.limits.take(agent, now);
        self.outstanding += 1;
        let s = &mut self.steps[step];
        let plan_timeout = node.attempt_timeout(fallback);
        s.attempt += 1;
        s.status = StepStatus::Running;
        s.task_id = Some(task_id);
        s.held = None;
        s.wake_at = None;
        s.deadline = plan_timeout
            .map(|t| now + chrono::Duration::from_std(t).unwrap_or(chrono::Duration::MAX));
        s.started_at.get_or_insert(now);
        t.touch(step);
        t.effects.push(Effect::Dispatch {
            step,
            attempt: s.attempt,
            task_id,
        });
    }

    /// Holds a step its agent's breaker or limit did not admit: it waits, with no attempt and
    /// no timeout running, until [`Event::Release`]. Holding a held step again changes nothing.
    fn hold(&mut self, step: usize, agent: &str, by_limit: bool, t: &mut Transition) {
        let s = &mut self.steps[step];
        if s.held.is_some() {
            return;
        }
        s.status = StepStatus::Waiting;
        s.wake_at = None;
        s.deadline = None;
        s.held = Some(agent.to_string());
        t.touch(step);
        t.effects.push(Effect::Held {
            step,
            agent: agent.to_string(),
            by_limit,
        });
    }

    /// Puts a step in a final state and starts whatever that makes ready. Iterative, so a long
    /// chain of skipped steps cannot overflow the stack.
    fn finish(
        &mut self,
        plan: &Plan,
        step: usize,
        status: StepStatus,
        now: DateTime<Utc>,
        t: &mut Transition,
    ) {
        let mut settled = vec![(step, status)];
        while let Some((i, status)) = settled.pop() {
            let s = &mut self.steps[i];
            if s.status.is_terminal() {
                continue;
            }
            if s.status == StepStatus::NeedsAttention {
                self.attention -= 1;
            }
            s.status = status;
            s.wake_at = None;
            s.held = None;
            s.deadline = None;
            s.ended_at = Some(now);
            t.touch(i);
            self.deferred.remove(&i);
            if self.fanouts.contains_key(&i) {
                self.stop_instances(i, now, t);
            }
            match plan.nodes[i].role {
                Role::Main => {
                    self.unfinished_main -= 1;
                    if status.blocks_dependents() {
                        self.failed_main += 1;
                    }
                }
                Role::OnFailure => self.unfinished_handlers -= 1,
                Role::Compensation => {}
            }
            for &d in &plan.nodes[i].dependents {
                self.unfinished_deps[d] -= 1;
                if let Some(next) = self.readiness(plan, d) {
                    match next {
                        Ready::Run => self.dispatch(plan, d, now, t),
                        Ready::Expand(items) => self.expand(plan, d, items, now, t),
                        Ready::Settle(status, reason) => {
                            self.steps[d].error = Some(reason);
                            settled.push((d, status));
                        }
                    }
                }
            }
        }
    }

    fn start_if_ready(&mut self, plan: &Plan, step: usize, now: DateTime<Utc>, t: &mut Transition) {
        match self.readiness(plan, step) {
            Some(Ready::Run) => self.dispatch(plan, step, now, t),
            Some(Ready::Expand(items)) => self.expand(plan, step, items, now, t),
            Some(Ready::Settle(status, reason)) => {
                self.steps[step].error = Some(reason);
                self.finish(plan, step, status, now, t);
            }
            None => {}
        }
    }

    /// What a pending step whose dependencies may have finished should do now.
    fn readiness(&self, plan: &Plan, step: usize) -> Option<Ready> {
        let node = &plan.nodes[step];
        // A paused run holds every step; resuming looks at them all again.
        if self.steps[step].status != StepStatus::Pending
            || self.status == RunStatus::Paused
            || self.unfinished_deps[step] > 0
        {
            return None;
        }
        let blocked_by = node
            .deps
            .iter()
            .find(|&&d| self.steps[d].status.blocks_dependents());
        if let Some(&d) = blocked_by {
            return Some(Ready::Settle(
                StepStatus::UpstreamFailed,
                format!("upstream failed: `{}`", plan.nodes[d].id),
            ));
        }
        let Some(condition) = &node.condition else {
            return Some(self.ready_to_run(plan, step));
        };
        let verdict = condition.evaluate(&self.params, |name| {
            let Some(i) = plan.node_index(name) else {
                return self.bare_name(name).map(Binding::Value);
            };
            let s = &self.steps[i];
            let finished = match s.status {
                StepStatus::Success => Finished::Success,
                StepStatus::Failure | StepStatus::UpstreamFailed | StepStatus::Cancelled => {
                    Finished::Failure
                }
                StepStatus::Skipped => Finished::Skipped,
                _ => return None,
            };
            Some(Binding::Step(finished, s.output.as_ref()))
        });
        Some(match verdict {
            Ok(true) => self.ready_to_run(plan, step),
            Ok(false) => Ready::Settle(
                StepStatus::Skipped,
                format!("condition is false: {}", condition.source()),
            ),
            Err(e) => Ready::Settle(StepStatus::Failure, format!("condition failed: {e}")),
        })
    }

    /// A bare name in a condition: the field of that name in the output of the step that
    /// finished last among those that have it, or else the run param of that name.
    fn bare_name(&self, name: &str) -> Option<Value> {
        self.steps
            .iter()
            .filter(|s| s.status == StepStatus::Success && s.instance.is_none())
            .filter_map(|s| Some((s.ended_at, s.output.as_ref()?.as_object()?.get(name)?)))
            .max_by_key(|(ended, _)| *ended)
            .map(|(_, v)| v.clone())
            .or_else(|| self.params.get(name).cloned())
    }

    /// A step whose dependencies and condition allow it to run runs, unless its params cannot
    /// be rendered.
    fn ready_to_run(&self, plan: &Plan, step: usize) -> Ready {
        if plan.nodes[step].for_each.is_some() {
            return match self.for_each_items(plan, step) {
                Ok(items) => Ready::Expand(items),
                Err(e) => Ready::Settle(StepStatus::Failure, e),
            };
        }
        match self.task_params(plan, step) {
            Ok(_) => Ready::Run,
            Err(e) => Ready::Settle(StepStatus::Failure, format!("params: {e}")),
        }
    }

    /// The params a slot's task carries: its node's own (or its fallback's), with `${{ … }}`
    /// templates rendered (for an instance, with its `item` and `index`).
    pub fn task_params(&self, plan: &Plan, slot: usize) -> Result<Map<String, Value>, String> {
        let node = &plan.nodes[self.node_of(slot)];
        let (params, reads) = node.call_params(self.steps[slot].strike.is_fallback());
        let Some(reads) = reads else {
            return Ok(params.clone());
        };
        let item = self.steps[slot]
            .instance
            .as_ref()
            .map(|i| (&i.item, i.index));
        let steps = self.template_steps(plan, reads.iter());
        crate::template::render(params, &self.params, steps, item)
    }

    /// What templates see as `steps`: the status and output of the steps they read.
    fn template_steps<'a>(
        &self,
        plan: &Plan,
        reads: impl Iterator<Item = &'a usize>,
    ) -> Map<String, Value> {
        reads
            .map(|&i| {
                let s = &self.steps[i];
                let value = serde_json::json!({
                    "output": s.output.clone().unwrap_or(Value::Null),
                    "status": s.status.as_str(),
                });
                (plan.nodes[i].id.clone(), value)
            })
            .collect()
    }

    /// The items a `for_each` node runs over, or why it cannot run.
    fn for_each_items(&self, plan: &Plan, step: usize) -> Result<Vec<Value>, String> {
        let for_each = plan.nodes[step].for_each.as_ref().expect("a for_each node");
        let source = &for_each.items;
        let steps = self.template_steps(plan, for_each.reads.iter());
        let value = crate::template::render_text(source, &self.params, steps)
            .map_err(|e| format!("for_each: {e}"))?;
        let items = match value {
            Value::Array(items) => items,
            other => {
                return Err(format!(
                    "for_each: `{source}` gives {}, not a list",
                    json_type(&other)
                ));
            }
        };
        if items.len() > self.max_instances {
            return Err(format!(
                "for_each: `{source}` gives {} items; a step may have at most {} instances",
                items.len(),
                self.max_instances
            ));
        }
        Ok(items)
    }

    /// Starts a `for_each` node: one slot per item after the existing ones, the first
    /// `max_parallel` of them dispatched. An empty list succeeds at once with an empty output.
    fn expand(
        &mut self,
        plan: &Plan,
        node: usize,
        items: Vec<Value>,
        now: DateTime<Utc>,
        t: &mut Transition,
    ) {
        let first = self.steps.len();
        let len = items.len();
        for (index, item) in items.into_iter().enumerate() {
            self.steps.push(StepState {
                instance: Some(Instance { node, index, item }),
                ..StepState::default()
            });
            t.touch(first + index);
        }
        self.fanouts.insert(
            node,
            FanOut {
                first,
                len,
                started: 0,
                active: 0,
                succeeded: 0,
            },
        );
        let s = &mut self.steps[node];
        s.status = StepStatus::Running;
        s.started_at.get_or_insert(now);
        t.touch(node);
        if len == 0 {
            self.steps[node].output = Some(Value::Array(Vec::new()));
            self.finish(plan, node, StepStatus::Success, now, t);
        } else {
            self.start_instances(plan, node, now, t);
        }
    }

    /// After an operator's retry of a failed `for_each` node: its instances that did not
    /// succeed run again; those that did keep their output.
    fn restart_instances(
        &mut self,
        plan: &Plan,
        node: usize,
        now: DateTime<Utc>,
        t: &mut Transition,
    ) {
        let mut f = self.fanouts[&node];
        let mut pending = Vec::new();
        for slot in f.first..f.first + f.len {
            let s = &mut self.steps[slot];
            if s.status != StepStatus::Success {
                s.status = StepStatus::Pending;
                s.error = None;
                t.touch(slot);
                pending.push(slot);
            }
        }
        for &slot in &pending {
            self.restart(slot);
        }
        // Instances start in order: move the ones to run again to the front by restarting the
        // count of started ones at the first of them.
        f.started = pending.first().map_or(f.len, |&slot| slot - f.first);
        f.active = 0;
        self.fanouts.insert(node, f);
        let s = &mut self.steps[node];
        s.status = StepStatus::Running;
        t.touch(node);
        self.start_instances(plan, node, now, t);
    }

    /// Dispatches pending instances of a running `for_each` node up to its `max_parallel`.
    fn start_instances(
        &mut self,
        plan: &Plan,
        node: usize,
        now: DateTime<Utc>,
        t: &mut Transition,
    ) {
        let Some(&f) = self.fanouts.get(&node) else {
            return;
        };
        if self.status == RunStatus::Paused || self.steps[node].status != StepStatus::Running {
            return;
        }
        let max_parallel = plan.nodes[node]
            .for_each
            .as_ref()
            .map_or(usize::MAX, |e| e.max_parallel);
        let (mut started, mut active) = (f.started, f.active);
        while active < max_parallel && started < f.len && self.outstanding < self.window {
            let slot = f.first + started;
            started += 1;
            // Instances that succeeded before an operator's retry keep their output.
            if self.steps[slot].status != StepStatus::Pending {
                continue;
            }
            active += 1;
            self.fanouts.insert(
                node,
                FanOut {
                    started,
                    active,
                    ..f
                },
            );
            match self.task_params(plan, slot) {
                Ok(_) => self.dispatch(plan, slot, now, t),
                Err(e) => {
                    self.steps[slot].error = Some(format!("params: {e}"));
                    self.instance_ended(plan, slot, StepStatus::Failure, now, t);
                    return;
                }
            }
        }
        if let Some(f) = self.fanouts.get_mut(&node) {
            f.started = started;
            f.active = active;
        }
    }

    /// Puts a slot in a final state: an instance, or a step.
    fn settle(
        &mut self,
        plan: &Plan,
        slot: usize,
        status: StepStatus,
        now: DateTime<Utc>,
        t: &mut Transition,
    ) {
        if self.steps[slot].instance.is_some() {
            self.instance_ended(plan, slot, status, now, t);
        } else {
            self.finish(plan, slot, status, now, t);
        }
    }

    /// An instance ended: the next one starts; the last success ends its node with the list of
    /// outputs, a failure ends it failed.
    fn instance_ended(
        &mut self,
        plan: &Plan,
        slot: usize,
        status: StepStatus,
        now: DateTime<Utc>,
        t: &mut Transition,
    ) {
        let s = &mut self.steps[slot];
        s.status = status;
        s.wake_at = None;
        s.held = None;
        s.deadline = None;
        s.ended_at = Some(now);
        t.touch(slot);
        let instance = s.instance.as_ref().expect("an instance slot");
        let (node, index) = (instance.node, instance.index);
        let f = self
            .fanouts
            .get_mut(&node)
            .expect("an instance has a fan-out");
        f.active -= 1;
        if status == StepStatus::Success {
            f.succeeded += 1;
            if f.succeeded == f.len {
                let f = *f;
                let outputs = self.steps[f.first..f.first + f.len]
                    .iter()
                    .map(|s| s.output.clone().unwrap_or(Value::Null))
                    .collect();
                self.steps[node].output = Some(Value::Array(outputs));
                self.steps[node].error = None;
                self.finish(plan, node, StepStatus::Success, now, t);
            } else {
                self.start_instances(plan, node, now, t);
            }
        } else {
            let reason = self.steps[slot].error.clone().unwrap_or_default();
            self.steps[node].error = Some(format!("item {index} failed: {reason}"));
            self.finish(plan, node, StepStatus::Failure, now, t);
        }
    }

    /// A `for_each` node ended (failed, or settled by an operator): its instances not ended
    /// yet are cancelled.
    fn stop_instances(&mut self, node: usize, now: DateTime<Utc>, t: &mut Transition) {
        let Some(f) = self.fanouts.get_mut(&node) else {
            return;
        };
        f.active = 0;
        f.started = f.len;
        let f = *f;
        for slot in f.first..f.first + f.len {
            self.cancel_slot(slot, "cancelled: its step ended", now, t);
        }
    }

    /// Ends a slot that has not ended as cancelled, telling its worker to stop a running attempt.
    /// The counters other than `attention` are the caller's to keep.
    fn cancel_slot(&mut self, slot: usize, reason: &str, now: DateTime<Utc>, t: &mut Transition) {
        let s = &mut self.steps[slot];
        if s.status.is_terminal() {
            return;
        }
        if s.status == StepStatus::NeedsAttention {
            self.attention -= 1;
        }
        if let (StepStatus::Running, Some(task_id)) = (s.status, s.task_id) {
            // A cancelled attempt is no outcome; a cancelled probe lets the next one go.
            self.breakers.forget_probe(task_id);
            self.cancel_attempt(slot, task_id, t);
        }
        let s = &mut self.steps[slot];
        s.status = StepStatus::Cancelled;
        s.wake_at = None;
        s.held = None;
        s.deadline = None;
        s.ended_at = Some(now);
        s.error = Some(reason.into());
        t.touch(slot);
        self.deferred.remove(&slot);
    }

    /// Moves the run on when its steps are done: to success, to its failure handlers, or to
    /// failure.
    fn settle_run(&mut self, plan: &Plan, now: DateTime<Utc>, t: &mut Transition) {
        if self.status == RunStatus::NeedsAttention && self.attention == 0 {
            self.status = RunStatus::Running;
            t.run_changed = true;
        }
        if self.status == RunStatus::Running && self.unfinished_main == 0 {
            // Nothing runs any more that the deadline could stop.
            self.deadline = None;
            if self.failed_main == 0 && self.error.is_none() {
                // Failure handlers of a successful run never run (those left out by the
                // subset keep their reason).
                let handlers: Vec<usize> = plan
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|&(i, n)| {
                        n.role == Role::OnFailure && !self.steps[i].status.is_terminal()
                    })
                    .map(|(i, _)| i)
                    .collect();
                for i in handlers {
                    self.steps[i].error = Some("the run did not fail".into());
                    self.finish(plan, i, StepStatus::Skipped, now, t);
                }
                self.end(plan, RunStatus::Success, now, t);
            } else if self.unfinished_handlers > 0 {
                self.status = RunStatus::Failing;
                t.run_changed = true;
                let handlers: Vec<usize> = plan
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.role == Role::OnFailure)
                    .map(|(i, _)| i)
                    .collect();
                for i in handlers {
                    self.start_if_ready(plan, i, now, t);
                }
            } else {
                self.failed(plan, now, t);
            }
        }
        if self.status == RunStatus::Failing && self.unfinished_handlers == 0 {
            self.failed(plan, now, t);
        }
        if self.status == RunStatus::RollingBack {
            self.advance_rollback(plan, now, t);
        }
    }

    /// The run failed and its failure handlers are done: it ends, or rolls back first when its
    /// definition says so.
    fn failed(&mut self, plan: &Plan, now: DateTime<Utc>, t: &mut Transition) {
        if plan.rollback {
            self.roll_back(plan, now, t);
        } else {
            self.end(plan, RunStatus::Failure, now, t);
        }
    }

    /// Starts rolling back: the compensations of the steps that succeeded that are not done yet
    /// become pending, with their whole retry budget, and the first of them runs.
    fn roll_back(&mut self, plan: &Plan, now: DateTime<Utc>, t: &mut Transition) {
        self.status = RunStatus::RollingBack;
        self.deadline = None;
        t.run_changed = true;
        self.rollback = self.rollback_order(plan);
        self.rollback_next = 0;
        for &slot in &self.rollback {
            let s = &mut self.steps[slot];
            if s.status != StepStatus::Success {
                *s = StepState {
                    attempt: s.attempt,
                    strike_base: s.attempt,
                    ..StepState::default()
                };
                t.touch(slot);
            }
        }
        self.advance_rollback(plan, now, t);
    }

    /// Moves a rollback on: past the compensations that are done, to the next one (started when
    /// pending), to `rolled_back` when none is left, or to `rollback_failed` at one that failed.
    fn advance_rollback(&mut self, plan: &Plan, now: DateTime<Utc>, t: &mut Transition) {
        while let Some(&slot) = self.rollback.get(self.rollback_next) {
            match self.steps[slot].status {
                StepStatus::Success | StepStatus::Skipped => self.rollback_next += 1,
                StepStatus::Pending => match self.task_params(plan, slot) {
                    Ok(_) => return self.dispatch(plan, slot, now, t),
                    Err(e) => {
                        self.steps[slot].error = Some(format!("params: {e}"));
                        self.finish(plan, slot, StepStatus::Failure, now, t);
                    }
                },
                StepStatus::Failure | StepStatus::UpstreamFailed | StepStatus::Cancelled => {
                    let step = plan.nodes[slot].compensates.expect("a compensation node");
                    self.error = Some(format!(
                        "rollback failed: step `{}` could not be undone: {}",
                        plan.nodes[step].id,
                        self.steps[slot].error.as_deref().unwrap_or("no message")
                    ));
                    return self.end(plan, RunStatus::RollbackFailed, now, t);
                }
                StepStatus::Running | StepStatus::Waiting | StepStatus::NeedsAttention => return,
            }
        }
        self.end(plan, RunStatus::RolledBack, now, t);
    }

    fn end(&mut self, plan: &Plan, status: RunStatus, now: DateTime<Utc>, t: &mut Transition) {
        self.status = status;
        self.ended_at = Some(now);
        self.deadline = None;
        self.rollback.clear();
        self.deferred.clear();
        t.run_changed = true;
        // Compensations that did not run will not: say why, so that the run shows no pending
        // step once it has ended.
        let reason = match status {
            RunStatus::RolledBack => "not run: its step did not succeed",
            RunStatus::RollbackFailed => "not run: the rollback stopped at a failed compensation",
            _ => "not run: the run was not rolled back",
        };
        let pending: Vec<usize> = (0..plan.nodes.len())
            .filter(|&i| {
                plan.nodes[i].role == Role::Compensation
                    && self.steps[i].status == StepStatus::Pending
            })
            .collect();
        for slot in pending {
            let s = &mut self.steps[slot];
            s.status = StepStatus::Skipped;
            s.error = Some(reason.into());
            t.touch(slot);
        }
        t.effects.push(Effect::RunEnded(status));
    }
}

enum Ready {
    Run,
    /// A `for_each` node runs over these items.
    Expand(Vec<Value>),
    Settle(StepStatus, String),
}

/// A duration as users write it: `90s`, `5m`, `1h`, `1500ms`.
fn human(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms > 0 && ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms > 0 && ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

fn to_chrono(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// A JSON value's type, for messages.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// How long the step of a lost attempt waits for its new one: from half a second to two and a
/// half, picked by the lost attempt's task id. The tasks that one crash took down together — a
/// poison task and those delivered beside it — are so dispatched apart, not side by side in the
/// queue again, where the poison would take the others down with it a second time.
fn lost_retry_pause(task_id: Uuid) -> std::time::Duration {
    std::time::Duration::from_millis(500 + (jitter_unit(task_id) * 2_000.0) as u64)
}

/// A number in `[0, 1)` picked by the failed attempt's task id, so that the jitter of a retry is
/// random across steps yet reproducible for one attempt.
fn jitter_unit(task_id: Uuid) -> f64 {
    // The id's last 64 bits, less the two of its variant, which are the same in every id.
    let random = (task_id.as_u128() as u64) << 2;
    (random >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod held_tests;

#[cfg(test)]
mod rollback_tests;
