//! The networks of the tutorials, built from a `VarBuilder`.
//!
//! Each network is a plain function of its variables: no device, optimiser or network code.
//! Convolution, pooling, tanh and dropout have local implementations ([`Conv2d`],
//! [`max_pool_2x2`], `tanh::tanh`, [`SeededDropout`]) because candle's own are too slow to
//! train with, wrong in the backward pass, not vectorised, or unseeded, in that order.
//!
//! Each network also lists its layers ([`Layer`], e.g. [`Lenet::LAYERS`]); on the CPU the
//! [`Engine`] runs those with the same kernels, straight from the flat parameters, without
//! candle's graph. The candle `forward` is what other devices run and what the engine is
//! tested against.

mod cnn;
mod conv;
mod conv_op;
mod dropout;
mod engine;
mod gemm;
mod kind;
mod layer;
mod lenet;
mod linear;
mod loss;
mod mlp;
mod mlp_dropout;
mod network;
mod parallel;
mod pool;
mod relu;
mod softmax;
mod tanh;
mod wide_conv;

pub use cnn::Cnn;
pub use conv::{Conv2d, conv2d};
pub use dropout::SeededDropout;
pub use engine::Engine;
pub use kind::ModelKind;
pub use layer::Layer;
pub use lenet::Lenet;
pub(crate) use loss::{argmax, softmax_cross_entropy};
pub use mlp::Mlp;
pub use mlp_dropout::MlpDropout;
pub use network::Network;
pub use pool::max_pool_2x2;
pub use softmax::Softmax;
