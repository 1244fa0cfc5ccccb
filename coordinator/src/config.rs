use crate::{Error, Result};
use clap::{Args, ValueEnum};
use common::{
    job::JobConfig,
    model::ModelKind,
    optim::{OptimizerConfig, OptimizerKind},
};
use process::LogFormat;
use proto::security::{JoinToken, ServerTls};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

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

    /// How gradients are averaged: `ps`, the coordinator as parameter server; `ring`, the
    /// workers among themselves over a TCP ring (each worker's --ring-listen port must be
    /// reachable from the others); `nccl`, the workers with NCCL on their CUDA devices
    /// (workers built with the `nccl` feature, run with --device cuda:N) [default: ring when
    /// spawning workers, which share this host and sum through shared memory; ps with
    /// --external-workers].
    #[arg(long, env = "LOCKSTEP_ALLREDUCE", value_enum)]
    pub allreduce: Option<AllreduceKind>,

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

    /// Where metrics and checkpoints go [default: runs/<model>-<time>]. A directory that
    /// already holds this job's resume checkpoint is carried on from it, so that a restarted
    /// coordinator (a Kubernetes pod, say) continues by itself with the same command.
    #[arg(long, env = "LOCKSTEP_RUN_DIR")]
    pub run_dir: Option<PathBuf>,

    /// Where spawned workers compute: cpu, or cuda:N (a build with the `cuda` feature).
    #[arg(long, env = "LOCKSTEP_WORKER_DEVICE", default_value = "cpu")]
    pub worker_device: String,

    /// Compute threads of each spawned worker [default: cores / workers, at least 1].
    #[arg(long, env = "LOCKSTEP_THREADS_PER_WORKER")]
    pub threads_per_worker: Option<usize>,

    /// Program to spawn as a worker [default: this program, in worker mode].
    #[arg(long, env = "LOCKSTEP_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,

    /// Fewest workers the job trains with; below it the job pauses (see --pause-timeout).
    #[arg(long, env = "LOCKSTEP_MIN_WORKERS", default_value_t = 1)]
    pub min_workers: usize,

    /// Most workers taking part at once; later arrivals are turned away [default: --workers].
    #[arg(long, env = "LOCKSTEP_MAX_WORKERS")]
    pub max_workers: Option<usize>,

    /// Seconds after which a silent worker (no heartbeat), or one still computing that long
    /// after half the others answered, is evicted.
    #[arg(long, env = "LOCKSTEP_WORKER_TIMEOUT", default_value_t = 5.0)]
    pub worker_timeout: f64,

    /// Seconds the job waits, paused, for --min-workers workers before it fails.
    #[arg(long, env = "LOCKSTEP_PAUSE_TIMEOUT", default_value_t = 300.0)]
    pub pause_timeout: f64,

    /// Write the resume checkpoint every this many steps (0: only at the end of each epoch).
    #[arg(long, env = "LOCKSTEP_CHECKPOINT_EVERY", default_value_t = 100)]
    pub checkpoint_every: u64,

    /// Continue the job of this run directory from its resume checkpoint; the job's settings
    /// come from the run directory, the cluster's (workers, addresses, timeouts) from the flags.
    #[arg(long, env = "LOCKSTEP_RESUME", value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,

    /// Times each spawned worker is restarted after dying, before its slot is given up.
    #[arg(long, env = "LOCKSTEP_MAX_RESTARTS", default_value_t = 3)]
    pub max_restarts: u32,

    /// Secret every worker must present on every call; others get `Unauthenticated`.
    #[arg(long, env = "LOCKSTEP_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,

    /// File holding the join token.
    #[arg(long, env = "LOCKSTEP_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,

    /// PEM certificate chain to serve TLS with (with --tls-key).
    #[arg(long, env = "LOCKSTEP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "LOCKSTEP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require worker certificates signed by this PEM CA (mutual TLS).
    #[arg(long, env = "LOCKSTEP_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// CA that signed --tls-cert, for the workers this coordinator spawns; the certificate
    /// must then name `localhost`.
    #[arg(long, env = "LOCKSTEP_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,

    /// Serve health probes here in plaintext (grpc.health.v1: service "" answers whether the
    /// job accepts workers, "liveness" whether the training loop is making progress), e.g.
    /// 0.0.0.0:8081; for Kubernetes' grpc probes, which send no TLS and no token. The gRPC
    /// port serves the same health service too, behind its TLS.
    #[arg(long, env = "LOCKSTEP_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Serve Prometheus metrics over HTTP at this address (GET /metrics), e.g.
    /// 127.0.0.1:9100.
    #[arg(long, env = "LOCKSTEP_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Seconds between progress reports: a record in progress.jsonl and, without a
    /// terminal, a progress line in the log.
    #[arg(long, env = "LOCKSTEP_PROGRESS_EVERY", default_value_t = 5.0)]
    pub progress_every: f64,

    /// How log lines are written: text, or json (one object per line). Spawned workers
    /// log the same way.
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How gradients are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AllreduceKind {
    /// The coordinator averages the workers' gradients and sends the new parameters.
    Ps,
    /// The workers sum their gradients over a TCP ring and apply the update themselves.
    Ring,
    /// As `ring`, but the workers sum with NCCL on their CUDA devices.
    Nccl,
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
            allreduce: None,
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
            worker_device: "cpu".into(),
            threads_per_worker: None,
            worker_bin: None,
            min_workers: 1,
            max_workers: None,
            worker_timeout: 5.0,
            pause_timeout: 300.0,
            checkpoint_every: 100,
            resume: None,
            max_restarts: 3,
            join_token: None,
            join_token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_ca: None,
            health_listen: None,
            metrics_listen: None,
            progress_every: 5.0,
            log_format: LogFormat::Text,
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
        if self.min_workers == 0 || self.min_workers > self.workers {
            return Err(Error::Config(format!(
                "--min-workers must be between 1 and --workers ({}), got {}",
                self.workers, self.min_workers
            )));
        }
        if self.max_workers() < self.workers {
            return Err(Error::Config(format!(
                "--max-workers ({}) must be at least --workers ({})",
                self.max_workers(),
                self.workers
            )));
        }
        for (flag, seconds) in [
            ("--worker-timeout", self.worker_timeout),
            ("--pause-timeout", self.pause_timeout),
            ("--progress-every", self.progress_every),
        ] {
            if !(seconds.is_finite() && seconds > 0.0 && seconds < 1e7) {
                return Err(Error::Config(format!(
                    "{flag} must be a positive number of seconds, got {seconds}"
                )));
            }
        }
        if self.tls_cert.is_some() && !self.external_workers && self.tls_ca.is_none() {
            return Err(Error::Config(
                "with --tls-cert, spawned workers need --tls-ca to check the certificate \
                 (or use --external-workers)"
                    .into(),
            ));
        }
        if self.allreduce() == AllreduceKind::Nccl && !self.external_workers {
            if !cfg!(feature = "nccl") {
                return Err(Error::Config(
                    "--allreduce nccl: this coordinator was built without NCCL, and so are the \
                     workers it spawns (build with --features nccl, or use --external-workers)"
                        .into(),
                ));
            }
            if !self.worker_device.starts_with("cuda:") {
                return Err(Error::Config(format!(
                    "--allreduce nccl needs CUDA workers: --worker-device cuda:N, got {}",
                    self.worker_device
                )));
            }
        }
        self.join_token()?;
        self.job().validate()?;
        Ok(())
    }

    /// The join token, from the flag or the file.
    pub fn join_token(&self) -> Result<Option<JoinToken>> {
        JoinToken::resolve(self.join_token.clone(), self.join_token_file.clone())
            .map_err(|e| Error::Config(e.to_string()))
    }

    /// TLS settings for serving, when --tls-cert is given.
    pub fn tls(&self) -> Option<ServerTls> {
        Some(ServerTls {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// How gradients are averaged: as `--allreduce` says, else the ring for spawned workers
    /// (on one host it beats the parameter server; see the README's benchmarks) and the
    /// parameter server for workers started elsewhere, which may not reach each other.
    pub fn allreduce(&self) -> AllreduceKind {
        self.allreduce.unwrap_or(if self.external_workers {
            AllreduceKind::Ps
        } else {
            AllreduceKind::Ring
        })
    }

    /// Most workers taking part at once.
    pub fn max_workers(&self) -> usize {
        self.max_workers.unwrap_or(self.workers)
    }

    /// How long a worker may stay silent, or lag behind the others, before it is evicted.
    pub fn worker_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.worker_timeout)
    }

    /// Time between progress reports.
    pub fn progress_every(&self) -> Duration {
        Duration::from_secs_f64(self.progress_every)
    }

    /// How long the job waits, paused, for enough workers.
    pub fn pause_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.pause_timeout)
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
