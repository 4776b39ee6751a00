//! Writing a (trained) model out: a diffusers folder that diffusers,
//! ComfyUI and this tool load, and optionally an original-layout single file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::models::clip_text::ClipTextConfig;
use crate::models::single_file::{
    Family, SaveConfigs, save_single_file, scheduler_config_json, text_config_json,
    unet_config_json, vae_config_json,
};
use crate::models::{ModelFormat, StableDiffusion};
use crate::nn::store::save_safetensors_as;
use crate::tokenizer::ClipTokenizer;
use crate::util::write_atomic;
use crate::{Error, Result};

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// `from` with its subfolders, copied to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let path = e.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(e.file_name()))?;
        } else {
            std::fs::copy(&path, to.join(e.file_name())).map_err(|err| Error::io(&path, err))?;
        }
    }
    Ok(())
}

/// The components this tool writes itself; any other a `model_index.json` names
/// (`safety_checker`, `feature_extractor`, `image_encoder`, ...) is carried over.
const WRITTEN_COMPONENTS: [&str; 7] = [
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
];

/// The source folder's `model_index.json` in `tmp`, with the components this
/// tool does not write copied over as they are (as diffusers' `save_pretrained`
/// of the loaded pipeline keeps them, e.g. SD 1.5's `safety_checker/` and
/// `feature_extractor/`). A component the index names whose folder the source
/// lacks becomes `[null, null]`, so the written pipeline loads in diffusers.
fn carry_model_index(src: &Path, tmp: &Path) -> Result<()> {
    let index_path = src.join("model_index.json");
    let mut index: serde_json::Value = crate::util::read_json(&index_path)?;
    if let Some(map) = index.as_object_mut() {
        for (name, value) in map.iter_mut() {
            let names_a_class = value
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|v| v.is_string()));
            if name.starts_with('_')
                || WRITTEN_COMPONENTS.contains(&name.as_str())
                || !names_a_class
            {
                continue;
            }
            let dir = src.join(name);
            if dir.is_dir() {
                copy_dir(&dir, &tmp.join(name))?;
            } else {
                *value = json!([null, null]);
            }
        }
    }
    write_json(&tmp.join("model_index.json"), &index)
}

/// The model's tokenizer files (vocab.json, merges.txt text) when its
/// vocabulary is not CLIP's standard one (which a single file's loader has).
fn own_tokenizer_files(model: &StableDiffusion) -> Option<(String, String)> {
    (model.tokenizer.vocab_size() != 49408).then(|| model.tokenizer.vocab_merges_text())
}

/// Writes `model` (with its current, possibly trained, weights) as a diffusers
/// folder at `out`, atomically: built in a temporary folder, then renamed.
/// Weights as they are held (f32).
pub fn save_diffusers(model: &StableDiffusion, out: &Path) -> Result<()> {
    save_diffusers_as(model, out, None)
}

/// [`save_diffusers`] with every component's floating-point weights written
/// in `dtype` (f32, f16 or bf16: `convert --dtype`, `train --save-precision`);
/// `None` writes them as they are held.
pub fn save_diffusers_as(model: &StableDiffusion, out: &Path, dtype: Option<DType>) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let src = &model.source;
    let from_folder = model.format == ModelFormat::Diffusers;

    write_json(
        &tmp.join("unet").join("config.json"),
        &unet_config_json(&model.unet.config),
    )?;
    save_safetensors_as(
        &model.unet_vb.tensors(),
        &tmp.join("unet").join("diffusion_pytorch_model.safetensors"),
        None,
        dtype,
    )?;
    write_json(
        &tmp.join("vae").join("config.json"),
        &vae_config_json(model.vae.config()),
    )?;
    save_safetensors_as(
        &model.vae_vb.tensors(),
        &tmp.join("vae").join("diffusion_pytorch_model.safetensors"),
        None,
        dtype,
    )?;
    write_text_encoder(
        &tmp.join("text_encoder"),
        model.text_encoder.config(),
        "CLIPTextModel",
        &model.text_encoder_vb.tensors(),
        dtype,
    )?;
    // The source's tokenizer folders as they are; written out for a single file.
    let src_folder = |name: &str| Some(src.join(name)).filter(|d| from_folder && d.is_dir());
    write_tokenizer(
        src_folder("tokenizer"),
        &model.tokenizer,
        &tmp.join("tokenizer"),
    )?;
    if let Some(te2) = &model.text_encoder_2 {
        // SDXL's second text encoder, with its current (trained, merged or
        // unchanged) weights.
        write_text_encoder(
            &tmp.join("text_encoder_2"),
            te2.model.config(),
            "CLIPTextModelWithProjection",
            &te2.vb.tensors(),
            dtype,
        )?;
        write_tokenizer(
            src_folder("tokenizer_2"),
            &te2.tokenizer,
            &tmp.join("tokenizer_2"),
        )?;
    }
    if from_folder && src.join("scheduler").is_dir() {
        copy_dir(&src.join("scheduler"), &tmp.join("scheduler"))?;
    } else {
        write_json(
            &tmp.join("scheduler").join("scheduler_config.json"),
            &scheduler_config_json(&model.scheduler),
        )?;
    }
    if from_folder && src.join("model_index.json").is_file() {
        carry_model_index(src, &tmp)?;
    } else if model.is_sdxl() {
        write_json(
            &tmp.join("model_index.json"),
            &json!({
                "_class_name": "StableDiffusionXLPipeline",
                "_diffusers_version": "0.42.1",
                "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
                "feature_extractor": [null, null],
                "image_encoder": [null, null],
                "scheduler": ["diffusers", model.scheduler.class_name.clone().unwrap_or_else(|| "EulerDiscreteScheduler".into())],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]
            }),
        )?;
    } else {
        write_json(
            &tmp.join("model_index.json"),
            &json!({
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [null, null],
                "requires_safety_checker": false,
                "safety_checker": [null, null],
                "scheduler": ["diffusers", model.scheduler.class_name.clone().unwrap_or_else(|| "DDIMScheduler".into())],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]
            }),
        )?;
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}

/// A text encoder's `config.json` (naming transformers' `architecture`) and
/// `model.safetensors` in `dir`.
fn write_text_encoder(
    dir: &Path,
    cfg: &ClipTextConfig,
    architecture: &str,
    tensors: &BTreeMap<String, Tensor>,
    dtype: Option<DType>,
) -> Result<()> {
    let mut json = text_config_json(cfg);
    json["architectures"] = json!([architecture]);
    write_json(&dir.join("config.json"), &json)?;
    save_safetensors_as(tensors, &dir.join("model.safetensors"), None, dtype)
}

/// A tokenizer folder at `to`: a copy of `from` when there is one, else
/// written from `tokenizer` ([`write_clip_tokenizer`]).
fn write_tokenizer(from: Option<PathBuf>, tokenizer: &ClipTokenizer, to: &Path) -> Result<()> {
    match from {
        Some(from) => copy_dir(&from, to),
        None => write_clip_tokenizer(tokenizer, to),
    }
}

/// A tokenizer's vocab.json, merges.txt and tokenizer_config.json (for models
/// loaded from a single file, which carries no tokenizer folder).
fn write_clip_tokenizer(tokenizer: &ClipTokenizer, dir: &Path) -> Result<()> {
    let (vocab, merges) = tokenizer.vocab_merges_text();
    write_atomic(&dir.join("vocab.json"), vocab.as_bytes())?;
    write_atomic(&dir.join("merges.txt"), merges.as_bytes())?;
    let pad = tokenizer
        .id_to_token(tokenizer.pad_id())
        .unwrap_or_else(|| "<|endoftext|>".into());
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": tokenizer.model_max_length(),
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": pad,
            "do_lower_case": true
        }),
    )
}

/// Whether `out` names a single file (`*.safetensors`) rather than a folder.
pub fn is_single_file(out: &Path) -> bool {
    out.extension().is_some_and(|e| e == "safetensors")
}

/// Writes `model` to `out` with its weights in `dtype`: an original-layout
/// single file when `out` ends in `.safetensors`, else a diffusers folder.
/// Returns what was written, for a message.
pub fn save_to(model: &StableDiffusion, out: &Path, dtype: DType) -> Result<&'static str> {
    if is_single_file(out) {
        save_single(model, out, dtype)?;
        Ok("single-file checkpoint")
    } else {
        save_diffusers_as(model, out, Some(dtype))?;
        Ok("diffusers folder")
    }
}

/// Writes the original latent-diffusion layout (`model.diffusion_model.*`, ...)
/// that A1111 / ComfyUI load, with our configs (and, for a non-standard
/// vocabulary, the tokenizer) in the metadata.
pub fn save_single(model: &StableDiffusion, path: &Path, dtype: DType) -> Result<PathBuf> {
    let te_cfg = model.text_encoder.config();
    let tok = own_tokenizer_files(model);
    let te2 = model.text_encoder_2.as_ref();
    let configs = SaveConfigs {
        family: if te2.is_some() {
            Family::Sdxl
        } else {
            Family::from_text_config(te_cfg)
        },
        text_encoder_2: te2.map(|t| t.model.config()),
        unet: &model.unet.config,
        vae: model.vae.config(),
        text_encoder: te_cfg,
        scheduler: &model.scheduler,
        tokenizer_files: tok.as_ref().map(|(v, m)| (v.as_str(), m.as_str())),
    };
    save_single_file(
        path,
        &model.unet_vb.tensors(),
        &model.vae_vb.tensors(),
        &model.text_encoder_vb.tensors(),
        te2.map(|t| t.vb.tensors()).as_ref(),
        &configs,
        dtype,
    )?;
    Ok(path.to_path_buf())
}
