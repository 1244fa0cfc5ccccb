//! The worker as a process: what the `worker` binary and `coordinator worker` run.

use crate::Config;
use process::{exit, init_tracing, stop_on_signals};
use std::process::ExitCode;

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
                ExitCode::from(exit::USAGE)
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
