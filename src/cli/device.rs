//! `--device` of `train` and `generate`: which device candle runs on.

use anyhow::{Context, bail};
use candle_core::{Device, DeviceLocation};

/// `auto` (the default: the first GPU when the binary was built with the
/// `cuda` feature and one opens, else the CPU), `cpu`, `cuda` or `cuda:N`.
pub fn select(spec: Option<&str>) -> anyhow::Result<Device> {
    let spec = spec.unwrap_or("auto");
    let cuda = |ordinal: usize| {
        Device::new_cuda(ordinal).with_context(|| {
            if candle_core::utils::cuda_is_available() {
                format!("--device {spec}: cannot open CUDA device {ordinal}")
            } else {
                format!(
                    "--device {spec}: this binary was built without the `cuda` feature (tools/cuda/build.sh, docs/cuda.md)"
                )
            }
        })
    };
    Ok(match spec {
        "auto" => match Device::cuda_if_available(0) {
            Ok(d) => d,
            Err(e) => {
                // The first line only: candle appends a backtrace under RUST_BACKTRACE.
                let e = e.to_string();
                let e = e.lines().next().unwrap_or("");
                eprintln!("warning: no usable CUDA device ({e}); running on the CPU");
                Device::Cpu
            }
        },
        "cpu" => Device::Cpu,
        "cuda" | "gpu" => cuda(0)?,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n)?,
            _ => bail!("unknown --device `{s}` (auto, cpu, cuda or cuda:N)"),
        },
    })
}

/// `cpu` or `cuda:N`, for log lines.
pub fn describe(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
