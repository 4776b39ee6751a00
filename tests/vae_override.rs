//! `--vae`: a model's VAE replaced by one from a VAE folder, a standalone VAE
//! file (original layout with or without `first_stage_model.`, or diffusers
//! names) or another checkpoint.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dreambooth::models::{LoadOptions, StableDiffusion};
use dreambooth::nn::{read_safetensors, save_safetensors};

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dreambooth-vae-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny() -> StableDiffusion {
    StableDiffusion::load(
        &common::fixtures().join("tiny-sd1"),
        &Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap()
}

/// The folder's VAE tensors, `decoder.conv_out.weight` doubled.
fn expected_vae() -> HashMap<String, Tensor> {
    let mut want = read_safetensors(
        &common::fixtures().join("tiny-sd1/vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let w = want["decoder.conv_out.weight"].affine(2.0, 0.0).unwrap();
    want.insert("decoder.conv_out.weight".into(), w);
    want
}

fn assert_vae(model: &StableDiffusion, want: &HashMap<String, Tensor>, what: &str) {
    let got = model.vae_vb.tensors();
    assert_eq!(got.len(), want.len(), "{what}");
    for (k, w) in want {
        assert!(
            common::to_f64(&got[k]) == common::to_f64(w),
            "{what}: `{k}` differs"
        );
    }
}

/// The tiny single file's VAE tensors (LDM names), `decoder.conv_out.weight`
/// doubled, with the names `rename` gives.
fn ldm_vae(rename: impl Fn(&str) -> String) -> BTreeMap<String, Tensor> {
    let all = read_safetensors(
        &common::fixtures().join("tiny-sd1.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    all.into_iter()
        .filter_map(|(k, t)| {
            let rest = k.strip_prefix("first_stage_model.")?.to_string();
            let t = if rest == "decoder.conv_out.weight" {
                t.affine(2.0, 0.0).unwrap()
            } else {
                t
            };
            Some((rename(&rest), t))
        })
        .collect()
}

#[test]
fn vae_files_in_either_layout_replace_the_models() {
    let dir = tmp_dir("files");
    let want = expected_vae();

    // Original layout, bare (as vae-ft-mse-840000-ema-pruned) and prefixed,
    // with a training leftover that is skipped.
    let mut bare = ldm_vae(|k| k.to_string());
    bare.insert(
        "loss.logvar".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    save_safetensors(&bare, &dir.join("bare.safetensors"), None).unwrap();
    let prefixed = ldm_vae(|k| format!("first_stage_model.{k}"));
    save_safetensors(&prefixed, &dir.join("prefixed.safetensors"), None).unwrap();
    // diffusers names.
    let named: BTreeMap<String, Tensor> = want.clone().into_iter().collect();
    save_safetensors(&named, &dir.join("diffusers.safetensors"), None).unwrap();

    for name in ["bare", "prefixed", "diffusers"] {
        let mut model = tiny();
        let before = model.model_hash().unwrap();
        model
            .set_vae(&dir.join(format!("{name}.safetensors")))
            .unwrap();
        assert_vae(&model, &want, name);
        assert_ne!(before, model.model_hash().unwrap(), "{name}: fingerprint");
    }

    // A whole checkpoint: its VAE only.
    let mut model = tiny();
    model
        .set_vae(&common::fixtures().join("tiny-sd1.safetensors"))
        .unwrap();
    let original = read_safetensors(
        &common::fixtures().join("tiny-sd1/vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_vae(&model, &original, "checkpoint");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_vae_folder_brings_its_config() {
    let dir = tmp_dir("folder");
    let vae = dir.join("vae");
    common::copy_dir(&common::fixtures().join("tiny-sd1/vae"), &vae);
    let cfg_path = vae.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["scaling_factor"] = serde_json::json!(0.5);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let named: BTreeMap<String, Tensor> = expected_vae().into_iter().collect();
    save_safetensors(
        &named,
        &vae.join("diffusion_pytorch_model.safetensors"),
        None,
    )
    .unwrap();

    let mut model = tiny();
    model.set_vae(&vae).unwrap();
    assert_eq!(model.vae.config().scaling_factor, 0.5);
    assert_vae(&model, &expected_vae(), "folder");

    // Latent channels the UNet does not take.
    cfg["latent_channels"] = serde_json::json!(8);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = tiny().set_vae(&vae).unwrap_err().to_string();
    assert!(e.contains("latent channels") && e.contains("vae"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_vae_files_are_clear_errors() {
    let dir = tmp_dir("errors");
    // A tensor that is not the VAE's.
    let mut extra = ldm_vae(|k| k.to_string());
    extra.insert(
        "encoder.extra_head.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    save_safetensors(&extra, &dir.join("extra.safetensors"), None).unwrap();
    let e = tiny()
        .set_vae(&dir.join("extra.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("extra.safetensors") && e.contains("encoder.extra_head.weight"),
        "{e}"
    );
    // A tensor of another shape: named as the file names it.
    let mut wrong = ldm_vae(|k| k.to_string());
    wrong.insert(
        "decoder.conv_out.weight".into(),
        Tensor::zeros((3, 5, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    save_safetensors(&wrong, &dir.join("wrong.safetensors"), None).unwrap();
    let e = tiny()
        .set_vae(&dir.join("wrong.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("wrong.safetensors") && e.contains("decoder.conv_out.weight"),
        "{e}"
    );
    // No VAE at all (a UNet-only file).
    let unet: BTreeMap<String, Tensor> = read_safetensors(
        &common::fixtures().join("tiny-sd1/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, t)| (format!("model.diffusion_model.{k}"), t))
    .collect();
    save_safetensors(&unet, &dir.join("unet.safetensors"), None).unwrap();
    let e = tiny()
        .set_vae(&dir.join("unet.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unet.safetensors"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn generate_takes_vae() {
    let dir = tmp_dir("cli");
    save_safetensors(
        &ldm_vae(|k| k.to_string()),
        &dir.join("vae.safetensors"),
        None,
    )
    .unwrap();
    let generate = |vae: &str, out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
            .args(["generate", "--model"])
            .arg(common::fixtures().join("tiny-sd1"))
            .arg("--vae")
            .arg(dir.join(vae))
            .args(["--prompt", "a dog", "--steps", "2", "-n", "1", "--out"])
            .arg(dir.join(out))
            .output()
            .unwrap()
    };
    let o = generate("vae.safetensors", "out");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.join("out/00000.png").is_file());
    let o = generate("missing.safetensors", "out2");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("missing.safetensors") && e.contains("not found"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).ok();
}
