//! What every lockstep program shares, below the coordinator and the worker: how it logs
//! ([`LogFormat`], [`init_tracing`]), how it is asked to stop ([`Stop`]), what its exit
//! status means ([`exit`]), and the flags a client of the coordinator shows it
//! ([`Credentials`]: the worker's, and `coordinator status`'s).
//!
//! No computation and no networking: the coordinator's library depends on this crate, not on
//! the worker's.

mod credentials;
pub mod exit;
mod log_format;
mod logging;
mod stop;

pub use credentials::Credentials;
pub use log_format::LogFormat;
pub use logging::{init_tracing, init_tracing_to};
pub use stop::{Stop, StopCause, stop_on_signals};
