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
/// AVX-512 F; `image` valid for `g.image_len()` reads and `cols` for `patch * pixels` writes.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn im2col_avx512(image: *const f32, g: Geometry, cols: *mut f32) {
    let (k, oh, ow, pixels) = (g.k, g.oh(), g.ow(), g.pixels());
    let full = ow / 16 * 16;
    let tail = mask16(ow - full);
    for ci in 0..g.c {
        for i in 0..k {
            for j in 0..k {
                let row = ((ci * k + i) * k + j) * pixels;
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
pub(super) unsafe fn im2col_avx2(image: *const f32, g: Geometry, cols: *mut f32) {
    let (k, oh, ow, pixels) = (g.k, g.oh(), g.ow(), g.pixels());
    let full = ow / 8 * 8;
    let tail = mask8(ow - full);
    for ci in 0..g.c {
        for i in 0..k {
            for j in 0..k {
                let row = ((ci * k + i) * k + j) * pixels;
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
                        if x < ow {
                            _mm256_maskstore_ps(
                                dst.add(x),
                                tail,
                                _mm256_maskload_ps(src.add(x), tail),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The kernel positions reaching input row `r`: `(i, y)` with `y = r - i` an output row.
fn kernel_rows(g: Geometry, r: usize) -> impl Iterator<Item = (usize, usize)> {
    let oh = g.oh();
    (0..g.k)
        .filter(move |&i| r >= i && r - i < oh)
        .map(move |i| (i, r - i))
}

/// # Safety
///
/// AVX-512 F; `cols` valid for `patch * pixels` reads and `image` for `g.image_len()` writes.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) unsafe fn col2im_avx512(cols: *const f32, g: Geometry, image: *mut f32) {
    let (k, ow, pixels) = (g.k, g.ow(), g.pixels());
    for ci in 0..g.c {
        for r in 0..g.h {
            for c0 in (0..g.w).step_by(16) {
                let mut acc = _mm512_setzero_ps();
                for (i, y) in kernel_rows(g, r) {
                    for j in 0..k {
                        // Lane `l` is input column `c0 + l`, which column `x = c0 + l - j` of
                        // this run reaches when `0 <= x < ow`.
                        let (lo, hi) = (j.saturating_sub(c0), (ow + j).saturating_sub(c0).min(16));
                        if lo >= hi {
                            continue;
                        }
                        let lanes = mask16(hi) & !mask16(lo);
                        let run = cols.wrapping_add(((ci * k + i) * k + j) * pixels + y * ow);
                        // SAFETY: the lanes read are the run's columns `0..ow`.
                        let v = unsafe {
                            _mm512_maskz_loadu_ps(lanes, run.wrapping_add(c0).wrapping_sub(j))
                        };
                        acc = _mm512_mask_add_ps(acc, lanes, acc, v);
                    }
                }
                // SAFETY: the lanes stored are the row's columns `c0..w`.
                unsafe {
                    let row = image.add((ci * g.h + r) * g.w + c0);
                    _mm512_mask_storeu_ps(row, mask16(g.w - c0), acc);
                }
            }
        }
    }
}

/// # Safety
///
/// AVX2; the buffers as for [`col2im_avx512`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn col2im_avx2(cols: *const f32, g: Geometry, image: *mut f32) {
    let (k, ow, pixels) = (g.k, g.ow(), g.pixels());
    let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for ci in 0..g.c {
        for r in 0..g.h {
            for c0 in (0..g.w).step_by(8) {
                let mut acc = _mm256_setzero_ps();
                for (i, y) in kernel_rows(g, r) {
                    for j in 0..k {
                        let (lo, hi) = (j.saturating_sub(c0), (ow + j).saturating_sub(c0).min(8));
                        if lo >= hi {
                            continue;
                        }
                        let lanes = _mm256_and_si256(
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(hi as i32), index),
                            _mm256_cmpgt_epi32(index, _mm256_set1_epi32(lo as i32 - 1)),
                        );
                        let run = cols.wrapping_add(((ci * k + i) * k + j) * pixels + y * ow);
                        // SAFETY: the lanes read are the run's columns `0..ow`.
                        let v = unsafe {
                            _mm256_maskload_ps(run.wrapping_add(c0).wrapping_sub(j), lanes)
                        };
                        acc = _mm256_blendv_ps(
                            acc,
                            _mm256_add_ps(acc, v),
                            _mm256_castsi256_ps(lanes),
                        );
                    }
                }
                // SAFETY: the lanes stored are the row's columns `c0..w`.
                unsafe {
                    let row = image.add((ci * g.h + r) * g.w + c0);
                    _mm256_maskstore_ps(row, mask8(g.w - c0), acc);
                }
            }
        }
    }
}
