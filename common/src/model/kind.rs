use crate::Error;
use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

/// The models of the four classic MNIST tutorials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Softmax regression, 784-10.
    Softmax,
    /// MLP 784-128-64-10 with ReLU.
    Mlp,
    /// MLP 784-512-256-10 with ReLU and dropout 0.5 / 0.2.
    MlpDropout,
    /// LeNet as in the MXNet tutorial: conv5x5x20 tanh, pool, conv5x5x50 tanh, pool, fc500 tanh, fc10.
    Lenet,
    /// The Keras tutorial's CNN: conv3x3x32, pool, conv3x3x64, pool, conv3x3x64, fc128, fc10 (ReLU).
    Cnn,
}

impl ModelKind {
    /// Every model, in the order the tutorials introduce them.
    pub const ALL: [ModelKind; 5] = [
        ModelKind::Softmax,
        ModelKind::Mlp,
        ModelKind::MlpDropout,
        ModelKind::Lenet,
        ModelKind::Cnn,
    ];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Softmax => "softmax",
            ModelKind::Mlp => "mlp",
            ModelKind::MlpDropout => "mlp-dropout",
            ModelKind::Lenet => "lenet",
            ModelKind::Cnn => "cnn",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        ModelKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| Error::UnknownName {
                kind: "model",
                value: s.to_string(),
                expected: ModelKind::ALL.map(ModelKind::name).join(", "),
            })
    }
}
