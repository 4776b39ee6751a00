//! DreamBooth for Stable Diffusion in Rust.
//!
//! Layout (see the README): `nn` holds our differentiable layers, `models` the
//! three Stable Diffusion networks and their loading, `tokenizer` the CLIP BPE,
//! `diffusion` noise schedules and samplers, `dreambooth` the trainer, `toy` the
//! procedural world and the bundled tiny model.

pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod diffusion;
pub mod dreambooth;
pub mod error;
pub mod eval;
pub mod image_io;
pub mod models;
pub mod nn;
pub mod optim;
pub mod selftest;
pub mod tokenizer;
pub mod toy;
pub mod util;

pub use error::{Error, Result};
