//! Text-to-image generation, as diffusers' `StableDiffusionPipeline`, and
//! image-to-image, as its `StableDiffusionImg2ImgPipeline`.
//!
//! prompt → text context; Gaussian latents × init_noise_sigma; per step the
//! UNet's prediction with classifier-free guidance (negative prompt and prompt
//! in one batch: ε̂ = ε̂_neg + g·(ε̂_pos − ε̂_neg); no negative pass when g ≤ 1)
//! and a sampler step; the VAE decodes latents / scaling_factor to pixels.
//!
//! Image-to-image ([`InitImage`]) starts part-way instead: of `steps` steps it
//! runs the last ⌊steps·strength⌋, from the image's VAE latents (a posterior
//! sample × scaling_factor) noised to the first of them by the sampler's
//! forward process.
//!
//! Every random draw comes from a per-image [`StdRng`] seeded with `seed + i`
//! (image `i`'s posterior noise for image-to-image, its starting noise, then the
//! ancestral samplers' per-step noise), so the same seed gives the same images
//! whatever the batch size, and image `i` is reproduced alone with `seed + i`.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use super::sampler::{SamplerKind, make_sampler};
use crate::image_io::GenerationInfo;
use crate::models::sd::{PromptEmbeds, StableDiffusion};
use crate::{Error, Result};

/// What to generate. [`GenerateOptions::new`] gives diffusers' defaults.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// One image per entry (repeat a prompt for several images of it).
    pub prompts: Vec<String>,
    /// The negative prompt of every image ("" for none).
    pub negative_prompt: String,
    /// Classifier-free guidance scale; ≤ 1 runs the prompt alone.
    pub guidance_scale: f64,
    pub steps: usize,
    pub sampler: SamplerKind,
    /// DDIM's noise weight (0 = deterministic).
    pub eta: f64,
    /// Image `i` uses seed `seed + i`.
    pub seed: u64,
    /// Images per UNet batch (each runs twice as wide with guidance).
    pub batch_size: usize,
    /// Pixels; default the model's [`StableDiffusion::default_size`], or the
    /// size of `latents` when given.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// 0 = the text encoder's last layer, 1 = the penultimate, ...
    pub clip_skip: usize,
    /// Starting latents (B, C, H/f, W/f), unit Gaussian (they are multiplied by
    /// the sampler's init_noise_sigma); B equals the number of prompts.
    /// Drawn from the seeded RNG when absent. For image-to-image: the noise
    /// added to the image's latents.
    pub latents: Option<Tensor>,
    /// Image-to-image: start from this image instead of pure noise.
    pub init: Option<InitImage>,
}

/// The image an image-to-image generation starts from.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// (1 or B, 3, H, W) pixels in [-1, 1]; one image serves every prompt.
    pub pixels: Tensor,
    /// How far from the image to go, in (0, 1]: the share of the sampler's
    /// steps that run (at 1 all run, from the image's latents noised to the
    /// first step's level: little of the image is left).
    pub strength: f64,
    /// What the image was (its file name), for the generation record.
    pub name: String,
    /// The unit Gaussian of the VAE's posterior sample (B, C, H/f, W/f);
    /// drawn from the seeded RNG when absent.
    pub posterior_noise: Option<Tensor>,
}

impl InitImage {
    /// `image` as pixels in [-1, 1] (x/127.5 − 1, as diffusers' preprocessing).
    pub fn from_rgb(image: &RgbImage, strength: f64, name: impl Into<String>) -> Result<Self> {
        Ok(Self {
            pixels: crate::dreambooth::data::to_tensor(std::slice::from_ref(image), &Device::Cpu)?,
            strength,
            name: name.into(),
            posterior_noise: None,
        })
    }
}

/// The first step image-to-image takes of `steps` at `strength` (diffusers'
/// `get_timesteps`: the last ⌊steps·strength⌋ steps run), or an error when
/// the strength is outside (0, 1] or leaves no step.
pub fn first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::msg(format!(
            "strength must be in (0, 1] (the share of the steps that change the image), got {strength}"
        )));
    }
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        return Err(Error::msg(format!(
            "strength {strength} of {steps} steps runs no step (⌊{steps} × {strength}⌋ = 0); \
             raise the strength or the steps"
        )));
    }
    Ok(steps - run)
}

impl GenerateOptions {
    /// `n` images of `prompt` with 30 DPM-Solver++ steps, guidance 7.5, seed 0.
    pub fn new(prompt: impl Into<String>, n: usize) -> Self {
        Self {
            prompts: vec![prompt.into(); n],
            negative_prompt: String::new(),
            guidance_scale: 7.5,
            steps: 30,
            sampler: SamplerKind::DpmPlusPlus,
            eta: 0.0,
            seed: 0,
            batch_size: 1,
            width: None,
            height: None,
            clip_skip: 0,
            latents: None,
            init: None,
        }
    }

    /// Whether a negative-prompt pass runs (guidance > 1, as diffusers).
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// Where generation is, reported after every sampler step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Steps done in the current batch (1..=steps).
    pub step: usize,
    pub steps: usize,
    /// Current batch (0-based) and the number of batches.
    pub batch: usize,
    pub batches: usize,
    /// Images finished before this batch, and in all.
    pub images_done: usize,
    pub images: usize,
}

/// One generated image with the parameters that reproduce it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub image: RgbImage,
    pub info: GenerationInfo,
}

/// The result of [`generate`].
#[derive(Debug)]
pub struct Generation {
    pub images: Vec<GeneratedImage>,
    /// The final latents (B, C, h, w), before the VAE (not divided by the scaling factor).
    pub latents: Tensor,
    /// Warnings for the user (truncated prompts), each once.
    pub warnings: Vec<String>,
}

/// Generates `opts.prompts.len()` images with an already-loaded model (the CLI,
/// the trainer's class images and validation all come through here).
/// `progress` is called after every sampler step.
pub fn generate(
    model: &StableDiffusion,
    opts: &GenerateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Generation> {
    let n = opts.prompts.len();
    if n == 0 {
        return Err(Error::msg("nothing to generate: no prompts given"));
    }
    if opts.batch_size == 0 {
        return Err(Error::msg("batch size must be at least 1"));
    }
    if !opts.guidance_scale.is_finite() {
        return Err(Error::msg(format!(
            "guidance scale {} is not a number",
            opts.guidance_scale
        )));
    }
    let (width, height) = image_size(model, opts)?;
    let f = model.vae_scale_factor();
    let latent_shape = (model.unet_config().in_channels, height / f, width / f);
    // Fail on a bad sampler configuration before any work.
    make_sampler(opts.sampler, &model.scheduler, opts.steps, opts.eta)?;
    if let Some(init) = &opts.init {
        first_step(opts.steps, init.strength)?;
        check_init(model, init, n, latent_shape)?;
    }
    let model_name = model.name();
    let model_hash = model.model_hash()?;

    let mut rngs: Vec<StdRng> = (0..n as u64)
        .map(|i| StdRng::seed_from_u64(opts.seed.wrapping_add(i)))
        .collect();
    let batches = n.div_ceil(opts.batch_size);
    let mut images = Vec::with_capacity(n);
    let mut all_latents = Vec::with_capacity(batches);
    let mut warnings: Vec<String> = Vec::new();
    let mut warn = |w: Vec<String>| {
        for w in w {
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
    };

    for batch in 0..batches {
        let lo = batch * opts.batch_size;
        let hi = (lo + opts.batch_size).min(n);
        let prompts = &opts.prompts[lo..hi];
        // Image-to-image: the image's latents, drawn before the noise.
        let init_latents = match &opts.init {
            Some(init) => Some(init_latents(model, init, lo, hi, &mut rngs[lo..hi])?),
            None => None,
        };
        let x0 = match &opts.latents {
            Some(l) => l
                .narrow(0, lo, hi - lo)?
                .to_device(&model.device)?
                .to_dtype(DType::F32)?,
            None => randn(&mut rngs[lo..hi], latent_shape, &model.device)?,
        };
        let (cond, w) = model.encode_prompt(prompts, opts.clip_skip)?;
        warn(w);
        let uncond = if !opts.uses_guidance() {
            None
        } else if model.is_sdxl()
            && model.force_zeros_for_empty_prompt
            && opts.negative_prompt.is_empty()
        {
            // StableDiffusionXLPipeline without a negative prompt.
            Some(cond.zeros_like()?)
        } else {
            let negs = vec![opts.negative_prompt.clone(); prompts.len()];
            let (u, w) = model.encode_prompt(&negs, opts.clip_skip)?;
            warn(w);
            Some(u)
        };
        let images_done = lo;
        let latents = denoise(
            model,
            opts,
            Start {
                noise: &x0,
                image_latents: init_latents.as_ref(),
            },
            &cond,
            uncond.as_ref(),
            &mut rngs[lo..hi],
            &mut |step, steps| {
                progress(&Progress {
                    step,
                    steps,
                    batch,
                    batches,
                    images_done,
                    images: n,
                })
            },
        )?;
        let pixels = decode_latents(model, &latents)?;
        for (j, image) in to_rgb8(&pixels)?.into_iter().enumerate() {
            let i = lo + j;
            images.push(GeneratedImage {
                image,
                info: GenerationInfo {
                    prompt: opts.prompts[i].clone(),
                    negative_prompt: opts.negative_prompt.clone(),
                    seed: opts.seed.wrapping_add(i as u64),
                    steps: opts.steps,
                    sampler: opts.sampler.name().to_string(),
                    guidance: opts.guidance_scale,
                    eta: opts.eta,
                    clip_skip: opts.clip_skip,
                    model: model_name.clone(),
                    model_hash: model_hash.clone(),
                    width,
                    height,
                    init_image: opts.init.as_ref().map(|i| i.name.clone()),
                    strength: opts.init.as_ref().map(|i| i.strength),
                },
            });
        }
        all_latents.push(latents);
    }
    Ok(Generation {
        images,
        latents: Tensor::cat(&all_latents, 0)?,
        warnings,
    })
}

/// The image size of a request, checked: from the options, the given latents,
/// or the model's default; multiples of [`StableDiffusion::size_multiple`].
pub fn image_size(model: &StableDiffusion, opts: &GenerateOptions) -> Result<(usize, usize)> {
    let f = model.vae_scale_factor();
    let (mut w, mut h) = (opts.width, opts.height);
    if let Some(l) = &opts.latents {
        let (b, c, lh, lw) = l.dims4().map_err(|_| {
            Error::msg(format!(
                "initial latents must have 4 dimensions (batch, channels, height, width), got shape {:?}",
                l.dims()
            ))
        })?;
        let want_c = model.unet_config().in_channels;
        if c != want_c {
            return Err(Error::msg(format!(
                "initial latents have {c} channels, the model's UNet takes {want_c}"
            )));
        }
        if b != opts.prompts.len() {
            return Err(Error::msg(format!(
                "initial latents hold {b} images but {} were asked for",
                opts.prompts.len()
            )));
        }
        for (name, given, from_latents) in [("width", w, lw * f), ("height", h, lh * f)] {
            if let Some(g) = given
                && g != from_latents
            {
                return Err(Error::msg(format!(
                    "{name} {g} differs from the initial latents' {from_latents} ({} latent pixels × {f})",
                    from_latents / f
                )));
            }
        }
        w = Some(lw * f);
        h = Some(lh * f);
    }
    if let Some(init) = &opts.init {
        let (_, _, ih, iw) = init.pixels.dims4().map_err(|_| {
            Error::msg(format!(
                "the initial image must be (batch, 3, height, width) pixels, got shape {:?}",
                init.pixels.dims()
            ))
        })?;
        for (name, given, from_image) in [("width", w, iw), ("height", h, ih)] {
            if let Some(g) = given
                && g != from_image
            {
                return Err(Error::msg(format!(
                    "{name} {g} differs from the initial image's {from_image} (resize the image instead)"
                )));
            }
        }
        w = Some(iw);
        h = Some(ih);
    }
    let d = model.default_size();
    let (w, h) = (w.unwrap_or(d), h.unwrap_or(d));
    let m = model.size_multiple();
    for (name, v) in [("width", w), ("height", h)] {
        if v == 0 || v % m != 0 {
            let why = if m > 8 {
                format!(
                    " (this model's latents are 1/{f} of the image and its UNet halves them {} times)",
                    m.trailing_zeros() - f.trailing_zeros()
                )
            } else {
                String::new()
            };
            return Err(Error::msg(format!(
                "{name} {v} is not a multiple of {m}{why}; try {}",
                (v / m).max(1) * m
            )));
        }
    }
    Ok((w, h))
}

/// Where [`denoise`] starts.
#[derive(Clone, Copy)]
pub struct Start<'a> {
    /// Unit Gaussian latents (B, C, h, w).
    pub noise: &'a Tensor,
    /// Image-to-image: the image's scaled latents, noised with `noise` to the
    /// [`first_step`] of the options' strength.
    pub image_latents: Option<&'a Tensor>,
}

/// Runs the sampler from `start` to the final latents, with guidance when
/// `uncond` is given: from the noise × init_noise_sigma at the first step,
/// or (image-to-image) from the image latents noised to [`first_step`].
/// `rngs` (one per image) supply the ancestral samplers' noise.
/// `on_step(step, steps)` after each step (`steps` = the steps that run).
pub fn denoise(
    model: &StableDiffusion,
    opts: &GenerateOptions,
    start: Start<'_>,
    cond: &PromptEmbeds,
    uncond: Option<&PromptEmbeds>,
    rngs: &mut [StdRng],
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let x0 = start.noise;
    let b = x0.dim(0)?;
    let dev = x0.device().clone();
    let mut sampler = make_sampler(opts.sampler, &model.scheduler, opts.steps, opts.eta)?;
    // Detached: a trainable model's Vars must not grow a graph across steps.
    let embeds = match uncond {
        Some(u) => PromptEmbeds::cat(&[u, cond])?.detach(),
        None => cond.detach(),
    };
    let context = &embeds.context;
    let f = model.vae_scale_factor();
    let (_, _, lh, lw) = x0.dims4()?;
    let added = model.added_cond(&embeds, lh * f, lw * f)?;
    let steps = sampler.num_steps();
    let (first, mut x) = match (start.image_latents, &opts.init) {
        (Some(z), Some(i)) => {
            let first = first_step(steps, i.strength)?;
            sampler.begin_at(first)?;
            (first, sampler.add_noise(z, x0, first)?)
        }
        (None, None) => (0, (x0 * sampler.init_noise_sigma())?),
        _ => {
            return Err(Error::msg(
                "denoise: initial latents and the options' initial image go together",
            ));
        }
    };
    let shape = {
        let (_, c, h, w) = x0.dims4()?;
        (c, h, w)
    };
    let unet_dtype = model.unet.conv_in.weight.dtype();
    let _warm = crate::nn::cpu::KeepWarm::start();
    for i in first..steps {
        let t = sampler.timesteps()[i];
        let x_in = sampler.scale_model_input(&x, i)?;
        let x_in = if uncond.is_some() {
            Tensor::cat(&[&x_in, &x_in], 0)?
        } else {
            x_in
        };
        let ts = Tensor::full(t as f32, x_in.dim(0)?, &dev)?;
        // The UNet computes in its weights' dtype (f32, or bf16 / f16 after
        // `set_unet_precision`); guidance and the sampler stay in f32.
        let x_in = crate::nn::precision::cast(&x_in, unet_dtype)?;
        let out = model
            .unet
            .forward_added(&x_in, &ts, context, added.as_ref())?
            .detach()
            .to_dtype(DType::F32)?;
        let pred = if uncond.is_some() {
            let u = out.narrow(0, 0, b)?;
            let c = out.narrow(0, b, b)?;
            (&u + ((c - &u)? * opts.guidance_scale)?)?
        } else {
            out
        };
        let noise = if sampler.needs_noise() {
            Some(randn(rngs, shape, &dev)?)
        } else {
            None
        };
        x = sampler.step(&pred, i, &x, noise.as_ref())?;
        on_step(i + 1 - first, steps - first);
    }
    Ok(x)
}

/// The initial image against the request: one image or one per prompt, RGB,
/// and latents of the shape the UNet takes.
fn check_init(
    model: &StableDiffusion,
    init: &InitImage,
    n: usize,
    latent_shape: (usize, usize, usize),
) -> Result<()> {
    let (b, c, _, _) = init.pixels.dims4()?;
    if c != 3 {
        return Err(Error::msg(format!(
            "the initial image has {c} colour channels, the VAE takes 3"
        )));
    }
    if b != 1 && b != n {
        return Err(Error::msg(format!(
            "{b} initial images for {n} prompts: give one, or one per prompt"
        )));
    }
    let vae_c = model.vae.config().latent_channels;
    if vae_c != latent_shape.0 {
        return Err(Error::msg(format!(
            "image-to-image needs the VAE's {vae_c} latent channels to be the UNet's {} input \
             channels (an inpainting or depth UNet takes more)",
            latent_shape.0
        )));
    }
    if let Some(e) = &init.posterior_noise {
        let want = (n, latent_shape.0, latent_shape.1, latent_shape.2);
        if e.dims4().ok() != Some(want) {
            return Err(Error::msg(format!(
                "posterior noise of shape {:?}; expected {want:?}",
                e.dims()
            )));
        }
    }
    Ok(())
}

/// Images `lo..hi`'s latents for image-to-image: the VAE posterior sampled
/// with `posterior_noise` (or each image's RNG), then (z − shift)·scale.
fn init_latents(
    model: &StableDiffusion,
    init: &InitImage,
    lo: usize,
    hi: usize,
    rngs: &mut [StdRng],
) -> Result<Tensor> {
    let dev = &model.device;
    let pixels = init.pixels.to_device(dev)?.to_dtype(DType::F32)?;
    let pixels = if pixels.dim(0)? == 1 {
        pixels.repeat((hi - lo, 1, 1, 1))?
    } else {
        pixels.narrow(0, lo, hi - lo)?
    };
    let vae_dtype = model.vae_dtype();
    let post = model
        .vae
        .encode(&crate::nn::precision::cast(&pixels, vae_dtype)?)?;
    let (mean, std) = (
        post.mean.to_dtype(DType::F32)?,
        post.std()?.to_dtype(DType::F32)?,
    );
    let eps = match &init.posterior_noise {
        Some(e) => e
            .narrow(0, lo, hi - lo)?
            .to_device(dev)?
            .to_dtype(DType::F32)?,
        None => {
            let (_, c, h, w) = mean.dims4()?;
            randn(rngs, (c, h, w), dev)?
        }
    };
    let z = (mean + (std * eps)?)?;
    let vae = &model.vae;
    Ok(((z - vae.shift_factor())? * vae.scaling_factor())?.detach())
}

/// Standard normal latents (B, C, H, W): image `i`'s from `rngs[i]`.
pub fn randn(rngs: &mut [StdRng], shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
    let (c, h, w) = shape;
    let per = c * h * w;
    let mut data = Vec::with_capacity(rngs.len() * per);
    for rng in rngs.iter_mut() {
        data.extend((0..per).map(|_| -> f32 { StandardNormal.sample(rng) }));
    }
    Ok(Tensor::from_vec(data, (rngs.len(), c, h, w), device)?)
}

/// Latents (as the UNet sees them) → pixels (B, 3, H, W) in [0, 1]: the VAE
/// decodes latents / scaling_factor (+ shift), then (x / 2 + 0.5) clamped.
/// The decoder computes in the UNet's dtype: with a half-precision UNet
/// (`--dtype`, LoRA's frozen base under mixed precision) it runs in bf16 /
/// f16 as well, as diffusers' pipelines run every part in `torch_dtype`
/// (its layers cast their f32 weights per call; norms keep f32 statistics).
pub fn decode_latents(model: &StableDiffusion, latents: &Tensor) -> Result<Tensor> {
    let z = (latents.detach() / model.vae.scaling_factor())?;
    let shift = model.vae.shift_factor();
    let z = if shift != 0.0 { (z + shift)? } else { z };
    use crate::nn::precision::{cast, is_half};
    let unet_weight = &model.unet.conv_in.weight;
    let z = if is_half(unet_weight) {
        cast(&z, unet_weight.dtype())?
    } else {
        z
    };
    let x = cast(&model.vae.decode(&z)?, DType::F32)?.detach();
    Ok(((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// Pixels (B, 3, H, W) in [0, 1] → 8-bit RGB images, rounding as diffusers
/// (`(x * 255).round()`).
pub fn to_rgb8(pixels: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = pixels.dims4()?;
    if c != 3 {
        return Err(Error::msg(format!("expected 3 colour channels, got {c}")));
    }
    let v = (pixels.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| {
            let raw: Vec<u8> = v[i * per..(i + 1) * per].iter().map(|&x| x as u8).collect();
            RgbImage::from_raw(w as u32, h as u32, raw).expect("buffer matches the size")
        })
        .collect())
}
