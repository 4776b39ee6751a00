//! Softmax and scaled dot-product attention, differentiable (a fused kernel
//! with its own backward on the CPU, plain candle ops elsewhere).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

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
        Some(m) => softmax_last_dim(&(scores * scale)?.broadcast_add(m)?)?,
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
/// (f32) one autograd node: the head split / merge copies, kᵀ, the scores,
/// the softmax and both products are no graph nodes of their own (candle's
/// backward zero-fills and adds a gradient buffer for every node), and the
/// backward computes dq, dk, dv directly from the saved probabilities.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    if !super::fused::use_fused(q) {
        return plain_multi_head_attention(q, k, v, heads, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (b, _, c) = q.dims3()?;
    let (bk, m, ck) = k.dims3()?;
    if v.dims3()? != (bk, m, ck) || bk != b || ck != c || !c.is_multiple_of(heads) {
        return Err(crate::Error::msg(format!(
            "attention: q {:?}, k {:?}, v {:?}, {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let d = c / heads;
    let qh = split_heads_detached(&q, heads)?;
    let kh = split_heads_detached(&k, heads)?;
    let vh = split_heads_detached(&v, heads)?;
    let p = qh
        .matmul(&kh.t()?)?
        .apply_op1_no_bwd(&super::fused::SoftmaxOp { scale })?;
    let o = p.matmul(&vh)?; // (B, H, N, d)
    drop((qh, kh, vh));
    let op = AttentionOp {
        heads,
        d,
        scale,
        p,
        o: std::sync::Mutex::new(Some(o)),
    };
    Ok(q.apply_op3(&k, &v, op)?)
}

/// The same from plain candle ops (other devices, and the tests' reference).
pub fn plain_multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let split = |x: &Tensor| -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        Ok(x.reshape((b, n, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let o = scaled_dot_product_attention(&split(q)?, &split(k)?, &split(v)?, scale, None)?;
    let (b, _, n, d) = o.dims4()?;
    Ok(o.transpose(1, 2)?.reshape((b, n, heads * d))?)
}

/// (B, N, H·d) → (B, H, N, d), contiguous, outside the autograd graph.
fn split_heads_detached(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let d = c / heads;
    Ok(x.detach()
        .apply_op1_no_bwd(&SwapMiddle {
            outer: b,
            a: n,
            b: heads,
            l: d,
        })?
        .reshape((b, heads, n, d))?)
}

/// (B, H, N, d) → (B, N, H·d), outside the autograd graph.
fn merge_heads_detached(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    Ok(x.contiguous()?
        .apply_op1_no_bwd(&SwapMiddle {
            outer: b,
            a: h,
            b: n,
            l: d,
        })?
        .reshape((b, n, h * d))?)
}

/// (outer, A, B, L) → (outer, B, A, L).
struct SwapMiddle {
    outer: usize,
    a: usize,
    b: usize,
    l: usize,
}

impl CustomOp1 for SwapMiddle {
    fn name(&self) -> &'static str {
        "swap-middle-dims"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l)?;
        if x.len() != self.outer * self.a * self.b * self.l {
            candle_core::bail!("swap-middle-dims: {} elements for {:?}", x.len(), l.dims());
        }
        let out = super::im2col::swap_middle(x, self.outer, self.a, self.b, self.l);
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.outer, self.b, self.a, self.l)),
        ))
    }
}

fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
        _ => candle_core::bail!("attention: expected a contiguous f32 tensor"),
    }
}

/// (q, k, v) → merged heads of softmax(q kᵀ · scale) v, computed by
/// [`multi_head_attention`]; keeps the probabilities for the backward (the
/// split heads are copied again from q, k, v, which the graph keeps anyway).
struct AttentionOp {
    heads: usize,
    d: usize,
    scale: f64,
    /// (B, H, N, M) probabilities.
    p: Tensor,
    /// (B, H, N, d) output, consumed by the forward.
    o: std::sync::Mutex<Option<Tensor>>,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let o = super::fused::take_forward_result(&self.o, "fused attention")?;
        let (b, n, _) = l1.shape().dims3()?;
        let (os, ol) = o.storage_and_layout();
        let x = match &*os {
            candle_core::Storage::Cpu(s) => cpu_slice(s, ol)?,
            _ => candle_core::bail!("fused attention: result is not on the CPU"),
        };
        let out = super::im2col::swap_middle(x, b, self.heads, n, self.d);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wrap = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        let d_o = split_heads_detached(&grad.contiguous()?, self.heads).map_err(wrap)?;
        let dv = if v.track_op() {
            let dvh = self.p.t()?.matmul(&d_o)?;
            Some(merge_heads_detached(&dvh).map_err(wrap)?)
        } else {
            None
        };
        if !(q.track_op() || k.track_op()) {
            return Ok((None, None, dv));
        }
        let vh = split_heads_detached(v, self.heads).map_err(wrap)?;
        let dp = d_o.matmul(&vh.t()?)?;
        drop(vh);
        let ds = self.p.apply_op2_no_bwd(
            &dp.contiguous()?,
            &super::fused::SoftmaxBwd { scale: self.scale },
        )?;
        let dq = if q.track_op() {
            let kh = split_heads_detached(k, self.heads).map_err(wrap)?;
            Some(merge_heads_detached(&ds.matmul(&kh)?).map_err(wrap)?)
        } else {
            None
        };
        let dk = if k.track_op() {
            let qh = split_heads_detached(q, self.heads).map_err(wrap)?;
            Some(merge_heads_detached(&ds.t()?.matmul(&qh)?).map_err(wrap)?)
        } else {
            None
        };
        Ok((dq, dk, dv))
    }
}
