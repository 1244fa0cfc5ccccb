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
