//! Runs a checked [`Request`]: the command in a process group of its own, output captured up to
//! a cap and streamed line by line to the step's log, stopped on its timeout, and no process of
//! the group outliving the step.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flotilla_worker::{HandlerError, LogStream, MAX_LINE_BYTES, StepLog};
use rustix::process::{Pid, Signal, kill_process_group};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::request::{Parse, Request};

/// How long the output pipes may stay open once the group is killed: only a process that left
/// the group (`setsid`) can hold them longer, and its output is then given up.
const DRAIN: Duration = Duration::from_secs(5);
/// How much of stderr a failure's message quotes.
const TAIL_LINES: usize = 10;
const TAIL_BYTES: usize = 2_000;

/// Runs `request` until it exits or `stop` resolves; `stop` yields why the command was stopped
/// (its timeout, and any other reason the caller adds). Each line the command prints goes to
/// `log` as it comes. The step's output on exit code 0, a failure naming the exit code and the
/// tail of stderr otherwise.
pub async fn run(
    request: &Request,
    config: &Config,
    log: &StepLog,
    stop: impl Future<Output = String>,
) -> Result<Value, HandlerError> {
    let program = &request.argv[0];
    let started = Instant::now();
    let mut child = tokio::process::Command::new(program)
        .args(&request.argv[1..])
        .current_dir(&request.cwd)
        .env_clear()
        .envs(
            config
                .pass_env
                .iter()
                .filter_map(|name| std::env::var_os(name).map(|value| (name, value))),
        )
        .envs(&request.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HandlerError::fatal(format!("shell: cannot start `{program}`: {e}")))?;
    // Kills the whole group however this future ends, even dropped mid-way (a worker giving up
    // its tasks at shutdown).
    let group = Group(
        child
            .id()
            .and_then(|id| Pid::from_raw(i32::try_from(id).ok()?)),
    );
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let stdout = Reader::spawn(
        stdout,
        config.max_output_bytes,
        Keep::Head,
        Lines::new(log, LogStream::Stdout),
    );
    let stderr = Reader::spawn(
        stderr,
        config.max_output_bytes,
        Keep::Tail,
        Lines::new(log, LogStream::Stderr),
    );

    let ended = tokio::select! {
        status = child.wait() => Ok(status),
        reason = stop => Err(reason),
    };
    // A finished command's leftovers (a background job holding its pipes) go with it.
    group.kill();
    if ended.is_err() {
        let _ = child.wait().await;
    }
    let drained = tokio::time::Instant::now() + DRAIN;
    let stdout = stdout.finish(drained).await;
    let stderr = stderr.finish(drained).await;
    let command = request.display();
    tracing::info!(program = %program, elapsed_ms = started.elapsed().as_millis() as u64, "command ended");

    let status = match ended {
        Ok(Ok(status)) => status,
        Ok(Err(error)) => {
            return Err(HandlerError::retryable(format!(
                "shell: waiting for `{command}` failed: {error}"
            )));
        }
        Err(reason) => {
            return Err(HandlerError::retryable(format!(
                "shell: `{command}` {reason}; its process group was killed{}",
                quote_tail(&stderr)
            )));
        }
    };
    let Some(code) = status.code() else {
        return Err(HandlerError::retryable(format!(
            "shell: `{command}` was killed by signal {}{}",
            signal_of(status),
            quote_tail(&stderr)
        )));
    };
    if code != 0 {
        return Err(HandlerError::retryable(format!(
            "shell: `{command}` exited with code {code}{}",
            quote_tail(&stderr)
        )));
    }
    let mut output = json!({
        "exit_code": code,
        "stdout": String::from_utf8_lossy(&stdout.bytes),
        "stderr": String::from_utf8_lossy(&stderr.bytes),
        "stdout_truncated": stdout.dropped > 0,
        "stderr_truncated": stderr.dropped > 0,
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    if request.parse == Parse::Json {
        let parsed: Value = serde_json::from_slice(&stdout.bytes).map_err(|e| {
            HandlerError::fatal(format!(
                "shell: the stdout of `{command}` is not JSON ({e}){}",
                if stdout.dropped > 0 {
                    "; it was cut at max_output_bytes"
                } else {
                    ""
                }
            ))
        })?;
        output["json"] = parsed;
    }
    Ok(output)
}

fn signal_of(status: ExitStatus) -> String {
    status
        .signal()
        .map_or_else(|| "unknown".to_string(), |s| s.to_string())
}

/// The command's process group, killed when this is dropped.
struct Group(Option<Pid>);

impl Group {
    fn kill(&self) {
        if let Some(pid) = self.0 {
            // ESRCH: every process of the group has exited already.
            let _ = kill_process_group(pid, Signal::KILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which part of a stream is kept past the cap: the start of stdout (what a JSON parse needs),
/// the end of stderr (where the error usually is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Head,
    Tail,
}

/// What was kept of a stream and how many bytes were dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Capture {
    pub bytes: Vec<u8>,
    pub dropped: u64,
}

impl Capture {
    /// Adds `chunk`, keeping at most `cap` bytes.
    pub fn push(&mut self, chunk: &[u8], cap: usize, keep: Keep) {
        match keep {
            Keep::Head => {
                let room = cap.saturating_sub(self.bytes.len()).min(chunk.len());
                self.bytes.extend_from_slice(&chunk[..room]);
                self.dropped += (chunk.len() - room) as u64;
            }
            Keep::Tail => {
                self.bytes.extend_from_slice(chunk);
                let excess = self.bytes.len().saturating_sub(cap);
                if excess > 0 {
                    self.bytes.drain(..excess);
                    self.dropped += excess as u64;
                }
            }
        }
    }
}

/// Cuts a stream into lines for the step's log; a line longer than [`MAX_LINE_BYTES`] goes in
/// pieces, and the last one goes even without its line break.
pub struct Lines {
    log: StepLog,
    stream: LogStream,
    partial: Vec<u8>,
}

impl Lines {
    pub fn new(log: &StepLog, stream: LogStream) -> Self {
        Self {
            log: log.clone(),
            stream,
            partial: Vec::new(),
        }
    }

    pub fn push(&mut self, mut chunk: &[u8]) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&chunk[..end]);
            self.flush();
            chunk = &chunk[end + 1..];
        }
        self.partial.extend_from_slice(chunk);
        if self.partial.len() >= MAX_LINE_BYTES {
            self.flush();
        }
    }

    pub fn finish(mut self) {
        if !self.partial.is_empty() {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.log
            .write(self.stream, String::from_utf8_lossy(&self.partial));
        self.partial.clear();
    }
}

/// A stream read to its end in a task of its own, so that a full pipe never blocks the command.
struct Reader(JoinHandle<Capture>);

impl Reader {
    fn spawn(
        mut pipe: impl AsyncRead + Unpin + Send + 'static,
        cap: usize,
        keep: Keep,
        mut lines: Lines,
    ) -> Self {
        Self(tokio::spawn(async move {
            let mut capture = Capture::default();
            let mut chunk = vec![0; 16 * 1024];
            while let Ok(n) = pipe.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                capture.push(&chunk[..n], cap, keep);
                lines.push(&chunk[..n]);
            }
            lines.finish();
            capture
        }))
    }

    /// What was read, once the stream ends or by `deadline` (then nothing).
    async fn finish(self, deadline: tokio::time::Instant) -> Capture {
        let abort = self.0.abort_handle();
        match tokio::time::timeout_at(deadline, self.0).await {
            Ok(Ok(capture)) => capture,
            _ => {
                abort.abort();
                Capture::default()
            }
        }
    }
}

/// `"; stderr: …"` with the last lines of stderr, or nothing when it is empty.
fn quote_tail(stderr: &Capture) -> String {
    let text = String::from_utf8_lossy(&stderr.bytes);
    let tail = tail(text.trim_end(), TAIL_LINES, TAIL_BYTES);
    if tail.is_empty() {
        String::new()
    } else {
        format!("; stderr: {tail}")
    }
}

/// The last `lines` lines of `text`, and at most its last `bytes` bytes (on a char boundary).
pub fn tail(text: &str, lines: usize, bytes: usize) -> &str {
    let by_lines = text
        .rmatch_indices('\n')
        .nth(lines.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    let mut start = by_lines.max(text.len().saturating_sub(bytes));
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn config(max_output_bytes: usize) -> Config {
        Config {
            allow: vec!["sh".into()],
            allow_shell: false,
            root: std::env::temp_dir(),
            max_output_bytes,
            timeout: Duration::from_secs(30),
            pass_env: vec!["PATH".into()],
        }
    }

    fn script(script: &str, parse: Parse) -> Request {
        Request {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            timeout: Duration::from_secs(30),
            parse,
        }
    }

    async fn never() -> String {
        std::future::pending().await
    }

    #[tokio::test]
    async fn stdout_is_parsed_as_json_when_asked() {
        let request = script(r#"printf '{"greeting": "%s"}' "$GREETING""#, Parse::Json);
        let output = run(&request, &config(1024), &StepLog::default(), never())
            .await
            .unwrap();
        assert_eq!(output["exit_code"], 0);
        assert_eq!(output["json"], json!({"greeting": "hello"}));
        assert_eq!(output["stdout"], r#"{"greeting": "hello"}"#);

        let request = script("echo not json", Parse::Json);
        let error = run(&request, &config(1024), &StepLog::default(), never())
            .await
            .unwrap_err();
        assert!(!error.retryable);
        assert!(error.message.contains("is not JSON"), "{error}");
    }

    #[tokio::test]
    async fn output_past_the_cap_is_dropped_and_flagged() {
        let request = script(
            "head -c 100000 /dev/zero | tr '\\0' a; echo end >&2",
            Parse::Text,
        );
        let output = run(&request, &config(100), &StepLog::default(), never())
            .await
            .unwrap();
        assert_eq!(output["stdout"].as_str().unwrap(), "a".repeat(100));
        assert_eq!(output["stdout_truncated"], true);
        assert_eq!(output["stderr"], "end\n");
        assert_eq!(output["stderr_truncated"], false);
    }

    #[tokio::test]
    async fn a_failure_names_the_exit_code_and_the_end_of_stderr() {
        let request = script(
            "for i in $(seq 1 30); do echo line $i >&2; done; exit 3",
            Parse::Text,
        );
        let error = run(&request, &config(1024), &StepLog::default(), never())
            .await
            .unwrap_err();
        assert!(error.retryable);
        assert!(
            error.message.starts_with("shell: `sh -c for i in")
                && error
                    .message
                    .contains("exited with code 3; stderr: line 21\n")
                && error.message.ends_with("line 30"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn each_line_goes_to_the_step_log_as_printed() {
        let request = script(
            "echo compiling; echo 'warning: old' >&2; printf 'no line break'",
            Parse::Text,
        );
        let log = StepLog::default();
        run(&request, &config(4), &log, never()).await.unwrap();
        let mut lines: Vec<(LogStream, String)> =
            log.take().into_iter().map(|l| (l.stream, l.line)).collect();
        // The two streams are read side by side: only each one's order is certain.
        lines.sort();
        assert_eq!(
            lines,
            [
                (LogStream::Stdout, "compiling".to_string()),
                (LogStream::Stdout, "no line break".to_string()),
                (LogStream::Stderr, "warning: old".to_string()),
            ]
        );
    }

    #[test]
    fn lines_are_cut_where_the_command_broke_them_not_where_reads_did() {
        let log = StepLog::default();
        let mut lines = Lines::new(&log, LogStream::Stdout);
        lines.push(b"first li");
        lines.push(b"ne\nsecond\nthi");
        lines.push(&vec![b'x'; MAX_LINE_BYTES]);
        lines.push(b"rd\n");
        lines.finish();
        let texts: Vec<String> = log.take().into_iter().map(|l| l.line).collect();
        // A line past the longest kept whole is cut there, not held back.
        let long = format!("thi{}", "x".repeat(MAX_LINE_BYTES - 3));
        assert_eq!(texts, ["first line", "second", &long, "xxx", "rd"]);
    }

    #[tokio::test]
    async fn a_background_job_does_not_keep_the_step_running() {
        let started = Instant::now();
        let request = script("sleep 30 & echo done", Parse::Text);
        let output = run(&request, &config(1024), &StepLog::default(), never())
            .await
            .unwrap();
        assert_eq!(output["stdout"], "done\n");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn stopping_kills_the_command_with_the_reason() {
        let request = script("echo started >&2; sleep 30", Parse::Text);
        let stop = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            "timed out after 200ms".to_string()
        };
        let error = run(&request, &config(1024), &StepLog::default(), stop)
            .await
            .unwrap_err();
        assert_eq!(
            error.message,
            "shell: `sh -c echo started >&2; sleep 30` timed out after 200ms; its process group was killed; stderr: started"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_fatal() {
        let mut request = script("", Parse::Text);
        request.argv = vec!["no-such-program-here".into()];
        let error = run(&request, &config(1024), &StepLog::default(), never())
            .await
            .unwrap_err();
        assert!(!error.retryable);
        assert!(
            error
                .message
                .starts_with("shell: cannot start `no-such-program-here`"),
            "{error}"
        );
    }

    #[test]
    fn head_keeps_the_start_and_counts_the_rest() {
        let mut capture = Capture::default();
        capture.push(b"abc", 5, Keep::Head);
        capture.push(b"defg", 5, Keep::Head);
        capture.push(b"h", 5, Keep::Head);
        assert_eq!(capture.bytes, b"abcde");
        assert_eq!(capture.dropped, 3);
    }

    #[test]
    fn tail_keeps_the_end_and_counts_the_rest() {
        let mut capture = Capture::default();
        capture.push(b"abc", 5, Keep::Tail);
        capture.push(b"defg", 5, Keep::Tail);
        assert_eq!(capture.bytes, b"cdefg");
        assert_eq!(capture.dropped, 2);
    }

    #[test]
    fn tail_quotes_the_last_lines_within_a_byte_budget() {
        assert_eq!(tail("a\nb\nc\nd", 2, 100), "c\nd");
        assert_eq!(tail("a\nb", 5, 100), "a\nb");
        assert_eq!(tail("0123456789", 3, 4), "6789");
        // Never splits a character.
        assert_eq!(tail("ééé", 1, 3), "é");
        assert_eq!(tail("", 3, 3), "");
    }
}
