//! Weight files in the formats real checkpoints come in: PyTorch zip pickles
//! (`.bin` in diffusers/transformers folders, original `.ckpt` files) and
//! sharded safetensors. Fixtures: tools/parity/weight_formats.py.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dreambooth::diffusion::pipeline::{GenerateOptions, generate};
use dreambooth::models::clip_text::ClipTextModel;
use dreambooth::models::single_file::{Family, SingleFileOptions, load_components};
use dreambooth::models::vae::AutoencoderKL;
use dreambooth::models::{LoadOptions, StableDiffusion, UNet2DConditionModel};
use dreambooth::nn::{Vb, WeightsReader, read_safetensors, read_weights};

fn formats() -> PathBuf {
    common::fixtures().join("formats")
}

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dreambooth-weight-formats-{tag}-{}",
        std::process::id()
    ));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Same keys (buffers aside), every tensor of the same dtype, shape and bits.
fn assert_same(what: &str, got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) {
    let keys = |m: &HashMap<String, Tensor>| {
        let mut k: Vec<String> = m
            .keys()
            .filter(|k| !k.ends_with("position_ids"))
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(got), keys(want), "{what}: keys differ");
    for k in keys(want) {
        let (g, w) = (&got[&k], &want[&k]);
        assert_eq!(g.dtype(), w.dtype(), "{what}: `{k}` dtype");
        assert_eq!(g.dims(), w.dims(), "{what}: `{k}` shape");
        assert!(
            common::to_f64(g) == common::to_f64(w),
            "{what}: `{k}` differs"
        );
    }
    println!("{what}: {} tensors identical", want.len());
}

/// A copy of tiny-sd1 whose UNet and text encoder are `.bin` pickles and whose
/// VAE is sharded: no safetensors weights file is left in those folders.
fn tiny_sd1_in_other_formats(tag: &str) -> PathBuf {
    let dir = tmp_dir(tag);
    common::copy_dir(&common::fixtures().join("tiny-sd1"), &dir);
    for (part, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ] {
        std::fs::remove_file(dir.join(part).join(file)).unwrap();
        let from = formats().join("tiny-sd1-weights").join(part);
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(part).join(e.file_name())).unwrap();
        }
    }
    dir
}

#[test]
fn pickles_and_shards_read_bit_identical_to_safetensors() {
    let tiny = common::fixtures().join("tiny-sd1");
    let other = formats().join("tiny-sd1-weights");
    let cpu = &Device::Cpu;
    for (what, got, want) in [
        (
            "unet .bin",
            other.join("unet/diffusion_pytorch_model.bin"),
            tiny.join("unet/diffusion_pytorch_model.safetensors"),
        ),
        (
            "text encoder .bin",
            other.join("text_encoder/pytorch_model.bin"),
            tiny.join("text_encoder/model.safetensors"),
        ),
        (
            "vae shards",
            other.join("vae/diffusion_pytorch_model.safetensors.index.json"),
            tiny.join("vae/diffusion_pytorch_model.safetensors"),
        ),
    ] {
        let got_t = read_weights(&got, cpu).unwrap();
        let want_t = read_safetensors(&want, cpu).unwrap();
        assert_same(what, &got_t, &want_t);
        // The shapes listed without loading agree with the tensors.
        let reader = WeightsReader::open(&got).unwrap();
        for (name, shape) in reader.shapes() {
            assert_eq!(got_t[&name].dims(), &shape[..], "{what}: `{name}`");
        }
    }
    // A sharded model is its index and every shard.
    let index = other.join("vae/diffusion_pytorch_model.safetensors.index.json");
    let files = WeightsReader::open(&index).unwrap().files();
    assert_eq!(files.len(), 5, "{files:?}");
    assert_eq!(files[0], index);
}

#[test]
fn diffusers_folder_with_pickles_and_shards_generates_the_same_images() {
    let dir = tiny_sd1_in_other_formats("folder");
    let cpu = &Device::Cpu;
    let a = StableDiffusion::load(
        &common::fixtures().join("tiny-sd1"),
        cpu,
        LoadOptions::default(),
    )
    .unwrap();
    let b = StableDiffusion::load(&dir, cpu, LoadOptions::default()).unwrap();
    let mut opts = GenerateOptions::new("a photo of sks dog", 2);
    opts.steps = 4;
    opts.seed = 3;
    let x = generate(&a, &opts, &mut |_| {}).unwrap();
    let y = generate(&b, &opts, &mut |_| {}).unwrap();
    assert!(common::to_f64(&x.latents) == common::to_f64(&y.latents));

    // The fingerprint covers the shards: rewriting one changes it.
    let before = b.model_hash().unwrap();
    let shard = dir.join("vae/diffusion_pytorch_model-00004-of-00004.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    assert_ne!(before, b.model_hash().unwrap());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn training_checkpoint_ckpt_loads_and_matches_diffusers() {
    let cpu = &Device::Cpu;
    let path = formats().join("sd1-shaped.ckpt");
    let c = load_components(&path, cpu, &SingleFileOptions::default()).unwrap();
    assert_eq!(c.family, Family::Sd1);
    assert!(!c.configs_from_metadata);
    let fx = read_safetensors(&formats().join("sd1-shaped-outputs.safetensors"), cpu).unwrap();

    let vb = Vb::from_tensors(&path, c.text_encoder, cpu, false);
    let text = ClipTextModel::new(&vb, &c.text_config).unwrap();
    vb.finish().unwrap();
    let hidden = text
        .forward(&fx["ids"].to_dtype(DType::U32).unwrap())
        .unwrap();
    let e = common::rel_err(&hidden, &fx["hidden"]);
    println!("text encoder: rel err {e:.2e}");
    assert!(e < 1e-4, "text encoder: {e}");

    let vb = Vb::from_tensors(&path, c.unet, cpu, false);
    let unet = UNet2DConditionModel::new(&vb, &c.unet_config).unwrap();
    vb.finish().unwrap();
    let eps = unet
        .forward(&fx["sample"], &fx["timesteps"], &fx["hidden"])
        .unwrap();
    let e = common::rel_err(&eps, &fx["eps"]);
    println!("unet: rel err {e:.2e}");
    assert!(e < 1e-4, "unet: {e}");

    let vb = Vb::from_tensors(&path, c.vae, cpu, false);
    let vae = AutoencoderKL::new(&vb, &c.vae_config).unwrap();
    vb.finish().unwrap();
    let dec = vae.decode(&fx["z"]).unwrap();
    let e = common::rel_err(&dec, &fx["dec"]);
    println!("vae decode: rel err {e:.2e}");
    assert!(e < 1e-4, "vae: {e}");
}

#[test]
fn pickled_layouts_read_as_torch_stores_them() {
    let path = formats().join("layouts.pt");
    let t = read_weights(&path, &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
    assert_eq!(t["x"].dims(), &[3, 4]);
    assert_eq!(t["x"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), x);
    // Column-major storage (x.t()) comes back as the transpose.
    assert_eq!(t["xt"].dims(), &[4, 3]);
    let xt = t["x"].t().unwrap().contiguous().unwrap();
    assert!(common::to_f64(&t["xt"]) == common::to_f64(&xt));
    // A view that starts inside the shared storage.
    assert_eq!(t["row"].to_vec1::<f32>().unwrap(), vec![4.0, 5.0, 6.0, 7.0]);

    // A strided view is named in the error, when it is read.
    let strided = formats().join("strided.pt");
    let reader = WeightsReader::open(&strided).unwrap();
    let e = reader
        .load("every_other", &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("strided.pt") && e.contains("every_other") && e.contains("strided"),
        "{e}"
    );
    // No tensors at all; only tensors of a storage type not read.
    let e = open_error(&formats().join("no-tensors.pt"));
    assert!(
        e.contains("no-tensors.pt") && e.contains("without a state dict"),
        "{e}"
    );
    let e = open_error(&formats().join("int32-only.pt"));
    assert!(
        e.contains("int32-only.pt") && e.contains("entries: step"),
        "{e}"
    );
}

/// The format is told by the first bytes; a safetensors header length whose
/// low byte is a pickle's PROTO opcode (0x80) is still safetensors.
#[test]
fn safetensors_whose_first_byte_looks_like_a_pickle_load() {
    let dir = tmp_dir("sniff");
    let path = dir.join("w.safetensors");
    let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let tensors = std::collections::BTreeMap::from([("w".to_string(), t)]);
    let mut found = false;
    for pad in 0..300 {
        let meta = HashMap::from([("pad".to_string(), "x".repeat(pad))]);
        dreambooth::nn::save_safetensors(&tensors, &path, Some(meta)).unwrap();
        if std::fs::read(&path).unwrap()[0] == 0x80 {
            found = true;
            break;
        }
    }
    assert!(found, "no padding gave a header length ending in 0x80");
    let got = read_weights(&path, &Device::Cpu).unwrap();
    assert_eq!(got["w"].to_vec1::<f32>().unwrap(), vec![1., 2., 3.]);
    std::fs::remove_dir_all(dir).ok();
}

/// The error of opening `path`, as text.
fn open_error(path: &Path) -> String {
    match WeightsReader::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_weight_files_are_clear_errors() {
    let dir = tmp_dir("errors");
    let name = |n: &str| dir.join(n);

    // A torch < 1.6 pickle (protocol-2 opcode first).
    std::fs::write(name("legacy.ckpt"), [0x80, 0x02, 0x8a, 0x0a, 0x6c]).unwrap();
    let e = open_error(&name("legacy.ckpt"));
    assert!(
        e.contains("legacy.ckpt") && e.contains("torch < 1.6"),
        "{e}"
    );

    // A truncated zip pickle.
    let bin =
        std::fs::read(formats().join("tiny-sd1-weights/unet/diffusion_pytorch_model.bin")).unwrap();
    std::fs::write(name("cut.bin"), &bin[..bin.len() / 2]).unwrap();
    let e = open_error(&name("cut.bin"));
    assert!(e.contains("cut.bin") && e.contains("PyTorch pickle"), "{e}");

    // Neither format.
    std::fs::write(name("notes.bin"), b"these are not weights at all").unwrap();
    let e = open_error(&name("notes.bin"));
    assert!(
        e.contains("notes.bin") && e.contains("nor is it a PyTorch zip pickle"),
        "{e}"
    );

    // A shard index: without a weight map, with a shard missing, with a tensor
    // in the wrong shard.
    let src = formats().join("tiny-sd1-weights/vae");
    let index_name = "diffusion_pytorch_model.safetensors.index.json";
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(index_name)).unwrap()).unwrap();
    std::fs::write(name("empty.index.json"), r#"{"metadata": {}}"#).unwrap();
    let e = open_error(&name("empty.index.json"));
    assert!(
        e.contains("empty.index.json") && e.contains("weight_map"),
        "{e}"
    );
    std::fs::write(name(index_name), index.to_string()).unwrap();
    let e = open_error(&name(index_name));
    assert!(
        e.contains(index_name) && e.contains("-of-00004.safetensors") && e.contains("missing"),
        "{e}"
    );
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let mut moved = index.clone();
    let map = moved["weight_map"].as_object_mut().unwrap();
    let (key, file) = map
        .iter()
        .find(|(_, f)| f.as_str().unwrap().contains("00001"))
        .map(|(k, f)| (k.clone(), f.as_str().unwrap().to_string()))
        .unwrap();
    let other = file.replace("00001-of", "00002-of");
    map.insert(key.clone(), serde_json::Value::String(other.clone()));
    std::fs::write(name(index_name), moved.to_string()).unwrap();
    let e = open_error(&name(index_name));
    assert!(e.contains(&key) && e.contains(&other), "{e}");

    // Through the model loader: a folder whose UNet weights are a truncated .bin.
    let model = tiny_sd1_in_other_formats("errors-model");
    std::fs::write(
        model.join("unet/diffusion_pytorch_model.bin"),
        &bin[..bin.len() / 3],
    )
    .unwrap();
    let e = StableDiffusion::load(&model, &Device::Cpu, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unet/diffusion_pytorch_model.bin"), "{e}");
    std::fs::remove_dir_all(model).ok();
    std::fs::remove_dir_all(dir).ok();
}

fn dreambooth(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn convert_writes_folders_and_single_files_in_any_precision() {
    let src = tiny_sd1_in_other_formats("convert");
    let out = src.with_extension("out");
    std::fs::remove_dir_all(&out).ok();
    std::fs::create_dir_all(&out).unwrap();
    let folder = out.join("folder");
    let single = out.join("model.safetensors");
    let os = |p: &Path| p.as_os_str().to_owned();
    for (to, dtype) in [(&folder, "f32"), (&single, "fp16")] {
        let o = dreambooth(&[
            "convert".as_ref(),
            "--model".as_ref(),
            &os(&src),
            "--out".as_ref(),
            &os(to),
            "--dtype".as_ref(),
            dtype.as_ref(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // The folder is safetensors throughout and holds the same weights.
    let tiny = common::fixtures().join("tiny-sd1");
    for (part, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let got = read_safetensors(&folder.join(part).join(file), &Device::Cpu).unwrap();
        let want = read_safetensors(&tiny.join(part).join(file), &Device::Cpu).unwrap();
        assert_same(part, &got, &want);
    }
    // The single file stores fp16: its UNet is the original rounded to fp16.
    let c = load_components(&single, &Device::Cpu, &SingleFileOptions::default()).unwrap();
    let want = read_safetensors(
        &tiny.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let half = |t: &Tensor| {
        t.to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let rounded: HashMap<String, Tensor> = want.iter().map(|(k, t)| (k.clone(), half(t))).collect();
    assert_same("fp16 single-file unet", &c.unet, &rounded);
    let st = std::fs::read(&single).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&st).unwrap();
    assert!(
        meta.tensors()
            .values()
            .all(|i| i.dtype == safetensors::Dtype::F16)
    );

    // A half-precision folder: every component's weights are the originals
    // rounded to bf16, stored as bf16, and it loads and generates.
    let half_folder = out.join("bf16-folder");
    let o = dreambooth(&[
        "convert".as_ref(),
        "--model".as_ref(),
        &os(&src),
        "--out".as_ref(),
        &os(&half_folder),
        "--dtype".as_ref(),
        "bf16".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bf16 = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    for (part, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let path = half_folder.join(part).join(file);
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert!(
            meta.tensors()
                .iter()
                .all(|(k, i)| i.dtype == safetensors::Dtype::BF16 || k.contains("position_ids")),
            "{part}: not all bf16"
        );
        let got = read_safetensors(&path, &Device::Cpu).unwrap();
        let want: HashMap<String, Tensor> =
            read_safetensors(&tiny.join(part).join(file), &Device::Cpu)
                .unwrap()
                .iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        if t.dtype().is_float() {
                            bf16(t)
                        } else {
                            t.clone()
                        },
                    )
                })
                .collect();
        assert_same(part, &got, &want);
    }
    let g = dreambooth(&[
        "generate".as_ref(),
        "--model".as_ref(),
        &os(&half_folder),
        "--prompt".as_ref(),
        "a photo of a dog".as_ref(),
        "--steps".as_ref(),
        "2".as_ref(),
        "--out".as_ref(),
        &os(&out.join("gen")),
    ]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    std::fs::remove_dir_all(&src).ok();
    std::fs::remove_dir_all(&out).ok();
}

/// A folder converted from a single file without configs (its UNet config
/// read from the shapes) writes diffusers' defaults where the shapes say
/// nothing: diffusers' constructor takes `len()` of `only_cross_attention`,
/// so a null there made such a folder unloadable in diffusers.
#[test]
fn a_unet_config_read_from_shapes_is_written_as_diffusers_takes_it() {
    let c = load_components(
        &formats().join("sd1-shaped.ckpt"),
        &Device::Cpu,
        &SingleFileOptions::default(),
    )
    .unwrap();
    assert!(!c.configs_from_metadata);
    let cfg = dreambooth::models::single_file::unet_config_json(&c.unet_config);
    assert_eq!(cfg["only_cross_attention"], serde_json::json!(false));
    assert_eq!(cfg["attention_type"], serde_json::json!("default"));
    assert_eq!(
        cfg["_class_name"],
        serde_json::json!("UNet2DConditionModel")
    );
    // It reads back as the same config.
    let back: dreambooth::models::UNetConfig = serde_json::from_value(cfg.clone()).unwrap();
    assert_eq!(
        dreambooth::models::single_file::unet_config_json(&back),
        cfg
    );
}
