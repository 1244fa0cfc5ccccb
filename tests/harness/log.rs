//! The output of a process under a test's control: every line captured with the instant it
//! arrived, and bounded waits for lines.

use std::{
    io::{BufRead, BufReader, Read},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

/// The longest any single wait may take: no test hangs.
pub const WAIT: Duration = Duration::from_secs(120);

/// Lines of each log shown when a test fails.
pub const TAIL: usize = 40;

/// One output line of a process.
#[derive(Debug, Clone)]
pub struct Line {
    /// Position in the process's log, for waiting on later lines.
    pub index: usize,
    /// When the test read it.
    pub at: Instant,
    pub text: String,
}

/// The captured stdout and stderr of one process, shared with the threads reading them.
#[derive(Clone)]
pub struct Log(Arc<LogInner>);

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Log({})", self.0.name)
    }
}

struct LogInner {
    name: String,
    state: Mutex<LogState>,
    changed: Condvar,
}

struct LogState {
    lines: Vec<Line>,
    open_streams: usize,
}

impl Log {
    /// A log named `name` (in failure messages) fed by `open_streams` streams.
    pub fn new(name: &str, open_streams: usize) -> Log {
        Log(Arc::new(LogInner {
            name: name.to_owned(),
            state: Mutex::new(LogState {
                lines: Vec::new(),
                open_streams,
            }),
            changed: Condvar::new(),
        }))
    }

    /// Reads `stream` line by line on a thread of its own, until it closes.
    pub fn capture(&self, stream: impl Read + Send + 'static) {
        let log = self.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n') {
                let Ok(bytes) = line else { break };
                let text = String::from_utf8_lossy(&bytes).trim_end().to_owned();
                let mut state = log.state();
                let index = state.lines.len();
                state.lines.push(Line {
                    index,
                    at: Instant::now(),
                    text,
                });
                log.0.changed.notify_all();
            }
            log.state().open_streams -= 1;
            log.0.changed.notify_all();
        });
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        // A panicking waiter must not hide the log from the ones that dump it.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first line containing `pattern`, waiting for it up to [`WAIT`].
    pub fn wait_for(&self, pattern: &str) -> Line {
        self.wait_for_line(0, pattern, |line| line.contains(pattern), WAIT)
    }

    /// The first line after `after` containing `pattern`, waiting for it up to [`WAIT`].
    pub fn wait_for_after(&self, after: &Line, pattern: &str) -> Line {
        self.wait_for_line(
            after.index + 1,
            pattern,
            |line| line.contains(pattern),
            WAIT,
        )
    }

    /// The first line at or after position `from` that satisfies `predicate`, waiting for it
    /// up to `timeout` (at most [`WAIT`]). Fails the test, showing the end of the log, when
    /// none comes in time or the process closes its output first.
    pub fn wait_for_line(
        &self,
        from: usize,
        what: &str,
        predicate: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Line {
        let deadline = Instant::now() + timeout.min(WAIT);
        let mut state = self.state();
        let mut next = from;
        loop {
            if let Some(line) = state.lines[next.min(state.lines.len())..]
                .iter()
                .find(|line| predicate(&line.text))
            {
                return line.clone();
            }
            next = state.lines.len().max(from);
            let now = Instant::now();
            let problem = if state.open_streams == 0 {
                Some("the process closed its output".to_owned())
            } else if now >= deadline {
                Some(format!("waited {:.0} s", timeout.min(WAIT).as_secs_f64()))
            } else {
                None
            };
            if let Some(problem) = problem {
                drop(state);
                panic!(
                    "{}: no line with `{what}` ({problem}); last lines:\n{}",
                    self.0.name,
                    self.tail(TAIL)
                );
            }
            state = self
                .0
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The lines so far that satisfy `predicate`.
    pub fn find_all(&self, predicate: impl Fn(&str) -> bool) -> Vec<Line> {
        self.state()
            .lines
            .iter()
            .filter(|line| predicate(&line.text))
            .cloned()
            .collect()
    }

    /// The last `n` lines, one per line.
    pub fn tail(&self, n: usize) -> String {
        let state = self.state();
        let skip = state.lines.len().saturating_sub(n);
        state.lines[skip..]
            .iter()
            .map(|line| line.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The value of `key=value` in a tracing line, e.g. `field(line, "worker")` is `w2`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
}
