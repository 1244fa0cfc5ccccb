use crate::{Error, Result};
use clap::{Args, ValueEnum};
use common::{
    job::JobConfig,
    model::ModelKind,
    optim::{OptimizerConfig, OptimizerKind},
};
use std::{net::SocketAddr, path::PathBuf};

/// How the coordinator runs a job; every flag can also come from the environment, so a
/// Kubernetes manifest can set it.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Workers taking part in every step.
    #[arg(long, env = "LOCKSTEP_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Wait for `--workers` workers started elsewhere instead of spawning them.
    #[arg(long, env = "LOCKSTEP_EXTERNAL_WORKERS")]
    pub external_workers: bool,

    /// Address to serve gRPC on [default: 127.0.0.1:0 when spawning workers, 0.0.0.0:50051
    /// with --external-workers].
    #[arg(long, env = "LOCKSTEP_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Network to train: softmax, mlp, mlp-dropout, lenet, cnn.
    #[arg(long, env = "LOCKSTEP_MODEL", default_value = "mlp")]
    pub model: ModelKind,

    /// Passes over the training set.
    #[arg(long, env = "LOCKSTEP_EPOCHS", default_value_t = 10)]
    pub epochs: u32,

    /// Images per worker per step.
    #[arg(long, env = "LOCKSTEP_BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,

    /// Update rule: sgd, adam, rmsprop.
    #[arg(long, env = "LOCKSTEP_OPTIMIZER", default_value = "sgd")]
    pub optimizer: OptimizerKind,

    /// Learning rate for a global batch of --lr-reference-batch images [default: 0.05 for
    /// sgd, 0.001 for adam and rmsprop].
    #[arg(long, env = "LOCKSTEP_LR")]
    pub lr: Option<f32>,

    /// Global batch at which --lr applies; the rate scales linearly with the real global batch.
    #[arg(long, env = "LOCKSTEP_LR_REFERENCE_BATCH", default_value_t = 64)]
    pub lr_reference_batch: usize,

    /// Use --lr as it is, whatever the global batch.
    #[arg(long, env = "LOCKSTEP_NO_LR_SCALING")]
    pub no_lr_scaling: bool,

    /// Steps of linear learning-rate warm-up.
    #[arg(long, env = "LOCKSTEP_WARMUP_STEPS", default_value_t = 50)]
    pub warmup_steps: u64,

    /// Learning-rate decay after warm-up.
    #[arg(long, env = "LOCKSTEP_LR_DECAY", value_enum, default_value_t = LrDecay::Cosine)]
    pub lr_decay: LrDecay,

    /// SGD momentum.
    #[arg(long, env = "LOCKSTEP_MOMENTUM", default_value_t = 0.9)]
    pub momentum: f32,

    /// L2 weight decay added to the gradient.
    #[arg(long, env = "LOCKSTEP_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f32,

    /// Seeds initial parameters, sample order and dropout.
    #[arg(long, env = "LOCKSTEP_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Stop after this many steps in all (for quick looks and tests).
    #[arg(long, env = "LOCKSTEP_MAX_STEPS")]
    pub max_steps: Option<u64>,

    /// Directory of the four IDX files (raw or .gz). MNIST is fetched there if they are
    /// missing [default: ~/.cache/lockstep/mnist].
    #[arg(long, env = "LOCKSTEP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Where metrics and checkpoints go [default: runs/<model>-<time>].
    #[arg(long, env = "LOCKSTEP_RUN_DIR")]
    pub run_dir: Option<PathBuf>,

    /// Compute threads of each spawned worker [default: cores / workers, at least 1].
    #[arg(long, env = "LOCKSTEP_THREADS_PER_WORKER")]
    pub threads_per_worker: Option<usize>,

    /// Program to spawn as a worker [default: this program, in worker mode].
    #[arg(long, env = "LOCKSTEP_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
}

/// Learning-rate decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LrDecay {
    /// Keep the peak rate.
    Constant,
    /// Half a cosine down to zero at the last step.
    Cosine,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 4,
            external_workers: false,
            listen: None,
            model: ModelKind::Mlp,
            epochs: 10,
            batch_size: 64,
            optimizer: OptimizerKind::Sgd,
            lr: None,
            lr_reference_batch: 64,
            no_lr_scaling: false,
            warmup_steps: 50,
            lr_decay: LrDecay::Cosine,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: 42,
            max_steps: None,
            data_dir: None,
            run_dir: None,
            threads_per_worker: None,
            worker_bin: None,
        }
    }
}

impl Config {
    /// The job these flags describe.
    pub fn job(&self) -> JobConfig {
        let lr = self.lr.unwrap_or(match self.optimizer {
            OptimizerKind::Sgd => 0.05,
            OptimizerKind::Adam | OptimizerKind::Rmsprop => 0.001,
        });
        JobConfig {
            model: self.model,
            epochs: self.epochs,
            batch_size: self.batch_size,
            workers: self.workers,
            seed: self.seed,
            optimizer: OptimizerConfig {
                kind: self.optimizer,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                ..OptimizerConfig::default()
            },
            lr,
            lr_reference_batch: (!self.no_lr_scaling).then_some(self.lr_reference_batch),
            warmup_steps: self.warmup_steps,
            cosine_decay: self.lr_decay == LrDecay::Cosine,
            max_steps: self.max_steps,
        }
    }

    /// Rejects flags that cannot make a job.
    pub fn validate(&self) -> Result<()> {
        if self.workers > 1024 {
            return Err(Error::Config(format!(
                "--workers {} is more than this coordinator supports (1024)",
                self.workers
            )));
        }
        if self.threads_per_worker == Some(0) {
            return Err(Error::Config(
                "--threads-per-worker must be at least 1".into(),
            ));
        }
        self.job().validate()?;
        Ok(())
    }

    /// The address to serve on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.unwrap_or_else(|| {
            if self.external_workers {
                SocketAddr::from(([0, 0, 0, 0], 50051))
            } else {
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        })
    }
}
