//! Placeholder: being written.
/// Placeholder.
pub struct Optimizer;
/// Placeholder.
pub struct OptimizerState;
