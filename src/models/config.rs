//! diffusers `unet/config.json`, deserialized with diffusers' defaults. Fields
//! we do not model are ignored when they hold their default value and are an
//! error naming the field otherwise.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// An int or a per-block list (`attention_head_dim`, `transformer_layers_per_block`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    pub fn expand(&self, n: usize) -> Vec<usize> {
        match self {
            PerBlock::One(v) => vec![*v; n],
            PerBlock::Many(v) => v.clone(),
        }
    }
}

fn d_sample_size() -> usize {
    64
}
fn d_channels() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_two() -> usize {
    2
}
fn d_one() -> usize {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> usize {
    1280
}
fn d_heads() -> PerBlock {
    PerBlock::One(8)
}
fn d_layers() -> PerBlock {
    PerBlock::One(1)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_three() -> usize {
    3
}

/// `UNet2DConditionModel` configuration (the SD 1.x / 2.x / XL subset).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UNetConfig {
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_two")]
    pub layers_per_block: usize,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    #[serde(default = "d_layers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL (`addition_embed_type: "text_time"`): the width of each of the six
    /// size / crop conditioning numbers' sinusoidal embedding.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: the input width of `add_embedding` (pooled text embeds + 6 ×
    /// `addition_time_embed_dim`).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub attention_type: Option<String>,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::read_config(path, Self::validate)
    }

    /// Heads per down block: diffusers reads `attention_head_dim` as the number
    /// of heads when `num_attention_heads` is unset (a naming quirk SD configs rely on).
    pub fn heads(&self) -> Vec<usize> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n),
            None => self.attention_head_dim.expand(n),
        }
    }

    pub fn transformer_layers(&self) -> Vec<usize> {
        self.transformer_layers_per_block
            .expand(self.block_out_channels.len())
    }

    pub fn groups(&self) -> usize {
        self.norm_num_groups.unwrap_or(32)
    }

    /// SDXL's micro-conditioning (`addition_embed_type: "text_time"`): the
    /// UNet also takes pooled text embeddings and six size / crop numbers.
    pub fn is_sdxl(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// SDXL: (per-number time embedding width, `add_embedding` input width).
    pub fn text_time_dims(&self) -> Option<(usize, usize)> {
        if !self.is_sdxl() {
            return None;
        }
        Some((
            self.addition_time_embed_dim?,
            self.projection_class_embeddings_input_dim?,
        ))
    }

    /// Checks the config describes a model this crate builds; the error names
    /// the file and the unsupported field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::config(path, msg));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!(
                    "unsupported down block type `{t}` (supported: CrossAttnDownBlock2D, DownBlock2D)"
                ));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!(
                    "unsupported up block type `{t}` (supported: CrossAttnUpBlock2D, UpBlock2D)"
                ));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | None => {}
            Some(t) => return bad(format!("unsupported mid_block_type `{t}`")),
        }
        for (name, v) in [
            ("heads", self.heads().len()),
            (
                "transformer_layers_per_block",
                self.transformer_layers().len(),
            ),
        ] {
            if v != n {
                return bad(format!("{name} has {v} entries, expected {n}"));
            }
        }
        for (i, (&c, &h)) in self
            .block_out_channels
            .iter()
            .zip(self.heads().iter())
            .enumerate()
        {
            if h == 0 || c % h != 0 {
                return bad(format!(
                    "block {i}: {c} channels do not split into {h} attention heads"
                ));
            }
        }
        if self.is_sdxl() {
            match self.text_time_dims() {
                None => {
                    return bad(
                        "addition_embed_type `text_time` (SDXL) needs addition_time_embed_dim \
                         and projection_class_embeddings_input_dim"
                            .into(),
                    );
                }
                Some((t, p)) if t == 0 || p <= 6 * t => {
                    return bad(format!(
                        "addition_time_embed_dim {t} must be positive and \
                         projection_class_embeddings_input_dim {p} larger than 6 × it \
                         (pooled text embeds + six time ids)"
                    ));
                }
                Some(_) => {}
            }
        }
        let unsupported = [
            ("act_fn", self.act_fn != "silu"),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            (
                "addition_embed_type",
                self.addition_embed_type.is_some() && !self.is_sdxl(),
            ),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "only_cross_attention",
                self.only_cross_attention.as_bool().unwrap_or(false)
                    || self.only_cross_attention.is_array(),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift != "default",
            ),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
            (
                "time_embedding_type",
                self.time_embedding_type != "positional",
            ),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_some(),
            ),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            ("center_input_sample", self.center_input_sample),
            (
                "attention_type",
                !matches!(self.attention_type.as_deref(), None | Some("default")),
            ),
            ("conv_in_kernel", self.conv_in_kernel.is_multiple_of(2)),
            ("conv_out_kernel", self.conv_out_kernel.is_multiple_of(2)),
        ];
        for (field, is_bad) in unsupported {
            if is_bad {
                return bad(format!(
                    "unsupported value for `{field}` (this crate builds SD 1.x/2.x/XL UNets)"
                ));
            }
        }
        Ok(())
    }
}
