//! The toy world the bundled tiny model is trained on: procedural 64×64
//! scenes with captions ([`world`]), DreamBooth subjects, and an analytic
//! oracle that reads any 64×64 image back into context, class and colour and
//! scores subject fidelity and diversity ([`oracle`]).

pub mod ablation;
pub mod demo;
pub mod metrics;
pub mod oracle;
pub mod pretrain;
pub mod vocab;
pub mod world;

pub use oracle::{
    ObjectReading, Reading, SubjectLikeness, SubjectScore, diversity, image_distance,
    object_similarity, read, subject_fidelity, subject_likeness,
};
pub use world::{
    Class, Color, Context, Paint, RARE_TOKENS, SIZE, Sample, Scene, Subject, ToyRng, World,
    caption, describe, from_chw_f32, render, sample_batch, save_grid, scene_batch, subject_photos,
    to_chw_f32, vocabulary,
};
