//! transformers' `CLIPModel` (models/clip/modeling_clip.py) for evaluation: the
//! vision tower with `visual_projection` (CLIP-I image embeddings) and the text
//! tower with `text_projection` (CLIP-T text embeddings).
//!
//! Weights are a `CLIPModel` checkpoint's (`vision_model.*`, `text_model.*`,
//! `visual_projection.weight`, `text_projection.weight`, `logit_scale`), the
//! config its `config.json` (`CLIPConfig` with `vision_config` and `text_config`).
//! openai/clip-vit-base-patch32 and clip-vit-large-patch14 load as they are on
//! the Hub. Inference only: the parameters are not trainable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, IndexOp, Tensor};
use serde::Deserialize;

use super::clip_text::{
    ClipAttention, ClipEncoderLayer, ClipMlp, ClipTextConfig, ClipTextModel, check_encoder_shape,
    check_patches,
};
use crate::nn::{Activation, Conv2d, Init, LayerNorm, Linear, Vb, read_weights};
use crate::{Error, Result};

fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_logit_scale() -> f64 {
    2.6592
}

/// `vision_config` with `CLIPVisionConfig`'s defaults; unknown fields ignored.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct ClipVisionConfig {
    #[serde(default = "super::serde_default::int::<768>")]
    pub hidden_size: usize,
    #[serde(default = "super::serde_default::int::<3072>")]
    pub intermediate_size: usize,
    #[serde(default = "super::serde_default::int::<12>")]
    pub num_hidden_layers: usize,
    #[serde(default = "super::serde_default::int::<12>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::serde_default::int::<3>")]
    pub num_channels: usize,
    #[serde(default = "super::serde_default::int::<224>")]
    pub image_size: usize,
    #[serde(default = "super::serde_default::int::<32>")]
    pub patch_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all ClipVisionConfig fields have defaults")
    }
}

/// `CLIPConfig`: the two towers' configs and the shared projection size.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: ClipTextConfig,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "super::serde_default::int::<512>")]
    pub projection_dim: usize,
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
}

impl ClipConfig {
    /// Reads and validates a transformers `CLIPModel` `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::read_config(path, Self::validate)
    }

    /// Checks both towers describe a model this crate builds; errors name `path`.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.text_config.validate(path)?;
        let v = &self.vision_config;
        let bad = |msg: String| Err(Error::config(path, format!("vision_config: {msg}")));
        if Activation::parse(&v.hidden_act).is_none() {
            return bad(format!(
                "unsupported hidden_act `{}` (supported: quick_gelu, gelu)",
                v.hidden_act
            ));
        }
        check_encoder_shape(v.hidden_size, v.num_attention_heads, v.num_hidden_layers)
            .and_then(|()| check_patches(v.image_size, v.patch_size))
            .or_else(bad)
    }
}

/// The weights file and the `config.json` beside it, for a path that names
/// either the weights (`.../model.safetensors`, `pytorch_model.bin`, ...) or
/// the folder holding them (found as in a diffusers component folder).
pub fn resolve_model_path(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let weights = if path.is_dir() {
        super::load::weights_file(path)?
    } else {
        path.to_path_buf()
    };
    if !weights.is_file() {
        return Err(Error::msg(format!(
            "no weights at {}: pass a model.safetensors (or pytorch_model.bin) file or the folder holding it",
            weights.display()
        )));
    }
    let dir = weights.parent().unwrap_or(Path::new("."));
    Ok((weights.clone(), dir.join("config.json")))
}

/// Reads a safetensors file and drops the keys `drop` says are not parameters.
pub(crate) fn read_without(
    path: &Path,
    device: &Device,
    drop: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = read_weights(path, device)?;
    tensors.retain(|k, _| !drop(k));
    Ok(tensors)
}

/// transformers' `CLIPVisionTransformer`: patch + class + position embeddings,
/// `pre_layrnorm`, the encoder, `post_layernorm` on the class token.
#[derive(Clone, Debug)]
pub struct ClipVisionModel {
    pub patch_embedding: Conv2d,
    pub class_embedding: Tensor,
    pub position_embedding: Tensor,
    pub pre_layrnorm: LayerNorm,
    pub layers: Vec<ClipEncoderLayer>,
    pub post_layernorm: LayerNorm,
    pub config: ClipVisionConfig,
}

fn linear(vb: &Vb, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    Linear::new(&vb.pp(name), in_dim, out_dim, bias)
}

impl ClipVisionModel {
    /// Builds the tower from `vb` (rooted at `vision_model`).
    pub fn new(vb: &Vb, cfg: &ClipVisionConfig) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let act = Activation::parse(&cfg.hidden_act).ok_or_else(|| {
            Error::config(
                vb.path(),
                format!("unsupported hidden_act `{}`", cfg.hidden_act),
            )
        })?;
        let emb = vb.pp("embeddings");
        let n_pos = (cfg.image_size / p).pow(2) + 1;
        let patch_embedding = Conv2d {
            weight: emb.get(&[d, c, p, p], "patch_embedding.weight", Init::Normal(0.02))?,
            bias: None,
            stride: p,
            padding: 0,
            lora: None,
        };
        let layer = |i: usize| -> Result<ClipEncoderLayer> {
            let vb = vb.pp("encoder").pp("layers").pp(i);
            let (att, mlp) = (vb.pp("self_attn"), vb.pp("mlp"));
            let eps = cfg.layer_norm_eps;
            Ok(ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: linear(&att, "q_proj", d, d, true)?,
                    k_proj: linear(&att, "k_proj", d, d, true)?,
                    v_proj: linear(&att, "v_proj", d, d, true)?,
                    out_proj: linear(&att, "out_proj", d, d, true)?,
                    heads: cfg.num_attention_heads,
                },
                layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), d, eps)?,
                mlp: ClipMlp {
                    fc1: linear(&mlp, "fc1", d, cfg.intermediate_size, true)?,
                    fc2: linear(&mlp, "fc2", cfg.intermediate_size, d, true)?,
                    act,
                },
                layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), d, eps)?,
            })
        };
        Ok(Self {
            patch_embedding,
            class_embedding: emb.get(&[d], "class_embedding", Init::Normal(0.02))?,
            position_embedding: emb.get(
                &[n_pos, d],
                "position_embedding.weight",
                Init::Normal(0.02),
            )?,
            pre_layrnorm: LayerNorm::new(&vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(layer)
                .collect::<Result<Vec<_>>>()?,
            post_layernorm: LayerNorm::new(&vb.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
            config: cfg.clone(),
        })
    }

    /// pixels (B, C, image_size, image_size), already normalized → the pooled
    /// output (B, hidden): `post_layernorm` of the class token's last state.
    pub fn pooled(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (s, ch) = (self.config.image_size, self.config.num_channels);
        if (c, h, w) != (ch, s, s) {
            return Err(Error::msg(format!(
                "CLIP vision input is {c}×{h}×{w}, the model takes {ch}×{s}×{s} \
                 (preprocess with eval::preprocess::clip)"
            )));
        }
        let x = self.patch_embedding.forward(pixels)?; // (B, D, g, g)
        let d = x.dim(1)?;
        let x = x.flatten_from(2)?.transpose(1, 2)?; // (B, N, D)
        let cls = self.class_embedding.reshape((1, 1, d))?.expand((b, 1, d))?;
        let x = Tensor::cat(&[&cls.to_dtype(x.dtype())?, &x], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut h = self.pre_layrnorm.forward(&x)?;
        let no_mask = Tensor::zeros((1, 1), h.dtype(), h.device())?;
        for layer in &self.layers {
            h = layer.forward(&h, &no_mask)?;
        }
        self.post_layernorm.forward(&h.i((.., 0))?.contiguous()?)
    }
}

/// transformers' `CLIPModel`, both towers and both projections.
#[derive(Clone, Debug)]
pub struct ClipModel {
    pub vision_model: ClipVisionModel,
    pub text_model: ClipTextModel,
    pub visual_projection: Linear,
    pub text_projection: Linear,
    pub logit_scale: Tensor,
    pub config: ClipConfig,
}

impl ClipModel {
    /// Loads a `CLIPModel` checkpoint: `path` is its `model.safetensors` or the
    /// folder holding it; `config.json` is read from the same folder. Every
    /// tensor of the file must be used (stored `position_ids` buffers excepted).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (weights, config) = resolve_model_path(path)?;
        let cfg = ClipConfig::from_file(&config)?;
        let tensors = read_without(&weights, device, |k| k.ends_with("embeddings.position_ids"))?;
        let vb = Vb::from_tensors(&weights, tensors, device, false);
        let model = Self::new(&vb, &cfg)?;
        vb.finish()?;
        Ok(model)
    }

    /// Builds the model from `vb` (a `CLIPModel` state dict at its root).
    pub fn new(vb: &Vb, cfg: &ClipConfig) -> Result<Self> {
        cfg.validate(&vb.path())?;
        let (p, dv, dt) = (
            cfg.projection_dim,
            cfg.vision_config.hidden_size,
            cfg.text_config.hidden_size,
        );
        if !vb.contains("text_model.embeddings.token_embedding.weight")
            && vb.contains("embeddings.token_embedding.weight")
        {
            return Err(Error::config(
                vb.path(),
                "this is a CLIPTextModel checkpoint; CLIP-I / CLIP-T need a full CLIPModel \
                 (e.g. openai/clip-vit-large-patch14)",
            ));
        }
        Ok(Self {
            vision_model: ClipVisionModel::new(&vb.pp("vision_model"), &cfg.vision_config)?,
            text_model: ClipTextModel::new(vb, &cfg.text_config)?,
            visual_projection: linear(vb, "visual_projection", dv, p, false)?,
            text_projection: linear(vb, "text_projection", dt, p, false)?,
            logit_scale: vb.get(&[], "logit_scale", Init::Const(cfg.logit_scale_init_value))?,
            config: cfg.clone(),
        })
    }

    /// pixels (B, 3, S, S), preprocessed → image embeddings (B, projection_dim),
    /// transformers' `get_image_features` (not normalized).
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        self.visual_projection
            .forward(&self.vision_model.pooled(pixels)?)
    }

    /// Token ids (B, L) → text embeddings (B, projection_dim), transformers'
    /// `get_text_features` (not normalized): the final hidden state at the end
    /// token, projected. As transformers does, the end token is the first
    /// `eos_token_id` of each row, or the largest id when the config's
    /// `eos_token_id` is the legacy 2 (original OpenAI configs).
    pub fn text_embeds(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_dtype(DType::U32)?;
        let h = self.text_model.forward(&ids)?; // (B, L, D)
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let eos = self.config.text_config.eos_token_id;
        let pos: Vec<u32> = rows
            .iter()
            .map(|r| {
                let i = if eos == 2 {
                    // torch.argmax returns the first maximal index.
                    let m = r.iter().copied().max().unwrap_or(0);
                    r.iter().position(|&x| x == m).unwrap_or(0)
                } else {
                    r.iter().position(|&x| x == eos).unwrap_or(0)
                };
                i as u32
            })
            .collect();
        let b = rows.len();
        let l = h.dim(1)?;
        let flat = h.reshape((b * l, h.dim(D::Minus1)?))?;
        let idx: Vec<u32> = pos
            .iter()
            .enumerate()
            .map(|(i, &p)| i as u32 * l as u32 + p)
            .collect();
        let idx = Tensor::from_vec(idx, b, h.device())?;
        self.text_projection.forward(&flat.index_select(&idx, 0)?)
    }

    /// exp(logit_scale), the temperature of CLIP's similarity logits.
    pub fn logit_scale(&self) -> Result<f64> {
        Ok(self
            .logit_scale
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .exp())
    }
}
