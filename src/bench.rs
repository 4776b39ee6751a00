//! `dreambooth bench step`: the time of one training step of the UNet
//! (forward, MSE loss, backward, AdamW) with random weights, so a change to a
//! layer can be measured against itself and against PyTorch on the same
//! machine (`tools/bench/pytorch_cpu_step.py` runs the same shapes).
//!
//! `dreambooth bench sample`: images per second of text-to-image generation
//! (DDIM, classifier-free guidance, as class images are made) with a real
//! model folder; `tools/bench/pytorch_cpu_sample.py` runs diffusers'
//! `StableDiffusionPipeline` on the same folder.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::models::UNet2DConditionModel;
use crate::models::config::UNetConfig;
use crate::nn::Vb;
use crate::optim::{AdamW, AdamWConfig};
use crate::util::randn;
use crate::{Error, Result};

/// Which UNet to build.
#[derive(Clone, Debug)]
pub enum Arch {
    /// Stable Diffusion 1.5's UNet (860M parameters).
    Sd15,
    /// Stable Diffusion XL base's UNet (2.6B parameters).
    Sdxl,
    /// The bundled tiny model's UNet.
    Toy,
    /// A diffusers `config.json`.
    Config(std::path::PathBuf),
}

impl Arch {
    pub fn parse(s: &str) -> Self {
        match s {
            "sd15" | "sd1.5" => Arch::Sd15,
            "sdxl" => Arch::Sdxl,
            "toy" | "tiny" => Arch::Toy,
            path => Arch::Config(path.into()),
        }
    }

    pub fn config_json(&self) -> Result<serde_json::Value> {
        Ok(match self {
            Arch::Toy => crate::toy::pretrain::unet_config(),
            Arch::Sd15 => sd15_unet_config(),
            Arch::Sdxl => sdxl_unet_config(),
            Arch::Config(p) => crate::util::read_json(p)?,
        })
    }

    /// Pixels per latent cell of the architecture's VAE: 4 for the tiny
    /// model (three VAE blocks), 8 for Stable Diffusion.
    pub fn vae_factor(&self) -> usize {
        match self {
            Arch::Toy => 4,
            _ => 8,
        }
    }

    /// The architecture's VAE and text encoder configs (random weights), for
    /// the whole step with encoding and for `bench sample`: SD 1.5's (CLIP
    /// ViT-L/14's text tower), SDXL base's (with OpenCLIP ViT-bigG/14's as the
    /// second encoder), the tiny model's, or for a UNet config in a diffusers
    /// folder (`model/unet/config.json`) the folder's `vae/`, `text_encoder/`
    /// and `text_encoder_2/` configs.
    pub fn encoder_configs(&self) -> Result<EncoderConfigs> {
        match self {
            Arch::Sd15 => Ok(EncoderConfigs {
                vae: sd15_vae_config(),
                text: sd15_text_encoder_config(),
                text_2: None,
            }),
            Arch::Sdxl => Ok(EncoderConfigs {
                vae: sdxl_vae_config(),
                text: sd15_text_encoder_config(),
                text_2: Some(sdxl_text_encoder_2_config()),
            }),
            Arch::Toy => Ok(EncoderConfigs {
                vae: crate::toy::pretrain::vae_config(),
                text: json!({
                    "vocab_size": 1024,
                    "hidden_size": 64,
                    "intermediate_size": 256,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "max_position_embeddings": crate::toy::pretrain::MAX_TOKENS,
                    "hidden_act": "quick_gelu",
                    "projection_dim": 64,
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                    "pad_token_id": 2
                }),
                text_2: None,
            }),
            Arch::Config(p) => {
                // A UNet config inside a diffusers folder: its siblings'.
                let root = p.parent().and_then(Path::parent).unwrap_or(Path::new("."));
                let read = |c: &str| -> Result<serde_json::Value> {
                    let f = root.join(c).join("config.json");
                    if !f.is_file() {
                        return Err(Error::msg(format!(
                            "--with-encoders with --arch {}: no {} (the encoders' configs come from \
                             the UNet config's diffusers folder; or use --arch sd15, sdxl or toy)",
                            p.display(),
                            f.display()
                        )));
                    }
                    crate::util::read_json(&f)
                };
                Ok(EncoderConfigs {
                    vae: read("vae")?,
                    text: read("text_encoder")?,
                    text_2: if root.join("text_encoder_2").is_dir() {
                        Some(read("text_encoder_2")?)
                    } else {
                        None
                    },
                })
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Arch::Sd15 => "sd15".into(),
            Arch::Sdxl => "sdxl".into(),
            Arch::Toy => "toy".into(),
            Arch::Config(p) => p.display().to_string(),
        }
    }
}

/// SD 1.5's `unet/config.json` (runwayml/stable-diffusion-v1-5).
pub fn sd15_unet_config() -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "flip_sin_to_cos": true,
        "freq_shift": 0
    })
}

/// SDXL base's `unet/config.json` (stabilityai/stable-diffusion-xl-base-1.0).
pub fn sdxl_unet_config() -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": true,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "flip_sin_to_cos": true,
        "freq_shift": 0
    })
}

/// The frozen models around an architecture's UNet, as config JSON.
#[derive(Clone, Debug)]
pub struct EncoderConfigs {
    pub vae: serde_json::Value,
    pub text: serde_json::Value,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection`).
    pub text_2: Option<serde_json::Value>,
}

/// SDXL base's `vae/config.json` (SD's architecture, another scaling factor).
pub fn sdxl_vae_config() -> serde_json::Value {
    let mut v = sd15_vae_config();
    v["sample_size"] = json!(1024);
    v["scaling_factor"] = json!(0.13025);
    v
}

/// SDXL base's `text_encoder_2/config.json` (OpenCLIP ViT-bigG/14's text
/// tower with its projection).
pub fn sdxl_text_encoder_2_config() -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModelWithProjection"],
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 1280,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1
    })
}

/// A model config from its JSON; `what` names it in the error.
fn parse_config<T: serde::de::DeserializeOwned>(v: serde_json::Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::msg(format!("{what} config: {e}")))
}

/// SD 1.5's `vae/config.json`.
pub fn sd15_vae_config() -> serde_json::Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215
    })
}

/// SD 1.5's `text_encoder/config.json` (CLIP ViT-L/14's text tower).
pub fn sd15_text_encoder_config() -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1
    })
}

#[derive(Clone, Debug)]
pub struct StepBenchOptions {
    pub arch: Arch,
    /// Pixel resolution; the latent is res / [`Arch::vae_factor`] on a side.
    pub res: usize,
    pub batch: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    pub seed: u64,
    /// Train LoRA adapters on a frozen UNet instead of every weight.
    pub lora: Option<crate::models::lora::LoraSpec>,
    /// The UNet's compute dtype (mixed precision: f32 weights and moments).
    pub precision: crate::nn::Precision,
    /// The whole step: encode the batch's pixels with the VAE and its
    /// prompts with the text encoder (frozen, in the compute dtype) before
    /// the UNet step, as the trainer does without cached latents.
    pub with_encoders: bool,
    /// Run every UNet block as one node ([`crate::nn::checkpoint`]):
    /// recomputed in the backward pass (gradient checkpointing), or keeping
    /// its graph until its own backward has run.
    pub checkpointing: Option<crate::nn::checkpoint::Mode>,
    /// The AdamW update inside the backward pass, block by block
    /// ([`crate::optim::fused_backward`]; needs `checkpointing`): no
    /// separate optimizer phase, its time counts as backward.
    pub fused_backward_pass: bool,
}

#[derive(Clone, Debug)]
pub struct StepTimes {
    /// VAE + text encoding (0 without `with_encoders`).
    pub encode: f64,
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    /// CPU seconds of the whole process (all threads) during the step: on a
    /// shared machine steadier than wall time.
    pub cpu: f64,
}

impl StepTimes {
    pub fn total(&self) -> f64 {
        self.encode + self.forward + self.backward + self.optimizer
    }
}

#[derive(Clone, Debug)]
pub struct StepBenchReport {
    pub arch: String,
    pub res: usize,
    pub latent: usize,
    pub batch: usize,
    pub params: usize,
    pub threads: usize,
    /// The compute dtype's name (`no` for f32).
    pub precision: &'static str,
    pub steps: Vec<StepTimes>,
    pub median: StepTimes,
    /// Peak resident memory of the process (VmHWM), bytes; None off Linux.
    pub peak_rss: Option<u64>,
    /// On a GPU: the most device memory in use (total − free) seen, bytes:
    /// polled every millisecond during the steps ([`GpuMemoryWatch`]) and at
    /// the end of each forward, backward and update.
    pub gpu_memory: Option<u64>,
    /// On a GPU: the memory in use before the model was built, bytes.
    pub gpu_baseline: Option<u64>,
}

/// Polls the device memory in use on a helper thread every millisecond
/// while it lives, keeping the most seen: the peak of a step, not only its
/// value at the phase boundaries (on the CPU it watches nothing).
pub struct GpuMemoryWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    device: Device,
}

/// Folds the memory in use on `device` now into `peak`.
fn record(peak: &std::sync::atomic::AtomicU64, device: &Device) {
    if let Some(m) = gpu_memory_in_use(device) {
        peak.fetch_max(m, std::sync::atomic::Ordering::Relaxed);
    }
}

impl GpuMemoryWatch {
    pub fn start(device: &Device) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let peak = std::sync::Arc::new(AtomicU64::new(0));
        let thread = (!device.is_cpu()).then(|| {
            let (stop, peak, device) = (stop.clone(), peak.clone(), device.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    record(&peak, &device);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        });
        Self {
            stop,
            peak,
            thread,
            device: device.clone(),
        }
    }

    /// Reads the memory in use now as well (at a phase boundary).
    pub fn sample(&self) {
        if self.thread.is_some() {
            record(&self.peak, &self.device);
        }
    }

    /// The most memory in use seen so far, bytes (None on the CPU).
    pub fn peak(&self) -> Option<u64> {
        let p = self.peak.load(std::sync::atomic::Ordering::Relaxed);
        (self.thread.is_some() && p > 0).then_some(p)
    }
}

impl Drop for GpuMemoryWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens (`true`) or closes the CUDA profiler's capture range around the
/// timed work (`cuda::profiler`; tools/cuda/kprof records only inside it).
/// Nothing on the CPU or in CPU builds; a failure is a warning, not a lost
/// benchmark.
fn profiler_range(device: &Device, open: bool, log: &mut dyn FnMut(&str)) {
    #[cfg(feature = "cuda")]
    {
        let r = if open {
            crate::cuda::profiler::start(device)
        } else {
            crate::cuda::profiler::stop(device)
        };
        if let Err(e) = r {
            log(&format!("warning: CUDA profiler range: {e}"));
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, open, log);
    }
}

/// Device memory in use on a CUDA `device` (None on the CPU and in CPU builds).
pub fn gpu_memory_in_use(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::memory_in_use(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// The frozen VAE and text encoder(s) of the whole step, with the batch's
/// pixels and token ids.
struct Encoders {
    vae: crate::models::vae::AutoencoderKL,
    text: crate::models::clip_text::ClipTextModel,
    /// SDXL's second text encoder and its ids.
    text_2: Option<(crate::models::clip_text::ClipTextModel, Tensor)>,
    pixels: Tensor,
    ids: Tensor,
}

impl Encoders {
    fn new(
        opts: &StepBenchOptions,
        device: &Device,
        b: usize,
        len: usize,
        ctx_dim: usize,
    ) -> Result<Self> {
        use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
        let configs = opts.arch.encoder_configs()?;
        let vae_cfg: crate::models::vae::VaeConfig = parse_config(configs.vae, "VAE")?;
        let text_cfg: ClipTextConfig = parse_config(configs.text, "text encoder")?;
        let text_2_cfg: Option<ClipTextConfig> = configs
            .text_2
            .map(|v| parse_config(v, "second text encoder"))
            .transpose()?;
        let width = text_cfg.hidden_size + text_2_cfg.as_ref().map_or(0, |c| c.hidden_size);
        let positions = text_cfg.max_position_embeddings.min(
            text_2_cfg
                .as_ref()
                .map_or(usize::MAX, |c| c.max_position_embeddings),
        );
        if width != ctx_dim || positions < len {
            return Err(Error::msg(format!(
                "the text encoder(s) ({width} wide, {positions} positions) do not fit the UNet's context ({ctx_dim} wide, {len} tokens)"
            )));
        }
        // Frozen, in the compute dtype (as the trainer keeps them).
        let build = |vb: &Vb| -> Result<_> {
            Ok((
                crate::models::vae::AutoencoderKL::new(&vb.pp("vae"), &vae_cfg)?,
                ClipTextModel::new(&vb.pp("text"), &text_cfg)?,
                text_2_cfg
                    .as_ref()
                    .map(|c| ClipTextModel::new_with_projection(&vb.pp("text_2"), c))
                    .transpose()?,
            ))
        };
        let dtype = opts.precision.dtype();
        let vb = Vb::random_frozen(opts.seed + 1, device, dtype, |vb| build(vb).map(drop))?;
        let (vae, text, text_2) = build(&vb)?;
        let mut rng = StdRng::seed_from_u64(opts.seed + 2);
        let pixels = randn(&mut rng, &[b, 3, opts.res, opts.res], device)?.clamp(-1f32, 1f32)?;
        let mut ids = |vocab: usize| -> Result<Tensor> {
            let v: Vec<u32> = (0..b * len)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            Ok(Tensor::from_vec(v, (b, len), device)?)
        };
        let ids_1 = ids(text_cfg.vocab_size)?;
        let text_2 = match (text_2, &text_2_cfg) {
            (Some(m), Some(c)) => Some((m, ids(c.vocab_size)?)),
            _ => None,
        };
        Ok(Self {
            vae,
            text,
            text_2,
            pixels,
            ids: ids_1,
        })
    }

    /// (scaled latents sampled from the posterior, the text conditioning:
    /// SDXL's is both encoders' penultimate states and the pooled projection,
    /// as the trainer encodes it).
    fn encode(
        &self,
        rng: &mut StdRng,
        precision: crate::nn::Precision,
    ) -> Result<(Tensor, crate::models::sd::PromptEmbeds)> {
        let post = self.vae.encode(&precision.cast(&self.pixels)?)?;
        let noise = randn(rng, post.mode().dims(), self.pixels.device())?;
        let z = (post.sample(&precision.cast(&noise)?)? * self.vae.scaling_factor())?;
        let embeds = crate::models::sd::encode_ids(
            &self.text,
            self.text_2.as_ref().map(|(m, _)| m),
            &self.ids,
            self.text_2.as_ref().map(|(_, ids)| ids),
            0,
        )?;
        Ok((z.to_dtype(DType::F32)?.detach(), embeds.detach()))
    }
}

/// Text-context length the architecture is trained with (CLIP's 77 for SD).
fn context_len(cfg: &UNetConfig) -> usize {
    if cfg.cross_attention_dim <= 128 {
        crate::toy::pretrain::MAX_TOKENS
    } else {
        77
    }
}

/// The median of `v` (0 when empty; the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Builds the UNet with random weights and times `warmup + steps` training steps.
pub fn bench_step(
    opts: &StepBenchOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<StepBenchReport> {
    let f = if opts.with_encoders {
        // The VAE that encodes the batch sets the latent size.
        let vae: crate::models::vae::VaeConfig =
            parse_config(opts.arch.encoder_configs()?.vae, "VAE")?;
        vae.downscale_factor()
    } else {
        opts.arch.vae_factor()
    };
    if !opts.res.is_multiple_of(f) || opts.res == 0 {
        return Err(Error::msg(format!(
            "--res {} is not a positive multiple of {f}",
            opts.res
        )));
    }
    if opts.fused_backward_pass && opts.checkpointing.is_none() {
        return Err(Error::msg(
            "bench step: the fused backward pass runs through checkpointed blocks \
             (set checkpointing: Mode::Release or Mode::Recompute)",
        ));
    }
    let cfg: UNetConfig = parse_config(opts.arch.config_json()?, "UNet")?;
    cfg.validate(Path::new(&opts.arch.name()))?;
    opts.precision.check_device(device)?;
    // What the process holds on the GPU before the model (its context,
    // cuBLAS's workspace): PyTorch's max_memory_allocated counts neither.
    let gpu_baseline = gpu_memory_in_use(device);
    let half_base = opts.lora.is_some() && opts.precision != crate::nn::Precision::F32;
    // (A random store records its tensors only when trainable.)
    let mut vb = Vb::random(opts.seed, device, opts.lora.is_none() || half_base);
    let mut unet = UNet2DConditionModel::new(&vb, &cfg)?;
    if half_base {
        // As the trainer does: a frozen base in the compute dtype.
        vb = vb.converted(opts.precision.dtype())?;
        unet = UNet2DConditionModel::new(&vb, &cfg)?;
    }
    let vars = match &opts.lora {
        Some(spec) => crate::models::lora::attach_trainable_unet(&mut unet, spec, device)?,
        None => vb.vars(),
    };
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            lr: 1e-5,
            ..Default::default()
        },
    )?;
    let params = opt.num_params();
    let checkpointing = match opts.checkpointing {
        Some(mode) => {
            let ck = crate::nn::checkpoint::Checkpointing::with_mode(
                device,
                opt.vars().map(|(_, v)| v),
                mode,
            )?;
            unet = unet.with_gradient_checkpointing(&ck);
            Some(ck)
        }
        None => None,
    };
    let latent = opts.res / f;
    let b = opts.batch;
    let l = context_len(&cfg);
    log(&format!(
        "bench step: arch {} ({:.1}M params), batch {b}, latent {latent}x{latent}, context {l}x{}, mixed precision {}{}{}, {} threads",
        opts.arch.name(),
        params as f64 / 1e6,
        cfg.cross_attention_dim,
        opts.precision.name(),
        match opts.checkpointing {
            Some(crate::nn::checkpoint::Mode::Recompute) => ", gradient checkpointing",
            Some(crate::nn::checkpoint::Mode::Release) => ", block graphs released in the backward",
            None => "",
        },
        if opts.fused_backward_pass {
            ", fused backward pass (AdamW inside the backward)"
        } else {
            ""
        },
        crate::nn::cpu::num_threads()
    ));
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let x = randn(&mut rng, &[b, cfg.in_channels, latent, latent], device)?;
    let target = randn(&mut rng, &[b, cfg.out_channels, latent, latent], device)?;
    let ctx = randn(&mut rng, &[b, l, cfg.cross_attention_dim], device)?;
    let t: Vec<f32> = (0..b).map(|_| rng.random_range(0..1000) as f32).collect();
    let t = Tensor::from_vec(t, b, device)?;
    // SDXL: random pooled text embeds and the time ids of a res × res square.
    let added = match cfg.text_time_dims() {
        Some((time_dim, in_dim)) => {
            let pooled = randn(&mut rng, &[b, in_dim - 6 * time_dim], device)?;
            let r = opts.res as f32;
            Some(crate::models::AddedCond::new(
                &pooled,
                [r, r, 0.0, 0.0, r, r],
            )?)
        }
        None => None,
    };
    let encoders = if opts.with_encoders {
        Some(Encoders::new(opts, device, b, l, cfg.cross_attention_dim)?)
    } else {
        None
    };

    let mut steps = Vec::new();
    let watch = GpuMemoryWatch::start(device);
    for i in 0..opts.warmup + opts.steps {
        if i == opts.warmup {
            profiler_range(device, true, log);
        }
        let c0 = process_cpu_seconds();
        let warm = crate::nn::cpu::KeepWarm::start();
        let te = Instant::now();
        let (x, ctx, added) = match &encoders {
            Some(e) => {
                let (z, embeds) = e.encode(&mut rng, opts.precision)?;
                let added = match &embeds.pooled {
                    Some(p) => {
                        let r = opts.res as f32;
                        Some(crate::models::AddedCond::new(p, [r, r, 0.0, 0.0, r, r])?)
                    }
                    None => added.clone(),
                };
                (z, embeds.context, added)
            }
            None => (x.clone(), ctx.clone(), added.clone()),
        };
        device.synchronize()?;
        let t0 = Instant::now();
        let pred = unet
            .forward_added(&opts.precision.cast(&x)?, &t, &ctx, added.as_ref())?
            .to_dtype(DType::F32)?;
        let loss = (pred - &target)?.sqr()?.mean_all()?;
        let _ = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let t1 = Instant::now();
        watch.sample();
        let (t2, t3) =
            if let (true, Some(ck)) = (opts.fused_backward_pass, checkpointing.as_deref()) {
                crate::optim::fused_backward(ck, &loss, &mut [(&mut opt, 1e-5)], 0.0, false)?;
                device.synchronize()?;
                let t = Instant::now();
                (t, t)
            } else {
                let grads = crate::nn::checkpoint::backward(checkpointing.as_deref(), &loss)?;
                device.synchronize()?;
                let t2 = Instant::now();
                watch.sample();
                opt.step(&grads, 1e-5, 1.0)?;
                drop(grads);
                device.synchronize()?;
                (t2, Instant::now())
            };
        watch.sample();
        drop(warm);
        let st = StepTimes {
            encode: (t0 - te).as_secs_f64(),
            forward: (t1 - t0).as_secs_f64(),
            backward: (t2 - t1).as_secs_f64(),
            optimizer: (t3 - t2).as_secs_f64(),
            cpu: process_cpu_seconds() - c0,
        };
        let tag = if i < opts.warmup { "warm-up" } else { "step" };
        log(&format!(
            "  {tag} {i}: encode {:.3}s forward {:.3}s backward {:.3}s optimizer {:.3}s total {:.3}s (CPU {:.3}s)",
            st.encode,
            st.forward,
            st.backward,
            st.optimizer,
            st.total(),
            st.cpu
        ));
        if i >= opts.warmup {
            steps.push(st);
        }
    }
    profiler_range(device, false, log);
    let median = StepTimes {
        encode: median(steps.iter().map(|s| s.encode).collect()),
        forward: median(steps.iter().map(|s| s.forward).collect()),
        backward: median(steps.iter().map(|s| s.backward).collect()),
        optimizer: median(steps.iter().map(|s| s.optimizer).collect()),
        cpu: median(steps.iter().map(|s| s.cpu).collect()),
    };
    Ok(StepBenchReport {
        arch: opts.arch.name(),
        res: opts.res,
        latent,
        batch: b,
        params,
        threads: crate::nn::cpu::num_threads(),
        precision: opts.precision.name(),
        steps,
        median,
        peak_rss: peak_rss_bytes(),
        gpu_memory: watch.peak(),
        gpu_baseline,
    })
}

/// CPU time (user + system) of the whole process so far, seconds.
pub fn process_cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    /// CLOCK_PROCESS_CPUTIME_ID on Linux.
    const PROCESS_CPUTIME: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec (two 64-bit fields on 64-bit Linux).
    let rc = unsafe { clock_gettime(PROCESS_CPUTIME, &mut ts) };
    if rc == 0 {
        ts.sec as f64 + ts.nsec as f64 * 1e-9
    } else {
        0.0
    }
}

/// VmHWM of /proc/self/status in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Options of `dreambooth bench sample`: text-to-image generation as the
/// trainer makes class images (DDIM, classifier-free guidance).
#[derive(Clone, Debug)]
pub struct SampleBenchOptions {
    /// A diffusers folder or single-file checkpoint (the bundled tiny model by default).
    pub model: std::path::PathBuf,
    /// Instead of `model`: SD 1.5's (512 px) or SDXL base's (1024 px)
    /// architecture with random weights ([`StableDiffusion::random`]).
    pub random: Option<Arch>,
    pub prompt: String,
    /// Images generated in the timed run.
    pub images: usize,
    /// Sampler steps per image.
    pub steps: usize,
    /// Images per UNet batch (twice as wide with guidance).
    pub batch: usize,
    pub guidance: f64,
    /// Untimed batches first (first-call allocation, caches).
    pub warmup: usize,
    pub seed: u64,
    /// The UNet's dtype while sampling ([`StableDiffusion::set_unet_precision`]).
    pub precision: crate::nn::Precision,
}

#[derive(Clone, Debug)]
pub struct SampleBenchReport {
    pub images: usize,
    pub width: usize,
    pub height: usize,
    /// Seconds of the timed generation (text encoding, sampling, VAE decode,
    /// conversion to 8-bit images; model loading excluded).
    pub seconds: f64,
    pub load_seconds: f64,
    pub threads: usize,
    pub peak_rss: Option<u64>,
}

impl SampleBenchReport {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.seconds
    }
}

/// Loads the model and times the generation of `opts.images` images.
pub fn bench_sample(
    opts: &SampleBenchOptions,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> Result<SampleBenchReport> {
    use crate::diffusion::pipeline::{GenerateOptions, generate, image_size};
    use crate::diffusion::sampler::SamplerKind;
    use crate::models::sd::{LoadOptions, StableDiffusion};
    if opts.images == 0 || opts.batch == 0 || opts.steps == 0 {
        return Err(Error::msg(
            "--images, --batch and --steps must be at least 1",
        ));
    }
    let t0 = Instant::now();
    let mut model = match &opts.random {
        Some(arch @ (Arch::Sd15 | Arch::Sdxl)) => {
            let c = arch.encoder_configs()?;
            let name = arch.name();
            let text_2: Option<crate::models::clip_text::ClipTextConfig> = c
                .text_2
                .map(|v| parse_config(v, &format!("{name} second text encoder")))
                .transpose()?;
            StableDiffusion::random(
                &format!("{name} (random weights)"),
                &parse_config(arch.config_json()?, &format!("{name} UNet"))?,
                &parse_config(c.text, &format!("{name} text encoder"))?,
                text_2.as_ref(),
                &parse_config(c.vae, &format!("{name} VAE"))?,
                device,
                opts.seed,
            )?
        }
        Some(other) => {
            return Err(Error::msg(format!(
                "bench sample: no random-weight model for --arch {} (sd15 or sdxl)",
                other.name()
            )));
        }
        None => {
            // The UNet read straight into its sampling dtype, as `generate`.
            opts.precision.check_device(device)?;
            let load = LoadOptions {
                dtypes: crate::models::FrozenDTypes::unet_only(opts.precision.dtype()),
                ..LoadOptions::default()
            };
            StableDiffusion::load(&opts.model, device, load)?
        }
    };
    // A random model's UNet is converted (a no-op for one read in its dtype).
    model.set_unet_precision(opts.precision)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let gen_opts = |n: usize, seed: u64| GenerateOptions {
        prompts: vec![opts.prompt.clone(); n],
        guidance_scale: opts.guidance,
        steps: opts.steps,
        sampler: SamplerKind::Ddim,
        eta: 0.0,
        seed,
        batch_size: opts.batch,
        ..GenerateOptions::new(opts.prompt.clone(), n)
    };
    let (width, height) = image_size(&model, &gen_opts(1, 0))?;
    log(&format!(
        "bench sample: {} ({width}x{height}), {} images, batch {}, DDIM {} steps, guidance {}, mixed precision {}, {} threads",
        model.name(),
        opts.images,
        opts.batch,
        opts.steps,
        opts.guidance,
        opts.precision.name(),
        crate::nn::cpu::num_threads()
    ));
    for i in 0..opts.warmup {
        let t = Instant::now();
        generate(
            &model,
            &gen_opts(opts.batch, 1_000_000 + i as u64),
            &mut |_| {},
        )?;
        log(&format!(
            "  warm-up batch {i}: {:.3}s",
            t.elapsed().as_secs_f64()
        ));
    }
    profiler_range(device, true, log);
    let t = Instant::now();
    let out = generate(&model, &gen_opts(opts.images, opts.seed), &mut |_| {})?;
    let seconds = t.elapsed().as_secs_f64();
    profiler_range(device, false, log);
    if out.images.len() != opts.images {
        return Err(Error::msg("bench sample: wrong number of images generated"));
    }
    Ok(SampleBenchReport {
        images: opts.images,
        width,
        height,
        seconds,
        load_seconds,
        threads: crate::nn::cpu::num_threads(),
        peak_rss: peak_rss_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
