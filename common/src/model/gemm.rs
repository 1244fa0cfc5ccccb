//! Matrix products through the `gemm` crate on the calling thread, for the kernels of this
//! module; their parallelism is outside, over images or over fixed pieces of the output.

use candle_core::WithDType;

/// A matrix operand: its elements and its (row, column) strides, so that a transposed view is
/// only other strides.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a, T> {
    pub values: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Operand<'a, T> {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn rows(values: &'a [T], row_stride: usize) -> Self {
        Operand {
            values,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `row_stride` apart.
    pub fn transposed(values: &'a [T], row_stride: usize) -> Self {
        Operand {
            values,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    /// Whether an `r`-by-`c` matrix read through this view stays inside `values`.
    fn fits(&self, r: usize, c: usize) -> bool {
        self.values.len() > (r - 1) * self.row_stride + (c - 1) * self.col_stride
    }
}

/// `dst (m, n) = [dst +] lhs (m, k) · rhs (k, n)`, where `dst` is row-major with rows
/// `dst_stride` apart.
pub(super) fn matmul<T: WithDType>(
    dst: &mut [T],
    dst_stride: usize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst_stride && dst.len() >= (m - 1) * dst_stride + n);
    // SAFETY: the assertion keeps every write inside `dst`, which nothing else borrows.
    unsafe {
        matmul_raw(
            dst.as_mut_ptr(),
            dst_stride,
            accumulate,
            (m, n, k),
            lhs,
            rhs,
        )
    }
}

/// [`matmul`] into memory given by a pointer, so that threads can write disjoint columns of one
/// matrix.
///
/// # Safety
///
/// `dst` must be valid for reads and writes of an `m`-by-`n` row-major matrix with rows
/// `dst_stride` apart, and no other thread may access those elements during the call.
pub(super) unsafe fn matmul_raw<T: WithDType>(
    dst: *mut T,
    dst_stride: usize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                for col in 0..n {
                    // SAFETY: inside the matrix the caller vouches for.
                    unsafe { *dst.add(row * dst_stride + col) = T::zero() };
                }
            }
        }
        return;
    }
    // The last element each operand is read at, checked so that gemm stays in bounds.
    assert!(lhs.fits(m, k) && rhs.fits(k, n));
    // SAFETY: the operands were checked above and `dst` is the caller's promise; `T` is f32 or
    // f64, which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.values.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A pointer that may cross threads, for tasks writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(super) struct SendPtr<T>(pub *mut T);

// SAFETY: whoever shares it promises the tasks touch disjoint elements.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain triple loop, in f64.
    fn reference(
        (m, n, k): (usize, usize, usize),
        lhs: Operand<f64>,
        rhs: Operand<f64>,
    ) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    out[i * n + j] += lhs.values[i * lhs.row_stride + l * lhs.col_stride]
                        * rhs.values[l * rhs.row_stride + j * rhs.col_stride];
                }
            }
        }
        out
    }

    #[test]
    fn products_of_views_match_the_triple_loop() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 3.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64).sin()).collect();
        // a as (m, k) row-major, b as (n, k) row-major read transposed.
        let lhs = Operand::rows(&a, k);
        let rhs = Operand::transposed(&b, k);
        let expected = reference((m, n, k), lhs, rhs);
        // Into the middle columns of a wider matrix, accumulating onto ones.
        let stride = n + 3;
        let mut dst = vec![1.0; m * stride];
        matmul(&mut dst[2..], stride, true, (m, n, k), lhs, rhs);
        for i in 0..m {
            for j in 0..stride {
                let want = if (2..2 + n).contains(&j) {
                    1.0 + expected[i * n + j - 2]
                } else {
                    1.0
                };
                assert!((dst[i * stride + j] - want).abs() < 1e-12, "({i}, {j})");
            }
        }
        let mut zeros = vec![7.0; m * n];
        matmul(&mut zeros, n, false, (m, n, 0), lhs, rhs);
        assert!(zeros.iter().all(|&v| v == 0.0));
    }
}
