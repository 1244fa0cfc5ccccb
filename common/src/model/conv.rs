use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor, WithDType, bail};
use candle_nn::{Init, VarBuilder, init::DEFAULT_KAIMING_NORMAL};
use std::ops::AddAssign;

/// A 2-D convolution with a square kernel, stride 1 and no padding: the only kind the
/// tutorials use.
///
/// On the CPU it runs as im2col and one matrix product. candle's own `conv2d` is correct but its
/// backward pass computes the weight gradient as a convolution whose kernel is the whole
/// feature map, which made it most of a LeNet step (0.5 s of 0.67 s at batch 64). Other devices use candle's `conv2d`.
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
        let (out_channels, in_channels, kernel, _) = self.weight.dims4()?;
        if !xs.device().is_cpu() {
            let ys = xs.conv2d(&self.weight, 0, 1, 1, 1)?;
            return ys.broadcast_add(&self.bias.reshape((1, out_channels, 1, 1))?);
        }
        // Im2Col checks that the kernel fits before the output size is computed.
        let cols = xs.contiguous()?.apply_op1(Im2Col { kernel })?;
        let (n, _, h, w) = xs.dims4()?;
        let (oh, ow) = (h + 1 - kernel, w + 1 - kernel);
        let weight = self
            .weight
            .reshape((out_channels, in_channels * kernel * kernel))?;
        weight
            .matmul(&cols)?
            .broadcast_add(&self.bias.reshape((out_channels, 1))?)?
            .reshape((out_channels, n, oh, ow))?
            .transpose(0, 1)
    }
}

/// `(n, c, h, w)` to the matrix `(c * k * k, n * oh * ow)` whose column for an output pixel
/// holds the input window it sees, ordered as the weight `(out, c, k, k)` flattens.
struct Im2Col {
    kernel: usize,
}

/// The adjoint of [`Im2Col`]: adds every column entry back onto the input pixel it came from.
struct Col2Im {
    dims: (usize, usize, usize, usize),
    kernel: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let (n, c, h, w) = dims;
        let k = self.kernel;
        if h < k || w < k {
            bail!("im2col: a {k}x{k} kernel does not fit a {h}x{w} input");
        }
        let shape = Shape::from((c * k * k, n * (h + 1 - k) * (w + 1 - k)));
        let storage = match storage {
            CpuStorage::F32(xs) => CpuStorage::F32(im2col(contiguous(xs, layout)?, dims, k)),
            CpuStorage::F64(xs) => CpuStorage::F64(im2col(contiguous(xs, layout)?, dims, k)),
            other => bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let op = Col2Im {
            dims: arg.dims4()?,
            kernel: self.kernel,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from(self.dims);
        let storage = match storage {
            CpuStorage::F32(cols) => {
                CpuStorage::F32(col2im(contiguous(cols, layout)?, self.dims, self.kernel))
            }
            CpuStorage::F64(cols) => {
                CpuStorage::F64(col2im(contiguous(cols, layout)?, self.dims, self.kernel))
            }
            other => bail!("col2im: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, shape))
    }
}

fn contiguous<'a, T>(values: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op: "im2col" }),
    }
}

/// Calls `f(input_offset, column_offset)` for every run of `ow` values that im2col copies:
/// one output row of one window position of one channel of one image.
fn for_each_run(dims: (usize, usize, usize, usize), k: usize, mut f: impl FnMut(usize, usize)) {
    let (n, c, h, w) = dims;
    let (oh, ow) = (h + 1 - k, w + 1 - k);
    let pixels = n * oh * ow;
    for ci in 0..c {
        for i in 0..k {
            for j in 0..k {
                let row = ((ci * k + i) * k + j) * pixels;
                for b in 0..n {
                    for y in 0..oh {
                        f(((b * c + ci) * h + y + i) * w + j, row + (b * oh + y) * ow);
                    }
                }
            }
        }
    }
}

fn im2col<T: WithDType>(xs: &[T], dims: (usize, usize, usize, usize), k: usize) -> Vec<T> {
    let (n, c, h, w) = dims;
    let ow = w + 1 - k;
    let mut cols = vec![T::zero(); c * k * k * n * (h + 1 - k) * ow];
    for_each_run(dims, k, |src, dst| {
        cols[dst..dst + ow].copy_from_slice(&xs[src..src + ow]);
    });
    cols
}

fn col2im<T: WithDType + AddAssign>(
    cols: &[T],
    dims: (usize, usize, usize, usize),
    k: usize,
) -> Vec<T> {
    let (n, c, h, w) = dims;
    let ow = w + 1 - k;
    let mut xs = vec![T::zero(); n * c * h * w];
    for_each_run(dims, k, |dst, src| {
        for (x, &col) in xs[dst..dst + ow].iter_mut().zip(&cols[src..src + ow]) {
            *x += col;
        }
    });
    xs
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
