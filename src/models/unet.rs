//! diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x, 2.x and XL:
//! ε̂ (or v̂) = UNet(noisy latents, per-sample timesteps, text context), and for
//! SDXL also the pooled text embeddings and six size / crop numbers
//! ([`AddedCond`], diffusers' `added_cond_kwargs`).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::config::UNetConfig;
use super::unet_blocks::{BlockAttn, BlockCommon, DownBlock, MidBlock, UpBlock};
use crate::Result;
use crate::nn::checkpoint::Checkpointing;
use crate::nn::{Conv2d, GroupNorm, Linear, Vb, silu, timestep_embedding};

/// `TimestepEmbedding`: linear_1 → SiLU → linear_2.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: &Vb, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(&vb.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::new(&vb.pp("linear_2"), dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(x)?)?)
    }
}

/// SDXL's extra conditioning (diffusers' `added_cond_kwargs`).
#[derive(Clone, Debug)]
pub struct AddedCond {
    /// (B, projection_dim): the second text encoder's pooled, projected output.
    pub text_embeds: Tensor,
    /// (B, 6): original height, width, crop top, crop left, target height, width.
    pub time_ids: Tensor,
}

impl AddedCond {
    /// The same `time_ids` (original size, crop top-left, target size) for
    /// every row of `text_embeds`.
    pub fn new(text_embeds: &Tensor, time_ids: [f32; 6]) -> Result<Self> {
        let b = text_embeds.dim(0)?;
        let ids = Tensor::from_slice(&time_ids, (1, 6), text_embeds.device())?.repeat((b, 1))?;
        Ok(Self {
            text_embeds: text_embeds.clone(),
            time_ids: ids,
        })
    }
}

/// What a UNet call is conditioned on: the text context (B, L, D) and, for
/// SDXL, the added conditioning.
#[derive(Clone, Copy, Debug)]
pub struct UNetCond<'a> {
    pub context: &'a Tensor,
    pub added: Option<&'a AddedCond>,
}

/// SDXL's `add_time_proj` + `add_embedding`: each time id's sinusoidal
/// embedding, concatenated after the pooled text embeds, through an MLP.
#[derive(Clone, Debug)]
pub struct TextTimeEmbedding {
    pub add_embedding: TimestepEmbedding,
    pub time_dim: usize,
}

impl TextTimeEmbedding {
    /// (B, time_embed_dim), added to the timestep embedding.
    fn forward(&self, cfg: &UNetConfig, added: &AddedCond, like: &Tensor) -> Result<Tensor> {
        let b = added.text_embeds.dim(0)?;
        let ids = added.time_ids.flatten_all()?;
        if ids.elem_count() != b * 6 {
            return Err(crate::Error::msg(format!(
                "SDXL time_ids have shape {:?}, expected ({b}, 6)",
                added.time_ids.dims()
            )));
        }
        let t = timestep_embedding(&ids, self.time_dim, cfg.flip_sin_to_cos, cfg.freq_shift)?
            .reshape((b, ()))?;
        let text = added.text_embeds.to_dtype(t.dtype())?;
        let x = Tensor::cat(&[&text, &t], 1)?;
        self.add_embedding
            .forward(&crate::nn::precision::like(&x, like)?)
    }
}

#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    /// SDXL's micro-conditioning embedding (`addition_embed_type: "text_time"`).
    pub add_embedding: Option<TextTimeEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// Gradient checkpointing of every resnet and transformer, set by
    /// [`with_gradient_checkpointing`](Self::with_gradient_checkpointing).
    pub checkpointing: Option<Arc<Checkpointing>>,
}

impl UNet2DConditionModel {
    pub fn new(vb: &Vb, config: &UNetConfig) -> Result<Self> {
        config.validate(&vb.path())?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let heads = config.heads();
        let layers = config.transformer_layers();
        let temb = boc[0] * 4;
        let common = BlockCommon {
            temb_channels: temb,
            groups: config.groups(),
            eps: config.norm_eps,
            cross_attention_dim: config.cross_attention_dim,
            use_linear_projection: config.use_linear_projection,
            output_scale_factor: config.resnet_out_scale_factor,
        };
        let k_in = config.conv_in_kernel;
        let conv_in = Conv2d::new(
            &vb.pp("conv_in"),
            config.in_channels,
            boc[0],
            k_in,
            1,
            k_in / 2,
        )?;
        let time_embedding = TimestepEmbedding::new(&vb.pp("time_embedding"), boc[0], temb)?;
        let add_embedding = match config.text_time_dims() {
            Some((time_dim, in_dim)) => Some(TextTimeEmbedding {
                add_embedding: TimestepEmbedding::new(&vb.pp("add_embedding"), in_dim, temb)?,
                time_dim,
            }),
            None => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, ty) in config.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let attn = (ty == "CrossAttnDownBlock2D").then_some(BlockAttn {
                heads: heads[i],
                layers: layers[i],
            });
            down_blocks.push(DownBlock::new(
                &vb.pp("down_blocks").pp(i),
                &common,
                in_ch,
                out_ch,
                config.layers_per_block,
                attn,
                i + 1 < n,
                config.downsample_padding,
            )?);
        }

        let mid_block = match config.mid_block_type {
            Some(_) => Some(MidBlock::new(
                &vb.pp("mid_block"),
                &BlockCommon {
                    output_scale_factor: config.mid_block_scale_factor,
                    ..common
                },
                boc[n - 1],
                BlockAttn {
                    heads: heads[n - 1],
                    layers: layers[n - 1],
                },
            )?),
            None => None,
        };

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rev[0];
        for (i, ty) in config.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let attn = (ty == "CrossAttnUpBlock2D").then_some(BlockAttn {
                heads: rev_heads[i],
                layers: rev_layers[i],
            });
            up_blocks.push(UpBlock::new(
                &vb.pp("up_blocks").pp(i),
                &common,
                in_ch,
                out_ch,
                prev_out,
                config.layers_per_block + 1,
                attn,
                i + 1 < n,
            )?);
        }
        let k_out = config.conv_out_kernel;
        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vb.pp("conv_norm_out"),
                config.groups(),
                boc[0],
                config.norm_eps,
            )?,
            conv_out: Conv2d::new(
                &vb.pp("conv_out"),
                boc[0],
                config.out_channels,
                k_out,
                1,
                k_out / 2,
            )?,
            checkpointing: None,
        })
    }

    /// This UNet (sharing its weights) with every resnet and every
    /// transformer (`Transformer2DModel`) checkpointed: a training step keeps
    /// only their inputs and
    /// recomputes the rest in the backward pass (diffusers'
    /// `enable_gradient_checkpointing`). Take the gradients with
    /// [`Checkpointing::backward`].
    pub fn with_gradient_checkpointing(&self, checkpointing: &Arc<Checkpointing>) -> Self {
        Self {
            checkpointing: Some(checkpointing.clone()),
            ..self.clone()
        }
    }

    /// Loads `unet/` of a diffusers folder (config.json + weights).
    pub fn load(dir: &Path, device: &Device, trainable: bool) -> Result<(Self, Vb)> {
        Self::load_in(dir, device, trainable, candle_core::DType::F32)
    }

    /// [`Self::load`] with the weights held in `dtype` (f32, or f16 / bf16 for
    /// a frozen UNet, which then computes in it), cast tensor by tensor as
    /// they are read ([`Vb::from_file_in`]).
    pub fn load_in(
        dir: &Path,
        device: &Device,
        trainable: bool,
        dtype: candle_core::DType,
    ) -> Result<(Self, Vb)> {
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let vb = Vb::from_file_in(&super::load::weights_file(dir)?, device, trainable, dtype)?;
        let model = Self::new(&vb, &config)?;
        vb.finish()?;
        Ok((model, vb))
    }

    /// `sample` (B, C, H, W); `timesteps` (B,) f32, one per sample (fractional
    /// values allowed); `context` (B, L, cross_attention_dim). The layers
    /// compute in `sample`'s dtype (f32, or bf16 / f16 for mixed precision:
    /// [`crate::nn::precision`]); the output has that dtype.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_added(sample, timesteps, context, None)
    }

    /// [`forward`](Self::forward) with SDXL's extra conditioning, which an SDXL
    /// UNet needs and any other refuses.
    pub fn forward_added(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        let timesteps = if timesteps.elem_count() == 1 && b > 1 {
            timesteps.reshape(1)?.repeat(b)?
        } else {
            timesteps.clone()
        };
        let t_emb = timestep_embedding(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?;
        // Mixed precision: the model computes in the sample's dtype
        // (diffusers: `t_emb.to(dtype=sample.dtype)`).
        let t_emb = crate::nn::precision::like(&t_emb, sample)?;
        let context = &crate::nn::precision::like(context, sample)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        match (&self.add_embedding, added) {
            (Some(a), Some(added)) => {
                emb = (emb + a.forward(&self.config, added, sample)?)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(crate::Error::msg(
                    "this UNet is SDXL's: it needs pooled text embeddings and time ids \
                     (added_cond_kwargs) besides the text context",
                ));
            }
            (None, Some(_)) => {
                return Err(crate::Error::msg(
                    "pooled text embeddings and time ids were given to a UNet without \
                     addition_embed_type `text_time` (only SDXL's takes them)",
                ));
            }
        }
        let ck = self.checkpointing.as_ref();

        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(&h, &emb, context, ck)?;
            h = out;
            skips.extend(s);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb, context, ck)?;
        }
        for block in &self.up_blocks {
            h = block.forward(&h, &mut skips, &emb, context, ck)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
