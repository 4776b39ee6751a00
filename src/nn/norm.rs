//! Group norm and layer norm: fused CPU kernels with a hand-written backward
//! ([`super::fused`]), plain differentiable candle ops elsewhere (candle-nn's
//! fused versions have no backward).

use candle_core::Tensor;

use super::store::{Init, Vb};
use crate::Result;

/// `nn.GroupNorm(num_groups, channels, eps, affine=True)` over (B, C, ...).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: &Vb, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            return Err(crate::Error::config(
                vb.path(),
                format!("{channels} channels are not divisible into {num_groups} groups"),
            ));
        }
        Ok(Self {
            weight: vb.get(&[channels], "weight", Init::Const(1.0))?,
            bias: vb.get(&[channels], "bias", Init::Const(0.0))?,
            num_groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::group_norm(
            x,
            &self.weight,
            &self.bias,
            self.num_groups,
            self.eps,
            false,
        )
    }

    /// silu(group_norm(x)) in one pass (the ResNet blocks' pattern).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::group_norm(x, &self.weight, &self.bias, self.num_groups, self.eps, true)
    }
}

/// `nn.LayerNorm(dim, eps, elementwise_affine=True)` over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(&[dim], "weight", Init::Const(1.0))?,
            bias: vb.get(&[dim], "bias", Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

pub use super::fused::plain::normalize_last_dim;
