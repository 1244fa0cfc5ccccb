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

/// A token cancelled on Ctrl-C or SIGTERM (what Kubernetes sends).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::warn!("signal received: shutting down");
        cancel.cancel();
    });
    token
}

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
        let shutdown = shutdown_on_signals();
        match crate::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
