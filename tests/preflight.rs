//! The start-up check of GPU runs (`selftest::preflight`): its comparisons
//! run and pass (here on the CPU, where they compare our CPU paths), a
//! failing or erroring family is reported by name, and turning a family off
//! is seen by the paths that consult it.

use candle_core::Device;
use dreambooth::nn::kernel_paths::{self, GpuPath};
use dreambooth::selftest::{Check, failure, preflight};

#[test]
fn preflight_passes_on_the_cpu_and_a_turned_off_path_stays_off() {
    let p = preflight(&Device::Cpu);
    assert!(p.turned_off.is_empty(), "{:?}", p.turned_off);
    // AdamW 2, convolution 2, fused ops 12 in f32 and 10 in f16 (the
    // recomputing node has no CPU f16 softmax), frozen matmuls 2; flash
    // attention none (its kernel is CUDA-only).
    assert_eq!(p.checks, 28);
    for path in GpuPath::ALL {
        assert!(!kernel_paths::turned_off(path), "{path:?}");
    }
    kernel_paths::turn_off(GpuPath::Conv);
    assert!(kernel_paths::turned_off(GpuPath::Conv));
    assert!(!kernel_paths::turned_off(GpuPath::Fused));
    assert!(!dreambooth::nn::conv_gemm::enabled());
}

#[test]
fn failures_name_the_check_or_the_error() {
    let ok = Check {
        name: "layer_norm bf16: output".into(),
        rel_err: 1e-3,
        tol: 3e-2,
    };
    let bad = Check {
        name: "softmax bf16: gradients".into(),
        rel_err: 0.5,
        tol: 6e-2,
    };
    assert_eq!(failure(&Ok(vec![ok.clone()])), None);
    let why = failure(&Ok(vec![ok, bad])).unwrap();
    assert!(why.contains("softmax bf16: gradients"), "{why}");
    assert!(why.contains("5.00e-1"), "{why}");
    let err = dreambooth::Error::msg("CUDA_ERROR_UNSUPPORTED_PTX_VERSION\nbacktrace...");
    assert_eq!(
        failure(&Err(err)).unwrap(),
        "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
    );
}
