//! A worker: registers with the coordinator, gets the dataset, and computes gradients and
//! evaluations of its model replica on request.
//!
//! [`run`] is the whole worker; [`main_with`] wraps it into a process.

mod config;
mod error;
mod executor;
mod nccl;
mod program;
pub mod ring;
mod ring_replica;
mod session;
mod transfer;

pub use config::Config;
pub use error::{Error, Result};
pub use executor::Executor;
pub use program::main_with;
pub use session::run;
