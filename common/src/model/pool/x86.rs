//! The pool's rows with AVX-512 and AVX2 intrinsics. The compiler does vectorise the portable
//! loop, 16 windows at a time, but LeNet's rows are 12 and 4 windows long and the CNN's 13
//! and 5, so that loop never ran; here a row of up to 16 windows (8 with AVX2) is one step,
//! its tail under a mask.
//!
//! The operations are the portable ones in the portable order, lane by lane: the same bits,
//! NaNs and signed zeros included.

use std::arch::x86_64::*;

/// The low `lanes` bits.
#[inline(always)]
fn mask16(lanes: usize) -> __mmask16 {
    ((1u32 << lanes.min(16)) - 1) as __mmask16
}

/// `x` where `x > best` or `x` is NaN, else `best`: the portable `window_max` step.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
#[inline]
fn pick512(best: __m512, x: __m512) -> __m512 {
    let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, best) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_blend_ps(take, best, x)
}

/// The four elements of up to 16 windows starting at window `x` of a row pair, and the lane
/// mask of those windows: `(a, b, c, d)` as in `window_max`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
#[inline]
unsafe fn windows512(
    top: *const f32,
    bottom: *const f32,
    x: usize,
    lanes: usize,
) -> (__m512, __m512, __m512, __m512) {
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let (lo, hi) = (mask16(2 * lanes), mask16((2 * lanes).saturating_sub(16)));
    let load = |row: *const f32| unsafe {
        let first = _mm512_maskz_loadu_ps(lo, row.wrapping_add(2 * x));
        let second = _mm512_maskz_loadu_ps(hi, row.wrapping_add(2 * x + 16));
        (
            _mm512_permutex2var_ps(first, even, second),
            _mm512_permutex2var_ps(first, odd, second),
        )
    };
    let ((a, b), (c, d)) = (load(top), load(bottom));
    (a, b, c, d)
}

/// One output row of `ow` windows from the input rows `top` and `bottom` (`2 * ow` floats read
/// from each).
///
/// # Safety
///
/// AVX-512 F, BW, DQ and VL; the rows and `ys` (`ow` floats) valid.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn forward_row_avx512(
    top: *const f32,
    bottom: *const f32,
    ys: *mut f32,
    ow: usize,
) {
    let mut x = 0;
    while x < ow {
        let lanes = (ow - x).min(16);
        // SAFETY: the masks keep every access inside the rows and `ys`.
        unsafe {
            let (a, b, c, d) = windows512(top, bottom, x, lanes);
            let max = pick512(pick512(pick512(a, b), c), d);
            _mm512_mask_storeu_ps(ys.add(x), mask16(lanes), max);
        }
        x += 16;
    }
}

/// One output row's input gradient: each window's gradient from `grads` (`ow` floats) onto its
/// first maximal element in `d_top`/`d_bottom` (`2 * ow` floats each), zeros elsewhere.
///
/// # Safety
///
/// As [`forward_row_avx512`], and the gradient rows valid.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn backward_row_avx512(
    top: *const f32,
    bottom: *const f32,
    grads: *const f32,
    d_top: *mut f32,
    d_bottom: *mut f32,
    ow: usize,
) {
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mut x = 0;
    while x < ow {
        let lanes = (ow - x).min(16);
        let (lo, hi) = (mask16(2 * lanes), mask16((2 * lanes).saturating_sub(16)));
        // SAFETY: the masks keep every access inside the rows.
        unsafe {
            let (a, b, c, d) = windows512(top, bottom, x, lanes);
            let max = pick512(pick512(pick512(a, b), c), d);
            let is_max = |v: __m512| {
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, max) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
            };
            let to_a = is_max(a);
            let to_b = !to_a & is_max(b);
            let to_c = !to_a & !to_b & is_max(c);
            let to_d = !(to_a | to_b | to_c);
            let g = _mm512_maskz_loadu_ps(mask16(lanes), grads.add(x));
            let store = |row: *mut f32, left: __mmask16, right: __mmask16| {
                let (l, r) = (_mm512_maskz_mov_ps(left, g), _mm512_maskz_mov_ps(right, g));
                _mm512_mask_storeu_ps(
                    row.wrapping_add(2 * x),
                    lo,
                    _mm512_permutex2var_ps(l, first, r),
                );
                _mm512_mask_storeu_ps(
                    row.wrapping_add(2 * x + 16),
                    hi,
                    _mm512_permutex2var_ps(l, second, r),
                );
            };
            store(d_top, to_a, to_b);
            store(d_bottom, to_c, to_d);
        }
        x += 16;
    }
}

/// Lanes `0..lanes` set, as an AVX2 mask vector.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn mask8(lanes: usize) -> __m256i {
    let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes.min(8) as i32), index)
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn pick256(best: __m256, x: __m256) -> __m256 {
    let take = _mm256_or_ps(
        _mm256_cmp_ps::<_CMP_GT_OQ>(x, best),
        _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x),
    );
    _mm256_blendv_ps(best, x, take)
}

/// As [`windows512`], up to 8 windows.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn windows256(
    top: *const f32,
    bottom: *const f32,
    x: usize,
    lanes: usize,
) -> (__m256, __m256, __m256, __m256) {
    let (lo, hi) = (mask8(2 * lanes), mask8((2 * lanes).saturating_sub(8)));
    let load = |row: *const f32| unsafe {
        let first = _mm256_maskload_ps(row.wrapping_add(2 * x), lo);
        let second = _mm256_maskload_ps(row.wrapping_add(2 * x + 8), hi);
        // Per 128-bit half: [f0 f2 s0 s2 | f4 f6 s4 s6], then the 64-bit blocks in order.
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(first, second);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(first, second);
        let order = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (order(even), order(odd))
    };
    let ((a, b), (c, d)) = (load(top), load(bottom));
    (a, b, c, d)
}

/// [`forward_row_avx512`] with AVX2.
///
/// # Safety
///
/// AVX2; the rows and `ys` valid.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_row_avx2(
    top: *const f32,
    bottom: *const f32,
    ys: *mut f32,
    ow: usize,
) {
    let mut x = 0;
    while x < ow {
        let lanes = (ow - x).min(8);
        // SAFETY: the masks keep every access inside the rows and `ys`.
        unsafe {
            let (a, b, c, d) = windows256(top, bottom, x, lanes);
            let max = pick256(pick256(pick256(a, b), c), d);
            _mm256_maskstore_ps(ys.add(x), mask8(lanes), max);
        }
        x += 8;
    }
}

/// [`backward_row_avx512`] with AVX2.
///
/// # Safety
///
/// AVX2; the rows valid.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn backward_row_avx2(
    top: *const f32,
    bottom: *const f32,
    grads: *const f32,
    d_top: *mut f32,
    d_bottom: *mut f32,
    ow: usize,
) {
    let mut x = 0;
    while x < ow {
        let lanes = (ow - x).min(8);
        let (lo, hi) = (mask8(2 * lanes), mask8((2 * lanes).saturating_sub(8)));
        // SAFETY: the masks keep every access inside the rows.
        unsafe {
            let (a, b, c, d) = windows256(top, bottom, x, lanes);
            let max = pick256(pick256(pick256(a, b), c), d);
            let is_max = |v: __m256| {
                _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_EQ_OQ>(v, max),
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v),
                )
            };
            let to_a = is_max(a);
            let to_b = _mm256_andnot_ps(to_a, is_max(b));
            let to_c = _mm256_andnot_ps(_mm256_or_ps(to_a, to_b), is_max(c));
            let all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
            let to_d = _mm256_andnot_ps(_mm256_or_ps(_mm256_or_ps(to_a, to_b), to_c), all);
            let g = _mm256_maskload_ps(grads.add(x), mask8(lanes));
            let store = |row: *mut f32, left: __m256, right: __m256| {
                let (l, r) = (_mm256_and_ps(left, g), _mm256_and_ps(right, g));
                let (low, high) = (_mm256_unpacklo_ps(l, r), _mm256_unpackhi_ps(l, r));
                _mm256_maskstore_ps(
                    row.wrapping_add(2 * x),
                    lo,
                    _mm256_permute2f128_ps::<0x20>(low, high),
                );
                _mm256_maskstore_ps(
                    row.wrapping_add(2 * x + 8),
                    hi,
                    _mm256_permute2f128_ps::<0x31>(low, high),
                );
            };
            store(d_top, to_a, to_b);
            store(d_bottom, to_c, to_d);
        }
        x += 8;
    }
}

/// [`forward_row_avx512`] that also writes each window's code (see `pool::Code`).
///
/// # Safety
///
/// As [`forward_row_avx512`], and `codes` valid for `ow` writes.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn forward_row_codes_avx512(
    top: *const f32,
    bottom: *const f32,
    ys: *mut f32,
    codes: *mut u32,
    ow: usize,
) {
    let mut x = 0;
    while x < ow {
        let lanes = (ow - x).min(16);
        // SAFETY: the masks keep every access inside the rows, `ys` and `codes`.
        unsafe {
            let (a, b, c, d) = windows512(top, bottom, x, lanes);
            let max = pick512(pick512(pick512(a, b), c), d);
            let is_max = |v: __m512| {
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, max) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
            };
            let (to_a, to_b, to_c) = (is_max(a), is_max(b), is_max(c));
            let code = _mm512_set1_epi32(3);
            let code = _mm512_mask_blend_epi32(to_c, code, _mm512_set1_epi32(2));
            let code = _mm512_mask_blend_epi32(to_b, code, _mm512_set1_epi32(1));
            let code = _mm512_mask_blend_epi32(to_a, code, _mm512_setzero_si512());
            _mm512_mask_storeu_ps(ys.add(x), mask16(lanes), max);
            _mm512_mask_storeu_epi32(codes.add(x).cast(), mask16(lanes), code);
        }
        x += 16;
    }
}

/// One output row's input gradient from its codes: `grads[x]`, times `1 - y^2` of
/// `pooled[x]` when `pooled` is not null, onto the coded element of window `x`.
///
/// # Safety
///
/// AVX-512 F, BW, DQ and VL; `codes`, `grads` and `pooled` (unless null) valid for `ow`
/// reads, `d_top` and `d_bottom` for `2 * ow` writes.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn backward_row_codes_avx512(
    codes: *const u32,
    grads: *const f32,
    pooled: *const f32,
    d_top: *mut f32,
    d_bottom: *mut f32,
    ow: usize,
) {
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mut x = 0;
    while x < ow {
        let lanes = (ow - x).min(16);
        let (lo, hi) = (mask16(2 * lanes), mask16((2 * lanes).saturating_sub(16)));
        // SAFETY: the masks keep every access inside the rows.
        unsafe {
            let code = _mm512_maskz_loadu_epi32(mask16(lanes), codes.add(x).cast());
            let mut g = _mm512_maskz_loadu_ps(mask16(lanes), grads.add(x));
            if !pooled.is_null() {
                let y = _mm512_maskz_loadu_ps(mask16(lanes), pooled.add(x));
                g = _mm512_mul_ps(g, _mm512_sub_ps(_mm512_set1_ps(1.0), _mm512_mul_ps(y, y)));
            }
            let on = |k: i32| {
                _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(code, _mm512_set1_epi32(k)), g)
            };
            let store = |row: *mut f32, l: __m512, r: __m512| {
                _mm512_mask_storeu_ps(
                    row.wrapping_add(2 * x),
                    lo,
                    _mm512_permutex2var_ps(l, first, r),
                );
                _mm512_mask_storeu_ps(
                    row.wrapping_add(2 * x + 16),
                    hi,
                    _mm512_permutex2var_ps(l, second, r),
                );
            };
            store(d_top, on(0), on(1));
            store(d_bottom, on(2), on(3));
        }
        x += 16;
    }
}

/// [`forward_row_codes_avx512`] with AVX2.
///
/// # Safety
///
/// AVX2; the buffers as for [`forward_row_codes_avx512`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_row_codes_avx2(
    top: *const f32,
    bottom: *const f32,
    ys: *mut f32,
    codes: *mut u32,
    ow: usize,
) {
    let mut x = 0;
    while x < ow {
        let lanes = (ow - x).min(8);
        // SAFETY: the masks keep every access inside the rows, `ys` and `codes`.
        unsafe {
            let (a, b, c, d) = windows256(top, bottom, x, lanes);
            let max = pick256(pick256(pick256(a, b), c), d);
            let is_max = |v: __m256| {
                _mm256_castps_si256(_mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_EQ_OQ>(v, max),
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v),
                ))
            };
            let (to_a, to_b, to_c) = (is_max(a), is_max(b), is_max(c));
            let code = _mm256_set1_epi32(3);
            let code = _mm256_blendv_epi8(code, _mm256_set1_epi32(2), to_c);
            let code = _mm256_blendv_epi8(code, _mm256_set1_epi32(1), to_b);
            let code = _mm256_blendv_epi8(code, _mm256_setzero_si256(), to_a);
            _mm256_maskstore_ps(ys.add(x), mask8(lanes), max);
            _mm256_maskstore_epi32(codes.add(x).cast(), mask8(lanes), code);
        }
        x += 8;
    }
}

/// [`backward_row_codes_avx512`] with AVX2.
///
/// # Safety
///
/// AVX2; the buffers as for [`backward_row_codes_avx512`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn backward_row_codes_avx2(
    codes: *const u32,
    grads: *const f32,
    pooled: *const f32,
    d_top: *mut f32,
    d_bottom: *mut f32,
    ow: usize,
) {
    let mut x = 0;
    while x < ow {
        let lanes = (ow - x).min(8);
        let (lo, hi) = (mask8(2 * lanes), mask8((2 * lanes).saturating_sub(8)));
        // SAFETY: the masks keep every access inside the rows.
        unsafe {
            let code = _mm256_maskload_epi32(codes.add(x).cast(), mask8(lanes));
            let mut g = _mm256_maskload_ps(grads.add(x), mask8(lanes));
            if !pooled.is_null() {
                let y = _mm256_maskload_ps(pooled.add(x), mask8(lanes));
                g = _mm256_mul_ps(g, _mm256_sub_ps(_mm256_set1_ps(1.0), _mm256_mul_ps(y, y)));
            }
            let on = |k: i32| {
                _mm256_and_ps(
                    _mm256_castsi256_ps(_mm256_cmpeq_epi32(code, _mm256_set1_epi32(k))),
                    g,
                )
            };
            let store = |row: *mut f32, l: __m256, r: __m256| {
                let (low, high) = (_mm256_unpacklo_ps(l, r), _mm256_unpackhi_ps(l, r));
                _mm256_maskstore_ps(
                    row.wrapping_add(2 * x),
                    lo,
                    _mm256_permute2f128_ps::<0x20>(low, high),
                );
                _mm256_maskstore_ps(
                    row.wrapping_add(2 * x + 8),
                    hi,
                    _mm256_permute2f128_ps::<0x31>(low, high),
                );
            };
            store(d_top, on(0), on(1));
            store(d_bottom, on(2), on(3));
        }
        x += 8;
    }
}
