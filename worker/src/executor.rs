//! The computing half of a worker: a model replica and the dataset, with no networking.

use crate::{Error, Result};
use candle_core::Device;
use common::{
    dataset::Dataset,
    replica::{BatchGradient, EvalSums, Replica},
};
use std::ops::Range;

/// Images evaluated per forward pass.
const EVAL_CHUNK: usize = 1000;

/// Computes gradients and evaluations on request.
pub struct Executor {
    replica: Replica,
    dataset: Dataset,
    device: Device,
}

impl Executor {
    /// An executor for `replica` over `dataset`.
    pub fn new(replica: Replica, dataset: Dataset, device: Device) -> Self {
        Executor {
            replica,
            dataset,
            device,
        }
    }

    /// Gives the dataset back, to build an executor for another model.
    pub fn into_dataset(self) -> Dataset {
        self.dataset
    }

    /// The gradient of the mean loss over the training images `indices`.
    pub fn gradient(
        &mut self,
        parameters: &[f32],
        indices: &[u32],
        dropout_seed: u64,
    ) -> Result<BatchGradient> {
        if indices.is_empty() {
            return Ok(BatchGradient {
                loss_sum: 0.0,
                correct: 0,
                count: 0,
                gradient: Vec::new(),
            });
        }
        let (images, labels) = self.dataset.train.batch(indices, &self.device)?;
        Ok(self
            .replica
            .gradient(parameters, &images, &labels, dropout_seed)?)
    }

    /// Loss and accuracy sums over the test images in `range`.
    pub fn evaluate(&mut self, parameters: &[f32], range: Range<usize>) -> Result<EvalSums> {
        let len = self.dataset.test.len();
        if range.start > range.end || range.end > len {
            return Err(Error::BadRequest(format!(
                "test range {}..{} is outside the test set of {len} images",
                range.start, range.end
            )));
        }
        let mut total = EvalSums::default();
        let mut start = range.start;
        while start < range.end {
            let end = (start + EVAL_CHUNK).min(range.end);
            let (images, labels) = self.dataset.test.range_batch(start..end, &self.device)?;
            total.add(&self.replica.evaluate(parameters, &images, &labels)?);
            start = end;
        }
        Ok(total)
    }
}
