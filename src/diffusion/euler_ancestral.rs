//! Euler ancestral sampling, as diffusers' `EulerAncestralDiscreteScheduler`.
//!
//! Each step goes from σ to σ_down with an Euler step, then adds fresh noise of
//! standard deviation σ_up, where σ_up² = σ_next²(σ² − σ_next²)/σ² and
//! σ_down² = σ_next² − σ_up²: the marginal lands at σ_next.

use candle_core::Tensor;

use super::euler::EulerSchedule;
use super::sampler::{Sampler, SamplerKind, check_index, check_output, step_noise, to_f32};
use super::schedule::{FinalSigmas, PredictionType, SchedulerConfig};
use crate::Result;

pub struct EulerAncestralSampler {
    schedule: EulerSchedule,
    prediction_type: PredictionType,
}

impl EulerAncestralSampler {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        Ok(EulerAncestralSampler {
            // This scheduler has no `final_sigmas_type`: it always ends at σ = 0.
            schedule: EulerSchedule::new(
                cfg,
                SamplerKind::EulerAncestral,
                num_inference_steps,
                FinalSigmas::Zero,
            )?,
            prediction_type: cfg.prediction_type,
        })
    }

    /// σ at each step, followed by the final σ (0).
    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Sampler for EulerAncestralSampler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::EulerAncestral
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
        true
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
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        check_index(self.kind(), i, self.schedule.timesteps.len())?;
        check_output(self.kind(), model_output, sample)?;
        let (out, sample) = (to_f32(model_output)?, to_f32(sample)?);
        let noise = step_noise(self.kind(), noise, &sample)?;

        let sigma = self.schedule.sigmas[i];
        let sigma_to = self.schedule.sigmas[i + 1];
        let denoised = EulerSchedule::denoised(self.prediction_type, sigma, &out, &sample)?;
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();

        let derivative = ((&sample - denoised)? / sigma)?;
        let prev = (sample + (derivative * (sigma_down - sigma))?)?;
        Ok((prev + (noise * sigma_up)?)?)
    }
}
