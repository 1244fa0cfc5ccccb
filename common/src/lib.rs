//! Everything coordinator and workers share that is not networking: the dataset and its
//! fetching, the models, parameter flattening, optimisers, sharding and the job description.
//!
//! Invariant: nothing here opens a socket except [`fetch`], which downloads MNIST.

pub mod allocator;
pub mod bench_report;
pub mod dataset;
pub mod device;
pub mod error;
pub mod fetch;
pub mod ids;
pub mod idx;
pub mod job;
pub mod model;
pub mod optim;
pub mod params;
pub mod pickle;
pub mod replica;
pub mod seed;
pub mod sharding;
pub mod simd;

pub use error::{Error, IdxProblem, Result};
