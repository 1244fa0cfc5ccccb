//! How the gradients of a step become new parameters.
//!
//! The seam for the ways a cluster can average: the coordinator as parameter server, or the
//! workers summing among themselves over a TCP ring (NCCL on GPUs will be another variant of
//! the latter), with the coordinator only ordering the steps.

use crate::{Error, Result};
use common::{
    ids::WorkerId,
    optim::{Optimizer, OptimizerConfig, OptimizerState},
};

/// One member's accepted part of a step: checked for count, length and finite values by the
/// training loop before it gets here.
#[derive(Debug, Clone)]
pub struct Contribution {
    /// Images it covers, and sums over them.
    pub count: u64,
    pub loss_sum: f64,
    pub correct: u64,
    pub compute_seconds: f64,
    /// Gradient of the mean loss over those images, and its L2 norm.
    pub gradient: Vec<f32>,
    pub norm: f64,
}

/// The ways gradients can be averaged.
pub enum Averaging {
    /// Workers send gradients to the coordinator, which averages them, applies the optimiser
    /// and sends the new parameters with the next step.
    ParameterServer(ParameterServer),
    /// Workers sum their gradients over a ring and each applies the update to its own
    /// replica. The coordinator keeps a copy of the replica (parameters and optimiser
    /// buffers), refreshed from a worker when it needs one: to evaluate, to checkpoint, to
    /// start a new ring. Its optimiser is never stepped here.
    Ring(ParameterServer),
}

impl Averaging {
    /// The current parameters.
    pub fn parameters(&self) -> &[f32] {
        match self {
            Averaging::ParameterServer(ps) | Averaging::Ring(ps) => &ps.parameters,
        }
    }

    /// The optimiser's running state, for the resume checkpoint.
    pub fn optimizer_state(&self) -> OptimizerState {
        match self {
            Averaging::ParameterServer(ps) | Averaging::Ring(ps) => ps.optimizer.state(),
        }
    }

    /// Combines one step's contributions (in rank order) and applies the update with rate
    /// `lr`.
    pub fn apply(&mut self, contributions: &[(WorkerId, Contribution)], lr: f32) -> Result<()> {
        match self {
            Averaging::ParameterServer(ps) => ps.apply(contributions, lr),
            Averaging::Ring(_) => unreachable!("ring workers apply their own updates"),
        }
    }

    /// Whether the workers average among themselves.
    pub fn is_ring(&self) -> bool {
        matches!(self, Averaging::Ring(_))
    }

    /// Replaces the model with a worker's replica (ring jobs).
    pub fn replace(&mut self, parameters: Vec<f32>, state: OptimizerState) -> Result<()> {
        match self {
            Averaging::ParameterServer(ps) | Averaging::Ring(ps) => {
                if parameters.len() != ps.parameters.len() {
                    return Err(Error::Ring(format!(
                        "a replica of {} parameters, the model has {}",
                        parameters.len(),
                        ps.parameters.len()
                    )));
                }
                ps.optimizer = Optimizer::from_state(*ps.optimizer.config(), state)?;
                ps.parameters = parameters;
                Ok(())
            }
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
    /// A server starting from `parameters` with a fresh optimiser.
    pub fn new(parameters: Vec<f32>, optimizer: OptimizerConfig) -> Self {
        let len = parameters.len();
        ParameterServer {
            parameters,
            optimizer: Optimizer::new(optimizer, len),
            average: vec![0.0; len],
        }
    }

    /// A server carrying on from a checkpoint.
    pub fn resume(
        parameters: Vec<f32>,
        optimizer: OptimizerConfig,
        state: OptimizerState,
    ) -> Result<Self> {
        let len = parameters.len();
        Ok(ParameterServer {
            parameters,
            optimizer: Optimizer::from_state(optimizer, state)?,
            average: vec![0.0; len],
        })
    }

    /// Averages the contributions weighted by their image counts, always in the order given
    /// (rank order), so the result never depends on which worker answered first, then steps
    /// the optimiser. A step in which no worker had images changes nothing.
    fn apply(&mut self, contributions: &[(WorkerId, Contribution)], lr: f32) -> Result<()> {
        let total: u64 = contributions.iter().map(|(_, c)| c.count).sum();
        if total == 0 {
            return Ok(());
        }
        self.average.fill(0.0);
        for (worker, c) in contributions.iter().filter(|(_, c)| c.count > 0) {
            // The training loop refuses gradients of the wrong length before they get here.
            assert_eq!(
                c.gradient.len(),
                self.parameters.len(),
                "gradient length of {worker}"
            );
            let weight = c.count as f32 / total as f32;
            for (sum, g) in self.average.iter_mut().zip(&c.gradient) {
                *sum += weight * g;
            }
        }
        self.optimizer
            .step(&mut self.parameters, &self.average, lr)
            .map_err(Error::from)
    }
}
