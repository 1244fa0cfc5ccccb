use common::ids::WorkerId;
use proto::v1::{CoordinatorMessage, EvalReport, GradientReport, ModelState, NcclId, RingReady};
use tokio::sync::mpsc;
use tonic::Status;

/// Where the coordinator's messages to one worker go: the worker's session stream.
pub type Outbox = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// Everything the training loop hears about, in one queue, so that it reacts to reports,
/// arrivals and departures in a single place.
#[derive(Debug)]
pub enum Event {
    /// A registered worker opened its session. `address` is where it registered from;
    /// `ring_address` is where its ring listener is reached (`host:port`), when it has one.
    Joined {
        worker: WorkerId,
        outbox: Outbox,
        address: String,
        ring_address: Option<String>,
    },
    /// A worker answered.
    Report { worker: WorkerId, report: Report },
    /// A worker's session ended.
    Left { worker: WorkerId, reason: String },
    /// A worker process spawned by this coordinator ended; `restarting` says whether it is
    /// being started again.
    ProcessExited {
        index: usize,
        status: String,
        restarting: bool,
    },
}

/// A worker's answer to a request.
#[derive(Debug)]
pub enum Report {
    /// The gradient of its part of a step.
    Gradient(GradientReport),
    /// Sums over its part of the test set.
    Eval(EvalReport),
    /// Its ring is connected, or why not.
    RingReady(RingReady),
    /// The NCCL unique id of a new generation, or why it has none (as rank 0).
    NcclId(NcclId),
    /// Its replica, as asked for.
    State(ModelState),
    /// It could not do what it was asked.
    Failure(String),
    /// It is alive (sent while idle and while computing).
    Heartbeat,
}
