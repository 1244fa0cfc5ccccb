//! A convolution over a whole batch as one product, for the CPU engine's dense part.
//!
//! The CNN's last convolution has 3x3 output pixels per image: image by image its product is 64
//! by 9 by 576, which `gemm`'s kernels (64 columns at a time) run at a third of their speed.
//! Over the batch the im2col matrices of all images sit side by side, `(patch, images * pixels)`,
//! and one product computes every image's output, 64 images making it 64 by 576 by 576. The
//! pieces it is cut into for the threads are fixed groups of images (or of output channels),
//! so no value depends on the thread count.

use super::conv_op::{self, Geometry};
use super::gemm::{Operand, SendPtr, matmul_raw};
use super::parallel::{for_each_piece, worth_splitting_product};

/// Images per piece of a product.
const IMAGES_PER_PIECE: usize = 16;

/// A convolution applied to the whole batch; `g` describes one image (`g.n` is 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct WideConv {
    pub g: Geometry,
}

impl WideConv {
    /// Floats per image in and out.
    pub fn inputs(&self) -> usize {
        self.g.image_len()
    }

    pub fn outputs(&self) -> usize {
        self.g.out * self.g.pixels()
    }

    /// The length of the batch's im2col matrix with its row of ones: `(patch + 1, rows * pixels)`.
    pub fn cols_len(&self, rows: usize) -> usize {
        (self.g.patch() + 1) * rows * self.g.pixels()
    }

    /// The length of one `(out, rows * pixels)` matrix: the wide output, or its gradient.
    pub fn wide_len(&self, rows: usize) -> usize {
        self.g.out * rows * self.g.pixels()
    }

    /// The length of the im2col matrix's gradient, `(patch, rows * pixels)`.
    pub fn cols_grad_len(&self, rows: usize) -> usize {
        self.g.patch() * rows * self.g.pixels()
    }

    /// The length of the weight and bias gradients side by side, `(out, patch + 1)`.
    pub fn partial_len(&self) -> usize {
        self.g.out * (self.g.patch() + 1)
    }

    /// `y (rows, out * pixels) = conv(x (rows, c * h * w)) + bias`. `cols` receives the batch's
    /// im2col matrix (kept for [`backward`](Self::backward)) and `wide` is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        rows: usize,
        weight: &[f32],
        bias: &[f32],
        cols: &mut [f32],
        wide: &mut [f32],
        y: &mut [f32],
    ) {
        let g = self.g;
        let (pixels, patch, width) = (g.pixels(), g.patch(), rows * g.pixels());
        let (cols, wide) = (
            &mut cols[..self.cols_len(rows)],
            &mut wide[..self.wide_len(rows)],
        );
        // Two passes over the same pieces of images: each piece's im2col columns, then each
        // piece's product (which reads the whole im2col matrix's rows).
        let starts: Vec<usize> = (0..rows).step_by(IMAGES_PER_PIECE).collect();
        let parallel = worth_splitting_product(self.work(rows));
        let cols_dst = SendPtr(cols.as_mut_ptr());
        for_each_piece(starts.clone(), parallel, |_, first| {
            for b in first..(first + IMAGES_PER_PIECE).min(rows) {
                let image = &x[b * self.inputs()..(b + 1) * self.inputs()];
                // SAFETY: each piece writes its own images' column blocks of `cols`, `patch`
                // rows of `width` floats.
                unsafe {
                    conv_op::im2col_strided_raw(image, g, { cols_dst }.0.add(b * pixels), width)
                };
            }
        });
        cols[patch * width..].fill(1.0);
        for (row, &bias) in wide.chunks_exact_mut(width).zip(bias) {
            row.fill(bias);
        }
        let dst = SendPtr(wide.as_mut_ptr());
        let cols = &*cols;
        for_each_piece(starts, parallel, |_, first| {
            let images = IMAGES_PER_PIECE.min(rows - first);
            // SAFETY: each piece writes its own columns of `wide`, `out` rows of `width`.
            unsafe {
                matmul_raw(
                    { dst }.0.add(first * pixels),
                    width,
                    true,
                    (g.out, images * pixels, patch),
                    Operand::rows(&weight[..g.out * patch], patch),
                    Operand::rows(&cols[first * pixels..], width),
                )
            }
        });
        // Image by image, channel by channel, back to the batch's layout.
        for (b, y) in y[..rows * self.outputs()]
            .chunks_exact_mut(self.outputs())
            .enumerate()
        {
            for (oc, y) in y.chunks_exact_mut(pixels).enumerate() {
                y.copy_from_slice(&wide[oc * width + b * pixels..][..pixels]);
            }
        }
    }

    /// The gradients of [`forward`](Self::forward) from `dy` (`(rows, out * pixels)`) and the
    /// `cols` it kept: the weight and bias gradients, and the input gradient when `dx` is
    /// given. `wide`, `cols_grad` and `partial` are scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        rows: usize,
        weight: &[f32],
        dy: &[f32],
        cols: &[f32],
        (wide, cols_grad, partial): (&mut [f32], &mut [f32], &mut [f32]),
        dweight: &mut [f32],
        dbias: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        let g = self.g;
        let (pixels, patch, width) = (g.pixels(), g.patch(), rows * g.pixels());
        let (wide, partial) = (
            &mut wide[..self.wide_len(rows)],
            &mut partial[..self.partial_len()],
        );
        let cols = &cols[..self.cols_len(rows)];
        for (b, dy) in dy[..rows * self.outputs()]
            .chunks_exact(self.outputs())
            .enumerate()
        {
            for (oc, dy) in dy.chunks_exact(pixels).enumerate() {
                wide[oc * width + b * pixels..][..pixels].copy_from_slice(dy);
            }
        }
        let wide = &*wide;

        enum Piece {
            /// Columns `first..first + len` of the weight and bias gradients (`patch + 1`
            /// wide): each piece then packs only its rows of the im2col matrix.
            Weight(usize, usize),
            /// The columns of images `first..first + images` of the im2col gradient.
            Input(usize, usize),
        }
        let columns = (patch + 1).div_ceil(4).next_multiple_of(16);
        let mut pieces: Vec<Piece> = (0..patch + 1)
            .step_by(columns)
            .map(|first| Piece::Weight(first, columns.min(patch + 1 - first)))
            .collect();
        let partial_dst = SendPtr(partial.as_mut_ptr());
        let cols_grad = &mut cols_grad[..self.cols_grad_len(rows)];
        let grad_dst = SendPtr(cols_grad.as_mut_ptr());
        if dx.is_some() {
            pieces.extend(
                (0..rows)
                    .step_by(IMAGES_PER_PIECE)
                    .map(|first| Piece::Input(first, IMAGES_PER_PIECE.min(rows - first))),
            );
        }
        let products = if dx.is_some() { 2 } else { 1 };
        let parallel = worth_splitting_product(products * self.work(rows));
        for_each_piece(pieces, parallel, |_, piece| match piece {
            // SAFETY: each piece writes its own columns of `partial`, `out` rows of
            // `patch + 1`, borrowed mutably by this call.
            Piece::Weight(first, len) => unsafe {
                // partial[:, first..] (out, len) = wide (out, width) · [cols; ones][first..]ᵀ.
                matmul_raw(
                    { partial_dst }.0.add(first),
                    patch + 1,
                    false,
                    (g.out, len, width),
                    Operand::rows(wide, width),
                    Operand::transposed(&cols[first * width..], width),
                )
            },
            Piece::Input(first, images) => {
                // SAFETY: each piece writes its own columns of `cols_grad`, `patch` rows of
                // `width`, borrowed mutably by this call.
                unsafe {
                    matmul_raw(
                        { grad_dst }.0.add(first * pixels),
                        width,
                        false,
                        (patch, images * pixels, g.out),
                        Operand::transposed(&weight[..g.out * patch], patch),
                        Operand::rows(&wide[first * pixels..], width),
                    )
                }
            }
        });
        for (oc, row) in partial.chunks_exact(patch + 1).enumerate() {
            dweight[oc * patch..(oc + 1) * patch].copy_from_slice(&row[..patch]);
            dbias[oc] = row[patch];
        }
        if let Some(dx) = dx {
            let cols_grad = &*cols_grad;
            let chunks: Vec<&mut [f32]> = dx[..rows * self.inputs()]
                .chunks_mut(IMAGES_PER_PIECE * self.inputs())
                .collect();
            let parallel = worth_splitting_product(self.work(rows));
            for_each_piece(chunks, parallel, |piece, dx| {
                for (j, dx) in dx.chunks_exact_mut(self.inputs()).enumerate() {
                    let b = piece * IMAGES_PER_PIECE + j;
                    conv_op::col2im_strided(&cols_grad[b * pixels..], width, g, dx);
                }
            });
        }
    }

    /// Multiply-adds of one product over `rows` images.
    pub fn work(&self, rows: usize) -> usize {
        rows * self.g.work()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::derive_rng;
    use rand_chacha::rand_core::RngCore;

    fn random(len: usize, stream: u64) -> Vec<f32> {
        let mut rng = derive_rng(5, "wide-conv-test", &[stream]);
        (0..len)
            .map(|_| rng.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0)
            .collect()
    }

    /// Over the batch, the same output and gradients as image by image (`conv_op`'s kernels),
    /// to rounding; the same bits on one thread as on two.
    #[test]
    fn matches_the_per_image_convolution_and_ignores_the_thread_count() {
        let g = Geometry {
            n: 1,
            c: 64,
            h: 5,
            w: 5,
            out: 64,
            k: 3,
        };
        let conv = WideConv { g };
        let rows = 37;
        let x = random(rows * conv.inputs(), 0);
        let weight = random(g.out * g.patch(), 1);
        let bias = random(g.out, 2);
        let dy = random(rows * conv.outputs(), 3);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                assert_eq!(worth_splitting_product(conv.work(rows)), threads > 1);
                let mut cols = vec![0.0; conv.cols_len(rows)];
                let mut wide = vec![0.0; conv.wide_len(rows)];
                let mut y = vec![0.0; rows * conv.outputs()];
                conv.forward(&x, rows, &weight, &bias, &mut cols, &mut wide, &mut y);
                let mut cols_grad = vec![0.0; conv.cols_grad_len(rows)];
                let mut partial = vec![0.0; conv.partial_len()];
                let (mut dw, mut db) = (vec![0.0; g.out * g.patch()], vec![0.0; g.out]);
                let mut dx = vec![0.0; rows * conv.inputs()];
                let scratch = (&mut wide[..], &mut cols_grad[..], &mut partial[..]);
                conv.backward(
                    rows,
                    &weight,
                    &dy,
                    &cols,
                    scratch,
                    &mut dw,
                    &mut db,
                    Some(&mut dx),
                );
                [y, dw, db, dx]
            })
        };
        let one = run(1);
        let bits = |v: &[Vec<f32>]| {
            v.iter()
                .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&one), bits(&run(2)));

        // Image by image.
        let (mut y, mut dx) = (
            vec![0.0; rows * conv.outputs()],
            vec![0.0; rows * conv.inputs()],
        );
        let mut partial = vec![0.0; conv.partial_len()];
        let mut cols = vec![0.0; g.cols_len()];
        let mut cols_grad = vec![0.0; g.patch() * g.pixels()];
        for b in 0..rows {
            let image = &x[b * conv.inputs()..(b + 1) * conv.inputs()];
            let out = &mut y[b * conv.outputs()..(b + 1) * conv.outputs()];
            for (row, &bias) in out.chunks_mut(g.pixels()).zip(&bias) {
                row.fill(bias);
            }
            conv_op::forward_image(image, &weight, g, &mut cols, out);
            let grads = &dy[b * conv.outputs()..(b + 1) * conv.outputs()];
            let input = Some((
                &mut dx[b * conv.inputs()..(b + 1) * conv.inputs()],
                &mut cols_grad[..],
            ));
            conv_op::backward_image(image, &weight, grads, g, &mut cols, &mut partial, input);
        }
        let dw: Vec<f32> = partial
            .chunks(g.patch() + 1)
            .flat_map(|row| row[..g.patch()].to_vec())
            .collect();
        let db: Vec<f32> = partial
            .chunks(g.patch() + 1)
            .map(|row| row[g.patch()])
            .collect();
        for (what, (a, b)) in ["y", "dw", "db", "dx"]
            .iter()
            .zip(one.iter().zip([y, dw, db, dx]))
        {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst <= 1e-5 * scale, "{what}: off by {worst} of {scale}");
        }
    }
}
