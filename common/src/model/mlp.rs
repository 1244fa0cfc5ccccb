use super::Layer;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear};

/// The multi-layer perceptron 784-128-64-10 with ReLU.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Mlp {
    /// The layers as the CPU engine runs them: the same network as `forward`.
    pub const LAYERS: &[Layer] = &[
        Layer::Linear {
            name: "fc1",
            inputs: 28 * 28,
            outputs: 128,
        },
        Layer::Relu,
        Layer::Linear {
            name: "fc2",
            inputs: 128,
            outputs: 64,
        },
        Layer::Relu,
        Layer::Linear {
            name: "fc3",
            inputs: 64,
            outputs: 10,
        },
    ];

    /// Creates (or looks up) the layers under `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Mlp {
            fc1: linear(28 * 28, 128, vb.pp("fc1"))?,
            fc2: linear(128, 64, vb.pp("fc2"))?,
            fc3: linear(64, 10, vb.pp("fc3"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.fc1.forward(&xs.flatten_from(1)?)?.relu()?;
        let xs = self.fc2.forward(&xs)?.relu()?;
        self.fc3.forward(&xs)
    }
}
