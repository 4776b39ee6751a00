//! The UNet under `model.diffusion_model.`: LDM's `input_blocks` /
//! `middle_block` / `output_blocks` ↔ diffusers' `down_blocks` / `mid_block` /
//! `up_blocks`, and the architecture read back from the tensor shapes.
//!
//! LDM numbers the input blocks in one sequence: `input_blocks.0` is `conv_in`,
//! then each level has `layers_per_block` blocks of (resnet `.0`, attention
//! `.1`) and, except the last level, one downsampler `.0.op`. The output blocks
//! have `layers_per_block + 1` per level, the last one of a level carrying the
//! upsampler's `conv` at slot `.1`, or `.2` after an attention.

use serde_json::json;

use super::keymap::{Inner, KeyMap, Rename, rename};
use super::{Family, Part};
use crate::diffusion::PredictionType;
use crate::models::UNetConfig;
use crate::{Error, Result};

/// LDM `ResBlock` (`in_layers = [norm, SiLU, conv]`, `out_layers = [norm, SiLU,
/// dropout, conv]`) ↔ diffusers `ResnetBlock2D`.
const RESNET: &[Rename] = &[
    rename("in_layers.0", "norm1"),
    rename("in_layers.2", "conv1"),
    rename("emb_layers.1", "time_emb_proj"),
    rename("out_layers.0", "norm2"),
    rename("out_layers.3", "conv2"),
    rename("skip_connection", "conv_shortcut"),
];

/// The name table for a UNet of this config. Attention blocks
/// (`Transformer2DModel`: norm, proj_in, transformer_blocks.N..., proj_out)
/// keep their names.
pub(crate) fn key_map(cfg: &UNetConfig) -> KeyMap {
    let n = cfg.block_out_channels.len();
    let per = cfg.layers_per_block;
    let down_attn = |i: usize| cfg.down_block_types[i] == "CrossAttnDownBlock2D";
    let up_attn = |i: usize| cfg.up_block_types[i] == "CrossAttnUpBlock2D";
    let mut m = KeyMap::default();
    m.push("time_embed.0", "time_embedding.linear_1", Inner::Same);
    m.push("time_embed.2", "time_embedding.linear_2", Inner::Same);
    if cfg.is_sdxl() {
        m.push("label_emb.0.0", "add_embedding.linear_1", Inner::Same);
        m.push("label_emb.0.2", "add_embedding.linear_2", Inner::Same);
    }
    m.push("input_blocks.0.0", "conv_in", Inner::Same);
    for i in 0..n {
        let first = 1 + i * (per + 1);
        for j in 0..per {
            let b = first + j;
            m.push(
                format!("input_blocks.{b}.0"),
                format!("down_blocks.{i}.resnets.{j}"),
                Inner::Renames(RESNET),
            );
            if down_attn(i) {
                m.push(
                    format!("input_blocks.{b}.1"),
                    format!("down_blocks.{i}.attentions.{j}"),
                    Inner::Same,
                );
            }
        }
        if i + 1 < n {
            m.push(
                format!("input_blocks.{}.0.op", first + per),
                format!("down_blocks.{i}.downsamplers.0.conv"),
                Inner::Same,
            );
        }
    }
    if cfg.mid_block_type.is_some() {
        m.push(
            "middle_block.0",
            "mid_block.resnets.0",
            Inner::Renames(RESNET),
        );
        m.push("middle_block.1", "mid_block.attentions.0", Inner::Same);
        m.push(
            "middle_block.2",
            "mid_block.resnets.1",
            Inner::Renames(RESNET),
        );
    }
    for i in 0..n {
        let first = i * (per + 1);
        for j in 0..=per {
            let b = first + j;
            m.push(
                format!("output_blocks.{b}.0"),
                format!("up_blocks.{i}.resnets.{j}"),
                Inner::Renames(RESNET),
            );
            if up_attn(i) {
                m.push(
                    format!("output_blocks.{b}.1"),
                    format!("up_blocks.{i}.attentions.{j}"),
                    Inner::Same,
                );
            }
        }
        if i + 1 < n {
            let slot = if up_attn(i) { 2 } else { 1 };
            m.push(
                format!("output_blocks.{}.{slot}.conv", first + per),
                format!("up_blocks.{i}.upsamplers.0.conv"),
                Inner::Same,
            );
        }
    }
    m.push("out.0", "conv_norm_out", Inner::Same);
    m.push("out.2", "conv_out", Inner::Same);
    m
}

/// What the UNet's tensor shapes say about its architecture.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Detected {
    pub in_channels: usize,
    pub out_channels: usize,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_attention: Vec<bool>,
    pub up_attention: Vec<bool>,
    pub mid_attention: bool,
    /// Transformer blocks per attention, per level (1 where a level has none).
    pub transformer_layers: Vec<usize>,
    pub cross_attention_dim: Option<usize>,
    pub use_linear_projection: bool,
    /// SDXL: the input width of `label_emb.0.0` (`add_embedding.linear_1`).
    pub label_emb_in: Option<usize>,
}

/// One input block: a resnet (its output channels, attention depth if any) or a downsampler.
enum InputBlock {
    Resnet {
        channels: usize,
        depth: Option<usize>,
    },
    Downsample,
}

/// Transformer blocks of the attention at `prefix` (`input_blocks.1.1`), if there is one.
fn attention_depth(p: &Part, prefix: &str) -> Option<usize> {
    p.has(&format!("{prefix}.proj_in.weight"))
        .then(|| p.count(&format!("{prefix}.transformer_blocks")))
}

pub(crate) fn detect(p: &Part) -> Result<Detected> {
    let conv_in = p.shape("input_blocks.0.0.weight", 4)?;
    let conv_out = p.shape("out.2.weight", 4)?;
    let n_in = p.count("input_blocks");
    let mut levels: Vec<Vec<(usize, Option<usize>)>> = vec![Vec::new()];
    for b in 1..n_in {
        let block = if p.has(&format!("input_blocks.{b}.0.op.weight")) {
            InputBlock::Downsample
        } else if p.has(&format!("input_blocks.{b}.0.in_layers.0.weight")) {
            InputBlock::Resnet {
                channels: p.shape(&format!("input_blocks.{b}.0.out_layers.3.weight"), 4)?[0],
                depth: attention_depth(p, &format!("input_blocks.{b}.1")),
            }
        } else {
            return Err(p.error(format!(
                "`{}input_blocks.{b}` is neither a resnet block (`.0.in_layers`) nor a downsampler (`.0.op`)",
                p.prefix
            )));
        };
        match block {
            InputBlock::Downsample => levels.push(Vec::new()),
            InputBlock::Resnet { channels, depth } => {
                levels.last_mut().unwrap().push((channels, depth))
            }
        }
    }
    let per = levels[0].len();
    if per == 0 || levels.iter().any(|l| l.len() != per) {
        let counts: Vec<usize> = levels.iter().map(|l| l.len()).collect();
        return Err(p.error(format!(
            "the UNet's levels have {counts:?} resnet blocks; a diffusers UNet has the same number in every level"
        )));
    }
    let n = levels.len();
    let n_out = p.count("output_blocks");
    if n_out != n * (per + 1) {
        return Err(p.error(format!(
            "the UNet has {n_out} output blocks; {n} levels of {per} resnets need {}",
            n * (per + 1)
        )));
    }
    let mid_depth = if p.has("middle_block.0.in_layers.0.weight") {
        match attention_depth(p, "middle_block.1") {
            Some(d) => Some(d),
            None => {
                return Err(p.error(
                    "the UNet's middle block has no attention (only UNetMidBlock2DCrossAttn is supported)".into(),
                ));
            }
        }
    } else {
        None
    };
    let down_attention: Vec<bool> = levels.iter().map(|l| l[0].1.is_some()).collect();
    let transformer_layers = (0..n)
        .map(|i| match levels[i][0].1 {
            Some(d) => d,
            None if i + 1 == n => mid_depth.unwrap_or(1),
            None => 1,
        })
        .collect();
    let up_attention = (0..n)
        .map(|i| p.has(&format!("output_blocks.{}.1.proj_in.weight", i * (per + 1))))
        .collect();
    let cross_attention_dim = p
        .keys()
        .find(|k| k.ends_with("attn2.to_k.weight"))
        .and_then(|k| p.shapes.get(k))
        .and_then(|s| s.get(1).copied());
    let use_linear_projection = p
        .keys()
        .find(|k| k.ends_with(".proj_in.weight"))
        .and_then(|k| p.shapes.get(k))
        .is_some_and(|s| s.len() == 2);
    Ok(Detected {
        in_channels: conv_in[1],
        out_channels: conv_out[0],
        conv_in_kernel: conv_in[2],
        conv_out_kernel: conv_out[2],
        block_out_channels: levels.iter().map(|l| l[0].0).collect(),
        layers_per_block: per,
        down_attention,
        up_attention,
        mid_attention: mid_depth.is_some(),
        transformer_layers,
        cross_attention_dim,
        use_linear_projection,
        label_emb_in: p
            .has("label_emb.0.0.weight")
            .then(|| p.shape("label_emb.0.0.weight", 2).map(|s| s[1]))
            .transpose()?,
    })
}

/// The diffusers config of a Stable Diffusion UNet with the detected shapes.
/// What the weights do not hold is SD's: 32 norm groups; 8 heads per block for
/// SD 1.x, heads of 64 channels for SD 2.x and XL; sample size 64 (96 for an
/// SD 2.x v-prediction model, the 768×768 one; 128 for XL); attention upcast
/// for SD 2.x v-models; for XL, time ids embedded in 256 channels each.
pub(crate) fn config(
    d: &Detected,
    family: Family,
    prediction: PredictionType,
) -> Result<UNetConfig> {
    let heads: Vec<usize> = d
        .block_out_channels
        .iter()
        .map(|&c| match family {
            Family::Sd1 if c.is_multiple_of(8) => 8,
            Family::Sd2 | Family::Sdxl if c.is_multiple_of(64) => c / 64,
            _ => 1,
        })
        .collect();
    let heads = match family {
        Family::Sd1 if heads.iter().all(|&h| h == heads[0]) => json!(heads[0]),
        _ => json!(heads),
    };
    let layers = &d.transformer_layers;
    let layers = if layers.iter().all(|&l| l == layers[0]) {
        json!(layers[0])
    } else {
        json!(layers)
    };
    let v768 = family == Family::Sd2 && prediction == PredictionType::VPrediction;
    let down: Vec<&str> = d
        .down_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = d
        .up_attention
        .iter()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    let cross = d.cross_attention_dim.unwrap_or(match family {
        Family::Sd1 => 768,
        Family::Sd2 => 1024,
        Family::Sdxl => 2048,
    });
    let sample_size = match family {
        _ if v768 => 96,
        Family::Sdxl => 128,
        _ => 64,
    };
    let mut value = json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": d.in_channels,
        "out_channels": d.out_channels,
        "conv_in_kernel": d.conv_in_kernel,
        "conv_out_kernel": d.conv_out_kernel,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": if d.mid_attention { Some("UNetMidBlock2DCrossAttn") } else { None },
        "block_out_channels": d.block_out_channels,
        "layers_per_block": d.layers_per_block,
        "cross_attention_dim": cross,
        "attention_head_dim": heads,
        "transformer_layers_per_block": layers,
        "use_linear_projection": d.use_linear_projection,
        "upcast_attention": v768,
        "norm_num_groups": 32,
    });
    if let Some(in_dim) = d.label_emb_in {
        value["addition_embed_type"] = json!("text_time");
        value["addition_time_embed_dim"] = json!(256);
        value["projection_class_embeddings_input_dim"] = json!(in_dim);
    }
    serde_json::from_value(value).map_err(|e| Error::msg(format!("building the UNet config: {e}")))
}
