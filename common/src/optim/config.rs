use super::OptimizerKind;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The hyper-parameters of an update rule, except the learning rate, which comes from
/// [`LrSchedule`](super::LrSchedule) step by step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// The update rule.
    pub kind: OptimizerKind,
    /// SGD momentum (0 disables it).
    pub momentum: f32,
    /// L2 penalty added to the gradient (PyTorch's `weight_decay`), all optimisers.
    pub weight_decay: f32,
    /// Adam's first-moment decay.
    pub beta1: f32,
    /// Adam's second-moment decay.
    pub beta2: f32,
    /// RMSprop's squared-gradient decay (PyTorch's `alpha`).
    pub rms_decay: f32,
    /// Added to denominators (Adam, RMSprop).
    pub eps: f32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            rms_decay: 0.99,
            eps: 1e-8,
        }
    }
}

impl OptimizerConfig {
    /// Rejects values for which the update rule is undefined or diverges.
    pub fn validate(&self) -> Result<()> {
        let unit = |name: &str, value: f32| {
            if (0.0..1.0).contains(&value) {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "{name} must be in [0, 1), got {value}"
                )))
            }
        };
        unit("momentum", self.momentum)?;
        unit("beta1", self.beta1)?;
        unit("beta2", self.beta2)?;
        unit("rms-decay", self.rms_decay)?;
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::Config(format!(
                "weight-decay must be a finite value >= 0, got {}",
                self.weight_decay
            )));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::Config(format!(
                "eps must be positive, got {}",
                self.eps
            )));
        }
        Ok(())
    }
}
