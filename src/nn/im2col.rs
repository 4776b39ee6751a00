//! im2col / col2im as candle custom ops, so a convolution on the CPU is one
//! GEMM forward and two GEMMs backward (candle's own CPU conv backward goes
//! through a slow transposed convolution and a huge-kernel convolution).
//!
//! `Im2Col` maps (B, C, H, W) to (C·kh·kw, B·Ho·Wo) with row index
//! c·kh·kw + i·kw + j — the order of a (O, C, kh, kw) weight flattened to
//! (O, C·kh·kw) — and column b·Ho·Wo + pixel. The batch sits in the columns so
//! the convolution is a single (O, C·kh·kw) × (C·kh·kw, B·Ho·Wo) GEMM and the
//! weight gradient another single GEMM (a batched matmul against a broadcast
//! weight would leave candle a (B, O, C·kh·kw) gradient to sum over the batch,
//! a slow strided reduction). Its backward is `Col2Im`, which scatters-adds
//! columns back.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeom {
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.padding - self.kh) / self.stride + 1,
            (w + 2 * self.padding - self.kw) / self.stride + 1,
        )
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("im2col: only f32 is supported on the CPU"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("im2col: input must be contiguous"),
    }
}

pub struct Im2Col(pub ConvGeom);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (b, c, h, w) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout)?;
        let (ho, wo) = g.out_hw(h, w);
        let l = ho * wo;
        let kk = g.kh * g.kw;
        // Every element is written below (zeros where the window hits the
        // padding), so the buffer starts uninitialized.
        let mut out = uninit_vec(c * kk * b * l);
        let zero = std::mem::MaybeUninit::new(0f32);
        // One output row (c, i, j) holds B·L columns.
        out.par_chunks_mut(b * l)
            .enumerate()
            .for_each(|(row_idx, row)| {
                let (ch, ij) = (row_idx / kk, row_idx % kk);
                let (i, j) = (ij / g.kw, ij % g.kw);
                for bi in 0..b {
                    let src = &x[(bi * c + ch) * h * w..(bi * c + ch + 1) * h * w];
                    let row = &mut row[bi * l..(bi + 1) * l];
                    for oy in 0..ho {
                        let y = (oy * g.stride + i) as isize - g.padding as isize;
                        let dst_row = &mut row[oy * wo..(oy + 1) * wo];
                        if y < 0 || y >= h as isize {
                            dst_row.fill(zero);
                            continue;
                        }
                        let src_row = &src[y as usize * w..(y as usize + 1) * w];
                        if g.stride == 1 {
                            // Contiguous run: x = ox + j − padding.
                            let lo = g.padding.saturating_sub(j).min(wo);
                            let hi = (w + g.padding - j).min(wo).max(lo);
                            dst_row[..lo].fill(zero);
                            dst_row[hi..].fill(zero);
                            let s = (lo + j).saturating_sub(g.padding);
                            for (d, &v) in dst_row[lo..hi].iter_mut().zip(&src_row[s..]) {
                                d.write(v);
                            }
                        } else {
                            for (ox, d) in dst_row.iter_mut().enumerate() {
                                let xx = (ox * g.stride + j) as isize - g.padding as isize;
                                d.write(if xx >= 0 && xx < w as isize {
                                    src_row[xx as usize]
                                } else {
                                    0.0
                                });
                            }
                        }
                    }
                }
            });
        let out = assume_init(out);
        Ok((CpuStorage::F32(out), Shape::from((c * kk, b * l))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (b, c, h, w) = arg.dims4()?;
        let op = Col2Im {
            geom: self.0,
            b,
            c,
            h,
            w,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The adjoint of [`Im2Col`]: (C·kh·kw, B·Ho·Wo) → (B, C, H, W), summing overlaps.
pub struct Col2Im {
    pub geom: ConvGeom,
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geom;
        let (b, c, h, w) = (self.b, self.c, self.h, self.w);
        let cols = contiguous_f32(storage, layout)?;
        let (ho, wo) = g.out_hw(h, w);
        let l = ho * wo;
        let kk = g.kh * g.kw;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(bc, dst)| {
            let (bi, ch) = (bc / c, bc % c);
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let r = (ch * kk + i * g.kw + j) * b * l + bi * l;
                    let row = &cols[r..r + l];
                    for oy in 0..ho {
                        let y = (oy * g.stride + i) as isize - g.padding as isize;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        let src_row = &row[oy * wo..(oy + 1) * wo];
                        let dst_row = &mut dst[y as usize * w..(y as usize + 1) * w];
                        if g.stride == 1 {
                            // Contiguous run (as in Im2Col): x = ox + j − padding.
                            let lo = g.padding.saturating_sub(j);
                            let hi = (w + g.padding - j).min(wo);
                            if lo < hi {
                                let s = lo + j - g.padding;
                                for (d, v) in
                                    dst_row[s..s + (hi - lo)].iter_mut().zip(&src_row[lo..hi])
                                {
                                    *d += v;
                                }
                            }
                        } else {
                            for (ox, v) in src_row.iter().enumerate() {
                                let xx = (ox * g.stride + j) as isize - g.padding as isize;
                                if xx >= 0 && xx < w as isize {
                                    dst_row[xx as usize] += v;
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }
}

/// Convolution (groups 1, dilation 1) as im2col + GEMM; differentiable.
pub fn conv2d_im2col(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (o, c, kh, kw) = weight.dims4()?;
    let geom = ConvGeom {
        kh,
        kw,
        stride,
        padding,
    };
    let (ho, wo) = geom.out_hw(h, w);
    let cols = x.contiguous()?.apply_op1(Im2Col(geom))?;
    let w2 = weight.reshape((o, c * kh * kw))?;
    // (O, B·L) → (B, O, Ho, Wo), a strided view the next op copies once.
    super::lora::matmul(&w2, &cols)?
        .reshape((o, b, ho, wo))?
        .transpose(0, 1)
}

/// A 1×1 convolution (stride 1, no padding) as one GEMM over (C, B·H·W).
pub fn conv2d_1x1(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let o = weight.dim(0)?;
    let xc = x
        .reshape((b, c, h * w))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((c, b * h * w))?;
    super::lora::matmul(&weight.reshape((o, c))?, &xc)?
        .reshape((o, b, h, w))?
        .transpose(0, 1)
}

// ---------------------------------------------------------------------------
// Buffers and layout helpers shared by the fused kernels
// ---------------------------------------------------------------------------

/// A `Vec<f32>` of length `n` whose elements the caller writes before
/// [`assume_init`]: output buffers that every element of is written skip the
/// zero-fill (a memset over each activation).
pub(crate) fn uninit_vec(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialization.
    unsafe { v.set_len(n) };
    v
}

/// The buffer of [`uninit_vec`] once every element is written.
pub(crate) fn assume_init(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, layout and length; the caller wrote every element.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
}

/// An uninitialized chunk zero-filled and returned initialized: each task of
/// a parallel loop clears its own part of an output buffer (in cache, on its
/// own thread) instead of one serial zero fill of the whole buffer first.
pub(crate) fn zeroed(buf: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    init_rows(buf, buf.len(), |_| 0.0)
}

/// `vec![0f32; n]` zero-filled on rayon's threads, for outputs written in
/// scattered pieces (attention heads' columns) that [`zeroed`] per task
/// cannot cover.
pub(crate) fn par_zeros(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v = uninit_vec(n);
    v.par_chunks_mut(16 * 1024).for_each(|c| {
        zeroed(c);
    });
    assume_init(v)
}

/// Writes `value(i)` into every `row_len`-element row i of an uninitialized
/// buffer and returns it initialized (a per-task fill where the data is used
/// next, instead of zeroing the whole buffer when it is allocated).
pub(crate) fn init_rows(
    buf: &mut [std::mem::MaybeUninit<f32>],
    row_len: usize,
    value: impl Fn(usize) -> f32,
) -> &mut [f32] {
    if row_len > 0 {
        for (i, row) in buf.chunks_mut(row_len).enumerate() {
            let v = value(i);
            for x in row {
                x.write(v);
            }
        }
    }
    // SAFETY: every element was written above (chunks cover the buffer), and
    // MaybeUninit<f32> has the layout of f32.
    unsafe { &mut *(buf as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}
