//! Optimizer and learning-rate schedules.

pub mod adamw;
pub mod fused_backward;
pub mod grad_scaler;
pub mod lr_schedule;
pub mod optimizer;
pub mod prodigy;

pub use adamw::{AdamW, AdamWConfig, StepCoefs, clip_factor, grad_norm};
pub use fused_backward::fused_backward;
pub use grad_scaler::{LossScaler, ScaledStep};
pub use lr_schedule::{LrSchedule, LrScheduleKind};
pub use optimizer::{Optimizer, OptimizerKind};
pub use prodigy::{Prodigy, ProdigyConfig};
