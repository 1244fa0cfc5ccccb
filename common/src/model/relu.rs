use super::parallel::{as_f32, cast_vec, map_ranges};
use crate::simd::{Isa, multiversion};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, bail,
};
use std::mem::MaybeUninit;
use std::ops::Range;

/// `max(x, 0)` element by element, with candle's gradient: the output's gradient where
/// `x >= 0`, zero elsewhere (and where `x` is NaN).
///
/// On the CPU, in `f32` and `f64`, it runs as a custom op whose backward pass is one pass over
/// memory, spread over the rayon pool for large tensors: candle's backward takes five (zeros,
/// comparison, conversion, product, sum) on one thread. Other devices and dtypes use candle's
/// `relu`.
pub fn relu(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) {
        xs.contiguous()?.apply_op1(Relu)
    } else {
        xs.relu()
    }
}

/// `max(x, 0)` of every element of a contiguous tensor.
struct Relu;

/// `(output gradient, x)` to the input gradient of [`Relu`].
struct ReluGrad;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let storage = match storage {
            CpuStorage::F32(xs) => CpuStorage::F32(forward(contiguous(xs, layout)?)),
            CpuStorage::F64(xs) => CpuStorage::F64(forward(contiguous(xs, layout)?)),
            other => bail!("relu: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res.contiguous()?.apply_op2_no_bwd(arg, &ReluGrad)?,
        ))
    }
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(
        &self,
        grads: &CpuStorage,
        grads_layout: &Layout,
        xs: &CpuStorage,
        xs_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if grads_layout.shape() != xs_layout.shape() {
            bail!(
                "relu-grad: gradient {:?} and input {:?} differ in shape",
                grads_layout.shape(),
                xs_layout.shape()
            );
        }
        let storage = match (grads, xs) {
            (CpuStorage::F32(grads), CpuStorage::F32(xs)) => CpuStorage::F32(backward(
                contiguous(grads, grads_layout)?,
                contiguous(xs, xs_layout)?,
            )),
            (CpuStorage::F64(grads), CpuStorage::F64(xs)) => CpuStorage::F64(backward(
                contiguous(grads, grads_layout)?,
                contiguous(xs, xs_layout)?,
            )),
            (grads, xs) => bail!(
                "relu-grad: unsupported dtypes {:?} and {:?}",
                grads.dtype(),
                xs.dtype()
            ),
        };
        Ok((storage, grads_layout.shape().clone()))
    }
}

fn contiguous<'a, T>(values: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op: "relu" }),
    }
}

multiversion! {
    /// `max(x, 0)` of every element of `xs` into `ys`, of the same length.
    pub(super) fn relu_into(xs: &[f32], ys: &mut [MaybeUninit<f32>]) {
        assert_eq!(xs.len(), ys.len());
        for (y, &x) in ys.iter_mut().zip(xs) {
            // A select, not a branch, so that the loop vectorises.
            y.write(if x >= 0.0 { x } else { 0.0 });
        }
    }
}

multiversion! {
    /// The input gradient: `grad` where `x >= 0`, zero elsewhere.
    pub(super) fn relu_grad_into(grads: &[f32], xs: &[f32], dxs: &mut [MaybeUninit<f32>]) {
        assert!(grads.len() == dxs.len() && xs.len() == dxs.len());
        for ((dx, &grad), &x) in dxs.iter_mut().zip(grads).zip(xs) {
            dx.write(if x >= 0.0 { grad } else { 0.0 });
        }
    }
}

fn forward<T: WithDType>(xs: &[T]) -> Vec<T> {
    if let Some(xs) = as_f32(xs) {
        let isa = Isa::current();
        let write =
            |range: Range<usize>, ys: &mut [MaybeUninit<f32>]| relu_into(isa, &xs[range], ys);
        // SAFETY: `relu_into` writes every element; `T` is f32.
        return unsafe { cast_vec(map_ranges(xs.len(), write)) };
    }
    let write = |range: Range<usize>, ys: &mut [MaybeUninit<T>]| {
        for (y, &x) in ys.iter_mut().zip(&xs[range]) {
            // A select, not a branch, so that the loop vectorises.
            y.write(if x >= T::zero() { x } else { T::zero() });
        }
    };
    // SAFETY: the ranges are as long as their chunks, so `write` writes every element.
    unsafe { map_ranges(xs.len(), write) }
}

fn backward<T: WithDType>(grads: &[T], xs: &[T]) -> Vec<T> {
    if let (Some(grads), Some(xs)) = (as_f32(grads), as_f32(xs)) {
        let isa = Isa::current();
        let write = |range: Range<usize>, dxs: &mut [MaybeUninit<f32>]| {
            relu_grad_into(isa, &grads[range.clone()], &xs[range], dxs)
        };
        // SAFETY: `relu_grad_into` writes every element; `T` is f32.
        return unsafe { cast_vec(map_ranges(grads.len(), write)) };
    }
    let write = |range: Range<usize>, dxs: &mut [MaybeUninit<T>]| {
        for ((dx, &grad), &x) in dxs.iter_mut().zip(&grads[range.clone()]).zip(&xs[range]) {
            dx.write(if x >= T::zero() { grad } else { T::zero() });
        }
    };
    // SAFETY: as in `forward`.
    unsafe { map_ranges(grads.len(), write) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    fn values_and_probe() -> impl Strategy<Value = (Vec<f64>, Vec<f64>)> {
        (1usize..200).prop_flat_map(|len| {
            let value = prop_oneof![
                8 => -10f64..10.,
                1 => prop::sample::select(vec![0., -0., f64::NAN, f64::INFINITY, f64::NEG_INFINITY]),
            ];
            (
                prop::collection::vec(value, len),
                prop::collection::vec(-1f64..1., len),
            )
        })
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            // NaN and the sign of zero aside, values must agree exactly.
            .map(|v| {
                if v.is_nan() {
                    u64::MAX
                } else {
                    (v + 0.0).to_bits()
                }
            })
            .collect()
    }

    proptest! {
        /// Values and gradients equal candle's, in f32 and f64.
        #[test]
        fn matches_candle((values, probe) in values_and_probe(), f64_ in any::<bool>()) {
            let dtype = if f64_ { DType::F64 } else { DType::F32 };
            let dev = Device::Cpu;
            let len = values.len();
            let xs = Var::from_tensor(&Tensor::from_vec(values, len, &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let probe = Tensor::from_vec(probe, len, &dev).unwrap().to_dtype(dtype).unwrap();
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
                let ys = f(&xs).unwrap();
                let grads = (&ys * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (bits(&ys), bits(grads.get(&xs).unwrap()))
            };
            let (ours, reference) = (run(&|xs| relu(xs)), run(&|xs| xs.relu()));
            prop_assert_eq!(ours.0, reference.0, "values");
            prop_assert_eq!(ours.1, reference.1, "gradients");
        }
    }

    proptest! {
        /// Every instruction set the CPU has gives the portable path's bits.
        #[test]
        fn every_instruction_set_agrees_with_the_portable_one((values, probe) in values_and_probe()) {
            let xs: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            let probe: Vec<f32> = probe.iter().map(|&v| v as f32).collect();
            let run = |isa: Isa| {
                let mut ys = vec![MaybeUninit::new(f32::NAN); xs.len()];
                let mut dxs = vec![MaybeUninit::new(f32::NAN); xs.len()];
                relu_into(isa, &xs, &mut ys);
                relu_grad_into(isa, &probe, &xs, &mut dxs);
                // SAFETY: both kernels write every element.
                let bits = |v: &[MaybeUninit<f32>]| v.iter().map(|x| unsafe { x.assume_init() }.to_bits()).collect::<Vec<_>>();
                (bits(&ys), bits(&dxs))
            };
            let portable = run(Isa::Portable);
            for isa in Isa::supported() {
                prop_assert_eq!(&run(isa), &portable, "{}", isa);
            }
        }
    }

    /// Large enough to be split over two threads: the same bits as on one.
    #[test]
    fn bit_identical_across_thread_counts() {
        super::super::parallel::assert_same_bits_on_1_and_2_threads(&[64, 32, 26, 26], relu);
    }
}
