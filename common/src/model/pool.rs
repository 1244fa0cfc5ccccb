use candle_core::{Result, Tensor};

/// Max pooling over 2x2 windows with stride 2, flooring odd sizes as Keras and PyTorch do.
///
/// Written as a reshape and two `max` reductions rather than with candle's `max_pool2d`,
/// whose backward pass hands the input only a quarter of the gradient it should. The
/// reductions' backward passes are plain masks and come out right. Where a window holds a tie,
/// every maximal element receives the gradient (PyTorch picks one); after `tanh` or a ReLU whose
/// zeros carry no gradient anyway, ties do not change what is learnt.
pub fn max_pool_2x2(xs: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    // Rows and columns past the last full window take part in no window.
    let xs = if h % 2 == 1 {
        xs.narrow(2, 0, 2 * oh)?
    } else {
        xs.clone()
    };
    let xs = if w % 2 == 1 {
        xs.narrow(3, 0, 2 * ow)?
    } else {
        xs
    };
    xs.contiguous()?
        .reshape((n, c, oh, 2, ow, 2))?
        .max_keepdim(5)?
        .max_keepdim(3)?
        .reshape((n, c, oh, ow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::derive_rng;
    use candle_core::{DType, Device, Var};
    use rand_chacha::rand_core::RngCore;

    fn random(shape: (usize, usize, usize, usize), stream: u64) -> Vec<f64> {
        let mut rng = derive_rng(7, "pool-test", &[stream]);
        let len = shape.0 * shape.1 * shape.2 * shape.3;
        (0..len)
            .map(|_| rng.next_u64() as f64 / u64::MAX as f64 * 2.0 - 1.0)
            .collect()
    }

    /// `sum(pool(x) * weights)`: a scalar whose gradient through the pool is easy to reason about.
    fn objective(xs: &Tensor, weights: &Tensor) -> Result<Tensor> {
        (max_pool_2x2(xs)? * weights)?.sum_all()
    }

    fn check_against_finite_differences(shape: (usize, usize, usize, usize)) {
        let dev = Device::Cpu;
        let values = random(shape, 0);
        let xs = Var::from_vec(values.clone(), shape, &dev).unwrap();
        let out_shape = (shape.0, shape.1, shape.2 / 2, shape.3 / 2);
        let weights = Tensor::from_vec(random(out_shape, 1), out_shape, &dev).unwrap();
        let grads = objective(&xs, &weights).unwrap().backward().unwrap();
        let analytic = grads
            .get(&xs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();

        let at = |values: &[f64]| {
            let xs = Tensor::from_slice(values, shape, &dev).unwrap();
            objective(&xs, &weights)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let eps = 1e-6;
        for i in 0..values.len() {
            let mut plus = values.clone();
            plus[i] += eps;
            let mut minus = values.clone();
            minus[i] -= eps;
            let numeric = (at(&plus) - at(&minus)) / (2.0 * eps);
            assert!(
                (numeric - analytic[i]).abs() < 1e-6,
                "input {i}: finite differences {numeric}, backprop {}",
                analytic[i]
            );
        }
    }

    #[test]
    fn forward_takes_window_maxima_and_floors_odd_sizes() {
        let xs = Tensor::arange(0f32, 35., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 7))
            .unwrap();
        let pooled = max_pool_2x2(&xs).unwrap();
        assert_eq!(pooled.dims(), &[1, 1, 2, 3]);
        let expected = [[8f32, 10., 12.], [22., 24., 26.]];
        assert_eq!(
            pooled
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            expected
        );
    }

    #[test]
    fn gradient_matches_finite_differences() {
        check_against_finite_differences((2, 3, 6, 4));
        check_against_finite_differences((1, 2, 5, 7));
    }

    #[test]
    fn gradient_reaches_one_input_per_window() {
        let shape = (2, 3, 6, 8);
        let xs = Var::from_vec(random(shape, 2), shape, &Device::Cpu).unwrap();
        let grads = max_pool_2x2(&xs)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads.get(&xs).unwrap();
        let total = grad.sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert_eq!(total, (2 * 3 * 3 * 4) as f64);
        let nonzero = grad.ne(0.0).unwrap().to_dtype(DType::F64).unwrap();
        assert_eq!(
            nonzero.sum_all().unwrap().to_scalar::<f64>().unwrap(),
            total
        );
    }
}
