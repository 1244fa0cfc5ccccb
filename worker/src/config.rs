use clap::Args;
use process::{Credentials, LogFormat};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

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

    /// How long to keep trying to reach the coordinator, in seconds: at start, and after the
    /// session breaks (the coordinator may be restarting, or carrying the job on from its
    /// checkpoint) [default: keep trying as long as it takes].
    #[arg(long, env = "LOCKSTEP_CONNECT_TIMEOUT", value_name = "SECONDS")]
    pub connect_timeout_secs: Option<u64>,

    #[command(flatten)]
    pub credentials: Credentials,

    /// Address the ring all-reduce listener binds (`--allreduce ring` jobs): the left
    /// neighbour connects here.
    #[arg(long, env = "LOCKSTEP_RING_LISTEN", default_value = "0.0.0.0:0")]
    pub ring_listen: SocketAddr,

    /// Host name or address the other workers reach this worker's ring listener at
    /// [default: the address the coordinator sees this worker connect from].
    #[arg(long, env = "LOCKSTEP_RING_HOST")]
    pub ring_host: Option<String>,

    /// Whether a ring whose members all run on this host (and share its /dev/shm) sums
    /// through shared memory instead of over loopback TCP.
    #[arg(long, env = "LOCKSTEP_RING_SHARED_MEMORY", default_value_t = true, action = clap::ArgAction::Set)]
    pub ring_shared_memory: bool,

    /// Serve health probes here in plaintext (grpc.health.v1, service "liveness": whether the
    /// worker is making progress), e.g. 0.0.0.0:8081; for Kubernetes' grpc probes, which
    /// send no TLS and no token.
    #[arg(long, env = "LOCKSTEP_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// How log lines are written: text, or json (one object per line).
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Fault injection for tests: exit with status 1 after computing this many gradients.
    #[arg(long, env = "LOCKSTEP_FAIL_AFTER_STEPS", hide = true)]
    pub fail_after_steps: Option<u64>,
}

impl Config {
    /// A worker of `coordinator` with every other flag at its default.
    pub fn new(coordinator: impl Into<String>) -> Self {
        Config {
            coordinator: coordinator.into(),
            data_dir: None,
            device: "cpu".into(),
            threads: None,
            connect_timeout_secs: None,
            credentials: Credentials::default(),
            ring_listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            ring_host: None,
            ring_shared_memory: true,
            health_listen: None,
            log_format: LogFormat::Text,
            fail_after_steps: None,
        }
    }

    /// How long to keep trying to reach the coordinator; `None`: as long as it takes.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout_secs.map(Duration::from_secs)
    }
}
