//! `nn.Linear`: y = x Wᵀ + b over the last dimension.

use std::sync::Arc;

use candle_core::{D, Tensor};

use super::lora::Lora;
use super::store::{Init, Vb};
use crate::Result;

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A LoRA adapter added to the output ([`super::lora`]).
    pub lora: Option<Arc<Lora>>,
}

impl Linear {
    pub fn new(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let init = Init::torch_default(in_dim);
        let weight = vb.get(&[out_dim, in_dim], "weight", init)?;
        let bias = if bias {
            Some(vb.get(&[out_dim], "bias", init)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
        })
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.lora.is_none() && super::fused::use_fused(x) {
            return super::fused::linear(x, &self.weight, self.bias.as_ref());
        }
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        // Mixed precision: the f32 weight in the activation's dtype.
        let weight = super::precision::like(&self.weight, x)?;
        let mut y = super::lora::matmul(&x2, &weight.t()?)?;
        if let Some(lora) = &self.lora {
            y = (y + lora.forward_linear(&x2)?)?;
        }
        if let Some(b) = &self.bias {
            y = super::fused::add_bias(&y, b, 1)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(D::Minus1)?;
        Ok(y.reshape(out_dims)?)
    }
}
