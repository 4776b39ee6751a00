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
