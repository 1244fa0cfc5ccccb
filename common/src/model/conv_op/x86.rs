//! im2col and col2im of f32 with AVX-512 and AVX2 intrinsics (see `im2col_f32` and
//! `col2im_f32`): the same elements, and for col2im the same sums in the same order, as the
//! portable loops.

use super::Geometry;
use std::arch::x86_64::*;

/// The low `lanes` bits (at most 16).
#[inline(always)]
fn mask16(lanes: usize) -> __mmask16 {
    ((1u32 << lanes.min(16)) - 1) as __mmask16
}

/// Lanes `0..lanes` set, as an AVX2 mask vector.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn mask8(lanes: usize) -> __m256i {
    let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes.min(8) as i32), index)
}

/// # Safety
///
/// AVX-512 F; `image` valid for `g.image_len()` reads and `cols` for writes of `patch` rows of
/// `pixels` floats, `stride` apart.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn im2col_avx512(image: *const f32, g: Geometry, cols: *mut f32, stride: usize) {
    let (k, oh, ow) = (g.k, g.oh(), g.ow());
    // Whole vectors of 16, then one of 8 if it fits, then the rest under a mask: runs of 8
    // (LeNet's second convolution) and 24 (its first) need no mask at all.
    let full = ow / 16 * 16;
    let half = ow - full >= 8;
    let tail = mask16(ow - full - if half { 8 } else { 0 });
    for ci in 0..g.c {
        for i in 0..k {
            for j in 0..k {
                let row = ((ci * k + i) * k + j) * stride;
                for y in 0..oh {
                    // SAFETY: the run of `ow` floats at these offsets lies inside both buffers.
                    unsafe {
                        let src = image.add((ci * g.h + y + i) * g.w + j);
                        let dst = cols.add(row + y * ow);
                        let mut x = 0;
                        while x < full {
                            _mm512_storeu_ps(dst.add(x), _mm512_loadu_ps(src.add(x)));
                            x += 16;
                        }
                        if half {
                            _mm256_storeu_ps(dst.add(x), _mm256_loadu_ps(src.add(x)));
                            x += 8;
                        }
                        if tail != 0 {
                            let v = _mm512_maskz_loadu_ps(tail, src.add(x));
                            _mm512_mask_storeu_ps(dst.add(x), tail, v);
                        }
                    }
                }
            }
        }
    }
}

/// # Safety
///
/// AVX2; the buffers as for [`im2col_avx512`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn im2col_avx2(image: *const f32, g: Geometry, cols: *mut f32, stride: usize) {
    // Whole vectors of 8, then one of 4 if it fits, then single floats: masked stores are
    // slow on some AVX2 CPUs (AMD's before Zen 4 split them into many operations).
    let (k, oh, ow) = (g.k, g.oh(), g.ow());
    let full = ow / 8 * 8;
    let quarter = ow - full >= 4;
    for ci in 0..g.c {
        for i in 0..k {
            for j in 0..k {
                let row = ((ci * k + i) * k + j) * stride;
                for y in 0..oh {
                    // SAFETY: the run of `ow` floats at these offsets lies inside both buffers.
                    unsafe {
                        let src = image.add((ci * g.h + y + i) * g.w + j);
                        let dst = cols.add(row + y * ow);
                        let mut x = 0;
                        while x < full {
                            _mm256_storeu_ps(dst.add(x), _mm256_loadu_ps(src.add(x)));
                            x += 8;
                        }
                        if quarter {
                            _mm_storeu_ps(dst.add(x), _mm_loadu_ps(src.add(x)));
                            x += 4;
                        }
                        while x < ow {
                            *dst.add(x) = *src.add(x);
                            x += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Input rows summed at once: four independent chains of additions, so that each waits less
/// on the one before (every row still adds its terms in the portable order).
const ROWS: usize = 4;

/// # Safety
///
/// AVX-512 F; `cols` valid for reads of `patch` rows of `pixels` floats, `stride` apart, and
/// `image` for `g.image_len()` writes.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn col2im_avx512(cols: *const f32, stride: usize, g: Geometry, image: *mut f32) {
    let (k, oh, ow) = (g.k, g.oh(), g.ow());
    for ci in 0..g.c {
        for c0 in (0..g.w).step_by(16) {
            for r0 in (0..g.h).step_by(ROWS) {
                let mut acc = [_mm512_setzero_ps(); ROWS];
                for i in 0..k {
                    for j in 0..k {
                        // Lane `l` is input column `c0 + l`, which column `x = c0 + l - j` of
                        // a run reaches when `0 <= x < ow`.
                        let (lo, hi) = (j.saturating_sub(c0), (ow + j).saturating_sub(c0).min(16));
                        if lo >= hi {
                            continue;
                        }
                        let lanes = mask16(hi) & !mask16(lo);
                        let run = cols.wrapping_add(((ci * k + i) * k + j) * stride);
                        for (t, acc) in acc.iter_mut().enumerate() {
                            let r = r0 + t;
                            if r >= g.h || r < i || r - i >= oh {
                                continue;
                            }
                            let at = run.wrapping_add((r - i) * ow + c0).wrapping_sub(j);
                            // SAFETY: the lanes read are the run's columns `0..ow`.
                            let v = unsafe { _mm512_maskz_loadu_ps(lanes, at) };
                            *acc = _mm512_mask_add_ps(*acc, lanes, *acc, v);
                        }
                    }
                }
                for (t, acc) in acc.iter().enumerate().take(g.h - r0) {
                    // SAFETY: the lanes stored are the row's columns `c0..w`.
                    unsafe {
                        let row = image.add((ci * g.h + r0 + t) * g.w + c0);
                        _mm512_mask_storeu_ps(row, mask16(g.w - c0), *acc);
                    }
                }
            }
        }
    }
}

/// # Safety
///
/// AVX2; the buffers as for [`col2im_avx512`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn col2im_avx2(cols: *const f32, stride: usize, g: Geometry, image: *mut f32) {
    let (k, oh, ow) = (g.k, g.oh(), g.ow());
    let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for ci in 0..g.c {
        for c0 in (0..g.w).step_by(8) {
            for r0 in (0..g.h).step_by(ROWS) {
                let mut acc = [_mm256_setzero_ps(); ROWS];
                for i in 0..k {
                    for j in 0..k {
                        let (lo, hi) = (j.saturating_sub(c0), (ow + j).saturating_sub(c0).min(8));
                        if lo >= hi {
                            continue;
                        }
                        let lanes = _mm256_and_si256(
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(hi as i32), index),
                            _mm256_cmpgt_epi32(index, _mm256_set1_epi32(lo as i32 - 1)),
                        );
                        let run = cols.wrapping_add(((ci * k + i) * k + j) * stride);
                        for (t, acc) in acc.iter_mut().enumerate() {
                            let r = r0 + t;
                            if r >= g.h || r < i || r - i >= oh {
                                continue;
                            }
                            let at = run.wrapping_add((r - i) * ow + c0).wrapping_sub(j);
                            // SAFETY: the lanes read are the run's columns `0..ow`.
                            let v = unsafe { _mm256_maskload_ps(at, lanes) };
                            let sum = _mm256_add_ps(*acc, v);
                            *acc = _mm256_blendv_ps(*acc, sum, _mm256_castsi256_ps(lanes));
                        }
                    }
                }
                for (t, acc) in acc.iter().enumerate().take(g.h - r0) {
                    // SAFETY: the lanes stored are the row's columns `c0..w`.
                    unsafe {
                        let row = image.add((ci * g.h + r0 + t) * g.w + c0);
                        _mm256_maskstore_ps(row, mask8(g.w - c0), *acc);
                    }
                }
            }
        }
    }
}

/// The weight and bias gradients of one image of a convolution with a single input channel
/// and a `K` by `K` kernel, added onto `partial` (`(out, K * K + 1)`), with AVX-512: for each
/// output channel, `K * K + 1` vector accumulators run over the image's output pixels, 16 at a
/// time, and are summed across lanes at the end. The product `gemm` would do instead is 20 by
/// 26 over 576 pixels for LeNet's first layer, a shape its kernels run at a quarter of their
/// speed.
///
/// # Safety
///
/// AVX-512 F; `g.c == 1`, `g.k == K`; `image` valid for `g.image_len()` reads, `grads` for
/// `out * pixels` and `partial` for `out * (K * K + 1)` reads and writes.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn weight_grad_single_channel_avx512<const K: usize>(
    image: *const f32,
    grads: *const f32,
    g: Geometry,
    partial: *mut f32,
) {
    let (oh, ow, w, pixels) = (g.oh(), g.ow(), g.w, g.pixels());
    for oc in 0..g.out {
        let mut acc = [[_mm512_setzero_ps(); K]; K];
        let mut bias = _mm512_setzero_ps();
        for y in 0..oh {
            for x0 in (0..ow).step_by(16) {
                let lanes = mask16(ow - x0);
                // SAFETY: the lanes read are inside the gradient's row and the image's rows
                // `y..y + K`, columns `x0..x0 + 16 + K - 1` cut to the width by the mask.
                unsafe {
                    let dy = _mm512_maskz_loadu_ps(lanes, grads.add(oc * pixels + y * ow + x0));
                    bias = _mm512_add_ps(bias, dy);
                    for (i, row) in acc.iter_mut().enumerate() {
                        let src = image.add((y + i) * w + x0);
                        for (j, acc) in row.iter_mut().enumerate() {
                            let x = _mm512_maskz_loadu_ps(lanes, src.add(j));
                            *acc = _mm512_fmadd_ps(dy, x, *acc);
                        }
                    }
                }
            }
        }
        // SAFETY: row `oc` of `partial` holds `K * K + 1` floats.
        unsafe {
            let row = partial.add(oc * (K * K + 1));
            for (i, accs) in acc.iter().enumerate() {
                for (j, acc) in accs.iter().enumerate() {
                    *row.add(i * K + j) += _mm512_reduce_add_ps(*acc);
                }
            }
            *row.add(K * K) += _mm512_reduce_add_ps(bias);
        }
    }
}
