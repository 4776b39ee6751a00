//! `--device` of `train` and `generate`: which device candle runs on.

use anyhow::{Context, bail};
use candle_core::{Device, DeviceLocation};

/// `auto` (the default: the first GPU when the binary was built with the
/// `cuda` feature and one opens, else the CPU), `cpu`, `cuda` or `cuda:N`;
/// a GPU has passed the start-up check of our kernels ([`preflight`]).
pub fn select(spec: Option<&str>) -> anyhow::Result<Device> {
    let device = open(spec)?;
    preflight(&device);
    Ok(device)
}

/// [`select`] without the start-up check (`selftest` runs every check itself).
pub fn open(spec: Option<&str>) -> anyhow::Result<Device> {
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

/// On a CUDA device, checks our GPU paths against the CPU once
/// (`dreambooth::selftest::preflight`, well under a second) and warns about
/// any it sends back to candle's plain ops; the CPU needs no check.
/// `DREAMBOOTH_NO_PREFLIGHT=1` skips it.
pub fn preflight(device: &Device) {
    if !device.is_cuda() || std::env::var_os("DREAMBOOTH_NO_PREFLIGHT").is_some() {
        return;
    }
    let p = dreambooth::selftest::preflight(device);
    let name = describe(device);
    if p.turned_off.is_empty() {
        eprintln!(
            "# {name}: our CUDA kernels passed their start-up check ({} comparisons, {:.1} s)",
            p.checks, p.seconds
        );
    }
    for (path, why) in &p.turned_off {
        eprintln!(
            "warning: {name}: the {} failed its start-up check ({why}); using candle's plain ops \
             instead (correct, slower). `dreambooth selftest --device {name}` shows every check; \
             please report it with that output.",
            path.describe()
        );
    }
}
