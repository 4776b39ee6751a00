//! The denoising loss every training step here computes:
//! ‖ε̂(z_t, t, c) − target‖² per sample, target = ε or v per the model's
//! prediction type, optionally min-SNR weighted.

use candle_core::{DType, Tensor};

use crate::Result;
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::models::{UNet2DConditionModel, UNetCond};
use crate::nn::Precision;

/// Per-sample mean squared error (B,) of the UNet's prediction on
/// `latents` noised with `noise` at `timesteps`, conditioned on `cond` (the
/// text context, and for SDXL the pooled text embeddings and time ids).
/// The UNet computes in `precision` (mixed precision: bf16 / f16 activations,
/// f32 weights); noise, target and the error are f32.
pub fn denoising_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    latents: &Tensor,
    cond: UNetCond,
    timesteps: &[usize],
    noise: &Tensor,
    precision: Precision,
) -> Result<Tensor> {
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, timesteps.len(), latents.device())?;
    let pred = unet
        .forward_added(&precision.cast(&noisy)?, &t, cond.context, cond.added)?
        .to_dtype(DType::F32)?;
    let target = schedule.target(latents, noise, timesteps)?;
    per_sample_mse(&pred, &target)
}

/// Mean over all but the batch dimension of (a − b)².
pub fn per_sample_mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let bsz = a.dim(0)?;
    Ok((a - b)?.sqr()?.reshape((bsz, ()))?.mean(1)?)
}

/// Min-SNR-γ weights (Hang et al. 2023) as diffusers' trainers compute them:
/// min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction.
pub fn min_snr_weights(
    schedule: &NoiseSchedule,
    timesteps: &[usize],
    gamma: f64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let w: Vec<f32> = timesteps
        .iter()
        .map(|&t| {
            let snr = schedule.snr(t);
            let m = snr.min(gamma);
            (match schedule.prediction_type {
                PredictionType::VPrediction => m / (snr + 1.0),
                _ => m / snr,
            }) as f32
        })
        .collect();
    Ok(Tensor::from_vec(w, timesteps.len(), device)?.to_dtype(DType::F32)?)
}
