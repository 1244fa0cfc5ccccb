use crate::{
    Error, Result,
    model::ModelKind,
    optim::{LrSchedule, OptimizerConfig},
};
use serde::{Deserialize, Serialize};

/// What a training job computes: everything that must agree between coordinator and workers,
/// and everything that decides the result. Written into the run directory and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobConfig {
    /// The network to train.
    pub model: ModelKind,
    /// Passes over the training set.
    pub epochs: u32,
    /// Images per worker per step.
    pub batch_size: usize,
    /// Workers taking part in every step.
    pub workers: usize,
    /// Seeds the initial parameters, the epoch orders and dropout.
    pub seed: u64,
    /// The update rule.
    pub optimizer: OptimizerConfig,
    /// Learning rate at the reference batch (see [`LrSchedule`]).
    pub lr: f32,
    /// Global batch at which `lr` applies; `None` turns the linear scaling rule off.
    pub lr_reference_batch: Option<usize>,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Cosine decay of the learning rate after warm-up.
    pub cosine_decay: bool,
    /// Stop after this many steps in total (for tests and quick looks).
    pub max_steps: Option<u64>,
}

impl JobConfig {
    /// Images per step across all workers.
    pub fn global_batch(&self) -> usize {
        self.batch_size * self.workers
    }

    /// Steps in one epoch over `train_len` images.
    pub fn steps_per_epoch(&self, train_len: usize) -> u64 {
        train_len.div_ceil(self.global_batch()) as u64
    }

    /// Steps in the whole job, `max_steps` included.
    pub fn total_steps(&self, train_len: usize) -> u64 {
        let full = self.steps_per_epoch(train_len) * u64::from(self.epochs);
        self.max_steps.map_or(full, |max| max.min(full))
    }

    /// The learning rate schedule for a training set of `train_len` images.
    pub fn schedule(&self, train_len: usize) -> LrSchedule {
        LrSchedule {
            lr: self.lr,
            reference_batch: self.lr_reference_batch,
            global_batch: self.global_batch(),
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps(train_len),
            cosine: self.cosine_decay,
        }
    }

    /// The settings in which `other` differs from this job, each as `name: this → other`
    /// (nested settings as `optimizer.momentum`), in name order.
    pub fn differences(&self, other: &JobConfig) -> Vec<String> {
        fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
            match (a, b) {
                (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                    for (key, value) in a {
                        let name = if prefix.is_empty() {
                            key.clone()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        walk(
                            &name,
                            value,
                            b.get(key).unwrap_or(&serde_json::Value::Null),
                            out,
                        );
                    }
                }
                _ if a != b => out.push(format!("{prefix}: {a} → {b}")),
                _ => {}
            }
        }
        // Through text, so that an f32 shows as it was written (0.9, not 0.8999999761581421).
        let value = |job: &JobConfig| {
            serde_json::from_str(&serde_json::to_string(job).expect("a job serialises"))
                .expect("and parses back")
        };
        let mut out = Vec::new();
        walk("", &value(self), &value(other), &mut out);
        out
    }

    /// Rejects configurations that cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::Config("epochs must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(Error::Config("batch-size must be at least 1".into()));
        }
        if self.workers == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        if self.max_steps == Some(0) {
            return Err(Error::Config("max-steps must be at least 1".into()));
        }
        self.optimizer.validate()?;
        self.schedule(1).validate()
    }
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            model: ModelKind::Mlp,
            epochs: 10,
            batch_size: 64,
            workers: 4,
            seed: 42,
            optimizer: OptimizerConfig::default(),
            lr: 0.05,
            lr_reference_batch: Some(256),
            warmup_steps: 100,
            cosine_decay: true,
            max_steps: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobConfig {
        JobConfig {
            model: ModelKind::Mlp,
            epochs: 10,
            batch_size: 64,
            workers: 3,
            seed: 42,
            optimizer: OptimizerConfig::default(),
            lr: 0.05,
            lr_reference_batch: Some(64),
            warmup_steps: 50,
            cosine_decay: true,
            max_steps: None,
        }
    }

    #[test]
    fn differences_name_each_setting_that_differs() {
        assert!(job().differences(&job()).is_empty());
        let mut other = job();
        other.epochs = 5;
        other.optimizer.momentum = 0.5;
        other.max_steps = Some(7);
        assert_eq!(
            job().differences(&other),
            [
                "epochs: 10 → 5",
                "max_steps: null → 7",
                "optimizer.momentum: 0.9 → 0.5"
            ]
        );
    }
}
