use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The learning rate at every step: the linear scaling rule for the global batch, a linear
/// warm-up, then constant or cosine decay to zero.
///
/// With scaling, `lr` is the rate for a global batch of `reference_batch` images and the peak
/// rate is `lr * global_batch / reference_batch` (Goyal et al., "Accurate, Large Minibatch SGD").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Learning rate at the reference batch size.
    pub lr: f32,
    /// Global batch at which `lr` applies; `None` disables the scaling rule.
    pub reference_batch: Option<usize>,
    /// Images per step across all workers.
    pub global_batch: usize,
    /// Steps over which the rate rises linearly from `peak / warmup_steps` to `peak`.
    pub warmup_steps: u64,
    /// Total steps of the job, for cosine decay.
    pub total_steps: u64,
    /// Whether the rate decays along a half cosine after warm-up.
    pub cosine: bool,
}

impl LrSchedule {
    /// The rate after warm-up, with the scaling rule applied.
    pub fn peak(&self) -> f32 {
        match self.reference_batch {
            Some(reference) => self.lr * self.global_batch as f32 / reference as f32,
            None => self.lr,
        }
    }

    /// The rate for `step` (counted from zero over the whole job).
    pub fn at(&self, step: u64) -> f32 {
        let peak = self.peak();
        if step < self.warmup_steps {
            return peak * (step + 1) as f32 / self.warmup_steps as f32;
        }
        if !self.cosine {
            return peak;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        (f64::from(peak) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
    }

    /// Rejects rates that are not positive and finite, and an empty reference batch.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::Config(format!(
                "lr must be positive, got {}",
                self.lr
            )));
        }
        if self.reference_batch == Some(0) || self.global_batch == 0 {
            return Err(Error::Config("batch sizes must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cosine: bool) -> LrSchedule {
        LrSchedule {
            lr: 0.1,
            reference_batch: Some(64),
            global_batch: 256,
            warmup_steps: 4,
            total_steps: 104,
            cosine,
        }
    }

    #[test]
    fn linear_scaling_and_warmup() {
        let s = schedule(false);
        assert!((s.peak() - 0.4).abs() < 1e-6);
        assert!((s.at(0) - 0.1).abs() < 1e-6);
        assert!((s.at(3) - 0.4).abs() < 1e-6);
        assert!((s.at(100) - 0.4).abs() < 1e-6);
    }

    #[test]
    fn cosine_decays_to_zero() {
        let s = schedule(true);
        assert!((s.at(4) - 0.4).abs() < 1e-6);
        assert!((s.at(54) - 0.2).abs() < 1e-3);
        assert!(s.at(104) < 1e-6);
    }
}
