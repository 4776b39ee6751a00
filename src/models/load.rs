//! Locating the pieces of a diffusers model folder.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Weight files a component folder (`unet/`, `vae/`, `text_encoder/`, ...) may
/// hold, in the order they are preferred: diffusers' and transformers' names,
/// full precision before the fp16 variant, safetensors before a shard index
/// (`save_pretrained` of a large model) before PyTorch pickles.
pub const WEIGHT_FILE_NAMES: [&str; 12] = [
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
    "model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
];

/// The weights file of a component folder: the first of
/// [`WEIGHT_FILE_NAMES`] that is there (read by [`crate::nn::weights`]).
pub fn weights_file(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
        });
    }
    for name in WEIGHT_FILE_NAMES {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::config(
        dir,
        "no weights found (expected diffusion_pytorch_model.safetensors, model.safetensors, \
         a *.safetensors.index.json with its shards, or a PyTorch .bin)",
    ))
}
