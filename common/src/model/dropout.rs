use candle_core::{Result, Tensor};
use rand_chacha::{ChaCha8Rng, rand_core::RngCore};

/// Inverted dropout whose masks come from a caller-supplied stream.
///
/// candle-nn's `Dropout` draws from an unseeded generator, so two runs of the same job would
/// drop different units. Here the network owns a seeded [`ChaCha8Rng`] and hands it in, which
/// makes every mask a function of the job seed and the step.
#[derive(Debug, Clone, Copy)]
pub struct SeededDropout {
    p: f32,
}

impl SeededDropout {
    /// Dropout that zeroes each unit with probability `p` (in `[0, 1)`).
    pub fn new(p: f32) -> Self {
        assert!(
            (0.0..1.0).contains(&p),
            "dropout probability {p} is outside [0, 1)"
        );
        SeededDropout { p }
    }

    /// The probability that a unit is dropped.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// Zeroes units and scales the survivors by `1 / (1 - p)` while training, so that
    /// evaluation can be the identity.
    pub fn forward_t(&self, xs: &Tensor, train: bool, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(xs.clone());
        }
        let mut mask = vec![0.0; xs.elem_count()];
        fill_mask(self.p, rng, &mut mask);
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}

/// The next mask of dropout `p` from `rng`, in order: 0 where a unit is dropped, `1 / (1 - p)`
/// where it is kept. The CPU engine draws its masks here too, so both paths drop the same
/// units.
pub(super) fn fill_mask(p: f32, rng: &mut ChaCha8Rng, mask: &mut [f32]) {
    let scale = 1.0 / (1.0 - p);
    for m in mask {
        *m = if unit_f32(rng) < p { 0.0 } else { scale };
    }
}

/// A uniform value in `[0, 1)` from the top 24 bits of one draw: exactly representable, and
/// independent of how the `rand` crate maps bits to floats in any given version.
fn unit_f32(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::derive_rng;
    use candle_core::Device;

    #[test]
    fn evaluation_is_the_identity() {
        let xs = Tensor::ones((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut rng = derive_rng(1, "dropout", &[]);
        let ys = SeededDropout::new(0.5)
            .forward_t(&xs, false, &mut rng)
            .unwrap();
        assert_eq!(ys.to_vec2::<f32>().unwrap(), xs.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn training_masks_are_seeded_and_scaled() {
        let xs = Tensor::ones((64, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
        let dropout = SeededDropout::new(0.25);
        let run = |seed| {
            let mut rng = derive_rng(seed, "dropout", &[]);
            dropout
                .forward_t(&xs, true, &mut rng)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped fraction {dropped}");
    }
}
