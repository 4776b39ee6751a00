//! Writing a (trained) model out: a diffusers folder that diffusers,
//! ComfyUI and this tool load, and optionally an original-layout single file.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::json;

use crate::models::single_file::{
    Family, SaveConfigs, save_single_file, scheduler_config_json, text_config_json,
    unet_config_json, vae_config_json,
};
use crate::models::{ModelFormat, StableDiffusion};
use crate::nn::save_safetensors;
use crate::util::write_atomic;
use crate::{Error, Result};

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// The source model's tokenizer files (vocab.json, merges.txt), when it is a
/// diffusers folder whose vocabulary is not CLIP's standard one.
fn own_tokenizer_files(model: &StableDiffusion) -> Option<(String, String)> {
    if model.format != ModelFormat::Diffusers || model.tokenizer.vocab_size() == 49408 {
        return None;
    }
    let dir = model.source.join("tokenizer");
    let vocab = std::fs::read_to_string(dir.join("vocab.json")).ok()?;
    let merges = std::fs::read_to_string(dir.join("merges.txt")).ok()?;
    Some((vocab, merges))
}

/// Writes `model` (with its current, possibly trained, weights) as a diffusers
/// folder at `out`, atomically: built in a temporary folder, then renamed.
pub fn save_diffusers(model: &StableDiffusion, out: &Path) -> Result<()> {
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
    save_safetensors(
        &model.unet_vb.tensors(),
        &tmp.join("unet").join("diffusion_pytorch_model.safetensors"),
        None,
    )?;
    write_json(
        &tmp.join("vae").join("config.json"),
        &vae_config_json(model.vae.config()),
    )?;
    save_safetensors(
        &model.vae_vb.tensors(),
        &tmp.join("vae").join("diffusion_pytorch_model.safetensors"),
        None,
    )?;
    let mut te_cfg = text_config_json(model.text_encoder.config());
    if let Some(obj) = te_cfg.as_object_mut() {
        obj.entry("architectures")
            .or_insert(json!(["CLIPTextModel"]));
        obj.entry("model_type").or_insert(json!("clip_text_model"));
    }
    write_json(&tmp.join("text_encoder").join("config.json"), &te_cfg)?;
    save_safetensors(
        &model.text_encoder_vb.tensors(),
        &tmp.join("text_encoder").join("model.safetensors"),
        None,
    )?;
    if from_folder && src.join("scheduler").is_dir() {
        copy_dir(&src.join("scheduler"), &tmp.join("scheduler"))?;
    } else {
        write_json(
            &tmp.join("scheduler").join("scheduler_config.json"),
            &scheduler_config_json(&model.scheduler),
        )?;
    }
    if from_folder && src.join("tokenizer").is_dir() {
        copy_dir(&src.join("tokenizer"), &tmp.join("tokenizer"))?;
    } else {
        write_clip_tokenizer(model, &tmp.join("tokenizer"))?;
    }
    if from_folder && src.join("model_index.json").is_file() {
        std::fs::copy(src.join("model_index.json"), tmp.join("model_index.json"))
            .map_err(|e| Error::io(src.join("model_index.json"), e))?;
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

/// CLIP's standard vocabulary as vocab.json + merges.txt (for models loaded
/// from a single file, which carries no tokenizer).
fn write_clip_tokenizer(model: &StableDiffusion, dir: &Path) -> Result<()> {
    if let Some((vocab, merges)) = own_tokenizer_files(model) {
        write_atomic(&dir.join("vocab.json"), vocab.as_bytes())?;
        return write_atomic(&dir.join("merges.txt"), merges.as_bytes());
    }
    let (tokens, merges) = crate::tokenizer::read_bpe_gz(crate::models::sd::clip_bpe_file()?)?;
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    write_atomic(
        &dir.join("vocab.json"),
        serde_json::Value::Object(vocab).to_string().as_bytes(),
    )?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    write_atomic(&dir.join("merges.txt"), text.as_bytes())?;
    let pad = model
        .tokenizer
        .id_to_token(model.tokenizer.pad_id())
        .unwrap_or_else(|| "<|endoftext|>".into());
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": model.tokenizer.model_max_length(),
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": pad,
            "do_lower_case": true
        }),
    )
}

/// Writes the original latent-diffusion layout (`model.diffusion_model.*`, ...)
/// that A1111 / ComfyUI load, with our configs (and, for a non-standard
/// vocabulary, the tokenizer) in the metadata.
pub fn save_single(model: &StableDiffusion, path: &Path, dtype: DType) -> Result<PathBuf> {
    let te_cfg = model.text_encoder.config();
    let tok = own_tokenizer_files(model);
    let configs = SaveConfigs {
        family: Family::from_text_config(te_cfg),
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
        &configs,
        dtype,
    )?;
    Ok(path.to_path_buf())
}
