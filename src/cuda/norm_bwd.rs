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

fn sfx(x: &Tensor) -> candle_core::Result<&'static str> {
    gpu_plan::suffix(x.dtype()).ok_or_else(|| {
        candle_core::Error::Msg(format!("our CUDA kernels do not take {:?}", x.dtype()))
    })
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
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group_norm bwd: input {dims:?} does not split into {groups} groups");
    }
    let gs = Groups {
        b: dims[0],
        c: dims[1],
        s: dims[2..].iter().product(),
        g: groups,
    };
    let (x, grad) = (x.contiguous()?, grad.to_dtype(x.dtype())?.contiguous()?);
    let wb = Tensor::cat(&[w, b], 0)?.contiguous()?;
    let sfx = sfx(&x)?;
    let c = gs.c;
    // [dw; db; coef]: parameter gradients and the input gradient's per-row
    // coefficients.
    let params = x.apply_op3_no_bwd(
        &grad,
        &wb,
        &Planned {
            name: "group-norm-bwd-params",
            plan: gpu_plan::group_norm_bwd_params(sfx, gs, eps as f32, silu),
            shape: Shape::from(2 * c + 2 * gs.b * gs.g),
        },
    )?;
    let aux = Tensor::cat(&[&wb, &params], 0)?.contiguous()?;
    let dx = x.apply_op3_no_bwd(
        &grad,
        &aux,
        &Planned {
            name: "group-norm-bwd-dx",
            plan: gpu_plan::group_norm_bwd_dx(sfx, gs, eps as f32, silu),
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
    let d = x.dims().last().copied().unwrap_or(1);
    let rows = x.elem_count() / d.max(1);
    let (x, grad) = (x.contiguous()?, grad.to_dtype(x.dtype())?.contiguous()?);
    let sfx = sfx(&x)?;
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
