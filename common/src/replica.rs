//! One copy of a model that computes gradients and evaluations on request.

use crate::Result;
use crate::dataset::CLASSES;
use crate::model::{ModelKind, Network};
use crate::params::ParamSet;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// A model replica: the network, its variables and the device it computes on.
///
/// A replica keeps no parameters of its own between calls: every call brings the flat buffer to
/// compute with, so that whoever owns the parameters (the coordinator, or an all-reduce group)
/// is the only source of truth.
pub struct Replica {
    kind: ModelKind,
    device: Device,
    // Owns the variables that `network` computes with and `params` reads and writes.
    _varmap: VarMap,
    network: Network,
    params: ParamSet,
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
        Ok(Replica {
            kind,
            device: device.clone(),
            _varmap: varmap,
            network,
            params,
        })
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
