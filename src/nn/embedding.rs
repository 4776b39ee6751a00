//! Sinusoidal timestep embedding (diffusers `get_timestep_embedding`) and a
//! learned lookup table (`nn.Embedding`).

use candle_core::{DType, Tensor};

use super::store::{Init, Vb};
use crate::Result;

/// Embeds per-sample timesteps (B,) into (B, dim) sinusoids:
/// exponent_i = −ln(max_period) · i / (half − shift), emb = [sin, cos] (or [cos, sin]).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let max_period: f64 = 10000.0;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            (-(max_period.ln()) * i as f64 / (half as f64 - downscale_freq_shift)).exp() as f32
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.reshape(((), 1))?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], 1)?
    } else {
        Tensor::cat(&[&sin, &cos], 1)?
    };
    if dim % 2 == 1 {
        let pad = Tensor::zeros((emb.dim(0)?, 1), DType::F32, emb.device())?;
        return Ok(Tensor::cat(&[&emb, &pad], 1)?);
    }
    Ok(emb)
}

/// `nn.Embedding(num, dim)`.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(vb: &Vb, num: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(&[num, dim], "weight", Init::Normal(0.02))?,
        })
    }

    /// ids of any shape (u32) → ids.shape + (dim,)
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let out = self.weight.index_select(&flat, 0)?;
        dims.push(self.weight.dim(1)?);
        Ok(out.reshape(dims)?)
    }
}
