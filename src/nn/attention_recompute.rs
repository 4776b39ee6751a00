//! Attention as one autograd node that keeps only q, k, v (and the small
//! output) for the backward pass: the forward is two batched GEMMs and the
//! fused scaled softmax at the storage level, so the (B·H, N, M) scores and
//! probabilities are freed as soon as the output exists; the backward
//! recomputes the probabilities (one more GEMM and softmax) and runs the
//! four gradient GEMMs and the fused softmax backward. PyTorch's fused
//! attention makes the same trade (FlashAttention recomputes too).
//!
//! The GPU's attention path ([`super::attention::multi_head_attention`] on a
//! CUDA device with our kernels). It runs on the CPU as well (f32), where the
//! tests check it against the plain ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::fused::{SoftmaxBwd, SoftmaxOp};
use crate::Result;

/// softmax(q kᵀ · scale) v per head on token-major q (B, N, H·d), k and v
/// (B, M, H·d) → (B, N, H·d).
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    // (B·H, N, d) batches of heads.
    let split = |x: &Tensor| -> Result<Tensor> {
        let x = super::attention::split_heads(x, heads)?;
        let (b, h, n, d) = x.dims4()?;
        Ok(x.reshape((b * h, n, d))?)
    };
    let o = attention(&split(q)?, &split(k)?, &split(v)?, scale)?;
    let (bh, n, d) = o.dims3()?;
    super::attention::merge_heads(&o.reshape((bh / heads, heads, n, d))?)
}

/// softmax(q kᵀ · scale) v for q (BH, N, d), k (BH, M, d), v (BH, M, dv).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (bh, _, d) = q.dims3()?;
    let (bk, m, dk) = k.dims3()?;
    let (bv, mv, _) = v.dims3()?;
    if bk != bh || bv != bh || dk != d || mv != m {
        return Err(crate::Error::msg(format!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    Ok(q.apply_op3(&k, &v, Attention { scale })?)
}

struct Attention {
    scale: f64,
}

/// The storage-level forward on either backend: scores = q kᵀ, p =
/// softmax(scale · scores), o = p v.
macro_rules! forward {
    ($self:ident, $s1:ident, $l1:ident, $s2:ident, $l2:ident, $s3:ident, $l3:ident, $softmax:ident) => {{
        let (bh, n, d) = $l1.shape().dims3()?;
        let m = $l2.dims()[1];
        let dv = $l3.dims()[2];
        let kt = $l2.transpose(1, 2)?;
        let scores = $s1.matmul($s2, (bh, n, m, d), $l1, &kt)?;
        let sl = Layout::contiguous((bh, n, m));
        let (p, _) = SoftmaxOp { scale: $self.scale }.$softmax(&scores, &sl)?;
        drop(scores);
        let o = p.matmul($s3, (bh, n, dv, m), &sl, $l3)?;
        Ok((o, Shape::from((bh, n, dv))))
    }};
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-recompute"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::CustomOp1;
        forward!(self, s1, l1, s2, l2, s3, l3, cpu_fwd)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::CustomOp1;
        forward!(self, s1, l1, s2, l2, s3, l3, cuda_fwd)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let g = grad.to_dtype(q.dtype())?.contiguous()?;
        let p = q
            .matmul(&k.t()?)?
            .apply_op1_no_bwd(&SoftmaxOp { scale: self.scale })?;
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &SoftmaxBwd { scale: self.scale })?;
        drop((p, dp));
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
