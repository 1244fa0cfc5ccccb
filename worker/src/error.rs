use std::path::PathBuf;

/// Result with the worker's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can end a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Data, model or tensor trouble from `common`.
    #[error(transparent)]
    Common(#[from] common::Error),

    /// Flags or files that cannot work: a URL that does not parse, TLS settings that do not
    /// fit it. Retrying will not help.
    #[error("{0}")]
    Usage(String),

    /// The job has its `--max-workers` workers; a place may come free later.
    #[error("the job is full: {0}")]
    JobFull(String),

    /// The coordinator has too many registrations waiting for their session (someone may be
    /// flooding it); a later attempt may get in.
    #[error("the coordinator is busy: {0}")]
    Busy(String),

    /// The coordinator could not be reached in time.
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },

    /// The coordinator refused this worker.
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),

    /// The session with the coordinator broke.
    #[error("lost the coordinator: {0}")]
    CoordinatorLost(String),

    /// The coordinator dropped this worker from the job; it may register again.
    #[error("evicted by the coordinator: {0}")]
    Evicted(String),

    /// Join token or TLS settings that cannot be used.
    #[error(transparent)]
    Security(#[from] proto::security::SecurityError),

    /// The fault asked for with --fail-after-steps.
    #[error("injected fault: exiting after {0} gradients, as --fail-after-steps asked")]
    InjectedFault(u64),

    /// The coordinator asked for something this worker cannot do.
    #[error("bad request from the coordinator: {0}")]
    BadRequest(String),

    /// The received dataset does not match what the coordinator announced.
    #[error("received dataset is corrupt: {0}")]
    Transfer(String),

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
        matches!(
            self,
            Error::Unreachable { .. }
                | Error::CoordinatorLost(_)
                | Error::Evicted(_)
                | Error::JobFull(_)
                | Error::Busy(_)
        )
    }

    /// Whether the worker was started wrongly (bad flags or files): its exit status is then
    /// [`process::exit::USAGE`], which a supervisor can tell from a failure worth retrying.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::Usage(_) | Error::Security(_) => true,
            Error::Common(e) => e.is_usage(),
            _ => false,
        }
    }
}

impl From<tonic::Status> for Error {
    /// A broken connection is a lost coordinator (worth reconnecting); anything else the
    /// coordinator answered is a refusal.
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let text = format!("{:?}: {}", status.code(), status.message());
        match status.code() {
            Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal => Error::CoordinatorLost(text),
            Code::ResourceExhausted => Error::Busy(text),
            _ => Error::Refused(text),
        }
    }
}
