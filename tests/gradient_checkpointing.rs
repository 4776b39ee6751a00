//! Gradient checkpointing (`nn::checkpoint`, `train --gradient-checkpointing`):
//! the UNet and the text encoder give the same outputs and the same
//! gradients for every trainable tensor with their blocks recomputed in the
//! backward pass as without (full weights, f16 mixed precision, LoRA adapters
//! with dropout behind a frozen base), and a training step's peak heap is
//! much lower with it. The same for blocks whose graphs are released one by
//! one in the backward pass (`Mode::Release`): same gradients, and a peak
//! below the plain step's by a good part of the gradients' size. And for the
//! fused backward pass (`optim::fused_backward`, AdamW inside the backward):
//! the same weights as a backward then an AdamW step, per-weight clipping,
//! and a peak below the released step's by a good part of the gradients' size.
//!
//! This file counts the bytes its process allocates, so its tests run one at a
//! time (they take [`serial`]).

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use common::{assert_identical, fixtures, load, rel_err};
use dreambooth::models::lora::{self, LoraSpec};
use dreambooth::models::{LoadOptions, StableDiffusion, UNet2DConditionModel};
use dreambooth::nn::Precision;
use dreambooth::nn::checkpoint::{Checkpointing, Mode};
use dreambooth::optim::{AdamW, AdamWConfig, clip_factor, fused_backward, grad_norm};

/// mimalloc, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { mimalloc::MiMalloc.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(dreambooth::nn::cpu::configure);
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny(name: &str) -> PathBuf {
    fixtures().join(format!("tiny-{name}"))
}

/// Gradients of `sum(out · r)` for the UNet run on the parity fixture's
/// inputs, by name (`sample`, `context` and every var of `vars`).
fn unet_grads(
    unet: &UNet2DConditionModel,
    ck: Option<&Arc<Checkpointing>>,
    fx: &std::collections::HashMap<String, Tensor>,
    vars: &BTreeMap<String, Var>,
    precision: Precision,
) -> (Tensor, BTreeMap<String, Tensor>) {
    let sample = Var::from_tensor(&fx["sample"]).unwrap();
    let context = Var::from_tensor(&fx["context"]).unwrap();
    let unet = match ck {
        Some(c) => unet.with_gradient_checkpointing(c),
        None => unet.clone(),
    };
    let out = unet
        .forward(
            &precision.cast(&sample).unwrap(),
            &fx["timesteps"],
            &context,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let loss = (&out * &fx["r"]).unwrap().sum_all().unwrap();
    let grads = dreambooth::nn::checkpoint::backward(ck.map(|c| &**c), &loss).unwrap();
    let mut by_name = named(&grads, vars);
    by_name.insert("sample".into(), grads.get(&sample).unwrap().clone());
    by_name.insert("context".into(), grads.get(&context).unwrap().clone());
    (out, by_name)
}

/// Every var's gradient, by name; panics naming a var that got none.
fn named(grads: &GradStore, vars: &BTreeMap<String, Var>) -> BTreeMap<String, Tensor> {
    vars.iter()
        .map(|(k, v)| {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("no gradient for {k}"));
            assert_eq!(g.dims(), v.dims(), "{k}");
            (k.clone(), g.clone())
        })
        .collect()
}

/// Same keys, every tensor within `tol` relative L2 error; returns the worst.
fn assert_all_close(
    what: &str,
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    tol: f64,
) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    let mut worst = 0f64;
    for (k, ta) in a {
        let e = rel_err(ta, &b[k]);
        assert!(e < tol, "{what}: `{k}` differs by {e:.2e}");
        worst = worst.max(e);
    }
    eprintln!("{what}: {} gradients, worst rel err {worst:.2e}", a.len());
    worst
}

#[test]
fn unet_gradients_are_the_same_with_checkpointing() {
    let _g = serial();
    for name in ["sd1", "sd2"] {
        let fx = load(&format!("parity/{name}_unet.safetensors"));
        let (unet, vb) =
            UNet2DConditionModel::load(&tiny(name).join("unet"), &Device::Cpu, true).unwrap();
        let vars = vb.vars();
        for (mode, precision) in [
            (Mode::Recompute, Precision::F32),
            (Mode::Recompute, Precision::F16),
            (Mode::Release, Precision::F32),
        ] {
            let ck = Checkpointing::with_mode(&Device::Cpu, vars.values(), mode).unwrap();
            let what = format!("{name} {mode:?} {}", precision.name());
            let (out, plain) = unet_grads(&unet, None, &fx, &vars, precision);
            let (out_ck, checkpointed) = unet_grads(&unet, Some(&ck), &fx, &vars, precision);
            // The forward runs the same ops on the same inputs.
            assert_eq!(
                out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                out_ck.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{what}: outputs"
            );
            assert_eq!(checkpointed.len(), vars.len() + 2);
            // Only the order in which gradients add up may differ.
            let tol = if precision == Precision::F32 {
                1e-5
            } else {
                5e-3
            };
            assert_all_close(&what, &checkpointed, &plain, tol);
            if precision == Precision::F32 {
                // And both are diffusers' gradients.
                for (k, v) in fx.iter().filter(|(k, _)| k.starts_with("grad.")) {
                    let key = &k["grad.".len()..];
                    let e = rel_err(&checkpointed[key], v);
                    assert!(e < 1e-4, "{what}: {key} vs diffusers: {e:.2e}");
                }
            }
        }
    }
}

#[test]
fn lora_adapter_gradients_are_the_same_with_checkpointing() {
    let _g = serial();
    // `attn`: the first blocks are frozen and their inputs take no part in
    // backprop, so only the adapters inside a block make it trainable.
    for targets in ["attn", "all-linear+conv"] {
        let mut sd =
            StableDiffusion::load(&tiny("sd1"), &Device::Cpu, LoadOptions::default()).unwrap();
        let spec = LoraSpec {
            rank: 2,
            alpha: 2.0,
            // Dropout masks are drawn from the step, so the recomputed
            // block drops what the forward dropped.
            dropout: 0.25,
            targets: targets.parse().unwrap(),
            text_encoder: false,
            seed: 3,
        };
        lora::attach_trainable(&mut sd, &spec).unwrap();
        let vars = lora::trainable_vars(&sd);
        // B starts at zero; give it values so every adapter's A gets a gradient.
        for (k, v) in &vars {
            if k.contains("lora_B") {
                v.set(&Tensor::randn(0f32, 0.1, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let dropout = lora::dropout_control(&sd).expect("dropout on");
        dropout.begin_step(5);
        let fx = load("parity/sd1_unet.safetensors");
        let grads = |ck: Option<&Arc<Checkpointing>>| {
            let unet = match ck {
                Some(c) => sd.unet.with_gradient_checkpointing(c),
                None => sd.unet.clone(),
            };
            // The inputs take no part in backprop: only the adapters train.
            let out = unet
                .forward(&fx["sample"], &fx["timesteps"], &fx["context"])
                .unwrap();
            let loss = (&out * &fx["r"]).unwrap().sum_all().unwrap();
            let g = dreambooth::nn::checkpoint::backward(ck.map(|c| &**c), &loss).unwrap();
            (out, named(&g, &vars))
        };
        let (out, plain) = grads(None);
        for mode in [Mode::Recompute, Mode::Release] {
            let ck = Checkpointing::with_mode(&Device::Cpu, vars.values(), mode).unwrap();
            let (out_ck, checkpointed) = grads(Some(&ck));
            assert!(
                rel_err(&out_ck, &out) == 0.0,
                "{targets} {mode:?}: outputs differ"
            );
            assert_all_close(
                &format!("LoRA {targets} {mode:?}"),
                &checkpointed,
                &plain,
                1e-5,
            );
        }
        dropout.end_step();
        assert!(vars.len() >= 20, "{targets}: {} adapters", vars.len());
        // The dropout was on: without it the output is another.
        let (off, _) = grads(None);
        assert!(
            rel_err(&off, &out) > 1e-4,
            "{targets}: dropout did not change the output"
        );
    }
}

#[test]
fn text_encoder_gradients_are_the_same_with_checkpointing() {
    let _g = serial();
    let sd = StableDiffusion::load(
        &tiny("sd1"),
        &Device::Cpu,
        LoadOptions {
            train_text_encoder: true,
            ..Default::default()
        },
    )
    .unwrap();
    let vars = sd.text_encoder_vb.vars();
    let ck = Checkpointing::new(&Device::Cpu, vars.values()).unwrap();
    let (ids, _) = sd
        .tokenize(&["a photo of sks ball".to_string(), "a ball".to_string()])
        .unwrap();
    let d = sd.text_encoder.config.hidden_size;
    let r = Tensor::randn(0f32, 1.0, (2, ids.dim(1).unwrap(), d), &Device::Cpu).unwrap();
    let run = |ck: Option<&Arc<Checkpointing>>| {
        let te = match ck {
            Some(c) => sd.text_encoder.with_gradient_checkpointing(c),
            None => sd.text_encoder.clone(),
        };
        let h = te.forward(&ids).unwrap();
        let loss = (h.sqr().unwrap() * &r).unwrap().sum_all().unwrap();
        let g = dreambooth::nn::checkpoint::backward(ck.map(|c| &**c), &loss).unwrap();
        (h, named(&g, &vars))
    };
    let (h, plain) = run(None);
    let (h_ck, checkpointed) = run(Some(&ck));
    assert!(rel_err(&h_ck, &h) == 0.0, "outputs differ");
    assert_all_close("text encoder", &checkpointed, &plain, 1e-5);
}

/// Peak bytes allocated above the start while `f` runs.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

/// A training step of tiny-sd1's UNet on a random `batch` × 4 × `side`²
/// latent: the gradients of every weight, through `ck` when given.
struct TinyStep {
    unet: UNet2DConditionModel,
    vars: BTreeMap<String, Var>,
    sample: Tensor,
    context: Tensor,
    t: Tensor,
}

impl TinyStep {
    fn new(batch: usize, side: usize) -> Self {
        let (unet, vb) =
            UNet2DConditionModel::load(&tiny("sd1").join("unet"), &Device::Cpu, true).unwrap();
        Self::of(unet, vb, batch, side)
    }

    /// tiny-sd1's UNet `k` times as wide, with random weights: gradients
    /// `k²` times as large.
    fn wide(k: usize, batch: usize, side: usize) -> Self {
        let path = tiny("sd1").join("unet/config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        cfg["block_out_channels"] = serde_json::json!([16 * k, 32 * k, 32 * k]);
        let cfg: dreambooth::models::config::UNetConfig = serde_json::from_value(cfg).unwrap();
        let vb = dreambooth::nn::Vb::random(5, &Device::Cpu, true);
        let unet = UNet2DConditionModel::new(&vb, &cfg).unwrap();
        Self::of(unet, vb, batch, side)
    }

    fn of(unet: UNet2DConditionModel, vb: dreambooth::nn::Vb, batch: usize, side: usize) -> Self {
        let ts: Vec<f32> = (0..batch).map(|i| 300.0 + 400.0 * i as f32).collect();
        Self {
            unet,
            vars: vb.vars(),
            sample: Tensor::randn(0f32, 1.0, (batch, 4, side, side), &Device::Cpu).unwrap(),
            context: Tensor::randn(0f32, 1.0, (batch, 8, 32), &Device::Cpu).unwrap(),
            t: Tensor::from_vec(ts, batch, &Device::Cpu).unwrap(),
        }
    }

    fn checkpointing(&self, mode: Mode) -> Arc<Checkpointing> {
        Checkpointing::with_mode(&Device::Cpu, self.vars.values(), mode).unwrap()
    }

    fn grads(&self, ck: Option<&Arc<Checkpointing>>) -> BTreeMap<String, Tensor> {
        let unet = match ck {
            Some(c) => self.unet.with_gradient_checkpointing(c),
            None => self.unet.clone(),
        };
        let out = unet.forward(&self.sample, &self.t, &self.context).unwrap();
        let loss = out.sqr().unwrap().mean_all().unwrap();
        let g = dreambooth::nn::checkpoint::backward(ck.map(|c| &**c), &loss).unwrap();
        named(&g, &self.vars)
    }

    /// The bytes of the gradients themselves (f32, one per weight).
    fn grad_bytes(&self) -> usize {
        self.vars.values().map(|v| v.elem_count() * 4).sum()
    }
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[test]
fn checkpointing_lowers_a_training_steps_peak_memory() {
    let _g = serial();
    // A 16×16 latent, batch 2 (instance + class). The gradients themselves
    // (one per weight) are needed either way; what checkpointing saves is
    // the activations above them. (At larger latents the tiny model's few
    // channels let one layer's attention scores fill the checkpointed peak.)
    let step = TinyStep::new(2, 16);
    let ck = step.checkpointing(Mode::Recompute);
    // One untimed step first: lazily made buffers and pools count for neither.
    step.grads(Some(&ck));
    let (plain, plain_peak) = peak_during(|| step.grads(None));
    let (checkpointed, ck_peak) = peak_during(|| step.grads(Some(&ck)));
    let grad_bytes = step.grad_bytes();
    eprintln!(
        "peak heap of one step: {:.1} MiB plain, {:.1} MiB checkpointed ({:.1} MiB of gradients)",
        mib(plain_peak),
        mib(ck_peak),
        mib(grad_bytes)
    );
    assert_all_close("16×16 step", &checkpointed, &plain, 1e-5);
    let (plain_act, ck_act) = (
        plain_peak.saturating_sub(grad_bytes),
        ck_peak.saturating_sub(grad_bytes),
    );
    assert!(
        (ck_act as f64) < 0.4 * plain_act as f64,
        "checkpointed activations {:.1} MiB are not under 0.4 × the plain {:.1} MiB",
        mib(ck_act),
        mib(plain_act)
    );
}

/// Released block by block, a step's activations go as its gradients come
/// (no recompute): the peak falls below the plain step's by a good part of
/// the gradients' size (tiny-sd1 4 times as wide, a 16×16 latent at batch
/// 1: 22 MiB of activations beside 33 MiB of gradients; it saved 13 MiB).
#[test]
fn released_block_graphs_lower_a_steps_peak_memory() {
    let _g = serial();
    let step = TinyStep::wide(4, 1, 16);
    let ck = step.checkpointing(Mode::Release);
    // One untimed step first: lazily made buffers and pools count for neither.
    step.grads(Some(&ck));
    let (plain, plain_peak) = peak_during(|| step.grads(None));
    let (released, released_peak) = peak_during(|| step.grads(Some(&ck)));
    let grad_bytes = step.grad_bytes();
    eprintln!(
        "peak heap of one step: {:.2} MiB plain, {:.2} MiB released ({:.2} MiB of gradients)",
        mib(plain_peak),
        mib(released_peak),
        mib(grad_bytes)
    );
    assert_all_close("16×16 step, released", &released, &plain, 1e-5);
    assert!(
        released_peak + grad_bytes / 4 < plain_peak,
        "released peak {:.2} MiB is not a quarter of the gradients below the plain {:.2} MiB",
        mib(released_peak),
        mib(plain_peak)
    );
}

/// The figure behind docs/performance.md's released-block-graphs table, not
/// a test: SD 1.5 full fine-tune steps (random weights) plain, with released
/// block graphs, with gradient checkpointing and with the fused backward
/// pass (released blocks, and checkpointed), printing each one's peak of
/// live heap bytes. `RES` (default 256) and `BATCH` (default 1) set the
/// shapes; 512 / 2 needs about 21 GiB for all of them in one process.
/// `MODES` (e.g. `fused,fused-recompute`) runs some: plain, release,
/// recompute, fused, fused-recompute.
///
/// `[MODES=…] RES=512 BATCH=2 cargo test --release --test gradient_checkpointing -- --ignored --nocapture`
#[test]
#[ignore]
fn sd15_peak_live_heap() {
    let _g = serial();
    use dreambooth::bench::{Arch, StepBenchOptions, bench_step};
    let var = |k: &str, d: usize| std::env::var(k).map_or(d, |v| v.parse().unwrap());
    let only = std::env::var("MODES").ok();
    for (name, mode, fused) in [
        ("plain", None, false),
        ("release", Some(Mode::Release), false),
        ("recompute", Some(Mode::Recompute), false),
        ("fused", Some(Mode::Release), true),
        ("fused-recompute", Some(Mode::Recompute), true),
    ] {
        if only
            .as_deref()
            .is_some_and(|m| !m.split(',').any(|x| x == name))
        {
            continue;
        }
        let opts = StepBenchOptions {
            arch: Arch::Sd15,
            res: var("RES", 256),
            batch: var("BATCH", 1),
            warmup: 1,
            steps: 1,
            seed: 0,
            lora: None,
            precision: Precision::F32,
            with_encoders: false,
            checkpointing: mode,
            fused_backward_pass: fused,
        };
        let (r, peak) =
            peak_during(|| bench_step(&opts, &Device::Cpu, &mut |l| eprintln!("{l}")).unwrap());
        eprintln!(
            "{name} ({mode:?}{}): peak live heap {:.2} GiB, step {:.2} s",
            if fused { ", fused backward pass" } else { "" },
            peak as f64 / (1u64 << 30) as f64,
            r.median.total()
        );
    }
}

impl TinyStep {
    /// tiny-sd1 loaded again (its own weights) on the same inputs.
    fn twin(&self) -> Self {
        let (unet, vb) =
            UNet2DConditionModel::load(&tiny("sd1").join("unet"), &Device::Cpu, true).unwrap();
        Self {
            unet,
            vars: vb.vars(),
            sample: self.sample.clone(),
            context: self.context.clone(),
            t: self.t.clone(),
        }
    }

    fn loss(&self, ck: &Arc<Checkpointing>) -> Tensor {
        let out = self
            .unet
            .with_gradient_checkpointing(ck)
            .forward(&self.sample, &self.t, &self.context)
            .unwrap();
        out.sqr().unwrap().mean_all().unwrap()
    }

    /// One AdamW step from a plain backward through `ck` (the reference).
    fn step_after_backward(&self, ck: &Arc<Checkpointing>, opt: &mut AdamW, lr: f64) {
        let g = dreambooth::nn::checkpoint::backward(Some(&**ck), &self.loss(ck)).unwrap();
        opt.step(&g, lr, 1.0).unwrap();
    }

    fn weights(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect()
    }
}

fn adamw(vars: &BTreeMap<String, Var>) -> AdamW {
    AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Three fused steps give bit-identical weights to three backward passes
/// each followed by an AdamW step (the moments carry over), with the blocks
/// released and with them recomputed, and the returned norm (when asked
/// for) is the global gradient norm.
#[test]
fn fused_backward_pass_matches_backward_then_step() {
    let _g = serial();
    for mode in [Mode::Release, Mode::Recompute] {
        let reference = TinyStep::new(2, 8);
        let fused = reference.twin();
        let (ck_r, ck_f) = (reference.checkpointing(mode), fused.checkpointing(mode));
        let (mut opt_r, mut opt_f) = (adamw(&reference.vars), adamw(&fused.vars));
        let before = fused.weights();
        for step in 0..3 {
            let lr = 1e-3 * (1.0 + step as f64);
            let norm_r = grad_norm(reference.grads(Some(&ck_r)).values()).unwrap();
            reference.step_after_backward(&ck_r, &mut opt_r, lr);
            // Released with the norm, recomputed without (the bench's way).
            let want_norm = mode == Mode::Release;
            let norm_f = fused_backward(
                &ck_f,
                &fused.loss(&ck_f),
                &mut [(&mut opt_f, lr)],
                0.0,
                want_norm,
            )
            .unwrap();
            assert_eq!(norm_f.is_some(), want_norm);
            if let Some(norm_f) = norm_f {
                assert!(
                    (norm_r - norm_f).abs() <= 1e-5 * norm_r,
                    "{mode:?} step {step}: norm {norm_f} vs {norm_r}"
                );
            }
        }
        assert_eq!((opt_r.step, opt_f.step), (3, 3));
        assert_eq!(opt_f.num_params(), opt_r.num_params());
        let after = fused.weights();
        // Every weight moved (each got its updates)...
        for (k, t) in &after {
            let d = (t - &before[k]).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                d.to_scalar::<f32>().unwrap() > 0.0,
                "{mode:?}: `{k}` never updated"
            );
        }
        // ... exactly as the reference's did.
        assert_identical(&format!("{mode:?}"), &after, &reference.weights());
    }
}

/// With `max_grad_norm`, each weight's gradient is clipped by its own norm
/// (kohya's fused backward pass), not by the global one.
#[test]
fn fused_backward_pass_clips_each_gradient_by_its_own_norm() {
    let _g = serial();
    let reference = TinyStep::new(1, 8);
    let fused = reference.twin();
    let ck_r = reference.checkpointing(Mode::Release);
    let ck_f = fused.checkpointing(Mode::Release);
    let (mut opt_r, mut opt_f) = (adamw(&reference.vars), adamw(&fused.vars));
    let before = fused.weights();
    let grads = reference.grads(Some(&ck_r));
    // Between the smallest and largest per-weight norms: some clip, some not.
    let mut norms: Vec<f64> = grads
        .values()
        .map(|g| grad_norm(std::iter::once(g)).unwrap())
        .collect();
    norms.sort_by(f64::total_cmp);
    let max = norms[norms.len() / 2];
    let coefs = opt_r.begin_step(1e-3);
    let mut clipped = 0;
    for (k, g) in &grads {
        let f = clip_factor(grad_norm(std::iter::once(g)).unwrap(), max);
        clipped += usize::from(f < 1.0);
        assert!(opt_r.update(k, g, f, &coefs).unwrap());
    }
    assert!(clipped > 0 && clipped < grads.len(), "{clipped}");
    let norm = fused_backward(
        &ck_f,
        &fused.loss(&ck_f),
        &mut [(&mut opt_f, 1e-3)],
        max,
        true,
    )
    .unwrap()
    .unwrap();
    // The norm reported is the global one, before clipping.
    let global = grad_norm(grads.values()).unwrap();
    assert!((norm - global).abs() <= 1e-5 * global, "{norm} vs {global}");
    let (a, b) = (fused.weights(), reference.weights());
    let mut worst = 0f64;
    for (k, t) in &a {
        let (du_f, du_r) = ((t - &before[k]).unwrap(), (&b[k] - &before[k]).unwrap());
        let e = rel_err(&du_f, &du_r);
        assert!(e < 1e-4, "`{k}`: update differs by {e:.2e}");
        worst = worst.max(e);
    }
    eprintln!(
        "per-weight clipping: {} weights, worst rel err of the update {worst:.2e}",
        a.len()
    );
}

/// A weight used in two blocks gets gradients from both: the fused pass
/// refuses it (its first update would use half a gradient) and hands the
/// optimizer back intact.
#[test]
fn fused_backward_pass_refuses_a_weight_shared_by_two_blocks() {
    let _g = serial();
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 4), &Device::Cpu).unwrap()).unwrap();
    let vars = BTreeMap::from([("shared.weight".to_string(), w.clone())]);
    let ck = Checkpointing::with_mode(&Device::Cpu, vars.values(), Mode::Release).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4), &Device::Cpu).unwrap();
    let block = |w: Var| move |x: &Tensor, _: Option<&Tensor>| Ok(x.matmul(w.as_tensor())?);
    let h = ck.run(&x, None, block(w.clone())).unwrap();
    let y = ck.run(&h, None, block(w.clone())).unwrap();
    let loss = y.sqr().unwrap().sum_all().unwrap();
    let mut opt = adamw(&vars);
    let err = fused_backward(&ck, &loss, &mut [(&mut opt, 1e-3)], 0.0, true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shared.weight") && err.contains("two places"),
        "{err}"
    );
    assert_eq!(opt.num_params(), 16);
    // The checkpointing handle is usable again.
    let y = ck.run(&x, None, block(w.clone())).unwrap();
    let loss = y.sqr().unwrap().sum_all().unwrap();
    fused_backward(&ck, &loss, &mut [(&mut opt, 1e-3)], 0.0, true).unwrap();
}

/// Updated block by block, a step never holds the whole model's gradients:
/// its peak falls below that of released blocks followed by an AdamW step
/// by a good part of the gradients' size (tiny-sd1 4 times as wide, a 16×16
/// latent at batch 1: 33 MiB of gradients; it saved 16 MiB, the released
/// step's activations and gradients overlapping part way through).
#[test]
fn fused_backward_pass_lowers_a_steps_peak_memory() {
    let _g = serial();
    let step = TinyStep::wide(4, 1, 16);
    let ck = step.checkpointing(Mode::Release);
    let mut opt = adamw(&step.vars);
    // Untimed steps first: lazily made buffers and pools count for neither.
    step.step_after_backward(&ck, &mut opt, 1e-4);
    fused_backward(&ck, &step.loss(&ck), &mut [(&mut opt, 1e-4)], 0.0, true).unwrap();
    let ((), released_peak) = peak_during(|| step.step_after_backward(&ck, &mut opt, 1e-4));
    let (_, fused_peak) = peak_during(|| {
        fused_backward(&ck, &step.loss(&ck), &mut [(&mut opt, 1e-4)], 0.0, true).unwrap()
    });
    let grad_bytes = step.grad_bytes();
    eprintln!(
        "peak heap of one step: {:.2} MiB released + AdamW, {:.2} MiB fused ({:.2} MiB of gradients)",
        mib(released_peak),
        mib(fused_peak),
        mib(grad_bytes)
    );
    assert!(
        fused_peak + grad_bytes / 3 < released_peak,
        "fused peak {:.2} MiB is not a third of the gradients below the released {:.2} MiB",
        mib(fused_peak),
        mib(released_peak)
    );
}
