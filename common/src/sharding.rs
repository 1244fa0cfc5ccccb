//! Which training images each worker processes at each step.
//!
//! An epoch is a seeded permutation of the training set cut into global batches of
//! `global_batch` images; step `s` consumes global batch `s`, split among the current members
//! in rank order. Because the global batch of a step does not depend on how many workers share
//! it, N workers with batch b follow the same trajectory as one worker with batch N*b.

use crate::seed::derive_rng;
use rand_chacha::rand_core::RngCore;
use std::ops::Range;

/// The order in which one epoch visits the training set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    order: Vec<u32>,
    global_batch: usize,
}

impl EpochPlan {
    /// The plan for `epoch` of a job with `seed`, over `len` images.
    ///
    /// # Panics
    /// If `global_batch` is zero or `len` does not fit in `u32`.
    pub fn new(seed: u64, epoch: u64, len: usize, global_batch: usize) -> Self {
        assert!(global_batch > 0, "global batch must be positive");
        let len = u32::try_from(len).expect("training set larger than u32::MAX");
        let mut order: Vec<u32> = (0..len).collect();
        let mut rng = derive_rng(seed, "epoch-order", &[epoch]);
        // Fisher-Yates with our own bounded draw, so the order is fixed by ChaCha8 alone.
        for i in (1..order.len()).rev() {
            let j = bounded(&mut rng, i as u64 + 1) as usize;
            order.swap(i, j);
        }
        EpochPlan {
            order,
            global_batch,
        }
    }

    /// Number of steps in the epoch; the last one may be short.
    pub fn steps(&self) -> usize {
        self.order.len().div_ceil(self.global_batch)
    }

    /// Images in the epoch.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the epoch has no images.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The global batch of `step`: empty past the end of the epoch.
    pub fn batch(&self, step: usize) -> &[u32] {
        let start = (step * self.global_batch).min(self.order.len());
        let end = (start + self.global_batch).min(self.order.len());
        &self.order[start..end]
    }

    /// The whole order, step after step.
    pub fn order(&self) -> &[u32] {
        &self.order
    }
}

/// Splits `len` items into `parts` contiguous ranges whose sizes differ by at most one,
/// larger ranges first. Used both for a step's batch and for the test set.
///
/// # Panics
/// If `parts` is zero.
pub fn split_evenly(len: usize, parts: usize) -> Vec<Range<usize>> {
    assert!(parts > 0, "cannot split among zero parts");
    (0..parts).map(|part| even_part(len, parts, part)).collect()
}

/// Range `part` of [`split_evenly`]`(len, parts)`, without the others: the first `len % parts`
/// ranges hold one item more. The ring all-reduce cuts its buffers so, one segment per rank.
///
/// # Panics
/// If `parts` is zero.
pub fn even_part(len: usize, parts: usize, part: usize) -> Range<usize> {
    assert!(parts > 0, "cannot split among zero parts");
    let (base, extra) = (len / parts, len % parts);
    let start = part * base + part.min(extra);
    start..start + base + usize::from(part < extra)
}

/// A uniform draw from `0..bound` without modulo bias (Lemire's method with rejection).
fn bounded(rng: &mut impl RngCore, bound: u64) -> u64 {
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(bound);
        let low = product as u64;
        if low >= bound.wrapping_neg() % bound {
            return (product >> 64) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_index_exactly_once_per_epoch(
            len in 0usize..3000,
            workers in 1usize..9,
            batch in 1usize..300,
            seed in any::<u64>(),
            epoch in 0u64..50,
        ) {
            let plan = EpochPlan::new(seed, epoch, len, workers * batch);
            let mut seen = vec![0u32; len];
            for step in 0..plan.steps() {
                let global = plan.batch(step);
                prop_assert!(!global.is_empty());
                for range in split_evenly(global.len(), workers) {
                    prop_assert!(range.len() <= batch);
                    for &index in &global[range] {
                        seen[index as usize] += 1;
                    }
                }
            }
            prop_assert!(plan.batch(plan.steps()).is_empty());
            prop_assert!(seen.iter().all(|&count| count == 1));
        }

        #[test]
        fn deterministic_per_seed_and_epoch(seed in any::<u64>(), epoch in 0u64..1000) {
            let a = EpochPlan::new(seed, epoch, 500, 32);
            let b = EpochPlan::new(seed, epoch, 500, 32);
            prop_assert_eq!(&a, &b);
            let next = EpochPlan::new(seed, epoch + 1, 500, 32);
            prop_assert_ne!(a.order(), next.order());
        }

        #[test]
        fn split_covers_range_in_order(len in 0usize..10_000, parts in 1usize..64) {
            let ranges = split_evenly(len, parts);
            prop_assert_eq!(ranges.len(), parts);
            let mut next = 0;
            for range in &ranges {
                prop_assert_eq!(range.start, next);
                next = range.end;
            }
            prop_assert_eq!(next, len);
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            prop_assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "larger ranges first");
            for (part, range) in ranges.iter().enumerate() {
                prop_assert_eq!(&even_part(len, parts, part), range);
            }
        }
    }

    #[test]
    fn same_global_batches_for_any_world_size() {
        // The property behind N workers x batch b == 1 worker x batch N*b.
        let one = EpochPlan::new(7, 3, 1000, 128);
        let many = EpochPlan::new(7, 3, 1000, 4 * 32);
        assert_eq!(one.batch(2), many.batch(2));
    }
}
