//! One copy of a model that computes gradients and evaluations on request.

use crate::Result;
use crate::dataset::CLASSES;
use crate::model::{Engine, ModelKind, Network};
use crate::params::ParamSet;
use candle_core::{CpuStorage, DType, Device, ModuleT, Storage, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// A model replica: the network, its variables and the device it computes on.
///
/// A replica keeps no parameters of its own between calls: every call brings the flat buffer to
/// compute with, so that whoever owns the parameters (the coordinator, or an all-reduce group)
/// is the only source of truth.
///
/// On the CPU every call runs on the [`Engine`], straight from the flat parameters; on other
/// devices the parameters are loaded into the network's variables and candle computes.
pub struct Replica {
    kind: ModelKind,
    device: Device,
    // Owns the variables that `network` computes with and `params` reads and writes.
    _varmap: VarMap,
    network: Network,
    params: ParamSet,
    engine: Option<Engine>,
}

/// What one batch contributes to a training step.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchGradient {
    /// Sum over the batch of the cross-entropy loss.
    pub loss_sum: f64,
    /// Images whose largest logit is the label's (training accuracy, measured with dropout).
    pub correct: u64,
    /// Images in the batch.
    pub count: u64,
    /// Gradient of the batch's mean loss, laid out as [`ParamSet`] lays out parameters.
    pub gradient: Vec<f32>,
}

/// Loss and accuracy sums over one batch of evaluation, to be added up over batches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalSums {
    /// Sum over the batch of the cross-entropy loss.
    pub loss_sum: f64,
    /// Images whose largest logit is the label's.
    pub correct: u64,
    /// Images in the batch.
    pub count: u64,
    /// Per class (the label): images, and those classified correctly.
    pub class_count: [u64; CLASSES],
    pub class_correct: [u64; CLASSES],
}

impl EvalSums {
    /// Adds another batch's sums to these.
    pub fn add(&mut self, other: &EvalSums) {
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.count += other.count;
        for class in 0..CLASSES {
            self.class_count[class] += other.class_count[class];
            self.class_correct[class] += other.class_correct[class];
        }
    }
}

impl Replica {
    /// Builds `kind` on `device` in `f32`. Its variables hold candle's initial values until the
    /// first call loads parameters; use [`ParamSet::init_flat`] for a job's initial parameters.
    pub fn new(kind: ModelKind, device: &Device) -> Result<Replica> {
        let varmap = VarMap::new();
        let network = Network::build(kind, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        let params = ParamSet::from_varmap(&varmap);
        let engine = match device {
            Device::Cpu => Some(Engine::new(kind, &params.layout())?),
            _ => None,
        };
        Ok(Replica {
            kind,
            device: device.clone(),
            _varmap: varmap,
            network,
            params,
            engine,
        })
    }

    /// The same replica computing with candle's graph even on the CPU: the reference the
    /// engine's tests compare with.
    #[cfg(test)]
    fn with_candle(kind: ModelKind) -> Replica {
        let mut replica = Replica::new(kind, &Device::Cpu).unwrap();
        replica.engine = None;
        replica
    }

    /// The variables' layout, for flat buffers.
    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// Which model this replica runs.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// The device the replica computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The gradient of the mean cross-entropy of `images` (`(b, 1, 28, 28)`, `f32`) against
    /// `labels` (`(b,)`, integers), at `flat_params`, with dropout masks fixed by
    /// `dropout_seed`. An empty batch gives a zero gradient with `count` 0.
    pub fn gradient(
        &mut self,
        flat_params: &[f32],
        images: &Tensor,
        labels: &Tensor,
        dropout_seed: u64,
    ) -> Result<BatchGradient> {
        if let Some(engine) = &mut self.engine {
            let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let mut gradient = vec![0.0; flat_params.len()];
            let (loss_sum, correct) = with_f32_slice(images, |images| {
                engine.gradient(flat_params, images, &labels, dropout_seed, &mut gradient)
            })??;
            return Ok(BatchGradient {
                loss_sum,
                correct,
                count: labels.len() as u64,
                gradient,
            });
        }
        self.params.load_flat(flat_params)?;
        let (images, labels) = self.inputs(images, labels)?;
        if labels.dims1()? == 0 {
            // A share of a step can be empty; it then weighs nothing in the average.
            return Ok(BatchGradient {
                loss_sum: 0.0,
                correct: 0,
                count: 0,
                gradient: vec![0.0; self.params.len()],
            });
        }
        self.network.reseed_dropout(dropout_seed);
        let logits = self.network.forward_t(&images, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let grads = loss.backward()?;
        let gradient = self.params.grads_flat(&grads)?;
        let sums = sums(&logits, &loss, &labels)?;
        Ok(BatchGradient {
            loss_sum: sums.loss_sum,
            correct: sums.correct,
            count: sums.count,
            gradient,
        })
    }

    /// Loss and accuracy of `flat_params` on a batch, without dropout; zeros for an empty batch.
    pub fn evaluate(
        &mut self,
        flat_params: &[f32],
        images: &Tensor,
        labels: &Tensor,
    ) -> Result<EvalSums> {
        if let Some(engine) = &self.engine {
            let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let logits = with_f32_slice(images, |images| engine.logits(flat_params, images))??;
            return engine_sums(&logits, &labels);
        }
        self.params.load_flat(flat_params)?;
        let (images, labels) = self.inputs(images, labels)?;
        if labels.dims1()? == 0 {
            return Ok(EvalSums::default());
        }
        let logits = self.network.forward_t(&images, false)?.detach();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let mut eval = sums(&logits, &loss, &labels)?;
        let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
        for (label, prediction) in labels.to_vec1::<u32>()?.into_iter().zip(predicted) {
            // Labels are checked to be below CLASSES when the dataset is read.
            let class = label as usize;
            eval.class_count[class] += 1;
            eval.class_correct[class] += u64::from(prediction == label);
        }
        Ok(eval)
    }

    /// Class probabilities `(b, 10)` for `images`, without dropout.
    pub fn predict(&mut self, flat_params: &[f32], images: &Tensor) -> Result<Tensor> {
        if let Some(engine) = &self.engine {
            let n = images.dim(0)?;
            let probs =
                with_f32_slice(images, |images| engine.probabilities(flat_params, images))??;
            return Ok(Tensor::from_vec(probs, (n, CLASSES), &Device::Cpu)?);
        }
        self.params.load_flat(flat_params)?;
        let images = images.to_device(&self.device)?.to_dtype(DType::F32)?;
        let logits = self.network.forward_t(&images, false)?.detach();
        Ok(candle_nn::ops::softmax(&logits, 1)?)
    }

    /// Moves a batch to this replica's device in the dtypes the loss needs.
    fn inputs(&self, images: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        let images = images.to_device(&self.device)?.to_dtype(DType::F32)?;
        let labels = labels.to_device(&self.device)?.to_dtype(DType::U32)?;
        Ok((images, labels))
    }
}

/// Calls `f` with the elements of `tensor` as f32, on the CPU: without a copy when it is a
/// contiguous f32 CPU tensor already.
fn with_f32_slice<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let tensor = tensor
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Ok(f(&values[start..end])),
        _ => Err(crate::Error::Config(
            "images are not a contiguous f32 CPU tensor".into(),
        )),
    }
}

/// Evaluation sums from the engine's logits: the loss of each row, and per class the images
/// and those whose largest logit is their label's.
fn engine_sums(logits: &[f32], labels: &[u32]) -> Result<EvalSums> {
    if logits.len() != labels.len() * CLASSES {
        return Err(crate::Error::Length {
            what: "labels",
            expected: logits.len() / CLASSES,
            actual: labels.len(),
        });
    }
    if let Some(&label) = labels.iter().find(|&&l| l as usize >= CLASSES) {
        return Err(crate::Error::InvalidSplit(format!(
            "label {label} is not a digit"
        )));
    }
    let mut eval = EvalSums {
        count: labels.len() as u64,
        ..EvalSums::default()
    };
    let (loss_sum, _) = crate::model::softmax_cross_entropy(logits, CLASSES, labels, None);
    eval.loss_sum = loss_sum;
    for (row, &label) in logits.chunks_exact(CLASSES).zip(labels) {
        let class = label as usize;
        let right = crate::model::argmax(row) == class;
        eval.correct += u64::from(right);
        eval.class_count[class] += 1;
        eval.class_correct[class] += u64::from(right);
    }
    Ok(eval)
}

fn sums(logits: &Tensor, mean_loss: &Tensor, labels: &Tensor) -> Result<EvalSums> {
    let count = labels.dims1()?;
    let mean = f64::from(mean_loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    let correct = logits
        .argmax(1)?
        .eq(labels)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok(EvalSums {
        loss_sum: mean * count as f64,
        correct: u64::from(correct),
        count: count as u64,
        ..EvalSums::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Optimizer, OptimizerConfig, OptimizerKind};
    use crate::seed::derive_rng;
    use rand_chacha::rand_core::RngCore;

    /// A batch of uniform-noise images with arbitrary labels.
    fn batch(size: usize, stream: u64) -> (Tensor, Tensor) {
        let mut rng = derive_rng(1, "replica-test", &[stream]);
        let pixels: Vec<f32> = (0..size * 28 * 28)
            .map(|_| (rng.next_u32() >> 8) as f32 / (1 << 24) as f32)
            .collect();
        let labels: Vec<u32> = (0..size).map(|_| rng.next_u32() % 10).collect();
        let images = Tensor::from_vec(pixels, (size, 1, 28, 28), &Device::Cpu).unwrap();
        (
            images,
            Tensor::from_vec(labels, size, &Device::Cpu).unwrap(),
        )
    }

    /// Every model on the engine against the same model in candle's graph: the loss, the
    /// accuracy, every parameter's gradient (to 1e-4 of the largest of its tensor), evaluation
    /// sums and probabilities. 21 images, so the last group is short; dropout included.
    #[test]
    fn the_engine_computes_what_candle_computes() {
        let (images, labels) = batch(21, 7);
        for kind in ModelKind::ALL {
            let mut engine = Replica::new(kind, &Device::Cpu).unwrap();
            let mut candle = Replica::with_candle(kind);
            let params = engine.params().init_flat(3);
            let a = engine.gradient(&params, &images, &labels, 5).unwrap();
            let b = candle.gradient(&params, &images, &labels, 5).unwrap();
            assert!(
                (a.loss_sum - b.loss_sum).abs() < 1e-4 * b.loss_sum,
                "{kind}: loss"
            );
            assert_eq!((a.correct, a.count), (b.correct, b.count), "{kind}");
            let mut offset = 0;
            for (name, dims) in engine.params().layout() {
                let len: usize = dims.iter().product();
                let (x, y) = (
                    &a.gradient[offset..offset + len],
                    &b.gradient[offset..offset + len],
                );
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    worst <= 1e-4 * scale,
                    "{kind} {name}: off by {worst} of {scale}"
                );
                offset += len;
            }
            let (ea, eb) = (
                engine.evaluate(&params, &images, &labels).unwrap(),
                candle.evaluate(&params, &images, &labels).unwrap(),
            );
            assert!(
                (ea.loss_sum - eb.loss_sum).abs() < 1e-4 * eb.loss_sum,
                "{kind}"
            );
            assert_eq!(
                (ea.correct, ea.class_count, ea.class_correct),
                (eb.correct, eb.class_count, eb.class_correct)
            );
            let (pa, pb) = (
                engine
                    .predict(&params, &images)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                candle
                    .predict(&params, &images)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            assert!(
                pa.iter().zip(&pb).all(|(p, q)| (p - q).abs() < 1e-5),
                "{kind}: probabilities"
            );
        }
    }

    /// The engine's gradient and evaluation are the same bits on one thread as on two, at the
    /// batch sizes that split the work (64 to train, 200 to evaluate).
    #[test]
    fn the_engine_is_bit_identical_across_thread_counts() {
        let (images, labels) = batch(64, 8);
        let (eval_images, eval_labels) = batch(200, 9);
        for kind in ModelKind::ALL {
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut replica = Replica::new(kind, &Device::Cpu).unwrap();
                    let params = replica.params().init_flat(4);
                    let out = replica.gradient(&params, &images, &labels, 3).unwrap();
                    let eval = replica
                        .evaluate(&params, &eval_images, &eval_labels)
                        .unwrap();
                    let bits: Vec<u32> = out.gradient.iter().map(|g| g.to_bits()).collect();
                    (
                        bits,
                        out.loss_sum.to_bits(),
                        eval.loss_sum.to_bits(),
                        eval.correct,
                    )
                })
            };
            assert_eq!(run(1), run(2), "{kind}");
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mut replica = Replica::new(ModelKind::Mlp, &Device::Cpu).unwrap();
        let params = replica.params().init_flat(2);
        let (images, labels) = batch(4, 0);
        let out = replica.gradient(&params, &images, &labels, 0).unwrap();
        assert_eq!(out.count, 4);
        assert_eq!(out.gradient.len(), params.len());
        let mean_loss = |replica: &mut Replica, params: &[f32]| {
            let sums = replica.evaluate(params, &images, &labels).unwrap();
            sums.loss_sum / sums.count as f64
        };
        assert!((mean_loss(&mut replica, &params) - out.loss_sum / 4.0).abs() < 1e-6);

        // The largest coordinates, where f32 round-off is small next to the slope.
        let mut order: Vec<usize> = (0..params.len()).collect();
        order.sort_by(|&a, &b| out.gradient[b].abs().total_cmp(&out.gradient[a].abs()));
        let eps = 1e-2;
        for &i in order.iter().take(5).chain(order.iter().skip(1000).take(1)) {
            let mut plus = params.clone();
            plus[i] += eps;
            let mut minus = params.clone();
            minus[i] -= eps;
            let numeric = (mean_loss(&mut replica, &plus) - mean_loss(&mut replica, &minus))
                / (2.0 * eps as f64);
            let analytic = f64::from(out.gradient[i]);
            assert!(
                (numeric - analytic).abs() < 1e-3 + 0.05 * analytic.abs(),
                "parameter {i}: finite differences {numeric}, backprop {analytic}"
            );
        }
    }

    #[test]
    fn gradient_is_deterministic_for_a_dropout_seed() {
        let mut replica = Replica::new(ModelKind::MlpDropout, &Device::Cpu).unwrap();
        let params = replica.params().init_flat(4);
        let (images, labels) = batch(8, 1);
        let a = replica.gradient(&params, &images, &labels, 9).unwrap();
        let b = replica.gradient(&params, &images, &labels, 9).unwrap();
        let c = replica.gradient(&params, &images, &labels, 10).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.gradient, c.gradient);
    }

    #[test]
    fn predictions_are_probabilities_agreeing_with_evaluation() {
        let mut replica = Replica::new(ModelKind::Softmax, &Device::Cpu).unwrap();
        let params = replica.params().init_flat(6);
        let (images, labels) = batch(16, 2);
        let probs = replica.predict(&params, &images).unwrap();
        assert_eq!(probs.dims(), &[16, 10]);
        let rows = probs.to_vec2::<f32>().unwrap();
        assert!(
            rows.iter()
                .all(|row| (row.iter().sum::<f32>() - 1.0).abs() < 1e-5)
        );
        let predicted = probs.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let expected = labels.to_vec1::<u32>().unwrap();
        let correct = predicted
            .iter()
            .zip(&expected)
            .filter(|(p, l)| p == l)
            .count() as u64;
        let sums = replica.evaluate(&params, &images, &labels).unwrap();
        assert_eq!((sums.correct, sums.count), (correct, 16));
        let mut class_count = [0u64; CLASSES];
        let mut class_correct = [0u64; CLASSES];
        for (p, l) in predicted.iter().zip(&expected) {
            class_count[*l as usize] += 1;
            class_correct[*l as usize] += u64::from(p == l);
        }
        assert_eq!(sums.class_count, class_count);
        assert_eq!(sums.class_correct, class_correct);
    }

    #[test]
    fn empty_batches_weigh_nothing() {
        let mut replica = Replica::new(ModelKind::Lenet, &Device::Cpu).unwrap();
        let params = replica.params().init_flat(1);
        let (images, labels) = batch(0, 5);
        let out = replica.gradient(&params, &images, &labels, 0).unwrap();
        assert_eq!((out.count, out.loss_sum), (0, 0.0));
        assert!(out.gradient.iter().all(|&g| g == 0.0));
        let sums = replica.evaluate(&params, &images, &labels).unwrap();
        assert_eq!(sums, EvalSums::default());
    }

    #[test]
    fn wrong_parameter_count_is_refused() {
        let mut replica = Replica::new(ModelKind::Softmax, &Device::Cpu).unwrap();
        let (images, labels) = batch(2, 3);
        let err = replica.evaluate(&[0.0; 10], &images, &labels).unwrap_err();
        assert!(matches!(
            err,
            crate::Error::Length {
                expected: 7_850,
                actual: 10,
                ..
            }
        ));
    }

    #[test]
    fn mlp_overfits_a_fixed_batch() {
        let mut replica = Replica::new(ModelKind::Mlp, &Device::Cpu).unwrap();
        let mut params = replica.params().init_flat(8);
        let config = OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            ..OptimizerConfig::default()
        };
        let mut optimizer = Optimizer::new(config, params.len());
        let (images, labels) = batch(32, 4);
        let mut losses = Vec::new();
        for step in 0..100 {
            let out = replica.gradient(&params, &images, &labels, step).unwrap();
            losses.push(out.loss_sum / out.count as f64);
            optimizer.step(&mut params, &out.gradient, 0.05).unwrap();
        }
        let sums = replica.evaluate(&params, &images, &labels).unwrap();
        let last = sums.loss_sum / sums.count as f64;
        assert!(
            last * 5.0 < losses[0],
            "loss went from {} to {last}",
            losses[0]
        );
        assert_eq!(sums.correct, 32);
    }

    /// Single-thread cost of one training step's computation per model; run with
    /// `RAYON_NUM_THREADS=1 cargo test -p common gradient_timing -- --ignored --nocapture`
    /// (the dev profile optimises candle, where the time goes).
    #[test]
    #[ignore]
    fn gradient_timing() {
        let (images, labels) = batch(64, 5);
        for kind in ModelKind::ALL {
            let mut replica = Replica::new(kind, &Device::Cpu).unwrap();
            let params = replica.params().init_flat(0);
            replica.gradient(&params, &images, &labels, 0).unwrap();
            let runs = 10;
            let start = std::time::Instant::now();
            for seed in 0..runs {
                replica.gradient(&params, &images, &labels, seed).unwrap();
            }
            println!(
                "{kind}: {:?} per gradient at batch 64",
                start.elapsed() / runs as u32
            );
        }
    }
}
