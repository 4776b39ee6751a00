//! `dreambooth toy pretrain`: trains the bundled tiny text-to-image model from
//! scratch on the procedural world, in the real Stable Diffusion architecture
//! (AutoencoderKL, CLIP text encoder, UNet2DConditionModel), and saves it as a
//! diffusers folder that every other command loads like any checkpoint.
//!
//! Stage 1 trains the VAE (reconstruction + a small KL term); stage 2 encodes a
//! fixed set of scenes once; stage 3 trains the UNet and the text encoder
//! together on the cached latents with the ordinary denoising loss, dropping
//! 10% of captions so classifier-free guidance works.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::vocab::build_vocab_files;
use super::world::{self, RARE_TOKENS};
use crate::diffusion::{NoiseSchedule, SchedulerConfig};
use crate::dreambooth::loss::denoising_loss;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::config::UNetConfig;
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::models::{UNet2DConditionModel, UNetCond};
use crate::nn::{Vb, read_safetensors, save_safetensors};
use crate::optim::{AdamW, AdamWConfig, LrSchedule, LrScheduleKind, clip_factor, grad_norm};
use crate::tokenizer::ClipTokenizer;
use crate::util::{randn, write_atomic};
use crate::{Error, Result};

/// Token length of the tiny model's prompts (captions are under 12 tokens).
pub const MAX_TOKENS: usize = 16;

#[derive(Clone, Debug)]
pub struct PretrainOptions {
    pub out: PathBuf,
    pub seed: u64,
    pub vae_steps: usize,
    pub vae_batch: usize,
    pub vae_lr: f64,
    /// Scenes encoded once and reused by the denoiser's training.
    pub num_scenes: usize,
    pub unet_steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub caption_dropout: f64,
    pub log_every: usize,
    /// Wall-clock budgets: a stage stops early (with its LR schedule fitted
    /// to the steps that fit) when its minutes run out.
    pub vae_minutes: f64,
    pub unet_minutes: f64,
    /// Continue from a model this command wrote: its VAE is kept (stage 1 is
    /// skipped, its latent scaling factor reused) and its UNet and text
    /// encoder are trained further.
    pub init_from: Option<PathBuf>,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("tiny-model"),
            seed: 0,
            vae_steps: 1500,
            vae_batch: 8,
            vae_lr: 2e-3,
            num_scenes: 12000,
            unet_steps: 6000,
            batch: 32,
            lr: 1e-3,
            caption_dropout: 0.1,
            log_every: 50,
            vae_minutes: 18.0,
            unet_minutes: 36.0,
            init_from: None,
        }
    }
}

pub fn unet_config() -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,
        "flip_sin_to_cos": true,
        "freq_shift": 0
    })
}

pub fn vae_config() -> serde_json::Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 1.0
    })
}

pub fn text_encoder_config(vocab_size: usize, tok: &ClipTokenizer) -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 64,
        "bos_token_id": tok.bos_id(),
        "eos_token_id": tok.eos_id(),
        "pad_token_id": tok.pad_id()
    })
}

pub fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading"
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Writes model_index.json, the configs and the tokenizer files; returns the tokenizer.
fn write_skeleton(out: &Path) -> Result<ClipTokenizer> {
    let (vocab, merges) = build_vocab_files(&world::vocabulary(), RARE_TOKENS);
    let tdir = out.join("tokenizer");
    write_atomic(&tdir.join("vocab.json"), vocab.as_bytes())?;
    write_atomic(&tdir.join("merges.txt"), merges.as_bytes())?;
    write_json(
        &tdir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MAX_TOKENS,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "do_lower_case": true
        }),
    )?;
    let tok = ClipTokenizer::from_dir(&tdir)?;
    write_json(
        &out.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    write_json(&out.join("unet").join("config.json"), &unet_config())?;
    write_json(
        &out.join("scheduler").join("scheduler_config.json"),
        &scheduler_config(),
    )?;
    write_json(
        &out.join("text_encoder").join("config.json"),
        &text_encoder_config(tok.vocab_size(), &tok),
    )?;
    Ok(tok)
}

fn images_tensor(images: &[image::RgbImage], device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(images.len() * 3 * world::SIZE * world::SIZE);
    for im in images {
        data.extend(world::to_chw_f32(im));
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, world::SIZE, world::SIZE),
        device,
    )?)
}

fn vars_tensors(vb: &Vb) -> BTreeMap<String, Tensor> {
    vb.vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().detach()))
        .collect()
}

/// Fits a stage's step count to its time budget once a few steps are timed.
struct Budget {
    max_steps: usize,
    seconds: f64,
    start: Instant,
    total: usize,
}

impl Budget {
    fn new(max_steps: usize, minutes: f64) -> Self {
        Self {
            max_steps,
            seconds: minutes * 60.0,
            start: Instant::now(),
            total: max_steps,
        }
    }

    /// Called after step `step` (0-based) finished; returns the planned total.
    /// Once the budget is spent the stage ends after this step, whatever the
    /// plan was (a machine that slows down mid-run does not overrun it).
    fn update(&mut self, step: usize) -> usize {
        if self.start.elapsed().as_secs_f64() >= self.seconds {
            self.total = step + 1;
        } else if step == 9 || (step > 9 && step.is_multiple_of(100)) {
            let per = self.start.elapsed().as_secs_f64() / (step + 1) as f64;
            let fit = (self.seconds / per.max(1e-9)) as usize;
            self.total = fit.clamp(step + 1, self.max_steps);
        }
        self.total
    }
}

/// A line of progress for the caller to print.
pub type Log<'a> = &'a mut dyn FnMut(&str);

/// Trains the VAE; returns it (frozen copy) with its weights.
fn train_vae(opts: &PretrainOptions, cfg: &VaeConfig, device: &Device, log: Log) -> Result<Vb> {
    let vb = Vb::random(opts.seed ^ 0xAE, device, true);
    let vae = AutoencoderKL::new(&vb, cfg)?;
    let mut opt = AdamW::new(
        vb.vars(),
        AdamWConfig {
            lr: opts.vae_lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let sched = LrSchedule {
        kind: LrScheduleKind::Cosine,
        base_lr: opts.vae_lr,
        warmup_steps: 100,
        total_steps: opts.vae_steps as u64,
    };
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x5AE);
    let t0 = Instant::now();
    let mut budget = Budget::new(opts.vae_steps, opts.vae_minutes);
    let mut sched = sched;
    let mut step = 0;
    while step < sched.total_steps as usize {
        let _warm = crate::nn::cpu::KeepWarm::start();
        let seed = world::derive_seed(opts.seed ^ 0xDA7A, step as u64);
        let images: Vec<_> = world::sample_batch(seed, opts.vae_batch)
            .map(|s| s.image)
            .collect();
        let x = images_tensor(&images, device)?;
        let post = vae.encode(&x)?;
        let noise = randn(&mut rng, post.mean.dims(), device)?;
        let z = post.sample(&noise)?;
        let rec = vae.decode(&z)?;
        let rec_loss = (&rec - &x)?.sqr()?.mean_all()?;
        let var = post.logvar.exp()?;
        let kl = ((post.mean.sqr()? + var)? - 1.0)?
            .sub(&post.logvar)?
            .mean_all()?
            * 0.5;
        let loss = (&rec_loss + (kl? * 1e-4)?)?;
        let grads = loss.backward()?;
        let norm = grad_norm(opt.grads(&grads).map(|(_, g)| g))?;
        opt.step(&grads, sched.lr(step as u64), clip_factor(norm, 1.0))?;
        sched.total_steps = budget.update(step) as u64;
        if step % opts.log_every == 0 || step + 1 == sched.total_steps as usize {
            log(&format!(
                "vae step {step}/{} recon mse {:.5} ({:.1}s)",
                sched.total_steps,
                rec_loss.to_scalar::<f32>()?,
                t0.elapsed().as_secs_f64()
            ));
        }
        step += 1;
    }
    Ok(vb)
}

/// Runs the whole pretraining and writes the diffusers folder to `opts.out`.
pub fn pretrain(opts: &PretrainOptions, log: Log) -> Result<()> {
    let device = Device::Cpu;
    let out = &opts.out;
    let tok = write_skeleton(out)?;

    // Stage 1: the autoencoder.
    let mut vae_json = vae_config();
    let vae_cfg: VaeConfig =
        serde_json::from_value(vae_json.clone()).map_err(|e| Error::msg(e.to_string()))?;
    let (vae_weights, init_scaling) = match &opts.init_from {
        Some(dir) => {
            let w = read_safetensors(
                &dir.join("vae").join("diffusion_pytorch_model.safetensors"),
                &device,
            )?;
            let cfg = VaeConfig::from_file(&dir.join("vae").join("config.json"))?;
            log(&format!(
                "continuing from {}: VAE kept, UNet and text encoder trained further",
                dir.display()
            ));
            (
                w.into_iter().collect::<BTreeMap<_, _>>(),
                Some(cfg.scaling_factor),
            )
        }
        None => (
            vars_tensors(&train_vae(opts, &vae_cfg, &device, log)?),
            None,
        ),
    };
    let frozen = Vb::from_tensors(
        Path::new("<vae>"),
        vae_weights.clone().into_iter().collect(),
        &device,
        false,
    );
    let vae = AutoencoderKL::new(&frozen, &vae_cfg)?;

    // Stage 2: encode the training scenes once (posterior mean and std).
    let t0 = Instant::now();
    let mut means = Vec::new();
    let mut stds = Vec::new();
    let mut captions = Vec::new();
    let chunk = 64;
    let data_seed = opts.seed ^ 0x5CE4E;
    let samples: Vec<_> = world::sample_batch(data_seed, opts.num_scenes).collect();
    for part in samples.chunks(chunk) {
        let images: Vec<_> = part.iter().map(|s| s.image.clone()).collect();
        let post = vae.encode(&images_tensor(&images, &device)?)?;
        means.push(post.mean.detach());
        stds.push(post.std()?.detach());
        captions.extend(part.iter().map(|s| s.caption.clone()));
    }
    let means = Tensor::cat(&means, 0)?.contiguous()?;
    let stds = Tensor::cat(&stds, 0)?.contiguous()?;
    let flat = means.flatten_all()?;
    let var =
        flat.sqr()?.mean_all()?.to_scalar::<f32>()? - flat.mean_all()?.to_scalar::<f32>()?.powi(2);
    let scaling = init_scaling.unwrap_or(1.0 / (var.max(1e-8) as f64).sqrt());
    vae_json["scaling_factor"] = json!(scaling);
    write_json(&out.join("vae").join("config.json"), &vae_json)?;
    save_safetensors(
        &vae_weights,
        &out.join("vae").join("diffusion_pytorch_model.safetensors"),
        None,
    )?;
    log(&format!(
        "encoded {} scenes in {:.1}s; latent scaling factor {scaling:.4}",
        opts.num_scenes,
        t0.elapsed().as_secs_f64()
    ));

    // Stage 3: UNet + text encoder on the cached latents.
    let unet_cfg: UNetConfig =
        serde_json::from_value(unet_config()).map_err(|e| Error::msg(e.to_string()))?;
    let te_cfg: ClipTextConfig =
        serde_json::from_value(text_encoder_config(tok.vocab_size(), &tok))
            .map_err(|e| Error::msg(e.to_string()))?;
    let (unet_vb, te_vb) = match &opts.init_from {
        Some(dir) => (
            Vb::from_file(
                &dir.join("unet").join("diffusion_pytorch_model.safetensors"),
                &device,
                true,
            )?,
            Vb::from_file(
                &dir.join("text_encoder").join("model.safetensors"),
                &device,
                true,
            )?,
        ),
        None => (
            Vb::random(opts.seed ^ 0x0E7, &device, true),
            Vb::random(opts.seed ^ 0x7E, &device, true),
        ),
    };
    let unet = UNet2DConditionModel::new(&unet_vb, &unet_cfg)?;
    let te = ClipTextModel::new(&te_vb, &te_cfg)?;
    unet_vb.finish()?;
    te_vb.finish()?;
    let mut vars = BTreeMap::new();
    for (k, v) in unet_vb.vars() {
        vars.insert(format!("unet.{k}"), v);
    }
    for (k, v) in te_vb.vars() {
        vars.insert(format!("text_encoder.{k}"), v);
    }
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            lr: opts.lr,
            weight_decay: 1e-2,
            ..Default::default()
        },
    )?;
    log(&format!(
        "denoiser: {} trainable parameters (UNet + text encoder)",
        opt.num_params()
    ));
    let mut sched = LrSchedule {
        kind: LrScheduleKind::Cosine,
        base_lr: opts.lr,
        warmup_steps: 200,
        total_steps: opts.unet_steps as u64,
    };
    let schedule = NoiseSchedule::new(&SchedulerConfig::from_json_str(
        &scheduler_config().to_string(),
        out.join("scheduler").join("scheduler_config.json"),
    )?)?;
    let ids_of = |text: &str| tok.encode_padded(text, MAX_TOKENS).0;
    let caption_ids: Vec<Vec<u32>> = captions.iter().map(|c| ids_of(c)).collect();
    let empty_ids = ids_of("");
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x7A1);
    let t0 = Instant::now();
    let mut avg = 0.0;
    let n_train = schedule.num_train_timesteps();
    let mut budget = Budget::new(opts.unet_steps, opts.unet_minutes);
    let mut last_save = Instant::now();
    let mut step = 0;
    while step < sched.total_steps as usize {
        let _warm = crate::nn::cpu::KeepWarm::start();
        let idx: Vec<u32> = (0..opts.batch)
            .map(|_| rng.random_range(0..opts.num_scenes as u32))
            .collect();
        let idx_t = Tensor::from_vec(idx.clone(), opts.batch, &device)?;
        let mean = means.index_select(&idx_t, 0)?;
        let std = stds.index_select(&idx_t, 0)?;
        let eps = randn(&mut rng, mean.dims(), &device)?;
        let latents = ((mean + (std * eps)?)? * scaling)?;
        let mut ids: Vec<u32> = Vec::with_capacity(opts.batch * MAX_TOKENS);
        for &i in &idx {
            if rng.random::<f64>() < opts.caption_dropout {
                ids.extend(&empty_ids);
            } else {
                ids.extend(&caption_ids[i as usize]);
            }
        }
        let ids = Tensor::from_vec(ids, (opts.batch, MAX_TOKENS), &device)?;
        let context = te.forward(&ids)?;
        let timesteps: Vec<usize> = (0..opts.batch)
            .map(|_| rng.random_range(0..n_train))
            .collect();
        let noise = randn(&mut rng, latents.dims(), &device)?;
        let loss = denoising_loss(
            &unet,
            &schedule,
            &latents,
            UNetCond {
                context: &context,
                added: None,
            },
            &timesteps,
            &noise,
            crate::nn::Precision::F32,
        )?
        .mean_all()?;
        let grads = loss.backward()?;
        let norm = grad_norm(opt.grads(&grads).map(|(_, g)| g))?;
        opt.step(&grads, sched.lr(step as u64), clip_factor(norm, 1.0))?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        avg = if step == 0 { l } else { 0.98 * avg + 0.02 * l };
        sched.total_steps = budget.update(step) as u64;
        if step % opts.log_every == 0 || step + 1 == sched.total_steps as usize {
            let el = t0.elapsed().as_secs_f64();
            log(&format!(
                "unet step {step}/{} loss {avg:.4} lr {:.2e} ({:.2} s/step, {el:.0}s)",
                sched.total_steps,
                sched.lr(step as u64),
                el / (step + 1) as f64
            ));
        }
        if last_save.elapsed().as_secs() > 300 {
            save_denoiser(out, &unet_vb, &te_vb)?;
            log(&format!("snapshot saved at step {step}"));
            last_save = Instant::now();
        }
        step += 1;
    }
    save_denoiser(out, &unet_vb, &te_vb)?;
    log(&format!("saved the tiny model to {}", out.display()));
    Ok(())
}

fn save_denoiser(out: &Path, unet_vb: &Vb, te_vb: &Vb) -> Result<()> {
    save_safetensors(
        &vars_tensors(unet_vb),
        &out.join("unet").join("diffusion_pytorch_model.safetensors"),
        None,
    )?;
    save_safetensors(
        &vars_tensors(te_vb),
        &out.join("text_encoder").join("model.safetensors"),
        None,
    )
}
