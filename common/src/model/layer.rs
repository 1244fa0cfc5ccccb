use super::ModelKind;

/// One layer of a network as the CPU engine ([`super::Engine`]) runs it. Each network lists
/// its layers next to its candle `forward`, with the same parameter names, and the engine's
/// tests check that both compute the same function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layer {
    /// A 2-D convolution, square kernel, stride 1, no padding: parameters `NAME.weight`
    /// `(outputs, inputs, kernel, kernel)` and `NAME.bias` `(outputs)`.
    Conv {
        name: &'static str,
        inputs: usize,
        outputs: usize,
        kernel: usize,
    },
    /// 2x2 max-pooling with stride 2 (see [`super::max_pool_2x2`]).
    MaxPool2x2,
    /// The hyperbolic tangent.
    Tanh,
    /// `max(x, 0)`.
    Relu,
    /// `y = x Wᵀ + b` on the flattened input: `NAME.weight` `(outputs, inputs)` and
    /// `NAME.bias` `(outputs)`.
    Linear {
        name: &'static str,
        inputs: usize,
        outputs: usize,
    },
    /// Inverted dropout of this probability while training (see [`super::SeededDropout`]),
    /// the identity otherwise.
    Dropout(f32),
}

impl ModelKind {
    /// The network's layers, applied to a `(1, 28, 28)` image, ending in the 10 logits.
    pub fn layers(self) -> &'static [Layer] {
        match self {
            ModelKind::Softmax => super::Softmax::LAYERS,
            ModelKind::Mlp => super::Mlp::LAYERS,
            ModelKind::MlpDropout => super::MlpDropout::LAYERS,
            ModelKind::Lenet => super::Lenet::LAYERS,
            ModelKind::Cnn => super::Cnn::LAYERS,
        }
    }
}
