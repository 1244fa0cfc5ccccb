//! `coordinator predict`: a trained model's digit for each of a person's image files.

mod command;
mod digit;
mod inputs;
mod prediction;

pub use command::{PredictArgs, main};
pub use digit::{Digit, FIT_SIDE};
pub use inputs::image_files;
pub use prediction::{ClassProbability, Prediction};
