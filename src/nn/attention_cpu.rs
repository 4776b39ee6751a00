//! Multi-head attention on the CPU as one autograd node, one (image, head)
//! at a time: `S = scale · Q_h K_hᵀ`, a row softmax in place, `O_h = P V_h`
//! written straight into the head's columns of the (B, N, C) output. Heads
//! are read in place from the (B, N, C) projections through strided GEMMs
//! (no split / merge copies), and only one head's (N, M) scores exist at a
//! time per thread: the probabilities are not kept for the backward pass,
//! which recomputes them (as flash attention does). That saves
//! B·heads·N·M floats per attention layer — 537 MB per SD 1.5 self-attention
//! layer at 512 px. A head whose scores would pass [`MAX_SCORES`] (64 MiB)
//! goes a block of query rows at a time (1 GiB per thread otherwise for
//! 128×128 latents), forward and backward.
//!
//! Backward, per (image, head): P again, `dV_h = Pᵀ dO_h`, `dP = dO_h V_hᵀ`,
//! `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ_h = dS K_h`,
//! `dK_h = dSᵀ Q_h`.
//!
//! With at least as many (image, head) pairs as threads the pairs are spread
//! over rayon's threads with single-threaded GEMMs; otherwise they go one by
//! one with multi-threaded GEMMs.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{View, matmul_into, matmul_into_raw};
use super::im2col::par_zeros;

/// The f32 elements of a contiguous CPU tensor.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::fused::slice(s, l, &format!("attention {what}"))
}

/// The shapes of one attention call: q (B, N, C), k and v (B, M, C).
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    n: usize,
    m: usize,
    c: usize,
    heads: usize,
    /// The most score elements (query rows × M) a thread holds at once
    /// ([`MAX_SCORES`]).
    max_scores: usize,
}

/// The most score elements one (image, head) holds at a time (16 Mi floats,
/// 64 MiB): SD 1.5's 64×64 self-attention at 512 px fits whole, larger
/// images (128×128 latents: 1 GiB per pair) go a block of query rows at a time.
pub const MAX_SCORES: usize = 1 << 24;

impl Dims {
    fn from_layouts(
        q: &[usize],
        k: &[usize],
        v: &[usize],
        heads: usize,
    ) -> candle_core::Result<Self> {
        let a = super::gpu_plan::AttentionDims::of(q, k, v, heads)?;
        Ok(Self {
            b: a.b,
            n: a.n,
            m: a.m,
            c: a.heads * a.d,
            heads,
            max_scores: MAX_SCORES,
        })
    }
    /// The blocks of query rows `n0..n1`, each with at most `max_scores`
    /// scores (at least one row).
    fn row_blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let rows = (self.max_scores / self.m.max(1)).clamp(1, self.n.max(1));
        let n = self.n;
        (0..n).step_by(rows).map(move |n0| (n0, (n0 + rows).min(n)))
    }
    /// The shapes and the f32 data of (q, k, v) as a custom op receives them.
    fn inputs<'a>(
        [(s1, l1), (s2, l2), (s3, l3)]: [(&'a CpuStorage, &Layout); 3],
        heads: usize,
        max_scores: usize,
    ) -> candle_core::Result<(Self, [&'a [f32]; 3])> {
        let mut d = Self::from_layouts(l1.dims(), l2.dims(), l3.dims(), heads)?;
        d.max_scores = max_scores;
        let data = [
            f32_slice(s1, l1, "q")?,
            f32_slice(s2, l2, "k")?,
            f32_slice(s3, l3, "v")?,
        ];
        Ok((d, data))
    }
    fn d(&self) -> usize {
        self.c / self.heads
    }
    /// Head h of image bi of a (B, rows, C) buffer, as a (rows, d) view.
    fn head<'a>(&self, x: &'a [f32], rows: usize, bi: usize, h: usize) -> View<'a> {
        self.head_rows(x, rows, bi, h, (0, rows))
    }
    /// Rows n0..n1 of head h of image bi of a (B, rows, C) buffer, as a view.
    fn head_rows<'a>(
        &self,
        x: &'a [f32],
        rows: usize,
        bi: usize,
        h: usize,
        (n0, n1): (usize, usize),
    ) -> View<'a> {
        View {
            data: &x[self.head_offset(rows, bi, h) + n0 * self.c..],
            rows: n1 - n0,
            cols: self.d(),
            rs: self.c,
            cs: 1,
        }
    }
    /// Offset of head h of image bi in a (B, rows, C) buffer.
    fn head_offset(&self, rows: usize, bi: usize, h: usize) -> usize {
        bi * rows * self.c + h * self.d()
    }
    fn pairs_in_parallel(&self) -> bool {
        let t = super::cpu::num_threads();
        t > 1 && self.b * self.heads >= t
    }
}

/// A pointer to a buffer whose disjoint parts are written by several threads.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every user writes a set of elements no other thread touches
// (one attention head's columns), and the buffer outlives the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element `offset` places in (a method, so closures capture the
    /// whole `Sync` wrapper rather than the raw pointer field).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `s` (rows of length m) ← softmax(scale · s), row by row.
fn softmax_rows(s: &mut [f32], m: usize, scale: f32) {
    super::vmath::simd(|| softmax_rows_inner(s, m, scale))
}

#[inline(always)]
fn softmax_rows_inner(s: &mut [f32], m: usize, scale: f32) {
    for row in s.chunks_exact_mut(m) {
        super::vmath::softmax_in_place(row, scale);
    }
}

/// P (rows n0..n1, M) of one (image, head) into `p`.
#[allow(clippy::too_many_arguments)]
fn probabilities(
    q: &[f32],
    k: &[f32],
    d: &Dims,
    (bi, h): (usize, usize),
    rows: (usize, usize),
    p: &mut Vec<f32>,
    par: bool,
    scale: f32,
) {
    let len = (rows.1 - rows.0) * d.m;
    p.resize(len, 0.0);
    let (qh, kh) = (d.head_rows(q, d.n, bi, h, rows), d.head(k, d.m, bi, h));
    matmul_into(&mut p[..len], d.m, false, qh, kh.t(), par);
    softmax_rows(&mut p[..len], d.m, scale);
}

/// Runs `f(bi, h, scratch, parallel_gemm)` for every (image, head).
fn for_pairs<F>(d: &Dims, f: F)
where
    F: Fn(usize, usize, &mut [Vec<f32>; 2], bool) + Send + Sync,
{
    let pairs = d.b * d.heads;
    if d.pairs_in_parallel() {
        (0..pairs)
            .into_par_iter()
            .for_each_init(Default::default, |s, i| {
                f(i / d.heads, i % d.heads, s, false)
            });
    } else {
        let mut s = Default::default();
        for i in 0..pairs {
            f(i / d.heads, i % d.heads, &mut s, true);
        }
    }
}

fn forward(q: &[f32], k: &[f32], v: &[f32], d: &Dims, scale: f32) -> Vec<f32> {
    let mut out = par_zeros(d.b * d.n * d.c);
    let dst = SharedOut(out.as_mut_ptr());
    for_pairs(d, |bi, h, [p, _], par| {
        for rows in d.row_blocks() {
            probabilities(q, k, d, (bi, h), rows, p, par, scale);
            // SAFETY: head h of image bi owns rows bi·N.. of columns
            // h·d..(h+1)·d of `out`; no other pair writes them, and `out`
            // lives until the loop ends.
            unsafe {
                matmul_into_raw(
                    dst.at(d.head_offset(d.n, bi, h) + rows.0 * d.c),
                    d.c,
                    false,
                    View::rows(p, rows.1 - rows.0, d.m),
                    d.head(v, d.m, bi, h),
                    par,
                )
            };
        }
    });
    out
}

/// Flat [dq (B, N, C); dk (B, M, C); dv (B, M, C)].
fn backward(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], d: &Dims, scale: f32) -> Vec<f32> {
    let (nq, nk) = (d.b * d.n * d.c, d.b * d.m * d.c);
    let mut grads = par_zeros(nq + 2 * nk);
    let base = grads.as_mut_ptr();
    // SAFETY: the three regions are disjoint parts of `grads`.
    let (dq, dk, dv) = unsafe {
        (
            SharedOut(base),
            SharedOut(base.add(nq)),
            SharedOut(base.add(nq + nk)),
        )
    };
    for_pairs(d, |bi, h, [p, dp], par| {
        // Query rows a block at a time: dQ's rows are the block's own; dK and
        // dV sum over every block (the first writes, the rest add).
        for (blk, rows) in d.row_blocks().enumerate() {
            let nb = rows.1 - rows.0;
            let acc = blk > 0;
            probabilities(q, k, d, (bi, h), rows, p, par, scale);
            let d_o = d.head_rows(dout, d.n, bi, h, rows);
            let pv = View::rows(p, nb, d.m);
            // SAFETY (all three writes): head h of image bi owns its columns
            // of dq, dk and dv; no other pair touches them during the loop.
            unsafe {
                matmul_into_raw(dv.at(d.head_offset(d.m, bi, h)), d.c, acc, pv.t(), d_o, par);
            }
            dp.resize(nb * d.m, 0.0);
            matmul_into(
                &mut dp[..nb * d.m],
                d.m,
                false,
                d_o,
                d.head(v, d.m, bi, h).t(),
                par,
            );
            super::vmath::simd(|| {
                for (dpr, pr) in dp.chunks_exact_mut(d.m).zip(p.chunks_exact(d.m)).take(nb) {
                    let dot = super::vmath::dot(dpr, pr);
                    for (g, &pv) in dpr.iter_mut().zip(pr) {
                        *g = scale * pv * (*g - dot);
                    }
                }
            });
            let ds = View::rows(dp, nb, d.m);
            unsafe {
                matmul_into_raw(
                    dq.at(d.head_offset(d.n, bi, h) + rows.0 * d.c),
                    d.c,
                    false,
                    ds,
                    d.head(k, d.m, bi, h),
                    par,
                );
                matmul_into_raw(
                    dk.at(d.head_offset(d.m, bi, h)),
                    d.c,
                    acc,
                    ds.t(),
                    d.head_rows(q, d.n, bi, h, rows),
                    par,
                );
            }
        }
    });
    grads
}

/// The forward node: (q, k, v) → attention output (B, N, C).
struct AttentionOp {
    heads: usize,
    scale: f32,
    max_scores: usize,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let (d, [q, k, v]) =
            Dims::inputs([(s1, l1), (s2, l2), (s3, l3)], self.heads, self.max_scores)?;
        Ok((
            CpuStorage::F32(forward(q, k, v, &d, self.scale)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = q.detach().apply_op3_no_bwd(
            &k.detach(),
            &v.detach(),
            &AttentionBwd {
                heads: self.heads,
                scale: self.scale,
                max_scores: self.max_scores,
                grad: grad.contiguous()?,
            },
        )?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let pick = |t: &Tensor, at: usize, n: usize| -> candle_core::Result<Option<Tensor>> {
            Ok(if t.track_op() {
                Some(flat.narrow(0, at, n)?.reshape(t.shape())?)
            } else {
                None
            })
        };
        Ok((pick(q, 0, nq)?, pick(k, nq, nk)?, pick(v, nq + nk, nk)?))
    }
}

/// (q, k, v) and the output gradient → flat [dq; dk; dv].
struct AttentionBwd {
    heads: usize,
    scale: f32,
    max_scores: usize,
    grad: Tensor,
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-bwd"
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
        let (d, [q, k, v]) =
            Dims::inputs([(s1, l1), (s2, l2), (s3, l3)], self.heads, self.max_scores)?;
        let (gs, gl) = self.grad.storage_and_layout();
        let dout = match &*gs {
            candle_core::Storage::Cpu(s) => f32_slice(s, gl, "output gradient")?,
            _ => candle_core::bail!("attention backward: gradient is not on the CPU"),
        };
        if gl.dims() != l1.dims() {
            candle_core::bail!(
                "attention backward: gradient {:?} for q {:?}",
                gl.dims(),
                l1.dims()
            );
        }
        let out = backward(q, k, v, dout, &d, self.scale);
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

/// Attention over `heads` heads of q (B, N, C), k and v (B, M, C), softmax
/// scale `scale`; one autograd node, f32 on the CPU (callers check
/// [`super::fused::use_fused`]).
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    multi_head_attention_blocked(q, k, v, heads, scale, MAX_SCORES)
}

/// [`multi_head_attention`] holding at most `max_scores` scores per (image,
/// head) at a time (blocks of query rows, at least one row): the same
/// result with less memory. `multi_head_attention` uses [`MAX_SCORES`].
pub fn multi_head_attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    max_scores: usize,
) -> candle_core::Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Dims::from_layouts(q.dims(), k.dims(), v.dims(), heads)?;
    q.apply_op3(
        &k,
        &v,
        AttentionOp {
            heads,
            scale: scale as f32,
            max_scores,
        },
    )
}
