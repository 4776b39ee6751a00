//! Conv2d (groups 1, dilation 1) plus bias on the CPU as one autograd node,
//! one image at a time: im2col of an image into a scratch buffer the size of
//! one image's columns, then one GEMM `W (O, C·kh·kw) · cols (C·kh·kw, L)`
//! written straight into that image's (O, Ho·Wo) block of the NCHW output,
//! which was filled with the bias first. Backward, per image: `dW += dY_b ·
//! cols_bᵀ` (columns recomputed, never stored), `dcols = Wᵀ · dY_b` then
//! col2im into dX_b; `db` sums dY over batch and pixels. A 1×1 convolution
//! reads the image itself as its columns.
//!
//! With at least two images per thread (or a multiple of the thread count)
//! the images are spread over rayon's threads and each GEMM runs on one
//! thread, so a whole convolution is one parallel region; otherwise (SD 1.5 at
//! batch 1) images go one by one and im2col and the GEMM use every thread.
//! Neither the batch-wide (C·kh·kw, B·L) column matrix nor the (O, B·L)
//! product of the batched formulation is ever built.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{View, matmul_into};
use super::im2col::{ConvGeom, assume_init, init_rows, uninit_vec};

/// The f32 elements of a contiguous CPU tensor.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::fused::slice(s, l, &format!("conv2d {what}"))
}

/// The shapes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    geom: ConvGeom,
    /// The most floats one band of an image's columns holds ([`MAX_BAND`]).
    max_band: usize,
}

impl Dims {
    fn kk(&self) -> usize {
        self.geom.kh * self.geom.kw
    }
    /// Rows of an image's column matrix (C·kh·kw).
    fn k(&self) -> usize {
        self.c * self.kk()
    }
    /// Output pixels per image.
    fn l(&self) -> usize {
        let (ho, wo) = self.geom.out_hw(self.h, self.w);
        ho * wo
    }
    fn pointwise(&self) -> bool {
        let g = &self.geom;
        g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0
    }
    /// Output rows per band of columns: all of them unless an image's
    /// columns would pass `max_band` floats (at least one row).
    fn band_rows(&self) -> usize {
        let (ho, wo) = self.geom.out_hw(self.h, self.w);
        (self.max_band / (self.k() * wo).max(1)).clamp(1, ho.max(1))
    }
    /// The bands of output rows `r0..r1`, in order.
    fn bands(&self) -> impl Iterator<Item = (usize, usize)> {
        let (ho, _) = self.geom.out_hw(self.h, self.w);
        let r = self.band_rows();
        (0..ho).step_by(r).map(move |r0| (r0, (r0 + r).min(ho)))
    }
    /// Whether images are spread over threads (each GEMM single-threaded).
    fn per_image_threads(&self) -> bool {
        let t = super::cpu::num_threads();
        t > 1 && (self.b >= 2 * t || (self.b >= t && self.b.is_multiple_of(t)))
    }
}

/// Runs `f(row_index, row, scratch)` over consecutive `len`-element rows of
/// `buf` (on rayon's threads when `parallel`), compiled for AVX2 + FMA where
/// the CPU has them; `scratch` is a buffer per task.
fn for_rows<T: Send, F>(buf: &mut [T], len: usize, parallel: bool, f: F)
where
    F: Fn(usize, &mut [T], &mut Vec<f32>) + Send + Sync,
{
    if len == 0 {
        return;
    }
    let f = |i: usize, r: &mut [T], s: &mut Vec<f32>| super::vmath::simd(|| f(i, r, s));
    if parallel {
        buf.par_chunks_mut(len)
            .enumerate()
            .for_each_init(Vec::new, |s, (i, r)| f(i, r, s));
    } else {
        let mut s = Vec::new();
        buf.chunks_mut(len)
            .enumerate()
            .for_each(|(i, r)| f(i, r, &mut s));
    }
}

/// `$fixed::<N>(args)` for the feature-map widths that get fixed-size moves
/// (4–64), `$other` for any other width, nothing for width 0.
macro_rules! by_width {
    ($w:expr, $fixed:ident($($a:expr),*), $other:block) => {
        match $w {
            0 => {}
            4 => $fixed::<4>($($a),*),
            8 => $fixed::<8>($($a),*),
            16 => $fixed::<16>($($a),*),
            32 => $fixed::<32>($($a),*),
            64 => $fixed::<64>($($a),*),
            _ => $other,
        }
    };
}

/// `dst` (runs of `w` floats, one after another) ← run r of `src` at
/// `r·stride` (im2col at stride 1: an output row's window row is one run of
/// the padded input). The widths of UNet feature maps get fixed-size moves.
#[inline(always)]
fn gather_runs(dst: &mut [f32], src: &[f32], w: usize, stride: usize) {
    #[inline(always)]
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32], stride: usize) {
        for (r, d) in dst.chunks_exact_mut(N).enumerate() {
            let s: &[f32; N] = src[r * stride..r * stride + N]
                .try_into()
                .expect("N floats");
            let d: &mut [f32; N] = d.try_into().expect("N floats");
            *d = *s;
        }
    }
    by_width!(w, fixed(dst, src, stride), {
        for (r, d) in dst.chunks_exact_mut(w).enumerate() {
            d.copy_from_slice(&src[r * stride..r * stride + w]);
        }
    })
}

/// The reverse of [`gather_runs`]: run r of `dst` at `r·stride` ← the r-th
/// `w`-float run of `src`.
#[inline(always)]
fn put_runs(dst: &mut [f32], src: &[f32], w: usize, stride: usize) {
    #[inline(always)]
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32], stride: usize) {
        for (r, s) in src.chunks_exact(N).enumerate() {
            let s: &[f32; N] = s.try_into().expect("N floats");
            let d: &mut [f32; N] = (&mut dst[r * stride..r * stride + N])
                .try_into()
                .expect("N floats");
            *d = *s;
        }
    }
    by_width!(w, fixed(dst, src, stride), {
        for (r, s) in src.chunks_exact(w).enumerate() {
            dst[r * stride..r * stride + w].copy_from_slice(s);
        }
    })
}

/// The adjoint of [`gather_runs`]: run r of `acc` at `r·stride` += the r-th
/// `w`-float run of `src`.
#[inline(always)]
fn scatter_add_runs(acc: &mut [f32], src: &[f32], w: usize, stride: usize) {
    #[inline(always)]
    fn fixed<const N: usize>(acc: &mut [f32], src: &[f32], stride: usize) {
        for (r, s) in src.chunks_exact(N).enumerate() {
            let s: &[f32; N] = s.try_into().expect("N floats");
            let a: &mut [f32; N] = (&mut acc[r * stride..r * stride + N])
                .try_into()
                .expect("N floats");
            for (a, s) in a.iter_mut().zip(s) {
                *a += s;
            }
        }
    }
    by_width!(w, fixed(acc, src, stride), {
        for (r, s) in src.chunks_exact(w).enumerate() {
            for (a, s) in acc[r * stride..r * stride + w].iter_mut().zip(s) {
                *a += s;
            }
        }
    })
}

/// The padded height and width of an image (padding on every side).
fn padded_hw(d: &Dims) -> (usize, usize) {
    (d.h + 2 * d.geom.padding, d.w + 2 * d.geom.padding)
}

/// Image x (C, H, W) with a zero border of `padding` on every side, into
/// `pad` (C, H + 2p, W + 2p); x itself when there is no padding.
fn padded<'a>(x: &'a [f32], d: &Dims, pad: &'a mut Vec<f32>, parallel: bool) -> &'a [f32] {
    let p = d.geom.padding;
    if p == 0 {
        return x;
    }
    let (h, w) = (d.h, d.w);
    let (hp, wp) = padded_hw(d);
    pad.resize(d.c * hp * wp, 0.0);
    for_rows(pad, hp * wp, parallel, |ch, plane, _| {
        plane[..p * wp].fill(0.0);
        plane[(p + h) * wp..].fill(0.0);
        let src = &x[ch * h * w..(ch + 1) * h * w];
        let rows = &mut plane[p * wp..(p + h) * wp];
        if p == 1 {
            // One zero each side (no memset calls), rows as fixed-size moves.
            put_runs(&mut rows[1..], src, w, wp);
            for r in rows.chunks_exact_mut(wp) {
                r[0] = 0.0;
                r[w + 1] = 0.0;
            }
            return;
        }
        for (dst, row) in rows.chunks_exact_mut(wp).zip(src.chunks_exact(w)) {
            dst[..p].fill(0.0);
            dst[p..p + w].copy_from_slice(row);
            dst[p + w..].fill(0.0);
        }
    });
    pad
}

/// im2col of output rows `r0..r1` of one image, from its padded copy `src`
/// (C, H + 2p, W + 2p; [`padded`]), into `cols` (C·kh·kw, (r1 − r0)·Wo), row
/// c·kh·kw + i·kw + j (the order of a flattened (O, C, kh, kw) weight):
/// every output row is one run of the input (stride 1) or an every-other
/// gather (stride 2), with no border tests.
fn im2col_band(src: &[f32], d: &Dims, (r0, r1): (usize, usize), cols: &mut [f32], parallel: bool) {
    let g = d.geom;
    let (_, wo) = g.out_hw(d.h, d.w);
    let (hp, wp) = padded_hw(d);
    let kk = d.kk();
    let n = (r1 - r0) * wo;
    for_rows(&mut cols[..d.k() * n], n, parallel, |r, row, _| {
        let (ch, ij) = (r / kk, r % kk);
        let (i, j) = (ij / g.kw, ij % g.kw);
        let plane = &src[ch * hp * wp..(ch + 1) * hp * wp];
        if g.stride == 1 {
            gather_runs(row, &plane[(r0 + i) * wp + j..], wo, wp);
            return;
        }
        for (oy, dst) in row.chunks_exact_mut(wo).enumerate() {
            let at = ((r0 + oy) * g.stride + i) * wp + j;
            for (ox, v) in dst.iter_mut().enumerate() {
                *v = plane[at + ox * g.stride];
            }
        }
    });
}

/// The adjoint of [`im2col_band`]: the band's columns `cols` (C·kh·kw,
/// (r1 − r0)·Wo) added into the padded image gradient `acc` (C, H + 2p,
/// W + 2p) at every window position.
fn col2im_band(cols: &[f32], d: &Dims, (r0, r1): (usize, usize), acc: &mut [f32], parallel: bool) {
    let g = d.geom;
    let (_, wo) = g.out_hw(d.h, d.w);
    let (hp, wp) = padded_hw(d);
    let (kk, n) = (d.kk(), (r1 - r0) * wo);
    for_rows(
        &mut acc[..d.c * hp * wp],
        hp * wp,
        parallel,
        |ch, plane, _| {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &cols[(ch * kk + i * g.kw + j) * n..][..n];
                    if g.stride == 1 {
                        scatter_add_runs(&mut plane[(r0 + i) * wp + j..], row, wo, wp);
                        continue;
                    }
                    for (oy, src) in row.chunks_exact(wo).enumerate() {
                        let at = ((r0 + oy) * g.stride + i) * wp + j;
                        for (ox, &v) in src.iter().enumerate() {
                            plane[at + ox * g.stride] += v;
                        }
                    }
                }
            }
        },
    );
}

/// dx (C, H, W) ← the padded gradient `acc` without its border; every
/// element of `dx` is written (it may come uninitialized).
fn crop_into(acc: &[f32], d: &Dims, dx: &mut [MaybeUninit<f32>], parallel: bool) {
    let (h, w, p) = (d.h, d.w, d.geom.padding);
    let (hp, wp) = padded_hw(d);
    for_rows(&mut dx[..d.c * h * w], h * w, parallel, |ch, plane, _| {
        let src = &acc[ch * hp * wp + p * wp..];
        for (dst, row) in plane.chunks_exact_mut(w).zip(src.chunks_exact(wp)) {
            for (d, &v) in dst.iter_mut().zip(&row[p..p + w]) {
                d.write(v);
            }
        }
    });
}

/// Calls `f(c0, n, cols)` for each band of output rows of image `x_b`: its
/// first output column `c0` (pixel index), its `n` columns and their values
/// (C·kh·kw, n): the image itself for a 1×1
/// convolution (one band), otherwise im2col into `scratch[0]` (`scratch[1]`
/// holds the padded image). An image's columns are 9× its size for a 3×3
/// kernel (9.4 GB for a VAE decoder's 256-channel layer at 1024²), so they
/// are built a band of at most `max_band` floats at a time.
fn for_bands(
    x_b: &[f32],
    d: &Dims,
    scratch: &mut Scratch,
    par: bool,
    mut f: impl FnMut(usize, usize, &[f32]),
) {
    if d.pointwise() {
        f(0, d.l(), x_b);
        return;
    }
    let [cols, pad, _] = scratch;
    let src = padded(x_b, d, pad, par);
    let (_, wo) = d.geom.out_hw(d.h, d.w);
    for band in d.bands() {
        let n = (band.1 - band.0) * wo;
        if cols.len() < d.k() * n {
            cols.resize(d.k() * n, 0.0);
        }
        im2col_band(src, d, band, cols, par);
        f(band.0 * wo, n, &cols[..d.k() * n]);
    }
}

/// Per-task buffers: a band of an image's columns, its padded copy, and a
/// padded image gradient.
type Scratch = [Vec<f32>; 3];

/// The most floats one band of an image's columns holds (64 MiB).
pub const MAX_BAND: usize = 1 << 24;

/// Scratch buffers larger than this (floats) are not kept between calls.
const KEEP: usize = 1 << 24;

thread_local! {
    /// Each thread's [`Scratch`] for the images it convolves, kept between
    /// calls: a fresh buffer per task cost an allocation and a zero fill
    /// (about 1% of a small model's training step). Buffers past [`KEEP`]
    /// (a large image's padded copy) are freed after the call.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Runs `f` with this thread's scratch buffers (fresh ones if a task further
/// up this thread's stack holds them: rayon may run a task inside another).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            let r = f(&mut s);
            for v in s.iter_mut() {
                if v.capacity() > KEEP {
                    *v = Vec::new();
                }
            }
            r
        }
        Err(_) => f(&mut Scratch::default()),
    })
}

/// y (B, O, L) = bias + W · cols(x_b) for every image.
/// `bias` holds O values, or B·O (one per image and channel: a ResNet block's
/// time embedding folded in).
fn forward(x: &[f32], wt: &[f32], bias: &[f32], d: &Dims) -> Vec<f32> {
    let (k, l, o) = (d.k(), d.l(), d.o);
    let mut y = uninit_vec(d.b * o * l);
    let per_image = bias.len() == d.b * o && d.b > 1;
    let one =
        |bi: usize, x_b: &[f32], y_b: &mut [MaybeUninit<f32>], scratch: &mut Scratch, par: bool| {
            let bias = if per_image {
                &bias[bi * o..(bi + 1) * o]
            } else {
                bias
            };
            let y_b = init_rows(y_b, l, |oi| bias[oi]);
            for_bands(x_b, d, scratch, par, |c0, n, cols| {
                matmul_into(
                    &mut y_b[c0..],
                    l,
                    true,
                    View::rows(wt, o, k),
                    View::rows(cols, k, n),
                    par,
                );
            });
        };
    let img = d.c * d.h * d.w;
    if d.per_image_threads() {
        y.par_chunks_mut(o * l)
            .zip(x.par_chunks(img))
            .enumerate()
            .for_each(|(bi, (y_b, x_b))| with_scratch(|s| one(bi, x_b, y_b, s, false)));
    } else {
        let mut s = Scratch::default();
        for (bi, (y_b, x_b)) in y.chunks_mut(o * l).zip(x.chunks(img)).enumerate() {
            one(bi, x_b, y_b, &mut s, true);
        }
    }
    assume_init(y)
}

/// dW (O, C·kh·kw) = Σ_b dY_b · cols(x_b)ᵀ, computed as its transpose
/// Σ_b cols(x_b) · dY_bᵀ (K × O; the GEMM runs 15–50% faster in that
/// orientation for these shapes: the long dimension K becomes the output's
/// rows) and transposed once at the end.
fn grad_weight(x: &[f32], dy: &[f32], d: &Dims) -> Vec<f32> {
    let (k, l, o) = (d.k(), d.l(), d.o);
    let img = d.c * d.h * d.w;
    let one = |x_b: &[f32], dy_b: &[f32], dwt: &mut [f32], s: &mut Scratch, par: bool| {
        for_bands(x_b, d, s, par, |c0, n, cols| {
            matmul_into(
                dwt,
                o,
                true,
                View::rows(cols, k, n),
                View::strided(&dy_b[c0..], o, n, l).t(),
                par,
            );
        });
    };
    let dwt = if d.per_image_threads() {
        x.par_chunks(img)
            .zip(dy.par_chunks(o * l))
            .fold(
                || vec![0f32; k * o],
                |mut dwt, (x_b, dy_b)| {
                    with_scratch(|s| one(x_b, dy_b, &mut dwt, s, false));
                    dwt
                },
            )
            .reduce_with(add_into)
            .unwrap_or_else(|| vec![0f32; k * o])
    } else {
        let (mut dwt, mut s) = (vec![0f32; k * o], Scratch::default());
        for (x_b, dy_b) in x.chunks(img).zip(dy.chunks(o * l)) {
            one(x_b, dy_b, &mut dwt, &mut s, true);
        }
        dwt
    };
    transpose_kxo(&dwt, k, o)
}

/// dX_b (C, H, W) = col2im(Wᵀ · dY_b) for every image.
fn grad_input(wt: &[f32], dy: &[f32], d: &Dims) -> Vec<f32> {
    let (k, l, o) = (d.k(), d.l(), d.o);
    let img = d.c * d.h * d.w;
    let mut dx = uninit_vec(d.b * img);
    let one = |dy_b: &[f32], dx_b: &mut [MaybeUninit<f32>], s: &mut Scratch, par: bool| {
        let wt_t = View::rows(wt, o, k).t();
        if d.pointwise() {
            let dx_b = init_rows(dx_b, img, |_| 0.0);
            matmul_into(dx_b, l, false, wt_t, View::rows(dy_b, o, l), par);
        } else {
            input_grad_banded(wt_t, dy_b, d, s, dx_b, par);
        }
    };
    if d.per_image_threads() {
        dx.par_chunks_mut(img)
            .zip(dy.par_chunks(o * l))
            .for_each(|(dx_b, dy_b)| with_scratch(|s| one(dy_b, dx_b, s, false)));
    } else {
        let mut s = Scratch::default();
        for (dx_b, dy_b) in dx.chunks_mut(img).zip(dy.chunks(o * l)) {
            one(dy_b, dx_b, &mut s, true);
        }
    }
    assume_init(dx)
}

/// dX_b = col2im(Wᵀ · dY_b) of one image (k > 1), a band of columns at a
/// time accumulated into a padded gradient, then cropped into `dx_b`.
fn input_grad_banded(
    wt_t: View,
    dy_b: &[f32],
    d: &Dims,
    s: &mut Scratch,
    dx_b: &mut [MaybeUninit<f32>],
    par: bool,
) {
    let (k, l, o) = (d.k(), d.l(), d.o);
    let wo = d.geom.out_hw(d.h, d.w).1;
    let (hp, wp) = padded_hw(d);
    let [dcols, _, acc] = s;
    acc.clear();
    acc.resize(d.c * hp * wp, 0.0);
    for band in d.bands() {
        let n = (band.1 - band.0) * wo;
        if dcols.len() < k * n {
            dcols.resize(k * n, 0.0);
        }
        let dy_band = View::strided(&dy_b[band.0 * wo..], o, n, l);
        matmul_into(&mut dcols[..k * n], n, false, wt_t, dy_band, par);
        col2im_band(&dcols[..k * n], d, band, acc, par);
    }
    crop_into(acc, d, dx_b, par);
}

/// All three backward products in one pass over the images, for batches
/// spread over threads ([`Dims::per_image_threads`]): per image, its columns
/// and `dWᵀ += cols · dY_bᵀ`, its bias gradient (dY_b summed over pixels),
/// then `dX_b = col2im(Wᵀ · dY_b)`, while dY_b is still in cache. One parallel
/// region instead of three (one tail of uneven work instead of three).
/// Returns dX (B, C, H, W), dW (O, C·kh·kw) and the bias gradient per image
/// and channel (B, O).
fn grad_input_weight(x: &[f32], wt: &[f32], dy: &[f32], d: &Dims) -> [Vec<f32>; 3] {
    let (k, l, o) = (d.k(), d.l(), d.o);
    let img = d.c * d.h * d.w;
    let mut dx = uninit_vec(d.b * img);
    let mut db = vec![0f32; d.b * o];
    let dwt = dx
        .par_chunks_mut(img)
        .zip(x.par_chunks(img))
        .zip(dy.par_chunks(o * l))
        .zip(db.par_chunks_mut(o))
        .fold(
            || vec![0f32; k * o],
            |mut dwt, (((dx_b, x_b), dy_b), db_b)| {
                for (v, row) in db_b.iter_mut().zip(dy_b.chunks_exact(l)) {
                    *v = super::vmath::simd(|| super::vmath::sum(row)) as f32;
                }
                with_scratch(|s| {
                    for_bands(x_b, d, s, false, |c0, n, cols| {
                        let dy_band = View::strided(&dy_b[c0..], o, n, l);
                        matmul_into(
                            &mut dwt,
                            o,
                            true,
                            View::rows(cols, k, n),
                            dy_band.t(),
                            false,
                        );
                    });
                    let wt_t = View::rows(wt, o, k).t();
                    if d.pointwise() {
                        let dx_b = init_rows(dx_b, img, |_| 0.0);
                        matmul_into(dx_b, l, false, wt_t, View::rows(dy_b, o, l), false);
                    } else {
                        input_grad_banded(wt_t, dy_b, d, s, dx_b, false);
                    }
                });
                dwt
            },
        )
        .reduce_with(add_into)
        .unwrap_or_else(|| vec![0f32; k * o]);
    [assume_init(dx), transpose_kxo(&dwt, k, o), db]
}

/// `a += b`, elementwise (per-thread partial sums of a weight gradient).
fn add_into(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    for (a, b) in a.iter_mut().zip(&b) {
        *a += b;
    }
    a
}

/// dW (O, K) from its transpose dWᵀ (K, O).
fn transpose_kxo(dwt: &[f32], k: usize, o: usize) -> Vec<f32> {
    let mut dw = vec![0f32; o * k];
    for (ki, row) in dwt.chunks_exact(o.max(1)).enumerate() {
        for (oi, &v) in row.iter().enumerate() {
            dw[oi * k + ki] = v;
        }
    }
    dw
}

/// The forward node: inputs x (B, C, H, W), weight (O, C, kh, kw), bias (O,).
struct ConvBiasOp {
    geom: ConvGeom,
    max_band: usize,
}

impl ConvBiasOp {
    fn dims(&self, x: &[usize], wt: &[usize]) -> candle_core::Result<Dims> {
        let [b, c, h, w] = x else {
            candle_core::bail!("conv2d: input must be (B, C, H, W), got {x:?}")
        };
        let [o, c2, kh, kw] = wt else {
            candle_core::bail!("conv2d: weight must be (O, C, kh, kw), got {wt:?}")
        };
        if c != c2 || (*kh, *kw) != (self.geom.kh, self.geom.kw) {
            candle_core::bail!("conv2d: input {x:?} does not fit weight {wt:?}");
        }
        Ok(Dims {
            b: *b,
            c: *c,
            h: *h,
            w: *w,
            o: *o,
            geom: self.geom,
            max_band: self.max_band,
        })
    }
}

impl CustomOp3 for ConvBiasOp {
    fn name(&self) -> &'static str {
        "fused-conv2d-bias"
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
        let d = self.dims(l1.dims(), l2.dims())?;
        let x = f32_slice(s1, l1, "input")?;
        let wt = f32_slice(s2, l2, "weight")?;
        let bias = f32_slice(s3, l3, "bias")?;
        if bias.len() != d.o && bias.len() != d.b * d.o {
            candle_core::bail!("conv2d: bias {:?} for {} output channels", l3.dims(), d.o);
        }
        let (ho, wo) = d.geom.out_hw(d.h, d.w);
        Ok((
            CpuStorage::F32(forward(x, wt, bias, &d)),
            Shape::from((d.b, d.o, ho, wo)),
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
        let d = self.dims(x.dims(), weight.dims())?;
        let grad = grad.contiguous()?;
        if x.track_op() && weight.track_op() && d.per_image_threads() {
            let both = ConvGradBoth {
                d,
                dw_db: std::sync::Mutex::new(None),
            };
            let dx = x
                .detach()
                .apply_op3_no_bwd(&weight.detach(), &grad, &both)?;
            let (dw, db) = both
                .dw_db
                .into_inner()
                .map_err(|_| candle_core::Error::Msg("conv2d backward: poisoned lock".into()))?
                .ok_or_else(|| {
                    candle_core::Error::Msg("conv2d backward: no weight gradient".into())
                })?;
            let dw = Tensor::from_vec(dw, weight.shape(), weight.device())?;
            let db = if !bias.track_op() {
                None
            } else if bias.elem_count() == d.o {
                // One bias for every image: sum the per-image sums.
                let mut sum = vec![0f64; d.o];
                for row in db.chunks_exact(d.o.max(1)) {
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += v as f64;
                    }
                }
                let sum: Vec<f32> = sum.into_iter().map(|v| v as f32).collect();
                Some(Tensor::from_vec(sum, bias.shape(), bias.device())?)
            } else {
                Some(Tensor::from_vec(db, bias.shape(), bias.device())?)
            };
            return Ok((Some(dx), Some(dw), db));
        }
        let db = if bias.track_op() {
            let (b, o, ho, wo) = grad.dims4()?;
            // Sum over pixels, and over images too for a shared (O,) bias.
            let (rows, keep) = if bias.elem_count() == o {
                ((b, o, ho * wo), 1)
            } else {
                ((1, b * o, ho * wo), 1)
            };
            Some(
                grad.reshape(rows)?
                    .apply_op1_no_bwd(&super::fused::SumAround { dim: keep })?
                    .reshape(bias.shape())?,
            )
        } else {
            None
        };
        let dw = if weight.track_op() {
            let dw = x
                .detach()
                .apply_op2_no_bwd(&grad, &ConvGrad::Weight(d))?
                .reshape(weight.shape())?;
            Some(dw)
        } else {
            None
        };
        let dx = if x.track_op() {
            Some(
                weight
                    .detach()
                    .apply_op2_no_bwd(&grad, &ConvGrad::Input(d))?,
            )
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// The two backward products: (x, dy) → dW (O, C·kh·kw) with `Weight`,
/// (weight, dy) → dX (B, C, H, W) with `Input`.
enum ConvGrad {
    Weight(Dims),
    Input(Dims),
}

impl CustomOp2 for ConvGrad {
    fn name(&self) -> &'static str {
        match self {
            Self::Weight(_) => "conv2d-grad-weight",
            Self::Input(_) => "conv2d-grad-input",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Self::Weight(d) | Self::Input(d)) = *self;
        let a = f32_slice(s1, l1, "backward operand")?;
        let dy = f32_slice(s2, l2, "output gradient")?;
        let a_len = match self {
            Self::Weight(_) => d.b * d.c * d.h * d.w,
            Self::Input(_) => d.o * d.k(),
        };
        if dy.len() != d.b * d.o * d.l() || a.len() != a_len {
            candle_core::bail!("conv2d backward: gradient {:?} for {d:?}", l2.dims());
        }
        Ok(match self {
            Self::Weight(_) => (
                CpuStorage::F32(grad_weight(a, dy, &d)),
                Shape::from((d.o, d.k())),
            ),
            Self::Input(_) => (
                CpuStorage::F32(grad_input(a, dy, &d)),
                Shape::from((d.b, d.c, d.h, d.w)),
            ),
        })
    }
}

/// The backward products in one pass ([`grad_input_weight`]): inputs
/// (x, weight, dy), output dX; the weight gradient and the per-image bias
/// gradient are left in `dw_db` for the caller (a custom op has one output).
struct ConvGradBoth {
    d: Dims,
    dw_db: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp3 for ConvGradBoth {
    fn name(&self) -> &'static str {
        "conv2d-grad-input-weight"
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
        let d = self.d;
        let x = f32_slice(s1, l1, "input")?;
        let wt = f32_slice(s2, l2, "weight")?;
        let dy = f32_slice(s3, l3, "output gradient")?;
        if dy.len() != d.b * d.o * d.l()
            || x.len() != d.b * d.c * d.h * d.w
            || wt.len() != d.o * d.k()
        {
            candle_core::bail!("conv2d backward: gradient {:?} for {d:?}", l3.dims());
        }
        let [dx, dw, db] = grad_input_weight(x, wt, dy, &d);
        *self
            .dw_db
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv2d backward: poisoned lock".into()))? =
            Some((dw, db));
        Ok((CpuStorage::F32(dx), Shape::from((d.b, d.c, d.h, d.w))))
    }
}

/// Convolution (groups 1, dilation 1) plus a bias as one autograd node: bias
/// (O,) per channel, or (B, O) per image and channel; f32 on the CPU
/// (callers check [`super::fused::use_fused`]).
pub fn conv2d_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    conv2d_bias_banded(x, weight, bias, stride, padding, MAX_BAND)
}

/// [`conv2d_bias`] with each image's columns built in bands of at most
/// `max_band` floats (output rows at a time; at least one row): the same
/// result with less scratch memory. `conv2d_bias` uses [`MAX_BAND`].
pub fn conv2d_bias_banded(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
    max_band: usize,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (o, c, kh, kw) = weight.dims4()?;
    let b = x.dim(0)?;
    if x.dim(1)? != c || (bias.elem_count() != o && bias.dims() != [b, o]) || stride == 0 {
        candle_core::bail!(
            "conv2d: input {:?}, weight {:?}, bias {:?}, stride {stride}",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let (_, _, h, w) = x.dims4()?;
    if h + 2 * padding < kh || w + 2 * padding < kw {
        candle_core::bail!(
            "conv2d: a {kh}×{kw} kernel does not fit a {h}×{w} input with padding {padding}"
        );
    }
    let geom = ConvGeom {
        kh,
        kw,
        stride,
        padding,
    };
    x.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        ConvBiasOp { geom, max_band },
    )
}
