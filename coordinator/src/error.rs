use common::ids::WorkerId;
use std::path::PathBuf;

/// Result with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can end or disturb a job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Data, model or optimiser trouble from `common`.
    #[error(transparent)]
    Common(#[from] common::Error),

    /// Flags that cannot make a job.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A member's session ended while the job needed it.
    #[error("worker {worker} left during {phase}: {reason}")]
    WorkerLost {
        worker: WorkerId,
        phase: String,
        reason: String,
    },

    /// A member sent something that cannot be used.
    #[error("worker {worker} sent a bad {what}: {problem}")]
    BadReport {
        worker: WorkerId,
        what: &'static str,
        problem: String,
    },

    /// A spawned worker process ended before the job did.
    #[error("worker process {index} exited ({status}) before training finished")]
    WorkerExited { index: usize, status: String },

    /// A worker process could not be started.
    #[error("could not start worker process {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Reading or writing the run directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The gRPC server could not start or failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// Shut down before training completed.
    #[error("interrupted before training completed")]
    Interrupted,
}

impl Error {
    /// Whether the job could carry on without the party that caused this (a lost or
    /// misbehaving worker), as opposed to a problem of the job itself.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::WorkerLost { .. } | Error::BadReport { .. } | Error::WorkerExited { .. }
        )
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
