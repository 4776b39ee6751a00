//! Attention as one autograd node that keeps only q, k, v (and the small
//! output) for the backward pass: the forward is two batched GEMMs and the
//! fused scaled softmax at the storage level, so the (B·H, N, M) scores and
//! probabilities are freed as soon as the output exists; the backward
//! recomputes the probabilities (one more GEMM and softmax) and runs the
//! four gradient GEMMs and the fused softmax backward. PyTorch's fused
//! attention makes the same trade (FlashAttention recomputes too).
//!
//! The (batch · head) pairs go through in chunks whose scores hold at most
//! [`MAX_SCORES`] elements (128 MiB in bf16), so one layer's attention never
//! holds more than that many scores, probabilities and their gradients at a
//! time: SD 1.5's 4096-token layers at batch 2 would otherwise hold 2 · 8 ·
//! 4096² of each (512 MiB in bf16), three of them in the backward pass.
//!
//! The GPU's attention path ([`super::attention::multi_head_attention`] on a
//! CUDA device with our kernels). It runs on the CPU as well (f32), where the
//! tests check it against the plain ops.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::fused::{SoftmaxBwd, SoftmaxOp};
use crate::Result;

/// The most score elements one chunk of (batch · head) pairs computes at a
/// time (at least one pair per chunk).
pub const MAX_SCORES: usize = 64 << 20;

/// softmax(q kᵀ · scale) v per head on token-major q (B, N, H·d), k and v
/// (B, M, H·d) → (B, N, H·d).
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    multi_head_attention_chunked(q, k, v, heads, scale, MAX_SCORES)
}

/// [`multi_head_attention`] with chunks of at most `max_scores` score
/// elements.
pub fn multi_head_attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    max_scores: usize,
) -> Result<Tensor> {
    // (B·H, N, d) batches of heads.
    let split = |x: &Tensor| -> Result<Tensor> {
        let x = super::attention::split_heads(x, heads)?;
        let (b, h, n, d) = x.dims4()?;
        Ok(x.reshape((b * h, n, d))?)
    };
    let o = attention_chunked(&split(q)?, &split(k)?, &split(v)?, scale, max_scores)?;
    let (bh, n, d) = o.dims3()?;
    super::attention::merge_heads(&o.reshape((bh / heads, heads, n, d))?)
}

/// softmax(q kᵀ · scale) v for q (BH, N, d), k (BH, M, d), v (BH, M, dv),
/// over chunks of (batch · head) pairs with at most `max_scores` score
/// elements each ([`MAX_SCORES`] for the model's attention).
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    max_scores: usize,
) -> Result<Tensor> {
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
    let chunk = pairs_per_chunk(bh, q.dim(1)?, m, max_scores);
    Ok(q.apply_op3(&k, &v, Attention { scale, chunk })?)
}

struct Attention {
    scale: f64,
    /// (batch · head) pairs per chunk.
    chunk: usize,
}

/// `bh` (batch · head) pairs in chunks of `chunk` (at least one): (first, count).
fn chunks(bh: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..bh)
        .step_by(chunk)
        .map(move |b0| (b0, chunk.min(bh - b0)))
}

/// The (batch · head) pairs per chunk that keep a chunk's scores (N × M
/// each) within `max_scores` elements (at least one pair).
pub fn pairs_per_chunk(bh: usize, n: usize, m: usize, max_scores: usize) -> usize {
    (max_scores / (n * m).max(1)).clamp(1, bh.max(1))
}

/// The storage-level forward on either backend, chunk by chunk: scores =
/// q kᵀ, p = softmax(scale · scores), o = p v, each chunk's o copied into
/// place (a single chunk is the output itself).
macro_rules! forward {
    ($self:ident, $s1:ident, $l1:ident, $s2:ident, $l2:ident, $s3:ident, $l3:ident, $softmax:ident) => {{
        let (bh, n, d) = $l1.shape().dims3()?;
        let m = $l2.dims()[1];
        let dv = $l3.dims()[2];
        let chunk = |b0: usize, bc: usize| -> candle_core::Result<_> {
            let (l1, l2, l3) = (
                $l1.narrow(0, b0, bc)?,
                $l2.narrow(0, b0, bc)?,
                $l3.narrow(0, b0, bc)?,
            );
            let kt = l2.transpose(1, 2)?;
            let scores = $s1.matmul($s2, (bc, n, m, d), &l1, &kt)?;
            let sl = Layout::contiguous((bc, n, m));
            let (p, _) = SoftmaxOp { scale: $self.scale }.$softmax(&scores, &sl)?;
            drop(scores);
            p.matmul($s3, (bc, n, dv, m), &sl, &l3)
        };
        let shape = Shape::from((bh, n, dv));
        if $self.chunk >= bh {
            return Ok((chunk(0, bh)?, shape));
        }
        let mut o = unsafe { $s1.device().alloc_uninit(&shape, $s1.dtype())? };
        for (b0, bc) in chunks(bh, $self.chunk) {
            let oc = chunk(b0, bc)?;
            oc.copy_strided_src(&mut o, b0 * n * dv, &Layout::contiguous((bc, n, dv)))?;
        }
        Ok((o, shape))
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
        let (dq, dk, dv) = backward(q, k, v, grad, self.scale, self.chunk)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The gradients (dq, dk, dv) of softmax(q kᵀ · scale) v for q (BH, N, d), k
/// (BH, M, d), v (BH, M, dv) and the output gradient `grad`, `chunk`
/// (batch · head) pairs at a time: the probabilities recomputed (a GEMM and
/// the fused softmax), then the four gradient GEMMs and the fused softmax
/// backward. The backward of this node and of the flash attention node
/// ([`super::attention_flash`]).
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    scale: f64,
    chunk: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let g = grad.to_dtype(q.dtype())?.contiguous()?;
    let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
    for (b0, bc) in chunks(q.dim(0)?, chunk) {
        let (q, k, v, g) = (
            q.narrow(0, b0, bc)?,
            k.narrow(0, b0, bc)?,
            v.narrow(0, b0, bc)?,
            g.narrow(0, b0, bc)?,
        );
        let p = q.matmul(&k.t()?)?.apply_op1_no_bwd(&SoftmaxOp { scale })?;
        dvs.push(p.t()?.matmul(&g)?);
        let dp = g.matmul(&v.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &SoftmaxBwd { scale })?;
        drop((p, dp));
        dqs.push(ds.matmul(&k)?);
        dks.push(ds.t()?.matmul(&q)?);
    }
    let join = |parts: Vec<Tensor>| -> candle_core::Result<Tensor> {
        if parts.len() == 1 {
            Ok(parts.into_iter().next().expect("one chunk"))
        } else {
            Tensor::cat(&parts, 0)
        }
    };
    Ok((join(dqs)?, join(dks)?, join(dvs)?))
}
