//! Every option of `dreambooth train`, with the paper's / diffusers' defaults.
//! The same struct deserializes from a TOML file (`--config run.toml`); flags
//! given on the command line override the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::diffusion::SamplerKind;
use crate::models::lora::LoraSpec;
use crate::optim::LrScheduleKind;
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model: diffusers folder or single-file checkpoint (default: bundled tiny model).
    pub model: Option<PathBuf>,
    /// A VAE to use in place of the model's (folder or file; see `StableDiffusion::set_vae`).
    pub vae: Option<PathBuf>,
    /// Overrides the model's prediction type (`epsilon`, `v_prediction`): an
    /// SD 2.x single file is read as the 768-v model unless told otherwise.
    pub prediction_type: Option<String>,
    pub instance_dir: PathBuf,
    pub instance_prompt: String,
    /// Per-photo prompts (kohya's `--caption_extension`): a photo `dog1.jpg`
    /// with a `dog1.txt` beside it (for `.txt`) trains on that file's text
    /// instead of `instance_prompt`; photos without one keep `instance_prompt`.
    pub caption_extension: Option<String>,
    pub class_prompt: Option<String>,
    pub class_dir: Option<PathBuf>,
    pub with_prior_preservation: bool,
    pub num_class_images: usize,
    pub prior_loss_weight: f64,
    pub output_dir: PathBuf,
    /// Training resolution in pixels (default: the model's native size).
    pub resolution: Option<usize>,
    pub center_crop: bool,
    pub random_flip: bool,
    pub train_batch_size: usize,
    pub max_train_steps: u64,
    pub learning_rate: f64,
    /// Learning rate of the text encoder (default: `learning_rate`).
    pub text_encoder_lr: Option<f64>,
    pub lr_scheduler: LrScheduleKind,
    pub lr_warmup_steps: u64,
    /// `adamw` or `prodigy` (then `learning_rate` multiplies its estimated
    /// step size: 1.0 is usual; betas, epsilon and weight decay are the adam_ ones).
    pub optimizer: crate::optim::OptimizerKind,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
    pub adam_epsilon: f64,
    /// Prodigy's step-size averaging (default √adam_beta2).
    pub prodigy_beta3: Option<f64>,
    /// Prodigy's estimate multiplier (prodigyopt's `d_coef`).
    pub prodigy_d_coef: f64,
    pub prodigy_use_bias_correction: bool,
    pub prodigy_safeguard_warmup: bool,
    pub max_grad_norm: f64,
    pub gradient_accumulation_steps: usize,
    pub train_text_encoder: bool,
    pub snr_gamma: Option<f64>,
    pub offset_noise: f64,
    pub seed: u64,
    pub checkpointing_steps: u64,
    pub checkpoints_total_limit: usize,
    pub resume: Option<String>,
    /// Prompts of the validation grids (one row each); a config file may give
    /// one string or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub validation_prompt: Vec<String>,
    pub validation_steps: u64,
    pub num_validation_images: usize,
    /// Class-image generation.
    pub sample_batch_size: usize,
    pub class_sampler: String,
    pub class_steps: usize,
    pub class_guidance: f64,
    pub class_negative_prompt: String,
    pub regenerate_class_images: bool,
    pub skip_bad_images: bool,
    pub save_single_file: bool,
    /// Export the trained model at the end (a diffusers folder; LoRA files
    /// are always written). Off for runs that only evaluate the weights in
    /// memory, such as `bench paper`.
    pub save_model: bool,
    /// Sampling settings for validation images.
    pub sample_steps: usize,
    pub sample_guidance: f64,
    /// Train LoRA adapters (the base model stays frozen) instead of the weights.
    pub lora: bool,
    /// LoRA rank r.
    pub lora_rank: usize,
    /// LoRA alpha: the update is scaled by alpha / r (default: the rank).
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapters' input.
    pub lora_dropout: f64,
    /// Layers that get adapters: `attn`, `attn+ff` or `all-linear`, optionally `+conv`.
    pub lora_targets: String,
    /// The LoRA files written at the end: `peft`, `kohya` or `both`.
    pub lora_format: String,
    /// The UNet's compute dtype while training: `no` (f32), `bf16` (GPU) or
    /// `fp16` (with dynamic loss scaling); weights and optimizer state stay f32.
    pub mixed_precision: String,
    /// Precision of the exported model (`model/` and `model.safetensors`):
    /// `no` (f32, default), `fp16` or `bf16` (kohya's `--save_precision`).
    pub save_precision: String,
    /// The UNet's dtype while generating class images (diffusers'
    /// `--prior_generation_precision`): `auto` (the mixed precision on a GPU,
    /// f32 on the CPU), `no`, `bf16` (GPU) or `fp16`. A frozen half-precision
    /// copy of the UNet samples them: half the memory traffic of the f32
    /// training weights. The images of a cache are reused whatever precision
    /// made them.
    pub prior_generation_precision: String,
    /// The UNet's dtype while generating validation images of a full
    /// fine-tune (a half-precision copy of the current weights): `auto`
    /// (the mixed precision on a GPU, f32 on the CPU), `no`, `bf16` or
    /// `fp16`. LoRA validates on its base as trained (already half under
    /// mixed precision), adapters included.
    pub validation_precision: String,
    /// Recompute each UNet block (and text-encoder layer) in the backward
    /// pass instead of keeping its activations (diffusers'
    /// `--gradient_checkpointing`): much less memory, one more forward.
    pub gradient_checkpointing: bool,
    /// Run the backward pass one UNet block (and text-encoder layer) at a
    /// time, freeing each block's activations as soon as its gradients
    /// exist: the same compute and result as without, a lower peak (the
    /// activations go as the gradients come). Not with
    /// `gradient_checkpointing`, which keeps no activations at all.
    pub release_block_graphs: bool,
    /// Update each block's parameters as soon as the backward pass has their
    /// gradients, then drop the gradients (kohya's `--fused_backward_pass`):
    /// the gradients of the whole model never exist at once, so a full
    /// fine-tune's peak memory falls by up to their size (where it was set
    /// by the gradients, not by the activations at the backward's start). The
    /// blocks run as with `release_block_graphs` (or checkpointed, with
    /// `gradient_checkpointing`). `max_grad_norm` then clips each parameter's
    /// gradient by its own norm. Not with gradient accumulation or fp16.
    pub fused_backward_pass: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            vae: None,
            prediction_type: None,
            instance_dir: PathBuf::new(),
            instance_prompt: String::new(),
            caption_extension: None,
            class_prompt: None,
            class_dir: None,
            with_prior_preservation: false,
            num_class_images: 200,
            prior_loss_weight: 1.0,
            output_dir: PathBuf::from("dreambooth-out"),
            resolution: None,
            center_crop: false,
            random_flip: false,
            train_batch_size: 1,
            max_train_steps: 800,
            learning_rate: 5e-6,
            text_encoder_lr: None,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 0,
            optimizer: crate::optim::OptimizerKind::AdamW,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-2,
            adam_epsilon: 1e-8,
            prodigy_beta3: None,
            prodigy_d_coef: 1.0,
            prodigy_use_bias_correction: true,
            prodigy_safeguard_warmup: true,
            max_grad_norm: 1.0,
            gradient_accumulation_steps: 1,
            train_text_encoder: false,
            snr_gamma: None,
            offset_noise: 0.0,
            seed: 0,
            checkpointing_steps: 500,
            checkpoints_total_limit: 3,
            resume: None,
            validation_prompt: Vec::new(),
            validation_steps: 100,
            num_validation_images: 4,
            sample_batch_size: 4,
            class_sampler: "dpm++".into(),
            class_steps: 25,
            class_guidance: 7.5,
            class_negative_prompt: String::new(),
            regenerate_class_images: false,
            skip_bad_images: false,
            save_single_file: false,
            save_model: true,
            sample_steps: 25,
            sample_guidance: 7.5,
            lora: false,
            lora_rank: 16,
            lora_alpha: None,
            lora_dropout: 0.0,
            lora_targets: "attn".into(),
            lora_format: "both".into(),
            mixed_precision: "no".into(),
            save_precision: "no".into(),
            prior_generation_precision: "auto".into(),
            validation_precision: "auto".into(),
            gradient_checkpointing: false,
            release_block_graphs: false,
            fused_backward_pass: false,
        }
    }
}

impl TrainConfig {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The adapters to train with `--lora` (None without it).
    pub fn lora_spec(&self) -> Result<Option<LoraSpec>> {
        if !self.lora {
            return Ok(None);
        }
        let spec = LoraSpec {
            rank: self.lora_rank,
            alpha: self.lora_alpha.unwrap_or(self.lora_rank as f64),
            dropout: self.lora_dropout,
            targets: self.lora_targets.parse()?,
            text_encoder: self.train_text_encoder,
            seed: self.seed,
        };
        spec.validate()?;
        Ok(Some(spec))
    }

    /// `--lora-format`: whether to write the (peft, kohya) files.
    pub fn lora_formats(&self) -> Result<(bool, bool)> {
        match self.lora_format.as_str() {
            "peft" | "diffusers" => Ok((true, false)),
            "kohya" => Ok((false, true)),
            "both" => Ok((true, true)),
            f => Err(Error::msg(format!(
                "invalid option: --lora-format `{f}` (use peft, kohya or both)"
            ))),
        }
    }

    /// How the trained networks' blocks run as checkpointed nodes, if they
    /// do (`gradient_checkpointing`, `release_block_graphs`).
    pub fn checkpoint_mode(&self) -> Option<crate::nn::checkpoint::Mode> {
        use crate::nn::checkpoint::Mode;
        if self.gradient_checkpointing {
            Some(Mode::Recompute)
        } else if self.release_block_graphs || self.fused_backward_pass {
            Some(Mode::Release)
        } else {
            None
        }
    }

    /// `mixed_precision` parsed.
    pub fn precision(&self) -> Result<crate::nn::Precision> {
        crate::nn::Precision::parse(&self.mixed_precision)
    }

    /// `prior_generation_precision` on `device`: `auto` is the mixed
    /// precision on a GPU and f32 on the CPU.
    pub fn prior_generation_precision(
        &self,
        device: &candle_core::Device,
    ) -> Result<crate::nn::Precision> {
        self.sampling_precision(
            &self.prior_generation_precision,
            "--prior-generation-precision",
            device,
        )
    }

    /// `validation_precision` on `device`, as [`Self::prior_generation_precision`].
    pub fn validation_precision(
        &self,
        device: &candle_core::Device,
    ) -> Result<crate::nn::Precision> {
        self.sampling_precision(&self.validation_precision, "--validation-precision", device)
    }

    fn sampling_precision(
        &self,
        value: &str,
        option: &str,
        device: &candle_core::Device,
    ) -> Result<crate::nn::Precision> {
        match value {
            "auto" if device.is_cpu() => Ok(crate::nn::Precision::F32),
            "auto" => self.precision(),
            p => crate::nn::Precision::parse(p)
                .map_err(|e| Error::msg(format!("invalid option: {option}: {e}"))),
        }
    }

    /// Checks ranges and combinations; the error names the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(format!("invalid option: {m}")));
        // The explicit values parse (`auto` depends on the device).
        self.prior_generation_precision(&candle_core::Device::Cpu)?;
        self.validation_precision(&candle_core::Device::Cpu)?;
        if self.gradient_checkpointing && self.release_block_graphs {
            return bad(
                "--gradient-checkpointing and --release-block-graphs exclude each other \
                 (checkpointing keeps no block activations to release)"
                    .into(),
            );
        }
        let optimizer = self.optimizer;
        if self.fused_backward_pass && optimizer == crate::optim::OptimizerKind::Prodigy {
            return bad(
                "--fused-backward-pass does not work with --optimizer prodigy (its step size \
                 is estimated from every gradient before any weight is updated)"
                    .into(),
            );
        }
        if let Some(b3) = self.prodigy_beta3
            && !(0.0..1.0).contains(&b3)
        {
            return bad(format!("--prodigy-beta3 {b3} must be in [0, 1)"));
        }
        if self.fused_backward_pass {
            if self.gradient_accumulation_steps > 1 {
                return bad(format!(
                    "--fused-backward-pass updates the weights in every backward pass; \
                     it cannot accumulate gradients (--gradient-accumulation-steps {})",
                    self.gradient_accumulation_steps
                ));
            }
            if self.precision()? == crate::nn::Precision::F16 {
                return bad(
                    "--fused-backward-pass does not work with --mixed-precision fp16 \
                     (loss scaling must see every gradient before any update; use bf16)"
                        .into(),
                );
            }
        }
        if self.instance_prompt.trim().is_empty() {
            return bad("--instance-prompt is required (e.g. \"a photo of sks dog\")".into());
        }
        if let Some(ext) = &self.caption_extension
            && (ext.len() < 2 || !ext.starts_with('.') || ext.contains(['/', '\\']))
        {
            return bad(format!(
                "--caption-extension `{ext}` must be a file extension such as .txt or .caption"
            ));
        }
        if self.instance_dir.as_os_str().is_empty() {
            return bad(
                "--instance-dir is required (a folder of 3-5 photos of the subject)".into(),
            );
        }
        if self.with_prior_preservation {
            if self.class_prompt.as_deref().unwrap_or("").trim().is_empty() {
                return bad(
                    "--with-prior-preservation needs --class-prompt (e.g. \"a photo of dog\")"
                        .into(),
                );
            }
            if self.num_class_images == 0 {
                return bad("--num-class-images must be at least 1 with prior preservation".into());
            }
        }
        for (name, v) in [
            ("--learning-rate", self.learning_rate),
            (
                "--text-encoder-lr",
                self.text_encoder_lr.unwrap_or(self.learning_rate),
            ),
        ] {
            // Prodigy's lr multiplies its own estimate (1 is usual).
            let (max, what) = match optimizer {
                crate::optim::OptimizerKind::AdamW => (1.0, ""),
                crate::optim::OptimizerKind::Prodigy => (100.0, " with --optimizer prodigy"),
            };
            if !(v > 0.0 && v < max) {
                return bad(format!("{name} {v} is out of range (0, {max}){what}"));
            }
        }
        if !(0.0..=1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("--adam-beta1/--adam-beta2 must lie in [0, 1)".into());
        }
        if self.adam_weight_decay < 0.0 || self.adam_epsilon <= 0.0 {
            return bad("--adam-weight-decay must be ≥ 0 and --adam-epsilon > 0".into());
        }
        if self.prior_loss_weight < 0.0 {
            return bad(format!(
                "--prior-loss-weight {} must be ≥ 0",
                self.prior_loss_weight
            ));
        }
        if self.train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad("--train-batch-size and --gradient-accumulation-steps must be ≥ 1".into());
        }
        if self.max_train_steps == 0 {
            return bad("--max-train-steps must be ≥ 1".into());
        }
        if let Some(g) = self.snr_gamma
            && g <= 0.0
        {
            return bad(format!("--snr-gamma {g} must be > 0"));
        }
        if self.offset_noise < 0.0 || self.offset_noise > 1.0 {
            return bad(format!(
                "--offset-noise {} must lie in [0, 1]",
                self.offset_noise
            ));
        }
        if let Some(r) = self.resolution
            && (r == 0 || r % 8 != 0)
        {
            return bad(format!("--resolution {r} must be a positive multiple of 8"));
        }
        if self.lora {
            self.lora_spec()?;
            self.lora_formats()?;
            if self.save_single_file {
                return bad(
                    "--save-single-file writes a full model; with --lora merge the adapters into \
                     one with `dreambooth merge --model M --lora FILE --out model.safetensors`"
                        .into(),
                );
            }
        }
        if let Some(p) = &self.prediction_type
            && let Err(e) = crate::diffusion::PredictionType::parse(p)
        {
            return bad(format!("--prediction-type: {e}"));
        }
        if let Err(e) = crate::nn::Precision::parse(&self.save_precision) {
            return bad(format!("--save-precision: {e}"));
        }
        if let Err(e) = self.precision() {
            return bad(format!("--mixed-precision: {e}"));
        }
        if self.class_sampler.parse::<SamplerKind>().is_err() {
            return bad(format!(
                "--class-sampler `{}` is unknown (use ddim, euler, euler-a or dpm++)",
                self.class_sampler
            ));
        }
        Ok(())
    }
}

/// A string or a list of strings (`validation_prompt = "…"` or `[…]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}
