//! How the gradients of a step become new parameters.
//!
//! This is the seam for the ways a cluster can average: today the coordinator is the
//! parameter server; a CPU ring all-reduce and NCCL will be further variants, in which the
//! workers average among themselves and the coordinator only orders the steps.

use crate::{Error, Result};
use common::{
    ids::WorkerId,
    optim::{Optimizer, OptimizerConfig},
    params::check_finite,
};
use proto::v1::GradientReport;

/// The ways gradients can be averaged.
pub enum Averaging {
    /// Workers send gradients to the coordinator, which averages them, applies the optimiser
    /// and sends the new parameters with the next step.
    ParameterServer(ParameterServer),
}

impl Averaging {
    /// The current parameters.
    pub fn parameters(&self) -> &[f32] {
        match self {
            Averaging::ParameterServer(ps) => &ps.parameters,
        }
    }

    /// Combines one step's reports (in rank order) and applies the update with rate `lr`.
    pub fn apply(&mut self, reports: &[(WorkerId, GradientReport)], lr: f32) -> Result<()> {
        match self {
            Averaging::ParameterServer(ps) => ps.apply(reports, lr),
        }
    }
}

/// The coordinator holds the parameters and the optimiser state.
pub struct ParameterServer {
    parameters: Vec<f32>,
    optimizer: Optimizer,
    average: Vec<f32>,
}

impl ParameterServer {
    /// A server starting from `parameters`.
    pub fn new(parameters: Vec<f32>, optimizer: OptimizerConfig) -> Self {
        let len = parameters.len();
        ParameterServer {
            parameters,
            optimizer: Optimizer::new(optimizer, len),
            average: vec![0.0; len],
        }
    }

    /// Averages the reports weighted by their image counts, always in the order given (rank
    /// order), so the result never depends on which worker answered first, then steps the
    /// optimiser. A step in which no worker had images changes nothing.
    fn apply(&mut self, reports: &[(WorkerId, GradientReport)], lr: f32) -> Result<()> {
        let total: u64 = reports.iter().map(|(_, r)| r.count).sum();
        if total == 0 {
            return Ok(());
        }
        self.average.fill(0.0);
        for (worker, report) in reports.iter().filter(|(_, r)| r.count > 0) {
            let bad = |problem: String| Error::BadReport {
                worker: *worker,
                what: "gradient",
                problem,
            };
            let gradient =
                proto::decode_f32("gradient", &report.gradient).map_err(|e| bad(e.to_string()))?;
            if gradient.len() != self.parameters.len() {
                return Err(bad(format!(
                    "{} floats, the model has {} parameters",
                    gradient.len(),
                    self.parameters.len()
                )));
            }
            check_finite("gradient", &gradient).map_err(|e| bad(e.to_string()))?;
            let weight = report.count as f32 / total as f32;
            for (sum, g) in self.average.iter_mut().zip(&gradient) {
                *sum += weight * g;
            }
        }
        self.optimizer
            .step(&mut self.parameters, &self.average, lr)
            .map_err(Error::from)
    }
}
