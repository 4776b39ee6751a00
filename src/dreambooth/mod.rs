//! The DreamBooth method: data, class-image cache, loss, training loop,
//! checkpoints and export.

pub mod checkpoint;
pub mod class_images;
pub mod config;
pub mod data;
pub mod export;
pub mod identifier;
pub mod loss;
pub mod trainer;
