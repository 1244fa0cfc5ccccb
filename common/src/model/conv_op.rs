use super::gemm::{Operand, matmul};
use super::parallel::{as_f32, as_f32_mut, collect_chunks, for_each_chunk, for_each_task};
use crate::simd::Isa;
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
pub(super) const GROUP: usize = 8;

/// Gradient elements per task when adding up the groups' partial sums.
const SUM_CHUNK: usize = 4096;

/// The sizes of one convolution: `n` images of `c` channels of `h` by `w` pixels, `out` output
/// channels, a `k` by `k` kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub out: usize,
    pub k: usize,
}

impl Geometry {
    pub fn oh(&self) -> usize {
        self.h + 1 - self.k
    }

    pub fn ow(&self) -> usize {
        self.w + 1 - self.k
    }

    /// Output pixels per channel: the columns of an image's im2col matrix.
    pub fn pixels(&self) -> usize {
        self.oh() * self.ow()
    }

    /// Weights per output channel: the rows of an image's im2col matrix.
    pub fn patch(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Floats of one input image.
    pub fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The im2col buffer [`forward_image`] and [`backward_image`] need: `patch + 1` rows (the
    /// last of ones, for the bias gradient) of `pixels`.
    pub fn cols_len(&self) -> usize {
        (self.patch() + 1) * self.pixels()
    }

    /// Image `b` of the batch `xs`.
    fn image<'a, T>(&self, xs: &'a [T], b: usize) -> &'a [T] {
        &xs[b * self.image_len()..(b + 1) * self.image_len()]
    }

    /// Multiply-adds of one matrix product over the whole batch.
    pub fn work(&self) -> usize {
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
    let image_out = g.out * g.pixels();
    // A few images per task, so that each task fills its im2col buffer more than once.
    let images_per_task = g.n.div_ceil(16);
    let task = |i: usize, ys: &mut [MaybeUninit<T>]| {
        let mut cols = vec![T::zero(); g.cols_len()];
        for (j, ys) in ys.chunks_mut(image_out).enumerate() {
            let b = i * images_per_task + j;
            let ys = fill_bias(ys, bias, g.pixels());
            forward_image(g.image(xs, b), weight, g, &mut cols, ys);
        }
    };
    // SAFETY: `task` fills every output element with its channel's bias first.
    unsafe { collect_chunks(g.n * image_out, images_per_task * image_out, g.work(), task) }
}

/// Fills each channel's row of an image's output `(o, pixels)` with the channel's bias: where
/// [`forward_image`] accumulates the product.
pub(super) fn fill_bias<'a, T: WithDType>(
    out: &'a mut [MaybeUninit<T>],
    bias: &[T],
    pixels: usize,
) -> &'a mut [T] {
    for (row, &bias) in out.chunks_mut(pixels).zip(bias) {
        row.fill(MaybeUninit::new(bias));
    }
    // SAFETY: every element was initialised just above (`out` is `o * pixels` long).
    unsafe { assume_init(out) }
}

/// One image's convolution: `out (o, pixels) += weight (o, patch) · im2col(image)`, with
/// `cols` (at least [`Geometry::cols_len`] long) as the im2col buffer. `out` holds the bias.
pub(super) fn forward_image<T: WithDType>(
    image: &[T],
    weight: &[T],
    g: Geometry,
    cols: &mut [T],
    out: &mut [T],
) {
    let (pixels, patch) = (g.pixels(), g.patch());
    im2col(image, g, cols);
    matmul(
        out,
        pixels,
        true,
        (g.out, pixels, patch),
        Operand::rows(weight, patch),
        Operand::rows(cols, pixels),
    );
}

/// One image's share of the backward pass: adds its weight and bias gradients to `partial`
/// (`(o, patch + 1)`: each row the channel's weights, then its bias) and, when `input` is
/// given, writes the image's input gradient there (`cols_grad` is its scratch buffer of
/// `patch * pixels`). `cols` is scratch of [`Geometry::cols_len`].
pub(super) fn backward_image<T: WithDType>(
    image: &[T],
    weight: &[T],
    grads: &[T],
    g: Geometry,
    cols: &mut [T],
    partial: &mut [T],
    input: Option<(&mut [T], &mut [T])>,
) {
    let (pixels, patch) = (g.pixels(), g.patch());
    if input.is_none()
        && let (Some(image), Some(grads), Some(partial)) =
            (as_f32(image), as_f32(grads), as_f32_mut(partial))
        && weight_grad_single_channel(Isa::current(), image, grads, g, partial)
    {
        return;
    }
    // The bias gradient comes out of the weight gradient's product as one more column: the
    // im2col matrix gets a last row of ones, so the product sums each channel's output
    // gradient. (A plain loop of additions is a chain of dependent adds that cost as much as
    // the product.)
    im2col(image, g, cols);
    cols[patch * pixels..(patch + 1) * pixels].fill(T::one());
    // partial (o, patch + 1) += grads (o, pixels) · [cols; ones]ᵀ (pixels, patch + 1).
    matmul(
        partial,
        patch + 1,
        true,
        (g.out, patch + 1, pixels),
        Operand::rows(grads, pixels),
        Operand::transposed(cols, pixels),
    );
    if let Some((image_grad, cols_grad)) = input {
        // cols_grad (patch, pixels) = weightᵀ (patch, o) · grads (o, pixels).
        matmul(
            cols_grad,
            pixels,
            false,
            (patch, pixels, g.out),
            Operand::transposed(weight, patch),
            Operand::rows(grads, pixels),
        );
        col2im(cols_grad, g, image_grad);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// The weight and bias gradients of one image onto `partial` without im2col or `gemm`, where
/// there is a kernel for it (a single input channel, a 3x3 kernel, AVX-512: the CNN's first
/// layer, 8.7 rather than 12.7 us per image; for LeNet's 5x5 the same kernel is no faster than
/// the product, `per_image_timing`); whether there was. Its sums are in another order than the
/// product's, so the bits differ from it within rounding, the same on every run and thread
/// count.
fn weight_grad_single_channel(
    isa: Isa,
    image: &[f32],
    grads: &[f32],
    g: Geometry,
    partial: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && g.c == 1 && g.k == 3 {
        assert!(image.len() >= g.image_len() && grads.len() >= g.out * g.pixels());
        assert!(partial.len() >= g.out * (g.patch() + 1));
        let (image, grads, partial) = (image.as_ptr(), grads.as_ptr(), partial.as_mut_ptr());
        // SAFETY: the CPU has AVX-512 (`isa` is supported); the lengths are checked above.
        unsafe { x86::weight_grad_single_channel_avx512::<3>(image, grads, g, partial) };
        return true;
    }
    let _ = (isa, image, grads, g, partial);
    false
}

/// Adds up the groups' partial sums (`groups` blocks of `(o, patch + 1)`) in group order into
/// the weight gradient `(o, patch)` and the bias gradient `(o)`, spread over the pool in
/// chunks fixed by the sizes.
pub(super) fn sum_partials<T: WithDType>(
    partials: &[T],
    groups: usize,
    g: Geometry,
    weight_grad: &mut [MaybeUninit<T>],
    bias_grad: &mut [MaybeUninit<T>],
) {
    let patch = g.patch();
    let partial_len = g.out * (patch + 1);
    let sum = |at: usize| {
        let parts = partials[at..].iter().step_by(partial_len).take(groups);
        parts.fold(T::zero(), |acc, &v| acc + v)
    };
    // Element `i` of the weight gradient is column `i % patch` of row `i / patch`.
    for_each_chunk(
        weight_grad,
        SUM_CHUNK,
        g.out * patch * groups,
        |chunk, sums| {
            for (k, out) in sums.iter_mut().enumerate() {
                let i = chunk * SUM_CHUNK + k;
                out.write(sum(i / patch * (patch + 1) + i % patch));
            }
        },
    );
    for (o, out) in bias_grad.iter_mut().enumerate() {
        out.write(sum(o * (patch + 1) + patch));
    }
}

fn backward<T: WithDType>(
    xs: &[T],
    weight: &[T],
    grads: &[T],
    g: Geometry,
    input_grad: bool,
) -> Vec<T> {
    let image_len = g.image_len();
    let image_out = g.out * g.pixels();
    let params = g.out * g.patch() + g.out;
    let groups = g.n.div_ceil(GROUP);
    let xs_grad_len = if input_grad { g.n * image_len } else { 0 };
    let mut out = Vec::with_capacity(params + xs_grad_len);
    let (params_grad, xs_grad) =
        out.spare_capacity_mut()[..params + xs_grad_len].split_at_mut(params);

    // One task per group: partial weight and bias gradients, and the group's input gradients.
    let partial_len = g.out * (g.patch() + 1);
    let mut partials = vec![T::zero(); groups * partial_len];
    let mut xs_grad_chunks: Vec<&mut [MaybeUninit<T>]> =
        xs_grad.chunks_mut(GROUP * image_len).collect();
    xs_grad_chunks.resize_with(groups, Default::default);
    let task = |group: usize, (partial, xs_grad): (&mut [T], &mut [MaybeUninit<T>])| {
        let xs_grad = zeroed(xs_grad);
        let mut cols = vec![T::zero(); g.cols_len()];
        let mut cols_grad = vec![
            T::zero();
            if input_grad {
                g.patch() * g.pixels()
            } else {
                0
            }
        ];
        let images = group * GROUP..((group + 1) * GROUP).min(g.n);
        for (j, b) in images.enumerate() {
            let grads = &grads[b * image_out..(b + 1) * image_out];
            let input = input_grad.then(|| {
                (
                    &mut xs_grad[j * image_len..(j + 1) * image_len],
                    &mut cols_grad[..],
                )
            });
            backward_image(g.image(xs, b), weight, grads, g, &mut cols, partial, input);
        }
    };
    let tasks = partials
        .chunks_mut(partial_len)
        .zip(xs_grad_chunks)
        .collect();
    for_each_task(tasks, 3 * g.work(), task);

    let (weight_grad, bias_grad) = params_grad.split_at_mut(g.out * g.patch());
    sum_partials(&partials, groups, g, weight_grad, bias_grad);
    // SAFETY: the tasks zeroed and filled every input gradient, `sum_partials` every sum.
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
pub(super) fn im2col<T: WithDType>(image: &[T], g: Geometry, cols: &mut [T]) {
    im2col_strided(image, g, cols, g.pixels());
}

/// [`im2col`] into a wider matrix whose rows are `stride` apart: with `cols` starting at column
/// `b * pixels` of a `(patch, images * pixels)` matrix, image `b`'s block of it.
pub(super) fn im2col_strided<T: WithDType>(
    image: &[T],
    g: Geometry,
    cols: &mut [T],
    stride: usize,
) {
    let (image, cols) = (&image[..g.image_len()], &mut cols[..strided_len(g, stride)]);
    if let (Some(image), Some(cols)) = (as_f32(image), as_f32_mut(cols)) {
        return im2col_f32(Isa::current(), image, g, cols, stride);
    }
    for_each_run(g, stride, |src, dst, len| {
        cols[dst..dst + len].copy_from_slice(&image[src..src + len]);
    });
}

/// [`im2col_strided`] of f32 through a pointer, for tasks filling disjoint column blocks of
/// one matrix at once.
///
/// # Safety
///
/// `cols` must be valid for writes of `patch` rows of `pixels` floats, `stride` apart, that
/// no one else accesses during the call.
pub(super) unsafe fn im2col_strided_raw(image: &[f32], g: Geometry, cols: *mut f32, stride: usize) {
    let image = &image[..g.image_len()];
    assert!(stride >= g.pixels());
    match Isa::current() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA is supported; the caller vouches for `cols`.
        Isa::Avx512 => unsafe { x86::im2col_avx512(image.as_ptr(), g, cols, stride) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::im2col_avx2(image.as_ptr(), g, cols, stride) },
        _ => for_each_run(g, stride, |src, dst, len| {
            // SAFETY: the run lies in a row the caller vouches for.
            unsafe {
                std::ptr::copy_nonoverlapping(image[src..src + len].as_ptr(), cols.add(dst), len)
            }
        }),
    }
}

/// The adjoint of [`im2col`]: every input pixel gets the sum of the entries of `cols` that
/// came from it, added from zero in kernel-position order; `image` is overwritten.
pub(super) fn col2im<T: WithDType>(cols: &[T], g: Geometry, image: &mut [T]) {
    col2im_strided(cols, g.pixels(), g, image);
}

/// [`col2im`] from a wider matrix whose rows are `stride` apart (see [`im2col_strided`]).
pub(super) fn col2im_strided<T: WithDType>(
    cols: &[T],
    stride: usize,
    g: Geometry,
    image: &mut [T],
) {
    let (image, cols) = (&mut image[..g.image_len()], &cols[..strided_len(g, stride)]);
    if let (Some(image), Some(cols)) = (as_f32_mut(image), as_f32(cols)) {
        return col2im_f32(Isa::current(), cols, stride, g, image);
    }
    image.fill(T::zero());
    for_each_run(g, stride, |dst, src, len| {
        for (x, &col) in image[dst..dst + len].iter_mut().zip(&cols[src..src + len]) {
            *x += col;
        }
    });
}

/// The extent of an im2col matrix of `patch` rows `stride` apart: up to the last row's end.
fn strided_len(g: Geometry, stride: usize) -> usize {
    assert!(stride >= g.pixels());
    (g.patch() - 1) * stride + g.pixels()
}

/// Calls `f(image_offset, cols_offset, len)` for every run of `ow` values that im2col copies:
/// one output row of one kernel position of one channel, the im2col matrix's rows `stride`
/// apart.
fn for_each_run(g: Geometry, stride: usize, mut f: impl FnMut(usize, usize, usize)) {
    let (k, oh, ow) = (g.k, g.oh(), g.ow());
    for ci in 0..g.c {
        for i in 0..k {
            for j in 0..k {
                let row = ((ci * k + i) * k + j) * stride;
                for y in 0..oh {
                    f((ci * g.h + y + i) * g.w + j, row + y * ow, ow);
                }
            }
        }
    }
}

/// [`im2col_strided`] of f32 with `isa`'s instructions. The runs are short (8 floats for
/// LeNet's second convolution), so the vector paths move each with vector loads and stores,
/// the tail under a mask, where the portable one calls `memcpy` per run.
fn im2col_f32(isa: Isa, image: &[f32], g: Geometry, cols: &mut [f32], stride: usize) {
    assert!(image.len() == g.image_len() && cols.len() == strided_len(g, stride));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported; the runs stay inside both buffers, whose lengths are
        // checked above.
        Isa::Avx512 => unsafe { x86::im2col_avx512(image.as_ptr(), g, cols.as_mut_ptr(), stride) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::im2col_avx2(image.as_ptr(), g, cols.as_mut_ptr(), stride) },
        _ => for_each_run(g, stride, |src, dst, len| {
            cols[dst..dst + len].copy_from_slice(&image[src..src + len]);
        }),
    }
}

/// [`col2im_strided`] of f32 with `isa`'s instructions, one input row at a time: the row's sums
/// are kept in registers over every kernel position that reaches it and stored once. (Adding
/// each run onto memory, as the generic path does, makes every run wait for the overlapping
/// store of the kernel position before it.) Every path adds the same terms in the same order.
fn col2im_f32(isa: Isa, cols: &[f32], stride: usize, g: Geometry, image: &mut [f32]) {
    assert!(image.len() == g.image_len() && cols.len() == strided_len(g, stride));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported; every access stays inside both buffers, whose lengths
        // are checked above.
        Isa::Avx512 => unsafe { x86::col2im_avx512(cols.as_ptr(), stride, g, image.as_mut_ptr()) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::col2im_avx2(cols.as_ptr(), stride, g, image.as_mut_ptr()) },
        _ => col2im_rows(cols, stride, g, image),
    }
}

/// The portable [`col2im_f32`]: row by row, from zero, kernel rows then kernel columns.
fn col2im_rows(cols: &[f32], stride: usize, g: Geometry, image: &mut [f32]) {
    let (k, oh, ow) = (g.k, g.oh(), g.ow());
    for ci in 0..g.c {
        for r in 0..g.h {
            let row = &mut image[(ci * g.h + r) * g.w..][..g.w];
            row.fill(0.0);
            for i in (0..k).filter(|&i| r >= i && r - i < oh) {
                let y = r - i;
                for j in 0..k {
                    let run = &cols[((ci * k + i) * k + j) * stride + y * ow..][..ow];
                    for (x, &v) in row[j..j + ow].iter_mut().zip(run) {
                        *x += v;
                    }
                }
            }
        }
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// im2col and col2im give the same bits on every instruction set the CPU has as on
        /// the portable path (and col2im the generic one's), for runs shorter and longer than
        /// a vector.
        #[test]
        fn every_instruction_set_moves_the_same_bits(
            c in 1usize..=3, k in 1usize..=5, dh in 0usize..=6, dw in 0usize..=40, seed in 0u64..1000,
        ) {
            let g = Geometry { n: 1, c, h: k + dh, w: k + dw, out: 1, k };
            let mut rng = derive_rng(seed, "im2col-test", &[]);
            let mut draw = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.next_u32() as f32 / u32::MAX as f32 - 0.5).collect()
            };
            let image = draw(g.image_len());
            let cols_in = draw(g.patch() * g.pixels());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let run = |isa: Isa| {
                let mut cols = vec![f32::NAN; g.patch() * g.pixels()];
                let mut summed = vec![f32::NAN; g.image_len()];
                im2col_f32(isa, &image, g, &mut cols, g.pixels());
                col2im_f32(isa, &cols_in, g.pixels(), g, &mut summed);
                (bits(&cols), bits(&summed))
            };
            let portable = run(Isa::Portable);
            // Into and out of the third image's block of a matrix four images wide.
            let stride = 4 * g.pixels();
            let wide_len = strided_len(g, stride) + 2 * g.pixels();
            let strided = |isa: Isa| {
                let mut wide = vec![f32::NAN; wide_len];
                im2col_f32(isa, &image, g, &mut wide[2 * g.pixels()..], stride);
                let mut summed = vec![f32::NAN; g.image_len()];
                let mut wide_in = vec![0.0; wide_len];
                for (r, row) in cols_in.chunks(g.pixels()).enumerate() {
                    wide_in[2 * g.pixels() + r * stride..][..g.pixels()].copy_from_slice(row);
                }
                col2im_f32(isa, &wide_in[2 * g.pixels()..], stride, g, &mut summed);
                let blocks: Vec<f32> = (0..g.patch())
                    .flat_map(|r| wide[2 * g.pixels() + r * stride..][..g.pixels()].to_vec())
                    .collect();
                (bits(&blocks), bits(&summed))
            };
            let mut generic = vec![f32::NAN; g.image_len()];
            generic.fill(0.0);
            for_each_run(g, g.pixels(), |dst, src, len| {
                for (x, &col) in generic[dst..dst + len].iter_mut().zip(&cols_in[src..src + len]) {
                    *x += col;
                }
            });
            prop_assert_eq!(&portable.1, &bits(&generic));
            for isa in Isa::supported() {
                prop_assert_eq!(&run(isa), &portable, "{}", isa);
                prop_assert_eq!(&strided(isa), &portable, "{} strided", isa);
            }
        }
    }

    /// The single-channel weight gradient, where the CPU has a kernel for it, agrees with the
    /// im2col product to rounding, and adds onto what the partial sums hold.
    #[test]
    fn single_channel_weight_gradient_matches_the_product() {
        for (k, h, w, out) in [
            (5, 28, 28, 20),
            (3, 28, 28, 32),
            (3, 9, 40, 3),
            (5, 6, 5, 2),
        ] {
            let g = Geometry {
                n: 1,
                c: 1,
                h,
                w,
                out,
                k,
            };
            let image = random(&[g.image_len()], DType::F32, 1)
                .to_vec1::<f32>()
                .unwrap();
            let grads = random(&[out * g.pixels()], DType::F32, 2)
                .to_vec1::<f32>()
                .unwrap();
            let start = random(&[out * (g.patch() + 1)], DType::F32, 3)
                .to_vec1::<f32>()
                .unwrap();
            let mut direct = start.clone();
            if !weight_grad_single_channel(Isa::current(), &image, &grads, g, &mut direct) {
                return;
            }
            let mut product = start.clone();
            let mut cols = vec![0.0; g.cols_len()];
            im2col(&image, g, &mut cols);
            cols[g.patch() * g.pixels()..].fill(1.0);
            matmul(
                &mut product,
                g.patch() + 1,
                true,
                (out, g.patch() + 1, g.pixels()),
                Operand::rows(&grads, g.pixels()),
                Operand::transposed(&cols, g.pixels()),
            );
            for (a, b) in direct.iter().zip(&product) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{g:?}: {a} vs {b}");
            }
        }
    }

    /// `cargo test --release -p common per_image_timing -- --ignored --nocapture`: microseconds
    /// per image of each kernel of the first layers' backward pass (the weight gradient by
    /// the single-channel kernel and by im2col and the product), best of 200, on data in cache.
    #[test]
    #[ignore = "timing, not a check"]
    fn per_image_timing() {
        use std::time::Instant;
        let best = |f: &mut dyn FnMut()| {
            (0..200)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64() * 1e6
                })
                .fold(f64::MAX, f64::min)
        };
        for (k, out) in [(5, 20), (3, 32)] {
            let g = Geometry {
                n: 1,
                c: 1,
                h: 28,
                w: 28,
                out,
                k,
            };
            let image = random(&[g.image_len()], DType::F32, 1)
                .to_vec1::<f32>()
                .unwrap();
            let grads = random(&[out * g.pixels()], DType::F32, 2)
                .to_vec1::<f32>()
                .unwrap();
            let mut partial = vec![0.0; out * (g.patch() + 1)];
            let mut cols = vec![0.0; g.cols_len()];
            #[cfg(target_arch = "x86_64")]
            let direct = match (Isa::current(), k) {
                // SAFETY: the CPU has AVX-512; the buffers are the geometry's.
                (Isa::Avx512, 5) => best(&mut || unsafe {
                    x86::weight_grad_single_channel_avx512::<5>(
                        image.as_ptr(),
                        grads.as_ptr(),
                        g,
                        partial.as_mut_ptr(),
                    )
                }),
                _ => best(&mut || {
                    weight_grad_single_channel(Isa::current(), &image, &grads, g, &mut partial);
                }),
            };
            #[cfg(not(target_arch = "x86_64"))]
            let direct = f64::NAN;
            let product = best(&mut || {
                im2col(&image, g, &mut cols);
                cols[g.patch() * g.pixels()..].fill(1.0);
                matmul(
                    &mut partial,
                    g.patch() + 1,
                    true,
                    (out, g.patch() + 1, g.pixels()),
                    Operand::rows(&grads, g.pixels()),
                    Operand::transposed(&cols, g.pixels()),
                );
            });
            println!(
                "{g:?}: single-channel kernel {direct:.2} us, im2col + product {product:.2} us"
            );
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
