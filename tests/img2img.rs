//! Image-to-image: parity with diffusers' StableDiffusionImg2ImgPipeline and
//! StableDiffusionXLImg2ImgPipeline (tools/parity/img2img.py), the strength
//! rule, seeding, errors, and `generate --init-image` end to end.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use dreambooth::diffusion::SamplerKind;
use dreambooth::diffusion::pipeline::{
    GenerateOptions, InitImage, decode_latents, first_step, generate,
};
use dreambooth::image_io;
use dreambooth::models::{LoadOptions, StableDiffusion};
use serde_json::Value;

use common::{fixture_model as load_model, max_abs};

fn cases() -> serde_json::Map<String, Value> {
    common::json_cases("parity/img2img_cases.json")
}

/// Pixels in [0, 1] → [-1, 1], as diffusers' image processor.
fn to_signed(pixels: &Tensor) -> Tensor {
    ((pixels * 2.0).unwrap() - 1.0).unwrap()
}

#[test]
fn parity_with_diffusers() {
    for (name, case) in cases() {
        let fx = common::load(&format!("parity/img2img_{name}.safetensors"));
        let model = load_model(case["model"].as_str().unwrap());
        let prompts: Vec<String> =
            common::json_list(&case["prompts"], |p| p.as_str().map(String::from));
        let strength = case["strength"].as_f64().unwrap();
        let opts = GenerateOptions {
            batch_size: prompts.len(),
            prompts,
            negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
            guidance_scale: case["guidance"].as_f64().unwrap(),
            steps: case["steps"].as_u64().unwrap() as usize,
            sampler: case["sampler"].as_str().unwrap().parse().unwrap(),
            latents: Some(fx["noise"].clone()),
            init: Some(InitImage {
                pixels: to_signed(&fx["init_pixels"]),
                strength,
                name: "init.png".into(),
                posterior_noise: Some(fx["posterior_noise"].clone()),
            }),
            ..GenerateOptions::new("", 0)
        };
        let steps_run = opts.steps - first_step(opts.steps, strength).unwrap();
        let mut seen = Vec::new();
        let out = generate(&model, &opts, &mut |p| seen.push((p.step, p.steps))).unwrap();
        assert_eq!(seen.last(), Some(&(steps_run, steps_run)), "{name}");
        assert_eq!(seen.len(), steps_run, "{name}");
        common::assert_pipeline_parity(&name, &model, &out.latents, &fx);
        let info = &out.images[0].info;
        let (h, w) = (
            case["height"].as_u64().unwrap(),
            case["width"].as_u64().unwrap(),
        );
        assert_eq!((info.width as u64, info.height as u64), (w, h), "{name}");
        assert_eq!(info.strength, Some(strength));
        assert_eq!(info.init_image.as_deref(), Some("init.png"));
    }
}

/// diffusers' `get_timesteps`: the last ⌊steps·strength⌋ steps run.
#[test]
fn strength_picks_the_last_steps() {
    assert_eq!(first_step(10, 0.6).unwrap(), 4);
    assert_eq!(first_step(8, 0.75).unwrap(), 2);
    assert_eq!(first_step(9, 0.5).unwrap(), 5);
    assert_eq!(first_step(30, 1.0).unwrap(), 0);
    assert_eq!(first_step(3, 0.34).unwrap(), 2);
    for bad in [0.0, -0.5, 1.01, f64::NAN] {
        let e = first_step(10, bad).unwrap_err().to_string();
        assert!(e.contains("strength must be in (0, 1]"), "{e}");
    }
    let e = first_step(4, 0.2).unwrap_err().to_string();
    assert!(e.contains("runs no step") && e.contains("0.2"), "{e}");
}

/// A smooth 8-bit test picture.
fn picture(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            ((x + y) * 7 % 256) as u8,
        ])
    })
}

#[test]
fn seeds_strength_and_errors() {
    let model = load_model("tiny-sd1");
    let init = InitImage::from_rgb(&picture(16, 24), 0.5, "p.png").unwrap();
    assert_eq!(init.pixels.dims(), &[1, 3, 24, 16]);
    let mut opts = GenerateOptions::new("a photo of sks dog", 3);
    opts.steps = 6;
    opts.sampler = SamplerKind::EulerAncestral; // fresh noise every step
    opts.seed = 5;
    opts.batch_size = 3;
    opts.init = Some(init.clone());
    let a = generate(&model, &opts, &mut |_| {}).unwrap();
    let f = model.vae_scale_factor();
    assert_eq!(a.latents.dims(), &[3, 4, 24 / f, 16 / f]);
    assert_eq!(a.images[0].image.dimensions(), (16, 24));

    // Image i of seed s is image 0 of seed s + i, alone.
    let one = GenerateOptions {
        prompts: vec![opts.prompts[0].clone()],
        seed: 7,
        batch_size: 1,
        ..opts.clone()
    };
    let b = generate(&model, &one, &mut |_| {}).unwrap();
    let d = max_abs(&a.latents.narrow(0, 2, 1).unwrap(), &b.latents);
    assert!(d < 1e-4, "seed + i does not reproduce image i ({d})");

    // A lower strength stays nearer the picture (on the bundled model, whose
    // VAE is trained: the fixture's random one reconstructs nothing).
    let bundled = StableDiffusion::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-model"),
        &Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap();
    let s = bundled.default_size() as u32;
    let pic = InitImage::from_rgb(&picture(s, s), 1.0, "p.png").unwrap();
    let decoded_err = |strength: f64| -> f32 {
        let o = GenerateOptions {
            sampler: SamplerKind::Ddim,
            steps: 10,
            init: Some(InitImage {
                strength,
                ..pic.clone()
            }),
            ..opts.clone()
        };
        let g = generate(&bundled, &o, &mut |_| {}).unwrap();
        let px = decode_latents(&bundled, &g.latents).unwrap();
        let want = ((&pic.pixels + 1.0).unwrap() / 2.0).unwrap();
        (px.broadcast_sub(&want).unwrap())
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (near, far) = (decoded_err(0.2), decoded_err(1.0));
    println!("mean |image - picture|: strength 0.2 {near:.3}, strength 1.0 {far:.3}");
    assert!(
        near < far,
        "strength 0.2 ({near}) should stay nearer than 1.0 ({far})"
    );

    // Errors: a size that differs from the picture's, a wrong count of
    // pictures, a strength that runs no step.
    let err = |o: &GenerateOptions| generate(&model, o, &mut |_| {}).unwrap_err().to_string();
    let e = err(&GenerateOptions {
        width: Some(32),
        ..opts.clone()
    });
    assert!(
        e.contains("width 32 differs from the initial image's 16"),
        "{e}"
    );
    let two = Tensor::cat(&[&init.pixels, &init.pixels], 0).unwrap();
    let e = err(&GenerateOptions {
        init: Some(InitImage {
            pixels: two,
            ..init.clone()
        }),
        ..opts.clone()
    });
    assert!(e.contains("2 initial images for 3 prompts"), "{e}");
    let e = err(&GenerateOptions {
        init: Some(InitImage {
            strength: 0.1,
            ..init.clone()
        }),
        ..opts.clone()
    });
    assert!(e.contains("runs no step"), "{e}");
    let gray = Tensor::zeros((1, 1, 24, 16), DType::F32, &Device::Cpu).unwrap();
    let e = err(&GenerateOptions {
        init: Some(InitImage {
            pixels: gray,
            ..init.clone()
        }),
        ..opts.clone()
    });
    assert!(e.contains("1 colour channels"), "{e}");
}

fn tmp(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("img2img")
        .join(name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dreambooth"))
}

/// `generate --init-image` writes images of the picture's size (rounded down
/// to the model's multiple, with a note), records the picture and strength,
/// and its images equal the library's with the same seed.
#[test]
fn generate_command_with_init_image() {
    let dir = tmp("cli");
    let tiny = common::fixtures().join("tiny-sd1");
    let pic = dir.join("my dog.png");
    picture(21, 16).save(&pic).unwrap();
    let out = dir.join("out");
    let o = bin()
        .args(["generate", "--model"])
        .arg(&tiny)
        .args(["--prompt", "a sks dog", "--steps", "5", "--sampler", "ddim"])
        .args([
            "--strength",
            "0.6",
            "-n",
            "2",
            "--seed",
            "3",
            "--init-image",
        ])
        .arg(&pic)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("21×16 resized to 16×16"), "{err}");
    let (img, info) = image_io::read_generated(&out.join("00001.png")).unwrap();
    assert_eq!(img.dimensions(), (16, 16));
    assert_eq!(info.init_image.as_deref(), Some("my dog.png"));
    assert_eq!(info.strength, Some(0.6));
    assert_eq!(info.seed, 4);

    let model = load_model("tiny-sd1");
    let resized = image::imageops::resize(
        &picture(21, 16),
        16,
        16,
        image::imageops::FilterType::Lanczos3,
    );
    let opts = GenerateOptions {
        steps: 5,
        sampler: SamplerKind::Ddim,
        seed: 3,
        batch_size: 2,
        init: Some(InitImage::from_rgb(&resized, 0.6, "my dog.png").unwrap()),
        ..GenerateOptions::new("a sks dog", 2)
    };
    let lib = generate(&model, &opts, &mut |_| {}).unwrap();
    assert_eq!(
        lib.images[1].image, img,
        "the binary's image differs from the library's"
    );

    // Errors before any work: a bad strength, a missing picture.
    for (args, needle) in [
        (vec!["--strength", "0"], "strength must be in (0, 1]"),
        (vec!["--strength", "0.1", "--steps", "5"], "runs no step"),
    ] {
        let o = bin()
            .args(["generate", "--model"])
            .arg(&tiny)
            .args(["--prompt", "x", "--init-image"])
            .arg(&pic)
            .args(&args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(needle), "{args:?}: {e}");
    }
    let o = bin()
        .args(["generate", "--model"])
        .arg(&tiny)
        .args(["--prompt", "x", "--init-image"])
        .arg(dir.join("missing.png"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("missing.png"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // A folder: the I/O error said once, on one line.
    let o = bin()
        .args(["generate", "--model"])
        .arg(&tiny)
        .args(["--prompt", "x", "--init-image"])
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert_eq!(e.matches("os error").count(), 1, "{e}");
}
