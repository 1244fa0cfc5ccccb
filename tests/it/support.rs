//! The test harness: MNIST on disk, the real binaries, and in-process clusters.

use std::path::{Path, PathBuf};
pub use tests::binaries::{binary, mnist_dir};
use tokio::net::TcpListener;

/// Logs of the code under test, shown for failing tests (RUST_LOG filters).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A coordinator configuration for tests: external in-process workers, a temporary run
/// directory, the shared MNIST.
pub fn test_config(run_dir: &Path) -> coordinator::Config {
    coordinator::Config {
        external_workers: true,
        data_dir: Some(mnist_dir()),
        run_dir: Some(run_dir.to_path_buf()),
        ..coordinator::Config::default()
    }
}

/// Runs a job with `config.workers` workers as tasks of this process, talking real gRPC over
/// loopback. `worker_data_dir` is where the workers look for data (default: the shared MNIST).
pub async fn train_in_process(
    config: coordinator::Config,
    worker_data_dir: Option<PathBuf>,
) -> anyhow::Result<coordinator::Summary> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = process::Stop::default();
    let workers: Vec<_> = (0..config.workers)
        .map(|_| {
            let config = worker::Config {
                data_dir: Some(worker_data_dir.clone().unwrap_or_else(mnist_dir)),
                ..worker::Config::new(url.clone())
            };
            tokio::spawn(worker::run(config, stop.token().child_token()))
        })
        .collect();
    let summary = coordinator::run(config, listener, stop).await?;
    for worker in workers {
        worker.await??;
    }
    Ok(summary)
}
