//! A worker: registers with the coordinator, gets the dataset, and computes gradients and
//! evaluations of its model replica on request.
//!
//! [`run`] is the whole worker; [`main_with`] wraps it into a process.

mod config;
mod error;
mod executor;
mod nccl;
mod process;
pub mod ring;
mod ring_replica;
mod session;
mod transfer;

pub use config::{Config, Credentials};
pub use error::{Error, Result};
pub use executor::Executor;
pub use process::{
    EXIT_USAGE, LogFormat, Stop, StopCause, init_tracing, init_tracing_to, main_with,
    stop_on_signals,
};
pub use session::run;
