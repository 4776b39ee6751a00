//! DPM-Solver++(2M) (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler`
//! with `algorithm_type = "dpmsolver++"`, `solver_order = 2`,
//! `solver_type = "midpoint"`.
//!
//! In log-SNR time λ = log(αₜ/σₜ) with h = λ_next − λ, each step is
//! x_next = (σ_next/σ)·x − α_next(e^{−h} − 1)·(D₀ + ½D₁), where D₀ is the current
//! x₀ prediction and D₁ = (D₀ − previous x₀ prediction)·h/h_prev (zero on the
//! first step and on the last, which are first order).
//!
//! `dpm++` always means this solver: a config's `algorithm_type`, `solver_order`
//! and `solver_type` are not read. Its `final_sigmas_type`, `lower_order_final`,
//! `euler_at_final` and `lambda_min_clipped` are.

use candle_core::Tensor;

use super::sampler::{
    Sampler, SamplerKind, check_index, check_output, lin, np_arange_down, np_interp, np_linspace,
    to_f32,
};
use super::schedule::{
    FinalSigmas, NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing, f32r,
};
use crate::{Error, Result};

pub struct DpmSolverSampler {
    timesteps: Vec<f64>,
    /// σ (= √((1−ᾱ)/ᾱ)) at each step plus the final one (float32 values).
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    /// Whether the last step is first order.
    final_first_order: bool,
    /// The previous step's x₀ prediction.
    prev_x0: Option<Tensor>,
    next_step: usize,
}

/// (αₜ, σₜ) of the variance-preserving process at noise level σ.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverSampler {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let n = num_inference_steps;
        let schedule = NoiseSchedule::new(cfg)?;
        let big_n = schedule.num_train_timesteps();
        let opts = &cfg.sampler;

        // Timesteps whose λ falls below `lambda_min_clipped` are cut from the top.
        let clipped = schedule
            .alphas_cumprod
            .iter()
            .filter(|&&a| lambda(a.sqrt(), (1.0 - a).sqrt()) < opts.lambda_min_clipped)
            .count();
        let last_timestep = big_n - clipped;
        if last_timestep < 2 {
            return Err(Error::config(
                &cfg.source,
                format!(
                    "lambda_min_clipped {} leaves {last_timestep} timestep(s)",
                    opts.lambda_min_clipped
                ),
            ));
        }
        let spacing = cfg.spacing_for(SamplerKind::DpmPlusPlus);
        let ts: Vec<i64> = match spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<i64> = np_linspace(0.0, (last_timestep - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(|t| t.round_ties_even() as i64)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange_down(last_timestep as f64, big_n as f64 / n as f64)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        if let Some(&t) = ts.iter().find(|&&t| t < 0 || t as usize >= big_n) {
            return Err(Error::config(
                &cfg.source,
                format!(
                    "dpm++ sampler: {n} steps with {} spacing and steps_offset {} give timestep \
                     {t}, outside 0..{big_n}",
                    spacing.as_str(),
                    cfg.steps_offset
                ),
            ));
        }
        let table = schedule.sigmas();
        let mut sigmas: Vec<f64> = ts
            .iter()
            .map(|&t| f32r(np_interp(t as f64, &table)))
            .collect();
        sigmas.push(match opts.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => table[0],
        });
        let steps = ts.len();
        Ok(DpmSolverSampler {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            sigmas,
            prediction_type: cfg.prediction_type,
            final_first_order: opts.euler_at_final
                || (opts.lower_order_final && steps < 15)
                || opts.final_sigmas_type == FinalSigmas::Zero,
            prev_x0: None,
            next_step: 0,
        })
    }

    /// σ at each step, followed by the final σ.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Sampler for DpmSolverSampler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::DpmPlusPlus
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
        false
    }

    /// αₜ·x₀ + σₜ·ε at the step's noise level.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        check_index(self.kind(), i, self.timesteps.len())?;
        let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
        lin(alpha, &to_f32(x0)?, sigma, &to_f32(noise)?)
    }

    fn begin_at(&mut self, i: usize) -> Result<()> {
        check_index(self.kind(), i, self.timesteps.len())?;
        self.prev_x0 = None;
        self.next_step = i;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        check_index(self.kind(), i, n)?;
        check_output(self.kind(), model_output, sample)?;
        if i == 0 {
            self.prev_x0 = None;
        } else if i != self.next_step {
            return Err(Error::msg(format!(
                "dpm++ sampler: steps must be taken in order; expected step {}, got {i}",
                self.next_step
            )));
        }
        let (out, sample) = (to_f32(model_output)?, to_f32(sample)?);

        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => ((&sample - (&out * sigma_s)?)? / alpha_s)?,
            PredictionType::VPrediction => lin(alpha_s, &sample, -sigma_s, &out)?,
        };

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let c_sample = sigma_t / sigma_s;
        let c_x0 = -(alpha_t * ((-h).exp() - 1.0));
        let first_order = i == n - 1 && self.final_first_order;
        let prev = match (&self.prev_x0, first_order) {
            (Some(prev_x0), false) => {
                let (alpha_p, sigma_p) = alpha_sigma(self.sigmas[i - 1]);
                let h_0 = lambda(alpha_s, sigma_s) - lambda(alpha_p, sigma_p);
                let r0 = h_0 / h;
                let d1 = ((&x0 - prev_x0)? * (1.0 / r0))?;
                // (σ_t/σ_s)·x − α_t(e^{−h}−1)·D₀ − ½·α_t(e^{−h}−1)·D₁
                (lin(c_sample, &sample, c_x0, &x0)? + (d1 * (0.5 * c_x0))?)?
            }
            _ => lin(c_sample, &sample, c_x0, &x0)?,
        };
        self.prev_x0 = Some(x0);
        self.next_step = i + 1;
        Ok(prev)
    }
}
