//! [`ModelState`](crate::v1::ModelState): a ring worker's replica on the wire.

use crate::{
    codec::{CodecError, decode_f32, encode_f32},
    v1::ModelState,
};

/// The tensors of a [`ModelState`], decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct StateTensors {
    pub parameters: Vec<f32>,
    /// Optimiser steps applied so far, and its buffers (empty when the rule keeps none).
    pub optimizer_step: u64,
    pub first_moment: Vec<f32>,
    pub second_moment: Vec<f32>,
}

impl ModelState {
    /// The replica after `committed_steps` steps.
    pub fn encode(committed_steps: u64, tensors: &StateTensors) -> ModelState {
        ModelState {
            committed_steps,
            parameters: encode_f32(&tensors.parameters),
            optimizer_step: tensors.optimizer_step,
            first_moment: encode_f32(&tensors.first_moment),
            second_moment: encode_f32(&tensors.second_moment),
        }
    }

    /// The tensors; fails on a field whose length is not a whole number of floats.
    pub fn decode(&self) -> Result<StateTensors, CodecError> {
        Ok(StateTensors {
            parameters: decode_f32("parameters", &self.parameters)?,
            optimizer_step: self.optimizer_step,
            first_moment: decode_f32("first_moment", &self.first_moment)?,
            second_moment: decode_f32("second_moment", &self.second_moment)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_survives_the_wire() {
        let tensors = StateTensors {
            parameters: vec![1.0, -2.5, f32::MIN_POSITIVE],
            optimizer_step: 7,
            first_moment: vec![0.25, 0.5, 0.75],
            second_moment: Vec::new(),
        };
        let state = ModelState::encode(12, &tensors);
        assert_eq!(state.committed_steps, 12);
        assert_eq!(state.decode().unwrap(), tensors);
        let mut torn = state;
        torn.first_moment.truncate(5);
        assert!(
            torn.decode()
                .unwrap_err()
                .to_string()
                .contains("first_moment")
        );
    }
}
