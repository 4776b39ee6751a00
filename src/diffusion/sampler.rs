//! The sampler interface shared by DDIM, Euler, Euler ancestral and
//! DPM-Solver++(2M), the choice of one by name, and the numpy arithmetic their
//! timestep schedules are built with (reproduced exactly, so the timesteps equal
//! diffusers' to the bit).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};

use super::ddim::DdimSampler;
use super::dpm_solver::DpmSolverSampler;
use super::euler::EulerSampler;
use super::euler_ancestral::EulerAncestralSampler;
use super::schedule::SchedulerConfig;
use crate::{Error, Result};

/// A reverse-diffusion sampler with its inference schedule fixed.
///
/// The loop that drives one (`x` starts as Gaussian noise):
/// ```ignore
/// let mut x = (noise * s.init_noise_sigma())?;
/// for i in 0..s.timesteps().len() {
///     let t = s.timesteps()[i];
///     let out = unet(&s.scale_model_input(&x, i)?, t)?;
///     let z = if s.needs_noise() { Some(randn_like(&x)?) } else { None };
///     x = s.step(&out, i, &x, z.as_ref())?;
/// }
/// ```
/// Steps compute in `f32` and return `f32` tensors.
pub trait Sampler: Send {
    /// Which sampler this is.
    fn kind(&self) -> SamplerKind;

    /// The timestep to condition the denoiser on at each step, in order.
    /// Whole numbers for DDIM and DPM-Solver; Euler schedules with `linspace`
    /// spacing use fractional timesteps (diffusers' float32 values).
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise: scale a unit Gaussian by this.
    fn init_noise_sigma(&self) -> f64;

    /// The denoiser's input at step `i` (Euler samplers divide by √(σ²+1)).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;

    /// Whether [`Sampler::step`] consumes fresh Gaussian noise (Euler ancestral,
    /// DDIM with eta > 0).
    fn needs_noise(&self) -> bool;

    /// One reverse step from `sample` at step `i` given the denoiser's output
    /// there. `noise` is a standard normal tensor shaped like `sample`, required
    /// when [`Sampler::needs_noise`] and ignored otherwise. Multistep samplers
    /// must be stepped in order starting at `i = 0`.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// Number of inference steps.
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// `x0` (clean latents) noised with `noise` (unit Gaussian) to step `i`'s
    /// noise level, as the sample there is scaled (diffusers' `add_noise` at
    /// `timesteps[i]`): image-to-image starts from it at step `i`.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor>;

    /// Makes `i` the first step taken (diffusers' `set_begin_index`): a
    /// multistep sampler starts without history there.
    fn begin_at(&mut self, i: usize) -> Result<()> {
        check_index(self.kind(), i, self.num_steps())
    }
}

/// The samplers, by the names the CLI and configs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// `ddim`: diffusers' `DDIMScheduler`.
    Ddim,
    /// `euler`: diffusers' `EulerDiscreteScheduler`.
    Euler,
    /// `euler-a`: diffusers' `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// `dpm++`: diffusers' `DPMSolverMultistepScheduler`, DPM-Solver++(2M) midpoint.
    DpmPlusPlus,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 4] = [
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPlusPlus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler-a",
            SamplerKind::DpmPlusPlus => "dpm++",
        }
    }

    /// The diffusers class this sampler reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SamplerKind::DpmPlusPlus => "DPMSolverMultistepScheduler",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        SamplerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.name()).collect();
                Error::msg(format!(
                    "unknown sampler \"{s}\"; expected one of: {}",
                    names.join(", ")
                ))
            })
    }
}

/// Builds a sampler for `num_inference_steps` steps of the schedule in `cfg`.
/// `eta` is DDIM's noise weight (0 = deterministic DDIM, 1 = DDPM-like); the
/// other samplers ignore it.
pub fn make_sampler(
    kind: SamplerKind,
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
    eta: f64,
) -> Result<Box<dyn Sampler>> {
    cfg.check_sampler(kind)?;
    if num_inference_steps == 0 || num_inference_steps > cfg.num_train_timesteps {
        return Err(Error::msg(format!(
            "{kind} sampler: number of steps must be between 1 and {} (num_train_timesteps), got {num_inference_steps}",
            cfg.num_train_timesteps
        )));
    }
    Ok(match kind {
        SamplerKind::Ddim => Box::new(DdimSampler::new(cfg, num_inference_steps, eta)?),
        SamplerKind::Euler => Box::new(EulerSampler::new(cfg, num_inference_steps)?),
        SamplerKind::EulerAncestral => {
            Box::new(EulerAncestralSampler::new(cfg, num_inference_steps)?)
        }
        SamplerKind::DpmPlusPlus => Box::new(DpmSolverSampler::new(cfg, num_inference_steps)?),
    })
}

// ---------------------------------------------------------------------------
// numpy arithmetic, reproduced exactly.

/// `np.linspace(start, stop, num)` (endpoint included), bit for bit.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// `np.arange(start, 0, -step)` for float `step > 0`, bit for bit: numpy fills
/// `start + i·d` with `d = (start − step) − start`.
pub(crate) fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    let d = (start + -step) - start;
    (0..len)
        .map(|i| if i == 0 { start } else { start + i as f64 * d })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j]; // xp[j + 1] - xp[j] == 1
    slope * (x - j as f64) + fp[j]
}

// ---------------------------------------------------------------------------
// Shared checks and tensor arithmetic.

pub(crate) fn check_index(kind: SamplerKind, i: usize, n: usize) -> Result<()> {
    if i >= n {
        return Err(Error::msg(format!(
            "{kind} sampler: step {i} out of range for {n} steps"
        )));
    }
    Ok(())
}

pub(crate) fn to_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// The step's noise as f32, checked against the sample's shape.
pub(crate) fn step_noise(
    kind: SamplerKind,
    noise: Option<&Tensor>,
    like: &Tensor,
) -> Result<Tensor> {
    let noise = noise.ok_or_else(|| {
        Error::msg(format!(
            "{kind} sampler: this step needs noise (needs_noise() is true) but none was given"
        ))
    })?;
    if noise.dims() != like.dims() {
        return Err(Error::msg(format!(
            "{kind} sampler: noise shape {:?} differs from sample shape {:?}",
            noise.dims(),
            like.dims()
        )));
    }
    to_f32(noise)
}

pub(crate) fn check_output(
    kind: SamplerKind,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<()> {
    if model_output.dims() != sample.dims() {
        return Err(Error::msg(format!(
            "{kind} sampler: model output shape {:?} differs from sample shape {:?}",
            model_output.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

/// `a·x + b·y`.
pub(crate) fn lin(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok(((x * a)? + (y * b)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_round_trip() {
        for k in SamplerKind::ALL {
            assert_eq!(k.name().parse::<SamplerKind>().unwrap(), k);
        }
        let err = "plms".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(err.contains("plms"), "{err}");
        assert!(err.contains("ddim, euler, euler-a, dpm++"), "{err}");
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 10.0, 3), vec![0.0, 5.0, 10.0]);
        assert_eq!(
            np_arange_down(1000.0, 250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_interp(1.5, &[0.0, 1.0, 3.0]), 2.0);
        assert_eq!(np_interp(7.0, &[0.0, 1.0, 3.0]), 3.0);
    }
}
