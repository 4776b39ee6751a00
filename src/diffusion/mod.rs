//! Diffusion: the noise schedule (betas, ᾱ, SNR, ε/v targets) the trainer uses,
//! and the samplers that run the reverse process, all matching diffusers.
//!
//! - [`schedule`]: `scheduler_config.json` ([`SchedulerConfig`]) and the
//!   forward process ([`NoiseSchedule`]).
//! - [`sampler`]: the [`Sampler`] trait, [`SamplerKind`] and [`make_sampler`].
//! - [`ddim`], [`euler`], [`euler_ancestral`], [`dpm_solver`]: one sampler each.

pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod pipeline;
pub mod sampler;
pub mod schedule;

pub use ddim::DdimSampler;
pub use dpm_solver::DpmSolverSampler;
pub use euler::EulerSampler;
pub use euler_ancestral::EulerAncestralSampler;
pub use pipeline::{GenerateOptions, Generation, generate};
pub use sampler::{Sampler, SamplerKind, make_sampler};
pub use schedule::{
    BetaSchedule, FinalSigmas, NoiseSchedule, PredictionType, SamplerOptions, SchedulerConfig,
    TimestepSpacing,
};
