//! The VAE under `first_stage_model.`: LDM's `encoder.down.N.block.M` /
//! `decoder.up.N.block.M` / `mid.block_1, attn_1, block_2` ↔ diffusers'
//! `down_blocks` / `up_blocks` / `mid_block`, and the architecture read back
//! from the shapes.
//!
//! LDM numbers the decoder levels from the highest resolution, diffusers in the
//! order they run: `decoder.up.{n-1-i}` is `decoder.up_blocks.{i}`. The mid
//! attention's q/k/v/proj_out are 1×1 convs in LDM (`[C, C, 1, 1]`), linears in
//! diffusers (`[C, C]`).

use serde_json::json;

use super::keymap::{Inner, KeyMap, Rename, Transform, rename};
use super::{Family, Part};
use crate::diffusion::PredictionType;
use crate::models::vae::VaeConfig;
use crate::{Error, Result};

const RESNET: &[Rename] = &[
    rename("norm1", "norm1"),
    rename("conv1", "conv1"),
    rename("norm2", "norm2"),
    rename("conv2", "conv2"),
    rename("nin_shortcut", "conv_shortcut"),
];

const fn conv_as_linear(ldm: &'static str, diffusers: &'static str) -> Rename {
    Rename {
        ldm,
        diffusers,
        transform: Transform::ConvToLinear,
    }
}

const ATTENTION: &[Rename] = &[
    rename("norm", "group_norm"),
    conv_as_linear("q", "to_q"),
    conv_as_linear("k", "to_k"),
    conv_as_linear("v", "to_v"),
    conv_as_linear("proj_out", "to_out.0"),
];

/// The name table for a VAE of this config.
pub(crate) fn key_map(cfg: &VaeConfig) -> KeyMap {
    let n = cfg.block_out_channels.len();
    let per = cfg.layers_per_block;
    let mut m = KeyMap::default();
    for part in ["encoder", "decoder"] {
        m.push(
            format!("{part}.conv_in"),
            format!("{part}.conv_in"),
            Inner::Same,
        );
        m.push(
            format!("{part}.conv_out"),
            format!("{part}.conv_out"),
            Inner::Same,
        );
        m.push(
            format!("{part}.norm_out"),
            format!("{part}.conv_norm_out"),
            Inner::Same,
        );
        m.push(
            format!("{part}.mid.block_1"),
            format!("{part}.mid_block.resnets.0"),
            Inner::Renames(RESNET),
        );
        m.push(
            format!("{part}.mid.block_2"),
            format!("{part}.mid_block.resnets.1"),
            Inner::Renames(RESNET),
        );
        if cfg.mid_block_add_attention {
            m.push(
                format!("{part}.mid.attn_1"),
                format!("{part}.mid_block.attentions.0"),
                Inner::Renames(ATTENTION),
            );
        }
    }
    for i in 0..n {
        for j in 0..per {
            m.push(
                format!("encoder.down.{i}.block.{j}"),
                format!("encoder.down_blocks.{i}.resnets.{j}"),
                Inner::Renames(RESNET),
            );
        }
        if i + 1 < n {
            m.push(
                format!("encoder.down.{i}.downsample.conv"),
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                Inner::Same,
            );
        }
    }
    for i in 0..n {
        let level = n - 1 - i;
        for j in 0..=per {
            m.push(
                format!("decoder.up.{level}.block.{j}"),
                format!("decoder.up_blocks.{i}.resnets.{j}"),
                Inner::Renames(RESNET),
            );
        }
        if i + 1 < n {
            m.push(
                format!("decoder.up.{level}.upsample.conv"),
                format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                Inner::Same,
            );
        }
    }
    if cfg.use_quant_conv {
        m.push("quant_conv", "quant_conv", Inner::Same);
    }
    if cfg.use_post_quant_conv {
        m.push("post_quant_conv", "post_quant_conv", Inner::Same);
    }
    m
}

/// What the VAE's tensor shapes say about its architecture.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Detected {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_attention: bool,
}

pub(crate) fn detect(p: &Part) -> Result<Detected> {
    let conv_in = p.shape("encoder.conv_in.weight", 4)?;
    let n = p.count("encoder.down");
    if n == 0 {
        return Err(p.error(format!("no `{}encoder.down.N` blocks", p.prefix)));
    }
    let per = p.count("encoder.down.0.block");
    let block_out_channels = (0..n)
        .map(|i| Ok(p.shape(&format!("encoder.down.{i}.block.0.conv2.weight"), 4)?[0]))
        .collect::<Result<Vec<_>>>()?;
    Ok(Detected {
        in_channels: conv_in[1],
        out_channels: p.shape("decoder.conv_out.weight", 4)?[0],
        block_out_channels,
        layers_per_block: per,
        latent_channels: p.shape("decoder.conv_in.weight", 4)?[1],
        use_quant_conv: p.has("quant_conv.weight"),
        use_post_quant_conv: p.has("post_quant_conv.weight"),
        mid_attention: p.has("encoder.mid.attn_1.q.weight"),
    })
}

/// The diffusers config of a Stable Diffusion VAE with the detected shapes:
/// 32 norm groups, scaling factor 0.18215 (SD 1.x and 2.x; 0.13025 for XL),
/// sample size 512 (768 for an SD 2.x v-prediction model, 1024 for XL).
pub(crate) fn config(
    d: &Detected,
    family: Family,
    prediction: PredictionType,
) -> Result<VaeConfig> {
    let n = d.block_out_channels.len();
    let v768 = family == Family::Sd2 && prediction == PredictionType::VPrediction;
    let value = json!({
        "in_channels": d.in_channels,
        "out_channels": d.out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "block_out_channels": d.block_out_channels,
        "layers_per_block": d.layers_per_block,
        "latent_channels": d.latent_channels,
        "norm_num_groups": 32,
        "sample_size": match family {
            _ if v768 => 768,
            Family::Sdxl => 1024,
            _ => 512,
        },
        "scaling_factor": if family == Family::Sdxl { 0.13025 } else { 0.18215 },
        "use_quant_conv": d.use_quant_conv,
        "use_post_quant_conv": d.use_post_quant_conv,
        "mid_block_add_attention": d.mid_attention,
    });
    serde_json::from_value(value).map_err(|e| Error::msg(format!("building the VAE config: {e}")))
}

/// `vae/config.json` as diffusers writes it (the fields [`VaeConfig`] models).
pub(crate) fn config_json(c: &VaeConfig) -> serde_json::Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": c.down_block_types,
        "up_block_types": c.up_block_types,
        "block_out_channels": c.block_out_channels,
        "layers_per_block": c.layers_per_block,
        "act_fn": c.act_fn,
        "latent_channels": c.latent_channels,
        "norm_num_groups": c.norm_num_groups,
        "sample_size": c.sample_size,
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "use_quant_conv": c.use_quant_conv,
        "use_post_quant_conv": c.use_post_quant_conv,
        "mid_block_add_attention": c.mid_block_add_attention,
    })
}
