//! The text encoder under `cond_stage_model.`, in one of two layouts:
//!
//! - SD 1.x, `cond_stage_model.transformer.text_model.*`: transformers'
//!   `CLIPTextModel`, the same names as diffusers' `text_encoder/` below
//!   `text_model.` (some old files lack the `text_model.` level; it is added).
//! - SD 2.x, `cond_stage_model.model.*`: OpenCLIP's text tower —
//!   `token_embedding.weight`, `positional_embedding`,
//!   `transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v stacked),
//!   attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`.
//!   SD 2.x conditions on the penultimate layer, so diffusers' text encoder has
//!   one layer fewer than the file: the last resblock is dropped on load.
//! - SDXL, `conditioner.embedders.0.transformer.text_model.*` (CLIP, as SD 1.x)
//!   and `conditioner.embedders.1.model.*` (OpenCLIP, as SD 2.x, every layer
//!   used, and `text_projection` — OpenCLIP's `x @ P` — transposed into
//!   `CLIPTextModelWithProjection`'s `text_projection.weight`).

use serde_json::json;

use super::keymap::{Inner, KeyMap, Rename, Transform, rename};
use super::{Family, Part};
use crate::models::clip_text::ClipTextConfig;
use crate::{Error, Result};

const fn qkv(ldm: &'static str, diffusers: &'static str, part: usize) -> Rename {
    Rename {
        ldm,
        diffusers,
        transform: Transform::Chunk(part),
    }
}

/// OpenCLIP `ResidualAttentionBlock` ↔ transformers `CLIPEncoderLayer`.
const OPENCLIP_LAYER: &[Rename] = &[
    rename("ln_1", "layer_norm1"),
    rename("ln_2", "layer_norm2"),
    rename("attn.out_proj", "self_attn.out_proj"),
    rename("mlp.c_fc", "mlp.fc1"),
    rename("mlp.c_proj", "mlp.fc2"),
    qkv("attn.in_proj_weight", "self_attn.q_proj.weight", 0),
    qkv("attn.in_proj_weight", "self_attn.k_proj.weight", 1),
    qkv("attn.in_proj_weight", "self_attn.v_proj.weight", 2),
    qkv("attn.in_proj_bias", "self_attn.q_proj.bias", 0),
    qkv("attn.in_proj_bias", "self_attn.k_proj.bias", 1),
    qkv("attn.in_proj_bias", "self_attn.v_proj.bias", 2),
];

/// OpenCLIP tensors Stable Diffusion does not use (the contrastive head).
pub(crate) const OPENCLIP_UNUSED: [&str; 2] = ["text_projection", "logit_scale"];

/// The name table of an SD 1.x (CLIP layout) text encoder; keys carry `text_model.`.
pub(crate) fn clip_key_map(cfg: &ClipTextConfig) -> KeyMap {
    let mut m = KeyMap::default();
    for name in [
        "embeddings.token_embedding",
        "embeddings.position_embedding",
        "final_layer_norm",
    ] {
        m.push(
            format!("text_model.{name}"),
            format!("text_model.{name}"),
            Inner::Same,
        );
    }
    for i in 0..cfg.num_hidden_layers {
        let name = format!("text_model.encoder.layers.{i}");
        m.push(name.clone(), name, Inner::Same);
    }
    m
}

/// SDXL's second text encoder: the OpenCLIP table and its projection.
pub(crate) fn openclip_projection_key_map(cfg: &ClipTextConfig) -> KeyMap {
    let mut m = openclip_key_map(cfg);
    m.push(
        "text_projection",
        "text_projection.weight",
        Inner::Renames(&[Rename {
            ldm: "",
            diffusers: "",
            transform: Transform::Transpose,
        }]),
    );
    m
}

/// The name table of an SD 2.x (OpenCLIP layout) text encoder.
pub(crate) fn openclip_key_map(cfg: &ClipTextConfig) -> KeyMap {
    let mut m = KeyMap::default();
    m.push(
        "token_embedding",
        "text_model.embeddings.token_embedding",
        Inner::Same,
    );
    m.push(
        "positional_embedding",
        "text_model.embeddings.position_embedding.weight",
        Inner::Same,
    );
    m.push("ln_final", "text_model.final_layer_norm", Inner::Same);
    for i in 0..cfg.num_hidden_layers {
        m.push(
            format!("transformer.resblocks.{i}"),
            format!("text_model.encoder.layers.{i}"),
            Inner::Renames(OPENCLIP_LAYER),
        );
    }
    m
}

/// What the text encoder's shapes say about it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Detected {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub max_position_embeddings: usize,
    pub intermediate_size: usize,
    /// Transformer layers stored in the file (SD 2.x files hold one unused layer).
    pub layers_in_file: usize,
}

pub(crate) fn detect(p: &Part, family: Family) -> Result<Detected> {
    let (tok, pos, layers, fc1) = match family {
        Family::Sd1 | Family::Sdxl => (
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers",
            "text_model.encoder.layers.0.mlp.fc1.weight",
        ),
        Family::Sd2 => (
            "token_embedding.weight",
            "positional_embedding",
            "transformer.resblocks",
            "transformer.resblocks.0.mlp.c_fc.weight",
        ),
    };
    let tok = p.shape(tok, 2)?;
    Ok(Detected {
        vocab_size: tok[0],
        hidden_size: tok[1],
        max_position_embeddings: p.shape(pos, 2)?[0],
        intermediate_size: p.shape(fc1, 2)?[0],
        layers_in_file: p.count(layers),
    })
}

/// Layers the text encoder uses when the file does not say: all of them for
/// SD 1.x; for SD 2.x all but the last (real SD 2.x files hold the 24 layers of
/// OpenCLIP ViT-H/14 and condition on the 23rd; files this crate writes hold
/// an identity layer after the used ones), except that a 23-layer file —
/// exported by diffusers' conversion script, which drops the unused layer — uses all 23.
pub(crate) fn used_layers(family: Family, layers_in_file: usize) -> usize {
    match family {
        Family::Sd1 | Family::Sdxl => layers_in_file,
        Family::Sd2 if layers_in_file == 23 => 23,
        Family::Sd2 => layers_in_file.saturating_sub(1),
    }
}

/// The transformers config of the detected text encoder: heads of 64 channels,
/// SD 1.x's quick_gelu or SD 2.x's gelu, pad id of the pipeline's tokenizer.
pub(crate) fn config(d: &Detected, family: Family) -> Result<ClipTextConfig> {
    let h = d.hidden_size;
    let heads = if h.is_multiple_of(64) { h / 64 } else { 1 };
    let (act, projection_dim, pad) = match family {
        Family::Sd1 | Family::Sdxl => ("quick_gelu", 768, 49407),
        Family::Sd2 => ("gelu", 512, 0),
    };
    let value = json!({
        "vocab_size": d.vocab_size,
        "hidden_size": h,
        "intermediate_size": d.intermediate_size,
        "num_hidden_layers": used_layers(family, d.layers_in_file),
        "num_attention_heads": heads,
        "max_position_embeddings": d.max_position_embeddings,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim,
        "pad_token_id": pad,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    });
    serde_json::from_value(value)
        .map_err(|e| Error::msg(format!("building the text encoder config: {e}")))
}

/// SDXL's second text encoder from the OpenCLIP tensors' shapes: every
/// layer used, gelu, heads of 64 channels, pad id 0 (`!`), the projection's width.
pub(crate) fn config_2(p: &Part) -> Result<ClipTextConfig> {
    let d = detect(p, Family::Sd2)?;
    let proj = p.shape("text_projection", 2)?[1];
    let mut cfg = config(&d, Family::Sd2)?;
    cfg.num_hidden_layers = d.layers_in_file;
    cfg.projection_dim = proj;
    Ok(cfg)
}

/// `text_encoder/config.json` as transformers writes it (the fields [`ClipTextConfig`] models).
pub(crate) fn config_json(c: &ClipTextConfig) -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps,
        "projection_dim": c.projection_dim,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
    })
}
