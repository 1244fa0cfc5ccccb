use super::{Conv2d, Layer, conv2d, max_pool_2x2, relu::relu};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear};

/// The Keras tutorial's convolutional network: conv 3x3x32, pool, conv 3x3x64, pool,
/// conv 3x3x64, fc 128, fc 10, all with ReLU (130,890 parameters).
#[derive(Debug, Clone)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

impl Cnn {
    /// The layers as the CPU engine runs them: the same network as `forward`.
    pub const LAYERS: &[Layer] = &[
        Layer::Conv {
            name: "conv1",
            inputs: 1,
            outputs: 32,
            kernel: 3,
        },
        Layer::MaxPool2x2,
        Layer::Relu,
        Layer::Conv {
            name: "conv2",
            inputs: 32,
            outputs: 64,
            kernel: 3,
        },
        Layer::MaxPool2x2,
        Layer::Relu,
        Layer::Conv {
            name: "conv3",
            inputs: 64,
            outputs: 64,
            kernel: 3,
        },
        Layer::Relu,
        Layer::Linear {
            name: "fc1",
            inputs: 64 * 3 * 3,
            outputs: 128,
        },
        Layer::Relu,
        Layer::Linear {
            name: "fc2",
            inputs: 128,
            outputs: 10,
        },
    ];

    /// Creates (or looks up) the layers under `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Cnn {
            conv1: conv2d(1, 32, 3, vb.pp("conv1"))?,
            conv2: conv2d(32, 64, 3, vb.pp("conv2"))?,
            conv3: conv2d(64, 64, 3, vb.pp("conv3"))?,
            // 28 -conv-> 26 -pool-> 13 -conv-> 11 -pool-> 5 -conv-> 3.
            fc1: linear(64 * 3 * 3, 128, vb.pp("fc1"))?,
            fc2: linear(128, 10, vb.pp("fc2"))?,
        })
    }
}

impl Module for Cnn {
    /// ReLU comes after each pool rather than before: both are monotonic, so the values are the
    /// same, and the ReLU then runs on a quarter of the elements. The gradients are the same
    /// too, except where a window's maximum is exactly zero.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = relu(&max_pool_2x2(&self.conv1.forward(xs)?)?)?;
        let xs = relu(&max_pool_2x2(&self.conv2.forward(&xs)?)?)?;
        let xs = relu(&self.conv3.forward(&xs)?)?;
        let xs = relu(&self.fc1.forward(&xs.flatten_from(1)?)?)?;
        self.fc2.forward(&xs)
    }
}
