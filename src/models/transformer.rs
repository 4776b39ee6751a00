//! diffusers' `Transformer2DModel` (continuous input) and its
//! `BasicTransformerBlock`: self-attention, cross-attention to the text, GEGLU
//! feed-forward, each behind a LayerNorm with a residual.

use candle_core::Tensor;

use super::attention::{Attention, AttentionConfig};
use crate::Result;
use crate::nn::layout::{map_to_tokens, tokens_to_map};
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear, Vb};

/// `FeedForward(dim, activation_fn="geglu")`: net.0 = GEGLU projection, net.2 = out.
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn new(vb: &Vb, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::new(&vb.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::new(&vb.pp("net").pp(2), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        self.out.forward(&crate::nn::fused::geglu(&h)?)
    }
}

#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: &Vb,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_dim: usize,
    ) -> Result<Self> {
        let attn = |name: &str, cross: Option<usize>| {
            Attention::new(
                &vb.pp(name),
                &AttentionConfig {
                    query_dim: dim,
                    cross_attention_dim: cross,
                    heads,
                    dim_head,
                    bias: false,
                    norm_num_groups: None,
                    residual_connection: false,
                },
            )
        };
        Ok(Self {
            norm1: LayerNorm::new(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: attn("attn1", None)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: attn("attn2", Some(cross_dim))?,
            norm3: LayerNorm::new(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(&vb.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        use crate::nn::fused::add;
        let x = add(&self.attn1.forward(&self.norm1.forward(x)?, None)?, x)?;
        let x = add(
            &self
                .attn2
                .forward(&self.norm2.forward(&x)?, Some(context))?,
            &x,
        )?;
        add(&self.ff.forward(&self.norm3.forward(&x)?)?, &x)
    }
}

/// Input/output projection: a 1×1 conv on the feature map (SD 1.x) or a linear
/// layer on the token sequence (SD 2.x, `use_linear_projection`).
#[derive(Clone, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: &Vb, in_dim: usize, out_dim: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(vb, in_dim, out_dim, true)?)
        } else {
            Projection::Conv(Conv2d::new(vb, in_dim, out_dim, 1, 1, 0)?)
        })
    }
}

#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

/// Shape parameters of one `Transformer2DModel`.
#[derive(Clone, Copy, Debug)]
pub struct TransformerConfig {
    pub in_channels: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vb: &Vb, cfg: &TransformerConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let lin = cfg.use_linear_projection;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &vb.pp("transformer_blocks").pp(i),
                    inner,
                    cfg.heads,
                    cfg.dim_head,
                    cfg.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(&vb.pp("norm"), cfg.norm_num_groups, cfg.in_channels, 1e-6)?,
            proj_in: Projection::new(&vb.pp("proj_in"), cfg.in_channels, inner, lin)?,
            transformer_blocks: blocks,
            proj_out: Projection::new(&vb.pp("proj_out"), inner, cfg.in_channels, lin)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => map_to_tokens(&conv.forward(&x)?)?,
            Projection::Linear(l) => l.forward(&map_to_tokens(&x)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&tokens_to_map(&tokens, h, w)?)?,
            Projection::Linear(l) => tokens_to_map(&l.forward(&tokens)?, h, w)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        crate::nn::fused::add(&out, residual)
    }
}
