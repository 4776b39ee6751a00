//! The UNet's down, mid and up blocks (diffusers `unet_2d_blocks.py`):
//! `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` / `UpBlock2D`.

use std::sync::Arc;

use candle_core::Tensor;

use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerConfig};
use crate::Result;
use crate::nn::Vb;
use crate::nn::checkpoint::{self, Checkpointing};

/// What every block of one UNet shares.
#[derive(Clone, Copy, Debug)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub output_scale_factor: f64,
}

impl BlockCommon {
    fn resnet(&self, vb: &Vb, in_ch: usize, out_ch: usize) -> Result<ResnetBlock2D> {
        ResnetBlock2D::new(
            vb,
            in_ch,
            out_ch,
            Some(self.temb_channels),
            self.groups,
            self.eps,
            self.output_scale_factor,
        )
    }

    fn transformer(
        &self,
        vb: &Vb,
        ch: usize,
        heads: usize,
        layers: usize,
    ) -> Result<Transformer2DModel> {
        Transformer2DModel::new(
            vb,
            &TransformerConfig {
                in_channels: ch,
                heads,
                dim_head: ch / heads,
                num_layers: layers,
                cross_attention_dim: self.cross_attention_dim,
                norm_num_groups: self.groups,
                use_linear_projection: self.use_linear_projection,
            },
        )
    }
}

/// Attention settings of a block: None for the plain (resnet-only) variants.
#[derive(Clone, Copy, Debug)]
pub struct BlockAttn {
    pub heads: usize,
    pub layers: usize,
}

/// A resnet with the time embedding, checkpointed when `ck` is on.
fn resnet_forward(
    resnet: &ResnetBlock2D,
    x: &Tensor,
    temb: &Tensor,
    ck: Option<&Arc<Checkpointing>>,
) -> Result<Tensor> {
    let r = resnet.clone();
    checkpoint::run(ck, x, Some(temb), move |x, t| r.forward(x, t))
}

/// A transformer with the text, checkpointed as a whole when `ck` is on:
/// diffusers checkpoints its transformer blocks, which leaves the group
/// norm, the projections and the residual's activations held (about 40% of
/// what a checkpointed SD 1.5 step keeps at 512 px).
fn transformer_forward(
    attn: &Transformer2DModel,
    x: &Tensor,
    context: &Tensor,
    ck: Option<&Arc<Checkpointing>>,
) -> Result<Tensor> {
    let a = attn.clone();
    checkpoint::run_with(ck, x, context, move |x, c| a.forward(x, c))
}

#[derive(Clone, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: &Vb,
        common: &BlockCommon,
        in_ch: usize,
        out_ch: usize,
        num_layers: usize,
        attn: Option<BlockAttn>,
        add_downsample: bool,
        downsample_padding: usize,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let c_in = if i == 0 { in_ch } else { out_ch };
            resnets.push(common.resnet(&vb.pp("resnets").pp(i), c_in, out_ch)?);
            if let Some(a) = attn {
                attentions.push(common.transformer(
                    &vb.pp("attentions").pp(i),
                    out_ch,
                    a.heads,
                    a.layers,
                )?);
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                &vb.pp("downsamplers").pp(0),
                out_ch,
                out_ch,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the skip connections it contributes.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ck: Option<&Arc<Checkpointing>>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::new();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet_forward(resnet, &h, temb, ck)?;
            if let Some(attn) = self.attentions.get(i) {
                h = transformer_forward(attn, &h, context, ck)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(vb: &Vb, common: &BlockCommon, ch: usize, attn: BlockAttn) -> Result<Self> {
        Ok(Self {
            resnets: vec![
                common.resnet(&vb.pp("resnets").pp(0), ch, ch)?,
                common.resnet(&vb.pp("resnets").pp(1), ch, ch)?,
            ],
            attentions: vec![common.transformer(
                &vb.pp("attentions").pp(0),
                ch,
                attn.heads,
                attn.layers,
            )?],
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ck: Option<&Arc<Checkpointing>>,
    ) -> Result<Tensor> {
        let h = resnet_forward(&self.resnets[0], x, temb, ck)?;
        let h = transformer_forward(&self.attentions[0], &h, context, ck)?;
        resnet_forward(&self.resnets[1], &h, temb, ck)
    }
}

#[derive(Clone, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `in_ch`: channels of the matching down block's input; `prev_out`: channels
    /// coming from the block below. Resnet j sees its skip concatenated.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: &Vb,
        common: &BlockCommon,
        in_ch: usize,
        out_ch: usize,
        prev_out: usize,
        num_layers: usize,
        attn: Option<BlockAttn>,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let skip = if i == num_layers - 1 { in_ch } else { out_ch };
            let c_in = if i == 0 { prev_out } else { out_ch };
            resnets.push(common.resnet(&vb.pp("resnets").pp(i), c_in + skip, out_ch)?);
            if let Some(a) = attn {
                attentions.push(common.transformer(
                    &vb.pp("attentions").pp(i),
                    out_ch,
                    a.heads,
                    a.layers,
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(&vb.pp("upsamplers").pp(0), out_ch, out_ch)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Consumes skips from the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        ck: Option<&Arc<Checkpointing>>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| crate::Error::msg("UNet: ran out of skip connections"))?;
            h = crate::nn::layout::cat_channels(&h, &skip)?;
            h = resnet_forward(resnet, &h, temb, ck)?;
            if let Some(attn) = self.attentions.get(i) {
                h = transformer_forward(attn, &h, context, ck)?;
            }
        }
        if let Some(u) = &self.upsampler {
            // Upsample to the next skip's size: 2× when the latent divides by
            // 2^levels, otherwise diffusers' `upsample_size` behaviour.
            h = match skips.last() {
                Some(next) => {
                    let (_, _, sh, sw) = next.dims4()?;
                    u.forward_to(&h, (sh, sw))?
                }
                None => u.forward(&h)?,
            };
        }
        Ok(h)
    }
}
