//! Group norm and layer norm built from differentiable ops (candle-nn's fused
//! versions have no backward).

use candle_core::{D, Tensor};

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
        if num_groups == 0 || channels % num_groups != 0 {
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
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xg = x.reshape((b, self.num_groups, ()))?;
        let y = normalize_last_dim(&xg, self.eps)?.reshape(dims.as_slice())?;
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        let w = self.weight.reshape(shape.as_slice())?;
        let bb = self.bias.reshape(shape.as_slice())?;
        Ok(y.broadcast_mul(&w)?.broadcast_add(&bb)?)
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
        let y = normalize_last_dim(x, self.eps)?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// (x − mean) / sqrt(var + eps) over the last dimension (biased variance).
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?)
}
