//! Frozen components read straight into f16 / bf16 (`LoadOptions::dtypes`,
//! `Vb::from_file_in`, `read_weights_in`): each tensor is cast as it is read,
//! so no f32 copy of a half-precision component is made, and the result is
//! bit for bit an f32 load converted afterwards — `generate --dtype fp16`
//! gives the same images as before, `convert --dtype` the same files.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dreambooth::diffusion::SamplerKind;
use dreambooth::diffusion::pipeline::{GenerateOptions, generate};
use dreambooth::models::single_file::{SingleFileOptions, load_components};
use dreambooth::models::{FrozenDTypes, LoadOptions, StableDiffusion};
use dreambooth::nn::store::save_safetensors_as;
use dreambooth::nn::{Precision, Vb, read_weights, read_weights_in};

const CPU: &Device = &Device::Cpu;

fn tmp_dir(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("dreambooth-half-load-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The bits of every element: a 16-bit float widened to f32 (exact and
/// one-to-one), an f32 as it is, an integer as its value.
fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F16 | DType::BF16 | DType::F32 => t
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        _ => common::to_f64(&t)
            .into_iter()
            .map(|x| x.to_bits())
            .collect(),
    }
}

/// The same keys, and each tensor of the same dtype, shape and bits.
fn assert_bit_identical<'a>(
    what: &str,
    got: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    want: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
) {
    let got: BTreeMap<_, _> = got.into_iter().collect();
    let want: BTreeMap<_, _> = want.into_iter().collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: keys differ"
    );
    for (k, w) in &want {
        let g = got[k];
        assert_eq!(g.dtype(), w.dtype(), "{what}: `{k}` dtype");
        assert_eq!(g.dims(), w.dims(), "{what}: `{k}` shape");
        assert!(bits(g) == bits(w), "{what}: `{k}` differs");
    }
    assert!(!want.is_empty(), "{what}: no tensors compared");
}

/// `t` as an f32 load followed by a conversion would give it: floats in
/// `dtype`, integers as they are.
fn converted(t: &Tensor, dtype: DType) -> Tensor {
    if t.dtype().is_float() {
        t.to_dtype(dtype).unwrap()
    } else {
        t.clone()
    }
}

/// Each weights file of tiny-sd1 in the formats real checkpoints come in —
/// safetensors, PyTorch pickles, a sharded VAE — plus an fp16-stored copy of
/// the UNet, read in f16 and bf16: every tensor equals the f32 read
/// converted, bit for bit, and lands in the asked dtype (integers as stored).
#[test]
fn reading_in_half_equals_reading_in_f32_and_converting() {
    let tiny = common::fixtures().join("tiny-sd1");
    let other = common::fixtures().join("formats").join("tiny-sd1-weights");
    let dir = tmp_dir("formats");
    let unet = tiny.join("unet/diffusion_pytorch_model.safetensors");
    // An fp16-stored file: read in bf16 it goes f16 → f32 → bf16, as an f32
    // read converted to bf16 does.
    let f16_file = dir.join("unet-fp16.safetensors");
    let f32_tensors: BTreeMap<String, Tensor> =
        read_weights(&unet, CPU).unwrap().into_iter().collect();
    save_safetensors_as(&f32_tensors, &f16_file, None, Some(DType::F16)).unwrap();
    let files = [
        unet.clone(),
        tiny.join("text_encoder/model.safetensors"),
        tiny.join("vae/diffusion_pytorch_model.safetensors"),
        other.join("unet/diffusion_pytorch_model.bin"),
        other.join("text_encoder/pytorch_model.bin"),
        other.join("vae/diffusion_pytorch_model.safetensors.index.json"),
        f16_file.clone(),
    ];
    for file in &files {
        let f32_read = read_weights(file, CPU).unwrap();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let got = read_weights_in(file, CPU, dtype).unwrap();
            let want: HashMap<String, Tensor> = f32_read
                .iter()
                .map(|(k, t)| (k.clone(), converted(t, dtype)))
                .collect();
            let what = format!("{} in {dtype:?}", file.display());
            assert_bit_identical(&what, &got, &want);
            for (k, t) in &got {
                if f32_read[k].dtype().is_float() {
                    assert_eq!(t.dtype(), dtype, "{what}: `{k}`");
                }
            }
        }
    }
    // Read in its own dtype, the fp16 file's bytes are kept as stored.
    let st = std::fs::read(&f16_file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let got = read_weights_in(&f16_file, CPU, DType::F16).unwrap();
    for (k, view) in st.tensors() {
        let t = got[&k]
            .flatten_all()
            .unwrap()
            .to_vec1::<half::f16>()
            .unwrap();
        let stored: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(stored == view.data(), "`{k}`: fp16 bytes changed");
    }
    // A frozen store read in f16 is the f32 store converted, and computes in f16.
    let vb = Vb::from_file_in(&unet, CPU, false, DType::F16).unwrap();
    let cfg = dreambooth::models::UNetConfig::from_file(&tiny.join("unet/config.json")).unwrap();
    let model = dreambooth::models::UNet2DConditionModel::new(&vb, &cfg).unwrap();
    vb.finish().unwrap();
    assert_eq!(model.conv_in.weight.dtype(), DType::F16);
    let old = Vb::from_file(&unet, CPU, false).unwrap();
    dreambooth::models::UNet2DConditionModel::new(&old, &cfg).unwrap();
    let old = old.converted(DType::F16).unwrap();
    dreambooth::models::UNet2DConditionModel::new(&old, &cfg).unwrap();
    assert_bit_identical("unet Vb in f16", &vb.tensors(), &old.tensors());
    std::fs::remove_dir_all(dir).ok();
}

/// Every component's tensors of `m`, by component.
fn components(m: &StableDiffusion) -> Vec<(&'static str, BTreeMap<String, Tensor>)> {
    let mut out = vec![
        ("unet", m.unet_vb.tensors()),
        ("text_encoder", m.text_encoder_vb.tensors()),
        ("vae", m.vae_vb.tensors()),
    ];
    if let Some(te2) = &m.text_encoder_2 {
        out.push(("text_encoder_2", te2.vb.tensors()));
    }
    out
}

/// A diffusers folder (SD 1.x, SDXL with two text encoders) and single files
/// loaded with every component in f16 or bf16 hold exactly the tensors of an
/// f32 load converted after (what `convert --dtype` wrote before), every one
/// in that dtype; with the UNet alone in f16 (`generate --dtype fp16`) the
/// text encoder and VAE stay f32, as they always were.
#[test]
fn models_loaded_in_half_equal_f32_loads_converted() {
    let fx = common::fixtures();
    let dir = tmp_dir("models");
    for path in [
        fx.join("tiny-sd1"),
        single_file_of(&fx.join("tiny-sd1"), &dir),
        fx.join("tiny-sdxl"),
        single_file_of(&fx.join("tiny-sdxl"), &dir),
        single_file_of(&fx.join("tiny-sd2"), &dir),
    ] {
        let f32_model = StableDiffusion::load(&path, CPU, LoadOptions::default()).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let opts = LoadOptions {
                dtypes: FrozenDTypes::all(dtype),
                ..Default::default()
            };
            let half = StableDiffusion::load(&path, CPU, opts).unwrap();
            let (got, want) = (components(&half), components(&f32_model));
            assert_eq!(got.len(), want.len());
            for ((name, g), (_, w)) in got.iter().zip(&want) {
                let w: BTreeMap<String, Tensor> = w
                    .iter()
                    .map(|(k, t)| (k.clone(), converted(t, dtype)))
                    .collect();
                assert_bit_identical(&format!("{} {name} {dtype:?}", path.display()), g, &w);
                assert!(
                    g.values()
                        .filter(|t| t.dtype().is_float())
                        .all(|t| t.dtype() == dtype)
                );
            }
            assert_eq!(half.vae_dtype(), dtype);
        }
        let opts = LoadOptions {
            dtypes: FrozenDTypes::unet_only(DType::F16),
            ..Default::default()
        };
        let half_unet = StableDiffusion::load(&path, CPU, opts).unwrap();
        assert_eq!(half_unet.unet.conv_in.weight.dtype(), DType::F16);
        for (name, t) in components(&half_unet).into_iter().skip(1) {
            assert!(
                t.values().all(|t| t.dtype() != DType::F16),
                "{name} not f32"
            );
        }
        let mut old = StableDiffusion::load(&path, CPU, LoadOptions::default()).unwrap();
        old.set_unet_precision(Precision::F16).unwrap();
        assert_bit_identical(
            &format!("{} f16 unet vs set_unet_precision", path.display()),
            &half_unet.unet_vb.tensors(),
            &old.unet_vb.tensors(),
        );
    }
    // The single-file reader itself, component by component.
    let single = fx.join("tiny-sd1.safetensors");
    let f32_parts = load_components(&single, CPU, &SingleFileOptions::default()).unwrap();
    let opts = SingleFileOptions {
        dtypes: FrozenDTypes::all(DType::BF16),
        ..Default::default()
    };
    let bf16_parts = load_components(&single, CPU, &opts).unwrap();
    for (what, g, w) in [
        ("unet", &bf16_parts.unet, &f32_parts.unet),
        ("vae", &bf16_parts.vae, &f32_parts.vae),
        ("text", &bf16_parts.text_encoder, &f32_parts.text_encoder),
    ] {
        let w: HashMap<String, Tensor> = w
            .iter()
            .map(|(k, t)| (k.clone(), converted(t, DType::BF16)))
            .collect();
        assert_bit_identical(&format!("single file {what}"), g, &w);
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A VAE swapped in (`--vae`) is read in the dtype of the VAE it replaces.
#[test]
fn a_replacement_vae_is_read_in_the_models_vae_dtype() {
    let fx = common::fixtures();
    let vae_dir = fx.join("tiny-sd1").join("vae");
    let opts = LoadOptions {
        dtypes: FrozenDTypes::all(DType::F16),
        ..Default::default()
    };
    let dir = tmp_dir("vae");
    let single = single_file_of(&fx.join("tiny-sd1"), &dir);
    let mut m = StableDiffusion::load(&single, CPU, opts).unwrap();
    m.set_vae(&vae_dir).unwrap();
    let want: HashMap<String, Tensor> =
        read_weights(&vae_dir.join("diffusion_pytorch_model.safetensors"), CPU)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, converted(&t, DType::F16)))
            .collect();
    assert_bit_identical("replacement vae", &m.vae_vb.tensors(), &want);
    // From a single file, through the original-layout reader.
    let mut m2 = StableDiffusion::load(&fx.join("tiny-sd1"), CPU, opts).unwrap();
    m2.set_vae(&single).unwrap();
    let f32_single = StableDiffusion::load(&single, CPU, LoadOptions::default()).unwrap();
    let want: BTreeMap<String, Tensor> = f32_single
        .vae_vb
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, converted(&t, DType::F16)))
        .collect();
    assert_bit_identical("vae from a single file", &m2.vae_vb.tensors(), &want);
    std::fs::remove_dir_all(dir).ok();
}

fn dreambooth(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(args)
        .output()
        .unwrap()
}

/// A fixture folder written as a single-file checkpoint (with its own
/// tokenizer in the metadata, so it loads as a whole model).
fn single_file_of(folder: &Path, dir: &Path) -> PathBuf {
    let m = StableDiffusion::load(folder, CPU, LoadOptions::default()).unwrap();
    let name = folder.file_name().unwrap().to_string_lossy();
    let path = dir.join(format!("{name}.safetensors"));
    dreambooth::dreambooth::export::save_single(&m, &path, DType::F32).unwrap();
    path
}

fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-model")
}

/// `generate --dtype fp16` (the UNet now read straight into f16) writes the
/// very images the previous way gives — an f32 load, `set_unet_precision` —
/// byte for byte, and its latents match bit for bit in the library.
#[test]
fn generate_fp16_images_are_unchanged() {
    let model = tiny_model();
    let opts = GenerateOptions {
        steps: 4,
        sampler: SamplerKind::Ddim,
        guidance_scale: 5.0,
        seed: 7,
        batch_size: 2,
        ..GenerateOptions::new("a photo of a red ball on the beach", 2)
    };
    let mut old = StableDiffusion::load(&model, CPU, LoadOptions::default()).unwrap();
    old.set_unet_precision(Precision::F16).unwrap();
    let want = generate(&old, &opts, &mut |_| {}).unwrap();
    let new_opts = LoadOptions {
        dtypes: FrozenDTypes::unet_only(DType::F16),
        ..Default::default()
    };
    let new = StableDiffusion::load(&model, CPU, new_opts).unwrap();
    assert_eq!(new.unet.conv_in.weight.dtype(), DType::F16);
    assert_eq!(new.vae_dtype(), DType::F32);
    let got = generate(&new, &opts, &mut |_| {}).unwrap();
    assert!(bits(&got.latents) == bits(&want.latents), "latents differ");

    let out = tmp_dir("generate");
    let os = |p: &Path| p.as_os_str().to_owned();
    let o = dreambooth(&[
        "generate".as_ref(),
        "--model".as_ref(),
        &os(&model),
        "--prompt".as_ref(),
        opts.prompts[0].as_ref(),
        "-n".as_ref(),
        "2".as_ref(),
        "--steps".as_ref(),
        "4".as_ref(),
        "--sampler".as_ref(),
        "ddim".as_ref(),
        "--guidance".as_ref(),
        "5".as_ref(),
        "--seed".as_ref(),
        "7".as_ref(),
        "--batch-size".as_ref(),
        "2".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--dtype".as_ref(),
        "fp16".as_ref(),
        "--out".as_ref(),
        &os(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (i, g) in want.images.iter().enumerate() {
        let png = image::open(out.join(format!("{i:05}.png")))
            .unwrap()
            .to_rgb8();
        assert!(png.as_raw() == g.image.as_raw(), "image {i} differs");
    }
    std::fs::remove_dir_all(out).ok();
}

/// Every tensor of a safetensors file: its dtype, shape and bytes.
fn stored(path: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

/// `convert --dtype fp16|bf16` (reading the model straight into that dtype)
/// writes the tensors the f32-loaded model exported in that dtype writes,
/// byte for byte, to a folder and to a single file.
#[test]
fn convert_to_half_writes_the_same_tensors() {
    let dir = tmp_dir("convert");
    let src = single_file_of(&common::fixtures().join("tiny-sd1"), &dir);
    let f32_model = StableDiffusion::load(&src, CPU, LoadOptions::default()).unwrap();
    let os = |p: &Path| p.as_os_str().to_owned();
    for (name, dtype) in [("fp16", DType::F16), ("bf16", DType::BF16)] {
        for out in [dir.join(name), dir.join(format!("{name}.safetensors"))] {
            let o = dreambooth(&[
                "convert".as_ref(),
                "--model".as_ref(),
                &os(&src),
                "--out".as_ref(),
                &os(&out),
                "--dtype".as_ref(),
                name.as_ref(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let want = dir.join(format!(
                "want-{}",
                out.file_name().unwrap().to_string_lossy()
            ));
            dreambooth::dreambooth::export::save_to(&f32_model, &want, dtype).unwrap();
            let pairs: Vec<(PathBuf, PathBuf)> = if out.is_dir() {
                [
                    "unet/diffusion_pytorch_model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors",
                ]
                .iter()
                .map(|f| (out.join(f), want.join(f)))
                .collect()
            } else {
                vec![(out.clone(), want.clone())]
            };
            for (g, w) in pairs {
                let (gt, wt) = (stored(&g), stored(&w));
                assert!(!wt.is_empty());
                assert_eq!(gt.len(), wt.len(), "{}", g.display());
                assert!(gt == wt, "{}: tensors differ", g.display());
            }
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `merge --dtype fp16|bf16` reads the model straight into that dtype and
/// adds each LoRA delta in f32 before rounding: the weights no adapter
/// touches are written exactly as the f32 merge exported in that dtype, and
/// the adapted ones within the three roundings' half ulps of it (the
/// half-read weight is rounded once more than the f32 one), each of them
/// changed by the merge. Folder and single-file outputs alike.
#[test]
fn merge_to_half_rounds_the_f32_merge() {
    let dir = tmp_dir("merge");
    let src = common::fixtures().join("tiny-sd1");
    let lora = common::fixtures().join("parity/sd1_lora_peft.safetensors");
    let base = StableDiffusion::load(&src, CPU, LoadOptions::default()).unwrap();
    let mut merged = StableDiffusion::load(&src, CPU, LoadOptions::default()).unwrap();
    dreambooth::models::lora::merge_file(&mut merged, &lora, 0.8).unwrap();
    let os = |p: &Path| p.as_os_str().to_owned();
    let values = |p: &Path| -> BTreeMap<String, (DType, Vec<usize>, Vec<f32>)> {
        candle_core::safetensors::load(p, CPU)
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
                (
                    k,
                    (t.dtype(), t.dims().to_vec(), v.to_vec1::<f32>().unwrap()),
                )
            })
            .collect()
    };
    for (name, dtype, mantissa) in [("fp16", DType::F16, 10), ("bf16", DType::BF16, 7)] {
        for out in [dir.join(name), dir.join(format!("{name}.safetensors"))] {
            let o = dreambooth(&[
                "merge".as_ref(),
                "--model".as_ref(),
                &os(&src),
                "--lora".as_ref(),
                &os(&lora),
                "--lora-scale".as_ref(),
                "0.8".as_ref(),
                "--out".as_ref(),
                &os(&out),
                "--dtype".as_ref(),
                name.as_ref(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let file = out.file_name().unwrap().to_string_lossy().to_string();
            let want = dir.join(format!("want-{file}"));
            let plain = dir.join(format!("plain-{file}"));
            dreambooth::dreambooth::export::save_to(&merged, &want, dtype).unwrap();
            dreambooth::dreambooth::export::save_to(&base, &plain, dtype).unwrap();
            let files: Vec<[PathBuf; 3]> = if out.is_dir() {
                [
                    "unet/diffusion_pytorch_model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors",
                ]
                .iter()
                .map(|f| [out.join(f), want.join(f), plain.join(f)])
                .collect()
            } else {
                vec![[out.clone(), want.clone(), plain.clone()]]
            };
            let mut adapted = 0;
            for [g, w, p] in files {
                let (gv, wv, pv) = (values(&g), values(&w), values(&p));
                assert_eq!(
                    gv.keys().collect::<Vec<_>>(),
                    wv.keys().collect::<Vec<_>>(),
                    "{}",
                    g.display()
                );
                for (k, (wd, ws, w)) in &wv {
                    let (gd, gs, got) = &gv[k];
                    assert_eq!((gd, gs), (wd, ws), "{}: `{k}`", g.display());
                    if !wd.is_float() || pv[k].2 == *w {
                        assert!(got == w, "{}: untouched `{k}` differs", g.display());
                        continue;
                    }
                    adapted += 1;
                    assert!(*got != pv[k].2, "{}: `{k}` not merged", g.display());
                    // got = round(round(w) + d), want = round(w + d): half
                    // an ulp from each of the three roundings at most.
                    let ulp =
                        |x: f32| 2f32.powi(x.abs().max(1e-30).log2().floor() as i32 - mantissa);
                    for ((a, b), w0) in got.iter().zip(w).zip(&pv[k].2) {
                        let bound = 0.5 * (ulp(*a) + ulp(*b) + ulp(*w0));
                        assert!((a - b).abs() <= bound, "{}: `{k}`: {a} vs {b}", g.display());
                    }
                }
            }
            assert!(
                adapted > 10,
                "{}: only {adapted} adapted weights",
                out.display()
            );
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `convert` and `merge` refuse to write over the model they read, and leave
/// it as it was.
#[test]
fn convert_and_merge_refuse_to_overwrite_the_model() {
    let dir = tmp_dir("overwrite");
    let src = single_file_of(&common::fixtures().join("tiny-sd1"), &dir);
    let before = std::fs::read(&src).unwrap();
    let lora = common::fixtures().join("parity/sd1_lora_peft.safetensors");
    let (s, l) = (src.as_os_str(), lora.as_os_str());
    for args in [
        vec![
            "convert".as_ref(),
            "--model".as_ref(),
            s,
            "--out".as_ref(),
            s,
        ],
        vec![
            "merge".as_ref(),
            "--model".as_ref(),
            s,
            "--lora".as_ref(),
            l,
            "--out".as_ref(),
            s,
        ],
    ] {
        let o = dreambooth(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains("--out is the model itself"), "{err}");
    }
    assert!(std::fs::read(&src).unwrap() == before, "the model changed");
    std::fs::remove_dir_all(dir).ok();
}

/// LoRA training under fp16 mixed precision reads its frozen base UNet in
/// f16 (the tensors set_unet_precision gave) and its frozen text encoder in
/// f16 too (as diffusers' `weight_dtype`), whose embeddings come back in f32;
/// the adapters — the trainable parameters — and the VAE stay f32. With the
/// text encoder trained (adapters on it), its base stays f32.
#[test]
fn lora_frozen_base_is_read_in_the_compute_dtype_adapters_stay_f32() {
    use dreambooth::dreambooth::config::TrainConfig;
    let cfg = TrainConfig {
        model: Some(common::fixtures().join("tiny-sd1")),
        mixed_precision: "fp16".into(),
        lora: true,
        lora_rank: 2,
        lora_targets: "attn+ff+conv".into(),
        ..Default::default()
    };
    let m = dreambooth::dreambooth::trainer::load_model(&cfg, CPU).unwrap();
    let mut old = StableDiffusion::load(
        &common::fixtures().join("tiny-sd1"),
        CPU,
        LoadOptions::default(),
    )
    .unwrap();
    old.set_unet_precision(Precision::F16).unwrap();
    assert_bit_identical("lora base", &m.unet_vb.tensors(), &old.unet_vb.tensors());
    let vars = dreambooth::models::lora::trainable_vars(&m);
    assert!(!vars.is_empty());
    for (k, v) in &vars {
        assert_eq!(v.dtype(), DType::F32, "{k}");
    }
    assert!(m.unet_vb.vars().is_empty());
    assert_eq!(m.vae_dtype(), DType::F32);
    let te_dtypes = |m: &StableDiffusion| -> Vec<DType> {
        let mut d: Vec<DType> = m
            .text_encoder_vb
            .tensors()
            .values()
            .filter(|t| t.dtype().is_float())
            .map(|t| t.dtype())
            .collect();
        d.dedup();
        d
    };
    assert_eq!(te_dtypes(&m), [DType::F16]);
    let (embeds, _) = m
        .encode_prompt(&["a photo of a sks dog".into()], 0)
        .unwrap();
    assert_eq!(embeds.context.dtype(), DType::F32);
    // Close to the f32 encoder's (f16 rounding only).
    let (want, _) = old
        .encode_prompt(&["a photo of a sks dog".into()], 0)
        .unwrap();
    let err = dreambooth::selftest::rel_err(&embeds.context, &want.context).unwrap();
    assert!(err < 5e-3, "f16 text encoder: relative error {err:.2e}");
    let trained_te = dreambooth::dreambooth::trainer::load_model(
        &TrainConfig {
            train_text_encoder: true,
            ..cfg
        },
        CPU,
    )
    .unwrap();
    assert_eq!(te_dtypes(&trained_te), [DType::F32]);
}

/// A component being trained keeps f32 master weights, and only f32, f16 or
/// bf16 can be asked for: the errors name the file and the problem.
#[test]
fn trained_components_stay_f32_and_bad_dtypes_are_errors() {
    let fx = common::fixtures();
    let dir = tmp_dir("errors");
    for path in [
        fx.join("tiny-sd1"),
        single_file_of(&fx.join("tiny-sd1"), &dir),
    ] {
        let e = StableDiffusion::load(
            &path,
            CPU,
            LoadOptions {
                train_unet: true,
                dtypes: FrozenDTypes::unet_only(DType::F16),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&*path.to_string_lossy()), "{e}");
        assert!(
            e.contains("the UNet") && e.contains("f32") && e.contains("f16"),
            "{e}"
        );
        let e = StableDiffusion::load(
            &path,
            CPU,
            LoadOptions {
                train_text_encoder: true,
                dtypes: FrozenDTypes::all(DType::BF16),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("the text encoder") && e.contains("bf16"), "{e}");
        let e = StableDiffusion::load(
            &path,
            CPU,
            LoadOptions {
                dtypes: FrozenDTypes {
                    vae: Some(DType::U8),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("the VAE") && e.contains("u8"), "{e}");
        // Trained in f32, a trainable UNet still loads (as `Var`s).
        let m = StableDiffusion::load(
            &path,
            CPU,
            LoadOptions {
                train_unet: true,
                dtypes: FrozenDTypes::unet_only(DType::F32),
                ..Default::default()
            },
        )
        .unwrap();
        let vars = m.unet_vb.vars();
        assert!(!vars.is_empty() && vars.values().all(|v| v.dtype() == DType::F32));
    }
    let file = fx.join("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let e = read_weights_in(&file, CPU, DType::I64)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&*file.to_string_lossy()) && e.contains("i64"),
        "{e}"
    );
    let e = Vb::from_file_in(&file, CPU, true, DType::F16)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("trainable") && e.contains("f32"), "{e}");
    // The command line names the bad value before loading anything.
    let o = dreambooth(&[
        "generate".as_ref(),
        "--model".as_ref(),
        "/nonexistent/model".as_ref(),
        "--prompt".as_ref(),
        "x".as_ref(),
        "--out".as_ref(),
        "/nonexistent/out".as_ref(),
        "--dtype".as_ref(),
        "fp8".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("`fp8`") && err.contains("fp16") && !err.contains("nonexistent"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}
