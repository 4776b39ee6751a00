//! The Stable Diffusion networks, their configs and checkpoint loading.

pub mod attention;
pub mod clip_text;
pub mod clip_vision;
pub mod config;
pub mod dino;
pub mod frozen_dtypes;
pub mod hub;
pub mod load;
pub mod lora;
pub mod lpips;
pub mod resnet;
pub mod sd;
pub mod serde_default;
pub mod single_file;
pub mod transformer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;

pub use config::UNetConfig;
pub use frozen_dtypes::FrozenDTypes;
pub use sd::{LoadOptions, ModelFormat, StableDiffusion};
pub use unet::{AddedCond, UNet2DConditionModel, UNetCond};
