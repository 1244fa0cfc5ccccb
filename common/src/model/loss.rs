//! Softmax cross-entropy on f32 logits, fused with its gradient, for the CPU engine.

/// The loss of each row of `logits` (`(rows, classes)` row-major) against its label, summed in
/// f64, and how many rows have their largest logit (the first, on ties) at the label. When
/// `grad` is given it receives the gradient of the mean loss over the rows:
/// `(softmax(row) - onehot(label)) / rows`.
///
/// The same arithmetic as candle's `log_softmax` followed by `nll`: per row
/// `log(sum(exp(x - max))) + max - x[label]`.
pub(crate) fn softmax_cross_entropy(
    logits: &[f32],
    classes: usize,
    labels: &[u32],
    mut grad: Option<&mut [f32]>,
) -> (f64, u64) {
    let rows = labels.len();
    let scale = 1.0 / rows as f32;
    let (mut loss_sum, mut correct) = (0f64, 0u64);
    for (r, (row, &label)) in logits.chunks_exact(classes).zip(labels).enumerate() {
        let label = label as usize;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
        let log_sum = sum.ln();
        loss_sum += f64::from(log_sum + max - row[label]);
        correct += u64::from(argmax(row) == label);
        if let Some(grad) = grad.as_deref_mut() {
            let grad = &mut grad[r * classes..(r + 1) * classes];
            for (c, (g, &x)) in grad.iter_mut().zip(row).enumerate() {
                let p = (x - max - log_sum).exp();
                *g = (p - f32::from(u8::from(c == label))) * scale;
            }
        }
    }
    (loss_sum, correct)
}

/// The index of the first largest element (NaN never wins).
pub(crate) fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Each row of `logits` turned into probabilities in place.
pub(super) fn softmax_rows(logits: &mut [f32], classes: usize) {
    for row in logits.chunks_exact_mut(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    /// Loss and gradient agree with candle's `cross_entropy` and its backward pass.
    #[test]
    fn matches_candle() {
        let (rows, classes) = (7, 10);
        let logits: Vec<f32> = (0..rows * classes)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.4)
            .collect();
        let labels: Vec<u32> = (0..rows as u32).map(|r| (r * 3) % 10).collect();
        let mut grad = vec![0.0; rows * classes];
        let (loss, correct) = softmax_cross_entropy(&logits, classes, &labels, Some(&mut grad));

        let dev = Device::Cpu;
        let xs = Var::from_vec(logits.clone(), (rows, classes), &dev).unwrap();
        let ys = Tensor::new(labels.as_slice(), &dev).unwrap();
        let mean = candle_nn::loss::cross_entropy(&xs, &ys).unwrap();
        let expected = mean.to_scalar::<f32>().unwrap() as f64 * rows as f64;
        assert!(
            (loss - expected).abs() < 1e-5 * expected.abs(),
            "{loss} vs {expected}"
        );
        let grads = mean.backward().unwrap();
        let want = grads.get(&xs).unwrap().flatten_all().unwrap();
        for (a, b) in grad.iter().zip(want.to_vec1::<f32>().unwrap()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let argmaxes = xs.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let expected_correct = argmaxes.iter().zip(&labels).filter(|(a, b)| a == b).count();
        assert_eq!(correct, expected_correct as u64);

        let mut probs = logits.clone();
        softmax_rows(&mut probs, classes);
        let want = candle_nn::ops::softmax(&xs, 1)
            .unwrap()
            .flatten_all()
            .unwrap();
        for (a, b) in probs.iter().zip(want.to_vec1::<f32>().unwrap()) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
