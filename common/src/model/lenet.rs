use super::{Conv2d, Layer, conv2d, max_pool_2x2, tanh::tanh};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear};

/// LeNet as in the MXNet tutorial: conv 5x5x20, tanh, pool, conv 5x5x50, tanh, pool,
/// fc 500 with tanh, fc 10 (431,080 parameters).
#[derive(Debug, Clone)]
pub struct Lenet {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

impl Lenet {
    /// The layers as the CPU engine runs them: the same network as `forward`.
    pub const LAYERS: &[Layer] = &[
        Layer::Conv {
            name: "conv1",
            inputs: 1,
            outputs: 20,
            kernel: 5,
        },
        Layer::Tanh,
        Layer::MaxPool2x2,
        Layer::Conv {
            name: "conv2",
            inputs: 20,
            outputs: 50,
            kernel: 5,
        },
        Layer::Tanh,
        Layer::MaxPool2x2,
        Layer::Linear {
            name: "fc1",
            inputs: 50 * 4 * 4,
            outputs: 500,
        },
        Layer::Tanh,
        Layer::Linear {
            name: "fc2",
            inputs: 500,
            outputs: 10,
        },
    ];

    /// Creates (or looks up) the layers under `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Lenet {
            conv1: conv2d(1, 20, 5, vb.pp("conv1"))?,
            conv2: conv2d(20, 50, 5, vb.pp("conv2"))?,
            // 28 -conv-> 24 -pool-> 12 -conv-> 8 -pool-> 4.
            fc1: linear(50 * 4 * 4, 500, vb.pp("fc1"))?,
            fc2: linear(500, 10, vb.pp("fc2"))?,
        })
    }
}

impl Module for Lenet {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = max_pool_2x2(&tanh(&self.conv1.forward(xs)?)?)?;
        let xs = max_pool_2x2(&tanh(&self.conv2.forward(&xs)?)?)?;
        let xs = tanh(&self.fc1.forward(&xs.flatten_from(1)?)?)?;
        self.fc2.forward(&xs)
    }
}
