//! Processes of a fleet under the harness's control: each one is owned by a task of its own
//! (its supervisor) that records how every incarnation ended, delivers the signals the test
//! asks for, and — when the process is supervised — starts the next incarnation after a crash,
//! as systemd or Kubernetes would.
//!
//! Signals go through the supervisor, which holds the child unreaped while it signals it, so a
//! signal can never reach an unrelated process that reused the pid.

use std::fmt;
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a graceful stop may take before the process is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(20);
/// A restarted process that dies within this long counts as crash-looping: the supervisor backs
/// off before the next start (RabbitMQ or Postgres may be down).
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A signal the harness sends to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `kill -9`: no cleanup, no flush, unacked deliveries go back to their queues.
    Kill,
    /// A graceful shutdown request.
    Term,
    /// Freezes the process: its TCP connections stay open, it sends nothing.
    Stop,
    /// Resumes a stopped process.
    Cont,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Kill => "KILL",
            Signal::Term => "TERM",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
        }
    }
}

/// How a process is started: extra environment, and whether it is restarted when it dies.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    env: Vec<(String, String)>,
    /// Environment of some incarnations only, e.g. a failpoint that should fire once.
    env_during: Vec<(Range<u32>, String, String)>,
    supervised: bool,
}

impl Launch {
    /// Started once; not restarted when it dies.
    pub fn once() -> Self {
        Self::default()
    }

    /// Restarted whenever it dies, until the fleet stops it.
    pub fn supervised() -> Self {
        Self {
            supervised: true,
            ..Self::default()
        }
    }

    /// Sets `key=value` in every incarnation's environment.
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets `key=value` in the environment of the incarnations in `incarnations` only (0 is the
    /// first start); a later setting of the same key wins.
    #[must_use]
    pub fn env_during(mut self, incarnations: Range<u32>, key: &str, value: &str) -> Self {
        self.env_during
            .push((incarnations, key.into(), value.into()));
        self
    }

    /// `FLOTILLA_FAILPOINTS=spec` for the first `incarnations` starts: the restarts after the
    /// crash run without it.
    #[must_use]
    pub fn failpoint_first(self, incarnations: u32, spec: &str) -> Self {
        self.failpoint_during(0..incarnations, spec)
    }

    /// `FLOTILLA_FAILPOINTS=spec` for the incarnations in `incarnations`.
    #[must_use]
    pub fn failpoint_during(self, incarnations: Range<u32>, spec: &str) -> Self {
        self.env_during(incarnations, "FLOTILLA_FAILPOINTS", spec)
    }

    pub fn is_supervised(&self) -> bool {
        self.supervised
    }

    /// The environment of incarnation `n` (0 for the first start).
    pub fn env_of(&self, n: u32) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(
            self.env_during
                .iter()
                .filter(|(during, _, _)| during.contains(&n))
                .map(|(_, k, v)| (k.clone(), v.clone())),
        );
        env
    }
}

/// What the harness knows about a managed process.
#[derive(Debug, Clone, Default)]
pub struct ProcessState {
    /// The pid of the running incarnation.
    pub pid: Option<u32>,
    /// How many incarnations were started.
    pub starts: u32,
    /// How each ended incarnation exited, in order.
    pub exits: Vec<ExitStatus>,
    /// Whether the running incarnation is frozen by SIGSTOP.
    pub frozen: bool,
    /// No incarnation runs and none will start again.
    pub finished: bool,
    /// Why the last start failed, if it did.
    pub spawn_error: Option<String>,
}

impl ProcessState {
    /// How many incarnations ended by `signal` (e.g. 6 for SIGABRT, 9 for SIGKILL).
    pub fn exits_by_signal(&self, signal: i32) -> usize {
        self.exits
            .iter()
            .filter(|s| s.signal() == Some(signal))
            .count()
    }
}

/// Builds the command of incarnation `n`.
pub type Recipe = Box<dyn FnMut(u32) -> Command + Send + Sync>;

enum Control {
    Signal(Signal, oneshot::Sender<anyhow::Result<()>>),
    /// Graceful stop (SIGCONT, then SIGTERM, then SIGKILL after a grace period); final.
    Terminate(oneshot::Sender<Option<ExitStatus>>),
}

/// A process owned by its supervisor task. Dropping it kills the process.
pub struct Managed {
    name: String,
    control: mpsc::UnboundedSender<Control>,
    state: watch::Receiver<ProcessState>,
    supervisor: JoinHandle<()>,
}

impl fmt::Debug for Managed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Managed")
            .field("name", &self.name)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Managed {
    /// Starts the first incarnation at once and hands the process to its supervisor.
    pub fn spawn(name: &str, recipe: Recipe, supervised: bool) -> anyhow::Result<Self> {
        let (state_tx, state) = watch::channel(ProcessState::default());
        let (control, inbox) = mpsc::unbounded_channel();
        let mut supervisor = Supervisor {
            name: name.to_string(),
            recipe,
            supervised,
            state: state_tx,
            inbox,
        };
        let first = supervisor
            .start(0)
            .with_context(|| format!("starting {name}"))?;
        let handle = tokio::spawn(supervisor.run(first));
        Ok(Self {
            name: name.to_string(),
            control,
            state,
            supervisor: handle,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A snapshot of what is known about the process.
    pub fn state(&self) -> ProcessState {
        self.state.borrow().clone()
    }

    /// Whether an incarnation is running (possibly frozen).
    pub fn is_running(&self) -> bool {
        self.state.borrow().pid.is_some()
    }

    /// Sends `signal` to the running incarnation; fails if none runs.
    pub async fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Control::Signal(signal, reply))
            .map_err(|_| anyhow::anyhow!("{} is no longer managed", self.name))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the supervisor of {} stopped", self.name))?
    }

    /// `kill -9`.
    pub async fn kill(&self) -> anyhow::Result<()> {
        self.signal(Signal::Kill).await
    }

    /// Waits until the state satisfies `condition`, at most `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl FnMut(&ProcessState) -> bool,
    ) -> anyhow::Result<ProcessState> {
        let mut state = self.state.clone();
        match tokio::time::timeout(timeout, state.wait_for(condition)).await {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => bail!("{}: its supervisor stopped before {what}", self.name),
            Err(_) => bail!(
                "{}: not {what} within {timeout:?}; state {:?}",
                self.name,
                *self.state.borrow()
            ),
        }
    }

    /// Waits until `n` incarnations have ended.
    pub async fn wait_exits(&self, n: usize, timeout: Duration) -> anyhow::Result<ProcessState> {
        self.wait_for(timeout, &format!("exited {n} times"), |s| {
            s.exits.len() >= n
        })
        .await
    }

    /// Stops the process for good: SIGCONT (a frozen process cannot drain), SIGTERM, and SIGKILL
    /// if it has not exited within 20 s. The request is sent at once; the future answers how
    /// the last incarnation exited.
    pub fn terminate(&self) -> impl Future<Output = Option<ExitStatus>> + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.control.send(Control::Terminate(reply)).is_ok();
        let last = self.state.borrow().exits.last().copied();
        async move {
            if sent {
                answer.await.ok().flatten().or(last)
            } else {
                last
            }
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // The supervisor owns the child with kill_on_drop: aborting it kills the process.
        self.supervisor.abort();
    }
}

struct Supervisor {
    name: String,
    recipe: Recipe,
    supervised: bool,
    state: watch::Sender<ProcessState>,
    inbox: mpsc::UnboundedReceiver<Control>,
}

impl Supervisor {
    fn start(&mut self, incarnation: u32) -> anyhow::Result<Child> {
        let mut command = (self.recipe)(incarnation);
        command.kill_on_drop(true);
        match command.spawn() {
            Ok(child) => {
                self.state.send_modify(|s| {
                    s.pid = child.id();
                    s.starts += 1;
                    s.frozen = false;
                    s.spawn_error = None;
                });
                Ok(child)
            }
            Err(e) => {
                self.state.send_modify(|s| {
                    s.spawn_error = Some(e.to_string());
                    s.finished = true;
                });
                Err(e.into())
            }
        }
    }

    async fn run(mut self, first: Child) {
        let mut child = first;
        let mut incarnation = 0;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let (status, terminating) = self.watch(&mut child).await;
            self.state.send_modify(|s| {
                s.pid = None;
                s.frozen = false;
                if let Some(status) = status {
                    s.exits.push(status);
                }
            });
            if let Some(reply) = terminating {
                self.finish();
                let _ = reply.send(status);
                break;
            }
            if !self.supervised {
                self.finish();
                break;
            }
            // Pacing of restarts, not synchronisation: a process that dies at once (its broker
            // or database is away) is not restarted in a tight loop.
            if started.elapsed() < CRASH_LOOP_WINDOW {
                if let Some(reply) = self.pause(backoff).await {
                    self.finish();
                    let _ = reply.send(status);
                    break;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            } else {
                backoff = FIRST_BACKOFF;
            }
            incarnation += 1;
            match self.start(incarnation) {
                Ok(next) => child = next,
                Err(e) => {
                    eprintln!("[harness] cannot restart {}: {e:#}", self.name);
                    break;
                }
            }
        }
        // Answer whatever still asks, so no caller waits forever.
        while let Some(control) = self.inbox.recv().await {
            match control {
                Control::Signal(signal, reply) => {
                    let _ = reply.send(Err(anyhow::anyhow!(
                        "{} is not running; cannot send SIG{}",
                        self.name,
                        signal.name()
                    )));
                }
                Control::Terminate(reply) => {
                    let _ = reply.send(self.state.borrow().exits.last().copied());
                }
            }
        }
    }

    fn finish(&self) {
        self.state.send_modify(|s| s.finished = true);
    }

    /// Waits for the child to exit, serving control messages meanwhile. Returns its exit status
    /// and, if it ended because of a terminate request, where to answer it.
    async fn watch(
        &mut self,
        child: &mut Child,
    ) -> (
        Option<ExitStatus>,
        Option<oneshot::Sender<Option<ExitStatus>>>,
    ) {
        let mut terminating: Option<oneshot::Sender<Option<ExitStatus>>> = None;
        let mut kill_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                status = child.wait() => return (status.ok(), terminating),
                () = sleep_until_opt(kill_at) => {
                    eprintln!("[harness] {} did not stop within {TERMINATE_GRACE:?}; killing it", self.name);
                    let _ = child.start_kill();
                    kill_at = None;
                }
                control = self.inbox.recv() => match control {
                    Some(Control::Signal(signal, reply)) => {
                        let sent = self.send_signal(child, signal).await;
                        let _ = reply.send(sent);
                    }
                    Some(Control::Terminate(reply)) => {
                        if terminating.is_none() {
                            let _ = self.send_signal(child, Signal::Cont).await;
                            let _ = self.send_signal(child, Signal::Term).await;
                            kill_at = Some(Instant::now() + TERMINATE_GRACE);
                        }
                        // Only the first request gets the exit status.
                        terminating.get_or_insert(reply);
                    }
                    None => {
                        // Every handle is gone: nobody will stop this process but us.
                        let _ = child.start_kill();
                        return (child.wait().await.ok(), None);
                    }
                },
            }
        }
    }

    /// Sleeps `pause` before a restart; a terminate request cuts it short.
    async fn pause(&mut self, pause: Duration) -> Option<oneshot::Sender<Option<ExitStatus>>> {
        let until = Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return None,
                control = self.inbox.recv() => match control {
                    Some(Control::Terminate(reply)) => return Some(reply),
                    Some(Control::Signal(signal, reply)) => {
                        let _ = reply.send(Err(anyhow::anyhow!(
                            "{} is restarting; cannot send SIG{}", self.name, signal.name()
                        )));
                    }
                    None => return None,
                },
            }
        }
    }

    async fn send_signal(&self, child: &mut Child, signal: Signal) -> anyhow::Result<()> {
        // The child is not reaped until `watch` sees its exit, so its pid is still ours.
        let Some(pid) = child.id() else {
            bail!("{} has exited", self.name);
        };
        if signal == Signal::Kill {
            child.start_kill().context("kill -9")?;
        } else {
            let status = Command::new("kill")
                .arg(format!("-{}", signal.name()))
                .arg(pid.to_string())
                .status()
                .await
                .context("running kill")?;
            if !status.success() {
                bail!("kill -{} {pid} failed: {status}", signal.name());
            }
        }
        match signal {
            Signal::Stop => self.state.send_modify(|s| s.frozen = true),
            Signal::Cont => self.state.send_modify(|s| s.frozen = false),
            Signal::Kill | Signal::Term => {}
        }
        Ok(())
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A short description of how a process exited: `exit 1`, `SIGABRT`, `SIGKILL`…
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(6)) => "SIGABRT".into(),
        (None, Some(9)) => "SIGKILL".into(),
        (None, Some(15)) => "SIGTERM".into(),
        (None, Some(n)) => format!("signal {n}"),
        (None, None) => "unknown".into(),
    }
}

/// SIGABRT, the signal `std::process::abort` (and so every failpoint) ends a process with.
pub const SIGABRT: i32 = 6;
/// SIGKILL.
pub const SIGKILL: i32 = 9;
