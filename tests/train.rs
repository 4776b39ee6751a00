//! The DreamBooth trainer, proven on the tiny random-weight models (fast
//! enough for every `cargo test`):
//!
//! - the denoising error at fixed noise and timesteps goes down;
//! - the model learns the subject, and prior preservation keeps what it knew
//!   of the class while training without it lets the class drift;
//! - a run stopped and resumed ends with bit-identical weights;
//! - the exported diffusers folder and single file generate the same pixels as
//!   the trained model in memory (`DREAMBOOTH_EXPORT_CHECK=DIR` also writes
//!   inputs and outputs for `tools/check_export_diffusers.py`);
//! - bad inputs are one-line errors naming the problem; Ctrl-C saves a
//!   checkpoint, says how to resume and exits with 130.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::assert_identical;
use image::RgbImage;
use rand::SeedableRng;
use rand::rngs::StdRng;

use dreambooth::diffusion::{GenerateOptions, NoiseSchedule, generate};
use dreambooth::dreambooth::config::TrainConfig;
use dreambooth::dreambooth::data::{Crop, prepare, to_tensor};
use dreambooth::dreambooth::loss::denoising_loss;
use dreambooth::dreambooth::trainer::{Events, StepInfo, TrainOutcome, train};
use dreambooth::models::{LoadOptions, StableDiffusion, UNetCond};
use dreambooth::optim::OptimizerKind;
use dreambooth::toy::world::{Subject, subject_photos};

// The binary's allocator and CPU settings: a training step is several times
// slower without them on a busy machine (see `dreambooth::nn::cpu`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Call first in every test: applies [`dreambooth::nn::cpu::configure`] once,
/// before this process's threads run any numerics.
fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(dreambooth::nn::cpu::configure);
}

const INSTANCE_PROMPT: &str = "a photo of sks ball";
const CLASS_PROMPT: &str = "a photo of ball";

fn tiny_sd1() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dreambooth-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `n` toy-world photos of the subject, as PNG files in `dir`.
fn instance_dir(dir: &Path, n: usize) -> Vec<RgbImage> {
    std::fs::create_dir_all(dir).unwrap();
    let photos: Vec<RgbImage> = subject_photos(Subject::SpotBall, n, 7)
        .into_iter()
        .map(|(_, i)| i)
        .collect();
    for (i, img) in photos.iter().enumerate() {
        img.save(dir.join(format!("photo-{i}.png"))).unwrap();
    }
    photos
}

/// A short run at 16 px (tiny-sd1's native size) on tiny-sd1.
fn config(instance: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: Some(tiny_sd1()),
        instance_dir: instance.to_path_buf(),
        instance_prompt: INSTANCE_PROMPT.into(),
        class_prompt: Some(CLASS_PROMPT.into()),
        num_class_images: 4,
        output_dir: out.to_path_buf(),
        resolution: Some(16),
        center_crop: true,
        max_train_steps: 8,
        learning_rate: 1e-3,
        checkpointing_steps: 0,
        validation_steps: 0,
        class_steps: 2,
        sample_steps: 2,
        ..Default::default()
    }
}

/// Trains per `cfg` on the CPU; `stop_at` raises the stop flag after that step.
fn run(cfg: &TrainConfig, stop_at: Option<u64>) -> (StableDiffusion, TrainOutcome, Vec<StepInfo>) {
    let (model, outcome, steps, _) = run_logged(cfg, stop_at);
    (model, outcome, steps)
}

/// [`run`], also returning the lines the trainer logged.
fn run_logged(
    cfg: &TrainConfig,
    stop_at: Option<u64>,
) -> (StableDiffusion, TrainOutcome, Vec<StepInfo>, Vec<String>) {
    common::train_until(cfg, stop_at).unwrap()
}

fn load(path: &Path) -> StableDiffusion {
    StableDiffusion::load(path, &Device::Cpu, LoadOptions::default()).unwrap()
}

/// Fixed denoising problems: each image's latent (posterior mean) noised with
/// seeded noise at timesteps spread over the whole schedule.
struct Probe {
    latents: Tensor,
    noise: Tensor,
    timesteps: Vec<usize>,
}

const PROBE_T: [usize; 6] = [50, 200, 350, 500, 700, 900];

fn probe(model: &StableDiffusion, images: &[RgbImage], res: usize, seed: u64) -> Probe {
    let views: Vec<RgbImage> = images
        .iter()
        .map(|i| prepare(i, res, Crop::Center, false))
        .collect();
    let x = to_tensor(&views, &Device::Cpu).unwrap();
    let mean = model.vae.encode(&x).unwrap().mean;
    let z = ((mean - model.vae.shift_factor()).unwrap() * model.vae.scaling_factor()).unwrap();
    let n = images.len();
    let idx: Vec<u32> = (0..n as u32)
        .flat_map(|i| std::iter::repeat_n(i, PROBE_T.len()))
        .collect();
    let latents = z
        .index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let timesteps: Vec<usize> = (0..n).flat_map(|_| PROBE_T).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let noise = dreambooth::util::randn(&mut rng, latents.dims(), &Device::Cpu).unwrap();
    Probe {
        latents,
        noise,
        timesteps,
    }
}

/// Mean denoising error of `model` on `p` under `prompt`.
fn error(model: &StableDiffusion, p: &Probe, prompt: &str) -> f64 {
    let (emb, _) = model.encode_prompt(&[prompt.to_string()], 0).unwrap();
    let emb = emb.repeat(p.timesteps.len()).unwrap();
    let (_, _, h, w) = p.latents.dims4().unwrap();
    let f = model.vae_scale_factor();
    let added = model.added_cond(&emb, h * f, w * f).unwrap();
    let schedule = NoiseSchedule::new(&model.scheduler).unwrap();
    let per = denoising_loss(
        &model.unet,
        &schedule,
        &p.latents,
        UNetCond {
            context: &emb.context,
            added: added.as_ref(),
        },
        &p.timesteps,
        &p.noise,
        dreambooth::nn::Precision::F32,
    )
    .unwrap();
    per.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

use common::copy_dir;

/// tiny-sd1 with a VAE that behaves like a trained one where it matters here:
/// a sharp posterior (std ≈ 0.002 instead of ≈ 0.9, whose noise would drown
/// the images) and latents of about unit variance (scaling factor 2.5 instead
/// of SD's 0.18215, which leaves the random VAE's latents at std ≈ 0.07).
fn sharp_model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-sd1-sharp");
    copy_dir(&tiny_sd1(), &out);
    let wpath = out.join("vae/diffusion_pytorch_model.safetensors");
    let mut w: std::collections::BTreeMap<String, Tensor> =
        dreambooth::nn::read_safetensors(&wpath, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let b = w["quant_conv.bias"].to_vec1::<f32>().unwrap();
    let c = b.len() / 2;
    let b: Vec<f32> = b
        .iter()
        .enumerate()
        .map(|(i, &v)| if i >= c { v - 12.0 } else { v })
        .collect();
    w.insert(
        "quant_conv.bias".into(),
        Tensor::new(b.as_slice(), &Device::Cpu).unwrap(),
    );
    dreambooth::nn::save_safetensors(&w, &wpath, None).unwrap();
    let cpath = out.join("vae/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
    cfg["scaling_factor"] = serde_json::json!(2.5);
    std::fs::write(&cpath, cfg.to_string()).unwrap();
    out
}

/// `n` toy-world photos of plain balls (the class), as PNG files in `dir`.
fn class_photos(dir: &Path, n: usize, seed: u64) -> Vec<RgbImage> {
    use dreambooth::toy::world::{Class, Color, Context, Paint, Scene, render};
    std::fs::create_dir_all(dir).unwrap();
    let imgs: Vec<RgbImage> = (0..n)
        .map(|i| {
            let ctx = Context::ALL[i % Context::ALL.len()];
            let colors = Color::allowed(ctx);
            let color = colors[(i * 7 + seed as usize) % colors.len()];
            render(&Scene::placed(
                ctx,
                Class::Ball,
                Paint::Plain(color),
                seed * 1000 + i as u64,
            ))
        })
        .collect();
    for (i, img) in imgs.iter().enumerate() {
        img.save(dir.join(format!("ball-{i}.png"))).unwrap();
    }
    imgs
}

// ---------------------------------------------------------------------------
// Learning
// ---------------------------------------------------------------------------

#[test]
fn denoising_error_goes_down() {
    check_error_goes_down("loss", "no");
}

/// The same with the UNet computing in f16 (mixed precision, loss scaling).
#[test]
fn denoising_error_goes_down_in_fp16_mixed_precision() {
    check_error_goes_down("loss-fp16", "fp16");
}

fn check_error_goes_down(name: &str, mixed_precision: &str) {
    init();
    let dir = tmp(name);
    let photos = instance_dir(&dir.join("instance"), 3);
    let mut cfg = config(&dir.join("instance"), &dir.join("out"));
    cfg.resolution = Some(32);
    cfg.max_train_steps = 20;
    cfg.mixed_precision = mixed_precision.into();
    let base = load(&tiny_sd1());
    let p = probe(&base, &photos, 32, 1);
    let before = error(&base, &p, INSTANCE_PROMPT);
    let (model, outcome, _) = run(&cfg, None);
    let after = error(&model, &p, INSTANCE_PROMPT);
    println!(
        "denoising error at fixed noise ({mixed_precision}): {before:.4} → {after:.4} after 20 steps"
    );
    assert_eq!(outcome.final_step, 20);
    assert!(after < 0.7 * before, "error {before:.4} → {after:.4}");

    // The log has one finite line per step, and its loss falls too.
    let log = std::fs::read_to_string(dir.join("out/logs/train.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 20);
    assert!(losses.iter().all(|l| l.is_finite()));
    let first = losses[..5].iter().sum::<f64>() / 5.0;
    let last = losses[15..].iter().sum::<f64>() / 5.0;
    println!("logged loss: first 5 steps {first:.4}, last 5 {last:.4}");
    assert!(last < first, "logged loss {first:.4} → {last:.4}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The paper's claims in miniature.
///
/// A random-weight model knows no class: trained on the subject alone it still
/// gets better at denoising everything, class images included (tiny-sd1 at
/// 32 px, 40 steps: the error on its class images fell from 1.29 to 0.38 with
/// prior preservation and to 0.43 without), so there is no prior to keep. The base model therefore first learns a class:
/// tiny-sd1 with a sharp VAE ([`sharp_model`]) fine-tuned on two toy photos of
/// plain balls as "a photo of ball". Its own samples would make poor class
/// images (in a trial its error on them was 0.48, against 0.18 on the photos
/// it learned), so those photos serve as the class images (user-provided, as
/// `--class-dir` allows). DreamBooth then teaches the spotted ball as "a photo
/// of sks ball", with and without prior preservation. Errors are measured at
/// fixed noise and timesteps: the subject's under the instance prompt, the
/// class photos' under the class prompt.
#[test]
fn learns_the_subject_and_prior_preservation_keeps_the_class() {
    init();
    let dir = tmp("learn");
    let photos = instance_dir(&dir.join("instance"), 4);
    let balls = class_photos(&dir.join("balls"), 2, 1);

    let mut pre = config(&dir.join("balls"), &dir.join("pre"));
    pre.model = Some(sharp_model(&dir));
    pre.instance_prompt = CLASS_PROMPT.into();
    pre.max_train_steps = 200;
    pre.train_batch_size = 2;
    pre.learning_rate = 2e-3;
    run(&pre, None);
    let base_path = dir.join("pre/model");
    let base = load(&base_path);
    let inst = probe(&base, &photos, 16, 1);
    let class = probe(&base, &balls, 16, 2);

    let mut with_pp = config(&dir.join("instance"), &dir.join("pp"));
    with_pp.model = Some(base_path);
    with_pp.with_prior_preservation = true;
    with_pp.class_dir = Some(dir.join("balls"));
    with_pp.num_class_images = 2;
    with_pp.max_train_steps = 80;
    with_pp.learning_rate = 1e-3;
    let (pp, ..) = run(&with_pp, None);
    let mut no_pp = with_pp.clone();
    no_pp.with_prior_preservation = false;
    no_pp.output_dir = dir.join("nopp");
    let (nopp, ..) = run(&no_pp, None);

    let figures = |m: &StableDiffusion| {
        (
            error(m, &inst, INSTANCE_PROMPT),
            error(m, &class, CLASS_PROMPT),
        )
    };
    let (b, p, n) = (figures(&base), figures(&pp), figures(&nopp));
    println!("denoising error        subject  class");
    println!("base model             {:.4}   {:.4}", b.0, b.1);
    println!("prior preservation     {:.4}   {:.4}", p.0, p.1);
    println!("no prior preservation  {:.4}   {:.4}", n.0, n.1);
    for (name, f) in [("with", p), ("without", n)] {
        assert!(
            f.0 < 0.75 * b.0,
            "{name} prior preservation the subject's error went {:.4} → {:.4}",
            b.0,
            f.0
        );
    }
    let drift = |f: (f64, f64)| f.1 / b.1 - 1.0;
    println!(
        "class drift: {:+.0}% with, {:+.0}% without",
        100.0 * drift(p),
        100.0 * drift(n)
    );
    assert!(
        drift(p) < 0.2,
        "with prior preservation the class error drifted {:+.0}%",
        100.0 * drift(p)
    );
    assert!(
        drift(n) > 0.4,
        "without prior preservation the class error drifted only {:+.0}%",
        100.0 * drift(n)
    );
    assert!(drift(n) > drift(p) + 0.3);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Resume
// ---------------------------------------------------------------------------

/// Runs `cfg` for its steps; and again stopped after step `k`, then resumed
/// from the latest checkpoint: the UNet (and text encoder) end identical.
fn check_resume(name: &str, k: u64, tweak: impl Fn(&mut TrainConfig)) {
    init();
    let dir = tmp(name);
    instance_dir(&dir.join("instance"), 3);
    let mut cfg = config(&dir.join("instance"), &dir.join("full"));
    cfg.with_prior_preservation = true;
    cfg.num_class_images = 2;
    cfg.class_dir = Some(dir.join("class"));
    cfg.max_train_steps = 6;
    cfg.center_crop = false;
    cfg.random_flip = true;
    cfg.lr_scheduler = "cosine".parse().unwrap();
    cfg.lr_warmup_steps = 2;
    tweak(&mut cfg);
    let (full, ..) = run(&cfg, None);

    cfg.output_dir = dir.join("resumed");
    let (_, stopped, steps) = run(&cfg, Some(k));
    assert!(stopped.interrupted);
    assert_eq!((stopped.final_step, steps.len() as u64), (k, k));
    let ckpt = stopped.last_checkpoint.expect("a checkpoint at the stop");
    assert!(ckpt.join("state.json").is_file());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    // An f16 run keeps its loss scale in the checkpoint; others have none.
    assert_eq!(
        state["loss_scaler"]["scale"].as_f64().is_some(),
        cfg.mixed_precision == "fp16",
        "{state}"
    );
    cfg.resume = Some("latest".into());
    let (resumed, outcome, steps) = run(&cfg, None);
    assert!(!outcome.interrupted);
    assert_eq!(outcome.final_step, cfg.max_train_steps);
    assert_eq!(steps.first().map(|s| s.step), Some(k + 1));

    assert_identical("UNet", &full.unet_vb.tensors(), &resumed.unet_vb.tensors());
    if cfg.train_text_encoder {
        assert_identical(
            "text encoder",
            &full.text_encoder_vb.tensors(),
            &resumed.text_encoder_vb.tensors(),
        );
    }
    // The log holds every step once (the resumed run appends to it).
    let log = std::fs::read_to_string(cfg.output_dir.join("logs/train.jsonl")).unwrap();
    assert_eq!(log.lines().count() as u64, cfg.max_train_steps);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resumed_run_is_bit_identical() {
    check_resume("resume", 3, |_| {});
}

#[test]
fn resumed_run_is_bit_identical_in_fp16_mixed_precision() {
    check_resume("resume-fp16", 3, |cfg| cfg.mixed_precision = "fp16".into());
}

#[test]
fn resumed_run_is_bit_identical_with_text_encoder_and_accumulation() {
    check_resume("resume-te", 2, |cfg| {
        cfg.train_text_encoder = true;
        cfg.text_encoder_lr = Some(5e-4);
        cfg.gradient_accumulation_steps = 2;
        cfg.max_train_steps = 4;
        cfg.snr_gamma = Some(5.0);
        cfg.offset_noise = 0.05;
    });
}

/// The fused backward pass's optimizer state (moments, step counts, with
/// per-weight clipping) survives a checkpoint and resume.
#[test]
fn resumed_run_is_bit_identical_with_fused_backward_pass() {
    check_resume("resume-fused", 2, |cfg| {
        cfg.fused_backward_pass = true;
        cfg.train_text_encoder = true;
        cfg.text_encoder_lr = Some(5e-4);
        cfg.max_train_steps = 4;
        cfg.max_grad_norm = 0.05;
    });
}

/// What a run trains, by name: LoRA's adapters, or the UNet's and the text
/// encoder's weights (`te.`-prefixed).
fn trained(m: &StableDiffusion, lora: bool) -> std::collections::BTreeMap<String, Tensor> {
    if lora {
        dreambooth::models::lora::trainable_vars(m)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    } else {
        let mut t = m.unet_vb.tensors();
        t.extend(
            m.text_encoder_vb
                .tensors()
                .into_iter()
                .map(|(k, v)| (format!("te.{k}"), v)),
        );
        t
    }
}

/// `--gradient-checkpointing` and `--release-block-graphs` train the same
/// weights (up to the order in which gradients add up): a full fine-tune of
/// the UNet and the text encoder with prior preservation, and LoRA with
/// adapter dropout (the recomputed blocks must drop what the forward
/// dropped).
#[test]
fn gradient_checkpointing_trains_the_same_weights() {
    init();
    let dir = tmp("grad-ckpt");
    instance_dir(&dir.join("instance"), 3);
    for lora in [false, true] {
        let mut cfg = config(&dir.join("instance"), &dir.join(format!("plain-{lora}")));
        cfg.with_prior_preservation = true;
        cfg.num_class_images = 2;
        cfg.class_dir = Some(dir.join("class"));
        cfg.max_train_steps = 4;
        cfg.train_text_encoder = true;
        cfg.text_encoder_lr = Some(5e-4);
        if lora {
            cfg.lora = true;
            cfg.lora_dropout = 0.2;
            cfg.lora_targets = "attn+conv".into();
        }
        let (plain, _, plain_steps) = run(&cfg, None);
        for release in [false, true] {
            cfg.output_dir = dir.join(format!("checkpointed-{lora}-{release}"));
            cfg.gradient_checkpointing = !release;
            cfg.release_block_graphs = release;
            let (ckpt, _, ckpt_steps) = run(&cfg, None);
            let what = match (lora, release) {
                (false, false) => "full, checkpointed",
                (false, true) => "full, block graphs released",
                (true, false) => "LoRA, checkpointed",
                (true, true) => "LoRA, block graphs released",
            };
            assert_eq!(plain_steps.len(), ckpt_steps.len());
            for (a, b) in plain_steps.iter().zip(&ckpt_steps) {
                assert!(
                    (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs(),
                    "{what} step {}: loss {} vs {}",
                    a.step,
                    a.loss,
                    b.loss
                );
            }
            let (a, b) = (trained(&plain, lora), trained(&ckpt, lora));
            assert_eq!(a.len(), b.len());
            assert!(
                a.keys()
                    .any(|k| k.starts_with("te") || k.starts_with("text_encoder"))
            );
            let mut worst = 0f64;
            for (k, ta) in &a {
                let diff = (ta - &b[k]).unwrap().sqr().unwrap().sum_all().unwrap();
                let norm = ta.sqr().unwrap().sum_all().unwrap();
                let e = (diff.to_scalar::<f32>().unwrap()
                    / norm.to_scalar::<f32>().unwrap().max(1e-30))
                .sqrt() as f64;
                // Adam amplifies rounding in near-zero gradients a little; a block
                // left untrained would differ by its whole update, far more.
                assert!(e < 5e-4, "{what}: `{k}` differs by {e:.2e}");
                worst = worst.max(e);
            }
            println!(
                "{what}: {} tensors, worst rel difference {worst:.2e}",
                a.len()
            );
        }
    }
    // The two modes exclude each other.
    let mut cfg = config(&dir.join("instance"), &dir.join("both"));
    cfg.gradient_checkpointing = true;
    cfg.release_block_graphs = true;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("--release-block-graphs"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--fused-backward-pass` (AdamW inside the backward, block by block)
/// trains bit-identical weights to released block graphs + a separate
/// AdamW step when nothing clips (full fine-tune and LoRA, both with the
/// text encoder and prior preservation), logs the same losses and gradient
/// norms, says how `--max-grad-norm` clips, and refuses accumulation / fp16.
#[test]
fn fused_backward_pass_trains_the_same_weights() {
    init();
    let dir = tmp("fused-bwd");
    instance_dir(&dir.join("instance"), 3);
    for lora in [false, true] {
        let mut cfg = config(&dir.join("instance"), &dir.join(format!("released-{lora}")));
        cfg.with_prior_preservation = true;
        cfg.num_class_images = 2;
        cfg.class_dir = Some(dir.join("class"));
        cfg.max_train_steps = 3;
        cfg.train_text_encoder = true;
        cfg.text_encoder_lr = Some(5e-4);
        cfg.max_grad_norm = 0.0;
        cfg.release_block_graphs = true;
        if lora {
            cfg.lora = true;
            cfg.lora_targets = "attn+conv".into();
        }
        let (released, _, released_steps) = run(&cfg, None);
        cfg.output_dir = dir.join(format!("fused-{lora}"));
        cfg.release_block_graphs = false;
        cfg.fused_backward_pass = true;
        let (fused, _, fused_steps, lines) = run_logged(&cfg, None);
        assert!(
            lines.iter().any(|l| l.contains("fused backward pass")),
            "{lines:?}"
        );
        let what = if lora { "LoRA" } else { "full" };
        assert_eq!(released_steps.len(), fused_steps.len());
        for (a, b) in released_steps.iter().zip(&fused_steps) {
            assert_eq!(a.loss, b.loss, "{what} step {}: losses differ", a.step);
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= 1e-4 * a.grad_norm,
                "{what} step {}: gradient norm {} vs {}",
                a.step,
                a.grad_norm,
                b.grad_norm
            );
        }
        let (a, b) = (trained(&released, lora), trained(&fused, lora));
        assert!(
            a.keys()
                .any(|k| k.starts_with("te") || k.starts_with("text_encoder"))
        );
        // The weights moved (a run that updated nothing would match the
        // base, not the released run).
        let base = trained(&load(&tiny_sd1()), lora);
        if !lora {
            assert!(a.iter().any(|(k, t)| {
                (t - &base[k])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            }));
        }
        assert_identical(what, &a, &b);
    }
    // With clipping (the default --max-grad-norm 1) it says how it clips.
    let mut cfg = config(&dir.join("instance"), &dir.join("clipped"));
    cfg.max_train_steps = 1;
    cfg.fused_backward_pass = true;
    let (_, _, steps, lines) = run_logged(&cfg, None);
    assert!(steps[0].grad_norm.is_finite() && steps[0].grad_norm > 0.0);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("clips each weight's gradient by its own norm")),
        "{lines:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--train-text-encoder` under fp16 mixed precision: the text encoder
/// computes in f16 too (the log says so), keeps f32 weights, and trains as
/// an f32 run does, to f16 rounding.
#[test]
fn text_encoder_trains_in_fp16_mixed_precision() {
    init();
    let dir = tmp("te-fp16");
    instance_dir(&dir.join("instance"), 3);
    let mut cfg = config(&dir.join("instance"), &dir.join("f32"));
    cfg.max_train_steps = 4;
    cfg.train_text_encoder = true;
    cfg.text_encoder_lr = Some(5e-4);
    let base = load(&tiny_sd1()).text_encoder_vb.tensors();
    let (full, ..) = run(&cfg, None);
    cfg.output_dir = dir.join("f16");
    cfg.mixed_precision = "fp16".into();
    let (half, _, _, lines) = run_logged(&cfg, None);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("mixed precision: UNet and text encoder in fp16")),
        "{lines:?}"
    );
    // The update each run made to the text encoder, over all its tensors.
    let (a, b) = (
        full.text_encoder_vb.tensors(),
        half.text_encoder_vb.tensors(),
    );
    let (mut diff, mut norm) = (0f64, 0f64);
    for (k, w0) in &base {
        assert_eq!(b[k].dtype(), candle_core::DType::F32, "{k}: master weight");
        let ua = common::to_f64(&(&a[k] - w0).unwrap());
        let ub = common::to_f64(&(&b[k] - w0).unwrap());
        diff += ua
            .iter()
            .zip(&ub)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>();
        norm += ua.iter().map(|x| x * x).sum::<f64>();
    }
    let e = (diff / norm).sqrt();
    println!("text encoder update, fp16 run vs f32 run: rel difference {e:.3}");
    assert!(norm > 0.0 && e < 0.3, "fp16 update differs by {e:.3}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------

fn images(model: &StableDiffusion) -> Vec<RgbImage> {
    let mut opts = GenerateOptions::new(INSTANCE_PROMPT, 2);
    opts.steps = 3;
    opts.seed = 11;
    opts.guidance_scale = 3.0;
    opts.width = Some(16);
    opts.height = Some(16);
    generate(model, &opts, &mut |_| {})
        .unwrap()
        .images
        .into_iter()
        .map(|g| g.image)
        .collect()
}

/// The trained model written as a diffusers folder and as a single file loads
/// back with the same weights and generates the same pixels.
#[test]
fn exported_models_generate_the_same_images() {
    init();
    let dir = tmp("export");
    instance_dir(&dir.join("instance"), 3);
    let mut cfg = config(&dir.join("instance"), &dir.join("out"));
    cfg.max_train_steps = 4;
    cfg.train_text_encoder = true;
    cfg.save_single_file = true;
    let (trained, outcome, _) = run(&cfg, None);
    let folder = outcome.model_dir.expect("a diffusers folder");
    let single = outcome.single_file.expect("a single file");
    let base = load(&tiny_sd1());
    let want = images(&trained);
    assert_ne!(want, images(&base), "training changed nothing");

    for path in [&folder, &single] {
        let m = load(path);
        assert_identical("UNet", &trained.unet_vb.tensors(), &m.unet_vb.tensors());
        // (A single file names the text encoder's weights `text_model.*`.)
        let te = |m: &StableDiffusion| -> std::collections::BTreeMap<String, Tensor> {
            let t = m.text_encoder_vb.tensors().into_iter();
            t.map(|(k, v)| {
                (
                    k.strip_prefix("text_model.").map(String::from).unwrap_or(k),
                    v,
                )
            })
            .collect()
        };
        assert_identical("text encoder", &te(&trained), &te(&m));
        assert_identical("VAE", &trained.vae_vb.tensors(), &m.vae_vb.tensors());
        assert!(
            images(&m) == want,
            "{} generates other pixels",
            path.display()
        );
    }

    if let Some(check) = std::env::var_os("DREAMBOOTH_EXPORT_CHECK") {
        write_export_check(&trained, &folder, &single, Path::new(&check));
    }

    // --save-precision fp16: both exports store the trained weights rounded
    // to fp16 (kohya's --save_precision).
    let mut half = cfg.clone();
    half.output_dir = dir.join("out-fp16");
    half.save_precision = "fp16".into();
    let (trained, outcome, _) = run(&half, None);
    let rounded: std::collections::BTreeMap<String, Tensor> = trained
        .unet_vb
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                t.to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        })
        .collect();
    for path in [outcome.model_dir.unwrap(), outcome.single_file.unwrap()] {
        assert_identical("fp16 UNet", &rounded, &load(&path).unet_vb.tensors());
    }
    let unet =
        std::fs::read(dir.join("out-fp16/model/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&unet).unwrap();
    assert!(
        meta.tensors()
            .values()
            .all(|i| i.dtype == safetensors::Dtype::F16)
    );
    half.save_precision = "fp8".into();
    let err = common::train_until(&half, None).unwrap_err().to_string();
    assert!(err.contains("--save-precision"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `dir/model` (the exported folder), `dir/model.safetensors` (the
/// single file) and `dir/export_check.safetensors`: fixed inputs and this
/// crate's outputs of the UNet, text encoder and VAE (the prompts in its
/// metadata), for `tools/check_export_diffusers.py dir/model`.
fn write_export_check(model: &StableDiffusion, folder: &Path, single: &Path, dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join("model"));
    copy_dir(folder, &dir.join("model"));
    std::fs::copy(single, dir.join("model.safetensors")).unwrap();
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(5);
    let sample = dreambooth::util::randn(&mut rng, &[2, 4, 8, 8], &dev).unwrap();
    let timestep = Tensor::new(&[10f32, 700.], &dev).unwrap();
    let prompts = [
        INSTANCE_PROMPT.to_string(),
        "a photo of a red ball on the beach".to_string(),
    ];
    let (ids, _) = model.tokenize(&prompts).unwrap();
    let context = model.text_encoder.forward(&ids).unwrap();
    let unet_out = model.unet.forward(&sample, &timestep, &context).unwrap();
    let pixels = (dreambooth::util::randn(&mut rng, &[1, 3, 16, 16], &dev).unwrap() * 0.5).unwrap();
    let vae_mean = model.vae.encode(&pixels).unwrap().mean;
    let vae_decoded = model.vae.decode(&sample).unwrap();
    let tensors: std::collections::BTreeMap<String, Tensor> = [
        ("sample", sample),
        ("timestep", timestep),
        ("input_ids", ids.to_dtype(candle_core::DType::F32).unwrap()),
        ("text_out", context.clone()),
        ("encoder_hidden_states", context),
        ("unet_out", unet_out),
        ("pixels", pixels),
        ("vae_mean", vae_mean),
        ("vae_decoded", vae_decoded),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.detach()))
    .collect();
    let meta = [(
        "prompts".to_string(),
        serde_json::json!(prompts).to_string(),
    )];
    let path = dir.join("export_check.safetensors");
    dreambooth::nn::save_safetensors(&tensors, &path, Some(meta.into_iter().collect())).unwrap();
    println!(
        "wrote {}: run tools/check_export_diffusers.py {}",
        dir.display(),
        dir.join("model").display()
    );
}

// ---------------------------------------------------------------------------
// The command line: bad inputs and Ctrl-C
// ---------------------------------------------------------------------------

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dreambooth"));
    c.arg("train").env("NO_COLOR", "1");
    c
}

/// The common arguments of a quick run at 16 px.
fn train_args(instance: &Path, out: &Path) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--model".into(),
        tiny_sd1().display().to_string(),
        "--instance-dir".into(),
        instance.display().to_string(),
        "--output-dir".into(),
        out.display().to_string(),
    ];
    v.extend(
        [
            "--instance-prompt",
            INSTANCE_PROMPT,
            "--resolution",
            "16",
            "--learning-rate",
            "1e-4",
            "--class-steps",
            "2",
            "--sample-steps",
            "2",
            "--max-train-steps",
            "2",
        ]
        .map(String::from),
    );
    v
}

/// Runs `dreambooth train ARGS`, which must fail with one `error:` line that
/// contains every one of `expect`, and no panic.
fn fails(args: &[String], expect: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {args:?}");
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "want one error line: {stderr}");
    for e in expect {
        assert!(errors[0].contains(e), "`{e}` not in: {}", errors[0]);
    }
    println!("{}", errors[0]);
    errors[0].to_string()
}

/// `args` with `extra` (`--flag value` pairs or lone flags): a flag already in
/// `args` gets the new value.
fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut i = 0;
    while i < extra.len() {
        let (flag, value) = (extra[i], extra.get(i + 1).filter(|v| !v.starts_with("--")));
        match (args.iter().position(|a| a == flag), value) {
            (Some(j), Some(v)) => args[j + 1] = v.to_string(),
            (None, Some(v)) => args.extend([flag.to_string(), v.to_string()]),
            (_, None) => args.push(flag.to_string()),
        }
        i += if value.is_some() { 2 } else { 1 };
    }
    args
}

#[test]
fn bad_instance_images_are_one_line_errors() {
    init();
    let dir = tmp("bad-images");
    let out = dir.join("out");
    // An empty folder, and a missing one.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails(&train_args(&empty, &out), &["empty", "no images"]);
    fails(
        &train_args(&dir.join("missing"), &out),
        &["missing", "not found"],
    );

    // A truncated JPEG among good photos.
    let photos = instance_dir(&dir.join("jpeg"), 2);
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(photos[0].clone())
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    std::fs::write(dir.join("jpeg/cut.jpg"), &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    fails(
        &train_args(&dir.join("jpeg"), &out),
        &["cut.jpg", "truncated JPEG"],
    );
    // A complete JPEG whose frame header says 0×0 pixels.
    std::fs::remove_file(dir.join("jpeg/cut.jpg")).unwrap();
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 9].fill(0);
    std::fs::write(dir.join("jpeg/broken.jpg"), &jpeg).unwrap();
    fails(
        &train_args(&dir.join("jpeg"), &out),
        &["broken.jpg", "corrupt JPEG", "zero"],
    );

    // A 20×20 photo is too small at 256 px (the minimum is a quarter: 64 px).
    instance_dir(&dir.join("small"), 2);
    RgbImage::from_pixel(20, 20, image::Rgb([200, 30, 30]))
        .save(dir.join("small/tiny.png"))
        .unwrap();
    let args = with(
        train_args(&dir.join("small"), &out),
        &["--resolution", "256"],
    );
    fails(&args, &["tiny.png", "20×20", "too small", "64 px"]);

    // A text file named .png.
    instance_dir(&dir.join("text"), 2);
    std::fs::write(
        dir.join("text/notes.png"),
        "my dog photos: see the other files\n",
    )
    .unwrap();
    fails(
        &train_args(&dir.join("text"), &out),
        &["notes.png", "not an image", "text"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn class_images_of_another_prompt_are_refused() {
    init();
    let dir = tmp("bad-class");
    let inst = dir.join("instance");
    instance_dir(&inst, 2);
    let class_dir = dir.join("class").display().to_string();
    let pp = [
        "--with-prior-preservation",
        "--num-class-images",
        "2",
        "--class-dir",
        &class_dir,
    ];
    let args = with(
        with(train_args(&inst, &dir.join("a")), &pp),
        &["--class-prompt", "a photo of ball"],
    );
    let ok = bin().args(&args).output().unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let args = with(
        with(train_args(&inst, &dir.join("b")), &pp),
        &["--class-prompt", "a photo of box"],
    );
    fails(
        &args,
        &[
            "another prompt",
            "a photo of ball",
            "a photo of box",
            "--regenerate-class-images",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn out_of_range_options_are_one_line_errors() {
    init();
    let dir = tmp("bad-options");
    let inst = dir.join("instance");
    instance_dir(&inst, 1);
    let base = train_args(&inst, &dir.join("out"));
    fails(
        &with(base.clone(), &["--learning-rate", "5"]),
        &["--learning-rate", "out of range"],
    );
    fails(
        &with(base.clone(), &["--prior-loss-weight", "-1"]),
        &["--prior-loss-weight", "-1"],
    );
    fails(
        &with(base.clone(), &["--resolution", "20"]),
        &["--resolution 20", "multiple of 8"],
    );
    fails(&with(base.clone(), &["--lr-scheduler", "wavy"]), &["wavy"]);
    fails(
        &with(base.clone(), &["--class-sampler", "magic"]),
        &["magic"],
    );
    fails(
        &with(base.clone(), &["--mixed-precision", "fp8"]),
        &["--mixed-precision", "fp8"],
    );
    fails(
        &with(base.clone(), &["--mixed-precision", "bf16"]),
        &["bf16", "CUDA"],
    );
    fails(
        &with(
            base.clone(),
            &[
                "--fused-backward-pass",
                "--gradient-accumulation-steps",
                "2",
            ],
        ),
        &["--fused-backward-pass", "--gradient-accumulation-steps 2"],
    );
    fails(
        &with(
            base.clone(),
            &["--fused-backward-pass", "--mixed-precision", "fp16"],
        ),
        &["--fused-backward-pass", "fp16"],
    );
    fails(
        &with(base, &["--with-prior-preservation"]),
        &["--class-prompt"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130() {
    init();
    let dir = tmp("ctrl-c");
    let inst = dir.join("instance");
    instance_dir(&inst, 2);
    let out = dir.join("out");
    let args = with(train_args(&inst, &out), &["--max-train-steps", "100000"]);
    let stdout = std::fs::File::create(dir.join("stdout.txt")).unwrap();
    let stderr = std::fs::File::create(dir.join("stderr.txt")).unwrap();
    let mut child = bin()
        .args(&args)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap();
    let log = out.join("logs/train.jsonl");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log).is_ok_and(|s| s.lines().count() >= 2) {
        assert!(child.try_wait().unwrap().is_none(), "training ended early");
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("no step logged in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            panic!("still running after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(dir.join("stdout.txt")).unwrap();
    let stderr = std::fs::read_to_string(dir.join("stderr.txt")).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("checkpoint saved to"), "{stdout}");
    assert!(stdout.contains("--resume latest"), "{stdout}");
    let ckpts = dreambooth::dreambooth::checkpoint::list(&out.join("checkpoints"));
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpts[0].join("state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    let logged = std::fs::read_to_string(&log).unwrap().lines().count() as u64;
    assert_eq!(step, logged, "the checkpoint is of the last logged step");

    // It goes on from there.
    let more = (step + 1).to_string();
    let done = bin()
        .args(with(
            args,
            &["--max-train-steps", &more, "--resume", "latest"],
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        text.contains("resumed from") && text.contains(&format!("at step {step}")),
        "{text}"
    );
    assert!(out.join("model/model_index.json").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn class_images_are_generated_in_the_prior_generation_precision() {
    // fp16 on the CPU: the class images come from a half-precision copy of
    // the UNet (close to the f32 ones, not equal); bf16 is refused on the CPU
    // before anything loads.
    init();
    let dir = tmp("prior-precision");
    instance_dir(&dir.join("instance"), 2);
    let images = |precision: &str| -> Vec<RgbImage> {
        let mut cfg = config(&dir.join("instance"), &dir.join(format!("out-{precision}")));
        cfg.with_prior_preservation = true;
        cfg.num_class_images = 2;
        cfg.max_train_steps = 1;
        cfg.prior_generation_precision = precision.into();
        run(&cfg, None);
        let class_dir = dir.join(format!("out-{precision}/class_images"));
        let mut paths: Vec<_> = std::fs::read_dir(&class_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| image::open(p).unwrap().to_rgb8())
            .collect()
    };
    let (f32s, f16s) = (images("no"), images("fp16"));
    assert_eq!((f32s.len(), f16s.len()), (2, 2));
    let mut total = 0f64;
    let mut n = 0usize;
    for (a, b) in f32s.iter().zip(&f16s) {
        for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
            total += (*x as f64 - *y as f64).abs();
            n += 1;
        }
    }
    let mean = total / n as f64;
    assert!(f32s != f16s, "the fp16 copy made the same bytes as f32");
    assert!(mean < 4.0, "fp16 class images drift {mean:.2}/255 from f32");
    let mut cfg = config(&dir.join("instance"), &dir.join("out-bf16"));
    cfg.with_prior_preservation = true;
    cfg.prior_generation_precision = "bf16".into();
    let stop = AtomicBool::new(false);
    let (mut log, mut step) = (|_: &str| {}, |_: &StepInfo| {});
    let mut ev = Events {
        log: &mut log,
        step: &mut step,
        stop: &stop,
    };
    let err = train(&cfg, &Device::Cpu, &mut ev).unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
    cfg.prior_generation_precision = "fp8".into();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("--prior-generation-precision"), "{err}");
}

#[test]
fn validation_images_follow_the_validation_precision() {
    // A full fine-tune's validation grid from a half-precision copy of the
    // trained weights: close to the f32 grid, not the same bytes.
    init();
    let dir = tmp("validation-precision");
    instance_dir(&dir.join("instance"), 2);
    let grid = |precision: &str| -> RgbImage {
        let out = dir.join(format!("out-{precision}"));
        let mut cfg = config(&dir.join("instance"), &out);
        cfg.max_train_steps = 2;
        cfg.validation_prompt = vec![INSTANCE_PROMPT.into()];
        cfg.num_validation_images = 2;
        cfg.validation_precision = precision.into();
        run(&cfg, None);
        image::open(out.join("validation/step-000002.png"))
            .unwrap()
            .to_rgb8()
    };
    let (a, b) = (grid("no"), grid("fp16"));
    assert_eq!(a.dimensions(), b.dimensions());
    let mean = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum::<f64>()
        / a.as_raw().len() as f64;
    assert!(a != b, "the fp16 copy made the same bytes as f32");
    assert!(mean < 4.0, "fp16 validation drifts {mean:.2}/255 from f32");
    let mut cfg = config(&dir.join("instance"), &dir.join("out-bad"));
    cfg.validation_precision = "int8".into();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("--validation-precision"), "{err}");
}

/// An exported folder keeps the components the base model's `model_index.json`
/// names and this tool does not write (SD 1.5's safety checker and feature
/// extractor), so diffusers loads it; one whose folder the base lacks is nulled.
#[test]
fn export_carries_the_components_it_does_not_write() {
    let base = std::env::temp_dir().join(format!("dreambooth-export-extra-{}", std::process::id()));
    std::fs::remove_dir_all(&base).ok();
    common::copy_dir(&common::fixtures().join("tiny-sd1"), &base);
    let index_path = base.join("model_index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["safety_checker"] =
        serde_json::json!(["stable_diffusion", "StableDiffusionSafetyChecker"]);
    index["feature_extractor"] = serde_json::json!(["transformers", "CLIPImageProcessor"]);
    std::fs::write(&index_path, index.to_string()).unwrap();
    std::fs::create_dir_all(base.join("safety_checker/nested")).unwrap();
    std::fs::write(base.join("safety_checker/config.json"), "{\"checker\": 1}").unwrap();
    std::fs::write(base.join("safety_checker/nested/a.txt"), "kept").unwrap();

    let model = StableDiffusion::load(&base, &Device::Cpu, LoadOptions::default()).unwrap();
    let out = base.with_extension("out");
    dreambooth::dreambooth::export::save_diffusers(&model, &out).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(written["safety_checker"], index["safety_checker"]);
    assert_eq!(
        std::fs::read_to_string(out.join("safety_checker/config.json")).unwrap(),
        "{\"checker\": 1}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("safety_checker/nested/a.txt")).unwrap(),
        "kept"
    );
    assert_eq!(
        written["feature_extractor"],
        serde_json::json!([null, null])
    );
    assert_eq!(written["unet"], index["unet"]);
    StableDiffusion::load(&out, &Device::Cpu, LoadOptions::default()).unwrap();
    std::fs::remove_dir_all(&base).ok();
    std::fs::remove_dir_all(&out).ok();
}

/// `vae`: the VAE given replaces the model's for training and is exported.
#[test]
fn training_uses_and_exports_the_vae_given() {
    let dir = tmp("vae");
    let instance = dir.join("instance");
    instance_dir(&instance, 2);
    let mut vae = dreambooth::nn::read_safetensors(
        &tiny_sd1().join("vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let w = vae["decoder.conv_out.weight"].affine(2.0, 0.0).unwrap();
    vae.insert("decoder.conv_out.weight".into(), w);
    let vae: std::collections::BTreeMap<String, Tensor> = vae.into_iter().collect();
    let vae_file = dir.join("vae.safetensors");
    dreambooth::nn::save_safetensors(&vae, &vae_file, None).unwrap();

    let mut cfg = config(&instance, &dir.join("out"));
    cfg.class_prompt = None;
    cfg.max_train_steps = 2;
    cfg.vae = Some(vae_file);
    let (model, outcome, _) = run(&cfg, None);
    assert_eq!(outcome.final_step, 2);
    let got = model.vae_vb.tensors();
    let exported = dreambooth::nn::read_safetensors(
        &dir.join("out/model/vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (k, want) in &vae {
        for (what, t) in [("model", &got[k]), ("export", &exported[k])] {
            assert_eq!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{what}: `{k}`"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Per-photo captions (`caption_extension`): a caption is the prompt its
/// photo trains on. Captions equal to the instance prompt leave the run as it
/// was, bit for bit; captions that all say P train exactly as the instance
/// prompt P would (frozen text encoder: cached embeddings; trained: token ids
/// per sampled view); a partial set is a third run, and the log counts them.
#[test]
fn captions_are_the_prompts_their_photos_train_on() {
    init();
    let dir = tmp("captions");
    let photos = dir.join("instance");
    instance_dir(&photos, 3);
    let caption = |i: usize, text: &str| {
        std::fs::write(photos.join(format!("photo-{i}.txt")), text).unwrap();
    };
    for text_encoder in [false, true] {
        let mut cfg = config(&photos, &dir.join("plain"));
        cfg.max_train_steps = 3;
        cfg.train_batch_size = 2;
        cfg.train_text_encoder = text_encoder;
        let same = |a: &StableDiffusion, b: &StableDiffusion, what: &str| {
            assert_identical(what, &a.unet_vb.tensors(), &b.unet_vb.tensors());
            if text_encoder {
                assert_identical(
                    what,
                    &a.text_encoder_vb.tensors(),
                    &b.text_encoder_vb.tensors(),
                );
            }
        };
        let (plain, ..) = run(&cfg, None);
        let other = "a photo of sks ball on the grass";
        let mut as_other = cfg.clone();
        as_other.instance_prompt = other.into();
        as_other.output_dir = dir.join("other");
        let (other_run, ..) = run(&as_other, None);

        let mut captioned = cfg.clone();
        captioned.caption_extension = Some(".txt".into());
        captioned.output_dir = dir.join("captioned");
        for i in 0..3 {
            caption(i, &format!("  {INSTANCE_PROMPT}\n"));
        }
        let (m, _, _, log) = run_logged(&captioned, None);
        same(&m, &plain, "captions equal to the instance prompt");
        assert!(
            log.iter()
                .any(|l| l.contains("captions: 3 of 3 photo(s)") && l.contains("(1 distinct")),
            "{log:?}"
        );
        for i in 0..3 {
            caption(i, other);
        }
        let (m, ..) = run(&captioned, None);
        same(&m, &other_run, "captions that all say P");

        // Photo 2 without a caption: two prompts in play, a run unlike both.
        std::fs::remove_file(photos.join("photo-2.txt")).unwrap();
        let (m, _, _, log) = run_logged(&captioned, None);
        assert!(
            log.iter().any(|l| l.contains("captions: 2 of 3 photo(s)")
                && l.contains("(2 distinct")
                && l.contains("the others on the instance prompt")),
            "{log:?}"
        );
        let differs = |a: &StableDiffusion, b: &StableDiffusion| {
            let (a, b) = (a.unet_vb.tensors(), b.unet_vb.tensors());
            a.iter()
                .any(|(k, t)| common::to_f64(t) != common::to_f64(&b[k]))
        };
        assert!(differs(&m, &plain) && differs(&m, &other_run));
        for i in 0..2 {
            std::fs::remove_file(photos.join(format!("photo-{i}.txt"))).unwrap();
        }
    }

    // No caption at all: a warning; an empty caption: an error naming it.
    let mut cfg = config(&photos, &dir.join("none"));
    cfg.max_train_steps = 1;
    cfg.caption_extension = Some(".caption".into());
    let (_, _, _, log) = run_logged(&cfg, None);
    assert!(
        log.iter()
            .any(|l| l.contains("warning: no photo") && l.contains(".caption")),
        "{log:?}"
    );
    std::fs::write(photos.join("photo-1.caption"), " \n").unwrap();
    let err = common::train_until(&cfg, None).unwrap_err().to_string();
    assert!(
        err.contains("photo-1.caption") && err.contains("empty"),
        "{err}"
    );
    cfg.caption_extension = Some("txt".into());
    let err = common::train_until(&cfg, None).unwrap_err().to_string();
    assert!(err.contains("--caption-extension `txt`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--prediction-type` reaches the model the trainer loads (the loss target
/// and class-image sampling follow `model.prediction_type()`).
#[test]
fn prediction_type_overrides_the_models() {
    init();
    let mut cfg = config(Path::new("unused"), Path::new("unused"));
    let m = dreambooth::dreambooth::trainer::load_model(&cfg, &Device::Cpu).unwrap();
    assert_eq!(
        m.prediction_type(),
        dreambooth::diffusion::PredictionType::Epsilon
    );
    cfg.prediction_type = Some("v_prediction".into());
    let m = dreambooth::dreambooth::trainer::load_model(&cfg, &Device::Cpu).unwrap();
    assert_eq!(
        m.prediction_type(),
        dreambooth::diffusion::PredictionType::VPrediction
    );
    cfg.prediction_type = Some("x0".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("--prediction-type"), "{e}");
}

/// Several validation prompts: one grid row of `num_validation_images` each,
/// the prompts listed in the PNG; a config file may give one string or a list.
#[test]
fn several_validation_prompts_make_one_row_each() {
    init();
    let dir = tmp("validation-prompts");
    instance_dir(&dir.join("instance"), 2);
    let out = dir.join("out");
    let mut cfg = config(&dir.join("instance"), &out);
    cfg.max_train_steps = 2;
    cfg.validation_steps = 1;
    cfg.num_validation_images = 3;
    cfg.validation_prompt = vec![INSTANCE_PROMPT.into(), "a sks ball on the beach".into()];
    run(&cfg, None);
    for step in [1, 2] {
        let path = out.join(format!("validation/step-{step:06}.png"));
        let (grid, text) = dreambooth::image_io::read_png(&path).unwrap();
        assert_eq!(grid.dimensions(), (3 * 16, 2 * 16), "{}", path.display());
        assert_eq!(
            text["prompts"],
            format!("{INSTANCE_PROMPT}\na sks ball on the beach")
        );
        assert_eq!(text["step"], step.to_string());
    }
    // One prompt: rows of up to 4, as before.
    let out1 = dir.join("out1");
    let mut cfg1 = config(&dir.join("instance"), &out1);
    cfg1.max_train_steps = 1;
    cfg1.num_validation_images = 6;
    cfg1.validation_prompt = vec![INSTANCE_PROMPT.into()];
    run(&cfg1, None);
    let (grid, _) =
        dreambooth::image_io::read_png(&out1.join("validation/step-000001.png")).unwrap();
    assert_eq!(grid.dimensions(), (4 * 16, 2 * 16));

    let file = dir.join("run.toml");
    for (toml_value, want) in [
        ("\"a photo of sks ball\"", vec!["a photo of sks ball"]),
        ("[\"a\", \"b c\"]", vec!["a", "b c"]),
    ] {
        std::fs::write(
            &file,
            format!(
                "instance_dir = \"x\"\ninstance_prompt = \"y\"\nvalidation_prompt = {toml_value}\n"
            ),
        )
        .unwrap();
        let c = TrainConfig::from_toml_file(&file).unwrap();
        assert_eq!(c.validation_prompt, want);
        // What the effective configuration prints loads back.
        std::fs::write(&file, c.to_toml()).unwrap();
        assert_eq!(
            TrainConfig::from_toml_file(&file)
                .unwrap()
                .validation_prompt,
            want
        );
    }
    std::fs::write(&file, "validation_prompt = 3\n").unwrap();
    let e = TrainConfig::from_toml_file(&file).unwrap_err().to_string();
    assert!(
        e.contains("run.toml") && e.contains("validation_prompt"),
        "{e}"
    );
}

/// Prodigy: a run stopped and resumed ends bit-identical (its step-size
/// estimate and initial weights are in the checkpoint), with the text
/// encoder trained too.
#[test]
fn resumed_run_is_bit_identical_with_prodigy() {
    check_resume("resume-prodigy", 3, |cfg| {
        cfg.optimizer = OptimizerKind::Prodigy;
        cfg.learning_rate = 1.0;
        cfg.train_text_encoder = true;
    });
}

/// Prodigy trains (its step size grows from d0 and the weights move), is
/// refused with the fused backward pass, and its checkpoint is not resumed
/// by an AdamW run.
#[test]
fn prodigy_trains_and_its_checkpoints_stay_its_own() {
    init();
    let dir = tmp("prodigy");
    instance_dir(&dir.join("instance"), 2);
    let mut cfg = config(&dir.join("instance"), &dir.join("out"));
    cfg.optimizer = OptimizerKind::Prodigy;
    cfg.learning_rate = 1.0;
    // Without the safeguarded warm-up d grows from the first steps.
    cfg.prodigy_safeguard_warmup = false;
    cfg.max_train_steps = 6;
    cfg.checkpointing_steps = 2;
    let before = common::fixture_model("tiny-sd1");
    let (model, outcome, steps) = run(&cfg, None);
    assert_eq!(outcome.final_step, 6);
    assert!(steps.iter().all(|s| s.loss.is_finite()));
    let d: Vec<f64> = steps.iter().map(|s| s.prodigy_d.unwrap()).collect();
    assert!(
        d.last() > d.first(),
        "Prodigy's step size did not grow: {d:?}"
    );
    let moved = before
        .unet_vb
        .tensors()
        .iter()
        .filter(|(k, t)| common::max_abs(t, &model.unet_vb.tensors()[*k]) > 0.0)
        .count();
    assert!(moved > 10, "only {moved} UNet tensors moved");

    let mut fused = cfg.clone();
    fused.fused_backward_pass = true;
    fused.gradient_checkpointing = true;
    let e = fused.validate().unwrap_err().to_string();
    assert!(
        e.contains("--fused-backward-pass") && e.contains("prodigy"),
        "{e}"
    );
    // A typo, on the command line or in a config file, names the choices.
    let e = "adam8bit".parse::<OptimizerKind>().unwrap_err().to_string();
    assert!(e.contains("adam8bit") && e.contains("prodigy"), "{e}");
    let file = dir.join("run.toml");
    std::fs::write(&file, "optimizer = \"adam8bit\"\n").unwrap();
    let e = TrainConfig::from_toml_file(&file).unwrap_err().to_string();
    assert!(e.contains("adam8bit") && e.contains("prodigy"), "{e}");

    let mut adam = cfg.clone();
    adam.optimizer = OptimizerKind::AdamW;
    adam.learning_rate = 1e-3;
    adam.resume = Some("latest".into());
    let e = common::train_until(&adam, None)
        .map(|_| ())
        .expect_err("resuming Prodigy's state as AdamW")
        .to_string();
    assert!(
        e.contains("Prodigy") && e.contains("optimizer.safetensors"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
