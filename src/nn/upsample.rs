//! Nearest-neighbour 2× upsampling by reshape + broadcast, whose gradient
//! candle computes correctly (its `upsample_nearest2d` backward does not).

use candle_core::Tensor;

use crate::Result;

pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}
