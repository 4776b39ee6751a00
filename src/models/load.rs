//! Locating the pieces of a diffusers model folder.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The safetensors weights file of a component folder (`unet/`, `vae/`, ...):
/// `diffusion_pytorch_model.safetensors` or `model.safetensors`, or the fp16 variant.
pub fn weights_file(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
        });
    }
    for name in [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
    ] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    if dir.join("diffusion_pytorch_model.bin").is_file() || dir.join("pytorch_model.bin").is_file()
    {
        return Err(Error::config(
            dir,
            "only PyTorch .bin weights found; convert them to .safetensors (pickle files are not loaded)",
        ));
    }
    Err(Error::config(
        dir,
        "no weights found (expected diffusion_pytorch_model.safetensors or model.safetensors)",
    ))
}
