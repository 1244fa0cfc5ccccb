//! `tracing` to stderr, filtered by `RUST_LOG`, as text or JSON.

use crate::LogFormat;
use tracing_subscriber::fmt::MakeWriter;

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
