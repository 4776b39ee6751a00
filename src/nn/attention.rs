//! Softmax and scaled dot-product attention, differentiable (a fused kernel
//! with its own backward on the CPU, plain candle ops elsewhere).

use candle_core::Tensor;

use super::precision::like;
use crate::Result;

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    super::fused::softmax_last_dim(x, 1.0)
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
    let scores = q.matmul(&k.t()?)?;
    let p = match mask {
        Some(m) => softmax_last_dim(&(&scores * scale)?.broadcast_add(&like(m, &scores)?)?)?,
        None => super::fused::softmax_last_dim(&scores, scale)?,
    };
    Ok(p.matmul(v)?)
}

/// A (N, N) additive causal mask: 0 on and below the diagonal, a large negative above.
pub fn causal_mask(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (n, n), device)?)
}

/// Multi-head attention on token-major tensors: q (B, N, H·d), k and v
/// (B, M, H·d) → (B, N, H·d), softmax(q kᵀ · scale) v per head. On the CPU
/// (f32) one autograd node that reads the heads in place and keeps no scores
/// for the backward pass ([`super::attention_cpu`]); on a GPU our flash
/// kernel in bf16 / f16 ([`super::attention_flash`]), else one node of
/// batched GEMMs and our fused softmax that keeps no scores either
/// ([`super::attention_recompute`]).
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    if super::fused::use_gpu_kernels(q) {
        if super::attention_flash::usable(q, heads) {
            return super::attention_flash::multi_head_attention(q, k, v, heads, scale);
        }
        return super::attention_recompute::multi_head_attention(q, k, v, heads, scale);
    }
    if !super::fused::use_fused(q) {
        return plain_multi_head_attention(q, k, v, heads, scale);
    }
    Ok(super::attention_cpu::multi_head_attention(
        q, k, v, heads, scale,
    )?)
}

/// The same from plain candle ops (other devices, and the tests' reference).
pub fn plain_multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let split = |x: &Tensor| split_heads(x, heads);
    let o = scaled_dot_product_attention(&split(q)?, &split(k)?, &split(v)?, scale, None)?;
    merge_heads(&o)
}

/// (B, N, H·d) → (B, H, N, d), contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    Ok(x.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// (B, H, N, d) → (B, N, H·d).
pub fn merge_heads(o: &Tensor) -> Result<Tensor> {
    let (b, heads, n, d) = o.dims4()?;
    Ok(o.transpose(1, 2)?.reshape((b, n, heads * d))?)
}
