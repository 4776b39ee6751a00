//! The fully connected layer's products on the CPU, rows split over threads:
//! y = x Wᵀ + b, dx = dy W, dW = dyᵀ x and db = Σ dy for x (rows, in),
//! W (out, in).
//!
//! The matrices of a transformer block are tall and thin (thousands of token
//! rows, 64–1280 features): a GEMM library splits the output into tiles, and
//! the weight gradient (out × in, summed over every row) is one or two tiles,
//! so it ran on one thread while the others waited. Here every product is
//! cut into row blocks, one single-threaded GEMM per block, and the weight
//! and bias gradients are per-block partial sums added at the end.

use rayon::prelude::*;

use super::gemm::{View, matmul_into};
use super::im2col::{assume_init, uninit_vec, zeroed};

/// Sizes of one layer application.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub rows: usize,
    pub input: usize,
    pub output: usize,
}

/// Rows per task: about two blocks per thread (the last block of a GEMM
/// loop is the one the other threads wait for), at least 16 rows.
fn row_block(rows: usize) -> usize {
    let t = super::cpu::num_threads().max(1);
    rows.div_ceil(2 * t).max(16)
}

/// y (rows, out) = x Wᵀ + bias (`bias` empty: none).
pub(crate) fn forward(x: &[f32], w: &[f32], bias: &[f32], d: Dims) -> Vec<f32> {
    let Dims {
        rows,
        input,
        output,
    } = d;
    let mut y = uninit_vec(rows * output);
    if output == 0 {
        return assume_init(y);
    }
    let rb = row_block(rows);
    y.par_chunks_mut(rb * output)
        .zip(x.par_chunks(rb * input.max(1)))
        .for_each(|(yb, xb)| {
            for row in yb.chunks_mut(output) {
                if bias.is_empty() {
                    row.iter_mut().for_each(|v| {
                        v.write(0.0);
                    });
                } else {
                    for (v, &b) in row.iter_mut().zip(bias) {
                        v.write(b);
                    }
                }
            }
            let n = yb.len() / output;
            // SAFETY: every element was written above; MaybeUninit<f32> has
            // the layout of f32.
            let yb = unsafe { &mut *(yb as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            matmul_into(
                yb,
                output,
                true,
                View::rows(xb, n, input),
                View::rows(w, output, input).t(),
                false,
            );
        });
    assume_init(y)
}

/// dx (rows, in) = dy W.
pub(crate) fn grad_input(dy: &[f32], w: &[f32], d: Dims) -> Vec<f32> {
    let Dims {
        rows,
        input,
        output,
    } = d;
    if input == 0 {
        return Vec::new();
    }
    let mut dx = uninit_vec(rows * input);
    let rb = row_block(rows);
    dx.par_chunks_mut(rb * input)
        .zip(dy.par_chunks(rb * output.max(1)))
        .for_each(|(dxb, dyb)| {
            let dxb = zeroed(dxb);
            let n = dxb.len() / input;
            matmul_into(
                dxb,
                input,
                false,
                View::rows(dyb, n, output),
                View::rows(w, output, input),
                false,
            );
        });
    assume_init(dx)
}

/// dW (out, in) = dyᵀ x and, with `with_bias`, db (out) = Σ_rows dy.
///
/// Row blocks with partial sums when the partial weight gradients cost no
/// more memory than the inputs (a transformer's token matrices); a weight
/// larger than that (SD 1.5's feed-forward, 10240 × 1280) has tiles enough
/// for the GEMM's own threads, and one product avoids the partial copies.
pub(crate) fn grad_weight_bias(
    dy: &[f32],
    x: &[f32],
    d: Dims,
    with_bias: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let Dims {
        rows,
        input,
        output,
    } = d;
    let rb = row_block(rows);
    let blocks = rows.div_ceil(rb.max(1));
    let bias_sums = |dyb: &[f32], db: &mut [f64]| {
        if with_bias {
            for row in dyb.chunks(output.max(1)) {
                for (s, &v) in db.iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
        }
    };
    // dw = dyᵀ x over n rows.
    let product = |dw: &mut [f32], dy: &[f32], x: &[f32], n: usize, par: bool| {
        matmul_into(
            dw,
            input,
            false,
            View::rows(dy, n, output).t(),
            View::rows(x, n, input),
            par,
        );
    };
    let (dw, db) = if blocks > 1 && output * input * blocks <= rows * (input + output) {
        let zero = || (vec![0f32; output * input], vec![0f64; output]);
        dy.par_chunks(rb * output.max(1))
            .zip(x.par_chunks(rb * input.max(1)))
            .map(|(dyb, xb)| {
                let (mut dw, mut db) = zero();
                product(&mut dw, dyb, xb, dyb.len() / output.max(1), false);
                bias_sums(dyb, &mut db);
                (dw, db)
            })
            .reduce(zero, |(mut aw, mut ab), (bw, bb)| {
                aw.iter_mut().zip(&bw).for_each(|(a, b)| *a += b);
                ab.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
                (aw, ab)
            })
    } else {
        let mut dw = vec![0f32; output * input];
        product(&mut dw, dy, x, rows, true);
        let db = dy
            .par_chunks(rb * output.max(1))
            .map(|dyb| {
                let mut db = vec![0f64; output];
                bias_sums(dyb, &mut db);
                db
            })
            .reduce(
                || vec![0f64; output],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        (dw, db)
    };
    let db = with_bias.then(|| db.into_iter().map(|v| v as f32).collect());
    (dw, db)
}
