//! Convolution (groups 1, dilation 1) for the GPU: the forward is candle's
//! (im2col + cuBLAS there); the backward — which candle runs as a naive
//! transposed-convolution kernel, the slow half of an SD step — is GEMMs on
//! recomputed columns:
//!
//! ```text
//! cols = im2col(x)                    (B, C·kh·kw, Ho·Wo), not kept from the forward
//! dW   = Σ_b dY_b · cols_bᵀ           (O, C·kh·kw)
//! dX   = col2im(Wᵀ · dY)              (B, C, H, W)
//! ```
//!
//! A gradient nobody asked for (a frozen weight, the network's input) is not
//! computed. The column ops run our CUDA kernels (`src/cuda/kernels.cu`); their
//! CPU versions (plain loops) let the tests check the whole op against
//! candle's convolution on any machine.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

use crate::Result;

/// Sizes of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn cols_len(&self) -> usize {
        self.b * self.c * self.kh * self.kw * self.ho * self.wo
    }

    /// The sizes for the GPU kernels' launch plans.
    #[cfg(feature = "cuda")]
    fn conv_dims(&self) -> super::gpu_plan::ConvDims {
        super::gpu_plan::ConvDims {
            b: self.b,
            c: self.c,
            h: self.h,
            w: self.w,
            kh: self.kh,
            kw: self.kw,
            stride: self.stride,
            pad: self.pad,
            ho: self.ho,
            wo: self.wo,
        }
    }

    /// Element index of (b, c, kh, kw, oh, ow) in the columns, and of the
    /// input pixel it reads (None in the zero padding).
    fn pairs(&self) -> impl Iterator<Item = (usize, Option<usize>)> + '_ {
        let g = *self;
        (0..g.cols_len()).map(move |idx| {
            let mut t = idx;
            let ow = t % g.wo;
            t /= g.wo;
            let oh = t % g.ho;
            t /= g.ho;
            let kw = t % g.kw;
            t /= g.kw;
            let kh = t % g.kh;
            t /= g.kh;
            let c = t % g.c;
            let b = t / g.c;
            let ih = (oh * g.stride + kh) as isize - g.pad as isize;
            let iw = (ow * g.stride + kw) as isize - g.pad as isize;
            let inside = ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w;
            let src = inside.then(|| ((b * g.c + c) * g.h + ih as usize) * g.w + iw as usize);
            (idx, src)
        })
    }
}

/// Which way a [`Columns`] op goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// x (B, C, H, W) → columns (B, C·kh·kw, Ho·Wo).
    Im2Col,
    /// Column gradients (B, C·kh·kw, Ho·Wo) → input gradient (B, C, H, W),
    /// each input pixel the sum of the columns that read it.
    Col2Im,
}

/// im2col or col2im of one convolution (no backward: used inside one).
struct Columns(Geom, Dir);

impl Columns {
    fn out_shape(&self) -> Shape {
        let g = self.0;
        match self.1 {
            Dir::Im2Col => Shape::from((g.b, g.c * g.kh * g.kw, g.ho * g.wo)),
            Dir::Col2Im => Shape::from((g.b, g.c, g.h, g.w)),
        }
    }
}

impl CustomOp1 for Columns {
    fn name(&self) -> &'static str {
        match self.1 {
            Dir::Im2Col => "conv-gemm-im2col",
            Dir::Col2Im => "conv-gemm-col2im",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = super::fused::slice(s, l, self.name())?;
        let shape = self.out_shape();
        let mut out = vec![0f32; shape.elem_count()];
        for (col, pixel) in self.0.pairs() {
            if let Some(px) = pixel {
                match self.1 {
                    Dir::Im2Col => out[col] = src[px],
                    Dir::Col2Im => out[px] += src[col],
                }
            }
        }
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let sfx = super::gpu_plan::kernel_suffix(s.dtype())?;
        let plan = match self.1 {
            Dir::Im2Col => super::gpu_plan::im2col(sfx, self.0.conv_dims()),
            Dir::Col2Im => super::gpu_plan::col2im(sfx, self.0.conv_dims()),
        };
        Ok((crate::cuda::exec::run(&plan, &[(s, l)])?, self.out_shape()))
    }
}

/// (x, w, y) → a copy of y (the forward computed by candle), with the
/// backward above for x and w.
struct ConvGemm(Geom);

impl CustomOp3 for ConvGemm {
    fn name(&self) -> &'static str {
        "conv-gemm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let (o, ck, l) = (w.dim(0)?, g.c * g.kh * g.kw, g.ho * g.wo);
        let dy = grad.contiguous()?.reshape((g.b, o, l))?;
        let dw = if w.track_op() {
            let cols = x
                .detach()
                .contiguous()?
                .apply_op1_no_bwd(&Columns(g, Dir::Im2Col))?;
            // Per image (O, L)·(L, CK), summed over the batch in f32.
            let per = dy.matmul(&cols.transpose(1, 2)?)?;
            let sum = per.to_dtype(DType::F32)?.sum(0)?.to_dtype(w.dtype())?;
            Some(sum.reshape(w.dims())?)
        } else {
            None
        };
        let dx = if x.track_op() {
            let w2 = w.detach().reshape((o, ck))?;
            let dcols = w2.t()?.broadcast_matmul(&dy)?.contiguous()?;
            Some(dcols.apply_op1_no_bwd(&Columns(g, Dir::Col2Im))?)
        } else {
            None
        };
        Ok((dx, dw, None))
    }
}

/// Convolution of x (B, C, H, W) with w (O, C, kh, kw): candle's forward,
/// the backward above. Same numbers as `Tensor::conv2d` to rounding.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (_, wc, kh, kw) = w.dims4()?;
    if wc != c || stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        return Err(crate::Error::msg(format!(
            "conv2d: input {:?}, weight {:?}, stride {stride}, padding {padding}",
            x.dims(),
            w.dims()
        )));
    }
    let geom = Geom {
        b,
        c,
        h,
        w: wd,
        kh,
        kw,
        stride,
        pad: padding,
        ho: (h + 2 * padding - kh) / stride + 1,
        wo: (wd + 2 * padding - kw) / stride + 1,
    };
    let y = x
        .detach()
        .conv2d(&w.detach(), padding, stride, 1, 1)?
        .contiguous()?;
    Ok(x.apply_op3(w, &y, ConvGemm(geom))?)
}

/// Whether the GPU convolution takes this path (`DREAMBOOTH_GPU_CONV=candle`
/// keeps candle's own backward, to compare).
pub fn enabled() -> bool {
    static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*CANDLE.get_or_init(|| {
        std::env::var("DREAMBOOTH_GPU_CONV").is_ok_and(|v| v.eq_ignore_ascii_case("candle"))
    }) && !super::kernel_paths::turned_off(super::kernel_paths::GpuPath::Conv)
}
