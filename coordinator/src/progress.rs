//! How far the current epoch has got: the samples still to train on, in order, and sums
//! over those already used. Samples of a worker lost mid-step go back to the front, so
//! every epoch uses each training image exactly once, whatever happens to the workers.

use crate::metrics::{Departure, JoinRecord};
use common::sharding::EpochPlan;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// The state of one epoch; see the module documentation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EpochProgress {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Samples still to train on, next first. Saved beside the JSON, not in it.
    #[serde(skip)]
    pub remaining: VecDeque<u32>,
    /// Images trained on, and sums over them.
    pub count: u64,
    pub loss_sum: f64,
    pub correct: u64,
    /// Sum over steps of the slowest answering worker's computing time.
    pub compute_seconds: f64,
    /// Sum over steps of the time spent communicating (see `EpochRecord::comm_seconds`).
    #[serde(default)]
    pub comm_seconds: f64,
    /// Wall time of this epoch's steps so far (across coordinator restarts).
    pub train_seconds: f64,
    /// Steps applied in this epoch.
    pub steps: u64,
    /// Samples handed back because the worker computing them was lost.
    pub requeued: u64,
    /// Workers lost and admitted during the epoch.
    pub lost: Vec<Departure>,
    pub joined: Vec<JoinRecord>,
    /// Gradients refused by the screen (see `screening`), and the largest accepted gradient
    /// norm over its step's reference.
    #[serde(default)]
    pub refused: Vec<Departure>,
    #[serde(default)]
    pub spread: Option<f64>,
}

impl EpochProgress {
    /// The start of epoch `epoch`, which uses `plan`'s order.
    pub fn new(epoch: u32, plan: &EpochPlan) -> Self {
        EpochProgress {
            epoch,
            remaining: plan.order().iter().copied().collect(),
            ..EpochProgress::default()
        }
    }

    /// Whether every sample of the epoch has been trained on.
    pub fn is_done(&self) -> bool {
        self.remaining.is_empty()
    }

    /// Takes the next batch of up to `n` samples.
    pub fn take(&mut self, n: usize) -> Vec<u32> {
        let n = n.min(self.remaining.len());
        self.remaining.drain(..n).collect()
    }

    /// Puts samples that were not trained on back at the front, in their order, for the next
    /// step.
    pub fn requeue(&mut self, samples: &[u32]) {
        for &sample in samples.iter().rev() {
            self.remaining.push_front(sample);
        }
        self.requeued += samples.len() as u64;
    }

    /// Mean training loss so far.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeued_samples_come_next_and_each_is_used_once() {
        let plan = EpochPlan::new(3, 1, 100, 16);
        let mut progress = EpochProgress::new(1, &plan);
        let mut used = Vec::new();
        let mut step = 0;
        while !progress.is_done() {
            let batch = progress.take(16);
            // Every third step, the second quarter of the batch is "lost".
            if step % 3 == 2 && batch.len() >= 8 {
                let lost = batch[4..8].to_vec();
                used.extend(batch[..4].iter().chain(&batch[8..]));
                progress.requeue(&lost);
                assert_eq!(
                    progress.take(4),
                    lost,
                    "lost samples come back first, in order"
                );
                used.extend(lost);
            } else {
                used.extend(batch);
            }
            step += 1;
        }
        used.sort_unstable();
        assert_eq!(used, (0..100).collect::<Vec<u32>>());
        assert!(progress.requeued > 0);
    }
}
