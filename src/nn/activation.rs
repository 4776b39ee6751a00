//! Activations, each differentiable through candle's autograd.

use candle_core::Tensor;

use crate::Result;

pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// Exact (erf) GELU, PyTorch's `F.gelu` default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// CLIP's `quick_gelu`: x · σ(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * sigmoid(&(x * 1.702)?)?)?)
}

/// The activations a config may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
    QuickGelu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => silu(x),
            Self::Gelu => gelu(x),
            Self::QuickGelu => quick_gelu(x),
        }
    }
}
