use super::{OptimizerConfig, OptimizerKind};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// An update rule with its running state, applied to flat `f32` buffers.
///
/// The arithmetic follows PyTorch's `torch.optim` (single-tensor code path) operation for
/// operation, so that a run here and the same run in PyTorch stay close, and it is plain
/// sequential loops, so that every process applying the same update gets the same bits.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    state: OptimizerState,
}

/// Everything an [`Optimizer`] carries from one step to the next, for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// The number of parameters the buffers cover.
    pub len: usize,
    /// Steps applied so far.
    pub step: u64,
    /// SGD's momentum buffer or Adam's first moment (`exp_avg`); empty when the rule keeps none.
    pub first_moment: Vec<f32>,
    /// Adam's second moment (`exp_avg_sq`) or RMSprop's `square_avg`; empty when the rule keeps
    /// none.
    pub second_moment: Vec<f32>,
}

impl Optimizer {
    /// A fresh optimiser for `len` parameters. `config` is taken as valid; see
    /// [`OptimizerConfig::validate`].
    pub fn new(config: OptimizerConfig, len: usize) -> Optimizer {
        let (first, second) = buffer_lens(&config, len);
        Optimizer {
            config,
            state: OptimizerState {
                len,
                step: 0,
                first_moment: vec![0.0; first],
                second_moment: vec![0.0; second],
            },
        }
    }

    /// Resumes from a saved state, which must have the buffers that `config`'s rule keeps.
    pub fn from_state(config: OptimizerConfig, state: OptimizerState) -> Result<Optimizer> {
        let (first, second) = buffer_lens(&config, state.len);
        let check = |what: &'static str, expected: usize, actual: usize| {
            if expected == actual {
                Ok(())
            } else {
                Err(Error::Length {
                    what,
                    expected,
                    actual,
                })
            }
        };
        check("optimizer first moment", first, state.first_moment.len())?;
        check("optimizer second moment", second, state.second_moment.len())?;
        Ok(Optimizer { config, state })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// A copy of the running state, for a checkpoint.
    pub fn state(&self) -> OptimizerState {
        self.state.clone()
    }

    /// Steps applied so far.
    pub fn step_count(&self) -> u64 {
        self.state.step
    }

    /// Updates `params` in place from `grad` with learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f32) -> Result<()> {
        let len = self.state.len;
        for (what, actual) in [("parameters", params.len()), ("gradient", grad.len())] {
            if actual != len {
                return Err(Error::Length {
                    what,
                    expected: len,
                    actual,
                });
            }
        }
        match self.config.kind {
            OptimizerKind::Sgd => self.sgd(params, grad, lr),
            OptimizerKind::Adam => self.adam(params, grad, lr),
            OptimizerKind::Rmsprop => self.rmsprop(params, grad, lr),
        }
        self.state.step += 1;
        Ok(())
    }

    fn sgd(&mut self, params: &mut [f32], grad: &[f32], lr: f32) {
        let OptimizerConfig {
            momentum,
            weight_decay,
            ..
        } = self.config;
        let first_step = self.state.step == 0;
        let buf = &mut self.state.first_moment;
        for i in 0..params.len() {
            let mut g = grad[i];
            if weight_decay != 0.0 {
                g += weight_decay * params[i];
            }
            if momentum != 0.0 {
                // PyTorch starts the buffer at the first gradient rather than at zero.
                buf[i] = if first_step { g } else { momentum * buf[i] + g };
                g = buf[i];
            }
            params[i] -= lr * g;
        }
    }

    fn adam(&mut self, params: &mut [f32], grad: &[f32], lr: f32) {
        let OptimizerConfig {
            weight_decay,
            beta1,
            beta2,
            eps,
            ..
        } = self.config;
        // Scalars in f64, as Python computes them before PyTorch's kernels see them.
        let t = (self.state.step + 1) as i32;
        let bias_correction1 = 1.0 - f64::from(beta1).powi(t);
        let bias_correction2 = 1.0 - f64::from(beta2).powi(t);
        let step_size = (f64::from(lr) / bias_correction1) as f32;
        let bias_correction2_sqrt = bias_correction2.sqrt() as f32;
        let (m, v) = (&mut self.state.first_moment, &mut self.state.second_moment);
        for i in 0..params.len() {
            let mut g = grad[i];
            if weight_decay != 0.0 {
                g += weight_decay * params[i];
            }
            // `exp_avg.lerp_(grad, 1 - beta1)`.
            m[i] += (1.0 - beta1) * (g - m[i]);
            v[i] = v[i] * beta2 + (1.0 - beta2) * g * g;
            let denom = v[i].sqrt() / bias_correction2_sqrt + eps;
            params[i] -= step_size * (m[i] / denom);
        }
    }

    fn rmsprop(&mut self, params: &mut [f32], grad: &[f32], lr: f32) {
        let OptimizerConfig {
            weight_decay,
            rms_decay: alpha,
            eps,
            ..
        } = self.config;
        let square_avg = &mut self.state.second_moment;
        for i in 0..params.len() {
            let mut g = grad[i];
            if weight_decay != 0.0 {
                g += weight_decay * params[i];
            }
            square_avg[i] = square_avg[i] * alpha + (1.0 - alpha) * g * g;
            params[i] -= lr * (g / (square_avg[i].sqrt() + eps));
        }
    }
}

/// The lengths of the first- and second-moment buffers that `config`'s rule keeps.
fn buffer_lens(config: &OptimizerConfig, len: usize) -> (usize, usize) {
    match config.kind {
        OptimizerKind::Sgd if config.momentum != 0.0 => (len, 0),
        OptimizerKind::Sgd => (0, 0),
        OptimizerKind::Adam => (len, len),
        OptimizerKind::Rmsprop => (0, len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kind: OptimizerKind) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            ..OptimizerConfig::default()
        }
    }

    /// Runs `grads.len()` steps from `start` and returns the parameters after each.
    fn run(config: OptimizerConfig, start: &[f32], grads: &[[f32; 2]], lr: f32) -> Vec<Vec<f32>> {
        let mut opt = Optimizer::new(config, start.len());
        let mut params = start.to_vec();
        grads
            .iter()
            .map(|grad| {
                opt.step(&mut params, grad, lr).unwrap();
                params.clone()
            })
            .collect()
    }

    fn assert_close(actual: &[Vec<f32>], expected: &[[f64; 2]]) {
        assert_eq!(actual.len(), expected.len());
        for (step, (a, e)) in actual.iter().zip(expected).enumerate() {
            for (x, y) in a.iter().zip(e) {
                assert!(
                    (f64::from(*x) - y).abs() < 1e-6,
                    "step {step}: {a:?}, expected {e:?}"
                );
            }
        }
    }

    const GRADS: [[f32; 2]; 3] = [[1.0, -2.0], [0.5, 0.5], [-1.0, 0.0]];

    #[test]
    fn plain_sgd() {
        let cfg = OptimizerConfig {
            momentum: 0.0,
            ..config(OptimizerKind::Sgd)
        };
        let out = run(cfg, &[1.0, 1.0], &GRADS, 0.1);
        assert_close(&out, &[[0.9, 1.2], [0.85, 1.15], [0.95, 1.15]]);
        assert!(Optimizer::new(cfg, 2).state().first_moment.is_empty());
    }

    #[test]
    fn sgd_with_momentum_and_weight_decay() {
        let cfg = OptimizerConfig {
            momentum: 0.9,
            weight_decay: 0.1,
            ..config(OptimizerKind::Sgd)
        };
        // Coordinate 0: g1 = 1 + 0.1 = 1.1, buf = 1.1, p = 1 - 0.11 = 0.89;
        // g2 = 0.5 + 0.089 = 0.589, buf = 0.99 + 0.589 = 1.579, p = 0.89 - 0.1579 = 0.7321;
        // g3 = -1 + 0.07321 = -0.92679, buf = 1.4211 - 0.92679 = 0.49431, p = 0.682669.
        // Coordinate 1: g1 = -1.9, buf = -1.9, p = 1.19;
        // g2 = 0.619, buf = -1.71 + 0.619 = -1.091, p = 1.2991;
        // g3 = 0.12991, buf = -0.9819 + 0.12991 = -0.85199, p = 1.384299.
        let out = run(cfg, &[1.0, 1.0], &GRADS, 0.1);
        assert_close(
            &out,
            &[[0.89, 1.19], [0.7321, 1.2991], [0.682669, 1.384299]],
        );
    }

    #[test]
    fn adam() {
        let cfg = config(OptimizerKind::Adam);
        // Step 1: m = 0.1 g, v = 0.001 g^2; m_hat = g, v_hat = g^2, update = lr * sign(g).
        // Step 2 (coordinate 0): m = 0.09 + 0.05 = 0.14, v = 0.000999 + 0.00025 = 0.001249;
        // m_hat = 0.14 / 0.19, v_hat = 0.001249 / 0.001999; update = 0.01 * 0.736842 / 0.790458.
        // Coordinate 1: m = -0.18 + 0.05 = -0.13, v = 0.003996 + 0.00025 = 0.004246;
        // update = 0.01 * (-0.684211) / 1.457408.
        // Step 3 (coordinate 0): m = 0.126 - 0.1 = 0.026, v = 0.001247751 + 0.001 = 0.002247751;
        // m_hat = 0.026 / 0.271, v_hat = 0.002247751 / 0.002997001.
        // Coordinate 1: m = -0.117, v = 0.004241754; m_hat = -0.117 / 0.271,
        // v_hat = 0.004241754 / 0.002997001.
        let out = run(cfg, &[1.0, 1.0], &GRADS, 0.01);
        let p0_2 = 0.99 - 0.01 * (0.14 / 0.19) / (0.001249f64 / 0.001999).sqrt();
        let p1_2 = 1.01 + 0.01 * (0.13 / 0.19) / (0.004246f64 / 0.001999).sqrt();
        let p0_3 = p0_2 - 0.01 * (0.026 / 0.271) / (0.002247751f64 / 0.002997001).sqrt();
        let p1_3 = p1_2 + 0.01 * (0.117 / 0.271) / (0.004241754f64 / 0.002997001).sqrt();
        assert_close(&out, &[[0.99, 1.01], [p0_2, p1_2], [p0_3, p1_3]]);
    }

    #[test]
    fn rmsprop() {
        let cfg = OptimizerConfig {
            rms_decay: 0.9,
            ..config(OptimizerKind::Rmsprop)
        };
        // Coordinate 0: s = 0.1, p = 1 - 0.01 / sqrt(0.1); s = 0.09 + 0.025 = 0.115,
        // p -= 0.01 * 0.5 / sqrt(0.115); s = 0.1035 + 0.1 = 0.2035, p += 0.01 / sqrt(0.2035).
        // Coordinate 1: s = 0.4, p = 1 + 0.02 / sqrt(0.4); s = 0.36 + 0.025 = 0.385,
        // p -= 0.005 / sqrt(0.385); s = 0.3465, p unchanged.
        let out = run(cfg, &[1.0, 1.0], &GRADS, 0.01);
        let p0 = [
            1.0 - 0.01 / 0.1f64.sqrt(),
            1.0 - 0.01 / 0.1f64.sqrt() - 0.005 / 0.115f64.sqrt(),
            1.0 - 0.01 / 0.1f64.sqrt() - 0.005 / 0.115f64.sqrt() + 0.01 / 0.2035f64.sqrt(),
        ];
        let p1 = [
            1.0 + 0.02 / 0.4f64.sqrt(),
            1.0 + 0.02 / 0.4f64.sqrt() - 0.005 / 0.385f64.sqrt(),
            1.0 + 0.02 / 0.4f64.sqrt() - 0.005 / 0.385f64.sqrt(),
        ];
        assert_close(&out, &[[p0[0], p1[0]], [p0[1], p1[1]], [p0[2], p1[2]]]);
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        for kind in OptimizerKind::ALL {
            let cfg = config(kind);
            let mut a = Optimizer::new(cfg, 2);
            let mut pa = vec![1.0, 1.0];
            a.step(&mut pa, &GRADS[0], 0.01).unwrap();
            let json = serde_json::to_string(&a.state()).unwrap();
            let mut b = Optimizer::from_state(cfg, serde_json::from_str(&json).unwrap()).unwrap();
            let mut pb = pa.clone();
            a.step(&mut pa, &GRADS[1], 0.01).unwrap();
            b.step(&mut pb, &GRADS[1], 0.01).unwrap();
            assert_eq!(pa, pb, "{kind}");
            assert_eq!(b.step_count(), 2);
        }
        let adam_state = Optimizer::new(config(OptimizerKind::Adam), 2).state();
        assert!(Optimizer::from_state(config(OptimizerKind::Rmsprop), adam_state).is_err());
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        let mut opt = Optimizer::new(config(OptimizerKind::Sgd), 2);
        let err = opt.step(&mut [0.0; 2], &[0.0; 3], 0.1).unwrap_err();
        assert!(matches!(
            err,
            Error::Length {
                what: "gradient",
                expected: 2,
                actual: 3
            }
        ));
        assert!(opt.step(&mut [0.0; 1], &[0.0; 2], 0.1).is_err());
        assert_eq!(opt.step_count(), 0);
    }
}
