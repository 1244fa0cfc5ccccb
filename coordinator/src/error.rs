use process::StopCause;
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

    /// Fewer than `--min-workers` workers for longer than `--pause-timeout`.
    #[error(
        "paused with {members} of the {min} workers needed, and none came within {waited_secs:.0} s"
    )]
    TooFewWorkers {
        members: usize,
        min: usize,
        waited_secs: f64,
    },

    /// Every worker's gradient for a step held NaN or infinity: the model diverged, which no
    /// eviction can fix.
    #[error("training diverged at step {step}: {problem} (try a lower --lr)")]
    Diverged { step: u64, problem: String },

    /// The workers cannot form a ring: it failed again and again with every worker present
    /// (`--allreduce ring`). Retrying will not help; the workers' addresses need fixing.
    #[error("ring all-reduce: {0}")]
    Ring(String),

    /// Every worker holding the model was lost at once (`--allreduce ring`); `--resume`
    /// carries on from the last checkpoint.
    #[error("{0}")]
    ModelLost(String),

    /// The resume checkpoint could not be written or read.
    #[error("checkpoint: {0}")]
    Checkpoint(String),

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

    /// A record or checkpoint held NaN or infinity, which JSON cannot hold (it would be
    /// written as `null`); the file was left as it was.
    #[error("{}: not written: {field} is not a finite number", path.display())]
    NonFinite { path: PathBuf, field: String },

    /// The gRPC server could not start or failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// `coordinator status` could not get an answer.
    #[error("cannot get the status from {url}: {reason}")]
    StatusQuery { url: String, reason: String },

    /// Asked to stop (Ctrl-C or SIGTERM) before training completed; the resume checkpoint
    /// holds the job as it was at the last step.
    #[error("{} before training completed", match .0 {
        StopCause::Interrupt => "interrupted",
        StopCause::Terminate => "stopped by SIGTERM",
    })]
    Stopped(StopCause),

    /// An image given to `predict` could not be used.
    #[error("{}: {problem}", path.display())]
    Image { path: PathBuf, problem: String },

    /// A plot could not be drawn.
    #[error("plot {name}: {problem}")]
    Plot { name: String, problem: String },
}

impl Error {
    /// Whether running the job again (or resuming it) may succeed, as opposed to a problem
    /// of the job itself (bad flags, bad data, divergence).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::TooFewWorkers { .. } | Error::ModelLost(_))
    }

    /// Whether the flags or files given cannot make a job: the exit status is then
    /// [`process::exit::USAGE`], so that a supervisor does not start it again unchanged.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Config(_))
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
