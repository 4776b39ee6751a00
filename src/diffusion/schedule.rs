//! The noise schedule: diffusers' `scheduler/scheduler_config.json`, the betas
//! and cumulative alphas ᾱ it defines, and the forward process the trainer uses
//! (noising a clean latent, the ε / v regression target, the SNR).
//!
//! Numbers follow diffusers exactly: betas and ᾱ are the values of diffusers'
//! `float32` tensors (stored here widened to `f64`), so a schedule built here
//! and one built by `DDIMScheduler(**config)` agree to the last bit or one ulp.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Deserialize;

use super::sampler::SamplerKind;
use crate::{Error, Result};

/// How the betas are spaced over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linear`: betas evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// `scaled_linear`: square roots of the betas evenly spaced (Stable Diffusion).
    ScaledLinear,
    /// `squaredcos_cap_v2`: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999.
    SquaredcosCapV2,
}

/// What the denoiser predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε (Stable Diffusion 1.x, 2.x base).
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (Stable Diffusion 2.x 768-v).
    VPrediction,
}

/// How inference timesteps are picked among the training ones (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The last sigma of Euler / DPM-Solver schedules (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    /// End at σ = 0 (diffusers' default).
    Zero,
    /// End at the σ of training timestep 0.
    SigmaMin,
}

impl BetaSchedule {
    pub fn as_str(self) -> &'static str {
        match self {
            BetaSchedule::Linear => "linear",
            BetaSchedule::ScaledLinear => "scaled_linear",
            BetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
        }
    }
}

impl PredictionType {
    /// `epsilon` (or `eps`), `v_prediction` (or `v`, `v-prediction`): the
    /// `--prediction-type` of a model whose file cannot tell (an SD 2.x single file).
    pub fn parse(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "epsilon" | "eps" => Ok(Self::Epsilon),
            "v_prediction" | "v-prediction" | "v" => Ok(Self::VPrediction),
            other => Err(crate::Error::msg(format!(
                "unknown prediction type `{other}` (expected epsilon or v_prediction)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

impl TimestepSpacing {
    pub fn as_str(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        }
    }
}

/// Knobs that only some samplers read; the names are diffusers'.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerOptions {
    /// Euler, DPM-Solver++: the sigma after the last step.
    pub final_sigmas_type: FinalSigmas,
    /// DPM-Solver++: drop the timesteps whose log-SNR λ is below this (default −∞).
    pub lambda_min_clipped: f64,
    /// DPM-Solver++: first order on the last step(s) when there are fewer than 15 steps.
    pub lower_order_final: bool,
    /// DPM-Solver++: always take the last step first order.
    pub euler_at_final: bool,
}

/// An option set in the file that a sampler here does not implement; it is
/// rejected by the samplers diffusers would read it in ([`SchedulerConfig::check_sampler`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UnsupportedOption {
    pub key: &'static str,
    pub value: String,
    pub read_by: &'static [SamplerKind],
}

/// diffusers' scheduler configuration (`scheduler/scheduler_config.json`).
///
/// Fields missing from the file take diffusers' defaults; unknown fields are
/// ignored. `timestep_spacing` is `None` when the file does not set it, because
/// diffusers' default depends on the scheduler class: `leading` for DDIM,
/// `linspace` for Euler, Euler ancestral and DPM-Solver.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`, e.g. `PNDMScheduler`; informative only.
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when set they replace `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    /// DDIM: clamp the predicted x₀ to ±`clip_sample_range` (diffusers' DDIM default: true).
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// DDIM: ᾱ after the last step is 1 (true) or ᾱ₀ (false).
    pub set_alpha_to_one: bool,
    pub sampler: SamplerOptions,
    pub unsupported: Vec<UnsupportedOption>,
    /// Where the config came from, for error messages.
    pub source: PathBuf,
}

impl Default for SchedulerConfig {
    /// diffusers' defaults (those of `DDIMScheduler` for the DDIM-only fields).
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            sampler: SamplerOptions {
                final_sigmas_type: FinalSigmas::Zero,
                lambda_min_clipped: f64::NEG_INFINITY,
                lower_order_final: true,
                euler_at_final: false,
            },
            unsupported: Vec::new(),
            source: PathBuf::from("<default scheduler config>"),
        }
    }
}

/// The file as written; every field optional so that defaults can be filled in.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<Vec<f64>>,
    prediction_type: Option<String>,
    timestep_spacing: Option<String>,
    steps_offset: Option<usize>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    set_alpha_to_one: Option<bool>,
    thresholding: Option<bool>,
    rescale_betas_zero_snr: Option<bool>,
    final_sigmas_type: Option<String>,
    lambda_min_clipped: Option<f64>,
    lower_order_final: Option<bool>,
    euler_at_final: Option<bool>,
    interpolation_type: Option<String>,
    timestep_type: Option<String>,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    use_lu_lambdas: Option<bool>,
    use_flow_sigmas: Option<bool>,
}

fn parse_choice<T: Copy>(
    path: &Path,
    key: &str,
    value: &str,
    choices: &[(&str, T)],
    hint: &str,
) -> Result<T> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            Error::config(
                path,
                format!(
                    "{key} \"{value}\" is not supported; expected one of: {}{hint}",
                    names.join(", ")
                ),
            )
        })
}

/// Python's `json.dump` writes `-Infinity`, `Infinity` and `NaN` (diffusers saves
/// `"lambda_min_clipped": -Infinity`); JSON has no such literals. Replace them,
/// outside strings, by `null`, which reads as "not set".
fn sanitize_python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(token) = token {
                out.push_str("null");
                rest = &rest[token.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl SchedulerConfig {
    /// Reads diffusers' `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::reading(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `scheduler_config.json`; `path` names it in errors.
    pub fn from_json_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let raw: RawConfig =
            serde_json::from_str(&sanitize_python_json(text)).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        let d = SchedulerConfig::default();

        let beta_schedule = match raw.beta_schedule.as_deref() {
            None => d.beta_schedule,
            Some(v) => parse_choice(
                path,
                "beta_schedule",
                v,
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                    ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
                ],
                "",
            )?,
        };
        let prediction_type = match raw.prediction_type.as_deref() {
            None => d.prediction_type,
            Some(v) => parse_choice(
                path,
                "prediction_type",
                v,
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("v_prediction", PredictionType::VPrediction),
                ],
                " (models that predict x0 directly are not supported)",
            )?,
        };
        let timestep_spacing = match raw.timestep_spacing.as_deref() {
            None => None,
            Some(v) => Some(parse_choice(
                path,
                "timestep_spacing",
                v,
                &[
                    ("leading", TimestepSpacing::Leading),
                    ("trailing", TimestepSpacing::Trailing),
                    ("linspace", TimestepSpacing::Linspace),
                ],
                "",
            )?),
        };
        let final_sigmas_type = match raw.final_sigmas_type.as_deref() {
            None => d.sampler.final_sigmas_type,
            Some(v) => parse_choice(
                path,
                "final_sigmas_type",
                v,
                &[
                    ("zero", FinalSigmas::Zero),
                    ("sigma_min", FinalSigmas::SigmaMin),
                ],
                "",
            )?,
        };
        if raw.rescale_betas_zero_snr == Some(true) {
            return Err(Error::config(
                path,
                "rescale_betas_zero_snr = true (zero terminal SNR) is not supported",
            ));
        }

        use SamplerKind::*;
        let mut unsupported = Vec::new();
        let mut flag = |key: &'static str, on: Option<bool>, read_by: &'static [SamplerKind]| {
            if on == Some(true) {
                unsupported.push(UnsupportedOption {
                    key,
                    value: "true".into(),
                    read_by,
                });
            }
        };
        flag("thresholding", raw.thresholding, &[Ddim, DpmPlusPlus]);
        flag(
            "use_karras_sigmas",
            raw.use_karras_sigmas,
            &[Euler, DpmPlusPlus],
        );
        flag(
            "use_exponential_sigmas",
            raw.use_exponential_sigmas,
            &[Euler, DpmPlusPlus],
        );
        flag(
            "use_beta_sigmas",
            raw.use_beta_sigmas,
            &[Euler, DpmPlusPlus],
        );
        flag("use_lu_lambdas", raw.use_lu_lambdas, &[DpmPlusPlus]);
        flag("use_flow_sigmas", raw.use_flow_sigmas, &[DpmPlusPlus]);
        if let Some(v) = raw.interpolation_type.filter(|v| v != "linear") {
            unsupported.push(UnsupportedOption {
                key: "interpolation_type",
                value: format!("\"{v}\""),
                read_by: &[Euler],
            });
        }
        // Continuous timesteps (¼·ln σ) are only used with v-prediction.
        if let Some(v) = raw
            .timestep_type
            .filter(|v| v != "discrete" && prediction_type == PredictionType::VPrediction)
        {
            unsupported.push(UnsupportedOption {
                key: "timestep_type",
                value: format!("\"{v}\""),
                read_by: &[Euler],
            });
        }

        let cfg = SchedulerConfig {
            class_name: raw.class_name,
            num_train_timesteps: raw.num_train_timesteps.unwrap_or(d.num_train_timesteps),
            beta_start: raw.beta_start.unwrap_or(d.beta_start),
            beta_end: raw.beta_end.unwrap_or(d.beta_end),
            beta_schedule,
            trained_betas: raw.trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset: raw.steps_offset.unwrap_or(d.steps_offset),
            clip_sample: raw.clip_sample.unwrap_or(d.clip_sample),
            clip_sample_range: raw.clip_sample_range.unwrap_or(d.clip_sample_range),
            set_alpha_to_one: raw.set_alpha_to_one.unwrap_or(d.set_alpha_to_one),
            sampler: SamplerOptions {
                final_sigmas_type,
                lambda_min_clipped: raw
                    .lambda_min_clipped
                    .unwrap_or(d.sampler.lambda_min_clipped),
                lower_order_final: raw.lower_order_final.unwrap_or(d.sampler.lower_order_final),
                euler_at_final: raw.euler_at_final.unwrap_or(d.sampler.euler_at_final),
            },
            unsupported,
            source: path.to_path_buf(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::config(&self.source, msg));
        if self.num_train_timesteps < 2 {
            return err(format!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            ));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return err(format!(
                    "trained_betas has {} values but num_train_timesteps is {}",
                    betas.len(),
                    self.num_train_timesteps
                ));
            }
        } else if self.beta_schedule != BetaSchedule::SquaredcosCapV2
            && !(self.beta_start > 0.0 && self.beta_end > 0.0)
        {
            return err(format!(
                "beta_start {} and beta_end {} must both be positive",
                self.beta_start, self.beta_end
            ));
        }
        if self.clip_sample_range.is_nan() || self.clip_sample_range <= 0.0 {
            return err(format!(
                "clip_sample_range must be positive, got {}",
                self.clip_sample_range
            ));
        }
        Ok(())
    }

    /// The timestep spacing a sampler of class `kind` uses: the file's, or that
    /// class's diffusers default.
    pub fn spacing_for(&self, kind: SamplerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match kind {
            SamplerKind::Ddim => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        })
    }

    /// Errors if the file sets an option that diffusers' scheduler for `kind`
    /// would honour but that is not implemented here.
    pub fn check_sampler(&self, kind: SamplerKind) -> Result<()> {
        match self.unsupported.iter().find(|u| u.read_by.contains(&kind)) {
            None => Ok(()),
            Some(u) => Err(Error::config(
                &self.source,
                format!(
                    "{} = {} is not supported by the `{}` sampler; remove it or pick another sampler",
                    u.key,
                    u.value,
                    kind.name()
                ),
            )),
        }
    }
}

/// Betas and cumulative alphas of a configuration, and the forward process.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub prediction_type: PredictionType,
    /// βₜ for t = 0..num_train_timesteps (diffusers' float32 values).
    pub betas: Vec<f64>,
    /// ᾱₜ = ∏ₛ≤ₜ (1 − βₛ) (diffusers' float32 values).
    pub alphas_cumprod: Vec<f64>,
}

/// Rounds to the nearest `f32`, as storing in a float32 tensor does.
pub(crate) fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// `torch.linspace(start, end, n, dtype=float32)` up to one ulp.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
    let (a, b) = (f32r(start), f32r(end));
    (0..n)
        .map(|i| {
            if i + 1 == n {
                b
            } else {
                f32r(a + (b - a) * i as f64 / (n - 1) as f64)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform, cap 0.999.
fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            f32r((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999))
        })
        .collect()
}

impl NoiseSchedule {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        let betas: Vec<f64> = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| f32r(x)).collect(),
            (None, BetaSchedule::Linear) => linspace_f32(cfg.beta_start, cfg.beta_end, n),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    // The square of an f32 is exact in f64; one rounding, as in f32 arithmetic.
                    .map(|x| f32r(x * x))
                    .collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => cosine_betas(n),
        };
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b < 1.0))
        {
            return Err(Error::config(
                &cfg.source,
                format!("beta at timestep {t} is {b}; every beta must lie in (0, 1)"),
            ));
        }
        // torch.cumprod on CPU accumulates float32 in double and rounds each output.
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= f32r(1.0 - b);
                f32r(acc)
            })
            .collect();
        Ok(NoiseSchedule {
            prediction_type: cfg.prediction_type,
            betas,
            alphas_cumprod,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// Signal-to-noise ratio ᾱₜ / (1 − ᾱₜ) of training timestep `t` (as diffusers'
    /// `training_utils.compute_snr`). Panics if `t` is out of range.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// A tensor of shape `[B, 1, 1, …]` (rank of `like`) holding `f(ᾱₜ)` per sample.
    fn per_sample(
        &self,
        like: &Tensor,
        timesteps: &[usize],
        f: impl Fn(f64) -> f64,
    ) -> Result<Tensor> {
        let dims = like.dims();
        if dims.first() != Some(&timesteps.len()) {
            return Err(Error::msg(format!(
                "noise schedule: {} timesteps for a batch of shape {dims:?}",
                timesteps.len()
            )));
        }
        let n = self.num_train_timesteps();
        let coef = timesteps
            .iter()
            .map(|&t| {
                if t >= n {
                    Err(Error::msg(format!(
                        "noise schedule: timestep {t} out of range 0..{n}"
                    )))
                } else {
                    Ok(f(self.alphas_cumprod[t]) as f32)
                }
            })
            .collect::<Result<Vec<f32>>>()?;
        let mut shape = vec![1usize; dims.len()];
        shape[0] = timesteps.len();
        Ok(Tensor::from_vec(coef, shape, like.device())?.to_dtype(like.dtype())?)
    }

    fn check_same_shape(a: &Tensor, b: &Tensor) -> Result<()> {
        if a.dims() != b.dims() {
            return Err(Error::msg(format!(
                "noise schedule: sample shape {:?} and noise shape {:?} differ",
                a.dims(),
                b.dims()
            )));
        }
        Ok(())
    }

    /// `a·x + b·y` with per-sample coefficients `a = fa(ᾱₜ)`, `b = fb(ᾱₜ)`.
    fn combine(
        &self,
        x: &Tensor,
        y: &Tensor,
        timesteps: &[usize],
        fa: impl Fn(f64) -> f64,
        fb: impl Fn(f64) -> f64,
    ) -> Result<Tensor> {
        Self::check_same_shape(x, y)?;
        let a = self.per_sample(x, timesteps, fa)?;
        let b = self.per_sample(x, timesteps, fb)?;
        Ok((x.broadcast_mul(&a)? + y.broadcast_mul(&b)?)?)
    }

    /// The forward process: `xₜ = √ᾱₜ·x₀ + √(1−ᾱₜ)·ε`, one timestep per sample
    /// (dimension 0 of `x0`).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        self.combine(x0, noise, timesteps, f64::sqrt, |a| (1.0 - a).sqrt())
    }

    /// The velocity `v = √ᾱₜ·ε − √(1−ᾱₜ)·x₀`, one timestep per sample.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        self.combine(noise, x0, timesteps, f64::sqrt, |a| -(1.0 - a).sqrt())
    }

    /// The regression target of the denoiser: ε for `epsilon`, v for `v_prediction`.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => {
                Self::check_same_shape(x0, noise)?;
                Ok(noise.clone())
            }
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
        }
    }

    /// σₜ = √((1−ᾱₜ)/ᾱₜ) for every training timestep, in float32 arithmetic as diffusers.
    pub(crate) fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| {
                let a = a as f32;
                ((1.0 - a) / a).sqrt() as f64
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<SchedulerConfig> {
        SchedulerConfig::from_json_str(json, "unet/scheduler_config.json")
    }

    fn err(json: &str) -> String {
        parse(json).unwrap_err().to_string()
    }

    #[test]
    fn missing_fields_take_diffusers_defaults() {
        let cfg = parse(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#).unwrap();
        let d = SchedulerConfig::default();
        assert_eq!(cfg.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(cfg.num_train_timesteps, 1000);
        assert_eq!((cfg.beta_start, cfg.beta_end), (0.0001, 0.02));
        assert_eq!(cfg.beta_schedule, BetaSchedule::Linear);
        assert_eq!(cfg.prediction_type, PredictionType::Epsilon);
        assert_eq!(cfg.timestep_spacing, None);
        assert_eq!(cfg.spacing_for(SamplerKind::Ddim), TimestepSpacing::Leading);
        assert_eq!(
            cfg.spacing_for(SamplerKind::Euler),
            TimestepSpacing::Linspace
        );
        assert_eq!(
            cfg.spacing_for(SamplerKind::DpmPlusPlus),
            TimestepSpacing::Linspace
        );
        assert!(cfg.clip_sample && cfg.set_alpha_to_one);
        assert_eq!(cfg.sampler, d.sampler);
        assert_eq!(cfg.steps_offset, 0);
    }

    #[test]
    fn stable_diffusion_config() {
        let cfg = parse(
            r#"{"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
                "trained_betas": null, "timestep_spacing": "trailing"}"#,
        )
        .unwrap();
        assert_eq!(cfg.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(cfg.prediction_type, PredictionType::VPrediction);
        assert_eq!(cfg.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(cfg.steps_offset, 1);
        assert!(!cfg.clip_sample && !cfg.set_alpha_to_one);
        let ns = NoiseSchedule::new(&cfg).unwrap();
        assert!((ns.betas[0] - 0.00085).abs() < 1e-10);
        assert!((ns.alphas_cumprod[999] - 0.0047).abs() < 1e-4);
    }

    #[test]
    fn python_infinity_literals_read_as_unset() {
        let cfg =
            parse(r#"{"lambda_min_clipped": -Infinity, "note": "-Infinity \" NaN"}"#).unwrap();
        assert_eq!(cfg.sampler.lambda_min_clipped, f64::NEG_INFINITY);
        let cfg = parse(r#"{"lambda_min_clipped": -5.1}"#).unwrap();
        assert_eq!(cfg.sampler.lambda_min_clipped, -5.1);
    }

    #[test]
    fn unsupported_values_name_file_key_and_value() {
        let e = err(r#"{"beta_schedule": "sigmoid"}"#);
        assert!(e.starts_with("unet/scheduler_config.json: "), "{e}");
        assert!(e.contains("beta_schedule \"sigmoid\""), "{e}");
        assert!(
            e.contains("linear, scaled_linear, squaredcos_cap_v2"),
            "{e}"
        );

        let e = err(r#"{"prediction_type": "sample"}"#);
        assert!(e.contains("prediction_type \"sample\""), "{e}");
        assert!(e.contains("epsilon, v_prediction"), "{e}");

        let e = err(r#"{"timestep_spacing": "karras"}"#);
        assert!(e.contains("timestep_spacing \"karras\""), "{e}");
        assert!(e.contains("leading, trailing, linspace"), "{e}");

        let e = err(r#"{"final_sigmas_type": "max"}"#);
        assert!(e.contains("final_sigmas_type \"max\""), "{e}");

        let e = err(r#"{"rescale_betas_zero_snr": true}"#);
        assert!(e.contains("rescale_betas_zero_snr"), "{e}");

        let e = err(r#"{"trained_betas": [0.1, 0.2]}"#);
        assert!(e.contains("trained_betas has 2 values"), "{e}");

        let e = err(r#"{"num_train_timesteps": "1000"}"#);
        assert!(e.contains("invalid JSON"), "{e}");
        assert!(e.starts_with("unet/scheduler_config.json"), "{e}");

        assert!(parse(r#"{"beta_start": 0.0}"#).is_err());
        assert!(parse(r#"{"clip_sample_range": -1}"#).is_err());
        assert!(parse("not json").is_err());
    }

    #[test]
    fn bad_betas_are_rejected() {
        let cfg = SchedulerConfig {
            beta_end: 1.5,
            ..SchedulerConfig::default()
        };
        let e = NoiseSchedule::new(&cfg).unwrap_err().to_string();
        assert!(e.contains("every beta must lie in (0, 1)"), "{e}");
    }

    #[test]
    fn options_only_some_samplers_read() {
        let cfg = parse(r#"{"use_karras_sigmas": true, "thresholding": false}"#).unwrap();
        assert!(cfg.check_sampler(SamplerKind::Ddim).is_ok());
        assert!(cfg.check_sampler(SamplerKind::EulerAncestral).is_ok());
        let e = cfg
            .check_sampler(SamplerKind::Euler)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use_karras_sigmas = true"), "{e}");
        assert!(e.contains("`euler` sampler"), "{e}");
        assert!(cfg.check_sampler(SamplerKind::DpmPlusPlus).is_err());

        let cfg = parse(r#"{"thresholding": true}"#).unwrap();
        assert!(cfg.check_sampler(SamplerKind::Ddim).is_err());
        assert!(cfg.check_sampler(SamplerKind::Euler).is_ok());

        let cfg = parse(r#"{"interpolation_type": "log_linear"}"#).unwrap();
        assert!(cfg.check_sampler(SamplerKind::Euler).is_err());
        assert!(cfg.check_sampler(SamplerKind::EulerAncestral).is_ok());
    }

    #[test]
    fn missing_file_is_not_found() {
        let e = SchedulerConfig::from_file("/nonexistent/scheduler_config.json").unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
    }

    #[test]
    fn snr_and_targets() {
        let ns = NoiseSchedule::new(&SchedulerConfig::default()).unwrap();
        let a = ns.alphas_cumprod[10];
        assert_eq!(ns.snr(10), a / (1.0 - a));
        assert!(ns.snr(0) > ns.snr(500) && ns.snr(500) > ns.snr(999));
    }
}
