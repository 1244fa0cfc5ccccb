use super::{Cnn, Lenet, Mlp, MlpDropout, ModelKind, Softmax};
use crate::Result;
use candle_core::{Module, ModuleT, Tensor};
use candle_nn::VarBuilder;

/// One of the tutorials' networks, chosen at run time: input `(batch, 1, 28, 28)` in `f32`
/// (or whatever dtype `vb` has), output logits `(batch, 10)`.
#[derive(Debug)]
pub enum Network {
    /// See [`Softmax`].
    Softmax(Softmax),
    /// See [`Mlp`].
    Mlp(Mlp),
    /// See [`MlpDropout`]; boxed because its generator state is large.
    MlpDropout(Box<MlpDropout>),
    /// See [`Lenet`].
    Lenet(Lenet),
    /// See [`Cnn`].
    Cnn(Cnn),
}

impl Network {
    /// Creates the variables of `kind` under `vb` (or finds them, when `vb` already has them).
    pub fn build(kind: ModelKind, vb: VarBuilder) -> Result<Network> {
        Ok(match kind {
            ModelKind::Softmax => Network::Softmax(Softmax::new(vb)?),
            ModelKind::Mlp => Network::Mlp(Mlp::new(vb)?),
            ModelKind::MlpDropout => Network::MlpDropout(Box::new(MlpDropout::new(vb)?)),
            ModelKind::Lenet => Network::Lenet(Lenet::new(vb)?),
            ModelKind::Cnn => Network::Cnn(Cnn::new(vb)?),
        })
    }

    /// Which network this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Network::Softmax(_) => ModelKind::Softmax,
            Network::Mlp(_) => ModelKind::Mlp,
            Network::MlpDropout(_) => ModelKind::MlpDropout,
            Network::Lenet(_) => ModelKind::Lenet,
            Network::Cnn(_) => ModelKind::Cnn,
        }
    }

    /// Fixes the dropout masks of the next training pass to those `seed` determines; call it
    /// before every step so that a step's masks do not depend on how many passes came before.
    /// Networks without dropout ignore it.
    pub fn reseed_dropout(&self, seed: u64) {
        if let Network::MlpDropout(net) = self {
            net.reseed(seed);
        }
    }
}

impl ModuleT for Network {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Network::Softmax(net) => net.forward(xs),
            Network::Mlp(net) => net.forward(xs),
            Network::MlpDropout(net) => net.forward_t(xs, train),
            Network::Lenet(net) => net.forward(xs),
            Network::Cnn(net) => net.forward(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use rand_chacha::rand_core::RngCore;

    fn build(kind: ModelKind, dtype: DType) -> (VarMap, Network) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let net = Network::build(kind, vb).unwrap();
        (varmap, net)
    }

    fn parameter_count(varmap: &VarMap) -> usize {
        varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    #[test]
    fn parameter_counts_match_the_tutorials() {
        let expected = [
            (ModelKind::Softmax, 7_850),
            (ModelKind::Mlp, 109_386),
            (ModelKind::MlpDropout, 535_818),
            (ModelKind::Lenet, 431_080),
            (ModelKind::Cnn, 130_890),
        ];
        for (kind, count) in expected {
            let (varmap, net) = build(kind, DType::F32);
            assert_eq!(parameter_count(&varmap), count, "{kind}");
            assert_eq!(net.kind(), kind);
        }
    }

    #[test]
    fn every_network_maps_images_to_ten_logits() {
        let xs = Tensor::rand(0f32, 1., (3, 1, 28, 28), &Device::Cpu).unwrap();
        for kind in ModelKind::ALL {
            let (_varmap, net) = build(kind, DType::F32);
            for train in [false, true] {
                let logits = net.forward_t(&xs, train).unwrap();
                assert_eq!(logits.dims(), &[3, 10], "{kind}");
                assert_eq!(logits.dtype(), DType::F32);
            }
        }
    }

    #[test]
    fn dropout_masks_follow_the_seed() {
        let (_varmap, net) = build(ModelKind::MlpDropout, DType::F32);
        let xs = Tensor::rand(0f32, 1., (4, 1, 28, 28), &Device::Cpu).unwrap();
        let pass = |seed| {
            net.reseed_dropout(seed);
            net.forward_t(&xs, true)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let eval = || {
            net.forward_t(&xs, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(pass(5), pass(5));
        assert_ne!(pass(5), pass(6));
        assert_eq!(eval(), eval());
        assert_ne!(pass(5), eval());
    }

    /// Backprop through the whole network against central differences, in f64 so that the
    /// differences are precise; a few coordinates of every tensor. Inputs and parameters are
    /// seeded, so that a failure repeats.
    fn check_gradient_against_finite_differences(kind: ModelKind) {
        let dev = Device::Cpu;
        let (varmap, net) = build(kind, DType::F64);
        let params = crate::params::ParamSet::from_varmap(&varmap);
        params.load_flat(&params.init_flat(1)).unwrap();
        let mut rng = crate::seed::derive_rng(1, "network-test", &[]);
        let pixels: Vec<f64> = (0..2 * 28 * 28)
            .map(|_| (rng.next_u32() >> 8) as f64 / (1 << 24) as f64)
            .collect();
        let xs = Tensor::from_vec(pixels, (2, 1, 28, 28), &dev).unwrap();
        let labels = Tensor::new(&[3u32, 7], &dev).unwrap();
        let loss = || {
            let logits = net.forward_t(&xs, false).unwrap();
            candle_nn::loss::cross_entropy(&logits, &labels).unwrap()
        };
        let grads = loss().backward().unwrap();
        let eps = 1e-6;
        let mut vars: Vec<_> = varmap.data().lock().unwrap().clone().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            let values = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let grad = grads
                .get(&var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in [0, values.len() / 3, values.len() - 1] {
                let at = |delta: f64| {
                    let mut moved = values.clone();
                    moved[i] += delta;
                    var.set(&Tensor::from_vec(moved, var.shape(), &dev).unwrap())
                        .unwrap();
                    loss().to_scalar::<f64>().unwrap()
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                at(0.0);
                assert!(
                    (numeric - grad[i]).abs() <= 1e-7 + 1e-4 * numeric.abs(),
                    "{kind} {name}[{i}]: finite differences {numeric}, backprop {}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn lenet_gradient_matches_finite_differences() {
        check_gradient_against_finite_differences(ModelKind::Lenet);
    }

    #[test]
    fn cnn_gradient_matches_finite_differences() {
        check_gradient_against_finite_differences(ModelKind::Cnn);
    }

    /// `RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 cargo test --release -p common time_ops --
    /// --ignored --nocapture` (and again with 1): wall time of each layer of a LeNet and a CNN
    /// training step at batch 64, forward alone and forward plus backward (as candle runs it:
    /// the op's backward and adding its gradients into the store), median and fastest of 50.
    /// The backward column subtracts what the probe `sum(y * p)` costs on its own. Wall time,
    /// because the ops spread over threads: on a shared machine, trust the fastest column.
    #[test]
    #[ignore = "timing, not a check"]
    fn time_ops_of_a_training_step() {
        use super::super::{conv::conv2d, pool::max_pool_2x2, relu::relu, tanh::tanh};
        use candle_core::Var;
        use std::time::Instant;

        crate::allocator::keep_freed_memory();
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        type Op = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;
        let conv = |i, o, k, name: &str| -> Op {
            let layer = conv2d(i, o, k, vb.pp(name)).unwrap();
            Box::new(move |xs| layer.forward(xs))
        };
        let linear = |i, o, name: &str| -> Op {
            let layer = candle_nn::linear(i, o, vb.pp(name)).unwrap();
            Box::new(move |xs| layer.forward(xs))
        };
        let labels = Tensor::from_vec((0..64u32).map(|i| i % 10).collect(), 64, &dev).unwrap();
        let ops: Vec<(&str, &[usize], Op)> = vec![
            ("lenet conv1", &[64, 1, 28, 28], conv(1, 20, 5, "l1")),
            ("lenet tanh1", &[64, 20, 24, 24], Box::new(tanh)),
            ("lenet pool1", &[64, 20, 24, 24], Box::new(max_pool_2x2)),
            ("lenet conv2", &[64, 20, 12, 12], conv(20, 50, 5, "l2")),
            ("lenet tanh2", &[64, 50, 8, 8], Box::new(tanh)),
            ("lenet pool2", &[64, 50, 8, 8], Box::new(max_pool_2x2)),
            ("lenet fc1", &[64, 800], linear(800, 500, "l3")),
            ("lenet tanh3", &[64, 500], Box::new(tanh)),
            ("lenet fc2", &[64, 500], linear(500, 10, "l4")),
            (
                "cross-entropy",
                &[64, 10],
                Box::new(move |xs| {
                    candle_nn::loss::cross_entropy(xs, &labels)?.broadcast_as((1, 1))
                }),
            ),
            ("cnn conv1", &[64, 1, 28, 28], conv(1, 32, 3, "c1")),
            ("cnn pool1", &[64, 32, 26, 26], Box::new(max_pool_2x2)),
            ("cnn relu1", &[64, 32, 13, 13], Box::new(relu)),
            ("cnn conv2", &[64, 32, 13, 13], conv(32, 64, 3, "c2")),
            ("cnn pool2", &[64, 64, 11, 11], Box::new(max_pool_2x2)),
            ("cnn relu2", &[64, 64, 5, 5], Box::new(relu)),
            ("cnn conv3", &[64, 64, 5, 5], conv(64, 64, 3, "c3")),
            ("cnn relu3", &[64, 64, 3, 3], Box::new(relu)),
            ("cnn fc1", &[64, 576], linear(576, 128, "c4")),
            ("cnn relu4", &[64, 128], Box::new(relu)),
            ("cnn fc2", &[64, 128], linear(128, 10, "c5")),
        ];
        let median_and_min = |f: &dyn Fn()| {
            f();
            let mut ms: Vec<f64> = (0..50)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            (ms[25], ms[0])
        };
        println!("threads {}", rayon::current_num_threads());
        for (name, shape, op) in &ops {
            // The first layer's input is the data; the others' are activations with gradients.
            let xs = Tensor::randn(0f32, 1., *shape, &dev).unwrap();
            let xs = if shape[1] == 1 {
                xs
            } else {
                Var::from_tensor(&xs).unwrap().as_tensor().clone()
            };
            let ys = op(&xs).unwrap();
            let probe = Tensor::randn(0f32, 1., ys.shape(), &dev).unwrap();
            let ys = Var::from_tensor(&ys).unwrap();
            let forward = median_and_min(&|| {
                op(&xs).unwrap();
            });
            let both = median_and_min(&|| {
                (op(&xs).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            });
            let probe_only = median_and_min(&|| {
                (ys.as_tensor() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            });
            println!(
                "{name:>14}: forward {:6.3} ms (fastest {:6.3}), backward {:6.3} ms (fastest {:6.3})",
                forward.0,
                forward.1,
                both.0 - forward.0 - probe_only.0,
                both.1 - forward.1 - probe_only.1,
            );
        }
    }
}
