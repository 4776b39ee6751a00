//! The dtypes a model's frozen components are read in.
//!
//! A component used frozen in half precision (the UNet of `generate --dtype
//! fp16`, LoRA's frozen base under mixed precision, every component of
//! `convert --dtype fp16`) is read straight into f16 or bf16, one tensor cast
//! at a time as the file is read ([`crate::nn::WeightsReader::load_in`]), so
//! no f32 copy of the whole component is ever in memory. The tensors are bit
//! for bit those of an f32 load converted afterwards. Trainable components
//! keep f32 master weights.

use std::path::Path;

use candle_core::DType;

use crate::{Error, Result};

/// The dtype each frozen component's floating-point weights are held in;
/// `None` is f32. A model computes in the dtype of its weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrozenDTypes {
    pub unet: Option<DType>,
    /// The text encoder and, for SDXL, the second one.
    pub text_encoders: Option<DType>,
    pub vae: Option<DType>,
}

impl FrozenDTypes {
    /// Every component in `dtype` (`convert --dtype`: the weights are only
    /// written out, in that dtype).
    pub fn all(dtype: DType) -> Self {
        Self {
            unet: Some(dtype),
            text_encoders: Some(dtype),
            vae: Some(dtype),
        }
    }

    /// The UNet in `dtype`, the rest f32 (sampling with a half-precision
    /// UNet: `generate --dtype`, LoRA's frozen base).
    pub fn unet_only(dtype: DType) -> Self {
        Self {
            unet: Some(dtype),
            ..Self::default()
        }
    }

    pub fn unet(&self) -> DType {
        self.unet.unwrap_or(DType::F32)
    }

    pub fn text_encoders(&self) -> DType {
        self.text_encoders.unwrap_or(DType::F32)
    }

    pub fn vae(&self) -> DType {
        self.vae.unwrap_or(DType::F32)
    }

    /// Each dtype is f32, f16 or bf16, and f32 for a component that is
    /// trained; errors name `path`, the model being loaded.
    pub fn check(&self, path: &Path, train_unet: bool, train_text_encoder: bool) -> Result<()> {
        for (what, dtype, trained) in [
            ("the UNet", self.unet(), train_unet),
            ("the text encoder", self.text_encoders(), train_text_encoder),
            ("the VAE", self.vae(), false),
        ] {
            crate::nn::store::check_params_dtype(path, trained, dtype).map_err(|e| match e {
                Error::Config { path, msg } => Error::Config {
                    path,
                    msg: format!("{what}: {msg}"),
                },
                e => e,
            })?;
        }
        Ok(())
    }
}
