//! The DreamBooth method: data, class-image cache, loss, training loop,
//! checkpoints and export.

pub mod loss;
