use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`: what an epoch did. Field names are part of the user-facing
/// contract (README, "Metrics").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Mean cross-entropy over the training images of the epoch (dropout on).
    pub train_loss: f64,
    /// Fraction of training images classified correctly while training.
    pub train_accuracy: f64,
    /// Mean cross-entropy over the test set after the epoch.
    pub test_loss: f64,
    /// Fraction of the test set classified correctly after the epoch.
    pub test_accuracy: f64,
    /// Per class (digit 0 to 9), the fraction of its test images classified correctly, and
    /// how many test images it has. Absent when a worker that does not count classes (an
    /// older build) took part in the evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy_per_class: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_samples_per_class: Option<Vec<u64>>,
    /// Training images used in the epoch.
    pub samples: u64,
    /// Test images evaluated.
    pub test_samples: u64,
    /// Workers taking part at the end of the epoch.
    pub workers: usize,
    /// Training images per second (training time only, evaluation excluded).
    pub images_per_sec: f64,
    /// Wall time of the epoch, evaluation and checkpoint included.
    pub seconds: f64,
    /// Wall time of the training steps.
    pub train_seconds: f64,
    /// Part of `train_seconds` spent computing gradients: per step, the slowest worker's
    /// time.
    pub compute_seconds: f64,
    /// Part of `train_seconds` spent communicating. Parameter server: per step, the time
    /// from sending the requests to having every answer, less the slowest worker's
    /// computing. Ring: per step, the all-reduce time of the worker that waited least in it.
    /// The rest of `train_seconds` is averaging, scheduling and waiting.
    #[serde(default)]
    pub comm_seconds: f64,
    /// The rest of `train_seconds`: the coordinator averaging and scheduling, and the job
    /// waiting (for workers to be admitted, for a paused job's workers, for a new ring).
    #[serde(default)]
    pub wait_seconds: f64,
    /// The same split as means per step.
    #[serde(default)]
    pub step_time: StepTime,
    /// Wall time of the evaluation.
    pub eval_seconds: f64,
    /// Steps in the epoch.
    pub steps: u64,
    /// Steps since the start of the job, this epoch's included.
    pub global_step: u64,
    /// Learning rate of the epoch's last step.
    pub lr: f32,
    /// Training images handed to another worker because the one computing them was lost.
    #[serde(default)]
    pub samples_requeued: u64,
    /// Workers that left or were evicted during the epoch.
    #[serde(default)]
    pub workers_lost: Vec<Departure>,
    /// Workers admitted during the epoch (the initial members are not listed).
    #[serde(default)]
    pub workers_joined: Vec<JoinRecord>,
    /// Gradients refused before averaging, each with its worker, step and reason (the
    /// worker is evicted too, and listed in `workers_lost`).
    #[serde(default)]
    pub gradients_refused: Vec<Departure>,
    /// The largest accepted gradient norm of the epoch over its reference (the others'
    /// median, or recent steps' with one or two members): how far honest steps spiked,
    /// against the refusal threshold (`OUTLIER_FACTOR`, 1e4). Left out when no step had a
    /// reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_spread: Option<f64>,
}

/// Mean wall time of a step and its parts, in seconds: `seconds` = `compute` + `comm` +
/// `wait` (see [`EpochRecord::compute_seconds`] and the fields after it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    pub seconds: f64,
    pub compute: f64,
    pub comm: f64,
    pub wait: f64,
}

/// One line of `progress.jsonl`, written every `--progress-every` seconds while training and
/// at the end of each epoch's training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// Always `"progress"`, so that lines stay recognisable wherever they are copied.
    pub kind: String,
    /// Seconds since the job started (across coordinator restarts).
    pub time: f64,
    pub epoch: u32,
    /// Steps done in the epoch, and since the start of the job.
    pub step: u64,
    pub global_step: u64,
    /// Training images used in the epoch so far.
    pub samples: u64,
    /// Mean training loss over the images since the previous record of the epoch.
    pub train_loss: f64,
    /// Mean training loss of the epoch so far.
    pub epoch_train_loss: f64,
    /// Training images per second since the previous record (training time only).
    pub images_per_sec: f64,
    pub workers: usize,
    /// Learning rate of the last step.
    pub lr: f32,
}

/// A worker that stopped taking part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Departure {
    pub worker: String,
    /// The global step during which it was lost.
    pub step: u64,
    pub reason: String,
}

/// A worker admitted while the job ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRecord {
    pub worker: String,
    /// The first global step it took part in.
    pub step: u64,
}
