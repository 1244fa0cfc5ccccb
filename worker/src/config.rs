use clap::Args;
use std::{path::PathBuf, time::Duration};

/// How a worker reaches its coordinator and where it computes. Every flag can also come
/// from the environment, so a Kubernetes manifest can set it.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// The coordinator's gRPC address, e.g. http://10.0.0.5:50051.
    #[arg(long, env = "LOCKSTEP_COORDINATOR")]
    pub coordinator: String,

    /// Directory of the four IDX files. Without them there, the worker receives the
    /// coordinator's dataset and stores it there [default: $LOCKSTEP_DATA_DIR or
    /// ~/.cache/lockstep/mnist].
    #[arg(long, env = "LOCKSTEP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Where to compute: cpu, or cuda:N (needs the `cuda` feature).
    #[arg(long, env = "LOCKSTEP_DEVICE", default_value = "cpu")]
    pub device: String,

    /// CPU threads for computing [default: all cores].
    #[arg(long, env = "LOCKSTEP_THREADS")]
    pub threads: Option<usize>,

    /// How long to keep trying to reach the coordinator, in seconds.
    #[arg(long, env = "LOCKSTEP_CONNECT_TIMEOUT", default_value_t = 60)]
    pub connect_timeout_secs: u64,
}

impl Config {
    /// A worker of `coordinator` with every other flag at its default.
    pub fn new(coordinator: impl Into<String>) -> Self {
        Config {
            coordinator: coordinator.into(),
            data_dir: None,
            device: "cpu".into(),
            threads: None,
            connect_timeout_secs: 60,
        }
    }

    /// How long to keep trying to reach the coordinator.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}
