//! The networks of the tutorials, built from a `VarBuilder`.
//!
//! Each network is a plain function of its variables: no device, optimiser or network code.
//! Pooling and dropout have local implementations (see [`max_pool_2x2`] and
//! [`SeededDropout`]) because candle's own are not fit for training that must be correct and
//! repeatable.

mod cnn;
mod dropout;
mod kind;
mod lenet;
mod mlp;
mod mlp_dropout;
mod network;
mod pool;
mod softmax;

pub use cnn::Cnn;
pub use dropout::SeededDropout;
pub use kind::ModelKind;
pub use lenet::Lenet;
pub use mlp::Mlp;
pub use mlp_dropout::MlpDropout;
pub use network::Network;
pub use pool::max_pool_2x2;
pub use softmax::Softmax;
