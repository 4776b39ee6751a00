//! Parity of the evaluation encoders and their preprocessing with transformers.
//!
//! tests/fixtures/encoders/ comes from tools/parity/encoders.py (a tiny random
//! `CLIPModel` and `ViTModel` with their outputs) and tools/parity/preprocess.py
//! (Pillow's JPEG decoding of small synthetic files, Pillow's resampling of a
//! random image, and, when `../shared/data/dreambooth-dataset` exists beside the
//! repository, Pillow's decode of every photo of the DreamBooth dataset and the
//! CLIP / DINO image processors' outputs on six of them at several sizes).

mod common;
use common::to_f64;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dreambooth::eval::preprocess::{Filter, ImageProcessor, pil_resize, pil_vertical_first};
use dreambooth::image_io::decode_jpeg;
use dreambooth::models::clip_vision::ClipModel;
use dreambooth::models::dino::ViTModel;
use dreambooth::nn::read_safetensors;
use image::RgbImage;
use sha2::{Digest, Sha256};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    read_safetensors(&fixtures().join(name), &Device::Cpu).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let (a, b) = (to_f64(a), to_f64(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-60)).sqrt()
}

fn check(name: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    println!("{name:<20} rel L2 err {e:.2e}");
    assert!(e < TOL, "{name}: relative L2 error {e:.3e} ≥ {TOL:e}");
}

#[test]
fn clip_embeddings_match_transformers() {
    let io = load("io.safetensors");
    // Both ways of naming the checkpoint: the folder and the weights file.
    let model = ClipModel::load(&fixtures().join("clip"), &Device::Cpu).unwrap();
    ClipModel::load(&fixtures().join("clip/model.safetensors"), &Device::Cpu).unwrap();
    let img = model.image_embeds(&io["pixels"]).unwrap();
    check("clip.image_embeds", &img, &io["clip.image_embeds"]);
    let txt = model.text_embeds(&io["ids"]).unwrap();
    check("clip.text_embeds", &txt, &io["clip.text_embeds"]);
    let stored = load("clip/model.safetensors")["logit_scale"]
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((model.logit_scale().unwrap() - stored.exp()).abs() < 1e-4);
}

#[test]
fn dino_cls_matches_transformers() {
    let io = load("io.safetensors");
    let model = ViTModel::load(&fixtures().join("dino"), &Device::Cpu).unwrap();
    let cls = model.cls_embeds(&io["pixels"]).unwrap();
    check("dino.cls", &cls, &io["dino.cls"]);
}

#[test]
fn wrong_input_size_is_an_error() {
    let model = ViTModel::load(&fixtures().join("dino"), &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 3, 48, 48), DType::F32, &Device::Cpu).unwrap();
    let err = model.cls_embeds(&x).unwrap_err().to_string();
    assert!(err.contains("takes 3×32×32"), "{err}");
}

fn rgb(t: &Tensor) -> RgbImage {
    let (h, w, _) = t.dims3().unwrap();
    let data: Vec<u8> = t.flatten_all().unwrap().to_vec1().unwrap();
    RgbImage::from_raw(w as u32, h as u32, data).unwrap()
}

/// (max |a − b|, number of bytes that differ) of two 8-bit images.
fn byte_diff(a: &RgbImage, b: &RgbImage) -> (i32, usize) {
    assert_eq!(a.dimensions(), b.dimensions(), "image size");
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as i32 - y as i32).abs())
        .fold((0, 0), |(m, n), d| (m.max(d), n + (d > 0) as usize))
}

/// Pillow's JPEG decoding (libjpeg-turbo, `convert("RGB")`, `exif_transpose`) of
/// files Pillow wrote: chroma subsampling 4:2:0 / 4:2:2 / 4:4:4, progressive,
/// restart markers, grayscale, Adobe CMYK, EXIF orientation 6; odd sizes.
#[test]
fn jpeg_decoding_matches_pillow() {
    let fx = load("jpeg.safetensors");
    let mut names: Vec<&str> = fx.keys().filter_map(|k| k.strip_suffix(".jpg")).collect();
    names.sort();
    assert_eq!(names.len(), 8, "{names:?}");
    for name in names {
        let bytes: Vec<u8> = fx[&format!("{name}.jpg")].to_vec1().unwrap();
        let want = rgb(&fx[&format!("{name}.rgb")]);
        let got = decode_jpeg(&bytes, Path::new(name)).unwrap();
        let (max, n) = byte_diff(&got, &want);
        println!(
            "{name:<12} {}x{}: {n} bytes differ, max {max}",
            got.width(),
            got.height()
        );
        assert_eq!(max, 0, "{name}: differs from Pillow");
    }
    // A damaged file is an error that names it, not a panic.
    let good: Vec<u8> = fx["ycc420.jpg"].to_vec1().unwrap();
    let e = decode_jpeg(&good[..good.len() / 2], Path::new("cut.jpg"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.jpg") && e.contains("truncated JPEG"), "{e}");
    let mut junk = good[..20].to_vec();
    junk.extend(std::iter::repeat_n(0x55u8, 200));
    let e = decode_jpeg(&junk, Path::new("junk.jpg"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.jpg") && e.contains("JPEG"), "{e}");
    let e = decode_jpeg(b"", Path::new("empty.jpg"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty.jpg"), "{e}");
    // Damage anywhere (headers, tables, entropy-coded data) gives an image or an
    // error, never a crash: libjpeg's fatal errors unwind back to us.
    let (mut ok, mut err) = (0, 0);
    for name in ["ycc420", "progressive", "cmyk", "exif6"] {
        let good: Vec<u8> = fx[&format!("{name}.jpg")].to_vec1().unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let mut bad = good.clone();
            let at = (state >> 33) as usize % bad.len();
            bad[at] ^= 1 << ((state >> 29) & 7);
            match decode_jpeg(&bad, Path::new("bad.jpg")) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(e.to_string().contains("bad.jpg"), "{e}");
                    err += 1;
                }
            }
        }
    }
    println!("1-bit damage: {ok} decoded, {err} errors");
    assert!(err > 0);
}

/// Pillow's resampling, two 8-bit passes, bit for bit, for shapes on both sides
/// of Pillow 13's pass-order rule (vertical first when the height shrinks by
/// more than twice as many pixels as the width), downscaling and upscaling.
#[test]
fn resize_matches_pillow() {
    let fx = load("resize.safetensors");
    let img = rgb(&fx["img"]);
    let (iw, ih) = img.dimensions();
    let mut n = 0;
    let mut orders = [0; 2];
    for (name, filter) in [("bilinear", Filter::Bilinear), ("bicubic", Filter::Bicubic)] {
        let prefix = format!("{name}.");
        for (key, t) in fx.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let want = rgb(t);
            let (w, h) = want.dimensions();
            let got = pil_resize(&img, w, h, filter).unwrap();
            let order = if w == iw || h == ih {
                "one pass"
            } else if pil_vertical_first(iw, ih, w, h) {
                orders[1] += 1;
                "vertical first"
            } else {
                orders[0] += 1;
                "horizontal first"
            };
            let (max, n_diff) = byte_diff(&got, &want);
            println!("{key:<16} ({order}): {n_diff} bytes differ, max {max}");
            assert_eq!(max, 0, "{key}: differs from Pillow");
            n += 1;
        }
    }
    assert_eq!(n, 16);
    assert!(
        orders[0] > 0 && orders[1] > 0,
        "both pass orders: {orders:?}"
    );
}

#[test]
fn pass_order_rule() {
    // 37 rows → 9 shrinks by 28 > 2 × (53 − 50): vertical first.
    assert!(pil_vertical_first(53, 37, 50, 9));
    // Exactly twice is not more than twice.
    assert!(!pil_vertical_first(53, 37, 40, 11));
    assert!(pil_vertical_first(53, 37, 40, 10));
    // Enlarging the height, or only shrinking the width: horizontal first.
    assert!(!pil_vertical_first(53, 37, 20, 60));
    // Enlarging the width counts as a negative shrink.
    assert!(pil_vertical_first(20, 37, 30, 36));
    assert!(!pil_vertical_first(20, 37, 30, 37));
}

#[test]
fn processor_sizes_follow_transformers() {
    let clip = ImageProcessor::clip();
    // int(224 * 683 / 512) = 298: the long edge is truncated, not rounded.
    assert_eq!(clip.resized_size(512, 683), (224, 298));
    assert_eq!(clip.resized_size(700, 512), (306, 224));
    assert_eq!(ImageProcessor::dino().resized_size(512, 683), (224, 224));
}

/// The fixture's cases: a photo of the dataset, cropped (left, top, width, height)
/// to other sizes and aspects (tools/parity/preprocess.py's CASES).
/// (left, top, width, height).
type Crop = Option<(u32, u32, u32, u32)>;

const CASES: [(&str, Crop); 6] = [
    ("dog/00.jpg", None),
    ("cat/01.jpg", Some((0, 85, 512, 341))),
    ("backpack/02.jpg", Some((106, 0, 300, 512))),
    ("teapot/00.jpg", Some((131, 0, 250, 512))),
    ("clock/01.jpg", Some((0, 156, 512, 200))),
    ("duck_toy/00.jpg", Some((166, 181, 180, 150))),
];

fn dataset() -> Option<PathBuf> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/dreambooth-dataset");
    if data.is_dir() {
        Some(data)
    } else {
        println!(
            "skipped: {} is absent (the DreamBooth dataset beside the repository)",
            data.display()
        );
        None
    }
}

fn load_photo(path: &Path) -> RgbImage {
    let bytes = std::fs::read(path).unwrap();
    decode_jpeg(&bytes, path).unwrap()
}

/// Every JPEG of the dataset decodes to Pillow's pixels exactly (SHA-256 of the
/// RGB bytes).
#[test]
fn dataset_photos_decode_as_pillow() {
    let Some(data) = dataset() else { return };
    let fx = load("preprocess.safetensors");
    let (mut n, mut exact) = (0, 0);
    let mut wrong = Vec::new();
    for (key, digest) in fx.iter().filter(|(k, _)| k.starts_with("decode.")) {
        let name = &key["decode.".len()..];
        let img = load_photo(&data.join(name));
        let want: Vec<u8> = digest.to_vec1().unwrap();
        n += 1;
        if Sha256::digest(img.as_raw()).as_slice() == want.as_slice() {
            exact += 1;
        } else {
            wrong.push(name.to_string());
        }
    }
    println!("{exact}/{n} dataset JPEGs decode bit-identically to Pillow");
    assert!(n >= 150, "only {n} photos in the fixture");
    assert!(wrong.is_empty(), "differ from Pillow: {wrong:?}");
}

/// The CLIP and DINO processors on real photos at six sizes and aspects: the
/// 8-bit resized image equals transformers' (PIL backend) exactly, and the
/// normalized pixel values are within 1/255 (in fact equal up to f32 rounding).
#[test]
fn preprocessing_matches_transformers_on_photos() {
    let Some(data) = dataset() else { return };
    let fx = load("preprocess.safetensors");
    for (i, (photo, crop)) in CASES.iter().enumerate() {
        let img = load_photo(&data.join(photo));
        // Our decode against Pillow's on a 32×32 block at the centre.
        let (cx, cy) = (img.width() / 2 - 16, img.height() / 2 - 16);
        let block = image::imageops::crop_imm(&img, cx, cy, 32, 32).to_image();
        let (dec, _) = byte_diff(&block, &rgb(&fx[&format!("src.{i}")]));
        let img = match crop {
            Some((x, y, w, h)) => image::imageops::crop_imm(&img, *x, *y, *w, *h).to_image(),
            None => img,
        };
        let (w, h) = img.dimensions();
        for (key, proc) in [
            ("clip", ImageProcessor::clip()),
            ("dino", ImageProcessor::dino()),
        ] {
            let levels = rgb(&fx[&format!("{key}.levels.{i}")]);
            let lut: Vec<Vec<f32>> = fx[&format!("{key}.lut.{i}")].to_vec2().unwrap();
            let (rh, rw) = proc.resized_size(h, w);
            let order = if pil_vertical_first(w, h, rw, rh) {
                "v"
            } else {
                "h"
            };
            let ours8 = proc.resize_and_crop(&img).unwrap();
            let (rs, _) = byte_diff(&ours8, &levels);
            let got = proc.pixel_values(&img).unwrap();
            assert_eq!(got.len(), 3 * 224 * 224);
            let mut worst = 0f64;
            for (j, p) in levels.pixels().enumerate() {
                for c in 0..3 {
                    let want = lut[c][p[c] as usize];
                    let d = (got[c * 224 * 224 + j] - want).abs() as f64;
                    worst = worst.max(d);
                }
            }
            println!(
                "{photo:<16} {w}x{h} {key:<4} → {rw}x{rh} ({order} first): decode Δ {dec}, \
                 resized Δ {rs} levels, max |Δ| after normalization {worst:.2e}"
            );
            assert_eq!(dec, 0, "{photo}: JPEG decode differs from Pillow");
            assert_eq!(
                rs, 0,
                "{photo} {key}: resized image differs from transformers'"
            );
            assert!(
                worst <= 1.0 / 255.0,
                "{photo} {key}: max |Δ| {worst:.3e} > 1/255 after normalization"
            );
        }
    }
}

#[test]
fn batch_stacks_processed_images() {
    let img = RgbImage::from_fn(300, 250, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let t = ImageProcessor::clip()
        .batch(&[img.clone(), img], &Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[2, 3, 224, 224]);
}
