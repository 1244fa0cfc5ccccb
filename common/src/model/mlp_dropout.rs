use super::{Layer, SeededDropout};
use crate::seed::derive_rng;
use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear};
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

/// The multi-layer perceptron 784-512-256-10 with ReLU, dropping 50% of the first hidden
/// layer and 20% of the second while training.
#[derive(Debug)]
pub struct MlpDropout {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
    dropout1: SeededDropout,
    dropout2: SeededDropout,
    // `forward_t` takes `&self`; the lock is uncontended since a replica runs one pass at a time.
    rng: Mutex<ChaCha8Rng>,
}

impl MlpDropout {
    /// The layers as the CPU engine runs them: the same network as `forward`.
    pub const LAYERS: &[Layer] = &[
        Layer::Linear {
            name: "fc1",
            inputs: 28 * 28,
            outputs: 512,
        },
        Layer::Relu,
        Layer::Dropout(0.5),
        Layer::Linear {
            name: "fc2",
            inputs: 512,
            outputs: 256,
        },
        Layer::Relu,
        Layer::Dropout(0.2),
        Layer::Linear {
            name: "fc3",
            inputs: 256,
            outputs: 10,
        },
    ];

    /// Creates (or looks up) the layers under `vb`, with masks drawn from seed 0 until
    /// [`reseed`](Self::reseed) is called.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(MlpDropout {
            fc1: linear(28 * 28, 512, vb.pp("fc1"))?,
            fc2: linear(512, 256, vb.pp("fc2"))?,
            fc3: linear(256, 10, vb.pp("fc3"))?,
            dropout1: SeededDropout::new(0.5),
            dropout2: SeededDropout::new(0.2),
            rng: Mutex::new(dropout_rng(0)),
        })
    }

    /// Restarts the mask stream, so that the next training pass drops the units that `seed`
    /// determines, whatever passes came before.
    pub fn reseed(&self, seed: u64) {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = dropout_rng(seed);
    }
}

/// The stream of dropout masks of the step whose seed is `seed`; the CPU engine draws from it too.
pub(super) fn dropout_rng(seed: u64) -> ChaCha8Rng {
    derive_rng(seed, "dropout", &[])
}

impl ModuleT for MlpDropout {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        // A panic elsewhere cannot leave a generator half-updated, so a poisoned lock is usable.
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let xs = self.fc1.forward(&xs.flatten_from(1)?)?.relu()?;
        let xs = self.dropout1.forward_t(&xs, train, &mut rng)?;
        let xs = self.fc2.forward(&xs)?.relu()?;
        let xs = self.dropout2.forward_t(&xs, train, &mut rng)?;
        self.fc3.forward(&xs)
    }
}
