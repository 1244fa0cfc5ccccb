use super::conv_op::Conv2dForward;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder, init::DEFAULT_KAIMING_NORMAL};

/// A 2-D convolution with a square kernel, stride 1 and no padding: the only kind the
/// tutorials use.
///
/// On the CPU, in `f32` and `f64`, it runs as a custom op ([`Conv2dForward`]): per image an
/// im2col and one matrix product, images spread over the rayon pool, and a backward pass that
/// computes all three gradients in one pass. candle's own `conv2d` is correct but its backward
/// pass computes the weight gradient as a convolution whose kernel is the whole feature map,
/// which made it most of a LeNet step (0.5 s of 0.67 s at batch 64). Other devices and dtypes
/// use candle's `conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
}

/// Creates (or looks up) `weight` `(out, in, k, k)` and `bias` `(out)` under `vb`, with the
/// same names and shapes as `candle_nn::conv2d`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        DEFAULT_KAIMING_NORMAL,
    )?;
    let bound = 1.0 / ((in_channels * kernel * kernel) as f64).sqrt();
    let bias = vb.get_with_hints(
        out_channels,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Conv2d { weight, bias })
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) {
            return xs.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                Conv2dForward,
            );
        }
        let out_channels = self.weight.dim(0)?;
        let ys = xs.conv2d(&self.weight, 0, 1, 1, 1)?;
        ys.broadcast_add(&self.bias.reshape((1, out_channels, 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward values and both gradients agree with candle's (slow, correct) `conv2d`.
    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        let xs = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 4, 9, 7), &dev).unwrap()).unwrap();
        let weight =
            Var::from_tensor(&Tensor::randn(0f64, 1., (5, 4, 3, 3), &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::randn(0f64, 1., 5, &dev).unwrap()).unwrap();
        let conv = Conv2d {
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
        };
        // A weighted sum, so that every output position has a different gradient.
        let probe = Tensor::randn(0f64, 1., (3, 5, 7, 5), &dev).unwrap();
        let ours = conv.forward(&xs).unwrap();
        let reference = xs
            .conv2d(&weight, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 5, 1, 1)).unwrap())
            .unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(max_diff(&ours, &reference) < 1e-12);
        let ours = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let reference = (reference * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&xs, &weight, &bias] {
            let (a, b) = (ours.get(var).unwrap(), reference.get(var).unwrap());
            assert!(
                max_diff(a, b) < 1e-10,
                "gradients differ by {}",
                max_diff(a, b)
            );
        }
    }
}
