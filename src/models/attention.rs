//! diffusers' `Attention` (models/attention_processor.py) as SD uses it:
//! to_q / to_k / to_v / to_out.0, optional group norm in front and residual
//! connection (the VAE's mid-block attention), self- or cross-attention.

use candle_core::Tensor;

use crate::Result;
use crate::nn::attention::multi_head_attention;
use crate::nn::layout::{map_to_tokens, tokens_to_map};
use crate::nn::{GroupNorm, Linear, Vb};

#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub group_norm: Option<GroupNorm>,
    pub heads: usize,
    pub dim_head: usize,
    pub residual_connection: bool,
}

/// Construction options mirroring diffusers' `Attention.__init__` arguments.
#[derive(Clone, Debug)]
pub struct AttentionConfig {
    pub query_dim: usize,
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    /// Bias on to_q / to_k / to_v (to_out.0 always has one).
    pub bias: bool,
    /// (groups, eps) of a GroupNorm applied to the input first.
    pub norm_num_groups: Option<(usize, f64)>,
    pub residual_connection: bool,
}

impl Attention {
    pub fn new(vb: &Vb, cfg: &AttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let group_norm = match cfg.norm_num_groups {
            Some((g, eps)) => Some(GroupNorm::new(&vb.pp("group_norm"), g, cfg.query_dim, eps)?),
            None => None,
        };
        Ok(Self {
            to_q: Linear::new(&vb.pp("to_q"), cfg.query_dim, inner, cfg.bias)?,
            to_k: Linear::new(&vb.pp("to_k"), kv_dim, inner, cfg.bias)?,
            to_v: Linear::new(&vb.pp("to_v"), kv_dim, inner, cfg.bias)?,
            to_out: Linear::new(&vb.pp("to_out").pp(0), inner, cfg.query_dim, true)?,
            group_norm,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
            residual_connection: cfg.residual_connection,
        })
    }

    /// Attention over a token sequence `x` (B, N, C); `context` (B, M, C') for
    /// cross-attention. Also accepts (B, C, H, W) input (the VAE's spatial
    /// attention): it is flattened to tokens and restored afterwards.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let residual = x.clone();
        let spatial = x.rank() == 4;
        let mut h = x.clone();
        if let Some(gn) = &self.group_norm {
            h = gn.forward(&h)?;
        }
        let dims4 = if spatial { Some(h.dims4()?) } else { None };
        if dims4.is_some() {
            h = map_to_tokens(&h)?;
        }
        let ctx = context.unwrap_or(&h);
        let q = self.to_q.forward(&h)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let scale = 1.0 / (self.dim_head as f64).sqrt();
        // Head split, attention and merge (one fused node on the CPU).
        let o = multi_head_attention(&q, &k, &v, self.heads, scale)?;
        let mut out = self.to_out.forward(&o)?;
        if let Some((_, _, hh, ww)) = dims4 {
            out = tokens_to_map(&out, hh, ww)?;
        }
        if self.residual_connection {
            out = crate::nn::fused::add(&out, &residual)?;
        }
        Ok(out)
    }
}
