//! The DreamBooth method: data, class-image cache, loss, training loop,
//! checkpoints and export.

pub mod loss;
pub mod data;
pub mod checkpoint;
pub mod config;
pub mod export;
pub mod class_images;
pub mod trainer;
pub mod identifier;
