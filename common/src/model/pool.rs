use super::parallel::{as_f32, cast_vec, collect_chunks};
use crate::simd::Isa;

#[cfg(target_arch = "x86_64")]
mod x86;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, bail,
};
use std::mem::MaybeUninit;

/// Max pooling over 2x2 windows with stride 2, flooring odd sizes as Keras and PyTorch do.
///
/// The gradient of each window goes to one input, its first maximal element in row-major order
/// (a NaN counts as maximal), as in PyTorch; tied maxima share nothing.
///
/// On the CPU, for `f32` and `f64`, it runs as a custom op: forward and backward through
/// LeNet's two pools at batch 64 take 1.8 ms against 8.2 ms for the reshape-and-reduce form
/// below (`time_forward_and_backward`). Other devices and dtypes use that form, where every
/// tied maximum receives the gradient. candle's own `max_pool2d` is not used because its
/// backward pass hands the input only a quarter of the gradient it should.
pub fn max_pool_2x2(xs: &Tensor) -> Result<Tensor> {
    xs.dims4()?;
    if xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) {
        xs.contiguous()?.apply_op1(MaxPool2x2)
    } else {
        max_pool_2x2_by_reduction(xs)
    }
}

/// The pool as a reshape and two `max` reductions, whose backward passes are plain masks.
fn max_pool_2x2_by_reduction(xs: &Tensor) -> Result<Tensor> {
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

type Dims = (usize, usize, usize, usize);

/// `(n, c, h, w)` to `(n, c, h / 2, w / 2)`, each output the maximum of its window.
struct MaxPool2x2;

/// `(input, output gradient)` to the input gradient: each output's gradient lands on the
/// first element of its window equal to [`window_max`]. The choice is recomputed from the input
/// rather than saved by the forward pass, which costs one more read of the input but keeps
/// the ops free of state.
struct MaxPool2x2Backward;

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let (n, c, h, w) = dims;
        let shape = Shape::from((n, c, h / 2, w / 2));
        let storage = match storage {
            CpuStorage::F32(xs) => CpuStorage::F32(forward(contiguous(xs, layout)?, dims)),
            CpuStorage::F64(xs) => CpuStorage::F64(forward(contiguous(xs, layout)?, dims)),
            other => bail!("max-pool-2x2: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool2x2Backward)?;
        Ok(Some(grad))
    }
}

impl CustomOp2 for MaxPool2x2Backward {
    fn name(&self) -> &'static str {
        "max-pool-2x2-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        grads: &CpuStorage,
        grads_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xs_layout.shape().dims4()?;
        let (n, c, h, w) = dims;
        if grads_layout.shape().dims4()? != (n, c, h / 2, w / 2) {
            bail!(
                "max-pool-2x2-backward: gradient of shape {:?} for an input of shape {:?}",
                grads_layout.shape(),
                xs_layout.shape()
            );
        }
        let storage = match (xs, grads) {
            (CpuStorage::F32(xs), CpuStorage::F32(grads)) => CpuStorage::F32(backward(
                contiguous(xs, xs_layout)?,
                contiguous(grads, grads_layout)?,
                dims,
            )),
            (CpuStorage::F64(xs), CpuStorage::F64(grads)) => CpuStorage::F64(backward(
                contiguous(xs, xs_layout)?,
                contiguous(grads, grads_layout)?,
                dims,
            )),
            (xs, grads) => bail!(
                "max-pool-2x2-backward: unsupported dtypes {:?} and {:?}",
                xs.dtype(),
                grads.dtype()
            ),
        };
        Ok((storage, xs_layout.shape().clone()))
    }
}

fn contiguous<'a, T>(values: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op: "max-pool-2x2" }),
    }
}

/// The window's maximum. A NaN beats every number, so that it propagates as it does through
/// PyTorch's pool. Written as selects rather than branches, which on random data the CPU
/// mispredicts half the time, and which keep the loops that call it vectorisable.
#[inline(always)]
fn window_max<T: WithDType>([a, b, c, d]: [T; 4]) -> T {
    let pick = |best: T, x: T| if x > best || is_nan(x) { x } else { best };
    pick(pick(pick(a, b), c), d)
}

#[inline(always)]
fn is_nan<T: WithDType>(x: T) -> bool {
    x.partial_cmp(&x).is_none()
}

/// Planes per task: 16 tasks whatever the batch, enough to balance two threads. Each plane is
/// computed alone, so the split cannot change a value.
fn planes_per_task(dims: Dims) -> usize {
    (dims.0 * dims.1).div_ceil(16)
}

fn forward<T: WithDType>(xs: &[T], dims: Dims) -> Vec<T> {
    let (_, _, h, w) = dims;
    let (oh, ow) = (h / 2, w / 2);
    let planes = planes_per_task(dims);
    let len = dims.0 * dims.1 * oh * ow;
    if let Some(xs) = as_f32(xs) {
        let isa = Isa::current();
        let task = |i: usize, ys: &mut [MaybeUninit<f32>]| {
            let first = i * planes * h * w;
            let xs = &xs[first..first + ys.len() / (oh * ow).max(1) * h * w];
            forward_planes(isa, xs, h, w, ys);
        };
        // SAFETY: `forward_planes` writes every element; `T` is f32.
        return unsafe { cast_vec(collect_chunks(len, planes * oh * ow, xs.len(), task)) };
    }
    let task = |i: usize, ys: &mut [MaybeUninit<T>]| {
        for (plane, ys) in ys.chunks_mut(oh * ow).enumerate() {
            let xs = &xs[(i * planes + plane) * h * w..][..h * w];
            forward_plane(xs, w, ys);
        }
    };
    // SAFETY: the loops write every element of every row of every plane of the chunk.
    unsafe { collect_chunks(len, planes * oh * ow, xs.len(), task) }
}

/// One plane `(h, w)` to its pooled `(h / 2, w / 2)`: `ys` holds `oh * ow` elements.
#[inline(always)]
fn forward_plane<T: WithDType>(xs: &[T], w: usize, ys: &mut [MaybeUninit<T>]) {
    let ow = w / 2;
    if ow == 0 {
        return;
    }
    for (y, ys) in ys.chunks_mut(ow).enumerate() {
        // Slices of exactly the lengths the loop reads, so that it runs without bounds
        // checks.
        let top = &xs[2 * y * w..][..2 * ow];
        let bottom = &xs[(2 * y + 1) * w..][..2 * ow];
        for (x, out) in ys.iter_mut().enumerate() {
            let window = [top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]];
            out.write(window_max(window));
        }
    }
}

/// Pools consecutive planes of `h` by `w` f32 values in `xs` into `ys`
/// (`planes * (h / 2) * (w / 2)` elements), with `isa`'s instructions.
pub(super) fn forward_planes(
    isa: Isa,
    xs: &[f32],
    h: usize,
    w: usize,
    ys: &mut [MaybeUninit<f32>],
) {
    let (oh, ow) = (h / 2, w / 2);
    if oh * ow == 0 {
        return;
    }
    assert!(xs.len().is_multiple_of(h * w) && xs.len() / (h * w) * oh * ow == ys.len());
    for (xs, ys) in xs.chunks_exact(h * w).zip(ys.chunks_exact_mut(oh * ow)) {
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            for (y, ys) in ys.chunks_exact_mut(ow).enumerate() {
                let (top, bottom) = (xs[2 * y * w..].as_ptr(), xs[(2 * y + 1) * w..].as_ptr());
                let ys = ys.as_mut_ptr().cast::<f32>();
                // SAFETY: `isa` is supported; both rows hold `2 * ow` floats from these
                // pointers and `ys` holds `ow`.
                unsafe {
                    match isa {
                        Isa::Avx512 => x86::forward_row_avx512(top, bottom, ys, ow),
                        _ => x86::forward_row_avx2(top, bottom, ys, ow),
                    }
                }
            }
            continue;
        }
        let _ = isa;
        forward_plane(xs, w, ys);
    }
}

fn backward<T: WithDType>(xs: &[T], grads: &[T], dims: Dims) -> Vec<T> {
    let (_, _, h, w) = dims;
    let (oh, ow) = (h / 2, w / 2);
    let planes = planes_per_task(dims);
    if let (Some(xs), Some(grads)) = (as_f32(xs), as_f32(grads)) {
        let isa = Isa::current();
        let task = |i: usize, dxs: &mut [MaybeUninit<f32>]| {
            let (first, count) = (i * planes, dxs.len() / (h * w));
            let xs = &xs[first * h * w..(first + count) * h * w];
            let grads = &grads[first * oh * ow..(first + count) * oh * ow];
            backward_planes(isa, xs, grads, h, w, dxs);
        };
        // SAFETY: `backward_planes` writes every element; `T` is f32.
        return unsafe { cast_vec(collect_chunks(xs.len(), planes * h * w, xs.len(), task)) };
    }
    let task = |i: usize, dxs: &mut [MaybeUninit<T>]| {
        for (plane, dxs) in dxs.chunks_mut(h * w).enumerate() {
            let plane = i * planes + plane;
            let xs = &xs[plane * h * w..][..h * w];
            let grads = &grads[plane * oh * ow..][..oh * ow];
            backward_plane(xs, grads, h, w, dxs);
        }
    };
    // SAFETY: `backward_plane` writes every element of every plane.
    unsafe { collect_chunks(xs.len(), planes * h * w, xs.len(), task) }
}

/// One plane's input gradient `(h, w)` from its input and the gradient of its output: each
/// window's gradient goes to its first maximal element, every other element gets zero.
///
/// All four elements of a window are written, each a select: branching on the comparisons,
/// or zeroing the plane and storing one element per window, does not vectorise (the latter
/// took 0.8 ms for LeNet's first pool at batch 64 on one thread).
#[inline(always)]
fn backward_plane<T: WithDType>(
    xs: &[T],
    grads: &[T],
    h: usize,
    w: usize,
    dxs: &mut [MaybeUninit<T>],
) {
    let (oh, ow) = (h / 2, w / 2);
    let zero = T::zero();
    for y in 0..oh {
        let top = 2 * y * w;
        let xs_top = &xs[top..top + 2 * ow];
        let xs_bottom = &xs[top + w..top + w + 2 * ow];
        let grads = &grads[y * ow..(y + 1) * ow];
        let (d_top, rest) = dxs[top..top + 2 * w].split_at_mut(w);
        let (d_top, d_bottom) = (&mut d_top[..2 * ow], &mut rest[..2 * ow]);
        for x in 0..ow {
            let (a, b) = (xs_top[2 * x], xs_top[2 * x + 1]);
            let (c, d) = (xs_bottom[2 * x], xs_bottom[2 * x + 1]);
            let max = window_max([a, b, c, d]);
            let is_max = |v: T| v == max || is_nan(v);
            let to_a = is_max(a);
            let to_b = !to_a & is_max(b);
            let to_c = !to_a & !to_b & is_max(c);
            let to_d = !(to_a | to_b | to_c);
            let grad = grads[x];
            d_top[2 * x].write(if to_a { grad } else { zero });
            d_top[2 * x + 1].write(if to_b { grad } else { zero });
            d_bottom[2 * x].write(if to_c { grad } else { zero });
            d_bottom[2 * x + 1].write(if to_d { grad } else { zero });
        }
        // A column past the last full window takes part in no window.
        if w % 2 == 1 {
            dxs[top + w - 1].write(zero);
            dxs[top + 2 * w - 1].write(zero);
        }
    }
    // Nor does a row past the last full window.
    if h % 2 == 1 {
        dxs[(h - 1) * w..h * w].fill(MaybeUninit::new(zero));
    }
}

/// The input gradient of consecutive planes of `h` by `w` f32 values: `xs` the pool's input,
/// `grads` its output's gradient, `dxs` as long as `xs`, every element written.
pub(super) fn backward_planes(
    isa: Isa,
    xs: &[f32],
    grads: &[f32],
    h: usize,
    w: usize,
    dxs: &mut [MaybeUninit<f32>],
) {
    // Only x86-64 has copies for other instruction sets; elsewhere `isa` is the portable one.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let (oh, ow) = (h / 2, w / 2);
    assert!(xs.len() == dxs.len() && xs.len().is_multiple_of((h * w).max(1)));
    let planes = xs.len() / (h * w).max(1);
    assert_eq!(grads.len(), planes * oh * ow);
    for plane in 0..planes {
        let xs = &xs[plane * h * w..][..h * w];
        let grads = &grads[plane * oh * ow..][..oh * ow];
        let dxs = &mut dxs[plane * h * w..][..h * w];
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 && ow > 0 {
            for y in 0..oh {
                let top = 2 * y * w;
                let (xs_top, xs_bottom) = (xs[top..].as_ptr(), xs[top + w..].as_ptr());
                let grads = grads[y * ow..].as_ptr();
                let (d_top, d_bottom) = dxs[top..top + 2 * w].split_at_mut(w);
                let (d_top, d_bottom) = (d_top.as_mut_ptr().cast(), d_bottom.as_mut_ptr().cast());
                // SAFETY: `isa` is supported; the input and gradient rows hold `2 * ow`
                // floats from these pointers, the gradient row `ow`.
                unsafe {
                    match isa {
                        Isa::Avx512 => {
                            x86::backward_row_avx512(xs_top, xs_bottom, grads, d_top, d_bottom, ow)
                        }
                        _ => x86::backward_row_avx2(xs_top, xs_bottom, grads, d_top, d_bottom, ow),
                    }
                }
                // A column past the last full window takes part in no window.
                if w % 2 == 1 {
                    dxs[top + w - 1].write(0.0);
                    dxs[top + 2 * w - 1].write(0.0);
                }
            }
            if h % 2 == 1 {
                dxs[(h - 1) * w..h * w].fill(MaybeUninit::new(0.0));
            }
            continue;
        }
        backward_plane(xs, grads, h, w, dxs);
    }
}

/// Which element of its window each output came from, for the CPU engine: 0 top left, 1 top
/// right, 2 bottom left, 3 bottom right, the first maximal one in that order as
/// [`backward_plane`] chooses it. With the codes the backward pass needs neither the pool's
/// input nor, after a tanh, the tanh's output: the gradient reaches one element per window.
pub(super) type Code = u32;

/// [`forward_planes`] that also writes each window's [`Code`].
pub(super) fn forward_planes_with_codes(
    isa: Isa,
    xs: &[f32],
    h: usize,
    w: usize,
    ys: &mut [f32],
    codes: &mut [Code],
) {
    let (oh, ow) = (h / 2, w / 2);
    if oh * ow == 0 {
        return;
    }
    let planes = xs.len() / (h * w);
    assert!(xs.len() == planes * h * w && ys.len() == planes * oh * ow && codes.len() == ys.len());
    for plane in 0..planes {
        let xs = &xs[plane * h * w..][..h * w];
        for y in 0..oh {
            let (top, bottom) = (&xs[2 * y * w..][..2 * ow], &xs[(2 * y + 1) * w..][..2 * ow]);
            let at = (plane * oh + y) * ow;
            let (ys, codes) = (&mut ys[at..at + ow], &mut codes[at..at + ow]);
            #[cfg(target_arch = "x86_64")]
            if isa >= Isa::Avx2 {
                let (ys, codes) = (ys.as_mut_ptr(), codes.as_mut_ptr());
                // SAFETY: `isa` is supported; the rows hold `2 * ow` floats, `ys` and `codes`
                // `ow` elements.
                unsafe {
                    match isa {
                        Isa::Avx512 => x86::forward_row_codes_avx512(
                            top.as_ptr(),
                            bottom.as_ptr(),
                            ys,
                            codes,
                            ow,
                        ),
                        _ => x86::forward_row_codes_avx2(
                            top.as_ptr(),
                            bottom.as_ptr(),
                            ys,
                            codes,
                            ow,
                        ),
                    }
                }
                continue;
            }
            let _ = isa;
            for x in 0..ow {
                let (a, b, c, d) = (top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]);
                let max = window_max([a, b, c, d]);
                let is_max = |v: f32| v == max || v.is_nan();
                ys[x] = max;
                codes[x] = if is_max(a) {
                    0
                } else if is_max(b) {
                    1
                } else if is_max(c) {
                    2
                } else {
                    3
                };
            }
        }
    }
}

/// The input gradient of pooled planes from their [`Code`]s and the output gradient `grads`:
/// each window's gradient onto its coded element, zeros elsewhere. With `tanh_of`, the pool's
/// outputs after a tanh, each gradient is first multiplied by `1 - y^2` of its window's
/// output `y`: the tanh's backward pass too, which then needs no values but the pooled ones.
pub(super) fn backward_planes_from_codes(
    isa: Isa,
    codes: &[Code],
    grads: &[f32],
    tanh_of: Option<&[f32]>,
    h: usize,
    w: usize,
    dxs: &mut [f32],
) {
    let (oh, ow) = (h / 2, w / 2);
    let planes = dxs.len() / (h * w).max(1);
    assert!(dxs.len() == planes * h * w && codes.len() == planes * oh * ow);
    assert!(grads.len() == codes.len() && tanh_of.is_none_or(|ys| ys.len() == codes.len()));
    for plane in 0..planes {
        let dxs = &mut dxs[plane * h * w..][..h * w];
        for y in 0..oh {
            let at = (plane * oh + y) * ow;
            let (codes, grads) = (&codes[at..at + ow], &grads[at..at + ow]);
            let pooled = tanh_of.map(|ys| &ys[at..at + ow]);
            let (d_top, rest) = dxs[2 * y * w..(2 * y + 2) * w].split_at_mut(w);
            let (d_top, d_bottom) = (&mut d_top[..2 * ow], &mut rest[..2 * ow]);
            if !backward_row_codes_simd(isa, codes, grads, pooled, d_top, d_bottom) {
                backward_row_codes(codes, grads, pooled, d_top, d_bottom);
            }
            // A column past the last full window takes part in no window.
            if w % 2 == 1 {
                dxs[2 * y * w + w - 1] = 0.0;
                dxs[(2 * y + 2) * w - 1] = 0.0;
            }
        }
        if h % 2 == 1 {
            dxs[(h - 1) * w..].fill(0.0);
        }
    }
}

/// The row of [`backward_planes_from_codes`] with `isa`'s vector instructions, if it has
/// them: whether it did.
fn backward_row_codes_simd(
    isa: Isa,
    codes: &[Code],
    grads: &[f32],
    pooled: Option<&[f32]>,
    d_top: &mut [f32],
    d_bottom: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        let ow = codes.len();
        assert!(grads.len() == ow && pooled.is_none_or(|p| p.len() == ow));
        assert!(d_top.len() == 2 * ow && d_bottom.len() == 2 * ow);
        let pooled = pooled.map_or(std::ptr::null(), |p| p.as_ptr());
        let (c, g, t, b) = (
            codes.as_ptr(),
            grads.as_ptr(),
            d_top.as_mut_ptr(),
            d_bottom.as_mut_ptr(),
        );
        // SAFETY: `isa` is supported; the lengths are checked above.
        unsafe {
            match isa {
                Isa::Avx512 => x86::backward_row_codes_avx512(c, g, pooled, t, b, ow),
                _ => x86::backward_row_codes_avx2(c, g, pooled, t, b, ow),
            }
        }
        return true;
    }
    let _ = (isa, codes, grads, pooled, d_top, d_bottom);
    false
}

/// The portable row of [`backward_planes_from_codes`].
fn backward_row_codes(
    codes: &[Code],
    grads: &[f32],
    pooled: Option<&[f32]>,
    d_top: &mut [f32],
    d_bottom: &mut [f32],
) {
    for (x, (&code, &grad)) in codes.iter().zip(grads).enumerate() {
        let grad = match pooled {
            Some(ys) => grad * (1.0 - ys[x] * ys[x]),
            None => grad,
        };
        let on = |k: Code| if code == k { grad } else { 0.0 };
        d_top[2 * x] = on(0);
        d_top[2 * x + 1] = on(1);
        d_bottom[2 * x] = on(2);
        d_bottom[2 * x + 1] = on(3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::derive_rng;
    use candle_core::{Device, Var};
    use proptest::prelude::*;
    use rand_chacha::rand_core::RngCore;

    fn random(shape: Dims, stream: u64) -> Vec<f64> {
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

    fn check_against_finite_differences(shape: Dims) {
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

    /// Where a window holds tied maxima, only the first in row-major order gets the gradient.
    #[test]
    fn ties_send_the_gradient_to_the_first_maximum_only() {
        let (n, c, h, w) = (2, 3, 7, 9);
        // Three levels, so that most windows hold ties, some of them of all four elements.
        let values: Vec<f32> = random((n, c, h, w), 3)
            .iter()
            .map(|v| (v * 1.5).round() as f32)
            .collect();
        let xs = Var::from_vec(values.clone(), (n, c, h, w), &Device::Cpu).unwrap();
        let (oh, ow) = (h / 2, w / 2);
        let weights: Vec<f32> = (1..=n * c * oh * ow).map(|i| i as f32).collect();
        let weights = Tensor::from_vec(weights, (n, c, oh, ow), &Device::Cpu).unwrap();
        let grads = objective(&xs, &weights).unwrap().backward().unwrap();
        let grad = grads
            .get(&xs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let weights = weights.flatten_all().unwrap().to_vec1::<f32>().unwrap();

        let mut windows_with_ties = 0;
        for plane in 0..n * c {
            for y in 0..oh {
                for x in 0..ow {
                    let at = |i: usize, j: usize| (plane * h + 2 * y + i) * w + 2 * x + j;
                    let window = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
                    let max = window.iter().map(|&k| values[k]).fold(f32::MIN, f32::max);
                    let maximal = window.iter().filter(|&&k| values[k] == max).count();
                    windows_with_ties += usize::from(maximal > 1);
                    let first = *window.iter().find(|&&k| values[k] == max).unwrap();
                    let weight = weights[(plane * oh + y) * ow + x];
                    for k in window {
                        let expected = if k == first { weight } else { 0.0 };
                        assert_eq!(grad[k], expected, "plane {plane}, window ({y}, {x})");
                    }
                }
            }
        }
        assert!(windows_with_ties > 10, "only {windows_with_ties} ties");
        // Inputs past the last full row and column receive nothing.
        for plane in 0..n * c {
            for x in 0..w {
                assert_eq!(grad[(plane * h + h - 1) * w + x], 0.0);
            }
            for y in 0..h {
                assert_eq!(grad[(plane * h + y) * w + w - 1], 0.0);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Forward and backward give the same bits on every instruction set the CPU has as on
        /// the portable path, ties, signed zeros and NaNs included, odd sizes too.
        #[test]
        fn every_instruction_set_agrees_with_the_portable_one(
            planes in 1usize..=3, h in 1usize..=13, w in 1usize..=40, seed in 0u64..1000,
        ) {
            let values = random((1, planes, h, w), seed);
            // Coarse levels for ties; some signed zeros and NaNs.
            let xs: Vec<f32> = values.iter().enumerate().map(|(i, v)| match i % 17 {
                3 => -0.0,
                5 => 0.0,
                11 if seed % 2 == 0 => f32::NAN,
                _ => (v * 2.0).round() as f32,
            }).collect();
            let (oh, ow) = (h / 2, w / 2);
            let grads: Vec<f32> = (0..planes * oh * ow).map(|i| i as f32 + 1.0).collect();
            let bits = |v: &[MaybeUninit<f32>]| {
                // SAFETY: the kernels write every element.
                v.iter().map(|x| unsafe { x.assume_init() }.to_bits()).collect::<Vec<_>>()
            };
            let run = |isa: Isa| {
                let mut ys = vec![MaybeUninit::new(1.5f32); planes * oh * ow];
                let mut dxs = vec![MaybeUninit::new(1.5f32); xs.len()];
                forward_planes(isa, &xs, h, w, &mut ys);
                backward_planes(isa, &xs, &grads, h, w, &mut dxs);
                (bits(&ys), bits(&dxs))
            };
            let portable = run(Isa::Portable);
            prop_assert!(portable.1.iter().all(|&b| b != 1.5f32.to_bits()), "an element was not written");
            for isa in Isa::supported() {
                prop_assert_eq!(&run(isa), &portable, "{}", isa);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The engine's pool: forward with codes gives the plain forward's values, the backward
        /// pass from the codes gives the recomputing one's gradient (times `1 - y^2` with a
        /// tanh before), and every instruction set gives the portable bits.
        #[test]
        fn codes_give_what_recomputing_gives(
            planes in 1usize..=3, h in 1usize..=13, w in 1usize..=40, seed in 0u64..1000,
        ) {
            let values = random((1, planes, h, w), seed);
            let xs: Vec<f32> = values.iter().enumerate().map(|(i, v)| match i % 17 {
                3 => -0.0,
                5 => 0.0,
                11 if seed % 2 == 0 => f32::NAN,
                _ => (v * 2.0).round() as f32 * 0.25,
            }).collect();
            let (oh, ow) = (h / 2, w / 2);
            let grads: Vec<f32> = (0..planes * oh * ow).map(|i| i as f32 * 0.5 + 1.0).collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let init = |v: &[MaybeUninit<f32>]| {
                // SAFETY: the kernels write every element.
                v.iter().map(|x| unsafe { x.assume_init() }).collect::<Vec<f32>>()
            };
            let run = |isa: Isa| {
                let mut ys = vec![1.5f32; planes * oh * ow];
                let mut codes = vec![7; planes * oh * ow];
                forward_planes_with_codes(isa, &xs, h, w, &mut ys, &mut codes);
                let mut dxs = vec![1.5f32; xs.len()];
                backward_planes_from_codes(isa, &codes, &grads, None, h, w, &mut dxs);
                let mut tanh_dxs = vec![1.5f32; xs.len()];
                backward_planes_from_codes(isa, &codes, &grads, Some(&ys), h, w, &mut tanh_dxs);
                (bits(&ys), codes, bits(&dxs), bits(&tanh_dxs))
            };
            let portable = run(Isa::Portable);
            let mut plain_ys = vec![MaybeUninit::new(1.5f32); planes * oh * ow];
            forward_planes(Isa::Portable, &xs, h, w, &mut plain_ys);
            prop_assert_eq!(&portable.0, &bits(&init(&plain_ys)));
            let mut plain_dxs = vec![MaybeUninit::new(1.5f32); xs.len()];
            backward_planes(Isa::Portable, &xs, &grads, h, w, &mut plain_dxs);
            let plain_dxs = init(&plain_dxs);
            prop_assert_eq!(&portable.2, &bits(&plain_dxs));
            // With the tanh: where the gradient lands, times 1 - y^2 of the window's output.
            let ys: Vec<f32> = portable.0.iter().map(|&b| f32::from_bits(b)).collect();
            for (window, &code) in portable.1.iter().enumerate() {
                let (plane, y, x) = (window / (oh * ow), window % (oh * ow) / ow, window % ow);
                let at = plane * h * w + (2 * y + code as usize / 2) * w + 2 * x + code as usize % 2;
                let want = grads[window] * (1.0 - ys[window] * ys[window]);
                prop_assert_eq!(portable.3[at], want.to_bits());
                prop_assert_eq!(plain_dxs[at].to_bits(), grads[window].to_bits());
            }
            for isa in Isa::supported() {
                prop_assert_eq!(&run(isa), &portable, "{}", isa);
            }
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        if a.elem_count() == 0 {
            return 0.0;
        }
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// A shape, its elements' ranks in shuffled order (distinct values, so no window holds a
    /// tie and both forms must agree), and weights for the output.
    fn shape_values_weights() -> impl Strategy<Value = (Dims, Vec<usize>, Vec<f32>)> {
        (1usize..=4, 1usize..=5, 2usize..=13, 2usize..=13).prop_flat_map(|(n, c, h, w)| {
            let ranks: Vec<usize> = (0..n * c * h * w).collect();
            (
                Just((n, c, h, w)),
                Just(ranks).prop_shuffle(),
                proptest::collection::vec(-1f32..1., n * c * (h / 2) * (w / 2)),
            )
        })
    }

    proptest! {
        /// Without ties the custom op and the reshape form agree on values and gradients.
        #[test]
        fn matches_reduction_form((shape, ranks, weights) in shape_values_weights()) {
            let dev = Device::Cpu;
            let (n, c, h, w) = shape;
            let len = ranks.len() as f32;
            let values: Vec<f32> = ranks.iter().map(|&r| r as f32 / len * 2. - 1.).collect();
            let xs = Var::from_vec(values, shape, &dev).unwrap();
            let weights = Tensor::from_vec(weights, (n, c, h / 2, w / 2), &dev).unwrap();

            let ours = max_pool_2x2(&xs).unwrap();
            let reference = max_pool_2x2_by_reduction(&xs).unwrap();
            prop_assert_eq!(ours.dims(), reference.dims());
            prop_assert!(max_abs_diff(&ours, &reference) <= 1e-6);

            let ours = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let reference = (reference * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let (ours, reference) = (ours.get(&xs).unwrap(), reference.get(&xs).unwrap());
            prop_assert_eq!(ours.dims(), &[n, c, h, w]);
            prop_assert!(max_abs_diff(ours, reference) <= 1e-6);
        }
    }

    /// `cargo test --release -p common pool -- --ignored --nocapture`: forward and backward at
    /// LeNet's and the CNN's pool shapes (batch 64), reshape form against custom op, as the
    /// median and the fastest of 50 runs. Each run also takes a weighted sum of the output (so
    /// that the gradient reaching the pool is an ordinary tensor, as in a network) and
    /// accumulates the input's gradient; the "no pool" row is what that costs alone. Workers
    /// keep freed memory ([`crate::allocator::keep_freed_memory`]); to time as they run, set
    /// `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456`.
    ///
    /// Times are the CPU time of the test's thread, not wall time: on a shared 2-core machine
    /// wall times swing several-fold with other processes. Run it with `RAYON_NUM_THREADS=1`:
    /// on more threads the pool spreads over the rayon pool, whose threads this clock misses.
    #[test]
    #[ignore = "timing, not a check"]
    fn time_forward_and_backward() {
        type Pool = fn(&Tensor) -> Result<Tensor>;
        let forms: [(&str, Pool); 3] = [
            ("no pool", |xs| Ok(xs.clone())),
            ("reshape", max_pool_2x2_by_reduction),
            ("custom op", max_pool_2x2),
        ];
        let shapes = [
            (64, 20, 24, 24),
            (64, 50, 8, 8),
            (64, 32, 26, 26),
            (64, 64, 11, 11),
        ];
        for shape in shapes {
            let xs = Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap();
            let xs = Var::from_tensor(&xs).unwrap();
            for (name, pool) in forms {
                let out_shape = pool(&xs).unwrap().shape().clone();
                let weights = Tensor::randn(0f32, 1., out_shape, &Device::Cpu).unwrap();
                let step = || {
                    let ys = pool(&xs).unwrap();
                    (ys * &weights)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                };
                for _ in 0..5 {
                    step();
                }
                let mut ms: Vec<f64> = (0..50)
                    .map(|_| {
                        let start = thread_cpu_ms();
                        step();
                        thread_cpu_ms() - start
                    })
                    .collect();
                ms.sort_by(f64::total_cmp);
                println!(
                    "{shape:?} {name:>9}: {:.3} ms forward + backward (fastest {:.3} ms)",
                    ms[25], ms[0]
                );
            }
        }
    }

    /// At LeNet's first activation, large enough to be split over two threads, values and
    /// gradients are the same bits on one thread as on two.
    #[test]
    fn bit_identical_across_thread_counts() {
        super::super::parallel::assert_same_bits_on_1_and_2_threads(
            &[64, 20, 24, 24],
            max_pool_2x2,
        );
    }

    fn thread_cpu_ms() -> f64 {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to fill in.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
        now.tv_sec as f64 * 1e3 + now.tv_nsec as f64 * 1e-6
    }
}
