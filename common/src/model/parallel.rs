//! Spreading the CPU kernels of this module over the current rayon pool without letting the
//! thread count reach the result.
//!
//! Every split here is of the output into pieces whose boundaries depend only on the shapes,
//! and each piece is computed by one call whatever thread runs it; reductions across pieces
//! happen afterwards in piece order. So 1 and 2 threads, or a rerun, give the same bits, which
//! resuming from a checkpoint and workers with different core counts rely on. The pool is
//! rayon's current one: the global pool, sized by `RAYON_NUM_THREADS` as candle's matrix
//! products are, or one a caller `install`s.

use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Below this many output elements (or their equivalent in work) a kernel stays on the calling
/// thread: handing work to the pool and waiting for it costs tens of microseconds, which is
/// what a pass over 32K floats costs.
pub(super) const MIN_PARALLEL_WORK: usize = 32 * 1024;

/// Whether work of about `work` elements' worth should be handed to the pool.
pub(super) fn worth_splitting(work: usize) -> bool {
    work >= MIN_PARALLEL_WORK && rayon::current_num_threads() > 1
}

/// Below this many multiply-adds a matrix product stays on the calling thread: a product of
/// a million multiply-adds takes about 10 microseconds on one AVX-512 core, what handing
/// pieces to the pool and waiting for them costs.
pub(super) const MIN_PARALLEL_PRODUCT: usize = 1 << 20;

/// Whether products of `multiply_adds` in all should be handed to the pool in pieces.
pub(super) fn worth_splitting_product(multiply_adds: usize) -> bool {
    multiply_adds >= MIN_PARALLEL_PRODUCT && rayon::current_num_threads() > 1
}

/// Runs `f` on a thread of the current pool, when it has more than one: a caller outside the
/// pool then sleeps until `f` is done, instead of running the serial parts of a step beside a
/// pool thread that spins while it waits for the next parallel part (three busy threads on
/// two cores).
pub(super) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || rayon::current_num_threads() == 1 {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Calls `f(index, item)` for every item, in parallel when `work` (the whole job's, in
/// element-equivalents) is worth splitting.
pub(super) fn for_each_task<I: Send>(
    items: Vec<I>,
    work: usize,
    f: impl Fn(usize, I) + Sync + Send,
) {
    for_each_piece(items, worth_splitting(work), f)
}

/// Calls `f(index, item)` for every item, on the pool when `parallel`.
///
/// On rayon's pool rather than candle's barrier pool (which its elementwise ops use): the
/// barrier pool waits by spinning, and on a 2-core machine shared with other processes that
/// made LeNet at 2 threads half as fast as on rayon (600 against 1,200 images/s).
pub(super) fn for_each_piece<I: Send>(
    items: Vec<I>,
    parallel: bool,
    f: impl Fn(usize, I) + Sync + Send,
) {
    if !parallel {
        items
            .into_iter()
            .enumerate()
            .for_each(|(i, item)| f(i, item));
    } else {
        items
            .into_par_iter()
            .enumerate()
            .for_each(|(i, item)| f(i, item));
    }
}

/// Calls `f(index, chunk)` for the consecutive chunks of `chunk_len` elements of `out` (the last
/// one shorter if need be), in parallel when `work` (the whole job's, in element-equivalents)
/// is worth splitting.
pub(super) fn for_each_chunk<T: Send>(
    out: &mut [T],
    chunk_len: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    for_each_task(out.chunks_mut(chunk_len.max(1)).collect(), work, f);
}

/// A vector of `len` elements written by `f(index, chunk)` through [`for_each_chunk`]: skips
/// zeroing memory that is about to be overwritten, a pass over megabytes for an activation.
///
/// # Safety
///
/// `f` must initialise every element of every chunk it is given.
pub(super) unsafe fn collect_chunks<T: Send + Copy>(
    len: usize,
    chunk_len: usize,
    work: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    for_each_chunk(&mut out.spare_capacity_mut()[..len], chunk_len, work, f);
    // SAFETY: the chunks cover `len` elements, and the caller promises that `f` writes them.
    unsafe { out.set_len(len) };
    out
}

/// A vector of `len` elements filled by `f(range, chunk)`, where `chunk` is to hold elements
/// `range`, in fixed chunks spread over the pool when `len` is large: the parallel form of an
/// elementwise map, whose `f` is a loop (compiled for AVX, say) over its inputs' `range`.
///
/// # Safety
///
/// `f` must initialise every element of every chunk it is given.
pub(super) unsafe fn map_ranges<U: Copy + Send>(
    len: usize,
    f: impl Fn(Range<usize>, &mut [MaybeUninit<U>]) + Sync + Send,
) -> Vec<U> {
    let chunk = |i: usize, ys: &mut [MaybeUninit<U>]| {
        let start = i * MAP_CHUNK;
        f(start..start + ys.len(), ys)
    };
    // SAFETY: passed on to the caller.
    unsafe { collect_chunks(len, MAP_CHUNK, len, chunk) }
}

/// The pieces of an elementwise map: small enough to balance two threads on LeNet's smallest
/// parallel activation, large enough that each is worth a task.
const MAP_CHUNK: usize = 16 * 1024;

/// `values` as f32, when `T` is f32: the kernels generic over f32 and f64 take their f32
/// paths, compiled per instruction set, through this.
pub(super) fn as_f32<T: 'static>(values: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: `T` is f32.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), values.len()) }
    })
}

/// `values` as f32, when `T` is f32.
pub(super) fn as_f32_mut<T: 'static>(values: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: `T` is f32.
        unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast(), values.len()) }
    })
}

/// A vector of f32 as a vector of `T`.
///
/// # Safety
///
/// `T` must be f32.
pub(super) unsafe fn cast_vec<T: 'static>(values: Vec<f32>) -> Vec<T> {
    assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<f32>());
    let mut values = std::mem::ManuallyDrop::new(values);
    // SAFETY: `T` is f32, so pointer, length and capacity describe the same allocation.
    unsafe { Vec::from_raw_parts(values.as_mut_ptr().cast(), values.len(), values.capacity()) }
}

/// Initialised floats seen as possibly uninitialised, for kernels that write `MaybeUninit`
/// outputs (they only ever write initialised values).
pub(super) fn as_uninit(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; the kernels store only initialised values through it.
    unsafe { &mut *(values as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// For the kernels' tests: runs `op` on a random `f32` input of `shape` and its backward
/// pass against a random probe, in a rayon pool of 1 and of 2 threads, and asserts that the
/// values and the input gradient are the same bits and that the input is large enough to be
/// split at 2 threads (so the test means something).
#[cfg(test)]
pub(super) fn assert_same_bits_on_1_and_2_threads(
    shape: &[usize],
    op: impl Fn(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> + Sync,
) {
    use candle_core::{Device, Tensor, Var};
    let xs = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()).unwrap();
    let probe = Tensor::randn(0f32, 1., op(&xs).unwrap().shape(), &Device::Cpu).unwrap();
    let bits = |t: &Tensor| {
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            assert_eq!(worth_splitting(xs.elem_count()), threads > 1);
            let ys = op(&xs).unwrap();
            let grads = (&ys * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (bits(&ys), bits(grads.get(&xs).unwrap()))
        })
    };
    let one = run(1);
    assert!(one.1.iter().any(|&b| b != 0), "the gradient is all zeros");
    assert_eq!(one, run(2));
}
