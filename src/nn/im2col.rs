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
// Convolution + bias as one autograd node
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

/// (A, B, L) → (B, A, L): swaps the two leading dimensions, in parallel.
pub struct SwapLeading {
    pub a: usize,
    pub b: usize,
}

impl CustomOp1 for SwapLeading {
    fn name(&self) -> &'static str {
        "swap-leading-dims"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let l = x.len() / (self.a * self.b).max(1);
        let out = swap_middle(x, 1, self.a, self.b, l);
        Ok((CpuStorage::F32(out), Shape::from((self.b, self.a, l))))
    }
}

/// (outer, A, B, L) → (outer, B, A, L) of a contiguous buffer, in parallel.
pub(crate) fn swap_middle(x: &[f32], outer: usize, a: usize, b: usize, l: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), outer * a * b * l);
    let mut out = uninit_vec(x.len());
    if l > 0 {
        out.par_chunks_mut(l).enumerate().for_each(|(r, dst)| {
            let (o, rest) = (r / (a * b), r % (a * b));
            let (bi, ai) = (rest / a, rest % a);
            let src = &x[((o * a + ai) * b + bi) * l..][..l];
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(s);
            }
        });
    }
    assume_init(out)
}

/// Conv2d (groups 1) plus bias as one custom op: the forward is im2col and one
/// GEMM (run on detached tensors) and a pass that writes NCHW and adds the
/// bias; the backward computes dx, dW and db directly. In the autograd graph
/// it is a single node, where im2col → matmul → reshape → transpose →
/// contiguous → bias add were six — and candle's backward zero-fills and adds
/// a gradient buffer for every node.
struct ConvBiasOp {
    geom: ConvGeom,
    /// (O, B·Ho·Wo): W · cols, consumed by the forward.
    gemm: std::sync::Mutex<Option<Tensor>>,
}

fn is_pointwise(g: &ConvGeom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0
}

impl candle_core::CustomOp3 for ConvBiasOp {
    fn name(&self) -> &'static str {
        "fused-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let bias = contiguous_f32(s3, l3)?;
        let (b, _, h, w) = l1.shape().dims4()?;
        let (ho, wo) = self.geom.out_hw(h, w);
        let l = ho * wo;
        let o = bias.len();
        let gemm = super::fused::take_forward_result(&self.gemm, "fused conv")?;
        let (gs, gl) = gemm.storage_and_layout();
        let g = match &*gs {
            candle_core::Storage::Cpu(s) => contiguous_f32(s, gl)?,
            _ => candle_core::bail!("fused conv: GEMM result is not on the CPU"),
        };
        let mut out = uninit_vec(b * o * l);
        out.par_chunks_mut(l).enumerate().for_each(|(r, dst)| {
            let (bi, oi) = (r / o, r % o);
            let src = &g[(oi * b + bi) * l..(oi * b + bi + 1) * l];
            let bv = bias[oi];
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(s + bv);
            }
        });
        Ok((
            CpuStorage::F32(assume_init(out)),
            Shape::from((b, o, ho, wo)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.dims4()?;
        let (o, _, kh, kw) = weight.dims4()?;
        let (ho, wo) = self.geom.out_hw(h, w);
        let l = ho * wo;
        let grad = grad.contiguous()?;
        // (B, O, L) → (O, B·L), the layout of the GEMM.
        let dy = grad
            .apply_op1_no_bwd(&SwapLeading { a: b, b: o })?
            .reshape((o, b * l))?;
        let db = if bias.track_op() {
            Some(
                grad.reshape((b, o, l))?
                    .apply_op1_no_bwd(&super::fused::SumAround { dim: 1 })?
                    .reshape(bias.shape())?,
            )
        } else {
            None
        };
        let dw = if weight.track_op() {
            // im2col again rather than keeping it from the forward: it is
            // kh·kw times the size of x, which the graph keeps anyway.
            let cols = conv_cols(&x.detach(), &self.geom)?;
            Some(dy.matmul(&cols.t()?)?.reshape(weight.shape())?)
        } else {
            None
        };
        let dx = if x.track_op() {
            let w2 = weight.detach().reshape((o, c * kh * kw))?;
            let dcols = w2.t()?.matmul(&dy)?; // (C·kh·kw, B·L)
            Some(if is_pointwise(&self.geom) {
                dcols
                    .apply_op1_no_bwd(&SwapLeading { a: c, b })?
                    .reshape((b, c, h, w))?
            } else {
                dcols.apply_op1_no_bwd(&Col2Im {
                    geom: self.geom,
                    b,
                    c,
                    h,
                    w,
                })?
            })
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Convolution (groups 1, dilation 1) plus a per-channel bias, one autograd
/// node ([`ConvBiasOp`]); f32 on the CPU.
pub fn conv2d_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let c = x.dim(1)?;
    let (o, c2, kh, kw) = weight.dims4()?;
    if c != c2 || bias.elem_count() != o {
        candle_core::bail!(
            "conv2d: input has {c} channels, weight {:?}, bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    let geom = ConvGeom {
        kh,
        kw,
        stride,
        padding,
    };
    let cols = conv_cols(&x.detach(), &geom)?;
    let w2 = weight.detach().reshape((o, c * kh * kw))?;
    let gemm = w2.matmul(&cols)?;
    drop(cols);
    x.apply_op3(
        weight,
        bias,
        ConvBiasOp {
            geom,
            gemm: std::sync::Mutex::new(Some(gemm)),
        },
    )
}

/// The GEMM operand of a convolution of contiguous x (B, C, H, W):
/// (C·kh·kw, B·Ho·Wo) im2col columns; for a 1×1 convolution x with batch and
/// channels swapped (no copy at batch 1).
fn conv_cols(x: &Tensor, geom: &ConvGeom) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if is_pointwise(geom) {
        if b == 1 {
            x.reshape((c, h * w))
        } else {
            x.apply_op1_no_bwd(&SwapLeading { a: b, b: c })?
                .reshape((c, b * h * w))
        }
    } else {
        x.apply_op1_no_bwd(&Im2Col(*geom))
    }
}
