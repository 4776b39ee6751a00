//! Single-file checkpoints in the original latent-diffusion layout (CompVis /
//! Stability / A1111 / ComfyUI `.safetensors`, or the original `.ckpt`
//! PyTorch pickles, read by [`crate::nn::weights`] without running code from
//! them), read into diffusers-named tensors and written back (as safetensors)
//! from them.
//!
//! One file holds the three networks under fixed prefixes:
//!
//! | component     | LDM prefix                                  | mapping            |
//! |---------------|---------------------------------------------|--------------------|
//! | UNet          | `model.diffusion_model.`                    | [`unet_keys`]      |
//! | VAE           | `first_stage_model.`                        | [`vae_keys`]       |
//! | text (SD 1.x) | `cond_stage_model.transformer.text_model.`  | [`text_keys`]      |
//! | text (SD 2.x) | `cond_stage_model.model.` (OpenCLIP)        | [`text_keys`]      |
//! | text (SDXL)   | `conditioner.embedders.0.transformer.text_model.` | [`text_keys`] |
//! | text 2 (SDXL) | `conditioner.embedders.1.model.` (OpenCLIP) | [`text_keys`]      |
//!
//! Top-level DDPM buffers (`betas`, `alphas_cumprod`, ...), EMA copies
//! (`model_ema.*`), CLIP's `position_ids` and OpenCLIP's `text_projection` /
//! `logit_scale` are not weights of the diffusers models and are skipped; any
//! other tensor outside the table is an error naming the file and the key.
//!
//! **Configs.** The file's safetensors metadata may carry the diffusers configs
//! as JSON (`dreambooth.unet_config`, `dreambooth.vae_config`,
//! `dreambooth.text_encoder_config`, `dreambooth.scheduler_config`); files this
//! module writes always do, so they reload with their exact configs. Without
//! them the architecture is read from the tensor shapes (channels, levels,
//! layers per block, which blocks attend, transformer depth, cross-attention
//! width, linear or conv projections, text widths and depth) and what the
//! weights cannot say is Stable Diffusion's: 32 norm groups; attention heads —
//! 8 per block for SD 1.x, 64 channels per head for SD 2.x and for the text
//! encoder; VAE scaling factor 0.18215; the SD noise schedule (scaled_linear
//! 0.00085–0.012, 1000 steps, `steps_offset` 1).
//!
//! **Prediction type.** SD 2.x 768-v and 512-base files have identical
//! layouts, so the prediction type cannot be read from the weights. It is the
//! metadata's when present, else `epsilon` for SD 1.x and `v_prediction` for
//! SD 2.x (sample size 96 latents, the 768 model); pass
//! [`SingleFileOptions::prediction_type`] to override it (SD 2.x base:
//! `epsilon`, which also sets the 512 sample size when the UNet config is detected).

mod keymap;
pub mod text_keys;
pub mod unet_keys;
pub mod vae_keys;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use self::keymap::{KeyMap, Transform};
use crate::diffusion::{FinalSigmas, PredictionType, SchedulerConfig};
use crate::models::clip_text::{BUFFER_KEYS, ClipTextConfig, ClipTextModel};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::models::{UNet2DConditionModel, UNetConfig};
use crate::nn::store::save_safetensors_as;
use crate::nn::{Vb, WeightsReader};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// SD 1.x text encoder (transformers' CLIP).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// SD 2.x text encoder (OpenCLIP).
pub const OPENCLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first text encoder (transformers' CLIP, as SD 1.x's).
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder (OpenCLIP ViT-bigG, with its projection).
pub const SDXL_OPENCLIP_PREFIX: &str = "conditioner.embedders.1.model.";

pub const META_UNET_CONFIG: &str = "dreambooth.unet_config";
pub const META_VAE_CONFIG: &str = "dreambooth.vae_config";
/// A model's own tokenizer (vocab.json / merges.txt text), for models whose
/// vocabulary is not CLIP's standard one (the bundled tiny model).
pub const META_TOKENIZER_VOCAB: &str = "dreambooth.tokenizer_vocab";
pub const META_TOKENIZER_MERGES: &str = "dreambooth.tokenizer_merges";
pub const META_TEXT_ENCODER_CONFIG: &str = "dreambooth.text_encoder_config";
pub const META_TEXT_ENCODER_2_CONFIG: &str = "dreambooth.text_encoder_2_config";
pub const META_SCHEDULER_CONFIG: &str = "dreambooth.scheduler_config";

/// Buffers of LDM's `DDPM` wrapper (the noise schedule) stored at the top level.
const DDPM_BUFFERS: [&str; 13] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
];

/// Stable Diffusion 1.x (CLIP ViT-L/14 text encoder), 2.x (OpenCLIP
/// ViT-H/14) or XL (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

impl Family {
    /// The (first) tokenizer's pad token: `<|endoftext|>` for SD 1.x and XL,
    /// `!` for SD 2.x (and SDXL's second tokenizer).
    pub fn tokenizer_pad(self) -> &'static str {
        match self {
            Family::Sd1 | Family::Sdxl => "<|endoftext|>",
            Family::Sd2 => "!",
        }
    }

    /// `epsilon` for SD 1.x and XL, `v_prediction` for SD 2.x (the 768-v model).
    pub fn default_prediction_type(self) -> PredictionType {
        match self {
            Family::Sd1 | Family::Sdxl => PredictionType::Epsilon,
            Family::Sd2 => PredictionType::VPrediction,
        }
    }

    /// The family a text encoder config belongs to: `gelu` is OpenCLIP (SD 2.x),
    /// anything else CLIP (SD 1.x). Picks the text layout [`save_single_file`] writes.
    pub fn from_text_config(cfg: &ClipTextConfig) -> Self {
        if cfg.hidden_act == "gelu" {
            Family::Sd2
        } else {
            Family::Sd1
        }
    }

    fn text_prefix(self) -> &'static str {
        match self {
            Family::Sd1 => CLIP_PREFIX,
            Family::Sd2 => OPENCLIP_PREFIX,
            Family::Sdxl => SDXL_CLIP_PREFIX,
        }
    }

    fn text_key_map(self, cfg: &ClipTextConfig) -> KeyMap {
        match self {
            Family::Sd1 | Family::Sdxl => text_keys::clip_key_map(cfg),
            Family::Sd2 => text_keys::openclip_key_map(cfg),
        }
    }

    /// Where the text encoder's layers sit (below the family's prefix).
    fn text_layers(self) -> &'static str {
        match self {
            Family::Sd1 | Family::Sdxl => "text_model.encoder.layers",
            Family::Sd2 => "transformer.resblocks",
        }
    }
}

/// What the weights of a single file cannot say.
#[derive(Clone, Debug, Default)]
pub struct SingleFileOptions {
    /// Overrides the prediction type (see the module docs for the default).
    pub prediction_type: Option<PredictionType>,
    /// The dtype each component's tensors are read in (f32 by default), each
    /// cast as it is read: no f32 copy of a half-precision component is made.
    pub dtypes: crate::models::FrozenDTypes,
}

/// The configs of a single file: from its metadata, or detected (see the module docs).
#[derive(Clone, Debug)]
pub struct SingleFileConfigs {
    pub family: Family,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<ClipTextConfig>,
    pub scheduler: SchedulerConfig,
    /// Every config came from the file's `dreambooth.*` metadata.
    pub from_metadata: bool,
}

/// A single file's networks as diffusers-named tensors (on the device; f32,
/// or as [`SingleFileOptions::dtypes`] asks), each ready for
/// [`Vb::from_tensors`], with their configs.
#[derive(Clone, Debug)]
pub struct SingleFileComponents {
    pub family: Family,
    pub unet_config: UNetConfig,
    pub unet: HashMap<String, Tensor>,
    pub vae_config: VaeConfig,
    pub vae: HashMap<String, Tensor>,
    pub text_config: ClipTextConfig,
    /// Keys under `text_model.` (as transformers ≤ 4 and the Hub's SD repositories name them).
    pub text_encoder: HashMap<String, Tensor>,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection` keys) and its config.
    pub text_encoder_2: Option<(ClipTextConfig, HashMap<String, Tensor>)>,
    pub scheduler: SchedulerConfig,
    /// The pad token of the pipeline's tokenizer ([`Family::tokenizer_pad`]).
    pub tokenizer_pad: String,
    /// Every config came from the file's `dreambooth.*` metadata.
    pub configs_from_metadata: bool,
    /// The model's own tokenizer files (vocab.json, merges.txt), when the file carries them.
    pub tokenizer_files: Option<(String, String)>,
}

impl SingleFileComponents {
    /// The CLIP tokenizer of this family from OpenAI's / open_clip's
    /// `bpe_simple_vocab_16e6.txt.gz` (`assets/clip/`), padding with [`Self::tokenizer_pad`].
    pub fn tokenizer(&self, bpe_gz: &Path) -> Result<ClipTokenizer> {
        let tok = self.bpe_tokenizer(bpe_gz)?;
        match self.family {
            Family::Sd1 | Family::Sdxl => Ok(tok),
            Family::Sd2 => tok.with_pad_token(&self.tokenizer_pad),
        }
    }

    /// SDXL's second tokenizer: CLIP's BPE padding with `!` (OpenCLIP's).
    pub fn tokenizer_2(&self, bpe_gz: &Path) -> Result<ClipTokenizer> {
        self.bpe_tokenizer(bpe_gz)?
            .with_pad_token(Family::Sd2.tokenizer_pad())
    }

    /// The file's own vocabulary when it carries one, else CLIP's BPE.
    fn bpe_tokenizer(&self, bpe_gz: &Path) -> Result<ClipTokenizer> {
        match &self.tokenizer_files {
            Some((vocab, merges)) => ClipTokenizer::from_vocab_merges_text(vocab, merges),
            None => ClipTokenizer::from_bpe_gz(bpe_gz),
        }
    }
}

/// The configs [`save_single_file`] writes into the file's metadata; `family`
/// picks the text encoder's layout (see [`Family::from_text_config`]).
#[derive(Clone, Copy, Debug)]
pub struct SaveConfigs<'a> {
    pub family: Family,
    pub unet: &'a UNetConfig,
    pub vae: &'a VaeConfig,
    pub text_encoder: &'a ClipTextConfig,
    /// SDXL's second text encoder (family [`Family::Sdxl`]).
    pub text_encoder_2: Option<&'a ClipTextConfig>,
    pub scheduler: &'a SchedulerConfig,
    /// The model's own tokenizer files (vocab.json, merges.txt) to embed, for
    /// vocabularies other than CLIP's standard one.
    pub tokenizer_files: Option<(&'a str, &'a str)>,
}

// ---------------------------------------------------------------------------
// Reading the file's header.

/// One component's tensors in the file, by name below the component's prefix.
pub(crate) struct Part<'a> {
    pub prefix: &'static str,
    what: &'static str,
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// The name in the file, where it differs from `prefix + name` (old CLIP files).
    file_keys: HashMap<String, String>,
    path: &'a Path,
}

impl<'a> Part<'a> {
    fn new(prefix: &'static str, what: &'static str, path: &'a Path) -> Self {
        Self {
            prefix,
            what,
            shapes: BTreeMap::new(),
            file_keys: HashMap::new(),
            path,
        }
    }

    fn insert(&mut self, name: String, file_key: &str, shape: Vec<usize>) {
        if format!("{}{name}", self.prefix) != file_key {
            self.file_keys.insert(name.clone(), file_key.to_string());
        }
        self.shapes.insert(name, shape);
    }

    fn file_key(&self, name: &str) -> String {
        self.file_keys
            .get(name)
            .cloned()
            .unwrap_or_else(|| format!("{}{name}", self.prefix))
    }

    pub fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.shapes.keys()
    }

    /// The shape of tensor `name`, which must exist with `rank` dimensions.
    pub fn shape(&self, name: &str, rank: usize) -> Result<Vec<usize>> {
        let key = self.file_key(name);
        match self.shapes.get(name) {
            None => Err(self.error(format!(
                "missing tensor `{key}`, needed to work out the {}'s architecture",
                self.what
            ))),
            Some(s) if s.len() != rank => Err(self.error(format!(
                "tensor `{key}` has shape {s:?}, expected {rank} dimensions"
            ))),
            Some(s) => Ok(s.clone()),
        }
    }

    /// How many numbered children `prefix.0`, `prefix.1`, ... there are (the largest index + 1).
    pub fn count(&self, prefix: &str) -> usize {
        let start = format!("{prefix}.");
        self.shapes
            .range(start.clone()..)
            .take_while(|(k, _)| k.starts_with(&start))
            .filter_map(|(k, _)| k[start.len()..].split('.').next()?.parse::<usize>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    }

    pub fn error(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }
}

/// The file's tensors sorted into components, and its metadata.
struct Scan<'a> {
    family: Family,
    unet: Part<'a>,
    vae: Part<'a>,
    text: Part<'a>,
    /// SDXL's second text encoder (OpenCLIP layout).
    text2: Option<Part<'a>>,
    metadata: HashMap<String, String>,
}

fn scan<'a>(
    path: &'a Path,
    tensors: impl Iterator<Item = (String, Vec<usize>)>,
    metadata: HashMap<String, String>,
) -> Result<Scan<'a>> {
    let mut unet = Part::new(UNET_PREFIX, "UNet", path);
    let mut vae = Part::new(VAE_PREFIX, "VAE", path);
    let mut clip = Part::new(CLIP_PREFIX, "text encoder", path);
    let mut openclip = Part::new(OPENCLIP_PREFIX, "text encoder", path);
    let mut xl_clip = Part::new(SDXL_CLIP_PREFIX, "text encoder", path);
    let mut xl_openclip = Part::new(SDXL_OPENCLIP_PREFIX, "second text encoder", path);
    let mut unknown = Vec::new();
    for (key, shape) in tensors {
        if let Some(rest) = key.strip_prefix(SDXL_CLIP_PREFIX) {
            if rest != "text_model.embeddings.position_ids" {
                xl_clip.insert(rest.to_string(), &key, shape);
            }
        } else if let Some(rest) = key.strip_prefix(SDXL_OPENCLIP_PREFIX) {
            if rest != "logit_scale" {
                xl_openclip.insert(rest.to_string(), &key, shape);
            }
        } else if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
            unet.insert(rest.to_string(), &key, shape);
        } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
            vae.insert(rest.to_string(), &key, shape);
        } else if let Some(rest) = key.strip_prefix(CLIP_PREFIX) {
            let name = if rest.starts_with("text_model.") {
                rest.to_string()
            } else {
                format!("text_model.{rest}")
            };
            if name != "text_model.embeddings.position_ids" {
                clip.insert(name, &key, shape);
            }
        } else if let Some(rest) = key.strip_prefix(OPENCLIP_PREFIX) {
            if !text_keys::OPENCLIP_UNUSED.contains(&rest) {
                openclip.insert(rest.to_string(), &key, shape);
            }
        } else if !(key.starts_with("model_ema.") || DDPM_BUFFERS.contains(&key.as_str())) {
            unknown.push(key);
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        let hint = if unknown[0].starts_with("conditioner.") {
            " (an SDXL checkpoint has `conditioner.embedders.0.transformer.*` and \
             `conditioner.embedders.1.model.*`; other conditioners, as the refiner's, \
             are not supported)"
        } else {
            ""
        };
        return Err(Error::config(
            path,
            format!(
                "{} tensor(s) outside a Stable Diffusion checkpoint's UNet (`{UNET_PREFIX}`), VAE \
                 (`{VAE_PREFIX}`) and text encoders (`cond_stage_model.`, SDXL's \
                 `conditioner.embedders.`), e.g. `{}`{hint}",
                unknown.len(),
                unknown[0]
            ),
        ));
    }
    let sdxl = !xl_clip.shapes.is_empty() || !xl_openclip.shapes.is_empty();
    if sdxl {
        if !(clip.shapes.is_empty() && openclip.shapes.is_empty()) {
            return Err(Error::config(
                path,
                "the file holds both SDXL (`conditioner.embedders.*`) and SD 1.x/2.x \
                 (`cond_stage_model.*`) text encoders",
            ));
        }
        for (part, name) in [
            (&xl_clip, SDXL_CLIP_PREFIX),
            (&xl_openclip, SDXL_OPENCLIP_PREFIX),
        ] {
            if part.shapes.is_empty() {
                return Err(Error::config(
                    path,
                    format!(
                        "an SDXL checkpoint needs both text encoders; there is no `{name}*` \
                         (the SDXL refiner, with only the second, is not supported)"
                    ),
                ));
            }
        }
    }
    let (family, text, text2) = match (clip.shapes.is_empty(), openclip.shapes.is_empty()) {
        _ if sdxl => (Family::Sdxl, xl_clip, Some(xl_openclip)),
        (false, true) => (Family::Sd1, clip, None),
        (true, false) => (Family::Sd2, openclip, None),
        (false, false) => {
            return Err(Error::config(
                path,
                format!(
                    "the file holds two text encoders, `{CLIP_PREFIX}*` (SD 1.x) and `{OPENCLIP_PREFIX}*` (SD 2.x)"
                ),
            ));
        }
        (true, true) => {
            return Err(Error::config(
                path,
                format!(
                    "no text encoder (`{CLIP_PREFIX}*` or `{OPENCLIP_PREFIX}*`): not a full Stable Diffusion checkpoint"
                ),
            ));
        }
    };
    for part in [&unet, &vae] {
        if part.shapes.is_empty() {
            return Err(Error::config(
                path,
                format!(
                    "no {} (`{}*`): not a full Stable Diffusion checkpoint",
                    part.what, part.prefix
                ),
            ));
        }
    }
    Ok(Scan {
        family,
        unet,
        vae,
        text,
        text2,
        metadata,
    })
}

fn parse_meta<T: serde::de::DeserializeOwned>(
    scan: &Scan,
    path: &Path,
    key: &str,
) -> Result<Option<T>> {
    scan.metadata
        .get(key)
        .map(|text| {
            serde_json::from_str(text)
                .map_err(|e| Error::config(path, format!("metadata `{key}`: {e}")))
        })
        .transpose()
}

/// The scheduler of Stable Diffusion's pipelines: scaled_linear betas
/// 0.00085–0.012 over 1000 steps, `steps_offset` 1, no sample clipping.
pub fn default_scheduler(prediction: PredictionType, source: &Path) -> Result<SchedulerConfig> {
    let cfg = json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction.as_str(),
        "steps_offset": 1,
        "clip_sample": false,
        "set_alpha_to_one": false,
        "timestep_spacing": "leading",
    });
    SchedulerConfig::from_json_str(&cfg.to_string(), source)
}

fn resolve_configs(
    scan: &Scan,
    path: &Path,
    options: &SingleFileOptions,
) -> Result<SingleFileConfigs> {
    let family = scan.family;
    let scheduler_meta = match scan.metadata.get(META_SCHEDULER_CONFIG) {
        Some(text) => Some(SchedulerConfig::from_json_str(text, path).map_err(|e| {
            Error::config(path, format!("metadata `{META_SCHEDULER_CONFIG}`: {e}"))
        })?),
        None => None,
    };
    let prediction = options
        .prediction_type
        .or(scheduler_meta.as_ref().map(|s| s.prediction_type))
        .unwrap_or(family.default_prediction_type());
    let unet_meta: Option<UNetConfig> = parse_meta(scan, path, META_UNET_CONFIG)?;
    let vae_meta: Option<VaeConfig> = parse_meta(scan, path, META_VAE_CONFIG)?;
    let text_meta: Option<ClipTextConfig> = parse_meta(scan, path, META_TEXT_ENCODER_CONFIG)?;
    let from_metadata = unet_meta.is_some()
        && vae_meta.is_some()
        && text_meta.is_some()
        && scheduler_meta.is_some();

    let unet = match unet_meta {
        Some(c) => c,
        None => unet_keys::config(&unet_keys::detect(&scan.unet)?, family, prediction)?,
    };
    let vae = match vae_meta {
        Some(c) => c,
        None => vae_keys::config(&vae_keys::detect(&scan.vae)?, family, prediction)?,
    };
    let text_encoder = match text_meta {
        Some(c) => c,
        None => text_keys::config(&text_keys::detect(&scan.text, family)?, family)?,
    };
    let text_encoder_2 = match &scan.text2 {
        None => None,
        Some(part) => Some(
            match parse_meta::<ClipTextConfig>(scan, path, META_TEXT_ENCODER_2_CONFIG)? {
                Some(c) => c,
                None => text_keys::config_2(part)?,
            },
        ),
    };
    let scheduler = match scheduler_meta {
        Some(mut s) => {
            s.prediction_type = prediction;
            s
        }
        None => default_scheduler(prediction, path)?,
    };
    Ok(SingleFileConfigs {
        family,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        scheduler,
        from_metadata,
    })
}

/// The configs of a single file, from its metadata or its tensor shapes, without
/// loading any tensor. Not validated: a detected config may describe a model this
/// crate does not build (e.g. channels that 32 norm groups do not divide).
pub fn detect_configs(path: &Path, options: &SingleFileOptions) -> Result<SingleFileConfigs> {
    let file = WeightsReader::open(path)?;
    let scan = scan(path, file.shapes().into_iter(), file.metadata())?;
    resolve_configs(&scan, path, options)
}

// ---------------------------------------------------------------------------
// Loading.

/// Renames one component's tensors to diffusers keys, read in `dtype`; `skip`
/// names tensors the model does not use.
fn convert(
    file: &WeightsReader,
    part: &Part,
    map: &KeyMap,
    device: &Device,
    dtype: DType,
    skip: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for name in part.keys() {
        if skip(name) {
            continue;
        }
        let key = part.file_key(name);
        let targets = map.to_diffusers(name);
        if targets.is_empty() {
            return Err(part.error(format!(
                "tensor `{key}` has no counterpart in the diffusers {} the file's config describes",
                part.what
            )));
        }
        let t = file.load_in(&key, device, dtype)?;
        if !t.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                path: part.path.to_path_buf(),
                key,
                dtype: format!("{:?}", t.dtype()),
            });
        }
        for (target, transform) in targets {
            let t = keymap::to_diffusers_tensor(&t, transform, &key)?;
            if out.insert(target.clone(), t).is_some() {
                return Err(part.error(format!("two tensors map to the diffusers key `{target}`")));
            }
        }
    }
    Ok(out)
}

/// Rewrites the diffusers key in a model-building error into its name in the file.
fn rename_error(e: Error, name: impl Fn(&str) -> String) -> Error {
    match e {
        Error::MissingKey {
            path,
            key,
            expected,
        } => Error::MissingKey {
            path,
            key: name(&key),
            expected,
        },
        Error::ShapeMismatch {
            path,
            key,
            expected,
            found,
        } => Error::ShapeMismatch {
            path,
            key: name(&key),
            expected,
            found,
        },
        Error::UnexpectedKeys { path, count, first } => Error::UnexpectedKeys {
            path,
            count,
            first: name(&first),
        },
        e => e,
    }
}

/// Builds a model on `tensors` to check every tensor is there with its shape and
/// none is left over.
fn check_model(
    source: &Path,
    tensors: &HashMap<String, Tensor>,
    device: &Device,
    build: impl FnOnce(&Vb) -> Result<()>,
) -> Result<()> {
    let vb = Vb::from_tensors(source, tensors.clone(), device, false);
    build(&vb)?;
    vb.finish()
}

/// Reads a single-file checkpoint into diffusers-named tensors with their
/// configs. Every tensor is checked against the models the configs describe;
/// errors name the file and the tensor as the file names it.
pub fn load_components(
    path: &Path,
    device: &Device,
    options: &SingleFileOptions,
) -> Result<SingleFileComponents> {
    options.dtypes.check(path, false, false)?;
    let file = WeightsReader::open(path)?;
    let scan = scan(path, file.shapes().into_iter(), file.metadata())?;
    let configs = resolve_configs(&scan, path, options)?;
    let family = configs.family;
    // A config detected from the weights assumed SD's defaults; say so when it does not fit.
    let hint = |meta_key: &str, e: Error| match e {
        Error::Config { path, msg } if !scan.metadata.contains_key(meta_key) => Error::Config {
            path,
            msg: format!(
                "{msg} (config inferred from the weights with Stable Diffusion's defaults: \
                 the file has no `{meta_key}` metadata)"
            ),
        },
        e => e,
    };
    configs
        .unet
        .validate(path)
        .map_err(|e| hint(META_UNET_CONFIG, e))?;
    configs
        .vae
        .validate(path)
        .map_err(|e| hint(META_VAE_CONFIG, e))?;
    configs
        .text_encoder
        .validate(path)
        .map_err(|e| hint(META_TEXT_ENCODER_CONFIG, e))?;
    if let Some(c) = &configs.text_encoder_2 {
        c.validate(path)
            .map_err(|e| hint(META_TEXT_ENCODER_2_CONFIG, e))?;
    }

    // SD 2.x files hold one text layer more than the model uses.
    let layers = configs.text_encoder.num_hidden_layers;
    let in_file = scan.text.count(family.text_layers());
    let extra_layer = family == Family::Sd2 && in_file == layers + 1;
    if in_file != layers && !extra_layer {
        return Err(Error::config(
            path,
            format!(
                "the text encoder has {in_file} layers in the file (`{}{}.N`), the config {layers}",
                family.text_prefix(),
                family.text_layers()
            ),
        ));
    }
    let unused = format!("{}.{layers}.", family.text_layers());

    let unet_map = unet_keys::key_map(&configs.unet);
    let vae_map = vae_keys::key_map(&configs.vae);
    let text_map = family.text_key_map(&configs.text_encoder);
    let dtypes = &options.dtypes;
    let unet = convert(&file, &scan.unet, &unet_map, device, dtypes.unet(), |_| {
        false
    })?;
    let vae = convert(&file, &scan.vae, &vae_map, device, dtypes.vae(), |_| false)?;
    let text_encoder = convert(
        &file,
        &scan.text,
        &text_map,
        device,
        dtypes.text_encoders(),
        |k| extra_layer && k.starts_with(&unused),
    )?;

    let file_name = |map: &KeyMap, prefix: &str, key: &str| match map.to_ldm(key) {
        Some((ldm, _)) => format!("{prefix}{ldm}"),
        None => key.to_string(),
    };
    check_model(path, &unet, device, |vb| {
        UNet2DConditionModel::new(vb, &configs.unet).map(drop)
    })
    .map_err(|e| {
        hint(
            META_UNET_CONFIG,
            rename_error(e, |k| file_name(&unet_map, UNET_PREFIX, k)),
        )
    })?;
    check_model(path, &vae, device, |vb| {
        AutoencoderKL::new(vb, &configs.vae).map(drop)
    })
    .map_err(|e| {
        hint(
            META_VAE_CONFIG,
            rename_error(e, |k| file_name(&vae_map, VAE_PREFIX, k)),
        )
    })?;
    check_model(path, &text_encoder, device, |vb| {
        ClipTextModel::new(vb, &configs.text_encoder).map(drop)
    })
    .map_err(|e| {
        hint(
            META_TEXT_ENCODER_CONFIG,
            rename_error(e, |k| file_name(&text_map, family.text_prefix(), k)),
        )
    })?;
    let text_encoder_2 = match (&scan.text2, &configs.text_encoder_2) {
        (Some(part), Some(cfg)) => {
            let in_file = part.count("transformer.resblocks");
            if in_file != cfg.num_hidden_layers {
                return Err(Error::config(
                    path,
                    format!(
                        "the second text encoder has {in_file} layers in the file \
                         (`{SDXL_OPENCLIP_PREFIX}transformer.resblocks.N`), the config {}",
                        cfg.num_hidden_layers
                    ),
                ));
            }
            let map = text_keys::openclip_projection_key_map(cfg);
            let tensors = convert(&file, part, &map, device, dtypes.text_encoders(), |_| false)?;
            check_model(path, &tensors, device, |vb| {
                ClipTextModel::new_with_projection(vb, cfg).map(drop)
            })
            .map_err(|e| {
                hint(
                    META_TEXT_ENCODER_2_CONFIG,
                    rename_error(e, |k| file_name(&map, SDXL_OPENCLIP_PREFIX, k)),
                )
            })?;
            Some((cfg.clone(), tensors))
        }
        _ => None,
    };

    Ok(SingleFileComponents {
        family,
        unet_config: configs.unet,
        unet,
        vae_config: configs.vae,
        vae,
        text_config: configs.text_encoder,
        text_encoder,
        text_encoder_2,
        scheduler: configs.scheduler,
        tokenizer_pad: family.tokenizer_pad().to_string(),
        configs_from_metadata: configs.from_metadata,
        tokenizer_files: match (
            scan.metadata.get(META_TOKENIZER_VOCAB),
            scan.metadata.get(META_TOKENIZER_MERGES),
        ) {
            (Some(v), Some(m)) => Some((v.clone(), m.clone())),
            _ => None,
        },
    })
}

/// The VAE of a standalone VAE file (`vae-ft-mse-840000-ema-pruned.safetensors`,
/// `sdxl_vae.safetensors`, ...) or of a full checkpoint, with `cfg`'s
/// architecture (the base model's VAE), as diffusers-named tensors. The file
/// may use the original layout (`encoder.down.N.block.M…`, with or without
/// `first_stage_model.`; a full checkpoint's other components are ignored) or
/// diffusers' names (`encoder.down_blocks.N…`), in any format
/// [`WeightsReader`] reads. Training leftovers (`loss.*`, `model_ema.*`) are
/// skipped; any other tensor that is not the VAE's is an error naming it.
/// Floating-point tensors are read in `dtype` (f32, f16 or bf16), one at a time.
pub fn load_vae_file(
    path: &Path,
    cfg: &VaeConfig,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    crate::nn::store::check_params_dtype(path, false, dtype)?;
    let file = WeightsReader::open(path)?;
    let shapes = file.shapes();
    let has = |p: &str| shapes.iter().any(|(k, _)| k.starts_with(p));
    let leftover = |k: &str| k.starts_with("loss.") || k.starts_with("model_ema.");
    let build = |vb: &Vb| AutoencoderKL::new(vb, cfg).map(drop);
    if has("encoder.down_blocks.") || has("decoder.up_blocks.") {
        let mut tensors = HashMap::new();
        for (k, _) in &shapes {
            if !leftover(k) {
                tensors.insert(k.clone(), file.load_in(k, device, dtype)?);
            }
        }
        check_model(path, &tensors, device, build)?;
        return Ok(tensors);
    }
    let prefix = if has(VAE_PREFIX) { VAE_PREFIX } else { "" };
    let mut part = Part::new(prefix, "VAE", path);
    for (key, shape) in shapes {
        if let Some(rest) = key.strip_prefix(prefix)
            && !leftover(rest)
        {
            part.insert(rest.to_string(), &key, shape);
        }
    }
    if part.shapes.is_empty() {
        return Err(Error::config(path, "no VAE tensors in this file"));
    }
    let map = vae_keys::key_map(cfg);
    let tensors = convert(&file, &part, &map, device, dtype, |_| false)?;
    check_model(path, &tensors, device, build).map_err(|e| {
        rename_error(e, |k| match map.to_ldm(k) {
            Some((ldm, _)) => format!("{prefix}{ldm}"),
            None => k.to_string(),
        })
    })?;
    Ok(tensors)
}

// ---------------------------------------------------------------------------
// Saving.

/// The UNet config as diffusers' `unet/config.json`.
pub fn unet_config_json(c: &UNetConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(c).expect("UNetConfig serializes");
    v["_class_name"] = json!("UNet2DConditionModel");
    // Fields a config read from the weights leaves unset, as diffusers'
    // defaults: its constructor takes `len()` of a null `only_cross_attention`.
    if v["only_cross_attention"].is_null() {
        v["only_cross_attention"] = json!(false);
    }
    if v["attention_type"].is_null() {
        v["attention_type"] = json!("default");
    }
    v
}

/// The VAE config as diffusers' `vae/config.json`.
pub fn vae_config_json(c: &VaeConfig) -> serde_json::Value {
    vae_keys::config_json(c)
}

/// The text encoder config as transformers' `text_encoder/config.json`.
pub fn text_config_json(c: &ClipTextConfig) -> serde_json::Value {
    text_keys::config_json(c)
}

/// The scheduler config as diffusers' `scheduler_config.json` (options set in the
/// original file that no sampler here implements are written back as they were).
pub fn scheduler_config_json(c: &SchedulerConfig) -> serde_json::Value {
    let mut v = json!({
        "num_train_timesteps": c.num_train_timesteps,
        "beta_start": c.beta_start,
        "beta_end": c.beta_end,
        "beta_schedule": c.beta_schedule.as_str(),
        "prediction_type": c.prediction_type.as_str(),
        "steps_offset": c.steps_offset,
        "clip_sample": c.clip_sample,
        "clip_sample_range": c.clip_sample_range,
        "set_alpha_to_one": c.set_alpha_to_one,
        "final_sigmas_type": match c.sampler.final_sigmas_type {
            FinalSigmas::Zero => "zero",
            FinalSigmas::SigmaMin => "sigma_min",
        },
        "lower_order_final": c.sampler.lower_order_final,
        "euler_at_final": c.sampler.euler_at_final,
    });
    if let Some(name) = &c.class_name {
        v["_class_name"] = json!(name);
    }
    if let Some(betas) = &c.trained_betas {
        v["trained_betas"] = json!(betas);
    }
    if let Some(s) = c.timestep_spacing {
        v["timestep_spacing"] = json!(s.as_str());
    }
    if c.sampler.lambda_min_clipped.is_finite() {
        v["lambda_min_clipped"] = json!(c.sampler.lambda_min_clipped);
    }
    for u in &c.unsupported {
        v[u.key] = serde_json::from_str(&u.value).unwrap_or_else(|_| json!(u.value));
    }
    v
}

/// Renames one component's diffusers tensors to LDM keys into `out`.
fn to_ldm(
    path: &Path,
    what: &str,
    tensors: &BTreeMap<String, Tensor>,
    map: &KeyMap,
    prefix: &str,
    out: &mut BTreeMap<String, Tensor>,
) -> Result<()> {
    let mut chunks: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (key, t) in tensors {
        let (ldm, transform) = map.to_ldm(key).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "{what} tensor `{key}` has no place in the single-file layout of its config"
                ),
            )
        })?;
        let ldm = format!("{prefix}{ldm}");
        let t = keymap::to_ldm_tensor(t, transform)?;
        if let Transform::Chunk(i) = transform {
            chunks.entry(ldm).or_default()[i] = Some(t);
        } else if out.insert(ldm.clone(), t).is_some() {
            return Err(Error::config(
                path,
                format!("two {what} tensors map to `{ldm}`"),
            ));
        }
    }
    for (ldm, parts) in chunks {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(Error::config(
                path,
                format!("{what}: `{ldm}` needs all of q, k and v"),
            ));
        };
        out.insert(ldm, keymap::stack_qkv(&[q, k, v])?);
    }
    Ok(())
}

/// Writes diffusers-named UNet, VAE and text encoder tensors as one single-file
/// checkpoint in the LDM layout, converted to `dtype`, with the configs in the
/// metadata (`dreambooth.*_config`) so that [`load_components`] restores them
/// exactly. Text encoder keys may carry the `text_model.` prefix or not;
/// `position_ids` buffers are dropped.
///
/// The SD 2.x (OpenCLIP) layout gets what real SD 2.x files hold beyond the
/// model: one more resblock after the used ones, all zeros — an identity layer,
/// so a loader that runs every layer computes what SD 2.x does — and an
/// identity `text_projection` (SD does not use it). The weights are checked
/// against the configs before anything is written.
pub fn save_single_file(
    path: &Path,
    unet: &BTreeMap<String, Tensor>,
    vae: &BTreeMap<String, Tensor>,
    text_encoder: &BTreeMap<String, Tensor>,
    text_encoder_2: Option<&BTreeMap<String, Tensor>>,
    configs: &SaveConfigs,
    dtype: DType,
) -> Result<()> {
    configs.unet.validate(path)?;
    configs.vae.validate(path)?;
    configs.text_encoder.validate(path)?;
    let sdxl = configs.family == Family::Sdxl;
    let second = match (sdxl, text_encoder_2, configs.text_encoder_2) {
        (true, Some(t), Some(c)) => {
            c.validate(path)?;
            Some((t, c))
        }
        (false, None, None) => None,
        _ => {
            return Err(Error::config(
                path,
                "an SDXL single file needs the second text encoder and its config \
                 (and only SDXL has one)",
            ));
        }
    };
    // Text encoder keys under `text_model.` (`text_projection` stays at the root).
    let prefixed = |m: &BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
        m.iter()
            .filter(|(k, _)| !BUFFER_KEYS.contains(&k.as_str()))
            .map(|(k, t)| {
                let k = if k.starts_with("text_model.") || k.starts_with("text_projection.") {
                    k.clone()
                } else {
                    format!("text_model.{k}")
                };
                (k, t.clone())
            })
            .collect()
    };
    let text = prefixed(text_encoder);

    let device = unet
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let source = |what: &str| PathBuf::from(format!("{} ({what} to export)", path.display()));
    let as_hash_map =
        |m: &BTreeMap<String, Tensor>| m.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    check_model(&source("UNet"), &as_hash_map(unet), &device, |vb| {
        UNet2DConditionModel::new(vb, configs.unet).map(drop)
    })?;
    check_model(&source("VAE"), &as_hash_map(vae), &device, |vb| {
        AutoencoderKL::new(vb, configs.vae).map(drop)
    })?;
    check_model(
        &source("text encoder"),
        &as_hash_map(&text),
        &device,
        |vb| ClipTextModel::new(vb, configs.text_encoder).map(drop),
    )?;
    let second = second.map(|(t, c)| (prefixed(t), c));
    if let Some((t, c)) = &second {
        check_model(
            &source("second text encoder"),
            &as_hash_map(t),
            &device,
            |vb| ClipTextModel::new_with_projection(vb, c).map(drop),
        )?;
    }

    let family = configs.family;
    let mut out = BTreeMap::new();
    to_ldm(
        path,
        "UNet",
        unet,
        &unet_keys::key_map(configs.unet),
        UNET_PREFIX,
        &mut out,
    )?;
    to_ldm(
        path,
        "VAE",
        vae,
        &vae_keys::key_map(configs.vae),
        VAE_PREFIX,
        &mut out,
    )?;
    let text_map = family.text_key_map(configs.text_encoder);
    to_ldm(
        path,
        "text encoder",
        &text,
        &text_map,
        family.text_prefix(),
        &mut out,
    )?;

    if let Some((t, c)) = &second {
        to_ldm(
            path,
            "second text encoder",
            t,
            &text_keys::openclip_projection_key_map(c),
            SDXL_OPENCLIP_PREFIX,
            &mut out,
        )?;
        // OpenCLIP's contrastive temperature, ln(100), as in Stability's files.
        out.insert(
            format!("{SDXL_OPENCLIP_PREFIX}logit_scale"),
            Tensor::new(100f32.ln(), &device)?,
        );
    }
    if family == Family::Sd2 {
        let n = configs.text_encoder.num_hidden_layers;
        let last = format!("{OPENCLIP_PREFIX}transformer.resblocks.{}.", n - 1);
        let extra: Vec<(String, Tensor)> = out
            .iter()
            .filter_map(|(k, t)| {
                let rest = k.strip_prefix(&last)?;
                let key = format!("{OPENCLIP_PREFIX}transformer.resblocks.{n}.{rest}");
                Some(t.zeros_like().map(|z| (key, z)))
            })
            .collect::<candle_core::Result<_>>()?;
        out.extend(extra);
        let h = configs.text_encoder.hidden_size;
        out.insert(
            format!("{OPENCLIP_PREFIX}text_projection"),
            Tensor::eye(h, DType::F32, &device)?,
        );
    }

    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            META_UNET_CONFIG.to_string(),
            unet_config_json(configs.unet).to_string(),
        ),
        (
            META_VAE_CONFIG.to_string(),
            vae_config_json(configs.vae).to_string(),
        ),
        (
            META_TEXT_ENCODER_CONFIG.to_string(),
            text_config_json(configs.text_encoder).to_string(),
        ),
        (
            META_SCHEDULER_CONFIG.to_string(),
            scheduler_config_json(configs.scheduler).to_string(),
        ),
    ]);
    let mut metadata = metadata;
    if let Some((_, c)) = &second {
        metadata.insert(
            META_TEXT_ENCODER_2_CONFIG.to_string(),
            text_config_json(c).to_string(),
        );
    }
    if let Some((vocab, merges)) = configs.tokenizer_files {
        metadata.insert(META_TOKENIZER_VOCAB.to_string(), vocab.to_string());
        metadata.insert(META_TOKENIZER_MERGES.to_string(), merges.to_string());
    }
    // Cast one tensor at a time as it is written: no second copy of the model.
    save_safetensors_as(&out, path, Some(metadata), Some(dtype))
}
