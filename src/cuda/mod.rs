//! Our own CUDA kernels (`kernels.cu`, compiled to PTX by build.rs) and the
//! glue that runs them on candle's CUDA storage. Only in `cuda` builds; every
//! caller keeps a plain candle-op path, which the CPU build and `dreambooth
//! selftest --device cuda` compare against.

pub mod adamw;
pub(crate) mod exec;
pub(crate) mod norm_bwd;
pub mod profiler;

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, InplaceOp1, Layout, Tensor};
use std::cell::RefCell;

/// The PTX of `kernels.cu`.
pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
/// The name candle caches our module under.
pub(crate) const MODULE: &str = "dreambooth_kernels";

/// The launch shape of our grid-stride kernels for `n` elements: 256-thread
/// blocks, at most 65535 of them (each thread loops over the rest).
pub(crate) fn grid_stride(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65535) as u32;
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether `t` is a contiguous f32 tensor on a CUDA device.
pub(crate) fn is_cuda_f32(t: &Tensor) -> bool {
    t.device().is_cuda()
        && t.dtype() == candle_core::DType::F32
        && t.layout().contiguous_offsets().is_some()
}

type Body<'a> = Box<
    dyn FnOnce(&mut CudaSlice<f32>, (usize, usize), &CudaDevice) -> candle_core::Result<()> + 'a,
>;

/// Runs `f` on the f32 CUDA data of the contiguous tensor `t`, borrowed
/// mutably (candle's in-place op holds the storage's write lock meanwhile),
/// with the element range of `t` in it and its device.
pub(crate) fn with_mut_f32<'a>(
    t: &Tensor,
    f: impl FnOnce(&mut CudaSlice<f32>, (usize, usize), &CudaDevice) -> candle_core::Result<()> + 'a,
) -> candle_core::Result<()> {
    struct Access<'a>(RefCell<Option<Body<'a>>>);
    impl InplaceOp1 for Access<'_> {
        fn name(&self) -> &'static str {
            "dreambooth-cuda-in-place"
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("dreambooth-cuda-in-place: the tensor is on the CPU")
        }
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
            let Some(range) = l.contiguous_offsets() else {
                candle_core::bail!("dreambooth-cuda-in-place: tensor is not contiguous");
            };
            let dev = s.device.clone();
            let data = s.as_cuda_slice_mut::<f32>()?;
            match self.0.borrow_mut().take() {
                Some(f) => f(data, range, &dev),
                None => candle_core::bail!("dreambooth-cuda-in-place: body ran twice"),
            }
        }
    }
    t.inplace_op1(&Access(RefCell::new(Some(Box::new(f)))))
}

/// Device memory in use on `device` (total − free, bytes): what our process
/// and anything else on the GPU hold, including candle's cached pools.
pub fn memory_in_use(device: &candle_core::Device) -> Option<u64> {
    let candle_core::Device::Cuda(d) = device else {
        return None;
    };
    let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}
