//! The coordinator: registers workers, shards the training set every epoch, keeps
//! synchronous SGD in lock-step, averages gradients, evaluates, checkpoints and reports.
//!
//! [`run`] is the whole job; the binary only parses flags and sets up logging.

mod averaging;
mod checkpoint;
mod config;
mod console;
mod error;
mod event;
mod finite;
mod limits;
mod local_workers;
mod membership;
mod metrics;
pub mod plots;
pub mod predict;
mod progress;
mod prometheus;
mod resume;
mod run;
mod run_dir;
mod screening;
mod service;
mod status;
mod status_command;
mod trainer;

pub use checkpoint::Checkpoint;
pub use config::{AllreduceKind, Config, LrDecay};
pub use console::init_logging;
pub use error::{Error, Result};
pub use metrics::{Departure, EpochRecord, JoinRecord, ProgressRecord, StepTime};
pub use run::run;
pub use screening::{MAX_NORM, OUTLIER_FACTOR};
pub use status_command::{StatusArgs, fetch_status, status_command};
pub use trainer::Summary;
