//! Runs a launch plan ([`crate::nn::gpu_plan`]) on candle's CUDA storage:
//! the op's inputs as they are, each scratch buffer allocated zero-filled,
//! the kernels launched in order on the device's stream, the output buffer
//! returned as the op's storage.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout};

use crate::nn::gpu_plan::{Arg, Elem, Plan};

/// A scratch buffer of the op's dtype or of f32.
enum Owned<T> {
    T(CudaSlice<T>),
    F32(CudaSlice<f32>),
}

/// Runs `plan` on `inputs` (contiguous, of the plan's element types, T =
/// the first input's dtype) and returns its output.
pub(crate) fn run(
    plan: &Plan,
    inputs: &[(&CudaStorage, &Layout)],
) -> candle_core::Result<CudaStorage> {
    let Some((first, _)) = inputs.first() else {
        candle_core::bail!("launch plan without inputs");
    };
    match first.dtype() {
        DType::F32 => run_typed::<f32>(plan, inputs),
        DType::BF16 => run_typed::<half::bf16>(plan, inputs),
        DType::F16 => run_typed::<half::f16>(plan, inputs),
        d => candle_core::bail!("our CUDA kernels do not take {d:?}"),
    }
}

fn run_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    plan: &Plan,
    inputs: &[(&CudaStorage, &Layout)],
) -> candle_core::Result<CudaStorage> {
    if inputs.len() != plan.inputs.len() {
        candle_core::bail!(
            "launch plan takes {} inputs, got {}",
            plan.inputs.len(),
            inputs.len()
        );
    }
    let dev = inputs[0].0.device.clone();
    let stream = dev.cuda_stream();
    let size = |e: Elem| match e {
        Elem::T => std::mem::size_of::<T>(),
        Elem::F32 => 4,
    };
    let mut scratch = Vec::with_capacity(plan.scratch.len());
    for b in &plan.scratch {
        scratch.push(match b.elem {
            Elem::T => Owned::T(dev.alloc_zeros::<T>(b.len.max(1))?),
            Elem::F32 => Owned::F32(dev.alloc_zeros::<f32>(b.len.max(1))?),
        });
    }
    {
        // Device pointers of every buffer (inputs at their layouts' offsets),
        // with the guards that record the stream's use of them.
        let mut ptrs = Vec::with_capacity(inputs.len() + scratch.len());
        let mut guards = Vec::with_capacity(inputs.len() + scratch.len());
        for (i, ((s, l), spec)) in inputs.iter().zip(&plan.inputs).enumerate() {
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("launch plan input {i} is not contiguous");
            };
            if b - a < spec.len {
                candle_core::bail!(
                    "launch plan input {i}: {} elements, needs {}",
                    b - a,
                    spec.len
                );
            }
            let (p, g) = match spec.elem {
                Elem::T => s.as_cuda_slice::<T>()?.device_ptr(&stream),
                Elem::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream),
            };
            ptrs.push((p + (a * size(spec.elem)) as u64, spec.elem));
            guards.push(g);
        }
        for (o, spec) in scratch.iter_mut().zip(&plan.scratch) {
            let (p, g) = match o {
                Owned::T(s) => s.device_ptr_mut(&stream),
                Owned::F32(s) => s.device_ptr_mut(&stream),
            };
            ptrs.push((p, spec.elem));
            guards.push(g);
        }
        for l in &plan.launches {
            let func = dev.get_or_load_custom_func(&l.kernel, super::MODULE, super::PTX)?;
            let values: Vec<Value> = l
                .args
                .iter()
                .map(|a| match *a {
                    Arg::Buf { id, offset } => {
                        let (p, e) = ptrs[id];
                        Value::Ptr(p + (offset * size(e)) as u64)
                    }
                    Arg::Usize(v) => Value::Usize(v),
                    Arg::F32(v) => Value::F32(v),
                    Arg::I32(v) => Value::I32(v),
                })
                .collect();
            let mut b = func.builder();
            for v in &values {
                match v {
                    Value::Ptr(p) => b.arg(p),
                    Value::Usize(u) => b.arg(u),
                    Value::F32(f) => b.arg(f),
                    Value::I32(i) => b.arg(i),
                };
            }
            let cfg = LaunchConfig {
                grid_dim: (l.grid, 1, 1),
                block_dim: (l.block, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the plan sizes every buffer for the kernels it launches
            // (checked against the plain ops by tests/cuda_sim.rs).
            unsafe { b.launch(cfg) }.w()?;
        }
        drop(guards);
    }
    let Some(out) = scratch
        .into_iter()
        .nth(plan.output.wrapping_sub(plan.inputs.len()))
    else {
        candle_core::bail!("launch plan output {} is not a scratch buffer", plan.output);
    };
    Ok(match out {
        Owned::T(s) => CudaStorage::wrap_cuda_slice(s, dev),
        Owned::F32(s) => CudaStorage::wrap_cuda_slice(s, dev),
    })
}

/// One kernel argument's value, kept alive until the launch.
enum Value {
    Ptr(u64),
    Usize(usize),
    F32(f32),
    I32(i32),
}
