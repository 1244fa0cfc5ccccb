//! Update rules on flat parameter buffers, shared by the parameter server and (later) by
//! workers that all-reduce among themselves.

mod config;
mod kind;
mod optimizer;
mod schedule;

pub use config::OptimizerConfig;
pub use kind::OptimizerKind;
pub use optimizer::{Optimizer, OptimizerState};
pub use schedule::LrSchedule;
