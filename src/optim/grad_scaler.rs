//! Dynamic loss scaling for f16 mixed precision (PyTorch's `GradScaler`):
//! the loss is multiplied by a large factor before the backward pass so that
//! small f16 activation gradients do not flush to zero, the gradients are
//! divided by it again before the update, and a step whose gradients came out
//! infinite or NaN is skipped with the factor halved. After
//! `growth_interval` good steps in a row the factor doubles. bf16 has f32's
//! exponent range and needs none of this (`LossScaler::disabled`).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current factor (1 and fixed when disabled).
    pub scale: f64,
    /// Good steps since the factor last changed.
    pub good_steps: u64,
    pub enabled: bool,
    pub growth_interval: u64,
}

/// What [`LossScaler::update`] decided for one step's gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaledStep {
    /// Finite gradients: apply the update with gradients multiplied by `unscale`.
    Apply { unscale: f64 },
    /// Infinite or NaN gradients: skip the update (the factor was halved).
    Skip,
}

impl LossScaler {
    /// PyTorch's defaults: 2^16, ×2 after 2000 good steps, ×½ on overflow.
    pub fn new() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
            enabled: true,
            growth_interval: 2000,
        }
    }

    pub fn disabled() -> Self {
        Self {
            scale: 1.0,
            good_steps: 0,
            enabled: false,
            growth_interval: 2000,
        }
    }

    /// For a run in `precision`: enabled for f16 only.
    pub fn for_precision(precision: crate::nn::Precision) -> Self {
        if precision == crate::nn::Precision::F16 {
            Self::new()
        } else {
            Self::disabled()
        }
    }

    /// Takes the global norm of the *scaled* gradients; says whether to
    /// apply the step, and updates the factor for the next one.
    pub fn update(&mut self, scaled_grad_norm: f64) -> ScaledStep {
        if !self.enabled {
            return ScaledStep::Apply { unscale: 1.0 };
        }
        if !scaled_grad_norm.is_finite() {
            self.scale = (self.scale * 0.5).max(f64::MIN_POSITIVE);
            self.good_steps = 0;
            return ScaledStep::Skip;
        }
        let unscale = 1.0 / self.scale;
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        ScaledStep::Apply { unscale }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::disabled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_skips_growth_doubles() {
        let mut s = LossScaler::new();
        s.growth_interval = 3;
        assert_eq!(s.update(f64::INFINITY), ScaledStep::Skip);
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.update(f64::NAN), ScaledStep::Skip);
        assert_eq!(s.scale, 16384.0);
        for _ in 0..2 {
            assert_eq!(
                s.update(10.0),
                ScaledStep::Apply {
                    unscale: 1.0 / 16384.0
                }
            );
        }
        assert_eq!(s.scale, 16384.0);
        s.update(10.0);
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.good_steps, 0);
    }

    #[test]
    fn disabled_never_scales_or_skips() {
        let mut s = LossScaler::disabled();
        assert_eq!(s.update(f64::INFINITY), ScaledStep::Apply { unscale: 1.0 });
        assert_eq!(s.scale, 1.0);
    }
}
