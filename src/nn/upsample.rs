//! Nearest-neighbour upsampling. The 2× case is one op on the CPU
//! ([`super::layout::upsample_nearest_2x`]; elsewhere a reshape + broadcast,
//! whose gradient candle computes correctly, unlike its `upsample_nearest2d`
//! backward); other target sizes (a UNet fed a latent not divisible by
//! 2^levels) use index selection with PyTorch's `nearest` rule,
//! src = ⌊dst · in / out⌋.

use candle_core::Tensor;

use crate::Result;

pub use super::layout::upsample_nearest_2x;

/// Nearest upsampling of (B, C, H, W) to (B, C, out_h, out_w).
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 2 * h && out_w == 2 * w {
        return upsample_nearest_2x(x);
    }
    let index = |n_in: usize, n_out: usize| -> Result<Tensor> {
        let scale = n_in as f32 / n_out as f32;
        let idx: Vec<u32> = (0..n_out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(n_in - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(idx, n_out, x.device())?)
    };
    let y = x.index_select(&index(h, out_h)?, 2)?;
    Ok(y.index_select(&index(w, out_w)?, 3)?)
}
