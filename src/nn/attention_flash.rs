//! Flash attention on the GPU: multi-head attention as one autograd node
//! whose forward is our tensor-core kernel (`dreambooth_flash_fwd_*` in
//! `src/cuda/kernels.cu`, planned by [`super::gpu_plan::flash_attention_fwd`]):
//! it reads q, k and v token-major, (B, N, H·d), where the projections left
//! them, walks the keys in tiles with an online softmax and writes the
//! output in the same layout, so neither the (N, M) scores nor the
//! head-major copies of q, k, v and the output are ever made. The backward,
//! for heads up to 80 channels, is three more of our kernels
//! ([`super::gpu_plan::flash_attention_bwd`]: each row's log-sum-exp, then
//! dq over the keys and dk, dv over the queries, the probabilities
//! recomputed tile by tile), on the same layout; wider heads take the
//! recomputing node's ([`super::attention_recompute::backward`]) on the
//! heads split out. Either keeps nothing from the forward but q, k, v and
//! the output.
//!
//! Taken for bf16 / f16 on a CUDA device when a kernel covers the head size
//! (up to 160 channels: SD 1.x's 40/80/160, SD 2.x's and SDXL's 64), unless
//! `DREAMBOOTH_NO_FLASH` is set or the start-up check turned it off
//! ([`super::kernel_paths::GpuPath::Flash`]); anything else takes the
//! recomputing node.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::attention::{merge_heads, split_heads};
use super::attention_recompute::{MAX_SCORES, backward, pairs_per_chunk};
use super::gpu_plan::{AttentionDims, flash_head_size};
use super::kernel_paths::{GpuPath, turned_off};
use crate::Result;

/// `DREAMBOOTH_NO_FLASH` is set: the recomputing node instead (A/B runs).
fn disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| std::env::var_os("DREAMBOOTH_NO_FLASH").is_some())
}

/// Whether attention over `heads` heads of q (B, N, C) takes the flash
/// kernel: a `cuda` build, q on a CUDA device in bf16 or f16, a kernel for
/// its head size, the path on.
pub fn usable(q: &Tensor, heads: usize) -> bool {
    let c = q.dims().last().copied().unwrap_or(0);
    cfg!(feature = "cuda")
        && q.device().is_cuda()
        && matches!(
            q.dtype(),
            candle_core::DType::BF16 | candle_core::DType::F16
        )
        && heads > 0
        && c.is_multiple_of(heads)
        && flash_head_size(c / heads).is_some()
        && !disabled()
        && !turned_off(GpuPath::Flash)
}

/// softmax(q kᵀ · scale) v per head on token-major q (B, N, H·d), k and v
/// (B, M, H·d) → (B, N, H·d) through the flash kernel (check [`usable`]
/// first: on other devices and dtypes the forward fails).
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let dims = AttentionDims::of(q.dims(), k.dims(), v.dims(), heads)?;
    let chunk = pairs_per_chunk(dims.b * heads, dims.n, dims.m, MAX_SCORES);
    Ok(q.apply_op3(&k, &v, FlashAttention { dims, scale, chunk })?)
}

/// The gradients (dq, dk, dv), token-major like q, k and v, of the flash
/// node for the output gradient `grad` (B, N, H·d): the recomputing
/// backward on the heads split out, `chunk` (batch · head) pairs at a time.
/// On any device (the tests check it on the CPU against autograd).
pub fn token_major_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    heads: usize,
    scale: f64,
    chunk: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let split = |x: &Tensor| -> Result<Tensor> {
        let x = split_heads(x, heads)?;
        let (b, h, n, d) = x.dims4()?;
        Ok(x.reshape((b * h, n, d))?)
    };
    let merge = |x: Tensor, b: usize| -> Result<Tensor> {
        let (bh, n, d) = x.dims3()?;
        merge_heads(&x.reshape((b, bh / b.max(1), n, d))?)
    };
    let b = q.dim(0)?;
    let grad = grad.to_dtype(q.dtype())?;
    let (dq, dk, dv) = backward(
        &split(&q.detach())?,
        &split(&k.detach())?,
        &split(&v.detach())?,
        &split(&grad)?,
        scale,
        chunk,
    )?;
    Ok((merge(dq, b)?, merge(dk, b)?, merge(dv, b)?))
}

struct FlashAttention {
    dims: AttentionDims,
    scale: f64,
    /// (batch · head) pairs per chunk of the backward.
    chunk: usize,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention runs on a CUDA device only")
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
        use candle_core::backend::BackendStorage;
        let sfx = super::gpu_plan::kernel_suffix(s1.dtype())?;
        let Some(plan) = super::gpu_plan::flash_attention_fwd(sfx, self.dims, self.scale as f32)
        else {
            candle_core::bail!("no flash attention kernel for {:?} in {sfx}", self.dims);
        };
        let o = crate::cuda::exec::run(&plan, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let plan = super::gpu_plan::suffix(q.dtype()).and_then(|sfx| {
            super::gpu_plan::flash_attention_bwd(sfx, self.dims, self.scale as f32)
        });
        if let (Some(plan), true) = (plan, q.device().is_cuda()) {
            let flat = q.detach().apply_op3_no_bwd(
                &k.detach(),
                &v.detach(),
                &FlashAttentionBwd {
                    plan,
                    o: o.detach().contiguous()?,
                    grad: grad.to_dtype(q.dtype())?.contiguous()?,
                },
            )?;
            let (nq, nk) = (q.elem_count(), k.elem_count());
            let part =
                |at: usize, n: usize, like: &Tensor| flat.narrow(0, at, n)?.reshape(like.shape());
            return Ok((
                Some(part(0, nq, q)?),
                Some(part(nq, nk, k)?),
                Some(part(nq + nk, nk, v)?),
            ));
        }
        let (dq, dk, dv) =
            token_major_backward(q, k, v, grad, self.dims.heads, self.scale, self.chunk)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The flash backward's kernels on (q, k, v) with the forward's output and
/// its gradient → flat [dq; dk; dv] (built only on a CUDA device).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashAttentionBwd {
    plan: super::gpu_plan::Plan,
    o: Tensor,
    grad: Tensor,
}

impl CustomOp3 for FlashAttentionBwd {
    fn name(&self) -> &'static str {
        "flash-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention runs on a CUDA device only")
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
        use candle_core::Storage;
        let (os, ol) = self.o.storage_and_layout();
        let (gs, gl) = self.grad.storage_and_layout();
        let (Storage::Cuda(os), Storage::Cuda(gs)) = (&*os, &*gs) else {
            candle_core::bail!("flash attention backward: output or gradient not on the GPU");
        };
        let flat = crate::cuda::exec::run(
            &self.plan,
            &[(s1, l1), (s2, l2), (s3, l3), (os, ol), (gs, gl)],
        )?;
        let n = self.plan.scratch.last().map_or(0, |b| b.len);
        Ok((flat, Shape::from(n)))
    }
}
