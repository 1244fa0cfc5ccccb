//! Dense layers `y = x Wᵀ + b` on f32 row-major batches, forward and backward, for the CPU
//! engine ([`super::engine`]).
//!
//! Each product is split over the threads in pieces of columns (or of the weight gradient's
//! rows) whose sizes depend only on the layer's shape, and every element is computed by one
//! product call whatever thread runs it, so the bits do not depend on the thread count.

use super::gemm::{Operand, SendPtr, matmul, matmul_raw};
use super::parallel::{for_each_piece, worth_splitting_product};

/// The most pieces a product is cut into: enough to balance two threads (and four).
const MAX_PIECES: usize = 4;

/// Columns per piece are a multiple of this: `gemm`'s AVX-512 kernel computes 64 columns of a
/// row-major product at a time, so narrower pieces would waste part of every tile.
const PIECE_ALIGN: usize = 64;

/// The length of the pieces `len` columns (or rows) are cut into, the last one shorter.
fn piece_len(len: usize, align: usize) -> usize {
    len.div_ceil(MAX_PIECES).next_multiple_of(align).max(1)
}

/// A dense layer's sizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Dense {
    pub inputs: usize,
    pub outputs: usize,
}

impl Dense {
    /// `y (rows, outputs) = x (rows, inputs) · weightᵀ + bias`, where `weight` is
    /// `(outputs, inputs)` row-major, as candle's `Linear` stores it.
    pub fn forward(&self, x: &[f32], rows: usize, weight: &[f32], bias: &[f32], y: &mut [f32]) {
        let Dense { inputs, outputs } = *self;
        let y = &mut y[..rows * outputs];
        for row in y.chunks_exact_mut(outputs) {
            row.copy_from_slice(&bias[..outputs]);
        }
        let piece = piece_len(outputs, PIECE_ALIGN);
        let starts: Vec<usize> = (0..outputs).step_by(piece).collect();
        let dst = SendPtr(y.as_mut_ptr());
        let task = |_: usize, start: usize| {
            let width = piece.min(outputs - start);
            // SAFETY: each task writes its own columns `start..start + width` of `y`, which
            // is `rows` by `outputs` and borrowed mutably above.
            unsafe {
                matmul_raw(
                    { dst }.0.add(start),
                    outputs,
                    true,
                    (rows, width, inputs),
                    Operand::rows(x, inputs),
                    Operand::transposed(&weight[start * inputs..], inputs),
                )
            }
        };
        for_each_piece(starts, worth_splitting_product(self.work(rows)), task);
    }

    /// The gradients of [`forward`](Self::forward) from the output gradient `dy`
    /// `(rows, outputs)`: `dweight = dyᵀ · x`, `dbias` the column sums of `dy`, and, when `dx`
    /// is given, `dx = dy · weight`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        x: &[f32],
        rows: usize,
        weight: &[f32],
        dy: &[f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        let Dense { inputs, outputs } = *self;
        let dy = &dy[..rows * outputs];
        // Row by row, so each sum runs in row order; the loop vectorises across columns.
        let dbias = &mut dbias[..outputs];
        dbias.fill(0.0);
        for row in dy.chunks_exact(outputs) {
            for (sum, &g) in dbias.iter_mut().zip(row) {
                *sum += g;
            }
        }

        enum Piece<'a> {
            /// Rows `start..` of the weight gradient.
            Weight(usize, &'a mut [f32]),
            /// Columns `start..start + width` of the input gradient.
            Input(usize, usize),
        }
        let row_piece = piece_len(outputs, 8);
        let mut pieces: Vec<Piece> = dweight[..outputs * inputs]
            .chunks_mut(row_piece * inputs)
            .enumerate()
            .map(|(i, rows)| Piece::Weight(i * row_piece, rows))
            .collect();
        let dx = dx.map(|dx| SendPtr(dx[..rows * inputs].as_mut_ptr()));
        if dx.is_some() {
            let piece = piece_len(inputs, PIECE_ALIGN);
            pieces.extend(
                (0..inputs)
                    .step_by(piece)
                    .map(|start| Piece::Input(start, piece.min(inputs - start))),
            );
        }
        let task = |_: usize, piece: Piece| match piece {
            Piece::Weight(start, dweight) => {
                // dweight rows (n, inputs) = dy[:, start..]ᵀ (n, rows) · x (rows, inputs).
                let n = dweight.len() / inputs;
                matmul(
                    dweight,
                    inputs,
                    false,
                    (n, inputs, rows),
                    Operand::transposed(&dy[start..], outputs),
                    Operand::rows(x, inputs),
                );
            }
            Piece::Input(start, width) => {
                let dx = dx.expect("input pieces exist only with dx");
                // SAFETY: each task writes its own columns of `dx`, `rows` by `inputs` and
                // borrowed mutably by this call.
                unsafe {
                    matmul_raw(
                        { dx }.0.add(start),
                        inputs,
                        false,
                        (rows, width, outputs),
                        Operand::rows(dy, outputs),
                        Operand::rows(&weight[start..], inputs),
                    )
                }
            }
        };
        let products = if dx.is_some() { 2 } else { 1 };
        for_each_piece(
            pieces,
            worth_splitting_product(products * self.work(rows)),
            task,
        );
    }

    /// Multiply-adds of one product over `rows` rows.
    pub fn work(&self, rows: usize) -> usize {
        rows * self.inputs * self.outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::derive_rng;
    use rand_chacha::rand_core::RngCore;

    fn random(len: usize, stream: u64) -> Vec<f32> {
        let mut rng = derive_rng(3, "linear-test", &[stream]);
        (0..len)
            .map(|_| rng.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0)
            .collect()
    }

    /// Forward and backward against plain loops in f64, at a size that is cut into pieces.
    #[test]
    fn matches_plain_loops() {
        let (rows, inputs, outputs) = (9, 300, 133);
        let layer = Dense { inputs, outputs };
        let (x, w, b, dy) = (
            random(rows * inputs, 0),
            random(outputs * inputs, 1),
            random(outputs, 2),
            random(rows * outputs, 3),
        );
        let mut y = vec![0.0; rows * outputs];
        layer.forward(&x, rows, &w, &b, &mut y);
        let (mut dw, mut db, mut dx) = (
            vec![0.0; outputs * inputs],
            vec![0.0; outputs],
            vec![0.0; rows * inputs],
        );
        layer.backward(&x, rows, &w, &dy, &mut dw, &mut db, Some(&mut dx));
        let close = |a: f32, b: f64| (f64::from(a) - b).abs() <= 1e-4 * (1.0 + b.abs());
        for r in 0..rows {
            for o in 0..outputs {
                let want = f64::from(b[o])
                    + (0..inputs)
                        .map(|i| f64::from(x[r * inputs + i]) * f64::from(w[o * inputs + i]))
                        .sum::<f64>();
                assert!(close(y[r * outputs + o], want), "y[{r}, {o}]");
            }
            for i in 0..inputs {
                let want: f64 = (0..outputs)
                    .map(|o| f64::from(dy[r * outputs + o]) * f64::from(w[o * inputs + i]))
                    .sum();
                assert!(close(dx[r * inputs + i], want), "dx[{r}, {i}]");
            }
        }
        for o in 0..outputs {
            let want: f64 = (0..rows).map(|r| f64::from(dy[r * outputs + o])).sum();
            assert!(close(db[o], want), "db[{o}]");
            for i in 0..inputs {
                let want: f64 = (0..rows)
                    .map(|r| f64::from(dy[r * outputs + o]) * f64::from(x[r * inputs + i]))
                    .sum();
                assert!(close(dw[o * inputs + i], want), "dw[{o}, {i}]");
            }
        }
        assert!(worth_splitting_product(layer.work(64)) || rayon::current_num_threads() == 1);
    }

    /// One and two threads give the same bits, at a size that is split.
    #[test]
    fn bit_identical_across_thread_counts() {
        let (rows, inputs, outputs) = (64, 800, 500);
        let layer = Dense { inputs, outputs };
        let (x, w, b, dy) = (
            random(rows * inputs, 4),
            random(outputs * inputs, 5),
            random(outputs, 6),
            random(rows * outputs, 7),
        );
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                assert_eq!(worth_splitting_product(layer.work(rows)), threads > 1);
                let mut y = vec![0.0; rows * outputs];
                layer.forward(&x, rows, &w, &b, &mut y);
                let (mut dw, mut db, mut dx) = (
                    vec![0.0; outputs * inputs],
                    vec![0.0; outputs],
                    vec![0.0; rows * inputs],
                );
                layer.backward(&x, rows, &w, &dy, &mut dw, &mut db, Some(&mut dx));
                [y, dw, db, dx].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            })
        };
        assert_eq!(run(1), run(2));
    }
}
