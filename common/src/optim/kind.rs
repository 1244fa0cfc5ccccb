use crate::Error;
use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

/// Which update rule turns averaged gradients into new parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with (optional) momentum and weight decay.
    Sgd,
    /// Adam (Kingma & Ba), weight decay added to the gradient.
    Adam,
    /// RMSprop (Hinton), as PyTorch defines it.
    Rmsprop,
}

impl OptimizerKind {
    /// Every optimiser.
    pub const ALL: [OptimizerKind; 3] = [
        OptimizerKind::Sgd,
        OptimizerKind::Adam,
        OptimizerKind::Rmsprop,
    ];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::Rmsprop => "rmsprop",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OptimizerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        OptimizerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| Error::UnknownName {
                kind: "optimizer",
                value: s.to_string(),
                expected: OptimizerKind::ALL.map(OptimizerKind::name).join(", "),
            })
    }
}
