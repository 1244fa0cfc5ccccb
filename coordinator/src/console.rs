//! What the coordinator shows a person while it runs. On a terminal: a live bar for the
//! epoch (steps, images/s, running loss, ETA, workers alive), with log lines written above
//! it. Without one (CI, Kubernetes logs): a plain progress line in the log every
//! `--progress-every` seconds. Both read the [`JobStatus`] snapshots, never the loop itself.

use crate::status::{JobStatus, Phase, WorkerState};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use process::LogFormat;
use std::{
    io::{self, IsTerminal, Write},
    sync::OnceLock,
    time::{Duration, Instant},
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::info;

/// The terminal's progress bar, once one is shown; log lines are written around it.
static BAR: OnceLock<ProgressBar> = OnceLock::new();

/// How often the bar is redrawn from the latest snapshot.
const BAR_REFRESH: Duration = Duration::from_millis(100);

/// Logging for the coordinator process: `tracing` to stderr, filtered by `RUST_LOG`, in
/// `format`; lines are written around the progress bar when one is shown, never through it.
pub fn init_logging(format: LogFormat) {
    process::init_tracing_to("coordinator", format, || ConsoleWriter);
}

/// Stderr, with the progress bar taken away while a log line is written.
struct ConsoleWriter;

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // tracing's formatter hands over one whole line per call.
        match BAR.get() {
            Some(bar) => bar.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Writes a line another process logged (a spawned worker's) to stderr, around the bar.
pub fn write_line(line: &str) {
    let _ = ConsoleWriter.write(format!("{line}\n").as_bytes());
}

/// Whether [`spawn`] shows a bar: stderr is a terminal and the logs are text.
pub fn shows_bar(format: LogFormat) -> bool {
    format == LogFormat::Text && io::stderr().is_terminal()
}

/// Shows the job's progress until it is over: a bar when stderr is a terminal and the logs
/// are text, plain log lines every `every` otherwise.
pub fn spawn(
    status: watch::Receiver<JobStatus>,
    every: Duration,
    format: LogFormat,
) -> JoinHandle<()> {
    if shows_bar(format) {
        tokio::spawn(show_bar(status))
    } else {
        tokio::spawn(log_lines(status, every, format))
    }
}

/// Stops the display of [`spawn`] and takes the bar off the terminal, so that what is
/// printed next stands alone.
pub fn finish(display: JoinHandle<()>) {
    display.abort();
    if let Some(bar) = BAR.get() {
        bar.finish_and_clear();
    }
}

async fn show_bar(mut status: watch::Receiver<JobStatus>) {
    // Hidden until training starts: the log lines before it need no bar under them.
    let bar = BAR.get_or_init(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:.bold} [{wide_bar:.cyan/blue}] {pos}/{len} steps · {msg} · ETA {eta}",
            )
            .expect("the template parses")
            .progress_chars("=> "),
        );
        bar
    });
    let mut epoch = 0;
    let mut tick = tokio::time::interval(BAR_REFRESH);
    loop {
        tick.tick().await;
        let s = status.borrow_and_update().clone();
        if s.is_over() {
            break;
        }
        if !matches!(s.phase, Phase::Training | Phase::Evaluating | Phase::Paused) {
            continue;
        }
        if s.epoch != epoch {
            if epoch == 0 {
                bar.set_draw_target(ProgressDrawTarget::stderr());
            }
            epoch = s.epoch;
            // A fresh epoch: a fresh ETA estimate.
            bar.reset();
            bar.set_length(s.steps_per_epoch);
            bar.set_prefix(format!("epoch {}/{}", s.epoch, s.epochs));
        }
        // A lost worker's samples take extra steps: the bar stretches rather than overflows.
        bar.set_length(s.steps_per_epoch.max(s.step));
        bar.set_position(s.step);
        bar.set_message(summary(&s));
        if status.has_changed().is_err() {
            break;
        }
    }
    bar.finish_and_clear();
}

async fn log_lines(status: watch::Receiver<JobStatus>, every: Duration, format: LogFormat) {
    let mut tick = tokio::time::interval(every);
    // The first tick is immediate; the first line comes after `every`.
    tick.tick().await;
    let mut rate = StepRate::default();
    let mut last_step = None;
    loop {
        tick.tick().await;
        let s = status.borrow().clone();
        if s.is_over() || status.has_changed().is_err() {
            break;
        }
        if s.phase != Phase::Training || last_step == Some(s.global_step) {
            continue;
        }
        let eta = rate.eta(&s);
        last_step = Some(s.global_step);
        let percent = 100.0 * s.step as f64 / s.steps_per_epoch.max(1) as f64;
        let line = format!(
            "progress: epoch {}/{}, step {}/{} ({percent:.0}%), {}{}",
            s.epoch,
            s.epochs,
            s.step,
            s.steps_per_epoch,
            summary(&s),
            eta.map_or(String::new(), |eta| format!(", ETA {}", clock(eta))),
        );
        // Text logs say it once, in words; JSON logs add the figures as fields.
        match format {
            LogFormat::Text => info!("{line}"),
            LogFormat::Json => info!(
                epoch = s.epoch,
                step = s.step,
                global_step = s.global_step,
                loss = s.train_loss,
                images_per_sec = s.images_per_sec,
                workers = s.count(WorkerState::Active),
                eta_seconds = eta.map(f64::round),
                "{line}"
            ),
        }
    }
}

/// Loss, speed and workers, as the bar and the lines show them.
fn summary(s: &JobStatus) -> String {
    let active = s.count(WorkerState::Active);
    let joining = s.count(WorkerState::Joining);
    let mut text = format!(
        "loss {:.4} · {:.0} images/s · {active} worker{}",
        s.train_loss,
        s.images_per_sec,
        if active == 1 { "" } else { "s" }
    );
    if joining > 0 {
        text.push_str(&format!(" (+{joining} joining)"));
    }
    match s.phase {
        Phase::Evaluating => text.push_str(" · evaluating"),
        Phase::Paused => text.push_str(" · paused"),
        _ => {}
    }
    text
}

/// The job's pace as seen from here, evaluation included: steps per second since the first
/// line.
#[derive(Default)]
struct StepRate {
    first: Option<(Instant, u64)>,
}

impl StepRate {
    /// Seconds until the last step, once the pace is known.
    fn eta(&mut self, s: &JobStatus) -> Option<f64> {
        let (since, first_step) = *self.first.get_or_insert((Instant::now(), s.global_step));
        let steps = s.global_step.checked_sub(first_step).filter(|&n| n > 0)?;
        let per_step = since.elapsed().as_secs_f64() / steps as f64;
        Some(s.total_steps.saturating_sub(s.global_step) as f64 * per_step)
    }
}

/// `1h02m03s`, `2m05s`, `7s`.
fn clock(seconds: f64) -> String {
    let total = seconds.round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_clock() {
        assert_eq!(clock(7.2), "7s");
        assert_eq!(clock(125.0), "2m05s");
        assert_eq!(clock(3723.0), "1h02m03s");
    }
}
