//! The fused in-place AdamW (CPU, f32) against the plain candle-op version:
//! same weights and moments after several steps (with gradient scaling and a
//! changing learning rate), against torch.optim.AdamW's formula in f64, and a
//! save / restore of the state in the middle that ends where an uninterrupted
//! run ends.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use common::rel_err;
use dreambooth::optim::{AdamW, AdamWConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Parameter shapes: a bias, a small matrix, a conv weight, and one larger
/// than the fused kernel's chunk (so several threads share it).
const SHAPES: &[&[usize]] = &[&[7], &[33, 17], &[8, 4, 3, 3], &[70_001]];

fn rand_tensor(rng: &mut StdRng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn make_vars(seed: u64) -> BTreeMap<String, Var> {
    let mut rng = StdRng::seed_from_u64(seed);
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                format!("p{i}"),
                Var::from_tensor(&rand_tensor(&mut rng, d, 1.0)).unwrap(),
            )
        })
        .collect()
}

/// Gradients of step `k` (some exact zeros, some large values).
fn grads(step: u64) -> BTreeMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(1000 + step);
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut g = rand_tensor(&mut rng, d, 10f32.powi(i as i32 - 2));
            if i == 1 {
                // A block of zero gradients (v stays 0: denominator is eps).
                let mask: Vec<f32> = (0..g.elem_count())
                    .map(|j| if j % 5 == 0 { 0.0 } else { 1.0 })
                    .collect();
                let mask = Tensor::from_vec(mask, *d, &Device::Cpu).unwrap();
                g = (g * mask).unwrap();
            }
            (format!("p{i}"), g)
        })
        .collect()
}

fn config() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.05,
        ..Default::default()
    }
}

/// (lr, grad_scale) of step k.
fn hyper(k: u64) -> (f64, f64) {
    let lr = 1e-3 * (1.0 - 0.1 * k as f64);
    let scale = if k % 2 == 1 { 0.37 } else { 1.0 };
    (lr, scale)
}

fn run(fused: bool, steps: u64) -> (AdamW, BTreeMap<String, Var>) {
    let vars = make_vars(0);
    let mut opt = AdamW::new(vars.clone(), config()).unwrap();
    opt.fused = fused;
    for k in 0..steps {
        let (lr, s) = hyper(k);
        opt.step_map(&grads(k), lr, s).unwrap();
    }
    (opt, vars)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.iter()
        .zip(&b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / (y.abs() as f64).max(1e-12))
        .fold(0.0, f64::max)
}

#[test]
fn fused_adamw_equals_plain() {
    let steps = 6;
    let (fo, fv) = run(true, steps);
    let (po, pv) = run(false, steps);
    let (fs, ps) = (fo.state(), po.state());
    for (k, var) in &fv {
        let d = max_rel_diff(var.as_tensor(), pv[k].as_tensor());
        println!("{k}: weight max rel diff {d:.2e}");
        assert!(d <= 1e-6, "{k}: weight differs by {d:.3e}");
        for mom in ["m", "v"] {
            let key = format!("{mom}.{k}");
            let d = max_rel_diff(&fs[&key], &ps[&key]);
            assert!(d <= 1e-6, "{key}: differs by {d:.3e}");
        }
    }
}

/// torch.optim.AdamW's update in f64 (foreach=False):
/// p ← p·(1 − lr·wd); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
/// p ← p − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps).
#[test]
fn fused_adamw_matches_torch_formula() {
    let steps = 6;
    let (_, fv) = run(true, steps);
    let c = config();
    let init = make_vars(0);
    for (key, var0) in &init {
        let mut p: Vec<f64> = var0
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut m = vec![0f64; p.len()];
        let mut v = vec![0f64; p.len()];
        for k in 0..steps {
            let (lr, s) = hyper(k);
            let g: Vec<f64> = grads(k)[key]
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let t = (k + 1) as i32;
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            for i in 0..p.len() {
                let gi = g[i] * s;
                p[i] *= 1.0 - lr * c.weight_decay;
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
                let denom = v[i].sqrt() / bc2.sqrt() + c.eps;
                p[i] -= lr / bc1 * m[i] / denom;
            }
        }
        let want = Tensor::from_vec(p, var0.as_tensor().dims(), &Device::Cpu).unwrap();
        let got = fv[key].as_tensor().to_dtype(DType::F64).unwrap();
        let e = rel_err(&got, &want);
        println!("{key}: rel err vs f64 torch formula {e:.2e}");
        assert!(e < 1e-6, "{key}: {e:.3e}");
    }
}

/// Save the state after 3 steps (through safetensors, as checkpoints do),
/// restore it into a fresh optimizer over restored weights, run 3 more: the
/// result is bit-identical to 6 uninterrupted steps; restoring does not
/// alias the caller's tensors.
#[test]
fn fused_adamw_state_roundtrip_is_exact() {
    let (full, full_vars) = run(true, 6);
    let (half, half_vars) = run(true, 3);
    let dir = std::env::temp_dir().join(format!("dreambooth-optim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let opath = dir.join("unet.optimizer.safetensors");
    dreambooth::nn::save_safetensors(&half.state(), &opath, None).unwrap();
    let weights: BTreeMap<String, Tensor> = half_vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    drop(half);

    let vars = make_vars(99); // different start, overwritten below
    for (k, v) in &vars {
        v.set(&weights[k]).unwrap();
    }
    let mut opt = AdamW::new(vars.clone(), config()).unwrap();
    let state: BTreeMap<String, Tensor> = dreambooth::nn::read_safetensors(&opath, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let snapshot: BTreeMap<String, Vec<f32>> = state
        .iter()
        .map(|(k, t)| (k.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    opt.load_state(&state, 3).unwrap();
    for k in 3..6 {
        let (lr, s) = hyper(k);
        opt.step_map(&grads(k), lr, s).unwrap();
    }
    for (k, t) in &state {
        let now: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(now, snapshot[k], "{k}: load_state's input was modified");
    }
    let (fs, rs) = (full.state(), opt.state());
    for (k, v) in &vars {
        let a: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = full_vars[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "{k}: resumed weights differ");
    }
    for (k, t) in &fs {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = rs[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{k}: resumed moments differ");
    }
    std::fs::remove_dir_all(&dir).ok();
}
