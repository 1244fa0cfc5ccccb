use super::parallel::map_ranges;
use crate::simd::{Isa, multiversion};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};
use std::mem::MaybeUninit;
use std::ops::Range;

/// The hyperbolic tangent, element by element, with candle's gradient `1 - tanh(x)^2`.
///
/// On the CPU in f32 it runs as a rational approximation that the compiler vectorises, within
/// 4.2e-7 of the exact value everywhere: candle's own `tanh` calls libm's `tanhf` one element
/// at a time, which made it a quarter of a LeNet step. The backward pass computes
/// `grad * (1 - y^2)` from the saved output in one pass over memory where candle takes three.
/// Other devices and dtypes use candle's `tanh`.
pub fn tanh(xs: &Tensor) -> Result<Tensor> {
    if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
        return xs.tanh();
    }
    xs.contiguous()?.apply_op1(Tanh)
}

/// `tanh` of every element of a contiguous f32 tensor.
struct Tanh;

/// `grad * (1 - y^2)` from the gradient and the forward output `y` of [`Tanh`].
struct TanhGrad;

impl CustomOp1 for Tanh {
    fn name(&self) -> &'static str {
        "fast-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(xs) = storage else {
            bail!("fast-tanh: unsupported dtype {:?}", storage.dtype());
        };
        let xs = contiguous(xs, layout, "fast-tanh")?;
        let isa = Isa::current();
        // SAFETY: `tanh_into` writes every element of its output.
        let ys = unsafe { map_ranges(xs.len(), |range, ys| tanh_into(isa, &xs[range], ys)) };
        Ok((CpuStorage::F32(ys), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if grad_res.dtype() != DType::F32 {
            return Ok(Some((grad_res * res.sqr()?.affine(-1., 1.)?)?));
        }
        Ok(Some(
            grad_res
                .contiguous()?
                .apply_op2_no_bwd(&res.contiguous()?, &TanhGrad)?,
        ))
    }
}

impl CustomOp2 for TanhGrad {
    fn name(&self) -> &'static str {
        "fast-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        ys: &CpuStorage,
        ys_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(grad), CpuStorage::F32(ys)) = (grad, ys) else {
            bail!("fast-tanh-grad: unsupported dtype {:?}", grad.dtype());
        };
        if grad_layout.shape() != ys_layout.shape() {
            bail!(
                "fast-tanh-grad: gradient {:?} and output {:?} differ in shape",
                grad_layout.shape(),
                ys_layout.shape()
            );
        }
        let grad = contiguous(grad, grad_layout, "fast-tanh-grad")?;
        let ys = contiguous(ys, ys_layout, "fast-tanh-grad")?;
        let isa = Isa::current();
        let write = |range: Range<usize>, dxs: &mut [MaybeUninit<f32>]| {
            tanh_grad_into(isa, &grad[range.clone()], &ys[range], dxs)
        };
        // SAFETY: the ranges are as long as their chunks, so `write` writes every element.
        let dxs = unsafe { map_ranges(grad.len(), write) };
        Ok((CpuStorage::F32(dxs), grad_layout.shape().clone()))
    }
}

fn contiguous<'a>(values: &'a [f32], layout: &Layout, op: &'static str) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

multiversion! {
    /// `tanh` of every element of `xs` into `ys`, of the same length. Every instruction set
    /// runs the same operations in the same order (see [`crate::simd`]), so all of them give
    /// the same bits and ranks on different CPUs compute the same values.
    pub(super) fn tanh_into(xs: &[f32], ys: &mut [MaybeUninit<f32>]) {
        assert_eq!(xs.len(), ys.len());
        for (y, &x) in ys.iter_mut().zip(xs) {
            y.write(tanh_f32(x));
        }
    }
}

multiversion! {
    /// The input gradient `grad * (1 - y^2)` from the output gradient and the output `y`.
    pub(super) fn tanh_grad_into(grad: &[f32], ys: &[f32], dxs: &mut [MaybeUninit<f32>]) {
        assert!(grad.len() == dxs.len() && ys.len() == dxs.len());
        for ((dx, &g), &y) in dxs.iter_mut().zip(grad).zip(ys) {
            dx.write(g * (1.0 - y * y));
        }
    }
}

/// Below this magnitude `tanh(x)` is `x` to within `x^3 / 3`, a relative 5.3e-8 (less than an
/// ulp), so `x` itself is returned. The polynomials would lose subnormal inputs to underflow.
const TINY: f32 = 0.0004;

/// The smallest input at which the approximation reaches exactly 1, as in Eigen. Between here
/// and 9 it would overshoot to the float above 1; clamping also keeps ±inf off the path to NaN.
const CLAMP: f32 = 7.905_311;

/// The coefficients of Eigen's `ptanh_float` (also in PyTorch and ONNX Runtime), lowest
/// power last: a minimax fit of tanh on [-9, 9] by a degree-13 odd over a degree-6 even
/// polynomial.
const NUMERATOR: [f32; 7] = [
    -2.76076847742355e-16_f64 as f32,
    2.00018790482477e-13_f64 as f32,
    -8.60467152213735e-11_f64 as f32,
    5.12229709037114e-08_f64 as f32,
    1.48572235717979e-05_f64 as f32,
    6.37261928875436e-04_f64 as f32,
    4.89352455891786e-03_f64 as f32,
];
const DENOMINATOR: [f32; 4] = [
    1.19825839466702e-06_f64 as f32,
    1.18534705686654e-04_f64 as f32,
    2.26843463243900e-03_f64 as f32,
    4.89352518554385e-03_f64 as f32,
];

/// tanh as the ratio of the two polynomials, in Horner form. No branches and no libm call, so a
/// loop of it vectorises. NaN stays NaN: `clamp` passes it through and so does the arithmetic.
#[inline(always)]
pub(super) fn tanh_f32(x: f32) -> f32 {
    let c = x.clamp(-CLAMP, CLAMP);
    let c2 = c * c;
    let p = NUMERATOR[1..].iter().fold(NUMERATOR[0], |p, &a| p * c2 + a) * c;
    let q = DENOMINATOR[1..]
        .iter()
        .fold(DENOMINATOR[0], |q, &b| q * c2 + b);
    if x.abs() < TINY { x } else { p / q }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    /// Values anywhere a pre-activation can be, weighted towards the edges: zeros, numbers
    /// too small to matter, the saturated tails, infinities and NaN.
    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => -12f32..12.,
            1 => -1e-3f32..1e-3,
            1 => prop::num::f32::ANY,
            1 => prop::sample::select(vec![
                0.,
                -0.,
                f32::MIN_POSITIVE,
                -1e-40,
                TINY,
                -TINY,
                CLAMP,
                -CLAMP,
                f32::MAX,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
            ]),
        ]
    }

    /// A tensor of 1 to 4 dimensions, and a probe of its shape to weigh the output by, so that
    /// every element receives a different gradient. The probe stays within ±1: the gradient
    /// `1 - y^2` inherits twice the error of `y` (up to 4.1e-7 here, 0.6e-7 in libm), and a
    /// larger weight would scale that past the tolerance.
    fn tensors() -> impl Strategy<Value = (Vec<usize>, Vec<f32>, Vec<f32>)> {
        prop::collection::vec(1usize..7, 1..5).prop_flat_map(|dims| {
            let len: usize = dims.iter().product();
            (
                Just(dims),
                prop::collection::vec(value(), len),
                prop::collection::vec(-1f32..1., len),
            )
        })
    }

    fn close(ours: f32, reference: f32) -> bool {
        (ours.is_nan() && reference.is_nan())
            || (ours - reference).abs() <= 1e-6 + 1e-5 * reference.abs()
    }

    fn assert_close(
        ours: &Tensor,
        reference: &Tensor,
        what: &str,
    ) -> std::result::Result<(), TestCaseError> {
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let reference = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (&a, &b)) in ours.iter().zip(&reference).enumerate() {
            prop_assert!(close(a, b), "{what}[{i}]: ours {a}, candle {b}");
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn values_and_gradients_match_candle((dims, values, probe) in tensors(), transpose in any::<bool>()) {
            let dev = Device::Cpu;
            let xs = Var::from_vec(values, dims.as_slice(), &dev).unwrap();
            let probe = Tensor::from_vec(probe, dims.as_slice(), &dev).unwrap();
            // A transposed view exercises the copy to contiguous memory and its backward pass.
            let (input, probe) = if transpose && dims.len() > 1 {
                let last = dims.len() - 1;
                (xs.transpose(0, last).unwrap(), probe.transpose(0, last).unwrap())
            } else {
                (xs.as_tensor().clone(), probe)
            };
            let ours = tanh(&input).unwrap();
            let reference = input.tanh().unwrap();
            assert_close(&ours, &reference, "tanh")?;
            let grad = |ys: &Tensor| {
                let grads = (ys * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                grads.get(&xs).unwrap().clone()
            };
            assert_close(&grad(&ours), &grad(&reference), "gradient")?;
        }

        #[test]
        fn is_odd_and_within_one(x in prop::num::f32::ANY.prop_filter("a number", |x| !x.is_nan())) {
            let y = tanh_f32(x);
            prop_assert_eq!(y.to_bits() ^ tanh_f32(-x).to_bits(), (-0f32).to_bits(), "tanh({}) = {}", x, y);
            prop_assert!(y.abs() <= 1.0, "tanh({}) = {}", x, y);
        }
    }

    /// Every 61st float between 0 and past the clamp against f64 `tanh`; with oddness, this
    /// covers the whole line. (An exhaustive sweep of all floats gave the same maximum.)
    #[test]
    fn error_is_below_half_a_millionth() {
        let end = 10f32.to_bits();
        let mut worst = (0f32, 0f64);
        for bits in (0..end).step_by(61).chain([end]) {
            let x = f32::from_bits(bits);
            let error = (tanh_f32(x) as f64 - (x as f64).tanh()).abs();
            if error > worst.1 {
                worst = (x, error);
            }
        }
        assert!(worst.1 < 5e-7, "error {} at {}", worst.1, worst.0);
    }

    /// Every instruction set the CPU has gives the portable path's bits, forward and backward.
    #[test]
    fn every_instruction_set_agrees_with_the_portable_one_to_the_bit() {
        // Odd lengths reach the scalar tail after the vector loop; the edges (tiny values, the
        // clamp, infinities, NaN) are in too.
        let mut xs: Vec<f32> = (0..10_007).map(|i| (i as f32 - 5_000.) * 2.1e-3).collect();
        xs.extend([
            0.,
            -0.,
            1e-40,
            TINY,
            -CLAMP,
            9.,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        let probe: Vec<f32> = (0..xs.len()).map(|i| (i as f32 * 0.7).sin()).collect();
        let bits = |ys: &[MaybeUninit<f32>]| {
            // SAFETY: the kernels wrote every element.
            ys.iter()
                .map(|y| unsafe { y.assume_init() }.to_bits())
                .collect::<Vec<_>>()
        };
        let run = |isa: Isa| {
            let mut ys = vec![MaybeUninit::new(f32::NAN); xs.len()];
            tanh_into(isa, &xs, &mut ys);
            let values = bits(&ys);
            let ys: Vec<f32> = values.iter().map(|&b| f32::from_bits(b)).collect();
            let mut dxs = vec![MaybeUninit::new(f32::NAN); xs.len()];
            tanh_grad_into(isa, &probe, &ys, &mut dxs);
            (values, bits(&dxs))
        };
        let portable = run(Isa::Portable);
        for isa in Isa::supported() {
            assert_eq!(run(isa), portable, "{isa}");
        }
    }

    #[test]
    fn other_dtypes_use_candle() {
        let xs = Tensor::new(&[-3f64, -0.5, 0., 1e-9, 2.], &Device::Cpu).unwrap();
        assert_eq!(
            tanh(&xs).unwrap().to_vec1::<f64>().unwrap(),
            xs.tanh().unwrap().to_vec1::<f64>().unwrap()
        );
    }

    /// At LeNet's first activation, large enough to be split over two threads, values and
    /// gradients are the same bits on one thread as on two.
    #[test]
    fn bit_identical_across_thread_counts() {
        super::super::parallel::assert_same_bits_on_1_and_2_threads(&[64, 20, 24, 24], tanh);
    }

    fn median_time(mut f: impl FnMut()) -> Duration {
        f();
        let mut times: Vec<Duration> = (0..21)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    }

    /// `cargo test --release -p common tanh -- --ignored --nocapture`, best with
    /// `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456` set as workers set
    /// them ([`crate::allocator::keep_freed_memory`]), or page faults on fresh buffers dominate
    /// the backward pass: milliseconds per call on
    /// LeNet's activations at batch 64, candle's `tanh` against this one. The backward pass is
    /// driven through `sum(tanh(x) * probe)`, whose own cost both sides share; it is printed too.
    #[test]
    #[ignore]
    fn timing() {
        let dev = Device::Cpu;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for dims in [&[64, 20, 24, 24][..], &[64, 50, 8, 8], &[64, 500]] {
            let xs = Var::from_tensor(&Tensor::randn(0f32, 2., dims, &dev).unwrap()).unwrap();
            let probe = Tensor::randn(0f32, 1., dims, &dev).unwrap();
            let forward = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
                median_time(|| {
                    f(&xs).unwrap();
                })
            };
            let both = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
                median_time(|| {
                    (f(&xs).unwrap() * &probe)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                })
            };
            let ys = tanh(&xs).unwrap();
            let gradient_old = median_time(|| {
                (&probe * (ys.sqr().unwrap() - 1.).unwrap()).unwrap();
            });
            let gradient_new = median_time(|| {
                probe.apply_op2_no_bwd(&ys, &TanhGrad).unwrap();
            });
            println!(
                "gradient alone {:.3} -> {:.3} ms",
                ms(gradient_old),
                ms(gradient_new)
            );
            let none: &dyn Fn(&Tensor) -> Result<Tensor> = &|xs| Ok(xs.clone());
            let old: &dyn Fn(&Tensor) -> Result<Tensor> = &|xs| xs.tanh();
            let new: &dyn Fn(&Tensor) -> Result<Tensor> = &|xs| tanh(xs);
            println!(
                "{dims:?}: forward {:.3} -> {:.3} ms, forward+backward {:.3} -> {:.3} ms \
                 ({:.3} ms of it the probe's)",
                ms(forward(old)),
                ms(forward(new)),
                ms(both(old)),
                ms(both(new)),
                ms(both(none)),
            );
        }
    }
}
