use std::path::PathBuf;

/// Result with the worker's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can end a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Data, model or tensor trouble from `common`.
    #[error(transparent)]
    Common(#[from] common::Error),

    /// The coordinator could not be reached in time.
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },

    /// The coordinator refused this worker.
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),

    /// The session with the coordinator broke.
    #[error("lost the coordinator: {0}")]
    CoordinatorLost(String),

    /// The coordinator asked for something this worker cannot do.
    #[error("bad request from the coordinator: {0}")]
    BadRequest(String),

    /// The received dataset does not match what the coordinator announced.
    #[error("received dataset is corrupt: {0}")]
    Transfer(String),

    /// A device this build cannot use.
    #[error("device '{0}': {1}")]
    Device(String, String),

    /// Writing the received dataset failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether reconnecting may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unreachable { .. } | Error::CoordinatorLost(_))
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::CoordinatorLost(format!("{:?}: {}", status.code(), status.message()))
    }
}
