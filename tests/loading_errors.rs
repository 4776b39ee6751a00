//! A diffusers folder with a missing key, a wrong shape or an unexpected key is
//! an error naming the file, the key and (for shapes) both shapes.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::fixtures;
use dreambooth::models::UNet2DConditionModel;

/// A copy of tiny-sd1's unet/ with its weights changed by `edit`.
fn edited_unet(tag: &str, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> PathBuf {
    let src = fixtures().join("tiny-sd1").join("unet");
    let dir = std::env::temp_dir().join(format!("db-load-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut w: BTreeMap<String, Tensor> = dreambooth::nn::read_safetensors(
        &src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect();
    edit(&mut w);
    dreambooth::nn::save_safetensors(&w, &dir.join("diffusion_pytorch_model.safetensors"), None)
        .unwrap();
    dir
}

fn load_err(dir: &PathBuf) -> String {
    let e = match UNet2DConditionModel::load(dir, &Device::Cpu, false) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    };
    std::fs::remove_dir_all(dir).ok();
    e
}

#[test]
fn missing_key_is_named() {
    let key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let dir = edited_unet("missing", |w| {
        w.remove(key);
    });
    let e = load_err(&dir);
    assert!(
        e.contains(key) && e.contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );
    assert!(e.contains("missing"), "{e}");
}

#[test]
fn wrong_shape_names_both_shapes() {
    let key = "conv_in.weight";
    let dir = edited_unet("shape", |w| {
        w.insert(
            key.into(),
            Tensor::zeros((16, 4, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&dir);
    assert!(
        e.contains(key) && e.contains("[16, 4, 1, 1]") && e.contains("[16, 4, 3, 3]"),
        "{e}"
    );
}

#[test]
fn unexpected_key_is_reported() {
    let dir = edited_unet("extra", |w| {
        w.insert(
            "mystery.weight".into(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&dir);
    assert!(
        e.contains("mystery.weight") && e.contains("unexpected"),
        "{e}"
    );
}

#[test]
fn missing_weights_file_is_named() {
    let dir = std::env::temp_dir().join(format!("db-load-nofile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixtures().join("tiny-sd1/unet/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("no weights found") && e.contains("db-load-nofile"),
        "{e}"
    );
}
