//! Process-level set-up shared by the `worker` and `coordinator` binaries.

use crate::Config;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), each line tagged with `role`.
pub fn init_tracing(role: &'static str) {
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
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
    init_tracing("worker");
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
