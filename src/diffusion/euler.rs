//! Euler's method on the probability-flow ODE in σ-space (Karras et al. 2022),
//! as diffusers' `EulerDiscreteScheduler` with its defaults: linear
//! interpolation of σ between training timesteps, no Karras sigmas, no churn.
//!
//! The sample lives at noise level σ (x = x₀ + σ·ε); the denoiser sees
//! x / √(σ²+1), and one step is x ← x + (x − x̂₀)/σ · (σ_next − σ).

use candle_core::Tensor;

use super::sampler::{
    Sampler, SamplerKind, check_index, check_output, np_arange_down, np_interp, np_linspace, to_f32,
};
use super::schedule::{
    FinalSigmas, NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing, f32r,
};
use crate::Result;

/// The σ schedule shared by the Euler samplers.
pub(crate) struct EulerSchedule {
    /// Timesteps the denoiser sees (diffusers' float32 values).
    pub timesteps: Vec<f64>,
    /// σ at each step plus the final one (float32 values); `len = steps + 1`.
    pub sigmas: Vec<f64>,
    pub init_noise_sigma: f64,
}

impl EulerSchedule {
    /// diffusers' `set_timesteps` of the Euler schedulers for `kind`'s default spacing.
    pub fn new(
        cfg: &SchedulerConfig,
        kind: SamplerKind,
        n: usize,
        last: FinalSigmas,
    ) -> Result<Self> {
        let schedule = NoiseSchedule::new(cfg)?;
        let big_n = cfg.num_train_timesteps;
        let spacing = cfg.spacing_for(kind);
        let timesteps: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (big_n - 1) as f64, n)
                .into_iter()
                .rev()
                .map(f32r)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = big_n / n;
                (0..n)
                    .rev()
                    .map(|i| f32r((i * ratio) as f64 + cfg.steps_offset as f64))
                    .collect()
            }
            TimestepSpacing::Trailing => np_arange_down(big_n as f64, big_n as f64 / n as f64)
                .into_iter()
                .map(|t| f32r(t.round_ties_even()) - 1.0)
                .collect(),
        };
        let table = schedule.sigmas();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| f32r(np_interp(t, &table)))
            .collect();
        sigmas.push(match last {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => table[0],
        });
        let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        };
        Ok(EulerSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    /// x₀ + σ·ε at step `i`'s σ.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        Ok((to_f32(x0)? + (to_f32(noise)? * self.sigmas[i])?)?)
    }

    /// x / √(σ²+1).
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        Ok((to_f32(sample)? / (sigma * sigma + 1.0).sqrt())?)
    }

    /// The denoised estimate x̂₀ at noise level σ.
    pub fn denoised(
        prediction_type: PredictionType,
        sigma: f64,
        out: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor> {
        Ok(match prediction_type {
            PredictionType::Epsilon => (sample - (out * sigma)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                ((out * (-sigma / s2.sqrt()))? + (sample / s2)?)?
            }
        })
    }
}

pub struct EulerSampler {
    schedule: EulerSchedule,
    prediction_type: PredictionType,
}

impl EulerSampler {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        Ok(EulerSampler {
            schedule: EulerSchedule::new(
                cfg,
                SamplerKind::Euler,
                num_inference_steps,
                cfg.sampler.final_sigmas_type,
            )?,
            prediction_type: cfg.prediction_type,
        })
    }

    /// σ at each step, followed by the final σ.
    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Sampler for EulerSampler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Euler
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_index(self.kind(), i, self.schedule.timesteps.len())?;
        self.schedule.scale_model_input(sample, i)
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        check_index(self.kind(), i, self.schedule.timesteps.len())?;
        self.schedule.add_noise(x0, noise, i)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        check_index(self.kind(), i, self.schedule.timesteps.len())?;
        check_output(self.kind(), model_output, sample)?;
        let (out, sample) = (to_f32(model_output)?, to_f32(sample)?);
        let sigma = self.schedule.sigmas[i];
        let denoised = EulerSchedule::denoised(self.prediction_type, sigma, &out, &sample)?;
        let derivative = ((&sample - denoised)? / sigma)?;
        let dt = self.schedule.sigmas[i + 1] - sigma;
        Ok((sample + (derivative * dt)?)?)
    }
}
