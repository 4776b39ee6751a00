//! Fused CPU kernels with hand-written backward passes, as candle custom ops.
//!
//! Each public function computes what a handful of plain candle ops compute
//! (the `plain` module keeps those versions: they run on every other device
//! and the tests compare the two), but in one or two passes over memory,
//! multi-threaded with rayon, and with a backward that avoids candle's slow
//! strided reductions (the gradient of a broadcast weight or bias).
//!
//! The fused path runs for f32 tensors on the CPU. In `cuda` builds the
//! norms, softmax and GEGLU also run as our CUDA kernels on the GPU (f32,
//! bf16, f16; [`use_gpu_kernels`]); everything else takes the plain path.

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::{assume_init, uninit_vec, zeroed};
use super::precision::{in_f32, is_half};
use crate::Result;

/// A 16-bit tensor upcast to f32; others (f32, f64) as they are.
fn to_f32(t: &Tensor) -> Result<Tensor> {
    if is_half(t) {
        super::precision::cast(t, DType::F32)
    } else {
        Ok(t.clone())
    }
}

/// Whether `x` takes the fused path: f32 on the CPU, unless
/// `DREAMBOOTH_NO_FUSED` is set (to measure or debug the plain ops).
pub fn use_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !disabled()
}

/// Whether `x` takes our CUDA kernels for the norms, softmax and GEGLU
/// (`src/cuda/kernels.cu`, planned by [`super::gpu_plan`]): a `cuda` build,
/// `x` on a CUDA device in f32, bf16 or f16 (statistics in f32 inside the
/// kernels, so half-precision inputs need no upcast copy), unless
/// `DREAMBOOTH_NO_FUSED` is set.
pub fn use_gpu_kernels(x: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && super::gpu_plan::suffix(x.dtype()).is_some()
        && !disabled()
        && !super::kernel_paths::turned_off(super::kernel_paths::GpuPath::Fused)
}

/// `DREAMBOOTH_NO_FUSED` is set: plain candle ops instead of our kernels
/// (CPU and GPU), to measure or debug.
pub fn disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| std::env::var_os("DREAMBOOTH_NO_FUSED").is_some())
}

// ---------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------

/// GroupNorm over (B, C, ...) with per-channel affine `weight`, `bias`
/// (C,), optionally followed by SiLU.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    // Affine weights in f32 (a bf16 / f16 inference model's are upcast).
    let (weight, bias) = (&to_f32(weight)?, &to_f32(bias)?);
    if use_gpu_kernels(x) {
        let op = GroupNormOp {
            groups,
            eps,
            silu,
            stats: std::sync::Mutex::new(None),
        };
        let (w, b) = (weight.contiguous()?, bias.contiguous()?);
        return Ok(x.contiguous()?.apply_op3(&w, &b, op)?);
    }
    if is_half(x) {
        // Mixed precision: statistics in f32, the result in x's dtype.
        return in_f32(x, |x| group_norm(x, weight, bias, groups, eps, silu));
    }
    if use_fused(x) {
        let x = x.contiguous()?;
        let op = GroupNormOp {
            groups,
            eps,
            silu,
            stats: std::sync::Mutex::new(None),
        };
        Ok(x.apply_op3(weight, bias, op)?)
    } else {
        plain::group_norm(x, weight, bias, groups, eps, silu)
    }
}

/// LayerNorm over the last dimension with affine `weight`, `bias` (D,).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (weight, bias) = (&to_f32(weight)?, &to_f32(bias)?);
    if use_gpu_kernels(x) {
        let (w, b) = (weight.contiguous()?, bias.contiguous()?);
        return Ok(x.contiguous()?.apply_op3(&w, &b, LayerNormOp { eps })?);
    }
    if is_half(x) {
        return in_f32(x, |x| layer_norm(x, weight, bias, eps));
    }
    if use_fused(x) {
        let x = x.contiguous()?;
        Ok(x.apply_op3(weight, bias, LayerNormOp { eps })?)
    } else {
        plain::layer_norm(x, weight, bias, eps)
    }
}

/// softmax(scale · x) over the last dimension (scale > 0).
pub fn softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    if use_gpu_kernels(x) {
        return Ok(x.contiguous()?.apply_op1(SoftmaxOp { scale })?);
    }
    if is_half(x) {
        return in_f32(x, |x| softmax_last_dim(x, scale));
    }
    if use_fused(x) {
        let x = x.contiguous()?;
        Ok(x.apply_op1(SoftmaxOp { scale })?)
    } else {
        plain::softmax_last_dim(x, scale)
    }
}

/// GEGLU: the last dimension of `h` splits into halves (a, gate);
/// returns a · gelu(gate) (exact erf GELU).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if use_fused(h) || use_gpu_kernels(h) {
        let h = h.contiguous()?;
        Ok(h.apply_op1(GegluOp)?)
    } else {
        plain::geglu(h)
    }
}

/// y + bias broadcast along dimension `dim` of y (bias has y.dim(dim) entries):
/// dim = 1 for a conv's NCHW output, the last dim for a linear layer.
pub fn add_bias(y: &Tensor, bias: &Tensor, dim: usize) -> Result<Tensor> {
    let bias = &super::precision::like(bias, y)?;
    if use_fused(y) {
        let y = y.contiguous()?;
        Ok(y.apply_op2(bias, BiasAddOp { dim })?)
    } else {
        plain::add_bias(y, bias, dim)
    }
}

/// a + b for tensors of one shape (the blocks' residual connections): on the
/// CPU one parallel pass (candle's add runs on one thread, and the other
/// core idles through it); the backward passes the gradient to both.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if use_fused(a) && use_fused(b) && a.dims() == b.dims() {
        Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddOp)?)
    } else {
        Ok((a + b)?)
    }
}

/// y = x Wᵀ + b over the last dimension of `x` (any rank), W (out, in):
/// one autograd node on the CPU (the GEMM runs on detached tensors, the
/// backward computes dx, dW, db directly), instead of reshape → transpose →
/// matmul → bias add → reshape, each of which candle's backward gives a
/// zero-filled gradient buffer and an add.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    // Empty operands (nothing to multiply) take candle's path too.
    if !(use_fused(x) && use_fused(weight)) || x.elem_count() == 0 || weight.elem_count() == 0 {
        return plain::linear(x, weight, bias);
    }
    let x = x.contiguous()?;
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().unwrap_or(&0);
    let (out_dim, w_in) = weight.dims2()?;
    if w_in != in_dim {
        return Err(crate::Error::msg(format!(
            "linear: input {dims:?} against weight {:?}",
            weight.dims()
        )));
    }
    let weight = weight.contiguous()?;
    let op = LinearOp {
        has_bias: bias.is_some(),
    };
    Ok(match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, op)?,
        None => {
            let zero = Tensor::zeros(out_dim, DType::F32, x.device())?;
            x.apply_op3(&weight, &zero, op)?
        }
    })
}

/// The same computations from plain candle ops (differentiable by candle's
/// autograd); the path for non-CPU devices and the reference in tests.
pub mod plain {
    use candle_core::{D, Tensor};

    use crate::Result;
    use crate::nn::precision::like;

    pub fn group_norm(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xg = x.reshape((b, groups, ()))?;
        let y = normalize_last_dim(&xg, eps)?.reshape(dims.as_slice())?;
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        let w = weight.reshape(shape.as_slice())?;
        let bb = bias.reshape(shape.as_slice())?;
        let y = y.broadcast_mul(&w)?.broadcast_add(&bb)?;
        Ok(if silu { y.silu()? } else { y })
    }

    pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let y = normalize_last_dim(x, eps)?;
        Ok(y.broadcast_mul(weight)?.broadcast_add(bias)?)
    }

    /// (x − mean) / sqrt(var + eps) over the last dimension (biased variance).
    pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?)
    }

    /// The max is subtracted as a constant (softmax is invariant to it), so
    /// the gradient flows through plain ops.
    pub fn softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
        let x = if scale != 1.0 {
            (x * scale)?
        } else {
            x.clone()
        };
        let m = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&m)?.exp()?;
        let s = e.sum_keepdim(D::Minus1)?;
        Ok(e.broadcast_div(&s)?)
    }

    pub fn geglu(h: &Tensor) -> Result<Tensor> {
        let half = h.dim(D::Minus1)? / 2;
        let a = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?;
        Ok((a * gate.gelu_erf()?)?)
    }

    pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        let weight = like(weight, x)?;
        // A frozen weight (LoRA, a frozen text encoder) gets no gradient computed.
        let y = crate::nn::lora::matmul(&x.reshape((rows, in_dim))?, &weight.t()?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(&like(b, &y)?)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = weight.dim(0)?;
        Ok(y.reshape(out)?)
    }

    pub fn add_bias(y: &Tensor, bias: &Tensor, dim: usize) -> Result<Tensor> {
        let mut shape = vec![1usize; y.rank()];
        shape[dim] = bias.elem_count();
        Ok(y.broadcast_add(&like(bias, y)?.reshape(shape)?)?)
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The f32 elements of a contiguous CPU tensor (`what` names it in errors).
pub(crate) fn slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("{what}: only f32 is supported"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Splits `rows` into about 4 blocks per thread (at least 1 row each).
fn row_block(rows: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    rows.div_ceil(4 * t).max(1)
}

#[inline]
fn sigmoid(z: f32) -> f32 {
    super::vmath::sigmoid(z)
}

/// Exact GELU and its derivative at x.
#[inline]
fn gelu_and_grad(x: f32) -> (f32, f32) {
    // e^(−x²/2): the density's exponential, and erf's at x/√2.
    let e = super::vmath::exp(-0.5 * x * x);
    let cdf = 0.5 * (1.0 + super::vmath::erf_given_exp(x * std::f32::consts::FRAC_1_SQRT_2, e));
    let pdf = e * 0.398_942_3; // 1/sqrt(2π)
    (x * cdf, cdf + x * pdf)
}

/// Mean and 1/sqrt(var + eps) of a slice, accumulated in f64.
#[inline]
fn moments(v: &[f32], eps: f64) -> (f32, f32) {
    let n = v.len() as f64;
    let mean = super::vmath::sum(v) / n;
    let var = super::vmath::sum_sq_dev(v, mean as f32) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// One channel of the GroupNorm(+SiLU) backward: writes dz·w into `out` and
/// returns (Σ dz·xhat, Σ dz), accumulated in vector lanes.
#[inline(always)]
fn group_norm_channel_grad(
    out: &mut [f32],
    x: &[f32],
    g: &[f32],
    (mean, rstd): (f32, f32),
    (wk, bk): (f32, f32),
    silu: bool,
) -> (f32, f32) {
    const L: usize = 16;
    let (mut dw, mut db) = ([0f32; L], [0f32; L]);
    let one = |xv: f32, gv: f32| {
        let xh = (xv - mean) * rstd;
        let gz = if silu {
            let z = xh * wk + bk;
            let sg = sigmoid(z);
            gv * sg * (1.0 + z * (1.0 - sg))
        } else {
            gv
        };
        (xh, gz)
    };
    let full = x.len() - x.len() % L;
    for ((oc, xc), gc) in out[..full]
        .chunks_exact_mut(L)
        .zip(x[..full].chunks_exact(L))
        .zip(g[..full].chunks_exact(L))
    {
        for l in 0..L {
            let (xh, gz) = one(xc[l], gc[l]);
            dw[l] += gz * xh;
            db[l] += gz;
            oc[l] = gz * wk;
        }
    }
    let (mut tw, mut tb) = (0f32, 0f32);
    for ((o, &xv), &gv) in out[full..].iter_mut().zip(&x[full..]).zip(&g[full..]) {
        let (xh, gz) = one(xv, gv);
        tw += gz * xh;
        tb += gz;
        *o = gz * wk;
    }
    (dw.iter().sum::<f32>() + tw, db.iter().sum::<f32>() + tb)
}

/// Splits a flat (n + 2·c) gradient buffer into (dx shaped like x, dw, db).
fn split3(
    flat: Tensor,
    x_shape: &Shape,
    c: usize,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let n = x_shape.elem_count();
    let dx = flat.narrow(0, 0, n)?.reshape(x_shape)?;
    let dw = flat.narrow(0, n, c)?;
    let db = flat.narrow(0, n + c, c)?;
    Ok((Some(dx), Some(dw), Some(db)))
}

// ---------------------------------------------------------------------------
// GroupNorm (+ SiLU)
// ---------------------------------------------------------------------------

/// (mean, 1/std) per (sample, group) of a GroupNorm input.
type GroupStats = std::sync::Arc<Vec<(f32, f32)>>;

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
    /// (mean, 1/std) of every (sample, group), from the forward for the
    /// backward (which otherwise reads x once more to recompute them).
    stats: std::sync::Mutex<Option<GroupStats>>,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "fused-group-norm"
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
        let x = slice(s1, l1, "group_norm")?;
        let w = slice(s2, l2, "group_norm")?;
        let b = slice(s3, l3, "group_norm")?;
        let dims = l1.dims();
        let c = dims[1];
        let g = self.groups;
        if !c.is_multiple_of(g) || w.len() != c || b.len() != c {
            candle_core::bail!(
                "group_norm: {c} channels, {g} groups, weight {} bias {}",
                w.len(),
                b.len()
            );
        }
        let s: usize = dims[2..].iter().product();
        let cpg = c / g;
        let mut y = super::im2col::uninit_vec(x.len());
        let mut stats = vec![(0f32, 0f32); x.len() / (cpg * s).max(1)];
        y.par_chunks_mut(cpg * s)
            .zip(x.par_chunks(cpg * s))
            .zip(stats.par_iter_mut())
            .enumerate()
            .for_each(|(bg, ((yo, xi), st))| {
                super::vmath::simd(|| {
                    let (mean, rstd) = moments(xi, self.eps);
                    *st = (mean, rstd);
                    let c0 = (bg % g) * cpg;
                    for k in 0..cpg {
                        let (a, sh) = (rstd * w[c0 + k], b[c0 + k] - mean * rstd * w[c0 + k]);
                        let (yr, xr) = (&mut yo[k * s..(k + 1) * s], &xi[k * s..(k + 1) * s]);
                        if self.silu {
                            for (o, &v) in yr.iter_mut().zip(xr) {
                                let z = v * a + sh;
                                o.write(z * sigmoid(z));
                            }
                        } else {
                            for (o, &v) in yr.iter_mut().zip(xr) {
                                o.write(v * a + sh);
                            }
                        }
                    }
                })
            });
        if let Ok(mut slot) = self.stats.lock() {
            *slot = Some(std::sync::Arc::new(stats));
        }
        Ok((
            CpuStorage::F32(super::im2col::assume_init(y)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw, db) =
                crate::cuda::norm_bwd::group_norm(x, w, b, grad, self.groups, self.eps, self.silu)?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let wb = Tensor::cat(&[w, b], 0)?;
        let flat = x.apply_op3_no_bwd(
            &grad.contiguous()?,
            &wb,
            &GroupNormBwd {
                groups: self.groups,
                eps: self.eps,
                silu: self.silu,
                stats: self.stats.lock().ok().and_then(|s| s.clone()),
            },
        )?;
        split3(flat, x.shape(), w.elem_count())
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
        let gs = super::gpu_plan::Groups::of(l1.dims(), self.groups)?;
        let plan = super::gpu_plan::group_norm_fwd(
            super::gpu_plan::kernel_suffix(s1.dtype())?,
            gs,
            self.eps as f32,
            self.silu,
        );
        let y = crate::cuda::exec::run(&plan, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((y, l1.shape().clone()))
    }
}

/// (x, dy, [w; b]) → flat [dx; dw; db].
struct GroupNormBwd {
    groups: usize,
    eps: f64,
    silu: bool,
    /// The forward's (mean, 1/std) per (sample, group), when it kept them.
    stats: Option<GroupStats>,
}

impl CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "fused-group-norm-bwd"
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
        let x = slice(s1, l1, "group_norm bwd")?;
        let dy = slice(s2, l2, "group_norm bwd")?;
        let wb = slice(s3, l3, "group_norm bwd")?;
        let dims = l1.dims();
        let (bsz, c) = (dims[0], dims[1]);
        let (w, b) = wb.split_at(c);
        let g = self.groups;
        let s: usize = dims[2..].iter().product();
        let cpg = c / g;
        let n = x.len();
        let stats = self
            .stats
            .as_deref()
            .filter(|st| st.len() * cpg * s == n && cpg * s > 0);
        // [dx; dw; db] in one buffer (dw, db summed into below).
        let mut out = uninit_vec(n + 2 * c);
        // Per-(sample, channel) partial sums of dw and db, reduced over the batch below.
        let mut part = vec![0f32; bsz * c * 2];
        out[..n]
            .par_chunks_mut(cpg * s)
            .zip(part.par_chunks_mut(cpg * 2))
            .enumerate()
            .for_each(|(bg, (dxo, pw))| {
                let dxo = zeroed(dxo);
                super::vmath::simd(|| {
                    let xi = &x[bg * cpg * s..(bg + 1) * cpg * s];
                    let gi = &dy[bg * cpg * s..(bg + 1) * cpg * s];
                    let (mean, rstd) = match stats {
                        Some(st) => st[bg],
                        None => moments(xi, self.eps),
                    };
                    let c0 = (bg % g) * cpg;
                    // Pass 1: dxhat = dz · w (dz: the gradient before the
                    // affine) into dxo as scratch, and per channel dw = Σ dz·xhat,
                    // db = Σ dz; then Σ dxhat = Σ_k w_k·db_k and
                    // Σ dxhat·xhat = Σ_k w_k·dw_k.
                    let (mut s1, mut s2) = (0f64, 0f64);
                    for k in 0..cpg {
                        let (wk, bk) = (w[c0 + k], b[c0 + k]);
                        let r = k * s..(k + 1) * s;
                        let (dw, db) = group_norm_channel_grad(
                            &mut dxo[r.clone()],
                            &xi[r.clone()],
                            &gi[r],
                            (mean, rstd),
                            (wk, bk),
                            self.silu,
                        );
                        s1 += (wk * db) as f64;
                        s2 += (wk * dw) as f64;
                        pw[2 * k] = dw;
                        pw[2 * k + 1] = db;
                    }
                    let m = (cpg * s) as f64;
                    let (m1, m2) = ((s1 / m) as f32, (s2 / m) as f32);
                    for (o, &xv) in dxo.iter_mut().zip(xi) {
                        let xh = (xv - mean) * rstd;
                        *o = rstd * (*o - m1 - xh * m2);
                    }
                })
            });
        zeroed(&mut out[n..]);
        let mut out = assume_init(out);
        for bi in 0..bsz {
            for ch in 0..c {
                out[n + ch] += part[(bi * c + ch) * 2];
                out[n + c + ch] += part[(bi * c + ch) * 2 + 1];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

// ---------------------------------------------------------------------------
// LayerNorm over the last dimension
// ---------------------------------------------------------------------------

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let x = slice(s1, l1, "layer_norm")?;
        let w = slice(s2, l2, "layer_norm")?;
        let b = slice(s3, l3, "layer_norm")?;
        let d = *l1.dims().last().unwrap_or(&1);
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "layer_norm: last dim {d}, weight {} bias {}",
                w.len(),
                b.len()
            );
        }
        let mut y = uninit_vec(x.len());
        let rb = row_block(x.len() / d.max(1));
        y.par_chunks_mut(rb * d)
            .zip(x.par_chunks(rb * d))
            .for_each(|(yb, xb)| {
                let yb = zeroed(yb);
                super::vmath::simd(|| {
                    for (yr, xr) in yb.chunks_mut(d).zip(xb.chunks(d)) {
                        let (mean, rstd) = moments(xr, self.eps);
                        for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                            *o = (v - mean) * rstd * wv + bv;
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(assume_init(y)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw, db) = crate::cuda::norm_bwd::layer_norm(x, w, grad, self.eps)?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let flat = x.apply_op3_no_bwd(&grad.contiguous()?, w, &LayerNormBwd { eps: self.eps })?;
        split3(flat, x.shape(), w.elem_count())
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
        let (rows, d) = super::gpu_plan::rows(l1.dims());
        let plan = super::gpu_plan::layer_norm_fwd(
            super::gpu_plan::kernel_suffix(s1.dtype())?,
            rows,
            d,
            self.eps as f32,
        );
        let y = crate::cuda::exec::run(&plan, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((y, l1.shape().clone()))
    }
}

/// (x, dy, w) → flat [dx; dw; db].
struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
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
        let x = slice(s1, l1, "layer_norm bwd")?;
        let dy = slice(s2, l2, "layer_norm bwd")?;
        let w = slice(s3, l3, "layer_norm bwd")?;
        let d = w.len();
        let n = x.len();
        let rb = row_block(n / d.max(1));
        // [dx; dw; db] in one buffer (no reallocation copy of dx at the end).
        let mut out = uninit_vec(n + 2 * d);
        let parts: Vec<Vec<f32>> = out[..n]
            .par_chunks_mut(rb * d)
            .zip(x.par_chunks(rb * d).zip(dy.par_chunks(rb * d)))
            .map(|(dxb, (xb, gb))| {
                let dxb = zeroed(dxb);
                super::vmath::simd(|| {
                    let mut p = vec![0f32; 2 * d];
                    let (pw, pb) = p.split_at_mut(d);
                    for ((dxr, xr), gr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(gb.chunks(d)) {
                        let (mean, rstd) = moments(xr, self.eps);
                        // dxhat = g·w into dxr first, then Σ dxhat and
                        // Σ dxhat·xhat in vector lanes.
                        for ((((o, &xv), &gv), &wv), (pwv, pbv)) in dxr
                            .iter_mut()
                            .zip(xr)
                            .zip(gr)
                            .zip(w)
                            .zip(pw.iter_mut().zip(pb.iter_mut()))
                        {
                            let xh = (xv - mean) * rstd;
                            *pwv += gv * xh;
                            *pbv += gv;
                            *o = gv * wv;
                        }
                        let a1 = super::vmath::sum(dxr) as f32;
                        let a2 = super::vmath::dot_dev(dxr, xr, mean) * rstd;
                        let (m1, m2) = (a1 / d as f32, a2 / d as f32);
                        for (o, &xv) in dxr.iter_mut().zip(xr) {
                            let xh = (xv - mean) * rstd;
                            *o = rstd * (*o - m1 - xh * m2);
                        }
                    }
                    p
                })
            })
            .collect();
        zeroed(&mut out[n..]);
        let mut out = assume_init(out);
        for p in parts {
            for (o, v) in out[n..].iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }
}

// ---------------------------------------------------------------------------
// Softmax over the last dimension
// ---------------------------------------------------------------------------

pub(crate) struct SoftmaxOp {
    pub(crate) scale: f64,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "softmax")?;
        let d = *l.dims().last().unwrap_or(&1);
        let scale = self.scale as f32;
        let mut y = uninit_vec(x.len());
        let rb = row_block(x.len() / d.max(1));
        y.par_chunks_mut(rb * d)
            .zip(x.par_chunks(rb * d))
            .for_each(|(yb, xb)| {
                let yb = zeroed(yb);
                super::vmath::simd(|| {
                    for (yr, xr) in yb.chunks_mut(d).zip(xb.chunks(d)) {
                        yr.copy_from_slice(xr);
                        super::vmath::softmax_in_place(yr, scale);
                    }
                })
            });
        Ok((CpuStorage::F32(assume_init(y)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = SoftmaxBwd { scale: self.scale };
        let grad = grad.to_dtype(y.dtype())?.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&grad, &op)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d) = super::gpu_plan::rows(l.dims());
        let plan = super::gpu_plan::softmax_fwd(
            super::gpu_plan::kernel_suffix(s.dtype())?,
            rows,
            d,
            self.scale as f32,
        );
        Ok((crate::cuda::exec::run(&plan, &[(s, l)])?, l.shape().clone()))
    }
}

/// (y, dy) → dx = scale · y · (dy − Σ dy·y).
pub(crate) struct SoftmaxBwd {
    pub(crate) scale: f64,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, "softmax bwd")?;
        let g = slice(s2, l2, "softmax bwd")?;
        let d = *l1.dims().last().unwrap_or(&1);
        let scale = self.scale as f32;
        let mut dx = uninit_vec(y.len());
        let rb = row_block(y.len() / d.max(1));
        dx.par_chunks_mut(rb * d)
            .zip(y.par_chunks(rb * d).zip(g.par_chunks(rb * d)))
            .for_each(|(db, (yb, gb))| {
                let db = zeroed(db);
                super::vmath::simd(|| {
                    for ((dr, yr), gr) in db.chunks_mut(d).zip(yb.chunks(d)).zip(gb.chunks(d)) {
                        let dot = super::vmath::dot(yr, gr);
                        for ((o, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                            *o = scale * yv * (gv - dot);
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(assume_init(dx)), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d) = super::gpu_plan::rows(l1.dims());
        let plan = super::gpu_plan::softmax_bwd(
            super::gpu_plan::kernel_suffix(s1.dtype())?,
            rows,
            d,
            self.scale as f32,
        );
        let dx = crate::cuda::exec::run(&plan, &[(s1, l1), (s2, l2)])?;
        Ok((dx, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------
// GEGLU
// ---------------------------------------------------------------------------

struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = slice(s, l, "geglu")?;
        let dims = l.dims();
        let d2 = *dims.last().unwrap_or(&0);
        if !d2.is_multiple_of(2) {
            candle_core::bail!("geglu: last dimension {d2} is odd");
        }
        let d = d2 / 2;
        let rows = h.len() / d2.max(1);
        let mut y = super::im2col::uninit_vec(rows * d);
        let rb = row_block(rows);
        y.par_chunks_mut(rb * d)
            .zip(h.par_chunks(rb * d2))
            .for_each(|(yb, hb)| {
                super::vmath::simd(|| {
                    for (yr, hr) in yb.chunks_mut(d).zip(hb.chunks(d2)) {
                        let (a, gate) = hr.split_at(d);
                        for ((o, &av), &gv) in yr.iter_mut().zip(a).zip(gate) {
                            o.write(av * gelu_and_grad(gv).0);
                        }
                    }
                })
            });
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = d;
        Ok((
            CpuStorage::F32(super::im2col::assume_init(y)),
            Shape::from(out_dims),
        ))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.to_dtype(h.dtype())?.contiguous()?;
        Ok(Some(h.apply_op2_no_bwd(&grad, &GegluBwd)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d2) = super::gpu_plan::rows(l.dims());
        if !d2.is_multiple_of(2) {
            candle_core::bail!("geglu: last dimension {d2} is odd");
        }
        let plan =
            super::gpu_plan::geglu_fwd(super::gpu_plan::kernel_suffix(s.dtype())?, rows, d2 / 2);
        let mut out_dims = l.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = d2 / 2;
        }
        Ok((
            crate::cuda::exec::run(&plan, &[(s, l)])?,
            Shape::from(out_dims),
        ))
    }
}

/// (h, dy) → dh = [dy · gelu(gate); dy · a · gelu'(gate)].
struct GegluBwd;

impl CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "fused-geglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = slice(s1, l1, "geglu bwd")?;
        let g = slice(s2, l2, "geglu bwd")?;
        let d2 = *l1.dims().last().unwrap_or(&0);
        let d = d2 / 2;
        let rows = h.len() / d2.max(1);
        let mut dh = uninit_vec(h.len());
        let rb = row_block(rows);
        dh.par_chunks_mut(rb * d2)
            .zip(h.par_chunks(rb * d2).zip(g.par_chunks(rb * d)))
            .for_each(|(db, (hb, gb))| {
                let db = zeroed(db);
                super::vmath::simd(|| {
                    for ((dr, hr), gr) in db.chunks_mut(d2).zip(hb.chunks(d2)).zip(gb.chunks(d)) {
                        let (a, gate) = hr.split_at(d);
                        let (da, dgate) = dr.split_at_mut(d);
                        let it = da.iter_mut().zip(dgate.iter_mut());
                        for ((da, dg), ((&gv, &av), &gl)) in it.zip(gr.iter().zip(a).zip(gate)) {
                            let (y, dy) = gelu_and_grad(gl);
                            *da = gv * y;
                            *dg = gv * av * dy;
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(assume_init(dh)), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d2) = super::gpu_plan::rows(l1.dims());
        let plan =
            super::gpu_plan::geglu_bwd(super::gpu_plan::kernel_suffix(s1.dtype())?, rows, d2 / 2);
        let dh = crate::cuda::exec::run(&plan, &[(s1, l1), (s2, l2)])?;
        Ok((dh, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------
// Bias add along one dimension
// ---------------------------------------------------------------------------

/// (outer, c, inner) sizes of `dims` around dimension `dim`.
fn split_dims(dims: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = dims[..dim].iter().product();
    let inner = dims[dim + 1..].iter().product();
    (outer, dims[dim], inner)
}

struct AddOp;

impl CustomOp2 for AddOp {
    fn name(&self) -> &'static str {
        "fused-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1, "add")?;
        let b = slice(s2, l2, "add")?;
        if a.len() != b.len() {
            candle_core::bail!("add: shapes {:?} and {:?}", l1.dims(), l2.dims());
        }
        let mut out = super::im2col::uninit_vec(a.len());
        const BLOCK: usize = 1 << 14;
        out.par_chunks_mut(BLOCK)
            .zip(a.par_chunks(BLOCK).zip(b.par_chunks(BLOCK)))
            .for_each(|(o, (a, b))| {
                for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                    o.write(x + y);
                }
            });
        Ok((
            CpuStorage::F32(super::im2col::assume_init(out)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(grad.clone())))
    }
}

struct BiasAddOp {
    dim: usize,
}

impl CustomOp2 for BiasAddOp {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, "bias add")?;
        let b = slice(s2, l2, "bias add")?;
        let (_, c, inner) = split_dims(l1.dims(), self.dim);
        if b.len() != c {
            candle_core::bail!(
                "bias add: {} bias values for dimension of size {c}",
                b.len()
            );
        }
        let mut out = uninit_vec(y.len());
        let row = c * inner;
        let rb = row_block(y.len() / row.max(1));
        out.par_chunks_mut(rb * row)
            .zip(y.par_chunks(rb * row))
            .for_each(|(ob, yb)| {
                let ob = zeroed(ob);
                super::vmath::simd(|| {
                    for (or, yr) in ob.chunks_mut(row).zip(yb.chunks(row)) {
                        if inner == 1 {
                            for ((o, &v), &bv) in or.iter_mut().zip(yr).zip(b) {
                                *o = v + bv;
                            }
                        } else {
                            for (k, &bv) in b.iter().enumerate() {
                                let r = k * inner..(k + 1) * inner;
                                for (o, &v) in or[r.clone()].iter_mut().zip(&yr[r]) {
                                    *o = v + bv;
                                }
                            }
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(assume_init(out)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, c, _) = split_dims(y.dims(), self.dim);
        let db = grad
            .contiguous()?
            .apply_op1_no_bwd(&SumAround { dim: self.dim })?;
        debug_assert_eq!(b.elem_count(), c);
        Ok((Some(grad.clone()), Some(db.reshape(b.shape())?)))
    }
}

/// Sums a tensor over every dimension but `dim`: (outer, c, inner) → (c,).
pub(crate) struct SumAround {
    pub(crate) dim: usize,
}

impl CustomOp1 for SumAround {
    fn name(&self) -> &'static str {
        "fused-sum-around"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = slice(s, l, "bias grad")?;
        let (outer, c, inner) = split_dims(l.dims(), self.dim);
        let row = c * inner;
        let rb = row_block(outer);
        let parts: Vec<Vec<f64>> = g
            .par_chunks(rb * row)
            .map(|gb| {
                super::vmath::simd(|| {
                    let mut p = vec![0f64; c];
                    for gr in gb.chunks(row) {
                        if inner == 1 {
                            for (o, &v) in p.iter_mut().zip(gr) {
                                *o += v as f64;
                            }
                        } else {
                            for (k, o) in p.iter_mut().enumerate() {
                                *o += super::vmath::sum(&gr[k * inner..(k + 1) * inner]);
                            }
                        }
                    }
                    p
                })
            })
            .collect();
        let mut out = vec![0f64; c];
        for p in parts {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((
            CpuStorage::F32(out.into_iter().map(|v| v as f32).collect()),
            Shape::from(c),
        ))
    }
}

// ---------------------------------------------------------------------------
// Linear layer
// ---------------------------------------------------------------------------

/// (x, W, b) → x Wᵀ + b (b is zeros and ignored without a bias), through
/// [`super::linear_cpu`].
struct LinearOp {
    has_bias: bool,
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor.
fn with_cpu_slice<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => f(slice(c, l, what)?),
        _ => candle_core::bail!("{what}: tensor is not on the CPU"),
    }
}

impl LinearOp {
    fn dims(x: &Layout, w: &Layout) -> candle_core::Result<super::linear_cpu::Dims> {
        let (output, input) = w.shape().dims2()?;
        let rows = x.shape().elem_count() / input.max(1);
        if x.dims().last() != Some(&input) {
            candle_core::bail!(
                "fused linear: input {:?} against weight {:?}",
                x.dims(),
                w.dims()
            );
        }
        Ok(super::linear_cpu::Dims {
            rows,
            input,
            output,
        })
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let d = Self::dims(l1, l2)?;
        let x = slice(s1, l1, "linear")?;
        let w = slice(s2, l2, "linear")?;
        let bias = if self.has_bias {
            slice(s3, l3, "linear")?
        } else {
            &[]
        };
        let y = super::linear_cpu::forward(x, w, bias, d);
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = d.output;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Self::dims(x.layout(), weight.layout())?;
        let dy = grad.contiguous()?;
        let dev = x.device();
        let want_db = self.has_bias && bias.track_op();
        with_cpu_slice(&dy, "linear backward", |dyv| {
            let dx = if x.track_op() {
                let v = with_cpu_slice(weight, "linear backward", |w| {
                    Ok(super::linear_cpu::grad_input(dyv, w, d))
                })?;
                Some(Tensor::from_vec(v, x.shape(), dev)?)
            } else {
                None
            };
            let (dw, db) = if weight.track_op() || want_db {
                let (dw, db) = with_cpu_slice(x, "linear backward", |xv| {
                    Ok(super::linear_cpu::grad_weight_bias(dyv, xv, d, want_db))
                })?;
                let dw = if weight.track_op() {
                    Some(Tensor::from_vec(dw, weight.shape(), dev)?)
                } else {
                    None
                };
                let db = match db {
                    Some(v) => Some(Tensor::from_vec(v, bias.shape(), dev)?),
                    None => None,
                };
                (dw, db)
            } else {
                (None, None)
            };
            Ok((dx, dw, db))
        })
    }
}
