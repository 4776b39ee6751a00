//! With the `cuda` feature, compiles `src/cuda/kernels.cu` to PTX with nvcc
//! (`$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH; `tools/cuda/build.sh` sets
//! both up) for `compute_$CUDA_COMPUTE_CAP` (default 90: H100 / H200). The
//! default (CPU) build does nothing here.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("kernels.ptx");
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} failed on src/cuda/kernels.cu ({s})", nvcc.display()),
        Err(e) => panic!(
            "cannot run {} for src/cuda/kernels.cu: {e} (run tools/cuda/setup-build-env.sh and source .cuda-venv/env.sh)",
            nvcc.display()
        ),
    }
}
