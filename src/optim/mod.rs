//! Optimizer and learning-rate schedules.

pub mod adamw;
pub mod grad_scaler;
pub mod lr_schedule;

pub use adamw::{AdamW, AdamWConfig, clip_factor, grad_norm};
pub use grad_scaler::{LossScaler, ScaledStep};
pub use lr_schedule::{LrSchedule, LrScheduleKind};
