//! AdamW's update on the GPU as one kernel per parameter
//! (`dreambooth_adamw_f32` in `kernels.cu`): the weight and both moments
//! rewritten in place in one pass, instead of the plain update's dozen
//! element-wise candle ops and their temporaries (about 100 ms for SD 1.5's
//! 860M parameters on an H100, per DESIGN.md).

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{Storage, Tensor};

use crate::optim::adamw::FusedScalars;

/// Whether the kernel applies: weight, moments and gradient contiguous f32
/// tensors of one shape on a CUDA device.
pub(crate) fn applies(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
    [p, m, v]
        .iter()
        .all(|t| super::is_cuda_f32(t) && t.dims() == p.dims())
        && g.device().is_cuda()
        && g.dtype() == candle_core::DType::F32
        && g.dims() == p.dims()
}

/// One update of `p` with moments `m`, `v` from gradient `g`, in place.
pub(crate) fn step(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    k: &FusedScalars,
) -> crate::Result<()> {
    let g = g.contiguous()?;
    let (gs, gl) = g.storage_and_layout();
    let (Storage::Cuda(gc), Some((ga, gb))) = (&*gs, gl.contiguous_offsets()) else {
        return Err(crate::Error::msg(
            "fused AdamW (CUDA): gradient is not on the GPU",
        ));
    };
    let gslice = gc.as_cuda_slice::<f32>()?;
    let n = gb - ga;
    let grad_scale = k.grad_scale.unwrap_or(1.0);
    super::with_mut_f32(p, |ps, (pa, pb), dev| {
        super::with_mut_f32(m, |ms, (ma, mb), _| {
            super::with_mut_f32(v, |vs, (va, vb), _| {
                if pb - pa != n || mb - ma != n || vb - va != n {
                    candle_core::bail!("fused AdamW (CUDA): sizes differ");
                }
                let func =
                    dev.get_or_load_custom_func("dreambooth_adamw_f32", super::MODULE, super::PTX)?;
                let mut pv = ps.slice_mut(pa..pb);
                let mut mv = ms.slice_mut(ma..mb);
                let mut vv = vs.slice_mut(va..vb);
                let gv = gslice.slice(ga..gb);
                let mut b = func.builder();
                b.arg(&mut pv);
                b.arg(&mut mv);
                b.arg(&mut vv);
                b.arg(&gv);
                b.arg(&n);
                b.arg(&grad_scale);
                b.arg(&k.beta1);
                b.arg(&k.one_minus_beta1);
                b.arg(&k.beta2);
                b.arg(&k.one_minus_beta2);
                b.arg(&k.inv_bc2_sqrt);
                b.arg(&k.eps);
                b.arg(&k.decay);
                b.arg(&k.step_size);
                // SAFETY: the kernel reads and writes n elements of each view.
                unsafe { b.launch(super::grid_stride(n)) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(())
}
