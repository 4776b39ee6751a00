//! The DreamBooth training loop (Ruiz et al. 2023): each step denoises a batch
//! of the subject's photos under the instance prompt ("a photo of sks dog")
//! and, with prior preservation, an equal batch of the frozen model's own class
//! images under the class prompt ("a photo of dog"):
//!
//! ```text
//! loss = ‖ε̂(z_t, c) − ε‖² + λ · ‖ε̂(z'_t', c_pr) − ε'‖²
//! ```
//!
//! with independent timesteps and noise per sample. Latents of the photos (and
//! the text embeddings, when the text encoder is frozen) are computed once.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::checkpoint::{self, CheckpointState, Group};
use super::class_images::{ClassGenOptions, ClassImageCache};
use super::config::TrainConfig;
use super::data::{self, Crop, ImageFolder};
use super::export;
use super::loss::{denoising_loss, min_snr_weights};
use crate::diffusion::{GenerateOptions, NoiseSchedule, SamplerKind, generate};
use crate::models::sd::{PromptEmbeds, encode_ids};
use crate::models::{FrozenDTypes, LoadOptions, StableDiffusion, UNetCond, lora};
use crate::nn::Precision;
use crate::nn::checkpoint::Checkpointing;
use crate::optim::{
    AdamW, AdamWConfig, LossScaler, LrSchedule, Optimizer, OptimizerKind, Prodigy, ProdigyConfig,
    ScaledStep, clip_factor, fused_backward, grad_norm,
};
use crate::util::randn;
use crate::{Error, Result};

/// Random crops per photo whose latents are cached when `center_crop` is off.
const RANDOM_CROPS: u64 = 8;

/// What the loop reports after each optimizer step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepInfo {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub loss_instance: f64,
    pub loss_prior: Option<f64>,
    pub lr: f64,
    /// Prodigy: the UNet optimizer's step-size estimate d (the step is d · lr).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prodigy_d: Option<f64>,
    pub grad_norm: f64,
    pub seconds: f64,
}

/// Callbacks of a training run.
pub struct Events<'a> {
    /// A line for the user (class images, checkpoints, validation, export).
    pub log: &'a mut dyn FnMut(&str),
    pub step: &'a mut dyn FnMut(&StepInfo),
    /// Set (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: &'a AtomicBool,
}

#[derive(Clone, Debug)]
pub struct TrainOutcome {
    pub final_step: u64,
    pub interrupted: bool,
    /// The exported diffusers folder (absent when interrupted).
    pub model_dir: Option<PathBuf>,
    pub single_file: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    /// The LoRA files written (with `lora`; then there is no `model_dir`).
    pub lora_files: Vec<PathBuf>,
}

/// A latent distribution cached per training view: z = mean + std · ε.
struct LatentBank {
    mean: Tensor,
    std: Tensor,
}

impl LatentBank {
    fn encode(model: &StableDiffusion, images: &[image::RgbImage]) -> Result<Self> {
        let mut means = Vec::new();
        let mut stds = Vec::new();
        for chunk in images.chunks(8) {
            let x = data::to_tensor(chunk, &model.device)?;
            let post = model.vae.encode(&x)?;
            means.push(post.mean.detach());
            stds.push(post.std()?.detach());
        }
        Ok(Self {
            mean: Tensor::cat(&means, 0)?.contiguous()?,
            std: Tensor::cat(&stds, 0)?.contiguous()?,
        })
    }

    fn len(&self) -> usize {
        self.mean.dim(0).unwrap_or(0)
    }

    /// Scaled latents (z − shift)·scale for `idx`, with fresh posterior noise.
    fn sample(&self, idx: &[u32], rng: &mut StdRng, model: &StableDiffusion) -> Result<Tensor> {
        let ids = Tensor::from_vec(idx.to_vec(), idx.len(), self.mean.device())?;
        let mean = self.mean.index_select(&ids, 0)?;
        let std = self.std.index_select(&ids, 0)?;
        let eps = randn(rng, mean.dims(), mean.device())?;
        let z = (mean + (std * eps)?)?;
        let vae = &model.vae;
        Ok(((z - vae.shift_factor())? * vae.scaling_factor())?)
    }
}

/// Seeds every random draw of micro-step `i` from (seed, i) alone, so a
/// resumed run repeats exactly what an uninterrupted one would have done.
fn step_rng(seed: u64, i: u64) -> StdRng {
    StdRng::seed_from_u64(crate::toy::world::derive_seed(seed ^ 0xD8EA_B007, i))
}

/// The training resolution: the option, or the model's native size.
pub fn resolution(cfg: &TrainConfig, model: &StableDiffusion) -> usize {
    cfg.resolution.unwrap_or_else(|| model.default_size())
}

/// Loads the base model for training per `cfg`: trainable weights, or with
/// `lora` frozen weights and fresh trainable adapters.
pub fn load_model(cfg: &TrainConfig, device: &Device) -> Result<StableDiffusion> {
    let path = match &cfg.model {
        Some(p) => p.clone(),
        None => crate::models::sd::default_model_dir()?,
    };
    let spec = cfg.lora_spec()?;
    // Mixed precision, as diffusers' scripts cast to `weight_dtype`: what is
    // frozen and computes every step or once is held in the compute dtype,
    // read straight into it (no f32 copy while loading) — LoRA's base UNet
    // (its adapters stay f32), and the text encoder(s) when not trained
    // (their embeddings come back in f32: `encode_ids`). The VAE stays f32.
    let precision = cfg.precision()?;
    let half = precision != Precision::F32;
    if half {
        precision.check_device(device)?;
    }
    let dtypes = FrozenDTypes {
        unet: (half && spec.is_some()).then(|| precision.dtype()),
        text_encoders: (half && !cfg.train_text_encoder).then(|| precision.dtype()),
        vae: None,
    };
    let mut model = StableDiffusion::load(
        &path,
        device,
        LoadOptions {
            train_unet: spec.is_none(),
            train_text_encoder: cfg.train_text_encoder && spec.is_none(),
            prediction_type: cfg
                .prediction_type
                .as_deref()
                .map(crate::diffusion::PredictionType::parse)
                .transpose()?,
            dtypes,
        },
    )?;
    if let Some(vae) = &cfg.vae {
        model.set_vae(vae)?;
    }
    if let Some(spec) = &spec {
        lora::attach_trainable(&mut model, spec)?;
    }
    Ok(model)
}

/// Runs `dreambooth train`: loads the model, trains, exports.
pub fn train(
    cfg: &TrainConfig,
    device: &Device,
    ev: &mut Events,
) -> Result<(StableDiffusion, TrainOutcome)> {
    cfg.validate()?;
    // Before loading anything: bf16 needs a GPU.
    cfg.precision()?.check_device(device)?;
    cfg.prior_generation_precision(device)?
        .check_device(device)?;
    cfg.validation_precision(device)?.check_device(device)?;
    let model = load_model(cfg, device)?;
    let outcome = train_model(cfg, &model, ev)?;
    Ok((model, outcome))
}

/// Trains an already-loaded model in place (its UNet — and text encoder when
/// `train_text_encoder` — must have been loaded trainable, or with `lora`
/// carry trainable adapters: see [`load_model`]).
pub fn train_model(
    cfg: &TrainConfig,
    model: &StableDiffusion,
    ev: &mut Events,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    let res = resolution(cfg, model);
    let mult = model.size_multiple();
    if !res.is_multiple_of(mult) {
        return Err(Error::msg(format!(
            "--resolution {res} must be a multiple of {mult} for this model"
        )));
    }
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    // Instance photos → cached latent distributions, one per training view.
    let (paths, warnings) =
        ImageFolder::scan_for_resolution(&cfg.instance_dir, res, cfg.skip_bad_images)?;
    for w in warnings {
        (ev.log)(&format!("warning: {w}"));
    }
    // Each photo's prompt (its caption, or the instance prompt), as an index
    // into the distinct prompts; each view keeps its photo's.
    let (photo_prompts, captioned) = data::photo_prompts(
        &paths,
        cfg.caption_extension.as_deref(),
        &cfg.instance_prompt,
    )?;
    let mut prompts: Vec<String> = Vec::new();
    let photo_prompt: Vec<usize> = photo_prompts
        .iter()
        .map(|p| match prompts.iter().position(|q| q == p) {
            Some(k) => k,
            None => {
                prompts.push(p.clone());
                prompts.len() - 1
            }
        })
        .collect();
    if let Some(ext) = &cfg.caption_extension {
        (ev.log)(&if captioned == 0 {
            format!(
                "warning: no photo in {} has a {ext} caption; all train on the instance prompt",
                cfg.instance_dir.display()
            )
        } else {
            format!(
                "captions: {captioned} of {} photo(s) train on their {ext} caption ({} distinct instance prompt(s)){}",
                paths.len(),
                prompts.len(),
                if captioned < paths.len() {
                    ", the others on the instance prompt"
                } else {
                    ""
                }
            )
        });
    }
    let mut views = Vec::new();
    let mut view_prompt = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let img = data::load_image(p)?;
        let flips: &[bool] = if cfg.random_flip {
            &[false, true]
        } else {
            &[false]
        };
        let before = views.len();
        if cfg.center_crop {
            for &f in flips {
                views.push(data::prepare(&img, res, Crop::Center, f));
            }
        } else {
            for k in 0..RANDOM_CROPS {
                let seed = crate::toy::world::derive_seed(cfg.seed ^ i as u64, k);
                views.push(data::prepare(
                    &img,
                    res,
                    Crop::Random(seed),
                    cfg.random_flip && k % 2 == 1,
                ));
            }
        }
        view_prompt.resize(view_prompt.len() + views.len() - before, photo_prompt[i]);
    }
    let instance = LatentBank::encode(model, &views)?;
    (ev.log)(&format!(
        "{} instance photo(s) from {}, {} cached training views at {res} px",
        paths.len(),
        cfg.instance_dir.display(),
        instance.len()
    ));

    // Class images for prior preservation: reuse, generate the missing, encode.
    let class_prompt = cfg.class_prompt.clone().unwrap_or_default();
    let class_bank = if cfg.with_prior_preservation {
        let dir = cfg
            .class_dir
            .clone()
            .unwrap_or_else(|| out.join("class_images"));
        let sampler: SamplerKind = cfg.class_sampler.parse()?;
        let gen_opts = ClassGenOptions {
            sampler,
            steps: cfg.class_steps,
            guidance: cfg.class_guidance,
            batch_size: cfg.sample_batch_size,
            seed: cfg.seed,
            negative_prompt: cfg.class_negative_prompt.clone(),
            size: Some(res),
            regenerate: cfg.regenerate_class_images,
        };
        let t0 = Instant::now();
        let mut last = 0;
        // A half-precision sampling copy of the UNet, unless it already
        // computes in that dtype (LoRA's frozen base under mixed precision).
        let half_copy = model.sampling_copy(cfg.prior_generation_precision(&model.device)?)?;
        let imgs = ClassImageCache::prepare(
            half_copy.as_ref().unwrap_or(model),
            &dir,
            &class_prompt,
            cfg.num_class_images,
            &gen_opts,
            &mut |p| {
                if p.done != last || p.step == 1 {
                    last = p.done;
                }
            },
        )?;
        for n in &imgs.notes {
            (ev.log)(n);
        }
        (ev.log)(&format!(
            "class images in {}: {} reused, {} generated, {} user-provided ({:.1}s)",
            dir.display(),
            imgs.reused,
            imgs.generated,
            imgs.user_provided,
            t0.elapsed().as_secs_f64()
        ));
        let mut class_views = Vec::new();
        for p in &imgs.paths {
            let img = data::load_image(p)?;
            class_views.push(data::prepare(&img, res, Crop::Center, false));
        }
        Some(LatentBank::encode(model, &class_views)?)
    } else {
        None
    };

    // Text: cached embeddings when the text encoder is frozen. The instance
    // prompts' ids are one row per distinct prompt.
    let (inst_ids, cut) = model.tokenize(&prompts)?;
    for w in cut {
        (ev.log)(&format!("warning: instance {w}"));
    }
    let (class_ids, _) = model.tokenize(std::slice::from_ref(&class_prompt))?;
    // SDXL: the same prompts for the second text encoder.
    let inst_ids2 = model.tokenize_2(&prompts)?;
    let class_ids2 = model.tokenize_2(std::slice::from_ref(&class_prompt))?;
    let cached_ctx = if cfg.train_text_encoder {
        None
    } else {
        let encode = |p: &String| -> Result<PromptEmbeds> {
            Ok(model.encode_prompt(std::slice::from_ref(p), 0)?.0.detach())
        };
        let inst = prompts.iter().map(encode).collect::<Result<Vec<_>>>()?;
        Some((inst, encode(&class_prompt)?))
    };

    // Optimizers: one parameter group per trained network.
    let adam = |lr: f64| AdamWConfig {
        lr,
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.adam_weight_decay,
    };
    // With LoRA only the adapters train; their checkpoint groups are named
    // apart so a full fine-tune's checkpoint is never resumed as a LoRA run.
    let (unet_vars, te_vars, unet_group, te_group) = if cfg.lora {
        let (te, unet): (BTreeMap<_, _>, BTreeMap<_, _>) = lora::trainable_vars(model)
            .into_iter()
            .partition(|(k, _)| k.starts_with("text_encoder"));
        (unet, te, "unet_lora", "text_encoder_lora")
    } else {
        let mut te = BTreeMap::new();
        if cfg.train_text_encoder {
            te = model.text_encoder_vb.vars();
            // SDXL's second text encoder trains with the first, under its own names.
            if let Some(te2) = &model.text_encoder_2 {
                te.extend(
                    te2.vb
                        .vars()
                        .into_iter()
                        .map(|(k, v)| (format!("text_encoder_2.{k}"), v)),
                );
            }
        }
        (model.unet_vb.vars(), te, "unet", "text_encoder")
    };
    if unet_vars.is_empty() {
        return Err(Error::msg(if cfg.lora {
            "the model has no trainable LoRA adapters (load it with trainer::load_model)"
        } else {
            "the UNet was not loaded trainable"
        }));
    }
    let dropout = lora::dropout_control(model);
    let te_lr = cfg.text_encoder_lr.unwrap_or(cfg.learning_rate);
    // One optimizer per trained network (with Prodigy, each estimates its
    // own step size).
    let kind = cfg.optimizer;
    let make_opt = |vars: BTreeMap<String, candle_core::Var>, lr: f64| -> Result<Optimizer> {
        Ok(match kind {
            OptimizerKind::AdamW => Optimizer::AdamW(AdamW::new(vars, adam(lr))?),
            OptimizerKind::Prodigy => Optimizer::Prodigy(Prodigy::new(
                vars,
                ProdigyConfig {
                    beta1: cfg.adam_beta1,
                    beta2: cfg.adam_beta2,
                    beta3: cfg.prodigy_beta3,
                    eps: cfg.adam_epsilon,
                    weight_decay: cfg.adam_weight_decay,
                    use_bias_correction: cfg.prodigy_use_bias_correction,
                    safeguard_warmup: cfg.prodigy_safeguard_warmup,
                    d_coef: cfg.prodigy_d_coef,
                    ..ProdigyConfig::default()
                },
            )?),
        })
    };
    if kind == OptimizerKind::Prodigy && cfg.learning_rate < 0.1 {
        (ev.log)(&format!(
            "warning: with --optimizer prodigy the learning rate ({}) multiplies the step size \
             it estimates; 1.0 is usual (as diffusers advises)",
            cfg.learning_rate
        ));
    }
    let mut unet_opt = make_opt(unet_vars.clone(), cfg.learning_rate)?;
    let mut te_opt = make_opt(te_vars.clone(), te_lr)?;
    // Gradient checkpointing (or blocks released one by one in the
    // backward): the trained networks as copies (sharing the weights) whose
    // blocks run as checkpointed nodes.
    let checkpointing = match cfg.checkpoint_mode() {
        Some(mode) => Some(Checkpointing::with_mode(
            &model.device,
            unet_vars.values().chain(te_vars.values()),
            mode,
        )?),
        None => None,
    };
    let (unet, text_encoder, text_encoder_2) = match &checkpointing {
        Some(c) => (
            model.unet.with_gradient_checkpointing(c),
            model.text_encoder.with_gradient_checkpointing(c),
            model
                .text_encoder_2
                .as_ref()
                .map(|t| t.model.with_gradient_checkpointing(c)),
        ),
        None => (
            model.unet.clone(),
            model.text_encoder.clone(),
            model.text_encoder_2.as_ref().map(|t| t.model.clone()),
        ),
    };
    let schedule_of = |lr: f64| LrSchedule {
        kind: cfg.lr_scheduler,
        base_lr: lr,
        warmup_steps: cfg.lr_warmup_steps,
        total_steps: cfg.max_train_steps,
    };
    let (unet_sched, te_sched) = (schedule_of(cfg.learning_rate), schedule_of(te_lr));
    let noise_schedule = NoiseSchedule::new(&model.scheduler)?;
    let n_train_t = noise_schedule.num_train_timesteps();
    if cfg.lora && cfg.learning_rate < 1e-5 {
        (ev.log)(&format!(
            "note: --learning-rate {} is a full fine-tune's; LoRA usually wants about 1e-4",
            cfg.learning_rate
        ));
    }
    (ev.log)(&format!(
        "training {} UNet {}parameters{}",
        unet_opt.num_params(),
        if cfg.lora {
            format!(
                "LoRA (rank {}, targets {}) ",
                cfg.lora_rank, cfg.lora_targets
            )
        } else {
            String::new()
        },
        if cfg.train_text_encoder {
            format!(" and {} text-encoder parameters", te_opt.num_params())
        } else {
            String::new()
        }
    ));

    // Mixed precision: the UNet computes in bf16 / f16 on f32 master weights;
    // f16 scales the loss so small gradients survive.
    let precision = cfg.precision()?;
    precision.check_device(&model.device)?;
    let mut scaler = LossScaler::for_precision(precision);
    // A text encoder being trained computes in the same dtype (a frozen one
    // ran once, in f32, for the cached embeddings).
    let (text_encoder, text_encoder_2) = if cfg.train_text_encoder && precision != Precision::F32 {
        (
            text_encoder.with_mixed_precision(precision),
            text_encoder_2.map(|t| t.with_mixed_precision(precision)),
        )
    } else {
        (text_encoder, text_encoder_2)
    };
    if precision != Precision::F32 {
        (ev.log)(&format!(
            "mixed precision: UNet{} in {} with f32 weights and optimizer state{}",
            if cfg.train_text_encoder {
                " and text encoder"
            } else {
                ""
            },
            precision.name(),
            if scaler.enabled {
                ", dynamic loss scaling"
            } else {
                ""
            }
        ));
    }

    // Resume.
    let ckpt_root = out.join("checkpoints");
    let mut start = 0u64;
    if let Some(which) = &cfg.resume {
        let dir = checkpoint::resolve(&ckpt_root, which)?;
        let mut groups = vec![Group {
            name: unet_group,
            vars: &unet_vars,
            opt: &mut unet_opt,
        }];
        if cfg.train_text_encoder {
            groups.push(Group {
                name: te_group,
                vars: &te_vars,
                opt: &mut te_opt,
            });
        }
        let state = checkpoint::load(&dir, &mut groups, &model.device)?;
        if state.seed != cfg.seed {
            (ev.log)(&format!(
                "warning: the checkpoint was trained with --seed {}, this run uses {}",
                state.seed, cfg.seed
            ));
        }
        start = state.step;
        if let Some(s) = state.loss_scaler
            && scaler.enabled
        {
            scaler = s;
        }
        (ev.log)(&format!("resumed from {} at step {start}", dir.display()));
    }

    let log_path = out.join("logs").join("train.jsonl");
    std::fs::create_dir_all(log_path.parent().unwrap()).map_err(|e| Error::io(&log_path, e))?;
    let mut jsonl = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;

    let save_ckpt = |step: u64,
                     unet_opt: &mut Optimizer,
                     te_opt: &mut Optimizer,
                     scaler: &LossScaler|
     -> Result<PathBuf> {
        let mut steps = BTreeMap::from([(unet_group.to_string(), unet_opt.step())]);
        let mut groups = vec![Group {
            name: unet_group,
            vars: &unet_vars,
            opt: unet_opt,
        }];
        if cfg.train_text_encoder {
            steps.insert(te_group.into(), te_opt.step());
            groups.push(Group {
                name: te_group,
                vars: &te_vars,
                opt: te_opt,
            });
        }
        let state = CheckpointState {
            step,
            seed: cfg.seed,
            optimizer_steps: steps,
            loss_scaler: scaler.enabled.then(|| scaler.clone()),
        };
        checkpoint::save(&ckpt_root, &state, &groups, cfg.checkpoints_total_limit)
    };

    if cfg.fused_backward_pass {
        (ev.log)(&format!(
            "fused backward pass: each block's weights update as soon as their gradients exist{}",
            if cfg.max_grad_norm > 0.0 {
                format!(
                    "; --max-grad-norm {} clips each weight's gradient by its own norm",
                    cfg.max_grad_norm
                )
            } else {
                String::new()
            }
        ));
    }
    let bs = cfg.train_batch_size;
    let accum = cfg.gradient_accumulation_steps;
    let t0 = Instant::now();
    let mut last_ckpt = None;
    let mut step = start;
    let mut interrupted = false;
    while step < cfg.max_train_steps {
        // Our CPU kernels' threads stay awake through the step.
        let _warm = crate::nn::cpu::KeepWarm::start();
        let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
        let (mut l_inst, mut l_prior, mut l_total) = (0f64, 0f64, 0f64);
        let mut fused_norm = None;
        for micro in 0..accum {
            let micro_step = step * accum as u64 + micro as u64;
            let mut rng = step_rng(cfg.seed, micro_step);
            if let Some(d) = &dropout {
                d.begin_step(micro_step);
            }
            let inst_idx: Vec<u32> = (0..bs)
                .map(|_| rng.random_range(0..instance.len() as u32))
                .collect();
            let mut latents = instance.sample(&inst_idx, &mut rng, model)?;
            let mut ctx_parts = Vec::new();
            let n_class = if let Some(cb) = &class_bank {
                let idx: Vec<u32> = (0..bs)
                    .map(|_| rng.random_range(0..cb.len() as u32))
                    .collect();
                latents = Tensor::cat(&[&latents, &cb.sample(&idx, &mut rng, model)?], 0)?;
                bs
            } else {
                0
            };
            // Each sampled view's prompt (a row of the instance ids).
            let rows: Vec<u32> = inst_idx
                .iter()
                .map(|&v| view_prompt[v as usize] as u32)
                .collect();
            let embeds = match &cached_ctx {
                Some((a, b)) => {
                    for &r in &rows {
                        ctx_parts.push(a[r as usize].clone());
                    }
                    if n_class > 0 {
                        ctx_parts.push(b.repeat(n_class)?);
                    }
                    PromptEmbeds::cat(&ctx_parts.iter().collect::<Vec<_>>())?
                }
                None => {
                    let rows = Tensor::new(rows.as_slice(), &model.device)?;
                    let batch = |inst: &Tensor, class: &Tensor| -> Result<Tensor> {
                        let mut ids = vec![inst.index_select(&rows, 0)?];
                        if n_class > 0 {
                            ids.push(class.repeat((n_class, 1))?);
                        }
                        Ok(Tensor::cat(&ids, 0)?)
                    };
                    let ids2 = match (&inst_ids2, &class_ids2) {
                        (Some(a), Some(b)) => Some(batch(a, b)?),
                        _ => None,
                    };
                    encode_ids(
                        &text_encoder,
                        text_encoder_2.as_ref(),
                        &batch(&inst_ids, &class_ids)?,
                        ids2.as_ref(),
                        0,
                    )?
                }
            };
            // SDXL: time ids of the training crop as it is (res × res, no offset).
            let added = model.added_cond(&embeds, res, res)?;
            let n = bs + n_class;
            let timesteps: Vec<usize> = (0..n).map(|_| rng.random_range(0..n_train_t)).collect();
            let mut noise = randn(&mut rng, latents.dims(), &model.device)?;
            if cfg.offset_noise > 0.0 {
                let (b, c, _, _) = latents.dims4()?;
                let off = randn(&mut rng, &[b, c, 1, 1], &model.device)?;
                noise = noise.broadcast_add(&(off * cfg.offset_noise)?)?;
            }
            let mut per = denoising_loss(
                &unet,
                &noise_schedule,
                &latents,
                UNetCond {
                    context: &embeds.context,
                    added: added.as_ref(),
                },
                &timesteps,
                &noise,
                precision,
            )?;
            if let Some(g) = cfg.snr_gamma {
                per = (per * min_snr_weights(&noise_schedule, &timesteps, g, &model.device)?)?;
            }
            let loss_inst = per.i(0..bs)?.mean_all()?;
            let mut loss = loss_inst.clone();
            if n_class > 0 {
                let loss_prior = per.i(bs..n)?.mean_all()?;
                l_prior += loss_prior.to_scalar::<f32>()? as f64 / accum as f64;
                loss = (loss + (loss_prior * cfg.prior_loss_weight)?)?;
            }
            l_inst += loss_inst.to_scalar::<f32>()? as f64 / accum as f64;
            l_total += loss.to_scalar::<f32>()? as f64 / accum as f64;
            let mut loss = (loss / accum as f64)?;
            if scaler.enabled {
                loss = (loss * scaler.scale)?;
            }
            if let (true, Some(ck)) = (cfg.fused_backward_pass, checkpointing.as_deref()) {
                // The update happens inside the backward (accumulation is 1).
                // AdamW only: the config refuses Prodigy with the fused pass.
                let mut groups = vec![(fused_adamw(&mut unet_opt)?, unet_sched.lr(step))];
                if cfg.train_text_encoder {
                    groups.push((fused_adamw(&mut te_opt)?, te_sched.lr(step)));
                }
                fused_norm = fused_backward(ck, &loss, &mut groups, cfg.max_grad_norm, true)?;
                if let Some(d) = &dropout {
                    d.end_step();
                }
                continue;
            }
            let grads = crate::nn::checkpoint::backward(checkpointing.as_deref(), &loss)?;
            if let Some(d) = &dropout {
                d.end_step();
            }
            AdamW::accumulate(&mut acc, unet_opt.collect(&grads))?;
            if cfg.train_text_encoder {
                AdamW::accumulate(
                    &mut acc,
                    te_opt
                        .collect(&grads)
                        .into_iter()
                        .map(|(k, g)| (format!("te:{k}"), g))
                        .collect(),
                )?;
            }
        }
        let lr = unet_sched.lr(step);
        let norm = match fused_norm {
            Some(norm) => norm,
            None => {
                let scaled_norm = grad_norm(acc.values())?;
                let (te_acc, unet_acc): (BTreeMap<_, _>, BTreeMap<_, _>) =
                    acc.into_iter().partition(|(k, _)| k.starts_with("te:"));
                let (norm, scale, skip) = match scaler.update(scaled_norm) {
                    ScaledStep::Apply { unscale } => {
                        let norm = scaled_norm * unscale;
                        (norm, clip_factor(norm, cfg.max_grad_norm) * unscale, false)
                    }
                    ScaledStep::Skip => {
                        (ev.log)(&format!(
                            "step {}: f16 gradients overflowed; update skipped, loss scale now {}",
                            step + 1,
                            scaler.scale
                        ));
                        (f64::NAN, 0.0, true)
                    }
                };
                if !skip {
                    unet_opt.step_map(&unet_acc, lr, scale)?;
                }
                if cfg.train_text_encoder && !skip {
                    let te_acc: BTreeMap<String, Tensor> = te_acc
                        .into_iter()
                        .map(|(k, g)| (k["te:".len()..].to_string(), g))
                        .collect();
                    te_opt.step_map(&te_acc, te_sched.lr(step), scale)?;
                }
                norm
            }
        };
        step += 1;
        let info = StepInfo {
            step,
            total: cfg.max_train_steps,
            loss: l_total,
            loss_instance: l_inst,
            loss_prior: class_bank.as_ref().map(|_| l_prior),
            lr,
            prodigy_d: unet_opt.step_size_estimate(),
            grad_norm: norm,
            seconds: t0.elapsed().as_secs_f64(),
        };
        if let Ok(line) = serde_json::to_string(&info) {
            writeln!(jsonl, "{line}").map_err(|e| Error::io(&log_path, e))?;
        }
        (ev.step)(&info);

        if cfg.checkpointing_steps > 0
            && step.is_multiple_of(cfg.checkpointing_steps)
            && step < cfg.max_train_steps
        {
            let p = save_ckpt(step, &mut unet_opt, &mut te_opt, &scaler)?;
            (ev.log)(&format!("checkpoint saved: {}", p.display()));
            last_ckpt = Some(p);
        }
        if !cfg.validation_prompt.is_empty()
            && cfg.validation_steps > 0
            && step.is_multiple_of(cfg.validation_steps)
            && step < cfg.max_train_steps
        {
            let p = validation(cfg, model, &cfg.validation_prompt, step, res)?;
            (ev.log)(&format!("validation images: {}", p.display()));
        }
        if ev.stop.load(Ordering::SeqCst) && step < cfg.max_train_steps {
            let p = save_ckpt(step, &mut unet_opt, &mut te_opt, &scaler)?;
            (ev.log)(&format!(
                "interrupted at step {step}: checkpoint saved to {} (continue with --resume latest)",
                p.display()
            ));
            last_ckpt = Some(p);
            interrupted = true;
            break;
        }
    }

    if interrupted {
        return Ok(TrainOutcome {
            final_step: step,
            interrupted,
            model_dir: None,
            single_file: None,
            last_checkpoint: last_ckpt,
            lora_files: Vec::new(),
        });
    }
    if !cfg.validation_prompt.is_empty() {
        let p = validation(cfg, model, &cfg.validation_prompt, step, res)?;
        (ev.log)(&format!("validation images: {}", p.display()));
    }
    let mut outcome = TrainOutcome {
        final_step: step,
        interrupted: false,
        model_dir: None,
        single_file: None,
        last_checkpoint: last_ckpt,
        lora_files: Vec::new(),
    };
    if cfg.lora {
        let (peft, kohya) = cfg.lora_formats()?;
        if peft {
            outcome
                .lora_files
                .push(lora::export_peft(model, &out.join(lora::PEFT_FILE))?);
        }
        if kohya {
            outcome.lora_files.push(lora::export_kohya(
                model,
                &out.join(lora::KOHYA_FILE),
                // sd-scripts names SDXL's UNet layers by the original modules.
                if model.is_sdxl() {
                    lora::KohyaNames::Ldm
                } else {
                    lora::KohyaNames::Diffusers
                },
            )?);
        }
        for f in &outcome.lora_files {
            (ev.log)(&format!("LoRA weights: {}", f.display()));
        }
        return Ok(outcome);
    }
    if !cfg.save_model {
        return Ok(outcome);
    }
    let model_dir = out.join("model");
    let save_dtype = Precision::parse(&cfg.save_precision)?.dtype();
    export::save_diffusers_as(model, &model_dir, Some(save_dtype))?;
    (ev.log)(&format!(
        "trained model (diffusers folder{}): {}",
        if save_dtype == candle_core::DType::F32 {
            String::new()
        } else {
            format!(", {}", cfg.save_precision)
        },
        model_dir.display()
    ));
    outcome.model_dir = Some(model_dir);
    if cfg.save_single_file {
        let p = export::save_single(model, &out.join("model.safetensors"), save_dtype)?;
        (ev.log)(&format!("single-file checkpoint: {}", p.display()));
        outcome.single_file = Some(p);
    }
    Ok(outcome)
}

/// Generates `num_validation_images` of each prompt with the current weights
/// (the same seeds every time) and saves them as a grid under
/// `output_dir/validation/`: one prompt in rows of up to 4, several one row
/// each; the PNG's `prompts` text lists them in row order.
fn validation(
    cfg: &TrainConfig,
    model: &StableDiffusion,
    prompts: &[String],
    step: u64,
    res: usize,
) -> Result<PathBuf> {
    let per = cfg.num_validation_images.max(1);
    let mut opts = GenerateOptions::new("", 0);
    opts.prompts = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), per))
        .collect();
    opts.steps = cfg.sample_steps;
    opts.guidance_scale = cfg.sample_guidance;
    opts.seed = cfg.seed;
    opts.width = Some(res);
    opts.height = Some(res);
    opts.batch_size = cfg.sample_batch_size.max(1);
    // A full fine-tune validates with a half-precision copy of its current
    // weights when asked; LoRA with the model as trained (adapters included).
    let half_copy = if cfg.lora {
        None
    } else {
        model.sampling_copy(cfg.validation_precision(&model.device)?)?
    };
    let g = generate(half_copy.as_ref().unwrap_or(model), &opts, &mut |_| {})?;
    let images: Vec<_> = g.images.into_iter().map(|i| i.image).collect();
    let cols = if prompts.len() == 1 { per.min(4) } else { per };
    let grid = crate::image_io::grid(&images, Some(cols))?;
    let path = cfg
        .output_dir
        .join("validation")
        .join(format!("step-{step:06}.png"));
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let text = [
        ("prompts".to_string(), prompts.join("\n")),
        ("step".to_string(), step.to_string()),
    ];
    crate::image_io::save_png(&path, &grid, &text)?;
    Ok(path)
}

/// The AdamW a fused backward pass updates with.
fn fused_adamw(o: &mut Optimizer) -> Result<&mut AdamW> {
    o.adamw_mut()
        .ok_or_else(|| Error::msg("--fused-backward-pass needs --optimizer adamw"))
}

/// Where a run's checkpoints live.
pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}
