//! The DreamBooth trainer, proven on the tiny random-weight models.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::SeedableRng;
use rand::rngs::StdRng;

use dreambooth::diffusion::NoiseSchedule;
use dreambooth::dreambooth::config::TrainConfig;
use dreambooth::dreambooth::data::{Crop, prepare, to_tensor};
use dreambooth::dreambooth::loss::denoising_loss;
use dreambooth::dreambooth::trainer::{Events, StepInfo, TrainOutcome, train};
use dreambooth::models::{LoadOptions, StableDiffusion};
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
    let photos: Vec<RgbImage> = subject_photos(Subject::SpotBall, n, 7).into_iter().map(|(_, i)| i).collect();
    for (i, img) in photos.iter().enumerate() {
        img.save(dir.join(format!("photo-{i}.png"))).unwrap();
    }
    photos
}

/// A short run at 32 px on tiny-sd1.
fn config(instance: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: Some(tiny_sd1()),
        instance_dir: instance.to_path_buf(),
        instance_prompt: INSTANCE_PROMPT.into(),
        class_prompt: Some(CLASS_PROMPT.into()),
        num_class_images: 4,
        output_dir: out.to_path_buf(),
        resolution: Some(32),
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
    let stop = AtomicBool::new(false);
    let mut steps = Vec::new();
    let mut log = |_: &str| {};
    let mut on_step = |s: &StepInfo| {
        steps.push(s.clone());
        if Some(s.step) == stop_at {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let mut ev = Events {
        log: &mut log,
        step: &mut on_step,
        stop: &stop,
    };
    let (model, outcome) = train(cfg, &Device::Cpu, &mut ev).unwrap();
    (model, outcome, steps)
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
    let views: Vec<RgbImage> = images.iter().map(|i| prepare(i, res, Crop::Center, false)).collect();
    let x = to_tensor(&views, &Device::Cpu).unwrap();
    let mean = model.vae.encode(&x).unwrap().mean;
    let z = ((mean - model.vae.shift_factor()).unwrap() * model.vae.scaling_factor()).unwrap();
    let n = images.len();
    let idx: Vec<u32> = (0..n as u32).flat_map(|i| std::iter::repeat_n(i, PROBE_T.len())).collect();
    let latents = z.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
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
    let (ctx, _) = model.encode_prompt(&[prompt.to_string()], 0).unwrap();
    let ctx = ctx.repeat((p.timesteps.len(), 1, 1)).unwrap();
    let schedule = NoiseSchedule::new(&model.scheduler).unwrap();
    let per = denoising_loss(&model.unet, &schedule, &p.latents, &ctx, &p.timesteps, &p.noise).unwrap();
    per.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// tiny-sd1 with a VAE that behaves like a trained one where it matters here:
/// a sharp posterior (std ≈ 0.002 instead of ≈ 0.9, whose noise would drown
/// the images) and latents of about unit variance (scaling factor 2.5 instead
/// of SD's 0.18215, which leaves the random VAE's latents at std ≈ 0.07).
fn sharp_model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-sd1-sharp");
    copy_dir(&tiny_sd1(), &out);
    let wpath = out.join("vae/diffusion_pytorch_model.safetensors");
    let mut w: std::collections::BTreeMap<String, Tensor> =
        dreambooth::nn::read_safetensors(&wpath, &Device::Cpu).unwrap().into_iter().collect();
    let b = w["quant_conv.bias"].to_vec1::<f32>().unwrap();
    let c = b.len() / 2;
    let b: Vec<f32> = b.iter().enumerate().map(|(i, &v)| if i >= c { v - 12.0 } else { v }).collect();
    w.insert("quant_conv.bias".into(), Tensor::new(b.as_slice(), &Device::Cpu).unwrap());
    dreambooth::nn::save_safetensors(&w, &wpath, None).unwrap();
    let cpath = out.join("vae/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
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
            render(&Scene::placed(ctx, Class::Ball, Paint::Plain(color), seed * 1000 + i as u64))
        })
        .collect();
    for (i, img) in imgs.iter().enumerate() {
        img.save(dir.join(format!("ball-{i}.png"))).unwrap();
    }
    imgs
}

#[test]
fn learns_the_subject_and_prior_preservation_keeps_the_class() {
    init();
    let dir = tmp("learn");
    let photos = instance_dir(&dir.join("instance"), 4);
    let steps = env_u64("XSTEPS", 40);
    let lr = env_f64("XLR", 1e-3);
    let ncls = env_u64("XNCLASS", 8) as usize;
    let balls = class_photos(&dir.join("balls"), ncls, 1);
    let held = class_photos(&dir.join("held"), 8, 2);
    // "Pretrain": the base model learns the class.
    let mut pre = config(&dir.join("balls"), &dir.join("pre"));
    if std::env::var("XSHARP").is_ok() {
        pre.model = Some(sharp_model(&dir));
    }
    pre.instance_prompt = CLASS_PROMPT.into();
    pre.max_train_steps = env_u64("XPRE", 150);
    pre.train_batch_size = env_u64("XPREBS", 2) as usize;
    pre.learning_rate = env_f64("XPRELR", 1e-3);
    run(&pre, None);
    let base_path = dir.join("pre").join("model");
    let base = load(&base_path);
    let inst_probe = probe(&base, &photos, 32, 1);
    let user_class = std::env::var("XUSERCLASS").is_ok();

    let mut with_pp = config(&dir.join("instance"), &dir.join("pp"));
    with_pp.model = Some(base_path.clone());
    with_pp.with_prior_preservation = true;
    with_pp.num_class_images = ncls;
    with_pp.max_train_steps = steps;
    with_pp.learning_rate = lr;
    with_pp.class_dir = Some(if user_class { dir.join("balls") } else { dir.join("class") });
    let (pp_model, _, pp_steps) = run(&with_pp, None);

    let class_imgs: Vec<RgbImage> = if user_class {
        balls.clone()
    } else {
        (0..ncls)
            .map(|k| image::open(dir.join("class").join(format!("class-{k:05}.png"))).unwrap().to_rgb8())
            .collect()
    };
    let class_probe = probe(&base, &class_imgs, 32, 2);
    let held_probe = probe(&base, &held, 32, 3);

    let mut no_pp = with_pp.clone();
    no_pp.with_prior_preservation = false;
    no_pp.output_dir = dir.join("nopp");
    let (nopp_model, _, nopp_steps) = run(&no_pp, None);

    let figs = |m: &StableDiffusion| {
        (
            error(m, &inst_probe, INSTANCE_PROMPT),
            error(m, &class_probe, CLASS_PROMPT),
            error(m, &held_probe, CLASS_PROMPT),
            error(m, &inst_probe, CLASS_PROMPT),
        )
    };
    let b = figs(&base);
    let p = figs(&pp_model);
    let n = figs(&nopp_model);
    let t = figs(&load(&tiny_sd1()));
    println!("rand  inst {:.4} class {:.4} held {:.4} inst|class {:.4}", t.0, t.1, t.2, t.3);
    println!("base  inst {:.4} class {:.4} held {:.4} inst|class {:.4}", b.0, b.1, b.2, b.3);
    println!("pp    inst {:.4} class {:.4} held {:.4} inst|class {:.4}", p.0, p.1, p.2, p.3);
    println!("nopp  inst {:.4} class {:.4} held {:.4} inst|class {:.4}", n.0, n.1, n.2, n.3);
    let mean = |s: &[StepInfo]| s.iter().map(|x| x.loss_instance).sum::<f64>() / s.len() as f64;
    let k = 5.min(pp_steps.len() / 2);
    println!(
        "pp loss first {:.4} last {:.4}; nopp first {:.4} last {:.4}",
        mean(&pp_steps[..k]),
        mean(&pp_steps[pp_steps.len() - k..]),
        mean(&nopp_steps[..k]),
        mean(&nopp_steps[nopp_steps.len() - k..])
    );
}
