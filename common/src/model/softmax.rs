use super::Layer;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear};

/// Softmax regression: one 784-10 linear layer; the softmax itself lives in the loss.
#[derive(Debug, Clone)]
pub struct Softmax {
    fc: Linear,
}

impl Softmax {
    /// The layers as the CPU engine runs them: the same network as `forward`.
    pub const LAYERS: &[Layer] = &[Layer::Linear {
        name: "fc",
        inputs: 28 * 28,
        outputs: 10,
    }];

    /// Creates (or looks up) the layer under `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Softmax {
            fc: linear(28 * 28, 10, vb.pp("fc"))?,
        })
    }
}

impl Module for Softmax {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc.forward(&xs.flatten_from(1)?)
    }
}
