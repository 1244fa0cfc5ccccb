//! The networks of the tutorials, built from a `VarBuilder`.

mod kind;

pub use kind::ModelKind;
