//! The GPU backward passes of GroupNorm (+ SiLU) and LayerNorm
//! (`src/nn/fused.rs` holds the forward ops and the CPU backward): the input
//! gradient in the input's dtype and the parameter gradients in f32, each
//! from one launch plan ([`crate::nn::gpu_plan`]) run as a no-backward
//! custom op.

use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::nn::gpu_plan::{self, Groups, Plan};

/// A launch plan as a custom op on the GPU, with the shape of its output.
struct Planned {
    name: &'static str,
    plan: Plan,
    shape: Shape,
}

impl Planned {
    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: runs on the GPU only", self.name)
    }
}

impl CustomOp2 for Planned {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = super::exec::run(&self.plan, &[(s1, l1), (s2, l2)])?;
        Ok((out, self.shape.clone()))
    }
}

impl CustomOp3 for Planned {
    fn name(&self) -> &'static str {
        self.name
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
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = super::exec::run(&self.plan, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((out, self.shape.clone()))
    }
}

/// (dx, dw, db) of GroupNorm (+ SiLU) at x with f32 weight w, bias b.
pub(crate) fn group_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let gs = Groups::of(x.dims(), groups)?;
    let (x, grad) = (x.contiguous()?, grad.to_dtype(x.dtype())?.contiguous()?);
    let wb = Tensor::cat(&[w, b], 0)?.contiguous()?;
    let sfx = gpu_plan::kernel_suffix(x.dtype())?;
    let c = gs.c;
    // [dw; db; coef; stats]: parameter gradients, the input gradient's
    // per-row coefficients and the rows' statistics.
    let params = x.apply_op3_no_bwd(
        &grad,
        &wb,
        &Planned {
            name: "group-norm-bwd-params",
            plan: gpu_plan::group_norm_bwd_params(sfx, gs, eps as f32, silu),
            shape: Shape::from(2 * c + 4 * gs.b * gs.g),
        },
    )?;
    let aux = Tensor::cat(&[&wb, &params], 0)?.contiguous()?;
    let dx = x.apply_op3_no_bwd(
        &grad,
        &aux,
        &Planned {
            name: "group-norm-bwd-dx",
            plan: gpu_plan::group_norm_bwd_dx(sfx, gs, silu),
            shape: x.shape().clone(),
        },
    )?;
    Ok((dx, params.narrow(0, 0, c)?, params.narrow(0, c, c)?))
}

/// (dx, dw, db) of LayerNorm over the last dimension at x with f32 weight w.
pub(crate) fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (rows, d) = gpu_plan::rows(x.dims());
    let (x, grad) = (x.contiguous()?, grad.to_dtype(x.dtype())?.contiguous()?);
    let sfx = gpu_plan::kernel_suffix(x.dtype())?;
    let dx = x.apply_op3_no_bwd(
        &grad,
        &w.contiguous()?,
        &Planned {
            name: "layer-norm-bwd-dx",
            plan: gpu_plan::layer_norm_bwd_dx(sfx, rows, d, eps as f32),
            shape: x.shape().clone(),
        },
    )?;
    let params = x.apply_op2_no_bwd(
        &grad,
        &Planned {
            name: "layer-norm-bwd-params",
            plan: gpu_plan::layer_norm_bwd_params(sfx, rows, d, eps as f32),
            shape: Shape::from(2 * d),
        },
    )?;
    Ok((dx, params.narrow(0, 0, d)?, params.narrow(0, d, d)?))
}
