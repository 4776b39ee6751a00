//! DDIM (Song et al. 2020), as diffusers' `DDIMScheduler`.
//!
//! From xₜ and the denoiser's output, predict x₀ and ε, then move to the
//! previous timestep: x_prev = √ᾱ_prev·x₀ + √(1−ᾱ_prev−σ²)·ε + σ·z with
//! σ = eta·√((1−ᾱ_prev)/(1−ᾱₜ)·(1−ᾱₜ/ᾱ_prev)).

use candle_core::Tensor;

use super::sampler::{
    Sampler, SamplerKind, check_index, check_output, lin, np_arange_down, np_linspace, step_noise,
    to_f32,
};
use super::schedule::{NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

pub struct DdimSampler {
    alphas_cumprod: Vec<f64>,
    /// ᾱ after the last step: 1 with `set_alpha_to_one`, else ᾱ₀.
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    train_timesteps: Vec<usize>,
    /// diffusers' `num_train_timesteps // num_inference_steps`: how far back each
    /// step looks, whatever the spacing.
    step_ratio: usize,
    prediction_type: PredictionType,
    clip_range: Option<f64>,
    eta: f64,
}

/// diffusers' `DDIMScheduler.set_timesteps`.
fn ddim_timesteps(cfg: &SchedulerConfig, n: usize) -> Vec<i64> {
    let big_n = cfg.num_train_timesteps;
    match cfg.spacing_for(SamplerKind::Ddim) {
        TimestepSpacing::Linspace => np_linspace(0.0, (big_n - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = big_n / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down(big_n as f64, big_n as f64 / n as f64)
            .into_iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
    }
}

impl DdimSampler {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize, eta: f64) -> Result<Self> {
        let schedule = NoiseSchedule::new(cfg)?;
        let n_train = schedule.num_train_timesteps();
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(Error::msg(format!(
                "ddim sampler: eta must be a finite number >= 0, got {eta}"
            )));
        }
        let ts = ddim_timesteps(cfg, num_inference_steps);
        if let Some(&t) = ts.iter().find(|&&t| t < 0 || t as usize >= n_train) {
            return Err(Error::config(
                &cfg.source,
                format!(
                    "ddim sampler: {num_inference_steps} steps with {} spacing and steps_offset {} \
                     give timestep {t}, outside 0..{n_train}",
                    cfg.spacing_for(SamplerKind::Ddim).as_str(),
                    cfg.steps_offset
                ),
            ));
        }
        let train_timesteps: Vec<usize> = ts.iter().map(|&t| t as usize).collect();
        Ok(DdimSampler {
            final_alpha_cumprod: if cfg.set_alpha_to_one {
                1.0
            } else {
                schedule.alphas_cumprod[0]
            },
            alphas_cumprod: schedule.alphas_cumprod,
            timesteps: train_timesteps.iter().map(|&t| t as f64).collect(),
            train_timesteps,
            step_ratio: n_train / num_inference_steps,
            prediction_type: cfg.prediction_type,
            clip_range: cfg.clip_sample.then_some(cfg.clip_sample_range),
            eta,
        })
    }

    /// The training timesteps of the schedule.
    pub fn train_timesteps(&self) -> &[usize] {
        &self.train_timesteps
    }
}

impl Sampler for DdimSampler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_index(self.kind(), i, self.timesteps.len())?;
        to_f32(sample)
    }

    fn needs_noise(&self) -> bool {
        self.eta > 0.0
    }

    /// √ᾱₜ·x₀ + √(1−ᾱₜ)·ε at the step's training timestep.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        check_index(self.kind(), i, self.timesteps.len())?;
        let a = self.alphas_cumprod[self.train_timesteps[i]];
        lin(a.sqrt(), &to_f32(x0)?, (1.0 - a).sqrt(), &to_f32(noise)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        check_index(self.kind(), i, self.timesteps.len())?;
        check_output(self.kind(), model_output, sample)?;
        let (out, sample) = (to_f32(model_output)?, to_f32(sample)?);

        let t = self.train_timesteps[i];
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_t = 1.0 - alpha_t;

        let (mut x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((&sample - (&out * beta_t.sqrt())?)? / alpha_t.sqrt())?;
                (x0, out)
            }
            PredictionType::VPrediction => (
                lin(alpha_t.sqrt(), &sample, -beta_t.sqrt(), &out)?,
                lin(alpha_t.sqrt(), &out, beta_t.sqrt(), &sample)?,
            ),
        };
        if let Some(r) = self.clip_range {
            x0 = x0.clamp(-r, r)?;
        }

        let variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = (1.0 - alpha_prev - std_dev * std_dev).sqrt();
        let prev = lin(alpha_prev.sqrt(), &x0, direction, &eps)?;
        if self.eta > 0.0 {
            let z = step_noise(self.kind(), noise, &prev)?;
            return Ok((prev + (z * std_dev)?)?);
        }
        Ok(prev)
    }
}
