//! Layout changes as single autograd nodes on the CPU: the 2× nearest
//! upsampling and the skip-connection concatenation of the UNet's up blocks,
//! and the (B, C, H, W) ⇄ (B, H·W, C) transposes around a Transformer2D's
//! token sequence.
//!
//! Built from candle's view ops, each of these is a chain of nodes (reshape,
//! broadcast or transpose, then a copy), and candle's backward gives every
//! node a zero-filled gradient buffer and an add, on one thread; the
//! upsampling's gradient is also a strided sum over a broadcast. Here each is
//! one parallel copy forward and one parallel copy (or 2×2 sum) backward.
//! Other devices and dtypes take the view-op versions in [`plain`], which the
//! tests compare against.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{slice, use_fused};
use super::im2col::{assume_init, uninit_vec};
use crate::Result;

/// (B, C, H, W) → (B, 2H, 2W), every pixel repeated 2×2 (PyTorch's
/// `interpolate(scale_factor=2, mode="nearest")`).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    if !use_fused(x) || x.rank() != 4 || x.elem_count() == 0 {
        return plain::upsample_nearest_2x(x);
    }
    Ok(x.contiguous()?.apply_op1(Upsample2x)?)
}

/// (B, C, H, W) → (B, H·W, C): a feature map as a token sequence.
pub fn map_to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !use_fused(x) || x.elem_count() == 0 {
        return plain::map_to_tokens(x);
    }
    let op = BatchTranspose {
        rows: c,
        cols: h * w,
        out: Shape::from((b, h * w, c)),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// (B, H·W, C) → (B, C, H, W): a token sequence back as a feature map.
pub fn tokens_to_map(t: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, n, c) = t.dims3()?;
    if n != h * w {
        return Err(crate::Error::msg(format!(
            "tokens_to_map: {n} tokens are not a {h}×{w} map"
        )));
    }
    if !use_fused(t) || t.elem_count() == 0 {
        return plain::tokens_to_map(t, h, w);
    }
    let op = BatchTranspose {
        rows: n,
        cols: c,
        out: Shape::from((b, c, h, w)),
    };
    Ok(t.contiguous()?.apply_op1(op)?)
}

/// [a, b] along dimension 1 (channels) for tensors that agree elsewhere: the
/// up blocks' skip connections. candle's concatenation copies on one thread
/// and its backward adds each strided slice of the gradient into a
/// zero-filled buffer; here both directions are one parallel pass.
pub fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    let agree = da.len() == db.len() && da.len() >= 2 && da[0] == db[0] && da[2..] == db[2..];
    // Empty inputs (nothing to copy) take candle's path too.
    if !(use_fused(a) && use_fused(b) && agree && a.elem_count() > 0 && b.elem_count() > 0) {
        return plain::cat_channels(a, b);
    }
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, CatChannels)?)
}

/// The same functions from candle's view ops (every device and dtype).
pub mod plain {
    use candle_core::Tensor;

    use crate::Result;

    pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        Ok(x.reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, 2 * h, 2 * w))?)
    }

    pub fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(Tensor::cat(&[a, b], 1)?)
    }

    pub fn map_to_tokens(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        Ok(x.reshape((b, c, h * w))?.transpose(1, 2)?)
    }

    pub fn tokens_to_map(t: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, c) = t.dims3()?;
        Ok(t.transpose(1, 2)?.reshape((b, c, h, w))?)
    }
}

/// Nearest 2× upsampling of every (H, W) plane.
struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "upsample_nearest_2x")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let mut out = uninit_vec(x.len() * 4);
        out.par_chunks_mut(4 * h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, p)| {
                for (y, row) in p.chunks_exact(w).enumerate() {
                    let (top, bottom) = o[4 * y * w..4 * (y + 1) * w].split_at_mut(2 * w);
                    for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
                        pair[0].write(v);
                        pair[1].write(v);
                    }
                    bottom.copy_from_slice(top);
                }
            });
        Ok((
            CpuStorage::F32(assume_init(out)),
            Shape::from((b, c, 2 * h, 2 * w)),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Sum2x2)?))
    }
}

/// The gradient of [`Upsample2x`]: each output pixel sums its 2×2 block.
struct Sum2x2;

impl CustomOp1 for Sum2x2 {
    fn name(&self) -> &'static str {
        "sum-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = slice(s, l, "upsample_nearest_2x backward")?;
        let (b, c, h2, w2) = l.shape().dims4()?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!("upsample_nearest_2x backward: odd gradient size {h2}×{w2}");
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let mut out = uninit_vec(g.len() / 4);
        out.par_chunks_mut(h * w)
            .zip(g.par_chunks(4 * h * w))
            .for_each(|(o, p)| {
                for (row, pair) in o.chunks_exact_mut(w).zip(p.chunks_exact(2 * w2)) {
                    let (top, bottom) = pair.split_at(w2);
                    for (i, v) in row.iter_mut().enumerate() {
                        v.write(top[2 * i] + top[2 * i + 1] + bottom[2 * i] + bottom[2 * i + 1]);
                    }
                }
            });
        Ok((CpuStorage::F32(assume_init(out)), Shape::from((b, c, h, w))))
    }
}

/// Reads a contiguous tensor as (B, rows, cols) and writes its (B, cols, rows)
/// transpose, shaped `out`. Its gradient is the transpose back.
struct BatchTranspose {
    rows: usize,
    cols: usize,
    out: Shape,
}

impl CustomOp1 for BatchTranspose {
    fn name(&self) -> &'static str {
        "batch-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "batch transpose")?;
        let (r, c) = (self.rows, self.cols);
        if r * c == 0 || x.len() % (r * c) != 0 || x.len() != self.out.elem_count() {
            candle_core::bail!(
                "batch transpose: {:?} is not a batch of {r}×{c} matrices shaped {:?}",
                l.dims(),
                self.out
            );
        }
        let mut out = uninit_vec(x.len());
        // Each task writes JB output rows (source columns j0..j0+JB): it reads
        // runs of JB contiguous values from every source row and writes every
        // output row in order.
        const JB: usize = 16;
        out.par_chunks_mut(r * c)
            .zip(x.par_chunks(r * c))
            .for_each(|(o, m)| {
                o.par_chunks_mut(JB * r).enumerate().for_each(|(jb, o)| {
                    let j0 = jb * JB;
                    let n = o.len() / r;
                    for (i, src) in m.chunks_exact(c).enumerate() {
                        for (jj, &v) in src[j0..j0 + n].iter().enumerate() {
                            o[jj * r + i].write(v);
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(assume_init(out)), self.out.clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let back = BatchTranspose {
            rows: self.cols,
            cols: self.rows,
            out: arg.shape().clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// (B, Ca, ...) and (B, Cb, ...) → (B, Ca + Cb, ...).
struct CatChannels;

/// Elements per image of each input: (a, b).
fn cat_sizes(la: &Layout, lb: &Layout) -> (usize, usize) {
    let per = |l: &Layout| l.shape().elem_count() / l.dims()[0].max(1);
    (per(la), per(lb))
}

impl CustomOp2 for CatChannels {
    fn name(&self) -> &'static str {
        "cat-channels"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice(sa, la, "cat_channels")?;
        let b = slice(sb, lb, "cat_channels")?;
        let (na, nb) = cat_sizes(la, lb);
        let mut out = uninit_vec(a.len() + b.len());
        if na + nb > 0 {
            out.par_chunks_mut(na + nb)
                .zip(a.par_chunks(na.max(1)).zip(b.par_chunks(nb.max(1))))
                .for_each(|(o, (a, b))| {
                    let (oa, ob) = o.split_at_mut(na);
                    for (d, &v) in oa.iter_mut().zip(a) {
                        d.write(v);
                    }
                    for (d, &v) in ob.iter_mut().zip(b) {
                        d.write(v);
                    }
                });
        }
        let mut dims = la.dims().to_vec();
        dims[1] += lb.dims()[1];
        Ok((CpuStorage::F32(assume_init(out)), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ga = grad.contiguous()?.apply_op1_no_bwd(&SplitChannels {
            a: true,
            shape: a.shape().clone(),
            other: b.elem_count(),
        })?;
        let gb = grad.contiguous()?.apply_op1_no_bwd(&SplitChannels {
            a: false,
            shape: b.shape().clone(),
            other: a.elem_count(),
        })?;
        Ok((Some(ga), Some(gb)))
    }
}

/// One input's part of a [`CatChannels`] gradient: the first (`a`) or the
/// second channel block of every image, shaped `shape`; `other` is the other
/// input's element count.
struct SplitChannels {
    a: bool,
    shape: Shape,
    other: usize,
}

impl CustomOp1 for SplitChannels {
    fn name(&self) -> &'static str {
        "cat-channels-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = slice(s, l, "cat_channels backward")?;
        let n = self.shape.elem_count();
        let batch = self.shape.dims().first().copied().unwrap_or(1).max(1);
        if g.len() != n + self.other {
            candle_core::bail!(
                "cat_channels backward: gradient {:?} for part {:?}",
                l.dims(),
                self.shape
            );
        }
        let (mine, theirs) = (n / batch, self.other / batch);
        let mut out = uninit_vec(n);
        if mine > 0 {
            out.par_chunks_mut(mine)
                .zip(g.par_chunks(mine + theirs))
                .for_each(|(o, gi)| {
                    let src = if self.a { &gi[..mine] } else { &gi[theirs..] };
                    for (d, &v) in o.iter_mut().zip(src) {
                        d.write(v);
                    }
                });
        }
        Ok((CpuStorage::F32(assume_init(out)), self.shape.clone()))
    }
}
