//! A step's log: what a handler writes to [`StepLog`] is numbered, buffered and shipped to the
//! coordinator in batches (`log` messages on `{prefix}.logs`) by the worker running the task.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::Utc;
use flotilla_proto::{LogLine, LogStream};
use tokio::sync::Notify;

/// The longest line kept whole; a longer one is cut into lines of this size.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Lines that make a batch worth sending before its interval is up.
pub(crate) const BATCH_LINES: usize = 256;
/// How much a log holds while it cannot send (RabbitMQ away): past it, lines are dropped, and
/// a line saying how many takes their place once there is room again.
const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;

/// Where a handler writes its step's log, viewed with `flotilla workflows logs`. Writing never
/// blocks: lines are buffered and sent in batches while the handler runs, and the rest before
/// its result. Cloning gives another handle on the same log.
#[derive(Debug, Clone, Default)]
pub struct StepLog {
    inner: Arc<Buffer>,
}

#[derive(Debug, Default)]
struct Buffer {
    state: Mutex<State>,
    /// Told when a batch is full, so that it goes at once.
    full: Notify,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<LogLine>,
    pending_bytes: usize,
    /// The number of the last line written.
    seq: u64,
    /// Lines dropped since the last one kept.
    dropped: u64,
}

impl StepLog {
    /// Writes `line` to the step's standard output stream.
    pub fn stdout(&self, line: impl AsRef<str>) {
        self.write(LogStream::Stdout, line);
    }

    /// Writes `line` to the step's standard error stream.
    pub fn stderr(&self, line: impl AsRef<str>) {
        self.write(LogStream::Stderr, line);
    }

    /// Writes one line (its line break, if any, left off) to `stream`. A line longer than
    /// [`MAX_LINE_BYTES`] is cut into several.
    pub fn write(&self, stream: LogStream, line: impl AsRef<str>) {
        let line = line.as_ref();
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut rest = line;
        loop {
            let mut cut = rest.len().min(MAX_LINE_BYTES);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            let (piece, tail) = rest.split_at(cut);
            self.push(stream, piece);
            if tail.is_empty() {
                return;
            }
            rest = tail;
        }
    }

    fn push(&self, stream: LogStream, line: &str) {
        let mut state = self.state();
        if state.pending_bytes + line.len() > MAX_PENDING_BYTES {
            state.dropped += 1;
            return;
        }
        if state.dropped > 0 {
            let note = format!(
                "[flotilla: {} lines dropped: the log could not be sent as fast as it was written]",
                state.dropped
            );
            state.dropped = 0;
            state.append(LogStream::Stderr, note);
        }
        state.append(stream, line.to_owned());
        if state.pending.len() >= BATCH_LINES {
            self.inner.full.notify_one();
        }
    }

    /// Takes the lines written since the last call: the worker sends them. In a handler's unit
    /// test (a [`TaskContext`](crate::TaskContext) built by hand), it shows what was written.
    pub fn take(&self) -> Vec<LogLine> {
        let mut state = self.state();
        state.pending_bytes = 0;
        std::mem::take(&mut state.pending)
    }

    /// Completes when a batch is full.
    pub(crate) async fn filled(&self) {
        self.inner.full.notified().await;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Pushes and takes only: consistent even if a writer panicked.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn append(&mut self, stream: LogStream, line: String) {
        self.seq += 1;
        self.pending_bytes += line.len();
        self.pending.push(LogLine {
            seq: self.seq,
            stream,
            line,
            at: Utc::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[LogLine]) -> Vec<(u64, LogStream, &str)> {
        lines
            .iter()
            .map(|l| (l.seq, l.stream, l.line.as_str()))
            .collect()
    }

    #[test]
    fn lines_are_numbered_across_batches_without_their_line_breaks() {
        let log = StepLog::default();
        log.stdout("Compiling demo\n");
        log.stderr("warning: unused\r\n");
        assert_eq!(
            texts(&log.take()),
            [
                (1, LogStream::Stdout, "Compiling demo"),
                (2, LogStream::Stderr, "warning: unused")
            ]
        );
        log.clone().stdout("Finished");
        assert_eq!(texts(&log.take()), [(3, LogStream::Stdout, "Finished")]);
        assert!(log.take().is_empty());
    }

    #[test]
    fn a_long_line_is_cut_on_character_boundaries() {
        let log = StepLog::default();
        let line = "é".repeat(MAX_LINE_BYTES);
        log.stdout(&line);
        let lines = log.take();
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.line.len() <= MAX_LINE_BYTES));
        assert_eq!(format!("{}{}", lines[0].line, lines[1].line), line);
    }

    #[test]
    fn lines_past_the_buffer_are_dropped_and_counted() {
        let log = StepLog::default();
        let line = "x".repeat(MAX_LINE_BYTES);
        let fit = MAX_PENDING_BYTES / MAX_LINE_BYTES;
        for _ in 0..fit + 3 {
            log.stdout(&line);
        }
        assert_eq!(log.take().len(), fit);
        log.stdout("after");
        assert_eq!(
            texts(&log.take()),
            [
                (
                    fit as u64 + 1,
                    LogStream::Stderr,
                    "[flotilla: 3 lines dropped: the log could not be sent as fast as it was written]"
                ),
                (fit as u64 + 2, LogStream::Stdout, "after")
            ]
        );
    }
}
