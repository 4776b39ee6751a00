//! Softmax and scaled dot-product attention from differentiable ops.

use candle_core::{D, Tensor};

use crate::Result;

/// Softmax over the last dimension. The max is subtracted as a constant
/// (softmax is invariant to it), so the gradient flows through plain ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// softmax(q kᵀ · scale + mask) v for (B, H, N, d) inputs; `mask` broadcasts to
/// (B, H, N, M) and is added to the scores (use −inf / large negative to block).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let p = softmax_last_dim(&scores)?;
    Ok(p.matmul(v)?)
}

/// A (N, N) additive causal mask: 0 on and below the diagonal, a large negative above.
pub fn causal_mask(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (n, n), device)?)
}
