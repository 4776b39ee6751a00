//! transformers' `CLIPTextModel` (models/clip/modeling_clip.py): the Stable
//! Diffusion text encoder. Token ids (B, L) → hidden states (B, L, hidden).
//!
//! Checkpoints name the weights `text_model.embeddings.token_embedding.weight`,
//! `text_model.encoder.layers.N.self_attn.q_proj.weight`, ... (transformers ≤ 4
//! and every SD repository on the Hub); transformers 5 saves them without the
//! `text_model.` prefix. Both load; [`ClipTextModel::key_prefix`] says which one
//! the file used, so weights export back under the same names. A stored
//! `position_ids` buffer is dropped by [`ClipTextModel::load`] (a [`Vb`] made
//! directly from such a file reports it as unused in [`Vb::finish`]).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::nn::checkpoint::{self, Checkpointing};
use crate::nn::{
    Activation, Embedding, LayerNorm, Linear, Precision, Vb, causal_mask, read_weights_in,
    scaled_dot_product_attention,
};
use crate::{Error, Result};

fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_pad() -> u32 {
    1
}
fn d_bos() -> u32 {
    49406
}
fn d_eos() -> u32 {
    49407
}

/// `text_encoder/config.json` with `CLIPTextConfig`'s defaults; unknown fields ignored.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct ClipTextConfig {
    #[serde(default = "super::serde_default::int::<49408>")]
    pub vocab_size: usize,
    #[serde(default = "super::serde_default::int::<512>")]
    pub hidden_size: usize,
    #[serde(default = "super::serde_default::int::<2048>")]
    pub intermediate_size: usize,
    #[serde(default = "super::serde_default::int::<12>")]
    pub num_hidden_layers: usize,
    #[serde(default = "super::serde_default::int::<8>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::serde_default::int::<77>")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "super::serde_default::int::<512>")]
    pub projection_dim: usize,
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all ClipTextConfig fields have defaults")
    }
}

impl ClipTextConfig {
    /// Reads and validates a transformers `text_encoder/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::read_config(path, Self::validate)
    }

    /// Checks the config describes a model this crate builds; errors name `path`.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::config(path, msg));
        if self.activation().is_none() {
            return bad(format!(
                "unsupported hidden_act `{}` (supported: quick_gelu, gelu)",
                self.hidden_act
            ));
        }
        check_encoder_shape(
            self.hidden_size,
            self.num_attention_heads,
            self.num_hidden_layers,
        )
        .or_else(bad)
    }

    fn activation(&self) -> Option<Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }
}

/// Multi-head self-attention with q/k/v/out projections (all with bias).
#[derive(Clone, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

impl ClipAttention {
    fn new(vb: &Vb, dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), dim, dim, true)?,
            k_proj: Linear::new(&vb.pp("k_proj"), dim, dim, true)?,
            v_proj: Linear::new(&vb.pp("v_proj"), dim, dim, true)?,
            out_proj: Linear::new(&vb.pp("out_proj"), dim, dim, true)?,
            heads,
        })
    }

    /// x (B, L, D), `mask` additive (L, L).
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let dh = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let o = scaled_dot_product_attention(&q, &k, &v, 1.0 / (dh as f64).sqrt(), Some(mask))?;
        let o = o.transpose(1, 2)?.reshape((b, l, d))?;
        self.out_proj.forward(&o)
    }
}

/// fc1 → activation → fc2.
#[derive(Clone, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
}

impl ClipMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

/// One pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)).
#[derive(Clone, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(vb: &Vb, cfg: &ClipTextConfig, act: Activation) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            self_attn: ClipAttention::new(&vb.pp("self_attn"), d, cfg.num_attention_heads)?,
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            mlp: ClipMlp {
                fc1: Linear::new(&vb.pp("mlp").pp("fc1"), d, cfg.intermediate_size, true)?,
                fc2: Linear::new(&vb.pp("mlp").pp("fc2"), cfg.intermediate_size, d, true)?,
                act,
            },
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        Ok((&h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?)?)
    }
}

/// transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` (SDXL's
/// second text encoder: [`new_with_projection`](Self::new_with_projection)).
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (hidden → projection_dim, no bias).
    pub text_projection: Option<Linear>,
    pub config: ClipTextConfig,
    /// Gradient checkpointing of every encoder layer
    /// ([`with_gradient_checkpointing`](Self::with_gradient_checkpointing)).
    pub checkpointing: Option<Arc<Checkpointing>>,
    /// The dtype the layers compute in: the weights' own unless
    /// [`with_mixed_precision`](Self::with_mixed_precision) set it.
    pub precision: Option<Precision>,
    prefix: &'static str,
}

const PREFIX: &str = "text_model";

/// Buffers (not parameters) some transformers versions store with the weights:
/// the `position_ids` arange. [`ClipTextModel::load`] drops them.
pub const BUFFER_KEYS: [&str; 2] = [
    "embeddings.position_ids",
    "text_model.embeddings.position_ids",
];

impl ClipTextModel {
    /// Reads a text encoder's safetensors file (either key layout), drops the
    /// stored buffers, builds the model and checks every tensor was used. The
    /// returned [`Vb`] holds the trainable variables when `trainable`.
    pub fn load(
        path: &Path,
        cfg: &ClipTextConfig,
        device: &Device,
        trainable: bool,
    ) -> Result<(Self, Vb)> {
        Self::load_in(path, cfg, device, trainable, false, DType::F32)
    }

    /// [`load`](Self::load) for a `CLIPTextModelWithProjection` (SDXL's
    /// `text_encoder_2/`).
    pub fn load_with_projection(
        path: &Path,
        cfg: &ClipTextConfig,
        device: &Device,
        trainable: bool,
    ) -> Result<(Self, Vb)> {
        Self::load_in(path, cfg, device, trainable, true, DType::F32)
    }

    /// [`load`](Self::load) (or, with `projection`,
    /// [`load_with_projection`](Self::load_with_projection)) with the weights
    /// held in `dtype`, cast tensor by tensor as they are read (f16 / bf16
    /// only for a frozen encoder, which then computes in it; a trainable one
    /// keeps f32 weights: [`crate::nn::store::check_params_dtype`]).
    pub fn load_in(
        path: &Path,
        cfg: &ClipTextConfig,
        device: &Device,
        trainable: bool,
        projection: bool,
        dtype: DType,
    ) -> Result<(Self, Vb)> {
        crate::nn::store::check_params_dtype(path, trainable, dtype)?;
        let mut tensors = read_weights_in(path, device, dtype)?;
        for k in BUFFER_KEYS {
            tensors.remove(k);
        }
        let vb = Vb::from_tensors(path, tensors, device, trainable);
        let model = Self::build(&vb, cfg, projection)?;
        vb.finish()?;
        Ok((model, vb))
    }

    /// Builds the model from `vb`, under `text_model.` when the file uses that
    /// prefix (or `vb` is a random init), at the root otherwise.
    pub fn new(vb: &Vb, cfg: &ClipTextConfig) -> Result<Self> {
        Self::build(vb, cfg, false)
    }

    /// Builds a `CLIPTextModelWithProjection` from `vb`: as [`new`](Self::new),
    /// and `text_projection.weight` (hidden → projection_dim) at the root.
    pub fn new_with_projection(vb: &Vb, cfg: &ClipTextConfig) -> Result<Self> {
        Self::build(vb, cfg, true)
    }

    fn build(vb: &Vb, cfg: &ClipTextConfig, projection: bool) -> Result<Self> {
        cfg.validate(&vb.path())?;
        let token_key = "embeddings.token_embedding.weight";
        let prefix = if vb.contains(token_key) && !vb.pp(PREFIX).contains(token_key) {
            ""
        } else {
            PREFIX
        };
        let root = if prefix.is_empty() {
            vb.clone()
        } else {
            vb.pp(prefix)
        };
        let emb = root.pp("embeddings");
        let act = cfg.activation().expect("validated");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&root.pp("encoder").pp("layers").pp(i), cfg, act))
            .collect::<Result<Vec<_>>>()?;
        // `CLIPTextModelWithProjection` keeps `text_projection` beside `text_model`.
        let text_projection = if projection {
            Some(Linear::new(
                &vb.pp("text_projection"),
                cfg.hidden_size,
                cfg.projection_dim,
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: Embedding::new(
                &emb.pp("token_embedding"),
                cfg.vocab_size,
                cfg.hidden_size,
            )?,
            position_embedding: Embedding::new(
                &emb.pp("position_embedding"),
                cfg.max_position_embeddings,
                cfg.hidden_size,
            )?,
            layers,
            final_layer_norm: LayerNorm::new(
                &root.pp("final_layer_norm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            text_projection,
            config: cfg.clone(),
            checkpointing: None,
            precision: None,
            prefix,
        })
    }

    /// This text encoder (sharing its weights) computing in `precision`'s
    /// dtype on its weights as they are (mixed precision for a text encoder
    /// being trained: f32 master weights, each cast as it is used, norms and
    /// softmax with f32 statistics; [`crate::nn::precision`]). Its output has
    /// that dtype.
    pub fn with_mixed_precision(&self, precision: Precision) -> Self {
        Self {
            precision: Some(precision),
            ..self.clone()
        }
    }

    /// This text encoder (sharing its weights) with every encoder layer
    /// checkpointed (transformers' `gradient_checkpointing_enable`); take the
    /// gradients with [`Checkpointing::backward`].
    pub fn with_gradient_checkpointing(&self, checkpointing: &Arc<Checkpointing>) -> Self {
        Self {
            checkpointing: Some(checkpointing.clone()),
            ..self.clone()
        }
    }

    /// `"text_model"` or `""`: the prefix of the weight names in the loaded file.
    pub fn key_prefix(&self) -> &'static str {
        self.prefix
    }

    /// Token + position embeddings, (B, L) → (B, L, D).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        let max = self.config.max_position_embeddings;
        if l > max {
            return Err(Error::msg(format!(
                "text encoder input has {l} tokens, more than max_position_embeddings = {max}"
            )));
        }
        let ids = if ids.dtype() == DType::U32 {
            ids.clone()
        } else {
            ids.to_dtype(DType::U32)?
        };
        let tok = self.token_embedding.forward(&ids)?;
        let pos = self.position_embedding.weight.narrow(0, 0, l)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// Runs the embeddings and the first `n_layers` layers; returns every
    /// intermediate state when `keep` (embeddings first), else just the last.
    fn run(&self, ids: &Tensor, n_layers: usize, keep: bool) -> Result<Vec<Tensor>> {
        let mut h = self.embed(ids)?;
        if let Some(p) = self.precision {
            h = p.cast(&h)?;
        }
        let l = h.dim(1)?;
        let mask = causal_mask(l, h.device())?.to_dtype(h.dtype())?;
        let mut states = Vec::new();
        for layer in &self.layers[..n_layers] {
            if keep {
                states.push(h.clone());
            }
            let layer = layer.clone();
            h = checkpoint::run_with(self.checkpointing.as_ref(), &h, &mask, move |x, m| {
                layer.forward(x, m)
            })?;
        }
        states.push(h);
        Ok(states)
    }

    /// ids (B, L) u32 → last hidden state (B, L, D) after the final layer norm
    /// (transformers' `last_hidden_state`).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with_skip(ids, 0)
    }

    /// The hidden state `clip_skip` layers before the last, with the final layer
    /// norm applied, as diffusers' pipelines compute `clip_skip`: 0 is
    /// [`forward`](Self::forward), 1 the penultimate layer's output. Skipped
    /// layers are not computed.
    pub fn forward_with_skip(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let n = self.layers.len();
        if clip_skip >= n {
            return Err(Error::msg(format!(
                "clip_skip = {clip_skip} leaves no layer of a {n}-layer text encoder"
            )));
        }
        let h = self
            .run(ids, n - clip_skip, false)?
            .pop()
            .expect("one state");
        self.final_layer_norm.forward(&h)
    }

    /// What SDXL's pipeline takes from a text encoder: the hidden state
    /// `clip_skip + 1` layers before the last, without the final layer norm
    /// (`hidden_states[-(clip_skip + 2)]`), and, for a
    /// `CLIPTextModelWithProjection`, the projected pooled output
    /// (`text_embeds`: the final-layer-normed state at each prompt's first
    /// end-of-text token, through `text_projection`).
    pub fn forward_sdxl(&self, ids: &Tensor, clip_skip: usize) -> Result<(Tensor, Option<Tensor>)> {
        let n = self.layers.len();
        if clip_skip >= n {
            return Err(Error::msg(format!(
                "clip_skip = {clip_skip} leaves no layer of a {n}-layer text encoder"
            )));
        }
        let keep = n - 1 - clip_skip;
        let Some(proj) = &self.text_projection else {
            let h = self.run(ids, keep, false)?.pop().expect("one state");
            return Ok((h, None));
        };
        let states = self.run(ids, n, true)?;
        let hidden = states[keep].clone();
        let last = self.final_layer_norm.forward(&states[n])?;
        let pooled = proj.forward(&self.pool(&last, ids)?)?;
        Ok((hidden, Some(pooled)))
    }

    /// `pooler_output`: each row of `last` (B, L, D) at its prompt's first
    /// end-of-text token (transformers' rule for configs whose
    /// `eos_token_id` is not the legacy 2; with 2, the largest id's position).
    fn pool(&self, last: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let ids: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let eos = self.config.eos_token_id;
        let pos: Vec<u32> = ids
            .iter()
            .map(|row| {
                let p = if eos == 2 {
                    (0..l)
                        .max_by_key(|&i| (row[i], std::cmp::Reverse(i)))
                        .unwrap_or(0)
                } else {
                    row.iter().position(|&t| t == eos).unwrap_or(0)
                };
                p as u32
            })
            .collect();
        let idx = Tensor::from_vec(
            (0..b as u32)
                .zip(&pos)
                .map(|(i, &p)| i * l as u32 + p)
                .collect::<Vec<_>>(),
            b,
            last.device(),
        )?;
        let d = last.dim(2)?;
        Ok(last.reshape((b * l, d))?.index_select(&idx, 0)?)
    }

    /// transformers' `hidden_states`: the embeddings and each layer's output
    /// (num_hidden_layers + 1 tensors), without the final layer norm.
    pub fn all_hidden_states(&self, ids: &Tensor) -> Result<Vec<Tensor>> {
        self.run(ids, self.layers.len(), true)
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }
}

/// What every transformer encoder config (CLIP text and vision, ViT) must
/// satisfy: attention heads that divide the width, and at least one layer.
pub(crate) fn check_encoder_shape(
    hidden: usize,
    heads: usize,
    layers: usize,
) -> std::result::Result<(), String> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(format!(
            "hidden_size {hidden} does not split into {heads} attention heads"
        ));
    }
    if layers == 0 {
        return Err("num_hidden_layers must be positive".into());
    }
    Ok(())
}

/// A vision encoder's image must tile into whole patches.
pub(crate) fn check_patches(image: usize, patch: usize) -> std::result::Result<(), String> {
    if patch == 0 || !image.is_multiple_of(patch) {
        return Err(format!(
            "image_size {image} is not a multiple of patch_size {patch}"
        ));
    }
    Ok(())
}
