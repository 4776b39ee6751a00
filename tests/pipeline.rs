//! Text-to-image pipeline: parity with diffusers' StableDiffusionPipeline
//! (tools/parity/pipeline.py), seeding, and the `generate` command end to end.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use dreambooth::diffusion::SamplerKind;
use dreambooth::diffusion::pipeline::{GenerateOptions, generate};
use dreambooth::image_io;

use serde_json::Value;

use common::{fixture_model as load_model, max_abs};

fn cases() -> serde_json::Map<String, Value> {
    common::json_cases("parity/pipeline_cases.json")
}

/// The options of a parity case, with its initial latents.
fn case_options(case: &Value, latents: Tensor) -> GenerateOptions {
    let prompts: Vec<String> =
        common::json_list(&case["prompts"], |p| p.as_str().map(String::from));
    GenerateOptions {
        batch_size: prompts.len(),
        prompts,
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        guidance_scale: case["guidance"].as_f64().unwrap(),
        steps: case["steps"].as_u64().unwrap() as usize,
        sampler: case["sampler"].as_str().unwrap().parse().unwrap(),
        eta: case["eta"].as_f64().unwrap(),
        seed: 0,
        width: Some(case["width"].as_u64().unwrap() as usize),
        height: Some(case["height"].as_u64().unwrap() as usize),
        clip_skip: case["clip_skip"].as_u64().unwrap() as usize,
        latents: Some(latents),
        init: None,
    }
}

/// Images (B,3,H,W) in [0,1] → u8 values as diffusers' numpy_to_pil rounds them.
fn to_u8(images: &Tensor) -> Vec<u8> {
    let v = images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().map(|x| (x * 255.0).round() as u8).collect()
}

/// Pixels of generated images, in (B,3,H,W) order.
fn rgb_nchw(images: &[image::RgbImage]) -> Vec<u8> {
    let mut out = Vec::new();
    for img in images {
        for c in 0..3 {
            out.extend(img.pixels().map(|p| p[c]));
        }
    }
    out
}

fn max_u8_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn parity_with_diffusers() {
    for (name, case) in cases() {
        let fx = common::load(&format!("parity/pipeline_{name}.safetensors"));
        let model = load_model(case["model"].as_str().unwrap());
        let opts = case_options(&case, fx["latents"].clone());
        let out = generate(&model, &opts, &mut |_| {}).unwrap();

        common::assert_pipeline_parity(&name, &model, &out.latents, &fx);
        let imgs: Vec<_> = out.images.iter().map(|g| g.image.clone()).collect();
        let du8 = max_u8_diff(&rgb_nchw(&imgs), &to_u8(&fx["images"]));
        assert!(du8 <= 2, "{name}: u8 images differ by {du8}");

        // Truncation warnings name the words diffusers reports as cut off.
        let truncated: Vec<&str> = case["truncated"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t.as_str())
            .collect();
        assert_eq!(
            out.warnings.len(),
            truncated.len(),
            "{name}: {:?}",
            out.warnings
        );
        for (w, t) in out.warnings.iter().zip(truncated) {
            assert!(
                w.contains(t) && w.contains("77"),
                "{name}: warning {w:?} should name {t:?}"
            );
        }
        let info = &out.images[0].info;
        assert_eq!(
            (info.width, info.height),
            (opts.width.unwrap(), opts.height.unwrap())
        );
        assert_eq!(info.sampler, case["sampler"].as_str().unwrap());
    }
}

#[test]
fn same_seed_same_images_any_batch_size() {
    let model = load_model("tiny-sd1");
    let mut opts = GenerateOptions::new("a photo of sks dog", 3);
    opts.steps = 5;
    opts.sampler = SamplerKind::EulerAncestral; // draws noise every step
    opts.seed = 7;
    opts.batch_size = 3;
    let mut steps_seen = 0;
    let a = generate(&model, &opts, &mut |_| steps_seen += 1).unwrap();
    assert_eq!(steps_seen, 5);
    let b = generate(&model, &opts, &mut |_| {}).unwrap();
    assert_eq!(
        a.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );

    opts.batch_size = 1;
    let mut batches_seen = std::collections::BTreeSet::new();
    let c = generate(&model, &opts, &mut |p| {
        batches_seen.insert(p.batch);
    })
    .unwrap();
    assert_eq!(batches_seen.len(), 3);
    let d = max_abs(&a.latents, &c.latents);
    assert!(d < 1e-4, "batch size changed the latents by {d}");

    // Image i of seed s is image 0 of seed s + i.
    let mut one = GenerateOptions {
        prompts: vec![opts.prompts[0].clone()],
        seed: 9,
        ..opts.clone()
    };
    one.batch_size = 1;
    let e = generate(&model, &one, &mut |_| {}).unwrap();
    let d = max_abs(&a.latents.narrow(0, 2, 1).unwrap(), &e.latents);
    assert!(d < 1e-4, "seed + i does not reproduce image i ({d})");
    assert_eq!(a.images[2].info.seed, 9);

    // Another seed, other images.
    let f = generate(
        &model,
        &GenerateOptions {
            seed: 8,
            ..opts.clone()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(max_abs(&a.latents, &f.latents) > 1e-2);
}

#[test]
fn bad_sizes_are_errors() {
    let model = load_model("tiny-sd1");
    let mut opts = GenerateOptions::new("x", 1);
    opts.width = Some(500);
    let e = generate(&model, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("width 500") && e.contains("multiple of 8"),
        "{e}"
    );
    opts.width = None;
    opts.latents =
        Some(Tensor::zeros((2, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap());
    let e = generate(&model, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 images"), "{e}");
}

#[test]
fn model_hash_is_stable_and_distinguishes_models() {
    let a = load_model("tiny-sd1");
    let h = a.model_hash().unwrap();
    assert_eq!(h.len(), 16);
    assert_eq!(h, a.model_hash().unwrap());
    assert_ne!(h, load_model("tiny-sd2").model_hash().unwrap());
}

// ---------------------------------------------------------------------------
// The binary.

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dreambooth"))
}

fn tmp(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("pipeline")
        .join(name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

use common::copy_dir;

#[test]
fn generate_command_end_to_end() {
    let cases = cases();
    let case = &cases["sd1_dpm"];
    let fx_path = common::fixtures().join("parity/pipeline_sd1_dpm.safetensors");
    let fx = common::load("parity/pipeline_sd1_dpm.safetensors");
    let out = tmp("e2e");
    let o = bin()
        .args(["generate", "--model"])
        .arg(common::fixtures().join("tiny-sd1"))
        .args(["--prompt", case["prompts"][0].as_str().unwrap()])
        .args([
            "--negative-prompt",
            case["negative_prompt"].as_str().unwrap(),
        ])
        .args([
            "--steps",
            "8",
            "--sampler",
            "dpm++",
            "--guidance",
            "7.5",
            "--seed",
            "11",
        ])
        .arg("--latents")
        .arg(&fx_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let mut imgs = Vec::new();
    for i in 0..2 {
        let (img, info) = image_io::read_generated(&out.join(format!("{i:05}.png"))).unwrap();
        assert_eq!(info.prompt, "a photo of sks dog");
        assert_eq!(info.negative_prompt, "ugly");
        assert_eq!(info.seed, 11 + i as u64);
        assert_eq!(
            (info.steps, info.sampler.as_str(), info.guidance),
            (8, "dpm++", 7.5)
        );
        assert_eq!((info.width, info.height), (32, 16));
        assert_eq!(info.model, "tiny-sd1");
        assert_eq!(info.model_hash.len(), 16);
        imgs.push(img);
    }
    let d = max_u8_diff(&rgb_nchw(&imgs), &to_u8(&fx["images"]));
    println!("generate --latents vs diffusers: max u8 diff {d}");
    assert!(d <= 2, "binary's images differ from diffusers' by {d}/255");
    let (grid, text) = image_io::read_png(&out.join("grid.png")).unwrap();
    assert_eq!(grid.dimensions(), (64, 16));
    assert_eq!(text["prompt"], "a photo of sks dog");
}

/// Runs `generate` with `args`, expects failure with a one-line message
/// containing every `needle`.
fn expect_error(args: &[&str], needles: &[&str]) {
    let o = bin().arg("generate").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{err:?} should mention {n:?}");
    }
}

#[test]
fn generate_command_errors() {
    let tiny = common::fixtures().join("tiny-sd1");
    let tiny = tiny.to_str().unwrap();
    let out = tmp("errors");
    let out_s = out.join("out");
    let out_s = out_s.to_str().unwrap();

    let no_unet = out.join("no-unet");
    copy_dir(Path::new(tiny), &no_unet);
    std::fs::remove_dir_all(no_unet.join("unet")).unwrap();
    expect_error(
        &[
            "--model",
            no_unet.to_str().unwrap(),
            "--prompt",
            "x",
            "--out",
            out_s,
        ],
        &["no-unet", "unet/", "missing"],
    );

    let truncated = out.join("truncated");
    copy_dir(Path::new(tiny), &truncated);
    let w = truncated.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        &[
            "--model",
            truncated.to_str().unwrap(),
            "--prompt",
            "x",
            "--out",
            out_s,
        ],
        &["diffusion_pytorch_model.safetensors", "invalid safetensors"],
    );

    expect_error(
        &[
            "--model", tiny, "--prompt", "x", "--width", "500", "--out", out_s,
        ],
        &["width 500", "multiple of 8"],
    );
    expect_error(
        &[
            "--model",
            tiny,
            "--prompt",
            "x",
            "--sampler",
            "plms",
            "--out",
            out_s,
        ],
        &["unknown sampler", "plms", "ddim"],
    );
    expect_error(
        &[
            "--model",
            "/nonexistent/model",
            "--prompt",
            "x",
            "--out",
            out_s,
        ],
        &["/nonexistent/model", "not found"],
    );
    assert!(
        !out.join("out").exists(),
        "a failed run created the output folder"
    );
}

/// `generate --prompt-file`: -n images of each prompt in file order (blank
/// lines and # comments skipped), image i with seed + i, each the image
/// `--prompt P -n 1 --seed` that seed gives alone.
#[test]
fn generate_command_prompt_file() {
    let tiny = common::fixtures().join("tiny-sd1");
    let dir = tmp("prompt-file");
    let file = dir.join("prompts.txt");
    std::fs::write(
        &file,
        "# the paper's contexts\na photo of sks dog\n\n  a sks dog on the beach  \n",
    )
    .unwrap();
    let run = |extra: &[&str], out: &Path| {
        let o = bin()
            .args(["generate", "--model"])
            .arg(&tiny)
            .args(["--steps", "2", "--sampler", "ddim"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let all = dir.join("all");
    run(
        &[
            "--prompt-file",
            file.to_str().unwrap(),
            "-n",
            "2",
            "--seed",
            "5",
        ],
        &all,
    );
    let prompts = [
        "a photo of sks dog",
        "a photo of sks dog",
        "a sks dog on the beach",
        "a sks dog on the beach",
    ];
    for (i, p) in prompts.iter().enumerate() {
        let (_, info) = image_io::read_generated(&all.join(format!("{i:05}.png"))).unwrap();
        assert_eq!((info.prompt.as_str(), info.seed), (*p, 5 + i as u64));
    }
    assert!(!all.join("00004.png").exists());
    let one = dir.join("one");
    run(
        &[
            "--prompt",
            "a sks dog on the beach",
            "-n",
            "1",
            "--seed",
            "7",
        ],
        &one,
    );
    let (a, _) = image_io::read_generated(&all.join("00002.png")).unwrap();
    let (b, _) = image_io::read_generated(&one.join("00000.png")).unwrap();
    assert_eq!(
        a, b,
        "image 2 of the file run differs from its prompt alone with seed 7"
    );

    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "# nothing\n\n").unwrap();
    let out = dir.join("x");
    let tiny_s = tiny.to_str().unwrap();
    let out_s = out.to_str().unwrap();
    expect_error(
        &[
            "--model",
            tiny_s,
            "--prompt-file",
            empty.to_str().unwrap(),
            "--out",
            out_s,
        ],
        &["empty.txt", "no prompts"],
    );
    expect_error(
        &[
            "--model",
            tiny_s,
            "--prompt-file",
            dir.join("nope.txt").to_str().unwrap(),
            "--out",
            out_s,
        ],
        &["nope.txt"],
    );
    for args in [
        vec!["--model", tiny_s, "--out", out_s],
        vec![
            "--model",
            tiny_s,
            "--prompt",
            "x",
            "--prompt-file",
            file.to_str().unwrap(),
            "--out",
            out_s,
        ],
    ] {
        let o = bin().arg("generate").args(&args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && e.contains("--prompt"),
            "{args:?}: {e}"
        );
    }
}

/// A second `generate` into the same folder numbers its images on (and names
/// its grid after its first image) instead of writing over the first run's.
#[test]
fn generate_command_adds_to_a_used_folder() {
    let tiny = common::fixtures().join("tiny-sd1");
    let out = tmp("used-folder");
    let run = |seed: &str| {
        let o = bin()
            .args(["generate", "--model"])
            .arg(&tiny)
            .args([
                "--prompt",
                "a sks dog",
                "--steps",
                "2",
                "--sampler",
                "ddim",
                "-n",
                "2",
            ])
            .args(["--seed", seed, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert!(run("1").contains("00000.png to 00001.png, and grid.png"));
    let first = std::fs::read(out.join("00000.png")).unwrap();
    std::fs::write(out.join("notes.png.txt"), "x").unwrap();
    assert!(run("3").contains("00002.png to 00003.png, and grid-00002.png"));
    assert_eq!(
        std::fs::read(out.join("00000.png")).unwrap(),
        first,
        "run 1's image was overwritten"
    );
    let (_, info) = image_io::read_generated(&out.join("00003.png")).unwrap();
    assert_eq!(info.seed, 4);
    assert!(out.join("grid.png").exists() && out.join("grid-00002.png").exists());
}
