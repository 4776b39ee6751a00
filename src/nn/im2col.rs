//! im2col / col2im as candle custom ops, so a convolution on the CPU is one
//! GEMM forward and two GEMMs backward (candle's own CPU conv backward goes
//! through a slow transposed convolution and a huge-kernel convolution).
//!
//! `Im2Col` maps (B, C, H, W) to (B, C·kh·kw, Ho·Wo) with row index
//! c·kh·kw + i·kw + j — the order of a (O, C, kh, kw) weight flattened to
//! (O, C·kh·kw). Its backward is `Col2Im`, which scatters-adds columns back.

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

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (b, c, h, w) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout)?;
        let (ho, wo) = g.out_hw(h, w);
        let l = ho * wo;
        let kk = g.kh * g.kw;
        let mut out = vec![0f32; b * c * kk * l];
        out.par_chunks_mut(kk * l).enumerate().for_each(|(bc, dst)| {
            let src = &x[bc * h * w..(bc + 1) * h * w];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &mut dst[(i * g.kw + j) * l..(i * g.kw + j + 1) * l];
                    for oy in 0..ho {
                        let y = (oy * g.stride + i) as isize - g.padding as isize;
                        let dst_row = &mut row[oy * wo..(oy + 1) * wo];
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        let src_row = &src[y as usize * w..(y as usize + 1) * w];
                        if g.stride == 1 {
                            // Contiguous run: x = ox + j − padding.
                            let lo = g.padding.saturating_sub(j);
                            let hi = (w + g.padding - j).min(wo);
                            if lo < hi {
                                let s = lo + j - g.padding;
                                dst_row[lo..hi].copy_from_slice(&src_row[s..s + (hi - lo)]);
                            }
                        } else {
                            for (ox, d) in dst_row.iter_mut().enumerate() {
                                let xx = (ox * g.stride + j) as isize - g.padding as isize;
                                if xx >= 0 && xx < w as isize {
                                    *d = src_row[xx as usize];
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c * kk, l))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, c, h, w) = arg.dims4()?;
        let op = Col2Im {
            geom: self.0,
            c,
            h,
            w,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The adjoint of [`Im2Col`]: (B, C·kh·kw, Ho·Wo) → (B, C, H, W), summing overlaps.
pub struct Col2Im {
    pub geom: ConvGeom,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geom;
        let (c, h, w) = (self.c, self.h, self.w);
        let (b, _, _) = layout.shape().dims3()?;
        let cols = contiguous_f32(storage, layout)?;
        let (ho, wo) = g.out_hw(h, w);
        let l = ho * wo;
        let kk = g.kh * g.kw;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(bc, dst)| {
            let src = &cols[bc * kk * l..(bc + 1) * kk * l];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &src[(i * g.kw + j) * l..(i * g.kw + j + 1) * l];
                    for oy in 0..ho {
                        let y = (oy * g.stride + i) as isize - g.padding as isize;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        let src_row = &row[oy * wo..(oy + 1) * wo];
                        let dst_row = &mut dst[y as usize * w..(y as usize + 1) * w];
                        for (ox, v) in src_row.iter().enumerate() {
                            let xx = (ox * g.stride + j) as isize - g.padding as isize;
                            if xx >= 0 && xx < w as isize {
                                dst_row[xx as usize] += v;
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
pub fn conv2d_im2col(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> candle_core::Result<Tensor> {
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
    w2.broadcast_matmul(&cols)?.reshape((b, o, ho, wo))
}
