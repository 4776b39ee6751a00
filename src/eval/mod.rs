//! Evaluation the DreamBooth paper's way: image encoders' preprocessing here,
//! the models in `models::clip_vision` and `models::dino`.

pub mod preprocess;
