//! Mixed precision, the way PyTorch's autocast does it: parameters stay f32
//! (the master weights the optimizer updates, with f32 moments), and each
//! layer computes in the dtype of its *input*. A model run on bf16 (or f16)
//! activations casts every weight it multiplies by to that dtype as it uses
//! it — the cast is an autograd op, so the weight's gradient arrives in f32 —
//! while normalizations and softmax compute their statistics in f32 and hand
//! back the activation dtype.
//!
//! A caller opts in by casting the model's inputs ([`Precision::cast`]) and the
//! prediction back to f32 for the loss; f32 inputs leave every layer as it was.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The compute dtype of a training or sampling run (`--mixed-precision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 activations and matmuls, f32 master weights (GPU: candle's CPU
    /// matmul has no bf16).
    Bf16,
    /// f16 activations and matmuls, f32 master weights.
    F16,
}

impl Precision {
    /// `no` / `fp32` / `f32`, `bf16`, `fp16` / `f16` (accelerate's names and ours).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "no" | "none" | "fp32" | "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "fp16" | "f16" => Ok(Self::F16),
            other => Err(Error::msg(format!(
                "unknown precision `{other}` (expected no, bf16 or fp16)"
            ))),
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "no",
            Self::Bf16 => "bf16",
            Self::F16 => "fp16",
        }
    }

    /// Whether `device` can run this precision; the error says why not.
    pub fn check_device(self, device: &candle_core::Device) -> Result<()> {
        if self == Self::Bf16 && device.is_cpu() {
            return Err(Error::msg(
                "bf16 mixed precision needs a CUDA device: candle's CPU matmul has no bf16 \
                 (use fp16 or no on the CPU)",
            ));
        }
        Ok(())
    }

    /// `x` in this precision's compute dtype (float tensors only; a no-op for f32).
    pub fn cast(self, x: &Tensor) -> Result<Tensor> {
        cast(x, self.dtype())
    }
}

/// `x` as `dtype`; the same tensor when it already is.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if x.dtype() == dtype {
        x.clone()
    } else {
        x.to_dtype(dtype)?
    })
}

/// A parameter `p` in the dtype of the activation `x` it is applied to.
pub fn like(p: &Tensor, x: &Tensor) -> Result<Tensor> {
    cast(p, x.dtype())
}

/// Whether `x` is a 16-bit float (a mixed-precision activation).
pub fn is_half(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// `f` run on a 16-bit `x` upcast to f32 (a normalization's statistics, a
/// softmax), its result returned in `x`'s dtype. A plain call otherwise.
pub fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if !is_half(x) {
        return f(x);
    }
    cast(&f(&x.to_dtype(DType::F32)?)?, x.dtype())
}
