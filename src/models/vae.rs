//! diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py and vae.py):
//! the Stable Diffusion VAE that maps pixels in [-1, 1] to latents and back.
//!
//! Module paths equal diffusers' state-dict keys: `encoder.down_blocks.0.resnets.0.conv1`,
//! `encoder.mid_block.attentions.0.to_q`, `quant_conv`, `post_quant_conv`,
//! `decoder.up_blocks.1.upsamplers.0.conv`, ...
//!
//! Latents for the UNet are `(sample − shift_factor) · scaling_factor`; the
//! caller applies that (and its inverse before [`AutoencoderKL::decode`]).

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Deserializer};

use crate::models::attention::{Attention, AttentionConfig};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::nn::{Conv2d, GroupNorm, Vb, silu};
use crate::{Error, Result};

/// diffusers hard-codes this eps for every norm in the VAE.
const EPS: f64 = 1e-6;

fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_block_out() -> Vec<usize> {
    vec![64]
}
fn d_silu() -> String {
    "silu".into()
}
fn d_sample_size() -> usize {
    32
}
fn d_scaling() -> f64 {
    0.18215
}

/// `sample_size` is an int in SD configs; diffusers also allows `[h, w]`.
fn int_or_first<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Many(Vec<usize>),
    }
    Ok(match Size::deserialize(d)? {
        Size::One(v) => v,
        Size::Many(v) => v.first().copied().unwrap_or_else(d_sample_size),
    })
}

/// `vae/config.json` with `AutoencoderKL.__init__`'s defaults. `force_upcast`,
/// `latents_mean` / `latents_std` and other unknown fields are ignored.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct VaeConfig {
    #[serde(default = "super::serde_default::int::<3>")]
    pub in_channels: usize,
    #[serde(default = "super::serde_default::int::<3>")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "super::serde_default::int::<1>")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "super::serde_default::int::<4>")]
    pub latent_channels: usize,
    #[serde(default = "super::serde_default::int::<32>")]
    pub norm_num_groups: usize,
    #[serde(default = "d_sample_size", deserialize_with = "int_or_first")]
    pub sample_size: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "super::serde_default::yes")]
    pub use_quant_conv: bool,
    #[serde(default = "super::serde_default::yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "super::serde_default::yes")]
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all VaeConfig fields have defaults")
    }
}

impl VaeConfig {
    /// Reads and validates a diffusers `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::read_config(path, Self::validate)
    }

    /// Checks the config describes a VAE this crate builds; errors name `path`.
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
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return bad(format!(
                "unsupported down block type `{t}` (supported: DownEncoderBlock2D)"
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return bad(format!(
                "unsupported up block type `{t}` (supported: UpDecoderBlock2D)"
            ));
        }
        if self.act_fn != "silu" {
            return bad(format!(
                "unsupported act_fn `{}` (supported: silu)",
                self.act_fn
            ));
        }
        let g = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| g == 0 || !c.is_multiple_of(g))
        {
            return bad(format!(
                "{c} channels are not divisible into norm_num_groups = {g}"
            ));
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 {
            return bad("layers_per_block and latent_channels must be positive".into());
        }
        Ok(())
    }

    /// How many times smaller the latent is than the image (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, attention (one head
/// over all channels, group norm in front, residual), resnet.
#[derive(Clone, Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<Attention>,
}

impl VaeMidBlock {
    pub fn new(vb: &Vb, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let resnet = |i: usize| {
            ResnetBlock2D::new(
                &vb.pp("resnets").pp(i),
                channels,
                channels,
                None,
                groups,
                EPS,
                1.0,
            )
        };
        let attention = if add_attention {
            let cfg = AttentionConfig {
                query_dim: channels,
                cross_attention_dim: None,
                heads: 1,
                dim_head: channels,
                bias: true,
                norm_num_groups: Some((groups, EPS)),
                residual_connection: true,
            };
            Some(Attention::new(&vb.pp("attentions").pp(0), &cfg)?)
        } else {
            None
        };
        Ok(Self {
            resnets: vec![resnet(0)?, resnet(1)?],
            attention,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h, None)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// One `DownEncoderBlock2D` (or, in the decoder, `UpDecoderBlock2D`): resnets,
/// then an optional down- or upsampler.
#[derive(Clone, Debug)]
pub struct VaeBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
    pub upsampler: Option<Upsample2D>,
}

impl VaeBlock {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h)?;
        }
        Ok(h)
    }
}

fn resnets(
    vb: &Vb,
    n: usize,
    in_ch: usize,
    out_ch: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|j| {
            let c_in = if j == 0 { in_ch } else { out_ch };
            ResnetBlock2D::new(
                &vb.pp("resnets").pp(j),
                c_in,
                out_ch,
                None,
                groups,
                EPS,
                1.0,
            )
        })
        .collect()
}

/// diffusers' `Encoder`: pixels (B, in, H, W) → moments (B, 2·latent, H/f, W/f).
#[derive(Clone, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<VaeBlock>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: &Vb, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let last = *ch.last().unwrap();
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut out_ch = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = c;
            let vbi = vb.pp("down_blocks").pp(i);
            let downsampler = if i + 1 < ch.len() {
                Some(Downsample2D::new(
                    &vbi.pp("downsamplers").pp(0),
                    out_ch,
                    out_ch,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push(VaeBlock {
                resnets: resnets(&vbi, cfg.layers_per_block, in_ch, out_ch, g)?,
                downsampler,
                upsampler: None,
            });
        }
        Ok(Self {
            conv_in: Conv2d::new(&vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(&vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), g, last, EPS)?,
            conv_out: Conv2d::new(&vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        h = self.mid_block.forward(&h)?;
        self.conv_out
            .forward(&silu(&self.conv_norm_out.forward(&h)?)?)
    }
}

/// diffusers' `Decoder`: latents (B, latent, h, w) → pixels (B, out, h·f, w·f).
#[derive(Clone, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<VaeBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: &Vb, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut out_ch = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = c;
            let vbi = vb.pp("up_blocks").pp(i);
            let upsampler = if i + 1 < rev.len() {
                Some(Upsample2D::new(
                    &vbi.pp("upsamplers").pp(0),
                    out_ch,
                    out_ch,
                )?)
            } else {
                None
            };
            up_blocks.push(VaeBlock {
                resnets: resnets(&vbi, cfg.layers_per_block + 1, in_ch, out_ch, g)?,
                downsampler: None,
                upsampler,
            });
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: Conv2d::new(&vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?,
            mid_block: VaeMidBlock::new(
                &vb.pp("mid_block"),
                rev[0],
                g,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), g, first, EPS)?,
            conv_out: Conv2d::new(&vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        self.conv_out
            .forward(&silu(&self.conv_norm_out.forward(&h)?)?)
    }
}

/// The encoder's posterior: a diagonal Gaussian per latent element
/// (diffusers' `DiagonalGaussianDistribution`, deterministic = False).
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments (B, 2C, h, w) into mean and clamped log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// mean + std · noise, with `noise` standard normal of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (self.std()? * noise)?)?)
    }

    /// The distribution's mode (its mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    pub config: VaeConfig,
}

impl AutoencoderKL {
    pub fn new(vb: &Vb, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate(&vb.path())?;
        let l2 = 2 * cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(&vb.pp("quant_conv"), l2, l2, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            let l = cfg.latent_channels;
            Some(Conv2d::new(&vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(&vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(&vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    /// Pixels (B, C, H, W) in [-1, 1] → the latent posterior. H and W must be
    /// multiples of [`VaeConfig::downscale_factor`].
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let f = self.config.downscale_factor();
        let (_, _, h, w) = x.dims4()?;
        if !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            return Err(Error::msg(format!(
                "VAE input of {h}×{w} pixels: height and width must be multiples of {f}"
            )));
        }
        let mut moments = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents (B, latent, h, w) → pixels (B, out, h·f, w·f), about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// `shift_factor`, 0 when the config has none (all SD 1.x / 2.x VAEs).
    pub fn shift_factor(&self) -> f64 {
        self.config.shift_factor.unwrap_or(0.0)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}
