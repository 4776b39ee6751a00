//! The fused CPU kernels (src/nn/fused.rs) against the plain candle-op
//! versions: values, gradients of every input, and a finite-difference check
//! of each gradient along a random direction.

mod common;

use common::rel_err;

use candle_core::{DType, Device, Tensor, Var};
use dreambooth::nn::fused::{self, plain};

type F = dyn Fn(&[Tensor]) -> dreambooth::Result<Tensor>;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Σ f(inputs) · r, in f64.
fn loss(f: &F, inputs: &[Tensor], r: &Tensor) -> f64 {
    let y = f(inputs).unwrap().to_dtype(DType::F64).unwrap();
    (y * r.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Outputs and input gradients of Σ f(inputs)·r.
fn value_and_grads(f: &F, inputs: &[Tensor], r: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let l = (&y * r).unwrap().sum_all().unwrap();
    let g = l.backward().unwrap();
    let grads = ts
        .iter()
        .map(|t| g.get(t).expect("no gradient for an input").clone())
        .collect();
    (y, grads)
}

/// Checks fused against plain (values, gradients) and the fused gradients
/// against central differences along random directions.
fn check(name: &str, fused_f: &F, plain_f: &F, inputs: &[Tensor]) {
    let y_plain = plain_f(inputs).unwrap();
    let r = randn(y_plain.dims(), 99);
    let (yf, gf) = value_and_grads(fused_f, inputs, &r);
    let (yp, gp) = value_and_grads(plain_f, inputs, &r);
    let e = rel_err(&yf, &yp);
    assert!(e < 1e-5, "{name}: value rel err {e}");
    for (i, (a, b)) in gf.iter().zip(&gp).enumerate() {
        assert_eq!(a.dims(), inputs[i].dims(), "{name}: grad {i} shape");
        let e = rel_err(a, b);
        assert!(e < 1e-4, "{name}: grad of input {i} rel err {e}");
    }
    for (i, g) in gf.iter().enumerate() {
        let v = randn(inputs[i].dims(), 1000 + i as u64);
        let h = 1e-2;
        let shifted = |s: f64| -> Vec<Tensor> {
            let mut xs = inputs.to_vec();
            xs[i] = (&inputs[i] + (&v * s).unwrap()).unwrap();
            xs
        };
        let fd = (loss(fused_f, &shifted(h), &r) - loss(fused_f, &shifted(-h), &r)) / (2.0 * h);
        let an = (g.to_dtype(DType::F64).unwrap() * v.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let err = (fd - an).abs() / an.abs().max(1.0);
        assert!(
            err < 1e-2,
            "{name}: input {i}: finite difference {fd} vs analytic {an}"
        );
    }
}

#[test]
fn group_norm_matches_plain() {
    for (silu, shape, groups) in [
        (false, [2, 8, 5, 3], 4),
        (true, [3, 6, 4, 4], 2),
        (true, [1, 4, 7, 1], 4),
    ] {
        let c = shape[1];
        let x = ((randn(&shape, 1) * 2.0).unwrap() + 0.5).unwrap();
        let w = ((randn(&[c], 2) * 0.5).unwrap() + 1.0).unwrap();
        let b = randn(&[c], 3);
        let ff = move |t: &[Tensor]| fused::group_norm(&t[0], &t[1], &t[2], groups, 1e-5, silu);
        let pf = move |t: &[Tensor]| plain::group_norm(&t[0], &t[1], &t[2], groups, 1e-5, silu);
        check(
            &format!("group_norm silu={silu} {shape:?}"),
            &ff,
            &pf,
            &[x, w, b],
        );
    }
}

#[test]
fn layer_norm_matches_plain() {
    for shape in [vec![2, 5, 16], vec![7, 33], vec![1, 1, 8]] {
        let d = *shape.last().unwrap();
        let x = ((randn(&shape, 4) * 3.0).unwrap() - 1.0).unwrap();
        let w = ((randn(&[d], 5) * 0.5).unwrap() + 1.0).unwrap();
        let b = randn(&[d], 6);
        let ff = |t: &[Tensor]| fused::layer_norm(&t[0], &t[1], &t[2], 1e-5);
        let pf = |t: &[Tensor]| plain::layer_norm(&t[0], &t[1], &t[2], 1e-5);
        check(&format!("layer_norm {shape:?}"), &ff, &pf, &[x, w, b]);
    }
}

#[test]
fn softmax_matches_plain() {
    for (shape, scale) in [
        (vec![2, 3, 5, 7], 1.0),
        (vec![4, 40], 0.125),
        (vec![3, 1], 2.0),
    ] {
        let x = (randn(&shape, 7) * 2.0).unwrap();
        let ff = move |t: &[Tensor]| fused::softmax_last_dim(&t[0], scale);
        let pf = move |t: &[Tensor]| plain::softmax_last_dim(&t[0], scale);
        check(&format!("softmax {shape:?} scale {scale}"), &ff, &pf, &[x]);
    }
}

#[test]
fn geglu_matches_plain() {
    for shape in [vec![2, 5, 12], vec![9, 2]] {
        let h = (randn(&shape, 8) * 1.5).unwrap();
        let ff = |t: &[Tensor]| fused::geglu(&t[0]);
        let pf = |t: &[Tensor]| plain::geglu(&t[0]);
        check(&format!("geglu {shape:?}"), &ff, &pf, &[h]);
    }
}

#[test]
fn add_bias_matches_plain() {
    for (shape, dim) in [
        (vec![2, 6, 3, 4], 1),
        (vec![10, 7], 1),
        (vec![2, 3, 5], 2),
        (vec![4, 3], 0),
    ] {
        let y = randn(&shape, 9);
        let b = randn(&[shape[dim]], 10);
        let ff = move |t: &[Tensor]| fused::add_bias(&t[0], &t[1], dim);
        let pf = move |t: &[Tensor]| plain::add_bias(&t[0], &t[1], dim);
        check(&format!("add_bias {shape:?} dim {dim}"), &ff, &pf, &[y, b]);
    }
}

/// A non-contiguous input (a transposed view) goes through the fused ops.
#[test]
fn fused_ops_accept_strided_inputs() {
    let x = randn(&[4, 6, 8], 11).transpose(1, 2).unwrap();
    let w = randn(&[6], 12);
    let b = randn(&[6], 13);
    let a = fused::layer_norm(&x, &w, &b, 1e-5).unwrap();
    let p = plain::layer_norm(&x, &w, &b, 1e-5).unwrap();
    assert!(rel_err(&a, &p) < 1e-5);
    let s = fused::softmax_last_dim(&x, 1.0).unwrap();
    let sp = plain::softmax_last_dim(&x, 1.0).unwrap();
    assert!(rel_err(&s, &sp) < 1e-5);
}

/// Conv2d + bias as one fused node (im2col / 1×1 GEMM inside) against the
/// unfused ops (and candle's conv2d for the values).
#[test]
fn conv2d_bias_matches_plain() {
    for (x_shape, o, k, stride, padding) in [
        (vec![2, 3, 6, 5], 4, 3, 1, 1),
        (vec![2, 3, 7, 6], 5, 3, 2, 1),
        (vec![1, 4, 6, 6], 3, 3, 2, 0),
        (vec![3, 5, 4, 3], 6, 1, 1, 0),
        (vec![1, 5, 4, 3], 6, 1, 1, 0),
        // Batches spread over threads (odd and even counts), stride 2 with
        // padding 1 on odd sizes, a kernel wider than the padded border.
        (vec![5, 3, 7, 5], 4, 3, 2, 1),
        (vec![4, 2, 5, 6], 3, 3, 1, 1),
        (vec![4, 3, 6, 6], 5, 1, 1, 0),
        (vec![2, 2, 3, 3], 2, 3, 1, 2),
        // Output widths with fixed-size row moves in im2col / col2im (4, 8,
        // 16, 32) and one without (12).
        (vec![4, 3, 5, 8], 4, 3, 1, 1),
        (vec![2, 2, 3, 16], 3, 3, 1, 1),
        (vec![1, 2, 2, 32], 2, 3, 1, 1),
        (vec![4, 2, 3, 12], 3, 3, 1, 1),
    ] {
        // Whole images' columns, and columns in bands of one output row or a
        // few (as a large image's are: `MAX_BAND`).
        for band in [dreambooth::nn::conv_cpu::MAX_BAND, 1, 60] {
            let c = x_shape[1];
            let x = randn(&x_shape, 21);
            let w = (randn(&[o, c, k, k], 22) * 0.5).unwrap();
            let b = randn(&[o], 23);
            let ff = move |t: &[Tensor]| -> dreambooth::Result<Tensor> {
                Ok(dreambooth::nn::conv_cpu::conv2d_bias_banded(
                    &t[0], &t[1], &t[2], stride, padding, band,
                )?)
            };
            // The unfused path (Im2Col → matmul → bias add through candle's
            // autograd); candle's own conv2d backward gets the input-gradient
            // shape wrong for odd sizes at stride 2, so it checks values only.
            let pf = move |t: &[Tensor]| -> dreambooth::Result<Tensor> {
                let y = dreambooth::nn::im2col::conv2d_im2col(&t[0], &t[1], stride, padding)?;
                plain::add_bias(&y, &t[2], 1)
            };
            let y_candle = x
                .conv2d(&w, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
                .unwrap();
            let y_fused = ff(&[x.clone(), w.clone(), b.clone()]).unwrap();
            assert!(rel_err(&y_fused, &y_candle) < 1e-5);
            check(
                &format!("conv2d {x_shape:?} o {o} k {k} s {stride} p {padding} band {band}"),
                &ff,
                &pf,
                &[x, w, b],
            );
        }
    }
}

/// Gradients when only some inputs are trained: the input image fixed (a
/// UNet's conv_in), or the weight frozen (LoRA's base layer). Each takes a
/// different backward path from the all-trained case; all must agree with it.
#[test]
fn conv2d_partial_grads_match_full() {
    for (b, k, padding) in [(4, 3, 1), (5, 1, 0), (1, 3, 1)] {
        let x = randn(&[b, 3, 5, 4], 71);
        let w = randn(&[4, 3, k, k], 72);
        let bias = randn(&[4], 73);
        let r = randn(&[b, 4, 5, 4], 74);
        let grads = |train_x: bool, train_w: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let wv = Var::from_tensor(&w).unwrap();
            let bv = Var::from_tensor(&bias).unwrap();
            let xt = if train_x {
                xv.as_tensor().clone()
            } else {
                x.clone()
            };
            let wt = if train_w {
                wv.as_tensor().clone()
            } else {
                w.clone()
            };
            let y = dreambooth::nn::conv_cpu::conv2d_bias(&xt, &wt, bv.as_tensor(), 1, padding)
                .unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (
                g.get(&xt).cloned(),
                g.get(&wt).cloned(),
                g.get(bv.as_tensor()).cloned().expect("bias gradient"),
            )
        };
        let (dx, dw, db) = grads(true, true);
        let (dx, dw) = (dx.expect("input gradient"), dw.expect("weight gradient"));
        let (no_dx, dw_only, db1) = grads(false, true);
        assert!(no_dx.is_none(), "a fixed input got a gradient");
        assert!(
            rel_err(&dw_only.expect("weight gradient"), &dw) < 1e-5,
            "b {b} k {k}: dW"
        );
        let (dx_only, no_dw, db2) = grads(true, false);
        assert!(no_dw.is_none(), "a frozen weight got a gradient");
        assert!(
            rel_err(&dx_only.expect("input gradient"), &dx) < 1e-5,
            "b {b} k {k}: dX"
        );
        assert!(
            rel_err(&db1, &db) < 1e-5 && rel_err(&db2, &db) < 1e-5,
            "b {b} k {k}: db"
        );
    }
}

/// A per-image, per-channel bias (B, O) — a ResNet block's time embedding
/// folded into conv1 — against conv + broadcast add, at batch sizes on both
/// the per-image-threads and the one-by-one paths.
#[test]
fn conv2d_per_image_bias_matches_plain() {
    for (b, c, hw, o) in [(2, 3, 5, 4), (5, 2, 4, 3), (1, 3, 4, 2)] {
        let x = randn(&[b, c, hw, hw], 51);
        let w = (randn(&[o, c, 3, 3], 52) * 0.5).unwrap();
        let bias = randn(&[b, o], 53);
        let ff = |t: &[Tensor]| -> dreambooth::Result<Tensor> {
            Ok(dreambooth::nn::conv_cpu::conv2d_bias(
                &t[0], &t[1], &t[2], 1, 1,
            )?)
        };
        let pf = move |t: &[Tensor]| -> dreambooth::Result<Tensor> {
            let y = dreambooth::nn::im2col::conv2d_im2col(&t[0], &t[1], 1, 1)?;
            Ok(y.broadcast_add(&t[2].reshape((b, o, 1, 1))?)?)
        };
        check(
            &format!("conv2d per-image bias b {b}"),
            &ff,
            &pf,
            &[x, w, bias],
        );
    }
}

/// The parallel residual add against candle's.
#[test]
fn add_matches_plain() {
    let a = randn(&[3, 4, 5, 6], 61);
    let b = randn(&[3, 4, 5, 6], 62);
    let ff = |t: &[Tensor]| fused::add(&t[0], &t[1]);
    let pf = |t: &[Tensor]| -> dreambooth::Result<Tensor> { Ok((&t[0] + &t[1])?) };
    check("add", &ff, &pf, &[a, b]);
}

/// The fused linear layer (any rank, with and without bias) against
/// reshape + matmul + broadcast add.
#[test]
fn linear_matches_plain() {
    // 210 rows: row blocks with partial weight gradients; 40 × 64 → 64: a
    // weight larger than the inputs, one product over all rows.
    for (x_shape, out) in [
        (vec![2, 5, 6], 7),
        (vec![9, 4], 3),
        (vec![3, 70, 8], 5),
        (vec![40, 64], 64),
    ] {
        let x = randn(&x_shape, 31);
        let w = randn(&[out, *x_shape.last().unwrap()], 32);
        let b = randn(&[out], 33);
        let ff = |t: &[Tensor]| fused::linear(&t[0], &t[1], Some(&t[2]));
        let pf = |t: &[Tensor]| plain::linear(&t[0], &t[1], Some(&t[2]));
        check(
            &format!("linear {x_shape:?} → {out}"),
            &ff,
            &pf,
            &[x.clone(), w.clone(), b],
        );
        let ff = |t: &[Tensor]| fused::linear(&t[0], &t[1], None);
        let pf = |t: &[Tensor]| plain::linear(&t[0], &t[1], None);
        check(
            &format!("linear {x_shape:?} → {out}, no bias"),
            &ff,
            &pf,
            &[x, w],
        );
    }
}

/// Fused multi-head attention (self- and cross-attention shapes) against
/// split heads → q kᵀ → softmax → · v → merge heads with plain ops.
#[test]
fn multi_head_attention_matches_plain() {
    use dreambooth::nn::attention::{multi_head_attention, plain_multi_head_attention};
    // Pairs spread over threads, and one (image, head) pair alone (the
    // sequential path with multi-threaded GEMMs).
    for (b, n, m, heads, d) in [
        (2, 6, 6, 2, 3),
        (2, 5, 3, 3, 4),
        (1, 7, 7, 1, 5),
        (3, 4, 9, 1, 2),
    ] {
        let c = heads * d;
        let q = randn(&[b, n, c], 41);
        let k = randn(&[b, m, c], 42);
        let v = randn(&[b, m, c], 43);
        let scale = 1.0 / (d as f64).sqrt();
        let ff = move |t: &[Tensor]| multi_head_attention(&t[0], &t[1], &t[2], heads, scale);
        let pf = move |t: &[Tensor]| plain_multi_head_attention(&t[0], &t[1], &t[2], heads, scale);
        check(
            &format!("attention b {b} n {n} m {m} heads {heads} d {d}"),
            &ff,
            &pf,
            &[q.clone(), k.clone(), v.clone()],
        );
        // The CPU node with its scores in blocks of query rows (one row, or
        // a few and an uneven last block), as larger images run.
        for max_scores in [1, 2 * m + 1] {
            let fb = move |t: &[Tensor]| -> dreambooth::Result<Tensor> {
                Ok(dreambooth::nn::attention_cpu::multi_head_attention_blocked(
                    &t[0], &t[1], &t[2], heads, scale, max_scores,
                )?)
            };
            check(
                &format!("attention b {b} n {n} m {m} heads {heads} d {d}, {max_scores} scores"),
                &fb,
                &pf,
                &[q.clone(), k.clone(), v.clone()],
            );
        }
    }
}

#[test]
fn recompute_attention_matches_plain() {
    // The GPU's attention node (batched GEMMs + fused softmax, probabilities
    // recomputed in the backward), run here on the CPU.
    use dreambooth::nn::attention::plain_multi_head_attention;
    use dreambooth::nn::attention_recompute::multi_head_attention;
    for (b, n, m, heads, d) in [(2, 6, 6, 2, 3), (2, 5, 3, 3, 4), (1, 33, 7, 1, 5)] {
        let c = heads * d;
        let q = randn(&[b, n, c], 51);
        let k = randn(&[b, m, c], 52);
        let v = randn(&[b, m, c], 53);
        let scale = 1.0 / (d as f64).sqrt();
        let ff = move |t: &[Tensor]| multi_head_attention(&t[0], &t[1], &t[2], heads, scale);
        let pf = move |t: &[Tensor]| plain_multi_head_attention(&t[0], &t[1], &t[2], heads, scale);
        check(
            &format!("recompute attention b {b} n {n} m {m} heads {heads} d {d}"),
            &ff,
            &pf,
            &[q, k, v],
        );
    }
}

/// The recomputing node in chunks of (batch · head) pairs (a score budget of
/// one pair, of two and a half, and of all of them) gives the unchunked
/// node's output and gradients, and the plain ops'.
#[test]
fn chunked_recompute_attention_matches_unchunked() {
    use dreambooth::nn::attention::plain_multi_head_attention;
    use dreambooth::nn::attention_recompute::multi_head_attention_chunked;
    let (b, n, m, heads, d) = (2, 9, 7, 3, 4);
    let c = heads * d;
    let q = randn(&[b, n, c], 61);
    let k = randn(&[b, m, c], 62);
    let v = randn(&[b, m, c], 63);
    let scale = 1.0 / (d as f64).sqrt();
    let run = |max_scores: usize| {
        let vars: Vec<candle_core::Var> = [&q, &k, &v]
            .iter()
            .map(|t| candle_core::Var::from_tensor(t).unwrap())
            .collect();
        let o = multi_head_attention_chunked(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            heads,
            scale,
            max_scores,
        )
        .unwrap();
        let r = randn(o.dims(), 64);
        let g = (&o * r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![o];
        out.extend(vars.iter().map(|v| g.get(v).unwrap().clone()));
        out
    };
    let whole = run(usize::MAX);
    for max_scores in [1, n * m, 5 * n * m / 2] {
        let chunked = run(max_scores);
        for (i, (a, w)) in chunked.iter().zip(&whole).enumerate() {
            assert_eq!(
                rel_err(a, w),
                0.0,
                "budget {max_scores}: tensor {i} differs"
            );
        }
    }
    // The single-head form with a value width unlike the key's.
    use dreambooth::nn::attention_recompute::attention_chunked;
    let (q1, k1, v1) = (
        randn(&[5, n, 4], 65),
        randn(&[5, m, 4], 66),
        randn(&[5, m, 6], 67),
    );
    let whole = attention_chunked(&q1, &k1, &v1, 0.5, usize::MAX).unwrap();
    assert_eq!(whole.dims(), &[5, n, 6]);
    for max_scores in [1, 2 * n * m] {
        let chunked = attention_chunked(&q1, &k1, &v1, 0.5, max_scores).unwrap();
        assert_eq!(rel_err(&chunked, &whole), 0.0, "dv 6, budget {max_scores}");
    }
    check(
        "chunked recompute attention",
        &move |t: &[Tensor]| multi_head_attention_chunked(&t[0], &t[1], &t[2], heads, scale, n * m),
        &move |t: &[Tensor]| plain_multi_head_attention(&t[0], &t[1], &t[2], heads, scale),
        &[q.clone(), k.clone(), v.clone()],
    );
}

/// The flash attention node's backward (the GPU's; the forward is the CUDA
/// kernel, checked in tests/cuda_sim.rs): the recomputing backward on the
/// heads split out of token-major q, k, v gives autograd's gradients of the
/// plain ops, in chunks of one pair, of two and of all of them; and the
/// flash path is never taken off a CUDA device.
#[test]
fn flash_attention_backward_matches_plain_gradients() {
    use dreambooth::nn::attention::plain_multi_head_attention;
    use dreambooth::nn::attention_flash::{token_major_backward, usable};
    let (b, n, m, heads, d) = (2, 9, 7, 3, 4);
    let c = heads * d;
    let vars: Vec<candle_core::Var> = [(n, 71), (m, 72), (m, 73)]
        .iter()
        .map(|&(rows, seed)| candle_core::Var::from_tensor(&randn(&[b, rows, c], seed)).unwrap())
        .collect();
    let (q, k, v) = (
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    );
    let scale = 1.0 / (d as f64).sqrt();
    let o = plain_multi_head_attention(q, k, v, heads, scale).unwrap();
    let r = randn(o.dims(), 74);
    let grads = (&o * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for chunk in [1, 2, b * heads] {
        let (dq, dk, dv) = token_major_backward(q, k, v, &r, heads, scale, chunk).unwrap();
        for (name, ours, x) in [("dq", &dq, q), ("dk", &dk, k), ("dv", &dv, v)] {
            assert_eq!(ours.dims(), x.dims(), "{name} shape");
            let e = rel_err(ours, grads.get(x).unwrap());
            assert!(e < 1e-5, "chunk {chunk}: {name} relative error {e:.2e}");
        }
    }
    let half = q.to_dtype(candle_core::DType::BF16).unwrap();
    assert!(!usable(&half, heads), "flash attention is CUDA-only");
}

#[test]
fn layout_ops_match_plain() {
    use dreambooth::nn::layout;
    // Sizes that leave partial blocks (20 channels: the transpose writes 16
    // rows per task) and single pixels.
    for (i, shape) in [[2, 3, 5, 7], [1, 2, 1, 1], [3, 4, 2, 6]]
        .iter()
        .enumerate()
    {
        check(
            "upsample_nearest_2x",
            &|x| layout::upsample_nearest_2x(&x[0]),
            &|x| layout::plain::upsample_nearest_2x(&x[0]),
            &[randn(shape, 40 + i as u64)],
        );
    }
    for (i, shape) in [[2, 20, 3, 5], [1, 3, 4, 4], [2, 17, 1, 33]]
        .iter()
        .enumerate()
    {
        let (h, w) = (shape[2], shape[3]);
        check(
            "map_to_tokens",
            &|x| layout::map_to_tokens(&x[0]),
            &|x| layout::plain::map_to_tokens(&x[0]),
            &[randn(shape, 50 + i as u64)],
        );
        let tokens = [shape[0], h * w, shape[1]];
        check(
            "tokens_to_map",
            &move |x| layout::tokens_to_map(&x[0], h, w),
            &move |x| layout::plain::tokens_to_map(&x[0], h, w),
            &[randn(&tokens, 60 + i as u64)],
        );
        // A round trip is the identity, also from a strided (transposed) view.
        let x = randn(shape, 70 + i as u64);
        let back = layout::tokens_to_map(&layout::map_to_tokens(&x).unwrap(), h, w).unwrap();
        assert_eq!(rel_err(&back, &x), 0.0);
        let t = randn(&[shape[0], shape[1], h * w], 80 + i as u64)
            .transpose(1, 2)
            .unwrap();
        let map = layout::tokens_to_map(&t, h, w).unwrap();
        let want = layout::plain::tokens_to_map(&t, h, w).unwrap();
        assert_eq!(rel_err(&map, &want), 0.0);
    }
    let cat_shapes: [(&[usize], &[usize]); 3] = [
        (&[2, 3, 4, 5], &[2, 6, 4, 5]),
        (&[1, 1, 2, 2], &[1, 4, 2, 2]),
        (&[3, 2, 7], &[3, 5, 7]),
    ];
    for (i, (a, b)) in cat_shapes.iter().enumerate() {
        check(
            "cat_channels",
            &|x| layout::cat_channels(&x[0], &x[1]),
            &|x| layout::plain::cat_channels(&x[0], &x[1]),
            &[randn(a, 90 + i as u64), randn(b, 95 + i as u64)],
        );
    }
    // Shapes that disagree beyond the channels: candle's error, no panic.
    assert!(layout::cat_channels(&randn(&[1, 2, 3, 3], 2), &randn(&[1, 2, 3, 4], 3)).is_err());
    let err = layout::tokens_to_map(&randn(&[1, 6, 2], 1), 2, 2).unwrap_err();
    assert!(err.to_string().contains("6 tokens"), "{err}");
}

/// Empty tensors through the CPU ops give what candle's ops give (an empty
/// or zero result), never a panic.
#[test]
fn empty_inputs_match_plain() {
    use dreambooth::nn::layout;
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let e = z(&[2, 0, 3, 3]);
    assert_eq!(
        layout::upsample_nearest_2x(&e).unwrap().dims(),
        [2, 0, 6, 6]
    );
    assert_eq!(layout::map_to_tokens(&e).unwrap().dims(), [2, 9, 0]);
    assert_eq!(
        layout::tokens_to_map(&z(&[2, 9, 0]), 3, 3).unwrap().dims(),
        [2, 0, 3, 3]
    );
    let a = randn(&[2, 3, 3, 3], 7);
    let cat = layout::cat_channels(&a, &e).unwrap();
    assert_eq!(rel_err(&cat, &a), 0.0);
    // No rows: an empty result.
    let y = fused::linear(&z(&[0, 5]), &randn(&[3, 5], 8), Some(&randn(&[3], 9))).unwrap();
    assert_eq!(y.dims(), [0, 3]);
    // No input features: whatever candle does (an error today), not a panic.
    let (x, w, b) = (z(&[4, 0]), z(&[3, 0]), randn(&[3], 10));
    assert_eq!(
        fused::linear(&x, &w, Some(&b)).is_ok(),
        plain::linear(&x, &w, Some(&b)).is_ok()
    );
}
