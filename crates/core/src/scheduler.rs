//! A run as a state machine: [`RunState::apply`] takes one [`Event`] and returns the
//! [`Transition`] — which steps changed and the effects to carry out (tasks to dispatch, attempts
//! to record, the run's end). The caller persists the changed state and the effects in one
//! transaction before acting on any of them.
//!
//! Fencing lives here: a result counts only for the current attempt of a running step, carrying
//! that attempt's task id; anything else is reported as [`Effect::Stale`] and changes nothing.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::condition::{Binding, Finished};
use crate::plan::{Plan, Role};

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
}

impl RunStatus {
    /// Every status a run can have.
    pub const ALL: [RunStatus; 7] = [
        Self::Running,
        Self::Paused,
        Self::Failing,
        Self::Success,
        Self::Failure,
        Self::Cancelled,
        Self::NeedsAttention,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Cancelled)
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
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "needs_attention" => Self::NeedsAttention,
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
    unfinished_main: usize,
    unfinished_handlers: usize,
    failed_main: usize,
    /// Steps in [`StepStatus::NeedsAttention`].
    attention: usize,
}

/// Something that happened to a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The run was created: start the steps that depend on nothing.
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
    /// shared a crashing worker with a poison one). The step gets a new attempt at once,
    /// outside its retry budget, up to [`MAX_LOST_ATTEMPTS`]; past that it fails.
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
            unfinished_main: 0,
            unfinished_handlers: 0,
            failed_main: 0,
            attention: 0,
        };
        for (node, step) in plan.nodes.iter().zip(&run.steps) {
            match (node.role, step.status.is_terminal()) {
                (Role::Main, false) => run.unfinished_main += 1,
                (Role::OnFailure, false) => run.unfinished_handlers += 1,
                _ => {}
            }
            if node.role == Role::Main && step.status.blocks_dependents() {
                run.failed_main += 1;
            }
            if step.status == StepStatus::NeedsAttention {
                run.attention += 1;
            }
        }
        run
    }

    /// Applies one event at time `now`.
    pub fn apply(&mut self, plan: &Plan, event: Event, now: DateTime<Utc>) -> Transition {
        debug_assert_eq!(plan.nodes.len(), self.steps.len());
        let mut t = Transition::default();
        match event {
            Event::Start => {
                if self.status == RunStatus::Running
                    && self
                        .steps
                        .iter()
                        .all(|s| s.status == StepStatus::Pending && s.attempt == 0)
                {
                    let roots: Vec<usize> = plan
                        .nodes
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| n.role == Role::Main && n.deps.is_empty())
                        .map(|(i, _)| i)
                        .collect();
                    for i in roots {
                        self.start_if_ready(plan, i, now, &mut t);
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
                let (success, error) = match &outcome {
                    Outcome::Success(_) => (true, None),
                    Outcome::Failure { message, .. } | Outcome::Lost { message } => {
                        (false, Some(message.clone()))
                    }
                };
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
                        self.finish(plan, step, StepStatus::Success, now, &mut t);
                    }
                    Outcome::Failure { message, retryable } => {
                        let s = &self.steps[step];
                        let policy = plan.nodes[step].retry_policy(s.strike.is_fallback());
                        // The budget counts the attempts of this strike; attempts lost to the
                        // infrastructure do not use it up.
                        let made = attempt.saturating_sub(s.strike_base);
                        let used = made.saturating_sub(s.lost);
                        self.steps[step].error = Some(message);
                        if retryable && policy.allows_retry_after(used) {
                            let delay = policy.delay_after(made, jitter_unit(task_id));
                            let due = now
                                + chrono::Duration::from_std(delay)
                                    .unwrap_or(chrono::Duration::MAX);
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
                            if self.status == RunStatus::Paused {
                                s.status = StepStatus::Waiting;
                                s.deadline = None;
                                s.wake_at = None;
                                t.touch(step);
                            } else {
                                self.dispatch(plan, step, now, &mut t);
                            }
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
                    Some(i) => self
                        .steps
                        .get(i)
                        .filter(|s| s.status == StepStatus::Failure)
                        .map(|_| i)
                        .into_iter()
                        .collect(),
                    None => (0..self.steps.len())
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
                    self.restart(i);
                    self.dispatch(plan, i, now, &mut t);
                }
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
                    let s = &mut self.steps[i];
                    if s.status.is_terminal() {
                        continue;
                    }
                    if let (StepStatus::Running, Some(task_id)) = (s.status, s.task_id) {
                        t.effects.push(Effect::Cancelled {
                            step: i,
                            attempt: s.attempt,
                            task_id,
                        });
                    }
                    s.status = StepStatus::Cancelled;
                    s.wake_at = None;
                    s.deadline = None;
                    s.ended_at = Some(now);
                    s.error = Some("cancelled".into());
                    t.touch(i);
                }
                let steps = std::mem::take(&mut self.steps);
                let params = std::mem::take(&mut self.params);
                *self = Self::restore(self.id, plan, RunStatus::Cancelled, params, steps, None);
                self.end(RunStatus::Cancelled, now, &mut t);
                return t;
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
                        StepStatus::Pending if plan.nodes[i].role == Role::Main => {
                            self.start_if_ready(plan, i, now, &mut t)
                        }
                        // A retry that came due while paused.
                        StepStatus::Waiting if self.steps[i].wake_at.is_none_or(|at| at <= now) => {
                            self.dispatch(plan, i, now, &mut t)
                        }
                        _ => {}
                    }
                }
            }
            Event::Settle { step, output } => {
                let Some(current) = self.steps.get(step).map(|s| s.status) else {
                    t.effects
                        .push(Effect::Refused(format!("the run has no step {step}")));
                    return t;
                };
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
        self.settle_run(plan, now, &mut t);
        t
    }

    /// The outputs of the steps `step` depends on, by step id: the `inputs` of its task.
    pub fn inputs_for(&self, plan: &Plan, step: usize) -> Map<String, Value> {
        plan.nodes[step]
            .deps
            .iter()
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
            if node.role == Role::OnFailure {
                self.steps[i] = StepState {
                    attempt: self.steps[i].attempt,
                    ..StepState::default()
                };
                t.touch(i);
            }
        }
        let steps = std::mem::take(&mut self.steps);
        *self = Self::restore(
            self.id,
            plan,
            RunStatus::Running,
            std::mem::take(&mut self.params),
            steps,
            None,
        );
        t.run_changed = true;
    }

    /// A step whose attempts of the current strike are used up moves to the next strike: its
    /// fallback runs (strike 2), else it escalates when it has a channel to (strike 3), else it
    /// fails. Its `error` already says why the last attempt failed.
    fn strike_out(&mut self, plan: &Plan, step: usize, now: DateTime<Utc>, t: &mut Transition) {
        let node = &plan.nodes[step];
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
            self.finish(plan, step, StepStatus::Failure, now, t);
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

    fn dispatch(&mut self, plan: &Plan, step: usize, now: DateTime<Utc>, t: &mut Transition) {
        let s = &mut self.steps[step];
        let plan_timeout = plan.nodes[step].attempt_timeout(s.strike.is_fallback());
        s.attempt += 1;
        s.status = StepStatus::Running;
        let task_id = Uuid::new_v4();
        s.task_id = Some(task_id);
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
            s.deadline = None;
            s.ended_at = Some(now);
            t.touch(i);
            match plan.nodes[i].role {
                Role::Main => {
                    self.unfinished_main -= 1;
                    if status.blocks_dependents() {
                        self.failed_main += 1;
                    }
                }
                Role::OnFailure => self.unfinished_handlers -= 1,
            }
            for &d in &plan.nodes[i].dependents {
                if let Some(next) = self.readiness(plan, d) {
                    match next {
                        Ready::Run => self.dispatch(plan, d, now, t),
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
        if self.steps[step].status != StepStatus::Pending || self.status == RunStatus::Paused {
            return None;
        }
        let mut blocked_by = None;
        for &d in &node.deps {
            let status = self.steps[d].status;
            if !status.is_terminal() {
                return None;
            }
            if status.blocks_dependents() && blocked_by.is_none() {
                blocked_by = Some(d);
            }
        }
        if let Some(d) = blocked_by {
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
            .filter(|s| s.status == StepStatus::Success)
            .filter_map(|s| Some((s.ended_at, s.output.as_ref()?.as_object()?.get(name)?)))
            .max_by_key(|(ended, _)| *ended)
            .map(|(_, v)| v.clone())
            .or_else(|| self.params.get(name).cloned())
    }

    /// A step whose dependencies and condition allow it to run runs, unless its params cannot
    /// be rendered.
    fn ready_to_run(&self, plan: &Plan, step: usize) -> Ready {
        match self.task_params(plan, step) {
            Ok(_) => Ready::Run,
            Err(e) => Ready::Settle(StepStatus::Failure, format!("params: {e}")),
        }
    }

    /// The params a step's task carries: its own, with `${{ … }}` templates rendered.
    pub fn task_params(&self, plan: &Plan, step: usize) -> Result<Map<String, Value>, String> {
        let (params, reads) = plan.nodes[step].call_params(self.steps[step].strike.is_fallback());
        let Some(reads) = reads else {
            return Ok(params.clone());
        };
        let steps = reads
            .iter()
            .map(|&i| {
                let s = &self.steps[i];
                let value = serde_json::json!({
                    "output": s.output.clone().unwrap_or(Value::Null),
                    "status": s.status.as_str(),
                });
                (plan.nodes[i].id.clone(), value)
            })
            .collect();
        crate::template::render(params, &self.params, steps)
    }

    /// Moves the run on when its steps are done: to success, to its failure handlers, or to
    /// failure.
    fn settle_run(&mut self, plan: &Plan, now: DateTime<Utc>, t: &mut Transition) {
        if self.status == RunStatus::NeedsAttention && self.attention == 0 {
            self.status = RunStatus::Running;
            t.run_changed = true;
        }
        if self.status == RunStatus::Running && self.unfinished_main == 0 {
            if self.failed_main == 0 {
                // Failure handlers of a successful run never run.
                let handlers: Vec<usize> = plan
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.role == Role::OnFailure)
                    .map(|(i, _)| i)
                    .collect();
                for i in handlers {
                    self.steps[i].error = Some("the run did not fail".into());
                    self.finish(plan, i, StepStatus::Skipped, now, t);
                }
                self.end(RunStatus::Success, now, t);
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
                self.end(RunStatus::Failure, now, t);
            }
        }
        if self.status == RunStatus::Failing && self.unfinished_handlers == 0 {
            self.end(RunStatus::Failure, now, t);
        }
    }

    fn end(&mut self, status: RunStatus, now: DateTime<Utc>, t: &mut Transition) {
        self.status = status;
        self.ended_at = Some(now);
        t.run_changed = true;
        t.effects.push(Effect::RunEnded(status));
    }
}

enum Ready {
    Run,
    Settle(StepStatus, String),
}

/// A number in `[0, 1)` picked by the failed attempt's task id, so that the jitter of a retry is
/// random across steps yet reproducible for one attempt.
fn jitter_unit(task_id: Uuid) -> f64 {
    let bytes = task_id.as_u128().to_le_bytes();
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;
