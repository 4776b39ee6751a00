//! Learning-rate schedules as diffusers' `get_scheduler` defines them.

use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl FromStr for LrScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.replace('-', "_").as_str() {
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => Err(format!(
                "unknown LR schedule `{s}` (expected constant, constant_with_warmup, linear, cosine)"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LrSchedule {
    pub kind: LrScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate for optimizer step `step` (0-based, as diffusers' LambdaLR).
    pub fn lr(&self, step: u64) -> f64 {
        let s = step as f64;
        let w = self.warmup_steps as f64;
        let warm = if self.warmup_steps > 0 && step < self.warmup_steps {
            Some(s / w.max(1.0))
        } else {
            None
        };
        let f = match self.kind {
            LrScheduleKind::Constant => 1.0,
            LrScheduleKind::ConstantWithWarmup => warm.unwrap_or(1.0),
            LrScheduleKind::Linear => warm.unwrap_or_else(|| {
                ((self.total_steps as f64 - s) / (self.total_steps as f64 - w).max(1.0)).max(0.0)
            }),
            LrScheduleKind::Cosine => warm.unwrap_or_else(|| {
                let p = (s - w) / (self.total_steps as f64 - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
            }),
        };
        self.base_lr * f
    }
}
