use super::parallel::{collect_chunks, for_each_chunk, for_each_task};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType, bail};
use std::mem::MaybeUninit;

/// `conv2d(x, weight) + bias` for `x` `(n, c, h, w)`, `weight` `(o, c, k, k)` and `bias` `(o)`,
/// stride 1 and no padding, on the CPU in `f32` or `f64`: output `(n, o, h - k + 1, w - k + 1)`.
///
/// Each image is one im2col and one matrix product that writes its output channels in place
/// with the bias already added, so nothing is transposed or broadcast afterwards; images are
/// spread over the current rayon pool. The backward pass ([`Conv2dBackward`]) computes the
/// three gradients in one pass over the batch. Every value is computed the same way whatever
/// the thread count (see [`super::parallel`]), so results are bit-identical across 1 and 2
/// threads and across reruns.
pub(super) struct Conv2dForward;

/// `(x, weight, output gradient)` to the gradients of [`Conv2dForward`], flattened into one
/// vector `[weight (o * c * k * k), bias (o), x (n * c * h * w) if input_grad]` that `bwd`
/// cuts into views.
///
/// The weight and bias gradients are sums over the batch. Each fixed group of [`GROUP`] images
/// accumulates its own partial sums, one task per group; the partial sums are then added in
/// group order. The grouping depends on the batch size only, never on the thread count or on
/// which thread ran what.
struct Conv2dBackward {
    /// Whether `x` needs a gradient; the network's input does not, and for LeNet's first
    /// convolution that gradient would be a third of its cost.
    input_grad: bool,
}

/// Images per partial weight gradient: 8 tasks for a batch of 64, enough to balance two
/// threads, while adding up the partial sums stays a fraction of a percent of the products.
const GROUP: usize = 8;

/// Gradient elements per task when adding up the groups' partial sums.
const SUM_CHUNK: usize = 4096;

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    out: usize,
    k: usize,
}

impl Geometry {
    fn oh(&self) -> usize {
        self.h + 1 - self.k
    }

    fn ow(&self) -> usize {
        self.w + 1 - self.k
    }

    /// Output pixels per channel: the columns of an image's im2col matrix.
    fn pixels(&self) -> usize {
        self.oh() * self.ow()
    }

    /// Weights per output channel: the rows of an image's im2col matrix.
    fn patch(&self) -> usize {
        self.c * self.k * self.k
    }

    fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Multiply-adds of one matrix product over the whole batch.
    fn work(&self) -> usize {
        self.n * self.out * self.patch() * self.pixels()
    }
}

impl CustomOp3 for Conv2dForward {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = geometry(xs_layout, weight_layout)?;
        if bias_layout.shape().dims1()? != g.out {
            bail!(
                "conv2d: bias of shape {:?} for {} output channels",
                bias_layout.shape(),
                g.out
            );
        }
        let shape = Shape::from((g.n, g.out, g.oh(), g.ow()));
        let storage = match (xs, weight, bias) {
            (CpuStorage::F32(xs), CpuStorage::F32(weight), CpuStorage::F32(bias)) => {
                CpuStorage::F32(forward(
                    contiguous(xs, xs_layout)?,
                    contiguous(weight, weight_layout)?,
                    contiguous(bias, bias_layout)?,
                    g,
                ))
            }
            (CpuStorage::F64(xs), CpuStorage::F64(weight), CpuStorage::F64(bias)) => {
                CpuStorage::F64(forward(
                    contiguous(xs, xs_layout)?,
                    contiguous(weight, weight_layout)?,
                    contiguous(bias, bias_layout)?,
                    g,
                ))
            }
            _ => bail!(
                "conv2d: unsupported dtypes {:?}, {:?}, {:?}",
                xs.dtype(),
                weight.dtype(),
                bias.dtype()
            ),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let input_grad = xs.track_op();
        let op = Conv2dBackward { input_grad };
        let flat = xs.apply_op3_no_bwd(weight, &grad_res.contiguous()?, &op)?;
        let (weight_len, out) = (weight.elem_count(), weight.dim(0)?);
        let weight_grad = flat.narrow(0, 0, weight_len)?.reshape(weight.shape())?;
        let bias_grad = flat.narrow(0, weight_len, out)?;
        let xs_grad = if input_grad {
            let grad = flat.narrow(0, weight_len + out, xs.elem_count())?;
            Some(grad.reshape(xs.shape())?)
        } else {
            None
        };
        Ok((xs_grad, Some(weight_grad), Some(bias_grad)))
    }
}

impl CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        grads: &CpuStorage,
        grads_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = geometry(xs_layout, weight_layout)?;
        if grads_layout.shape().dims4()? != (g.n, g.out, g.oh(), g.ow()) {
            bail!(
                "conv2d-backward: gradient of shape {:?} for an output of shape {:?}",
                grads_layout.shape(),
                (g.n, g.out, g.oh(), g.ow())
            );
        }
        let input_grad = self.input_grad;
        let storage = match (xs, weight, grads) {
            (CpuStorage::F32(xs), CpuStorage::F32(weight), CpuStorage::F32(grads)) => {
                CpuStorage::F32(backward(
                    contiguous(xs, xs_layout)?,
                    contiguous(weight, weight_layout)?,
                    contiguous(grads, grads_layout)?,
                    g,
                    input_grad,
                ))
            }
            (CpuStorage::F64(xs), CpuStorage::F64(weight), CpuStorage::F64(grads)) => {
                CpuStorage::F64(backward(
                    contiguous(xs, xs_layout)?,
                    contiguous(weight, weight_layout)?,
                    contiguous(grads, grads_layout)?,
                    g,
                    input_grad,
                ))
            }
            _ => bail!(
                "conv2d-backward: unsupported dtypes {:?}, {:?}, {:?}",
                xs.dtype(),
                weight.dtype(),
                grads.dtype()
            ),
        };
        let len = g.out * g.patch() + g.out + if input_grad { g.n * g.image_len() } else { 0 };
        Ok((storage, Shape::from(len)))
    }
}

fn geometry(xs_layout: &Layout, weight_layout: &Layout) -> Result<Geometry> {
    let (n, c, h, w) = xs_layout.shape().dims4()?;
    let (out, wc, k, k2) = weight_layout.shape().dims4()?;
    if wc != c || k != k2 || k == 0 {
        bail!(
            "conv2d: weight of shape {:?} for an input of shape {:?} (square kernels only)",
            weight_layout.shape(),
            xs_layout.shape()
        );
    }
    if out == 0 {
        bail!(
            "conv2d: a weight of shape {:?} has no output channels",
            weight_layout.shape()
        );
    }
    if h < k || w < k {
        bail!("conv2d: a {k}x{k} kernel does not fit a {h}x{w} input");
    }
    Ok(Geometry { n, c, h, w, out, k })
}

fn contiguous<'a, T>(values: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op: "conv2d" }),
    }
}

fn forward<T: WithDType>(xs: &[T], weight: &[T], bias: &[T], g: Geometry) -> Vec<T> {
    let (pixels, patch) = (g.pixels(), g.patch());
    let image_out = g.out * pixels;
    // A few images per task, so that each task fills its im2col buffer more than once.
    let images_per_task = g.n.div_ceil(16);
    let task = |i: usize, ys: &mut [MaybeUninit<T>]| {
        let mut cols = vec![T::zero(); patch * pixels];
        for (j, ys) in ys.chunks_mut(image_out).enumerate() {
            let b = i * images_per_task + j;
            im2col(
                &xs[b * g.image_len()..(b + 1) * g.image_len()],
                g,
                &mut cols,
            );
            for (row, &bias) in ys.chunks_mut(pixels).zip(bias) {
                row.fill(MaybeUninit::new(bias));
            }
            // SAFETY: every element was initialised just above.
            let ys = unsafe { assume_init(ys) };
            matmul(
                ys,
                true,
                (g.out, pixels, patch),
                (weight, patch, 1),
                (&cols, pixels, 1),
            );
        }
    };
    // SAFETY: `task` fills every output element with its channel's bias first.
    unsafe { collect_chunks(g.n * image_out, images_per_task * image_out, g.work(), task) }
}

fn backward<T: WithDType>(
    xs: &[T],
    weight: &[T],
    grads: &[T],
    g: Geometry,
    input_grad: bool,
) -> Vec<T> {
    let (pixels, patch, image_len) = (g.pixels(), g.patch(), g.image_len());
    let image_out = g.out * pixels;
    let params = g.out * patch + g.out;
    let groups = g.n.div_ceil(GROUP);
    let xs_grad_len = if input_grad { g.n * image_len } else { 0 };
    let mut out = Vec::with_capacity(params + xs_grad_len);
    let (params_grad, xs_grad) =
        out.spare_capacity_mut()[..params + xs_grad_len].split_at_mut(params);

    // One task per group: partial weight and bias gradients, and the group's input gradients.
    // The bias gradient comes out of the weight gradient's product as one more column: the
    // im2col matrix gets a last row of ones, so the product sums each channel's output
    // gradient. (A plain loop of additions is a chain of dependent adds that cost as much as
    // the product.) The partial sums are laid out `(o, patch + 1)`.
    let partial_len = g.out * (patch + 1);
    let mut partials = vec![T::zero(); groups * partial_len];
    let mut xs_grad_chunks: Vec<&mut [MaybeUninit<T>]> =
        xs_grad.chunks_mut(GROUP * image_len).collect();
    xs_grad_chunks.resize_with(groups, Default::default);
    let task = |group: usize, (partial, xs_grad): (&mut [T], &mut [MaybeUninit<T>])| {
        let xs_grad = zeroed(xs_grad);
        let mut cols = vec![T::one(); (patch + 1) * pixels];
        let mut cols_grad = vec![T::zero(); if input_grad { patch * pixels } else { 0 }];
        let images = group * GROUP..((group + 1) * GROUP).min(g.n);
        for (j, b) in images.enumerate() {
            let grads = &grads[b * image_out..(b + 1) * image_out];
            im2col(&xs[b * image_len..(b + 1) * image_len], g, &mut cols);
            // partial (o, patch + 1) += grads (o, pixels) · [cols; ones]ᵀ (pixels, patch + 1).
            matmul(
                partial,
                true,
                (g.out, patch + 1, pixels),
                (grads, pixels, 1),
                (&cols, 1, pixels),
            );
            if input_grad {
                // cols_grad (patch, pixels) = weightᵀ (patch, o) · grads (o, pixels).
                matmul(
                    &mut cols_grad,
                    false,
                    (patch, pixels, g.out),
                    (weight, 1, patch),
                    (grads, pixels, 1),
                );
                col2im(
                    &cols_grad,
                    g,
                    &mut xs_grad[j * image_len..(j + 1) * image_len],
                );
            }
        }
    };
    let tasks = partials
        .chunks_mut(partial_len)
        .zip(xs_grad_chunks)
        .collect();
    for_each_task(tasks, 3 * g.work(), task);

    // Each element of the weight and bias gradients sums its groups' partial sums in group
    // order. Element `i` of `[weight (o, patch), bias (o)]` is column `i % patch` of row
    // `i / patch` of the partial sums, or their last column `i - o * patch` for the bias.
    let source = |i: usize| {
        if i < g.out * patch {
            i / patch * (patch + 1) + i % patch
        } else {
            (i - g.out * patch) * (patch + 1) + patch
        }
    };
    for_each_chunk(params_grad, SUM_CHUNK, params * groups, |chunk, sums| {
        for (k, sum) in sums.iter_mut().enumerate() {
            let at = source(chunk * SUM_CHUNK + k);
            let parts = partials[at..].iter().step_by(partial_len).take(groups);
            sum.write(parts.fold(T::zero(), |acc, &v| acc + v));
        }
    });
    // SAFETY: the tasks zeroed and filled every input gradient, the loop above every sum.
    unsafe { out.set_len(params + xs_grad_len) };
    out
}

/// Zeroes `values` and returns them as initialised.
fn zeroed<T: WithDType>(values: &mut [MaybeUninit<T>]) -> &mut [T] {
    values.fill(MaybeUninit::new(T::zero()));
    // SAFETY: every element was initialised just above.
    unsafe { assume_init(values) }
}

/// # Safety
///
/// Every element of `values` must be initialised.
unsafe fn assume_init<T>(values: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and the caller promises initialisation.
    unsafe { &mut *(values as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// One image `(c, h, w)` to its im2col matrix `(c * k * k, oh * ow)`: the column of an output
/// pixel holds the input window it sees, ordered as a weight `(out, c, k, k)` flattens.
fn im2col<T: WithDType>(image: &[T], g: Geometry, cols: &mut [T]) {
    for_each_run(g, |src, dst, len| {
        cols[dst..dst + len].copy_from_slice(&image[src..src + len]);
    });
}

/// The adjoint of [`im2col`]: adds every entry of `cols` onto the input pixel it came from.
fn col2im<T: WithDType>(cols: &[T], g: Geometry, image: &mut [T]) {
    for_each_run(g, |dst, src, len| {
        for (x, &col) in image[dst..dst + len].iter_mut().zip(&cols[src..src + len]) {
            *x += col;
        }
    });
}

/// Calls `f(image_offset, cols_offset, len)` for every run of `ow` values that im2col copies:
/// one output row of one kernel position of one channel.
fn for_each_run(g: Geometry, mut f: impl FnMut(usize, usize, usize)) {
    let (k, oh, ow, pixels) = (g.k, g.oh(), g.ow(), g.pixels());
    for ci in 0..g.c {
        for i in 0..k {
            for j in 0..k {
                let row = ((ci * k + i) * k + j) * pixels;
                for y in 0..oh {
                    f((ci * g.h + y + i) * g.w + j, row + y * ow, ow);
                }
            }
        }
    }
}

/// `dst (m, n) = [dst +] lhs (m, k) · rhs (k, n)` on the calling thread; `dst` is row-major,
/// `lhs` and `rhs` come with their (row, column) strides so that either can be a transposed
/// view. The parallelism is over images, outside.
fn matmul<T: WithDType>(
    dst: &mut [T],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    // The last element each matrix is read at, checked so that gemm stays in bounds.
    assert!(dst.len() >= m * n);
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the assertions above keep every access in bounds; `T` is f32 or f64, which
    // gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::parallel::worth_splitting;
    use super::*;
    use crate::seed::derive_rng;
    use candle_core::{DType, Device, Var};
    use proptest::prelude::*;
    use rand_chacha::rand_core::RngCore;

    /// A tensor of uniform values in [-1, 1), seeded so that a failure repeats.
    fn random(shape: &[usize], dtype: DType, stream: u64) -> Tensor {
        let mut rng = derive_rng(11, "conv-test", &[stream]);
        let len = shape.iter().product();
        let values: Vec<f64> = (0..len)
            .map(|_| rng.next_u64() as f64 / u64::MAX as f64 * 2.0 - 1.0)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The output and the gradients of x, weight and bias of `sum(conv(x) * probe)`.
    fn output_and_gradients(
        g: Geometry,
        dtype: DType,
        seed: u64,
        conv: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    ) -> [Tensor; 4] {
        let xs = Var::from_tensor(&random(&[g.n, g.c, g.h, g.w], dtype, seed)).unwrap();
        let weight = random(&[g.out, g.c, g.k, g.k], dtype, seed + 1);
        let weight = Var::from_tensor(&weight).unwrap();
        let bias = Var::from_tensor(&random(&[g.out], dtype, seed + 2)).unwrap();
        let probe = random(&[g.n, g.out, g.oh(), g.ow()], dtype, seed + 3);
        let ys = conv(&xs, &weight, &bias);
        let grads = (&ys * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = |var: &Var| grads.get(var).unwrap().clone();
        [ys, grad(&xs), grad(&weight), grad(&bias)]
    }

    fn ours(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        xs.apply_op3(weight, bias, Conv2dForward).unwrap()
    }

    fn candle(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        let out = weight.dim(0).unwrap();
        xs.conv2d(weight, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, out, 1, 1)).unwrap())
            .unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn geometries() -> impl Strategy<Value = Geometry> {
        (
            1usize..=4,
            1usize..=4,
            1usize..=5,
            1usize..=5,
            0usize..=6,
            0usize..=6,
        )
            .prop_map(|(n, c, out, k, dh, dw)| Geometry {
                n,
                c,
                h: k + dh,
                w: k + dw,
                out,
                k,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Output and all three gradients agree with candle's `conv2d` to a relative 1e-4 of
        /// the tensor's largest magnitude (1e-10 in f64).
        #[test]
        fn matches_candle_conv2d(g in geometries(), f64_ in any::<bool>(), seed in 0u64..1000) {
            let (dtype, tolerance) = if f64_ { (DType::F64, 1e-10) } else { (DType::F32, 1e-4) };
            let ours = output_and_gradients(g, dtype, seed * 4, ours);
            let reference = output_and_gradients(g, dtype, seed * 4, candle);
            for (what, (a, b)) in ["output", "x", "weight", "bias"].iter().zip(ours.iter().zip(&reference)) {
                prop_assert_eq!(a.dims(), b.dims(), "{} of {:?}", what, g);
                let (a, b) = (values(a), values(b));
                let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                prop_assert!(worst <= tolerance * scale, "{} of {:?}: off by {} of {}", what, g, worst, scale);
            }
        }
    }

    /// The network's input is no variable: it gets no gradient, and the op skips computing it.
    #[test]
    fn no_input_gradient_for_a_constant_input() {
        let xs = random(&[2, 3, 6, 6], DType::F32, 0);
        let weight = Var::from_tensor(&random(&[4, 3, 3, 3], DType::F32, 1)).unwrap();
        let bias = Var::from_tensor(&random(&[4], DType::F32, 2)).unwrap();
        let grads = ours(&xs, &weight, &bias)
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&xs).is_none());
        assert!(grads.get(&weight).is_some() && grads.get(&bias).is_some());
    }

    /// One and two threads give the same bits for the output and every gradient, at sizes
    /// that do split the work (with a batch that is no multiple of the group size).
    #[test]
    fn bit_identical_across_thread_counts() {
        let g = Geometry {
            n: 21,
            c: 3,
            h: 12,
            w: 11,
            out: 8,
            k: 3,
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                assert_eq!(worth_splitting(g.work()), threads > 1);
                output_and_gradients(g, DType::F32, 7, ours).map(|t| {
                    values(&t)
                        .iter()
                        .map(|v| (*v as f32).to_bits())
                        .collect::<Vec<_>>()
                })
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(2));
        assert!(one.iter().all(|bits| bits.iter().any(|&b| b != 0)));
    }
}
