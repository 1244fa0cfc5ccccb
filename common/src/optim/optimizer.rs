use super::{OptimizerConfig, OptimizerKind};
use crate::error::check_len;
use crate::simd::{Isa, multiversion};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// An update rule with its running state, applied to flat `f32` buffers.
///
/// The arithmetic follows PyTorch's `torch.optim` (single-tensor code path) operation for
/// operation, so that a run here and the same run in PyTorch stay close. Each parameter's
/// update is its own sequence of operations, without fused multiply-adds and without
/// reductions, so that every process applying the same update to the same parameters gets
/// the same bits: on one thread or several (the buffers are cut into chunks of
/// 64K elements spread over rayon's pool), and with any instruction set (each rule is
/// compiled per [`Isa`], and the tests hold every copy to the portable one, bit for bit). A
/// ring's members, which may run on different CPUs, rely on it.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    state: OptimizerState,
    /// The instruction set the rules run with: [`Isa::current`], or another for tests.
    isa: Isa,
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
            isa: Isa::current(),
        }
    }

    /// Resumes from a saved state, which must have the buffers that `config`'s rule keeps.
    pub fn from_state(config: OptimizerConfig, state: OptimizerState) -> Result<Optimizer> {
        let (first, second) = buffer_lens(&config, state.len);
        check_len("optimizer first moment", first, state.first_moment.len())?;
        check_len("optimizer second moment", second, state.second_moment.len())?;
        Ok(Optimizer {
            config,
            state,
            isa: Isa::current(),
        })
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
        let rule = Sgd {
            lr,
            momentum,
            weight_decay,
            first_step: self.state.step == 0,
        };
        let isa = self.isa;
        if momentum == 0.0 {
            chunked(params, grad, &mut [], &mut [], |p, g, _, _| {
                sgd_plain(isa, rule, p, g)
            });
        } else {
            let buf = &mut self.state.first_moment;
            chunked(params, grad, buf, &mut [], |p, g, m, _| {
                sgd_momentum(isa, rule, p, g, m)
            });
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
        let rule = Adam {
            weight_decay,
            beta1,
            beta2,
            eps,
            step_size: (f64::from(lr) / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
        };
        let isa = self.isa;
        let (m, v) = (&mut self.state.first_moment, &mut self.state.second_moment);
        chunked(params, grad, m, v, |p, g, m, v| adam(isa, rule, p, g, m, v));
    }

    fn rmsprop(&mut self, params: &mut [f32], grad: &[f32], lr: f32) {
        let OptimizerConfig {
            weight_decay,
            rms_decay: alpha,
            eps,
            ..
        } = self.config;
        let rule = Rmsprop {
            lr,
            weight_decay,
            alpha,
            eps,
        };
        let isa = self.isa;
        let square_avg = &mut self.state.second_moment;
        chunked(params, grad, &mut [], square_avg, |p, g, _, s| {
            rmsprop(isa, rule, p, g, s)
        });
    }
}

/// Elements per piece of an update: pieces go to rayon's pool when there are several, each is
/// one call of a rule's loop. 64K floats (256 KB per buffer) make a piece worth a task.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Calls `f` on matching chunks of the parameters, the gradient and the two state buffers
/// (which are empty when the rule keeps none), in parallel when there is more than one chunk.
fn chunked(
    params: &mut [f32],
    grad: &[f32],
    first: &mut [f32],
    second: &mut [f32],
    f: impl Fn(&mut [f32], &[f32], &mut [f32], &mut [f32]) + Sync + Send,
) {
    fn state_chunks(buffer: &mut [f32], count: usize) -> Vec<&mut [f32]> {
        let mut chunks: Vec<&mut [f32]> = buffer.chunks_mut(CHUNK).collect();
        chunks.resize_with(count, Default::default);
        chunks
    }
    let count = params.len().div_ceil(CHUNK);
    let (first, second) = (state_chunks(first, count), state_chunks(second, count));
    let pieces: Vec<_> = params
        .chunks_mut(CHUNK)
        .zip(grad.chunks(CHUNK))
        .zip(first.into_iter().zip(second))
        .collect();
    if pieces.len() > 1 && rayon::current_num_threads() > 1 {
        pieces
            .into_par_iter()
            .for_each(|((p, g), (m, v))| f(p, g, m, v));
    } else {
        for ((p, g), (m, v)) in pieces {
            f(p, g, m, v);
        }
    }
}

/// The scalars of an SGD step.
#[derive(Debug, Clone, Copy)]
struct Sgd {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    /// PyTorch starts the momentum buffer at the first gradient rather than at zero.
    first_step: bool,
}

multiversion! {
    /// SGD without momentum: `p -= lr * (g + weight_decay * p)`.
    fn sgd_plain(rule: Sgd, params: &mut [f32], grad: &[f32]) {
        let Sgd { lr, weight_decay, .. } = rule;
        assert_eq!(params.len(), grad.len());
        if weight_decay != 0.0 {
            for (p, &g) in params.iter_mut().zip(grad) {
                *p -= lr * (g + weight_decay * *p);
            }
        } else {
            for (p, &g) in params.iter_mut().zip(grad) {
                *p -= lr * g;
            }
        }
    }
}

multiversion! {
    /// SGD with momentum: `buf = momentum * buf + g` (or `g` at the first step), `p -= lr * buf`.
    fn sgd_momentum(rule: Sgd, params: &mut [f32], grad: &[f32], buf: &mut [f32]) {
        let Sgd { lr, momentum, weight_decay, first_step } = rule;
        assert!(params.len() == grad.len() && buf.len() == grad.len());
        let items = params.iter_mut().zip(grad).zip(buf.iter_mut());
        // The four cases as four loops, so that each compiles to one vector loop.
        match (weight_decay != 0.0, first_step) {
            (false, false) => items.for_each(|((p, &g), b)| {
                *b = momentum * *b + g;
                *p -= lr * *b;
            }),
            (false, true) => items.for_each(|((p, &g), b)| {
                *b = g;
                *p -= lr * g;
            }),
            (true, false) => items.for_each(|((p, &g), b)| {
                *b = momentum * *b + (g + weight_decay * *p);
                *p -= lr * *b;
            }),
            (true, true) => items.for_each(|((p, &g), b)| {
                let g = g + weight_decay * *p;
                *b = g;
                *p -= lr * g;
            }),
        }
    }
}

/// The scalars of an Adam step.
#[derive(Debug, Clone, Copy)]
struct Adam {
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
}

multiversion! {
    /// One Adam step of a chunk.
    fn adam(rule: Adam, params: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
        let Adam { weight_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt } = rule;
        assert!(params.len() == grad.len() && m.len() == grad.len() && v.len() == grad.len());
        let items = params.iter_mut().zip(grad).zip(m.iter_mut().zip(v.iter_mut()));
        for ((p, &g), (m, v)) in items {
            let g = if weight_decay != 0.0 { g + weight_decay * *p } else { g };
            // `exp_avg.lerp_(grad, 1 - beta1)`.
            *m += (1.0 - beta1) * (g - *m);
            *v = *v * beta2 + (1.0 - beta2) * g * g;
            let denom = v.sqrt() / bias_correction2_sqrt + eps;
            *p -= step_size * (*m / denom);
        }
    }
}

/// The scalars of an RMSprop step.
#[derive(Debug, Clone, Copy)]
struct Rmsprop {
    lr: f32,
    weight_decay: f32,
    alpha: f32,
    eps: f32,
}

multiversion! {
    /// One RMSprop step of a chunk.
    fn rmsprop(rule: Rmsprop, params: &mut [f32], grad: &[f32], square_avg: &mut [f32]) {
        let Rmsprop { lr, weight_decay, alpha, eps } = rule;
        assert!(params.len() == grad.len() && square_avg.len() == grad.len());
        for ((p, &g), s) in params.iter_mut().zip(grad).zip(square_avg.iter_mut()) {
            let g = if weight_decay != 0.0 { g + weight_decay * *p } else { g };
            *s = *s * alpha + (1.0 - alpha) * g * g;
            *p -= lr * (g / (s.sqrt() + eps));
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

    /// Random parameters and gradients of a length that ends in a short chunk, with the
    /// awkward values too: zeros of both signs, tiny and huge magnitudes.
    fn buffers(len: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
        use rand_chacha::rand_core::RngCore;
        let mut rng = crate::seed::derive_rng(seed, "optimizer-test", &[]);
        let mut draw = |i: usize| match i % 97 {
            0 => 0.0,
            1 => -0.0,
            2 => 1e-30,
            3 => -3e30,
            _ => (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 4.0,
        };
        let params = (0..len).map(&mut draw).collect();
        let grads = (0..4).map(|_| (0..len).map(&mut draw).collect()).collect();
        (params, grads)
    }

    fn configs() -> Vec<OptimizerConfig> {
        let mut configs = Vec::new();
        for kind in OptimizerKind::ALL {
            for (momentum, weight_decay) in [(0.0, 0.0), (0.9, 0.0), (0.0, 0.01), (0.9, 0.01)] {
                configs.push(OptimizerConfig {
                    kind,
                    momentum,
                    weight_decay,
                    ..OptimizerConfig::default()
                });
            }
        }
        configs
    }

    /// Parameters and state after four steps with `isa` on a pool of `threads`.
    fn four_steps(config: OptimizerConfig, isa: Isa, threads: usize) -> (Vec<u32>, Vec<u32>) {
        let (mut params, grads) = buffers(2 * CHUNK + 37, 1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut opt = Optimizer::new(config, params.len());
            opt.isa = isa;
            for grad in &grads {
                opt.step(&mut params, grad, 0.01).unwrap();
            }
            let state = opt.state();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let moments = [state.first_moment, state.second_moment].concat();
            (bits(&params), bits(&moments))
        })
    }

    /// Every rule gives the same bits with every instruction set the CPU has as with the
    /// portable one, and on two threads as on one: ring members on different CPUs, with any
    /// core count, must apply the same update.
    #[test]
    fn every_instruction_set_and_thread_count_gives_the_same_bits() {
        for config in configs() {
            let portable = four_steps(config, Isa::Portable, 1);
            for isa in Isa::supported() {
                for threads in [1, 2] {
                    assert!(
                        four_steps(config, isa, threads) == portable,
                        "{config:?} with {isa} on {threads} thread(s)"
                    );
                }
            }
        }
    }

    /// The chunked, vectorised rules compute what one plain loop in PyTorch's order computes.
    #[test]
    fn chunks_compute_the_plain_loop() {
        let (start, grads) = buffers(CHUNK + 5, 2);
        for config in configs() {
            let mut params = start.clone();
            let mut opt = Optimizer::new(config, params.len());
            let (mut expected, mut m, mut v) = (
                start.clone(),
                vec![0f32; start.len()],
                vec![0f32; start.len()],
            );
            for (t, grad) in grads.iter().enumerate() {
                opt.step(&mut params, grad, 0.01).unwrap();
                let lr = 0.01f32;
                let OptimizerConfig {
                    momentum,
                    weight_decay,
                    beta1,
                    beta2,
                    eps,
                    rms_decay,
                    ..
                } = config;
                let bc1 = 1.0 - f64::from(beta1).powi(t as i32 + 1);
                let bc2 = 1.0 - f64::from(beta2).powi(t as i32 + 1);
                for i in 0..expected.len() {
                    let mut g = grad[i];
                    if weight_decay != 0.0 {
                        g += weight_decay * expected[i];
                    }
                    match config.kind {
                        OptimizerKind::Sgd => {
                            if momentum != 0.0 {
                                m[i] = if t == 0 { g } else { momentum * m[i] + g };
                                g = m[i];
                            }
                            expected[i] -= lr * g;
                        }
                        OptimizerKind::Adam => {
                            m[i] += (1.0 - beta1) * (g - m[i]);
                            v[i] = v[i] * beta2 + (1.0 - beta2) * g * g;
                            let denom = v[i].sqrt() / (bc2.sqrt() as f32) + eps;
                            expected[i] -= ((f64::from(lr) / bc1) as f32) * (m[i] / denom);
                        }
                        OptimizerKind::Rmsprop => {
                            v[i] = v[i] * rms_decay + (1.0 - rms_decay) * g * g;
                            expected[i] -= lr * (g / (v[i].sqrt() + eps));
                        }
                    }
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&params) == bits(&expected), "{config:?}");
        }
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
