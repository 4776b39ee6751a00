//! Training data: reading instance photos (formats, EXIF, bad files), the
//! square training views, and the class-image cache with its manifest.

mod common;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::Device;
use image::codecs::jpeg::JpegEncoder;
use image::{
    DynamicImage, ImageBuffer, ImageEncoder, ImageFormat, Luma, LumaA, Rgb, RgbImage, Rgba,
};

use dreambooth::diffusion::SamplerKind;
use dreambooth::dreambooth::class_images::{
    ClassGenOptions, ClassImageCache, MANIFEST, Manifest, class_file_name,
};
use dreambooth::dreambooth::data::{Crop, ImageFolder, check_size, load_image, prepare, to_tensor};
use dreambooth::dreambooth::identifier::{IdentifierOptions, rank_identifiers};
use dreambooth::models::{LoadOptions, StableDiffusion};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dreambooth-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A smooth test picture.
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90])
    })
}

fn jpeg_bytes(img: &RgbImage, exif: Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = JpegEncoder::new_with_quality(&mut out, 95);
    if let Some(exif) = exif {
        enc.set_exif_metadata(exif).unwrap();
    }
    enc.write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

fn save(img: &DynamicImage, path: &Path, format: ImageFormat) {
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A little-endian TIFF header with one IFD entry: Orientation = `value`.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(b"II");
    e.extend_from_slice(&42u16.to_le_bytes());
    e.extend_from_slice(&8u32.to_le_bytes());
    e.extend_from_slice(&1u16.to_le_bytes()); // one entry
    e.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    e.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&value.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    e
}

fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[test]
fn missing_empty_and_imageless_folders_are_errors() {
    let e = msg(ImageFolder::scan(Path::new("/nonexistent/photos"), false).unwrap_err());
    assert!(
        e.contains("/nonexistent/photos") && e.contains("not found"),
        "{e}"
    );

    let dir = tmp("empty");
    let e = msg(ImageFolder::scan(&dir, false).unwrap_err());
    assert!(e.contains("no images") && e.contains(".jpg"), "{e}");

    std::fs::write(dir.join("notes.txt"), "hello").unwrap();
    std::fs::write(dir.join("IMG_0001.HEIC"), "x").unwrap();
    let e = msg(ImageFolder::scan(&dir, false).unwrap_err());
    assert!(e.contains("2 other file(s)") && e.contains("HEIC"), "{e}");
}

#[test]
fn scan_lists_sorted_images_and_ignores_other_files() {
    let dir = tmp("scan");
    save(
        &picture(32, 32).into(),
        &dir.join("b.PNG"),
        ImageFormat::Png,
    );
    std::fs::write(dir.join("a.JPG"), jpeg_bytes(&picture(32, 24), None)).unwrap();
    save(
        &picture(24, 32).into(),
        &dir.join("c.webp"),
        ImageFormat::WebP,
    );
    std::fs::write(dir.join("notes.txt"), "hello").unwrap();
    std::fs::write(dir.join("._a.JPG"), "AppleDouble junk").unwrap();
    std::fs::create_dir(dir.join("sub.png")).unwrap();
    let (paths, warnings) = ImageFolder::scan(&dir, false).unwrap();
    let names: Vec<_> = paths
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["a.JPG", "b.PNG", "c.webp"]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("notes.txt"), "{warnings:?}");
    assert_eq!(
        load_image(&dir.join("c.webp")).unwrap().dimensions(),
        (24, 32)
    );
}

#[test]
fn bad_files_are_named_before_training() {
    let dir = tmp("bad");
    std::fs::write(dir.join("good.jpg"), jpeg_bytes(&picture(64, 48), None)).unwrap();

    // A truncated JPEG (an interrupted copy).
    let full = jpeg_bytes(&picture(64, 48), None);
    std::fs::write(dir.join("cut.jpg"), &full[..full.len() / 2]).unwrap();
    let e = msg(load_image(&dir.join("cut.jpg")).unwrap_err());
    assert!(e.contains("cut.jpg") && e.contains("truncated JPEG"), "{e}");
    let e = msg(ImageFolder::scan(&dir, false).unwrap_err());
    assert!(
        e.contains("cut.jpg") && e.contains("--skip-bad-images"),
        "{e}"
    );

    // Garbage after a JPEG header.
    let mut junk = full[..20].to_vec();
    junk.extend(std::iter::repeat_n(0x55u8, 200));
    std::fs::write(dir.join("junk.jpg"), &junk).unwrap();
    let e = msg(load_image(&dir.join("junk.jpg")).unwrap_err());
    assert!(e.contains("junk.jpg") && e.contains("JPEG"), "{e}");

    // A text file named .png.
    std::fs::write(dir.join("readme.png"), "this is not a picture\n").unwrap();
    let e = msg(load_image(&dir.join("readme.png")).unwrap_err());
    assert!(e.contains("readme.png") && e.contains("text"), "{e}");

    // An empty file.
    std::fs::write(dir.join("zero.webp"), "").unwrap();
    let e = msg(load_image(&dir.join("zero.webp")).unwrap_err());
    assert!(e.contains("zero.webp") && e.contains("empty"), "{e}");

    // A PNG cut short.
    let mut png = Vec::new();
    DynamicImage::from(picture(64, 64))
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .unwrap();
    std::fs::write(dir.join("short.png"), &png[..png.len() * 2 / 3]).unwrap();
    let e = msg(load_image(&dir.join("short.png")).unwrap_err());
    assert!(e.contains("short.png") && e.contains("PNG"), "{e}");

    // skip_bad keeps the good image and says what it skipped.
    let (paths, warnings) = ImageFolder::scan(&dir, true).unwrap();
    assert_eq!(paths, [dir.join("good.jpg")]);
    assert_eq!(warnings.len(), 5, "{warnings:?}");
    assert!(
        warnings.iter().any(|w| w.contains("cut.jpg")),
        "{warnings:?}"
    );
}

#[test]
fn jpeg_named_png_loads_by_content() {
    let dir = tmp("misnamed");
    std::fs::write(dir.join("photo.png"), jpeg_bytes(&picture(40, 30), None)).unwrap();
    assert_eq!(
        load_image(&dir.join("photo.png")).unwrap().dimensions(),
        (40, 30)
    );
}

#[test]
fn tiny_images_are_rejected_with_the_minimum() {
    let dir = tmp("tiny");
    save(
        &picture(20, 20).into(),
        &dir.join("small.png"),
        ImageFormat::Png,
    );
    let e = msg(ImageFolder::scan_for_resolution(&dir, 512, false).unwrap_err());
    assert!(
        e.contains("small.png") && e.contains("20×20") && e.contains("512") && e.contains("128"),
        "{e}"
    );
    // At a toy resolution it is fine; below 8 px at 32 px it is not.
    assert!(ImageFolder::scan_for_resolution(&dir, 64, false).is_ok());
    let e = msg(check_size(Path::new("x.png"), 7, 30, 32).unwrap_err());
    assert!(e.contains("7×30") && e.contains("at least 8"), "{e}");
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tmp("exif");
    // Stored 40×20 with the left quarter red; orientation 6 = rotate 90° clockwise
    // to display, so the displayed image is 20×40 with the top quarter red.
    let stored = RgbImage::from_fn(40, 20, |x, _| {
        if x < 10 {
            Rgb([230, 20, 20])
        } else {
            Rgb([20, 20, 230])
        }
    });
    std::fs::write(
        dir.join("rot.jpg"),
        jpeg_bytes(&stored, Some(exif_orientation(6))),
    )
    .unwrap();
    let img = load_image(&dir.join("rot.jpg")).unwrap();
    assert_eq!(img.dimensions(), (20, 40));
    assert!(img.get_pixel(10, 3)[0] > 180 && img.get_pixel(10, 3)[2] < 80);
    assert!(img.get_pixel(10, 30)[2] > 180 && img.get_pixel(10, 30)[0] < 80);

    // Orientation 1 (normal) keeps the stored layout.
    std::fs::write(
        dir.join("up.jpg"),
        jpeg_bytes(&stored, Some(exif_orientation(1))),
    )
    .unwrap();
    assert_eq!(
        load_image(&dir.join("up.jpg")).unwrap().dimensions(),
        (40, 20)
    );
}

#[test]
fn rgba_gray_and_16_bit_become_rgb8() {
    let dir = tmp("colour");
    // RGBA: transparent → white, opaque → itself, half → between.
    let rgba = ImageBuffer::from_fn(3, 1, |x, _| match x {
        0 => Rgba([255u8, 0, 0, 0]),
        1 => Rgba([10, 20, 30, 255]),
        _ => Rgba([0, 0, 0, 128]),
    });
    save(
        &DynamicImage::ImageRgba8(rgba),
        &dir.join("a.png"),
        ImageFormat::Png,
    );
    let img = load_image(&dir.join("a.png")).unwrap();
    assert_eq!(img.get_pixel(0, 0), &Rgb([255, 255, 255]));
    assert_eq!(img.get_pixel(1, 0), &Rgb([10, 20, 30]));
    assert_eq!(img.get_pixel(2, 0), &Rgb([127, 127, 127]));

    let gray = ImageBuffer::from_fn(2, 1, |x, _| Luma([x as u8 * 200]));
    save(
        &DynamicImage::ImageLuma8(gray),
        &dir.join("g.png"),
        ImageFormat::Png,
    );
    let img = load_image(&dir.join("g.png")).unwrap();
    assert_eq!(img.get_pixel(1, 0), &Rgb([200, 200, 200]));

    let rgb16 = ImageBuffer::from_fn(2, 1, |x, _| Rgb([65535u16, 32896, x as u16 * 257 * 7]));
    save(
        &DynamicImage::ImageRgb16(rgb16),
        &dir.join("c16.png"),
        ImageFormat::Png,
    );
    let img = load_image(&dir.join("c16.png")).unwrap();
    assert_eq!(img.get_pixel(1, 0), &Rgb([255, 128, 7]));

    let la16 = ImageBuffer::from_fn(1, 1, |_, _| LumaA([0u16, 0]));
    save(
        &DynamicImage::ImageLumaA16(la16),
        &dir.join("la16.png"),
        ImageFormat::Png,
    );
    assert_eq!(
        load_image(&dir.join("la16.png")).unwrap().get_pixel(0, 0),
        &Rgb([255; 3])
    );
}

#[test]
fn center_crop_size_and_position() {
    // Short side already at the resolution: no resampling, the window is centred
    // (offset round((40 − 20) / 2) = 10; for 41 px round(10.5) = 10, half to even).
    for w in [40, 41] {
        let img = RgbImage::from_fn(w, 20, |x, y| Rgb([x as u8, y as u8, 0]));
        let out = prepare(&img, 20, Crop::Center, false);
        assert_eq!(out.dimensions(), (20, 20));
        assert_eq!(out.get_pixel(0, 0), &Rgb([10, 0, 0]));
        assert_eq!(out.get_pixel(19, 19), &Rgb([29, 19, 0]));
        let flipped = prepare(&img, 20, Crop::Center, true);
        assert_eq!(flipped.get_pixel(0, 0), &Rgb([29, 0, 0]));
    }
    // Portrait: the vertical window is centred.
    let img = RgbImage::from_fn(16, 30, |x, y| Rgb([x as u8, y as u8, 0]));
    assert_eq!(
        prepare(&img, 16, Crop::Center, false).get_pixel(0, 0),
        &Rgb([0, 7, 0])
    );

    // Resized: 300×100 → 96×32, then the middle 32×32.
    let img = RgbImage::from_fn(300, 100, |x, _| {
        if (100..200).contains(&x) {
            Rgb([255, 255, 255])
        } else {
            Rgb([0, 0, 0])
        }
    });
    let out = prepare(&img, 32, Crop::Center, false);
    assert_eq!(out.dimensions(), (32, 32));
    assert!(
        out.pixels().all(|p| p[0] > 200),
        "the centre third is white"
    );

    // Upscaling a small image works too.
    assert_eq!(
        prepare(&picture(10, 12), 32, Crop::Center, false).dimensions(),
        (32, 32)
    );
}

#[test]
fn random_crop_is_seeded_and_in_bounds() {
    let img = RgbImage::from_fn(64, 16, |x, y| Rgb([x as u8, y as u8, 0]));
    let a = prepare(&img, 16, Crop::Random(7), false);
    assert_eq!(a, prepare(&img, 16, Crop::Random(7), false));
    let offsets: std::collections::BTreeSet<u8> = (0..20)
        .map(|s| prepare(&img, 16, Crop::Random(s), false).get_pixel(0, 0)[0])
        .collect();
    assert!(
        offsets.len() > 5 && *offsets.last().unwrap() <= 48,
        "{offsets:?}"
    );
}

#[test]
fn tensor_is_nchw_in_unit_range() {
    let imgs = [RgbImage::from_pixel(4, 2, Rgb([0, 255, 51])), picture(4, 2)];
    let t = to_tensor(&imgs, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3, 2, 4]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v[0], -1.0);
    assert_eq!(v[8], 1.0);
    assert!((v[16] - (51.0 / 127.5 - 1.0)).abs() < 1e-6);
    assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    assert!(to_tensor(&[picture(4, 2), picture(2, 4)], &Device::Cpu).is_err());
}

fn tiny_sd1() -> StableDiffusion {
    StableDiffusion::load(
        &common::fixtures().join("tiny-sd1"),
        &Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap()
}

fn class_opts(batch_size: usize) -> ClassGenOptions {
    ClassGenOptions {
        sampler: SamplerKind::Ddim,
        steps: 2,
        guidance: 3.0,
        batch_size,
        seed: 100,
        negative_prompt: String::new(),
        size: Some(16),
        regenerate: false,
    }
}

#[test]
fn class_images_are_generated_reused_and_guarded() {
    let model = tiny_sd1();
    let dir = tmp("class");
    let dog = "a photo of a dog";
    let mut steps = 0;
    let r = ClassImageCache::prepare(&model, &dir, dog, 3, &class_opts(2), &mut |_| steps += 1)
        .unwrap();
    assert_eq!((r.generated, r.reused, r.user_provided), (3, 0, 0));
    assert_eq!(steps, 4, "two batches of two steps");
    let names: Vec<String> = (0..3).map(class_file_name).collect();
    assert_eq!(
        r.paths,
        names.iter().map(|n| dir.join(n)).collect::<Vec<_>>()
    );
    let (img, info) = dreambooth::image_io::read_generated(&r.paths[2]).unwrap();
    assert_eq!(img.dimensions(), (16, 16));
    assert_eq!((info.prompt.as_str(), info.seed, info.steps), (dog, 102, 2));
    let manifest = Manifest::read(&dir).unwrap();
    assert_eq!(manifest.images.len(), 3);
    assert_eq!(manifest.images[&names[1]].seed, 101);
    assert_eq!(
        manifest.images[&names[1]].model_hash,
        model.model_hash().unwrap()
    );

    // Second call: everything reused, nothing regenerated.
    let before = std::fs::read(&r.paths[0]).unwrap();
    let modified = std::fs::metadata(&r.paths[0]).unwrap().modified().unwrap();
    let r2 = ClassImageCache::prepare(&model, &dir, dog, 3, &class_opts(2), &mut |_| {}).unwrap();
    assert_eq!((r2.generated, r2.reused), (0, 3));
    assert_eq!(r2.paths, r.paths);
    assert_eq!(
        std::fs::metadata(&r.paths[0]).unwrap().modified().unwrap(),
        modified
    );
    assert_eq!(std::fs::read(&r.paths[0]).unwrap(), before);

    // Asking for more generates only the missing one, identical to what an
    // uninterrupted run with another batch size makes.
    let r3 = ClassImageCache::prepare(&model, &dir, dog, 4, &class_opts(2), &mut |_| {}).unwrap();
    assert_eq!((r3.generated, r3.reused), (1, 3));
    let fresh = tmp("class-fresh");
    let r4 = ClassImageCache::prepare(&model, &fresh, dog, 4, &class_opts(4), &mut |_| {}).unwrap();
    assert_eq!(r4.generated, 4);
    for n in [&names[0], &class_file_name(3)] {
        assert_eq!(
            load_image(&dir.join(n)).unwrap(),
            load_image(&fresh.join(n)).unwrap(),
            "{n}"
        );
    }

    // The user's own photo (no manifest entry) is used and counted.
    save(
        &picture(16, 16).into(),
        &dir.join("my-dog.jpg"),
        ImageFormat::Jpeg,
    );
    let r5 = ClassImageCache::prepare(&model, &dir, dog, 5, &class_opts(2), &mut |_| {}).unwrap();
    assert_eq!((r5.generated, r5.reused, r5.user_provided), (0, 4, 1));
    assert!(r5.notes.iter().any(|n| n.contains("own")), "{:?}", r5.notes);

    // Another prompt: a clear error naming the count, the old prompt and the fixes.
    let cat = "a photo of a cat";
    let e = msg(
        ClassImageCache::prepare(&model, &dir, cat, 5, &class_opts(2), &mut |_| {}).unwrap_err(),
    );
    assert!(
        e.contains("4 class image(s)")
            && e.contains("\"a photo of a dog\"")
            && e.contains(cat)
            && e.contains("--class-dir")
            && e.contains("--regenerate-class-images"),
        "{e}"
    );
    assert_eq!(
        Manifest::read(&dir).unwrap().images.len(),
        4,
        "nothing touched"
    );

    // --regenerate-class-images moves them aside and makes new ones.
    let regen = ClassGenOptions {
        regenerate: true,
        ..class_opts(4)
    };
    let r6 = ClassImageCache::prepare(&model, &dir, cat, 3, &regen, &mut |_| {}).unwrap();
    assert_eq!((r6.generated, r6.reused, r6.user_provided), (2, 0, 1));
    let manifest = Manifest::read(&dir).unwrap();
    assert!(manifest.images.values().all(|e| e.prompt == cat));
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("replaced-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read_dir(dir.join(&aside[0])).unwrap().count(), 4);
}

#[test]
fn class_images_of_another_model_are_flagged() {
    let model = tiny_sd1();
    let dir = tmp("class-model");
    let prompt = "a photo of a ball";
    ClassImageCache::prepare(&model, &dir, prompt, 1, &class_opts(1), &mut |_| {}).unwrap();

    // Other settings, same model and prompt: reused with a note, or remade on request.
    let three_steps = ClassGenOptions {
        steps: 3,
        ..class_opts(1)
    };
    let r = ClassImageCache::prepare(&model, &dir, prompt, 1, &three_steps, &mut |_| {}).unwrap();
    assert_eq!((r.generated, r.reused), (0, 1));
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("other settings") && n.contains("2 steps, not 3")),
        "{:?}",
        r.notes
    );
    let remake = ClassGenOptions {
        regenerate: true,
        ..three_steps
    };
    let r = ClassImageCache::prepare(&model, &dir, prompt, 1, &remake, &mut |_| {}).unwrap();
    assert_eq!((r.generated, r.reused), (1, 0));
    assert!(
        r.notes.iter().any(|n| n.contains("moved 1")),
        "{:?}",
        r.notes
    );
    assert_eq!(
        Manifest::read(&dir).unwrap().images[&class_file_name(0)].steps,
        3
    );

    let mut manifest = Manifest::read(&dir).unwrap();
    for e in manifest.images.values_mut() {
        e.model = "sd15".into();
        e.model_hash = "0000111122223333".into();
    }
    manifest.write(&dir).unwrap();
    let e = msg(
        ClassImageCache::prepare(&model, &dir, prompt, 1, &class_opts(1), &mut |_| {}).unwrap_err(),
    );
    assert!(
        e.contains("1 class image(s)") && e.contains("sd15") && e.contains("0000111122223333"),
        "{e}"
    );

    std::fs::write(dir.join(MANIFEST), "{ not json").unwrap();
    let e = msg(
        ClassImageCache::prepare(&model, &dir, prompt, 1, &class_opts(1), &mut |_| {}).unwrap_err(),
    );
    assert!(e.contains(MANIFEST) && e.contains("delete it"), "{e}");
}

#[test]
fn identifier_candidates_on_tiny_sd1() {
    let model = tiny_sd1();
    let r = rank_identifiers(&model, &IdentifierOptions::default()).unwrap();
    assert_eq!(r.vocab_size, 1514);
    assert_eq!(r.merges, 1000);
    assert!(r.eligible >= 10, "{r:?}");
    let top = &r.candidates[..10.min(r.candidates.len())];
    for c in top {
        assert!(
            c.word.len() <= 3 && c.word.chars().all(|ch| ch.is_ascii_lowercase()),
            "{c:?}"
        );
        assert_eq!(
            model.tokenizer.id_to_token(c.id).unwrap(),
            format!("{}</w>", c.word)
        );
        assert_eq!(c.merge_rank, c.id as usize - 512);
        assert!(c.prior.is_finite() && c.prior > 0.0, "{c:?}");
    }
    for (i, c) in r.candidates.iter().enumerate() {
        assert_eq!(c.combined_rank, i + 1);
    }
    // The best combined candidate is rarer than the median eligible token.
    assert!(r.candidates[0].rarity_rank <= r.candidates.len() / 2 + 1);
}

#[test]
fn identifier_filter_on_clip_vocabulary() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/clip/bpe_simple_vocab_16e6.txt.gz");
    let tok = dreambooth::tokenizer::ClipTokenizer::from_bpe_gz(&path).unwrap();
    let e = dreambooth::dreambooth::identifier::eligible_tokens(&tok, 3).unwrap();
    assert_eq!((e.vocab_size, e.n_base, e.merges), (49408, 512, 48894));
    let sks = e
        .tokens
        .iter()
        .find(|(_, w)| w == "sks")
        .expect("sks is one token");
    println!("eligible {} sks id {}", e.tokens.len(), sks.0);
    assert!(e.tokens.iter().all(|(_, w)| w.len() <= 3));
    assert!(
        !e.tokens.iter().any(|(_, w)| w == "a"),
        "byte tokens are not merges"
    );
}
