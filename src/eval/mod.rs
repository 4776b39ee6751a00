//! Evaluation the DreamBooth paper's way: image encoders' preprocessing here,
//! the models in `models::clip_vision` and `models::dino`.

pub mod metrics;
pub mod paper;
pub mod preprocess;
pub mod processor_config;
pub mod report;
pub mod run;
