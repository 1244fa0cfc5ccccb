//! Process-level set-up shared by the `worker` and `coordinator` binaries.

use crate::Config;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, for people.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, the other fields),
    /// for log collectors.
    Json,
}

impl LogFormat {
    /// The flag's spelling, to hand the format on to spawned workers.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), each line tagged with `role`.
pub fn init_tracing(role: &'static str, format: LogFormat) {
    init_tracing_to(role, format, std::io::stderr);
}

/// Logs to `writer` (which ends up on stderr), filtered by `RUST_LOG` (default `info`).
pub fn init_tracing_to<W>(role: &'static str, format: LogFormat, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    tracing::debug!(role, "logging started");
}

/// Why a process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Ctrl-C (SIGINT): someone at the terminal wants it to end.
    Interrupt,
    /// SIGTERM: what Kubernetes sends before it kills a pod (eviction, node drain, deletion).
    Terminate,
}

impl StopCause {
    /// The exit status of a process stopped this way, as a shell reports a process killed by
    /// the signal: 130 for SIGINT, 143 for SIGTERM.
    pub fn exit_status(self) -> u8 {
        match self {
            StopCause::Interrupt => 130,
            StopCause::Terminate => 143,
        }
    }
}

/// How a process is asked to stop: Ctrl-C and SIGTERM mean different things to a
/// coordinator (end the job, or step away from it and leave the workers waiting for the
/// coordinator that carries it on), so they are kept apart. `Stop::default()` is never
/// asked, until [`Stop::request`].
#[derive(Debug, Clone, Default)]
pub struct Stop {
    requested: CancellationToken,
    cause: std::sync::Arc<std::sync::OnceLock<StopCause>>,
}

impl Stop {
    /// Asks to stop; the first cause given is the one that counts.
    pub fn request(&self, cause: StopCause) {
        let _ = self.cause.set(cause);
        self.requested.cancel();
    }

    /// Why stopping was asked for, if it was.
    pub fn cause(&self) -> Option<StopCause> {
        self.cause.get().copied()
    }

    /// Waits until stopping is asked for; returns why.
    pub async fn requested(&self) -> StopCause {
        self.requested.cancelled().await;
        self.cause().unwrap_or(StopCause::Interrupt)
    }

    /// A token cancelled when stopping is asked for, whatever the cause.
    pub fn token(&self) -> CancellationToken {
        self.requested.clone()
    }
}

/// A [`Stop`] asked on Ctrl-C (SIGINT) or SIGTERM.
pub fn stop_on_signals() -> Stop {
    let stop = Stop::default();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
        let cause = tokio::select! {
            _ = interrupt.recv() => StopCause::Interrupt,
            _ = terminate.recv() => StopCause::Terminate,
        };
        tracing::warn!(?cause, "signal received: shutting down");
        on_signal.request(cause);
    });
    stop
}

/// Exit status of a process started with flags that cannot work, as clap's own errors exit.
pub const EXIT_USAGE: u8 = 2;

/// The whole worker program for `config`: what the `worker` binary and
/// `coordinator worker` run.
pub fn main_with(config: Config) -> ExitCode {
    common::allocator::keep_freed_memory();
    if let Some(threads) = config.threads {
        // candle's CPU kernels size their thread pools from this variable. Set before any
        // other thread exists, which is what makes `set_var` sound here.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    init_tracing("worker", config.log_format);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    runtime.block_on(async {
        let stop = stop_on_signals();
        match crate::run(config, stop.token()).await {
            // Stopped by a signal rather than dismissed: the job goes on without this worker,
            // and a supervisor should see that it did not finish (a Kubernetes Job then
            // recreates the pod instead of counting the worker's part as done).
            Ok(()) => match stop.cause() {
                Some(cause) => ExitCode::from(cause.exit_status()),
                None => ExitCode::SUCCESS,
            },
            Err(e) if e.is_usage() => {
                tracing::error!("{e}");
                ExitCode::from(EXIT_USAGE)
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
