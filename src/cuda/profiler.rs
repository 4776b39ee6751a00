//! The CUDA profiler API's capture range (`cuProfilerStart` /
//! `cuProfilerStop`): `bench step` and `bench sample` mark their timed work
//! with it, so a kernel profiler attached to the process records only that —
//! our own `tools/cuda/kprof` (`CUDA_INJECTION64_PATH`), or
//! `nsys profile --capture-range=cudaProfilerApi`. Without a profiler
//! attached the calls do nothing.

use candle_core::Device;
use candle_core::cuda_backend::cudarc::driver::sys;

fn call(device: &Device, what: &str, f: unsafe fn() -> sys::CUresult) -> candle_core::Result<()> {
    let Device::Cuda(d) = device else {
        return Ok(());
    };
    d.cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {e:?}")))?;
    // SAFETY: a driver call without arguments, with the device's context
    // current on this thread.
    let r = unsafe { f() };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(candle_core::Error::Msg(format!("{what} returned {r:?}")));
    }
    Ok(())
}

/// Opens the capture range (after the device's queued work is done).
pub fn start(device: &Device) -> candle_core::Result<()> {
    device.synchronize()?;
    call(device, "cuProfilerStart", sys::cuProfilerStart)
}

/// Closes the capture range (after the device's queued work is done).
pub fn stop(device: &Device) -> candle_core::Result<()> {
    device.synchronize()?;
    call(device, "cuProfilerStop", sys::cuProfilerStop)
}
