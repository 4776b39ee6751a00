//! A whole Stable Diffusion model: tokenizer, text encoder, UNet, VAE and the
//! noise schedule, loaded from a diffusers folder or a single-file checkpoint.
//! SDXL adds a second tokenizer and text encoder ([`SecondTextEncoder`]).
//!
//! ```ignore
//! let sd = StableDiffusion::load(Path::new("models/sd15"), &Device::Cpu, LoadOptions::default())?;
//! let (embeds, warnings) = sd.encode_prompt(&["a photo of sks dog".into()], 0)?;
//! ```

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::config::UNetConfig;
use super::load::weights_file;
use super::unet::{AddedCond, UNet2DConditionModel};
use super::vae::{AutoencoderKL, VaeConfig};
use crate::diffusion::{PredictionType, SchedulerConfig};
use crate::nn::Vb;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The component folders of a diffusers Stable Diffusion folder.
pub const COMPONENTS: [&str; 5] = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"];
/// The folders an SDXL folder has besides [`COMPONENTS`].
pub const SDXL_COMPONENTS: [&str; 2] = ["text_encoder_2", "tokenizer_2"];

/// SDXL's second tokenizer and text encoder (OpenCLIP ViT-bigG as
/// transformers' `CLIPTextModelWithProjection`); trainable (its `vb` holds
/// `Var`s) with [`LoadOptions::train_text_encoder`].
#[derive(Clone)]
pub struct SecondTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
    pub vb: Vb,
}

/// A prompt batch's text conditioning: the UNet's cross-attention context
/// and, for SDXL, the pooled text embeddings of the second encoder.
#[derive(Clone, Debug)]
pub struct PromptEmbeds {
    /// (B, 77, cross_attention_dim).
    pub context: Tensor,
    /// SDXL: (B, projection_dim).
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    /// Zeros of the same shapes (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
        })
    }

    /// The rows of `parts` one after another.
    pub fn cat(parts: &[&PromptEmbeds]) -> Result<Self> {
        let c: Vec<&Tensor> = parts.iter().map(|p| &p.context).collect();
        let pooled = parts
            .iter()
            .map(|p| p.pooled.as_ref())
            .collect::<Option<Vec<&Tensor>>>()
            .map(|v| Tensor::cat(&v, 0))
            .transpose()?;
        Ok(Self {
            context: Tensor::cat(&c, 0)?,
            pooled,
        })
    }

    /// Each row repeated `n` times in a block.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        Ok(Self {
            context: self.context.repeat((n, 1, 1))?,
            pooled: self.pooled.as_ref().map(|p| p.repeat((n, 1))).transpose()?,
        })
    }

    /// Cut from the graph.
    pub fn detach(&self) -> Self {
        Self {
            context: self.context.detach(),
            pooled: self.pooled.as_ref().map(|p| p.detach()),
        }
    }
}

/// Which networks get trainable parameters (their [`Vb`] holds `Var`s), and
/// the dtype the frozen ones are read in.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub train_unet: bool,
    pub train_text_encoder: bool,
    /// Overrides the scheduler's prediction type (a single file cannot tell
    /// SD 2.x's ε and v models apart; a diffusers folder's config can be wrong).
    pub prediction_type: Option<PredictionType>,
    /// The dtype each frozen component is read in (default f32): f16 / bf16
    /// are cast tensor by tensor while reading, so a half-precision component
    /// never exists in f32 in memory, and the component computes in that
    /// dtype. A trained component stays f32 (asking otherwise is an error).
    pub dtypes: super::FrozenDTypes,
}

/// Where a model was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A diffusers folder (`model_index.json`, `unet/`, `vae/`, ...).
    Diffusers,
    /// An original (LDM / CompVis) single-file `.safetensors` checkpoint.
    SingleFile,
    /// Random weights of a published architecture ([`StableDiffusion::random`]).
    Random,
}

/// Tokenizer, text encoder, UNet, VAE and scheduler config of one model.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    /// The folder or file the model was loaded from.
    pub source: PathBuf,
    pub format: ModelFormat,
    /// The UNet's parameters (trainable `Var`s when [`LoadOptions::train_unet`]).
    pub unet_vb: Vb,
    /// The text encoder's parameters (`Var`s when [`LoadOptions::train_text_encoder`]).
    pub text_encoder_vb: Vb,
    pub vae_vb: Vb,
    /// SDXL's second tokenizer and text encoder; `None` for SD 1.x / 2.x.
    pub text_encoder_2: Option<SecondTextEncoder>,
    /// SDXL: an empty negative prompt conditions on zeros, not on the
    /// encoded empty string (`model_index.json`, default true as in diffusers).
    pub force_zeros_for_empty_prompt: bool,
    pub device: Device,
    /// The weights files, with the component each holds (for [`Self::model_hash`]).
    weight_files: Vec<(&'static str, PathBuf)>,
}

impl std::fmt::Debug for StableDiffusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusion")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl StableDiffusion {
    /// Loads a diffusers folder, or a single-file `.safetensors` checkpoint when
    /// `path` is a file. Every error names the file or folder at fault.
    /// A Hub name (`org/name`) is looked up in the local Hugging Face cache
    /// ([`super::hub`]).
    pub fn load(path: &Path, device: &Device, opts: LoadOptions) -> Result<Self> {
        let path = &super::hub::resolve(path)?;
        if path.is_file() {
            Self::load_single_file(path, device, opts)
        } else if path.is_dir() {
            Self::load_diffusers(path, device, opts)
        } else {
            Err(Error::NotFound {
                path: path.to_path_buf(),
            })
        }
    }

    /// A diffusers folder: `model_index.json` and the `unet/ vae/ text_encoder/
    /// tokenizer/ scheduler/` folders.
    pub fn load_diffusers(dir: &Path, device: &Device, opts: LoadOptions) -> Result<Self> {
        let dtypes = opts.dtypes;
        dtypes.check(dir, opts.train_unet, opts.train_text_encoder)?;
        let index_path = dir.join("model_index.json");
        if !index_path.is_file() {
            return Err(Error::config(
                dir,
                "not a diffusers model folder: model_index.json is missing \
                 (pass a diffusers folder or a single-file .safetensors or .ckpt checkpoint)",
            ));
        }
        let index: serde_json::Value = crate::util::read_json(&index_path)?;
        let sdxl = check_model_index(&index, &index_path)?;
        let extra: &[&str] = if sdxl { &SDXL_COMPONENTS } else { &[] };
        for c in COMPONENTS.iter().chain(extra) {
            if !dir.join(c).is_dir() {
                return Err(Error::config(
                    dir,
                    format!(
                        "the `{c}/` folder is missing (a Stable Diffusion folder has {})",
                        {
                            let names: Vec<String> = COMPONENTS
                                .iter()
                                .chain(extra)
                                .map(|c| format!("{c}/"))
                                .collect();
                            names.join(" ")
                        }
                    ),
                ));
            }
        }

        let tokenizer = ClipTokenizer::from_dir(dir.join("tokenizer"))?;
        let mut scheduler =
            SchedulerConfig::from_file(scheduler_config_file(&dir.join("scheduler"))?)?;
        if let Some(p) = opts.prediction_type {
            scheduler.prediction_type = p;
        }

        let unet_dir = dir.join("unet");
        let unet_file = weights_file(&unet_dir)?;
        let (unet, unet_vb) =
            UNet2DConditionModel::load_in(&unet_dir, device, opts.train_unet, dtypes.unet())?;

        let te_dir = dir.join("text_encoder");
        let te_file = weights_file(&te_dir)?;
        let te_cfg = ClipTextConfig::from_file(&te_dir.join("config.json"))?;
        let (text_encoder, text_encoder_vb) = ClipTextModel::load_in(
            &te_file,
            &te_cfg,
            device,
            opts.train_text_encoder,
            false,
            dtypes.text_encoders(),
        )?;

        let vae_dir = dir.join("vae");
        let vae_file = weights_file(&vae_dir)?;
        let vae_cfg = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let vae_vb = Vb::from_file_in(&vae_file, device, false, dtypes.vae())?;
        let vae = AutoencoderKL::new(&vae_vb, &vae_cfg)?;
        vae_vb.finish()?;

        let mut weight_files = vec![
            ("unet", unet_file),
            ("text_encoder", te_file),
            ("vae", vae_file),
        ];
        let text_encoder_2 = if sdxl {
            let dir2 = dir.join("text_encoder_2");
            let file2 = weights_file(&dir2)?;
            let cfg2 = ClipTextConfig::from_file(&dir2.join("config.json"))?;
            // SDXL's second text encoder is a CLIPTextModelWithProjection.
            let (model2, vb2) = ClipTextModel::load_in(
                &file2,
                &cfg2,
                device,
                opts.train_text_encoder,
                true,
                dtypes.text_encoders(),
            )?;
            weight_files.push(("text_encoder_2", file2));
            Some(SecondTextEncoder {
                tokenizer: ClipTokenizer::from_dir(dir.join("tokenizer_2"))?,
                model: model2,
                vb: vb2,
            })
        } else {
            None
        };
        let force_zeros_for_empty_prompt = index
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);

        let model = Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            source: dir.to_path_buf(),
            format: ModelFormat::Diffusers,
            unet_vb,
            text_encoder_vb,
            vae_vb,
            text_encoder_2,
            force_zeros_for_empty_prompt,
            device: device.clone(),
            weight_files,
        };
        model.check_compatible()?;
        Ok(model)
    }

    /// An original-layout single-file checkpoint, converted to diffusers keys by
    /// `super::single_file`; the tokenizer is CLIP's BPE from `assets/clip/`.
    pub fn load_single_file(path: &Path, device: &Device, opts: LoadOptions) -> Result<Self> {
        opts.dtypes
            .check(path, opts.train_unet, opts.train_text_encoder)?;
        let sf_opts = super::single_file::SingleFileOptions {
            prediction_type: opts.prediction_type,
            dtypes: opts.dtypes,
        };
        let c = super::single_file::load_components(path, device, &sf_opts)?;
        let tokenizer = c.tokenizer(&clip_bpe_file()?)?;
        let tokenizer_2 = match c.text_encoder_2 {
            Some(_) => Some(c.tokenizer_2(&clip_bpe_file()?)?),
            None => None,
        };
        let from = |tensors: std::collections::HashMap<String, Tensor>, trainable: bool| {
            Vb::from_tensors(path, tensors, device, trainable)
        };

        let unet_vb = from(c.unet, opts.train_unet);
        let unet = UNet2DConditionModel::new(&unet_vb, &c.unet_config)?;
        unet_vb.finish()?;

        let mut te = c.text_encoder;
        for k in super::clip_text::BUFFER_KEYS {
            te.remove(k);
        }
        let text_encoder_vb = from(te, opts.train_text_encoder);
        let text_encoder = ClipTextModel::new(&text_encoder_vb, &c.text_config)?;
        text_encoder_vb.finish()?;

        let vae_vb = from(c.vae, false);
        let vae = AutoencoderKL::new(&vae_vb, &c.vae_config)?;
        vae_vb.finish()?;

        let text_encoder_2 = match (c.text_encoder_2, tokenizer_2) {
            (Some((cfg, tensors)), Some(tokenizer)) => {
                let vb = from(tensors, opts.train_text_encoder);
                let model = ClipTextModel::new_with_projection(&vb, &cfg)?;
                vb.finish()?;
                Some(SecondTextEncoder {
                    tokenizer,
                    model,
                    vb,
                })
            }
            _ => None,
        };

        let model = Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler: c.scheduler,
            source: path.to_path_buf(),
            format: ModelFormat::SingleFile,
            unet_vb,
            text_encoder_vb,
            vae_vb,
            text_encoder_2,
            force_zeros_for_empty_prompt: true,
            device: device.clone(),
            weight_files: vec![("checkpoint", path.to_path_buf())],
        };
        model.check_compatible()?;
        Ok(model)
    }

    /// A model of the given architecture with frozen random weights (seeded),
    /// CLIP's tokenizer (`assets/clip/`) and Stable Diffusion's noise
    /// schedule: what `bench sample --arch sd15|sdxl` times, since no
    /// pretrained weights can be downloaded and sampling cost does not depend
    /// on them. `text_2` is SDXL's second text encoder (with its projection;
    /// its tokenizer pads with `!`, as SDXL's `tokenizer_2`). `name` is the
    /// model's name (its source).
    pub fn random(
        name: &str,
        unet_cfg: &UNetConfig,
        text_cfg: &ClipTextConfig,
        text_2: Option<&ClipTextConfig>,
        vae_cfg: &VaeConfig,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let source = PathBuf::from(name);
        unet_cfg.validate(&source)?;
        text_cfg.validate(&source)?;
        if let Some(c) = text_2 {
            c.validate(&source)?;
        }
        vae_cfg.validate(&source)?;
        let tokenizer = ClipTokenizer::from_bpe_gz(&clip_bpe_file()?)?;
        let scheduler = super::single_file::default_scheduler(PredictionType::Epsilon, &source)?;
        let unet_vb = Vb::random_frozen(seed, device, DType::F32, |vb| {
            UNet2DConditionModel::new(vb, unet_cfg).map(drop)
        })?;
        let unet = UNet2DConditionModel::new(&unet_vb, unet_cfg)?;
        let text_encoder_vb = Vb::random_frozen(seed + 1, device, DType::F32, |vb| {
            ClipTextModel::new(vb, text_cfg).map(drop)
        })?;
        let text_encoder = ClipTextModel::new(&text_encoder_vb, text_cfg)?;
        let vae_vb = Vb::random_frozen(seed + 2, device, DType::F32, |vb| {
            AutoencoderKL::new(vb, vae_cfg).map(drop)
        })?;
        let vae = AutoencoderKL::new(&vae_vb, vae_cfg)?;
        let text_encoder_2 = match text_2 {
            Some(cfg) => {
                let vb = Vb::random_frozen(seed + 3, device, DType::F32, |vb| {
                    ClipTextModel::new_with_projection(vb, cfg).map(drop)
                })?;
                Some(SecondTextEncoder {
                    tokenizer: ClipTokenizer::from_bpe_gz(&clip_bpe_file()?)?
                        .with_pad_token(super::single_file::Family::Sd2.tokenizer_pad())?,
                    model: ClipTextModel::new_with_projection(&vb, cfg)?,
                    vb,
                })
            }
            None => None,
        };
        let model = Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            source,
            format: ModelFormat::Random,
            unet_vb,
            text_encoder_vb,
            vae_vb,
            text_encoder_2,
            force_zeros_for_empty_prompt: true,
            device: device.clone(),
            weight_files: Vec::new(),
        };
        model.check_compatible()?;
        Ok(model)
    }

    /// The components must fit together: context width, latent channels.
    fn check_compatible(&self) -> Result<()> {
        let u = &self.unet.config;
        let te = self.text_encoder.config();
        match (&self.text_encoder_2, u.text_time_dims()) {
            (None, None) => {
                if u.cross_attention_dim != te.hidden_size {
                    return Err(Error::config(
                        &self.source,
                        format!(
                            "the UNet's cross_attention_dim ({}) differs from the text encoder's hidden_size ({})",
                            u.cross_attention_dim, te.hidden_size
                        ),
                    ));
                }
            }
            (Some(te2), Some((time_dim, in_dim))) => {
                let c2 = te2.model.config();
                let want = te.hidden_size + c2.hidden_size;
                if u.cross_attention_dim != want {
                    return Err(Error::config(
                        &self.source,
                        format!(
                            "the UNet's cross_attention_dim ({}) differs from the two text encoders' \
                             hidden sizes together ({} + {} = {want})",
                            u.cross_attention_dim, te.hidden_size, c2.hidden_size
                        ),
                    ));
                }
                let want = c2.projection_dim + 6 * time_dim;
                if in_dim != want {
                    return Err(Error::config(
                        &self.source,
                        format!(
                            "the UNet's projection_class_embeddings_input_dim ({in_dim}) differs from \
                             text_encoder_2's projection_dim + 6 × addition_time_embed_dim \
                             ({} + 6 × {time_dim} = {want})",
                            c2.projection_dim
                        ),
                    ));
                }
                self.check_vocab("tokenizer_2", &te2.tokenizer, "text_encoder_2", c2)?;
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    &self.source,
                    "the UNet is SDXL's (addition_embed_type `text_time`) but there is no \
                     text_encoder_2",
                ));
            }
            (Some(_), None) => {
                return Err(Error::config(
                    &self.source,
                    "the model has a text_encoder_2 but its UNet takes no pooled text \
                     embeddings (addition_embed_type is not `text_time`)",
                ));
            }
        }
        self.check_vocab("the tokenizer", &self.tokenizer, "the text encoder", te)?;
        let lc = self.vae.config().latent_channels;
        if u.in_channels != lc || u.out_channels != lc {
            return Err(Error::config(
                &self.source,
                format!(
                    "the UNet has {} input / {} output channels but the VAE's latents have {lc}",
                    u.in_channels, u.out_channels
                ),
            ));
        }
        Ok(())
    }

    /// A tokenizer must not hand out ids beyond its text encoder's vocabulary.
    fn check_vocab(
        &self,
        tokenizer_name: &str,
        tokenizer: &ClipTokenizer,
        encoder_name: &str,
        cfg: &ClipTextConfig,
    ) -> Result<()> {
        let (nt, nv) = (tokenizer.vocab_size(), cfg.vocab_size);
        if nt > nv {
            return Err(Error::config(
                &self.source,
                format!(
                    "{tokenizer_name} has {nt} tokens but {encoder_name}'s vocabulary has {nv}; \
                     they do not belong together"
                ),
            ));
        }
        Ok(())
    }

    /// Converts the UNet's weights to `precision`'s dtype for sampling (bf16 /
    /// f16 on a GPU: half the memory and bandwidth); the UNet then computes in
    /// it ([`crate::nn::precision`]) and the pipeline keeps latents, guidance
    /// and the sampler in f32. Only for a model that is not being trained
    /// (training keeps f32 master weights), and before LoRA adapters are
    /// attached (they stay f32 and are cast per call).
    pub fn set_unet_precision(&mut self, precision: crate::nn::Precision) -> Result<()> {
        let dtype = precision.dtype();
        if self.unet.conv_in.weight.dtype() == dtype {
            return Ok(());
        }
        precision.check_device(&self.device)?;
        if self.unet_vb.is_trainable() {
            return Err(Error::msg(
                "a UNet being trained keeps f32 weights; use mixed precision instead",
            ));
        }
        (self.unet, self.unet_vb) = self.unet_converted(dtype)?;
        Ok(())
    }

    /// The UNet rebuilt from a frozen copy of its weights in `dtype`.
    fn unet_converted(&self, dtype: candle_core::DType) -> Result<(UNet2DConditionModel, Vb)> {
        let vb = self.unet_vb.converted(dtype)?;
        Ok((UNet2DConditionModel::new(&vb, &self.unet.config)?, vb))
    }

    /// A copy for sampling with the UNet in `precision`'s dtype: the UNet's
    /// current weights converted (a frozen copy; adapters attached to this
    /// model are not carried over), every other part shared; `None` when the
    /// UNet already computes in that dtype (use the model itself). The
    /// trainer samples class and validation images with it while it trains
    /// f32 weights.
    pub fn sampling_copy(&self, precision: crate::nn::Precision) -> Result<Option<Self>> {
        if self.unet.conv_in.weight.dtype() == precision.dtype() {
            return Ok(None);
        }
        precision.check_device(&self.device)?;
        let (unet, unet_vb) = self.unet_converted(precision.dtype())?;
        Ok(Some(Self {
            tokenizer: self.tokenizer.clone(),
            text_encoder: self.text_encoder.clone(),
            unet,
            vae: self.vae.clone(),
            scheduler: self.scheduler.clone(),
            source: self.source.clone(),
            format: self.format,
            unet_vb,
            text_encoder_vb: self.text_encoder_vb.clone(),
            vae_vb: self.vae_vb.clone(),
            text_encoder_2: self.text_encoder_2.clone(),
            force_zeros_for_empty_prompt: self.force_zeros_for_empty_prompt,
            device: self.device.clone(),
            weight_files: self.weight_files.clone(),
        }))
    }

    /// The UNet's config.
    pub fn unet_config(&self) -> &UNetConfig {
        &self.unet.config
    }

    /// What the UNet predicts (ε or v), from the scheduler config.
    pub fn prediction_type(&self) -> PredictionType {
        self.scheduler.prediction_type
    }

    /// Pixels per latent along each side (8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }

    /// Width and height must be multiples of this: the VAE's factor times the
    /// UNet's total downsampling (at least 8, as diffusers asks).
    pub fn size_multiple(&self) -> usize {
        // The UNet upsamples to each skip connection's size (as diffusers'
        // `upsample_size`), so any multiple of the VAE factor works; sizes
        // stay multiples of 8 as in diffusers' pipelines.
        self.vae_scale_factor().max(8)
    }

    /// The image side the model was trained at: UNet `sample_size` × VAE factor.
    pub fn default_size(&self) -> usize {
        self.unet.config.sample_size * self.vae_scale_factor()
    }

    /// Tokens a prompt is cut to: the tokenizer's `model_max_length` (77), at
    /// most the text encoder's positions.
    pub fn max_tokens(&self) -> usize {
        max_tokens(&self.tokenizer, self.text_encoder.config())
    }

    /// A short name for the model: the folder's or file's name.
    pub fn name(&self) -> String {
        let p = self
            .source
            .canonicalize()
            .unwrap_or_else(|_| self.source.clone());
        let name = match self.format {
            ModelFormat::Diffusers => p.file_name(),
            ModelFormat::SingleFile => p.file_stem(),
            ModelFormat::Random => return self.source.display().to_string(),
        };
        name.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    }

    /// Token ids (B, max_tokens) u32 of `prompts`, padded or truncated as
    /// diffusers' pipelines do, and a warning per prompt that was cut, naming
    /// the words dropped.
    pub fn tokenize(&self, prompts: &[String]) -> Result<(Tensor, Vec<String>)> {
        tokenize_with(
            &self.tokenizer,
            self.text_encoder.config(),
            prompts,
            &self.device,
        )
    }

    /// Text conditioning of `prompts`: the context (B, 77, hidden) for the
    /// UNet's cross-attention, `clip_skip` as diffusers' (0 = last layer, 1 =
    /// penultimate); for SDXL both encoders' states concatenated (each taken
    /// one layer earlier, as `StableDiffusionXLPipeline`) and the pooled
    /// embeddings. Returns the truncation warnings of [`Self::tokenize`].
    pub fn encode_prompt(
        &self,
        prompts: &[String],
        clip_skip: usize,
    ) -> Result<(PromptEmbeds, Vec<String>)> {
        if prompts.is_empty() {
            return Err(Error::msg("encode_prompt: no prompts given"));
        }
        let (ids, warnings) = self.tokenize(prompts)?;
        let ids2 = self.tokenize_2(prompts)?;
        let te2 = self.text_encoder_2.as_ref().map(|t| &t.model);
        let embeds = encode_ids(&self.text_encoder, te2, &ids, ids2.as_ref(), clip_skip)?;
        Ok((embeds, warnings))
    }

    /// SDXL: the token ids of `prompts` for the second text encoder; `None`
    /// for SD 1.x / 2.x.
    pub fn tokenize_2(&self, prompts: &[String]) -> Result<Option<Tensor>> {
        self.text_encoder_2
            .as_ref()
            .map(|te2| {
                tokenize_with(&te2.tokenizer, te2.model.config(), prompts, &self.device)
                    .map(|(ids, _)| ids)
            })
            .transpose()
    }

    /// Whether this is an SDXL model (two text encoders, micro-conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// SDXL's extra UNet conditioning for images of `height` × `width`
    /// generated or trained as they are (original size = target size, no
    /// crop: the pipeline's defaults); `None` for SD 1.x / 2.x.
    pub fn added_cond(
        &self,
        embeds: &PromptEmbeds,
        height: usize,
        width: usize,
    ) -> Result<Option<AddedCond>> {
        match (&self.text_encoder_2, &embeds.pooled) {
            (None, _) => Ok(None),
            (Some(_), Some(p)) => {
                let (h, w) = (height as f32, width as f32);
                Ok(Some(AddedCond::new(p, [h, w, 0.0, 0.0, h, w])?))
            }
            (Some(_), None) => Err(Error::msg(
                "SDXL conditioning needs the second text encoder's pooled embeddings",
            )),
        }
    }

    /// Replaces the VAE with another one (`--vae`, as diffusers'
    /// `--pretrained_vae_model_name_or_path` and kohya's `--vae`): a diffusers
    /// VAE folder (`config.json` + weights, e.g. `sdxl-vae-fp16-fix/`), a whole
    /// diffusers model folder (its `vae/`), or a file read by
    /// [`super::single_file::load_vae_file`] with this model's VAE architecture
    /// (`vae-ft-mse-840000-ema-pruned.safetensors`, another checkpoint's VAE).
    /// The latent channels must match the UNet's. The new VAE's weights are
    /// read in the dtype of the one it replaces (f32, or what
    /// [`LoadOptions::dtypes`] asked for).
    pub fn set_vae(&mut self, path: &Path) -> Result<()> {
        let path = &super::hub::resolve(path)?;
        let dtype = self.vae_dtype();
        let (cfg, tensors, file) = if path.is_dir() {
            let dir = if path.join("model_index.json").is_file() {
                path.join("vae")
            } else {
                path.to_path_buf()
            };
            let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
            let file = weights_file(&dir)?;
            let tensors = crate::nn::read_weights_in(&file, &self.device, dtype)?;
            (cfg, tensors, file)
        } else if path.is_file() {
            let cfg = self.vae.config().clone();
            let tensors = super::single_file::load_vae_file(path, &cfg, &self.device, dtype)?;
            (cfg, tensors, path.to_path_buf())
        } else {
            return Err(Error::NotFound {
                path: path.to_path_buf(),
            });
        };
        cfg.validate(&file)?;
        if cfg.latent_channels != self.unet.config.in_channels {
            return Err(Error::config(
                &file,
                format!(
                    "this VAE has {} latent channels, the model's UNet takes {}",
                    cfg.latent_channels, self.unet.config.in_channels
                ),
            ));
        }
        let vb = Vb::from_tensors(&file, tensors, &self.device, false);
        let vae = AutoencoderKL::new(&vb, &cfg)?;
        vb.finish()?;
        self.vae = vae;
        self.vae_vb = vb;
        self.weight_files.retain(|(name, _)| *name != "vae");
        self.weight_files.push(("vae", file));
        Ok(())
    }

    /// The dtype the VAE's floating-point weights are held in.
    pub fn vae_dtype(&self) -> DType {
        self.vae_vb
            .tensors()
            .values()
            .map(|t| t.dtype())
            .find(|d| d.is_float())
            .unwrap_or(DType::F32)
    }

    /// A short stable fingerprint of the weights (16 hex digits): SHA-256 over
    /// each weights file's component name, size, first and last MiB. Cheap on
    /// multi-GB files; changes whenever the weights are rewritten with other values
    /// (in practice), not when the folder moves.
    pub fn model_hash(&self) -> Result<String> {
        hash_files(&self.weight_files)
    }
}

/// See [`StableDiffusion::model_hash`].
pub fn hash_files(files: &[(&str, PathBuf)]) -> Result<String> {
    const CHUNK: u64 = 1 << 20;
    let mut h = Sha256::new();
    // A shard index stands for itself and every shard it lists.
    let mut expanded = Vec::new();
    for (name, path) in files {
        if crate::nn::weights::is_index(path) {
            for p in crate::nn::WeightsReader::open(path)?.files() {
                expanded.push((*name, p));
            }
        } else {
            expanded.push((*name, path.clone()));
        }
    }
    for (name, path) in &expanded {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update(len.to_le_bytes());
        let mut buf = Vec::new();
        (&mut f)
            .take(CHUNK)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(path, e))?;
        if len > CHUNK {
            f.seek(SeekFrom::Start(len.saturating_sub(CHUNK).max(CHUNK)))
                .map_err(|e| Error::io(path, e))?;
            f.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
        }
        h.update(&buf);
    }
    let digest = h.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// CLIP's `bpe_simple_vocab_16e6.txt.gz` (the tokenizer of single-file
/// checkpoints): under `assets/clip/` of the source tree this binary was built
/// from, next to the executable, or under the working directory.
pub fn clip_bpe_file() -> Result<PathBuf> {
    const REL: &str = "assets/clip/bpe_simple_vocab_16e6.txt.gz";
    let mut candidates = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(REL)];
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(REL));
    }
    candidates.push(PathBuf::from(REL));
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(Error::msg(format!(
        "CLIP's vocabulary {REL} (needed for single-file checkpoints) was not found; looked in: {}",
        tried.join(", ")
    )))
}

/// `scheduler/scheduler_config.json` (or `config.json`).
fn scheduler_config_file(dir: &Path) -> Result<PathBuf> {
    for name in ["scheduler_config.json", "config.json"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::NotFound {
        path: dir.join("scheduler_config.json"),
    })
}

/// The text conditioning of token ids through the given text encoders (the
/// model's, or copies with checkpointing / mixed precision being trained):
/// SD 1.x / 2.x, `te` alone with `clip_skip`; SDXL, both encoders' states
/// `clip_skip + 1` layers before the last side by side and the second's
/// pooled projection.
pub fn encode_ids(
    te: &ClipTextModel,
    te2: Option<&ClipTextModel>,
    ids: &Tensor,
    ids2: Option<&Tensor>,
    clip_skip: usize,
) -> Result<PromptEmbeds> {
    // Embeddings in f32 whatever the encoders compute in (a frozen encoder
    // held in half precision for training): the rest of the pipeline and
    // the cached embeddings see the same dtype either way.
    let f32 = |t: Tensor| crate::nn::precision::cast(&t, candle_core::DType::F32);
    match (te2, ids2) {
        (None, _) => Ok(PromptEmbeds {
            context: f32(te.forward_with_skip(ids, clip_skip)?)?,
            pooled: None,
        }),
        (Some(te2), Some(ids2)) => {
            let (h1, _) = te.forward_sdxl(ids, clip_skip)?;
            let (h2, pooled) = te2.forward_sdxl(ids2, clip_skip)?;
            Ok(PromptEmbeds {
                context: Tensor::cat(&[&f32(h1)?, &f32(h2)?], 2)?,
                pooled: pooled.map(f32).transpose()?,
            })
        }
        (Some(_), None) => Err(Error::msg(
            "SDXL text encoding needs the second tokenizer's ids",
        )),
    }
}

/// Tokens a prompt is cut to: the tokenizer's `model_max_length`, at most
/// the text encoder's positions.
fn max_tokens(tokenizer: &ClipTokenizer, cfg: &ClipTextConfig) -> usize {
    tokenizer
        .model_max_length()
        .min(cfg.max_position_embeddings)
}

/// Token ids (B, max tokens) u32 of `prompts` for one tokenizer / text
/// encoder pair, padded or truncated as diffusers' pipelines do, and a warning
/// per prompt that was cut, naming the words dropped.
fn tokenize_with(
    tokenizer: &ClipTokenizer,
    cfg: &ClipTextConfig,
    prompts: &[String],
    device: &Device,
) -> Result<(Tensor, Vec<String>)> {
    let max_len = max_tokens(tokenizer, cfg);
    let mut ids = Vec::with_capacity(prompts.len() * max_len);
    let mut warnings = Vec::new();
    for p in prompts {
        let (t, cut) = tokenizer.encode_padded(p, max_len);
        if let Some(cut) = cut {
            warnings.push(format!(
                "prompt truncated to {max_len} tokens (CLIP's limit); dropped: \"{cut}\""
            ));
        }
        ids.extend(t);
    }
    let ids = Tensor::from_vec(ids, (prompts.len(), max_len), device)?;
    Ok((ids, warnings))
}

/// Rejects pipelines this crate does not run (SDXL's refiner, ...); true for
/// an SDXL base pipeline (two text encoders).
fn check_model_index(index: &serde_json::Value, path: &Path) -> Result<bool> {
    let class = index
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let has = |k: &str| {
        index
            .get(k)
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.first().is_some_and(|x| !x.is_null()))
    };
    let sdxl = has("text_encoder_2") || class.contains("XL");
    if sdxl && !has("text_encoder") {
        return Err(Error::config(
            path,
            format!(
                "`{class}` has no first text encoder (the SDXL refiner?); only SDXL base \
                 pipelines (text_encoder and text_encoder_2) are supported"
            ),
        ));
    }
    if sdxl && !has("text_encoder_2") {
        return Err(Error::config(
            path,
            format!("`{class}` names no text_encoder_2 (an SDXL pipeline has two text encoders)"),
        ));
    }
    if let Some(unet) = index.get("unet").and_then(|v| v.as_array())
        && let Some(name) = unet.get(1).and_then(|v| v.as_str())
        && name != "UNet2DConditionModel"
    {
        return Err(Error::config(
            path,
            format!("unet is a `{name}`; only UNet2DConditionModel is supported"),
        ));
    }
    Ok(sdxl)
}

/// Where the bundled tiny model lives, relative to the crate.
pub const TINY_MODEL: &str = "assets/tiny-model";

/// The bundled tiny model: next to the sources this binary was built from,
/// next to the binary, or under the working directory.
pub fn default_model_dir() -> Result<PathBuf> {
    let mut candidates = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(TINY_MODEL)];
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(TINY_MODEL));
        candidates.push(dir.join("tiny-model"));
    }
    candidates.push(PathBuf::from(TINY_MODEL));
    if let Some(p) = candidates
        .iter()
        .find(|p| p.join("model_index.json").is_file())
    {
        return Ok(p.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(Error::msg(format!(
        "no --model given and the bundled tiny model was not found (looked in {}); \
         pass --model PATH or create it with `dreambooth toy pretrain --out {TINY_MODEL}`",
        tried.join(", ")
    )))
}
