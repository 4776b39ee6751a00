//! Which of our GPU code paths run. Each family has a plain candle-op
//! counterpart that stays as the reference; the start-up check
//! ([`crate::selftest::preflight`], run by `train`, `generate` and `bench` on
//! a CUDA device) turns a family off for the rest of the process when it
//! fails on this machine, so a kernel that misbehaves on a GPU the tests never
//! ran on costs speed, not a run. The environment switches
//! (`DREAMBOOTH_NO_FUSED`, `DREAMBOOTH_GPU_CONV=candle`) are separate and
//! turn paths off from the start, for A/B runs.

use std::sync::atomic::{AtomicBool, Ordering};

/// A family of our GPU paths that can fall back to candle's plain ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuPath {
    /// GroupNorm(+SiLU), LayerNorm, softmax and GEGLU kernels and the
    /// recomputing attention node (`nn::fused`, `nn::attention_recompute`).
    Fused,
    /// The flash attention forward kernel (`nn::attention_flash`); off, the
    /// recomputing attention node takes its place.
    Flash,
    /// The convolution backward as GEMMs on recomputed columns (`nn::conv_gemm`).
    Conv,
    /// The fused in-place AdamW kernel (`cuda::adamw`).
    AdamW,
    /// The frozen-operand matmuls of a LoRA base (`nn::lora::matmul`,
    /// `frozen_weight_bmm`): cuBLAS on candle's storage, no weight gradient.
    Frozen,
}

impl GpuPath {
    pub const ALL: [GpuPath; 5] = [
        GpuPath::Fused,
        GpuPath::Flash,
        GpuPath::Conv,
        GpuPath::AdamW,
        GpuPath::Frozen,
    ];

    /// What the path is, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            GpuPath::Fused => "fused GroupNorm/LayerNorm/softmax/GEGLU kernels and attention node",
            GpuPath::Flash => "flash attention kernel",
            GpuPath::Conv => "GEMM convolution backward",
            GpuPath::AdamW => "fused AdamW kernel",
            GpuPath::Frozen => "LoRA frozen-base matmuls",
        }
    }
}

static OFF: [AtomicBool; GpuPath::ALL.len()] =
    [const { AtomicBool::new(false) }; GpuPath::ALL.len()];

/// Whether `path` was turned off in this process ([`turn_off`]).
pub fn turned_off(path: GpuPath) -> bool {
    OFF[path as usize].load(Ordering::Relaxed)
}

/// Sends `path` to candle's plain ops for the rest of the process.
pub fn turn_off(path: GpuPath) {
    OFF[path as usize].store(true, Ordering::Relaxed);
}
