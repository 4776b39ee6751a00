//! Stable Diffusion XL: parity with diffusers / transformers on the tiny
//! random-weight SDXL pipeline (tests/fixtures/tiny-sdxl, fixtures from
//! tools/parity/sdxl.py): the UNet with `text_time` micro-conditioning (output
//! and gradients), both text encoders through `encode_prompt` (context and
//! pooled embeddings), and the folder's loading errors. The whole pipeline's
//! parity runs with the other cases in tests/pipeline.rs.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{assert_close, fixtures, load};
use dreambooth::models::{AddedCond, LoadOptions, StableDiffusion, UNet2DConditionModel, UNetCond};

fn tiny() -> std::path::PathBuf {
    fixtures().join("tiny-sdxl")
}

#[test]
fn sdxl_unet_matches_diffusers() {
    let fx = load("parity/sdxl_unet.safetensors");
    let (unet, vb) = UNet2DConditionModel::load(&tiny().join("unet"), &Device::Cpu, true).unwrap();
    assert!(unet.add_embedding.is_some());
    let sample = Var::from_tensor(&fx["sample"]).unwrap();
    let context = Var::from_tensor(&fx["context"]).unwrap();
    let text_embeds = Var::from_tensor(&fx["text_embeds"]).unwrap();
    let added = AddedCond {
        text_embeds: text_embeds.as_tensor().clone(),
        time_ids: fx["time_ids"].clone(),
    };
    let out = unet
        .forward_added(&sample, &fx["timesteps"], &context, Some(&added))
        .unwrap();
    assert_close("sdxl unet out", &out, &fx["out"], 1e-4);

    let loss = (out * &fx["r"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in [
        ("sample", &sample),
        ("context", &context),
        ("text_embeds", &text_embeds),
    ] {
        assert_close(
            &format!("sdxl grad {name}"),
            grads.get(var).unwrap(),
            &fx[&format!("grad.{name}")],
            1e-4,
        );
    }
    let vars = vb.vars();
    let mut n = 0;
    for (k, want) in fx.iter().filter(|(k, _)| {
        k.starts_with("grad.")
            && !["grad.sample", "grad.context", "grad.text_embeds"].contains(&k.as_str())
    }) {
        let key = &k["grad.".len()..];
        let g = grads
            .get(&vars[key])
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        assert_close(&format!("sdxl grad {key}"), g, want, 1e-4);
        n += 1;
    }
    assert!(n >= 8, "fixture holds too few weight gradients ({n})");
    // Every parameter, add_embedding's included, receives a gradient.
    let missing: Vec<&String> = vars
        .iter()
        .filter(|(_, v)| {
            grads.get(v).is_none_or(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
        })
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty(),
        "parameters without gradient: {missing:?}"
    );
}

#[test]
fn sdxl_unet_needs_and_refuses_added_conditioning() {
    let fx = load("parity/sdxl_unet.safetensors");
    let (unet, _) = UNet2DConditionModel::load(&tiny().join("unet"), &Device::Cpu, false).unwrap();
    let e = unet
        .forward(&fx["sample"], &fx["timesteps"], &fx["context"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("SDXL") && e.contains("time ids"), "{e}");

    let (sd1, _) = UNet2DConditionModel::load(
        &fixtures().join("tiny-sd1").join("unet"),
        &Device::Cpu,
        false,
    )
    .unwrap();
    let added = AddedCond::new(&fx["text_embeds"], [8.0, 8.0, 0.0, 0.0, 8.0, 8.0]).unwrap();
    let ctx = Tensor::zeros((2, 77, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = sd1
        .forward_added(&fx["sample"], &fx["timesteps"], &ctx, Some(&added))
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_time"), "{e}");
}

#[test]
fn sdxl_encode_prompt_matches_diffusers() {
    let fx = load("parity/sdxl_text.safetensors");
    let meta =
        dreambooth::models::lora::read_metadata(&fixtures().join("parity/sdxl_text.safetensors"))
            .unwrap();
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let model = StableDiffusion::load(&tiny(), &Device::Cpu, LoadOptions::default()).unwrap();
    assert!(model.is_sdxl());
    for skip in [0usize, 1] {
        let (e, warnings) = model.encode_prompt(&prompts, skip).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(e.context.dims(), &[prompts.len(), 77, 64]);
        assert_close(
            &format!("sdxl context clip_skip {skip}"),
            &e.context,
            &fx[&format!("skip{skip}.context")],
            1e-5,
        );
        assert_close(
            &format!("sdxl pooled clip_skip {skip}"),
            e.pooled.as_ref().unwrap(),
            &fx[&format!("skip{skip}.pooled")],
            1e-5,
        );
    }
}

/// A copy of tiny-sdxl to break.
fn broken_copy(tag: &str) -> std::path::PathBuf {
    let dst = std::env::temp_dir().join(format!("db-sdxl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    common::copy_dir(&tiny(), &dst);
    dst
}

fn load_err(dir: &std::path::Path) -> String {
    StableDiffusion::load(dir, &Device::Cpu, LoadOptions::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn sdxl_folder_errors_name_the_problem() {
    // No second text encoder folder.
    let d = broken_copy("no-te2");
    std::fs::remove_dir_all(d.join("text_encoder_2")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("text_encoder_2/") && e.contains("missing"),
        "{e}"
    );

    // A refiner-style index (no first text encoder).
    let d = broken_copy("refiner");
    let p = d.join("model_index.json");
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    idx["text_encoder"] = serde_json::json!([null, null]);
    std::fs::write(&p, idx.to_string()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("refiner") && e.contains("model_index.json"),
        "{e}"
    );

    // A UNet whose add_embedding width does not fit the second encoder.
    let d = broken_copy("width");
    let p = d.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["addition_time_embed_dim"] = serde_json::json!(4);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("projection_class_embeddings_input_dim") && e.contains("= 56"),
        "{e}"
    );

    // A second text encoder without its projection.
    let d = broken_copy("noproj");
    let f = d.join("text_encoder_2/model.safetensors");
    let t: std::collections::BTreeMap<String, Tensor> =
        dreambooth::nn::read_safetensors(&f, &Device::Cpu)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k != "text_projection.weight")
            .collect();
    dreambooth::nn::save_safetensors(&t, &f, None).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("text_projection.weight") && e.contains("text_encoder_2"),
        "{e}"
    );

    // text_time without its sizes.
    let d = broken_copy("sizes");
    let p = d.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg.as_object_mut()
        .unwrap()
        .remove("projection_class_embeddings_input_dim");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("projection_class_embeddings_input_dim") && e.contains("config.json"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// DreamBooth on SDXL: full fine-tune and LoRA, with prior preservation
// ---------------------------------------------------------------------------

use dreambooth::diffusion::{GenerateOptions, NoiseSchedule, generate};
use dreambooth::dreambooth::config::TrainConfig;
use dreambooth::dreambooth::data::{Crop, prepare, to_tensor};
use dreambooth::dreambooth::loss::denoising_loss;
use dreambooth::dreambooth::trainer::TrainOutcome;
use dreambooth::models::lora;
use dreambooth::toy::world::{Subject, subject_photos};

const PROMPT: &str = "a photo of sks ball";

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("db-sdxl-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Three toy-world photos of the subject in `dir`.
fn photos(dir: &std::path::Path) -> Vec<image::RgbImage> {
    std::fs::create_dir_all(dir).unwrap();
    let p: Vec<image::RgbImage> = subject_photos(Subject::SpotBall, 3, 7)
        .into_iter()
        .map(|(_, i)| i)
        .collect();
    for (i, img) in p.iter().enumerate() {
        img.save(dir.join(format!("photo-{i}.png"))).unwrap();
    }
    p
}

/// A short run at 16 px (tiny-sdxl's native size) with prior preservation:
/// the class images come from the SDXL pipeline itself.
fn config(dir: &std::path::Path) -> TrainConfig {
    TrainConfig {
        model: Some(tiny()),
        instance_dir: dir.join("instance"),
        instance_prompt: PROMPT.into(),
        with_prior_preservation: true,
        class_prompt: Some("a photo of ball".into()),
        num_class_images: 2,
        output_dir: dir.join("out"),
        resolution: Some(16),
        center_crop: true,
        max_train_steps: 12,
        learning_rate: 1e-3,
        checkpointing_steps: 0,
        validation_steps: 0,
        class_steps: 2,
        sample_steps: 2,
        ..Default::default()
    }
}

/// Trains per `cfg`, raising the stop flag after step `stop_at`.
fn run_until(
    cfg: &TrainConfig,
    stop_at: Option<u64>,
) -> dreambooth::Result<(StableDiffusion, TrainOutcome, Vec<String>)> {
    common::train_until(cfg, stop_at).map(|(m, o, _, lines)| (m, o, lines))
}

/// [`config`] for LoRA rank 4, both file formats, a LoRA learning rate.
fn lora_config(dir: &std::path::Path) -> TrainConfig {
    TrainConfig {
        lora: true,
        lora_rank: 4,
        lora_format: "both".into(),
        learning_rate: 1e-2,
        ..config(dir)
    }
}

fn run(cfg: &TrainConfig) -> (StableDiffusion, TrainOutcome, Vec<String>) {
    run_until(cfg, None).unwrap()
}

/// Mean denoising error of `model` on the photos under `prompt` at fixed
/// noise and timesteps, through the same SDXL conditioning as training.
fn error(model: &StableDiffusion, imgs: &[image::RgbImage], prompt: &str) -> f64 {
    let ts = [100usize, 300, 500, 700, 900];
    let views: Vec<_> = imgs
        .iter()
        .flat_map(|i| std::iter::repeat_n(prepare(i, 16, Crop::Center, false), ts.len()))
        .collect();
    let pixels = to_tensor(&views, &Device::Cpu).unwrap();
    let mean = model.vae.encode(&pixels).unwrap().mean;
    let latents =
        ((mean - model.vae.shift_factor()).unwrap() * model.vae.scaling_factor()).unwrap();
    let timesteps: Vec<usize> = (0..imgs.len()).flat_map(|_| ts).collect();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let noise = dreambooth::util::randn(&mut rng, latents.dims(), &Device::Cpu).unwrap();
    let (e, _) = model.encode_prompt(&[prompt.to_string()], 0).unwrap();
    let e = e.repeat(timesteps.len()).unwrap();
    let added = model.added_cond(&e, 16, 16).unwrap();
    assert!(added.is_some());
    let schedule = NoiseSchedule::new(&model.scheduler).unwrap();
    let per = denoising_loss(
        &model.unet,
        &schedule,
        &latents,
        UNetCond {
            context: &e.context,
            added: added.as_ref(),
        },
        &timesteps,
        &noise,
        dreambooth::nn::Precision::F32,
    )
    .unwrap();
    per.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

fn images(model: &StableDiffusion) -> Vec<image::RgbImage> {
    let mut opts = GenerateOptions::new(PROMPT, 2);
    opts.steps = 3;
    opts.seed = 11;
    opts.guidance_scale = 3.0;
    generate(model, &opts, &mut |_| {})
        .unwrap()
        .images
        .into_iter()
        .map(|g| g.image)
        .collect()
}

fn base() -> StableDiffusion {
    StableDiffusion::load(&tiny(), &Device::Cpu, LoadOptions::default()).unwrap()
}

/// Full fine-tune: the denoising error on the subject falls, the class images
/// are generated by the SDXL pipeline, and the exported folder (an SDXL
/// pipeline) and single file load back with the trained weights and the same pixels.
#[test]
fn sdxl_full_fine_tune_learns_and_exports() {
    let dir = tmp("full");
    let imgs = photos(&dir.join("instance"));
    let mut cfg = config(&dir);
    cfg.save_single_file = true;
    let before = error(&base(), &imgs, PROMPT);
    let (trained, outcome, lines) = run(&cfg);
    let after = error(&trained, &imgs, PROMPT);
    println!("sdxl denoising error {before:.4} → {after:.4}");
    assert_eq!(outcome.final_step, 12);
    assert!(after < 0.8 * before, "error {before:.4} → {after:.4}");
    assert!(
        lines.iter().any(|l| l.contains("2 generated")),
        "no class images generated: {lines:?}"
    );

    let folder = outcome.model_dir.expect("a diffusers folder");
    let idx = std::fs::read_to_string(folder.join("model_index.json")).unwrap();
    assert!(idx.contains("StableDiffusionXLPipeline"), "{idx}");
    let m = StableDiffusion::load(&folder, &Device::Cpu, LoadOptions::default()).unwrap();
    assert!(m.is_sdxl());
    common::assert_identical("UNet", &trained.unet_vb.tensors(), &m.unet_vb.tensors());
    let te2 = |m: &StableDiffusion| m.text_encoder_2.as_ref().unwrap().vb.tensors();
    common::assert_identical("frozen text encoder 2", &te2(&base()), &te2(&m));
    let want = images(&trained);
    assert_ne!(want, images(&base()), "training changed nothing");
    assert!(
        images(&m) == want,
        "the exported folder generates other pixels"
    );
    let file = outcome.single_file.expect("a single file");
    let m = StableDiffusion::load(&file, &Device::Cpu, LoadOptions::default()).unwrap();
    assert!(m.is_sdxl());
    common::assert_identical("UNet", &trained.unet_vb.tensors(), &m.unet_vb.tensors());
    assert!(
        images(&m) == want,
        "the exported single file generates other pixels"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// LoRA: the peft file and the kohya file (sd-scripts' SDXL names: the
/// original `input_blocks` modules, `ss_base_model_version` sdxl) attached to
/// the base model generate what the trained adapters generate.
#[test]
fn sdxl_lora_files_load_back() {
    let dir = tmp("lora");
    photos(&dir.join("instance"));
    let mut cfg = lora_config(&dir);
    cfg.max_train_steps = 4;
    let (trained, outcome, _) = run(&cfg);
    let want = images(&trained);
    assert_ne!(want, images(&base()), "LoRA training changed nothing");
    assert_eq!(outcome.lora_files.len(), 2);
    let kohya = outcome
        .lora_files
        .iter()
        .find(|p| p.ends_with(lora::KOHYA_FILE))
        .unwrap();
    let meta = lora::read_metadata(kohya).unwrap();
    assert_eq!(meta["ss_base_model_version"], "sdxl_base_v1-0");
    let keys = dreambooth::nn::read_safetensors(kohya, &Device::Cpu).unwrap();
    assert!(
        keys.keys().all(|k| k.starts_with("lora_unet_input_blocks_")
            || k.starts_with("lora_unet_middle_block_")
            || k.starts_with("lora_unet_output_blocks_")),
        "{:?}",
        keys.keys().take(3).collect::<Vec<_>>()
    );
    for f in &outcome.lora_files {
        let mut m = base();
        lora::attach_file(&mut m, f, 1.0).unwrap();
        let got = images(&m);
        assert!(got == want, "{} generates other pixels", f.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--train-text-encoder` trains both text encoders: their weights move, the
/// exported folder and single file hold them, and a run stopped and resumed
/// ends bit-identical (the second encoder's weights and moments included).
#[test]
fn sdxl_trains_both_text_encoders_and_resumes() {
    let dir = tmp("te");
    photos(&dir.join("instance"));
    let mut cfg = config(&dir);
    cfg.train_text_encoder = true;
    cfg.max_train_steps = 4;
    cfg.checkpointing_steps = 2;
    cfg.class_dir = Some(dir.join("class"));
    cfg.save_single_file = true;
    let (full, outcome, lines) = run(&cfg);
    assert!(
        lines.iter().any(|l| l.contains("text-encoder parameters")),
        "{lines:?}"
    );
    let b = base();
    let te2 = |m: &StableDiffusion| m.text_encoder_2.as_ref().unwrap().vb.tensors();
    for (what, before, after) in [
        (
            "text encoder",
            b.text_encoder_vb.tensors(),
            full.text_encoder_vb.tensors(),
        ),
        ("text encoder 2", te2(&b), te2(&full)),
    ] {
        let moved = before
            .iter()
            .filter(|(k, v)| bits(v) != bits(&after[*k]))
            .count();
        assert!(
            moved * 2 > before.len(),
            "{what}: only {moved} of {} weights moved",
            before.len()
        );
    }
    let strip = |t: std::collections::BTreeMap<String, Tensor>| {
        t.into_iter()
            .map(|(k, v)| {
                (
                    k.strip_prefix("text_model.").map(String::from).unwrap_or(k),
                    v,
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    for path in [outcome.model_dir.unwrap(), outcome.single_file.unwrap()] {
        let m = StableDiffusion::load(&path, &Device::Cpu, LoadOptions::default()).unwrap();
        common::assert_identical(
            "text encoder",
            &strip(full.text_encoder_vb.tensors()),
            &strip(m.text_encoder_vb.tensors()),
        );
        common::assert_identical("text encoder 2", &strip(te2(&full)), &strip(te2(&m)));
        assert!(
            images(&m) == images(&full),
            "{} generates other pixels",
            path.display()
        );
    }

    cfg.output_dir = dir.join("resumed");
    cfg.save_single_file = false;
    let (_, stopped, _) = run_until(&cfg, Some(2)).unwrap();
    assert!(stopped.interrupted);
    cfg.resume = Some("latest".into());
    let (resumed, outcome, _) = run(&cfg);
    assert_eq!(outcome.final_step, 4);
    common::assert_identical("UNet", &full.unet_vb.tensors(), &resumed.unet_vb.tensors());
    common::assert_identical("text encoder 2", &te2(&full), &te2(&resumed));
    let _ = std::fs::remove_dir_all(&dir);
}

/// LoRA on both text encoders: the peft file has `text_encoder.` and
/// `text_encoder_2.` adapters, the kohya file `lora_te1_` and `lora_te2_`
/// (sd-scripts' SDXL names); both reattach to the same pixels.
#[test]
fn sdxl_lora_with_text_encoders_loads_back() {
    let dir = tmp("lora-te");
    photos(&dir.join("instance"));
    let mut cfg = lora_config(&dir);
    cfg.train_text_encoder = true;
    cfg.max_train_steps = 3;
    let (trained, outcome, _) = run(&cfg);
    let want = images(&trained);
    for f in &outcome.lora_files {
        let keys: Vec<String> = dreambooth::nn::read_safetensors(f, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        let has = |p: &str| keys.iter().any(|k| k.starts_with(p));
        if f.ends_with(lora::KOHYA_FILE) {
            assert!(
                has("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
                "{keys:?}"
            );
            assert!(
                has("lora_te2_text_model_encoder_layers_0_self_attn_q_proj"),
                "{keys:?}"
            );
        } else {
            assert!(
                has("text_encoder.text_model.encoder.layers.0.self_attn"),
                "{keys:?}"
            );
            assert!(
                has("text_encoder_2.text_model.encoder.layers.0.self_attn"),
                "{keys:?}"
            );
        }
        let mut m = base();
        let file = lora::attach_file(&mut m, f, 1.0).unwrap();
        // 4 attention projections × 3 layers × 2 encoders.
        assert_eq!(file.counts().1, 24, "{}", f.display());
        assert!(images(&m) == want, "{} generates other pixels", f.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Single-file SDXL checkpoints (Stability's layout, as sd_xl_base_1.0.safetensors)
// ---------------------------------------------------------------------------

use dreambooth::models::single_file::{self, Family, SingleFileOptions, load_components};

fn single() -> std::path::PathBuf {
    fixtures().join("tiny-sdxl.safetensors")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Exactly the same keys and bit-identical tensors (text encoder keys
/// compared without the `text_model.` level some layouts lack).
fn assert_same(what: &str, got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) {
    let norm = |m: &HashMap<String, Tensor>| -> std::collections::BTreeMap<String, Tensor> {
        m.iter()
            .map(|(k, v)| {
                let k = k.strip_prefix("text_model.").unwrap_or(k).to_string();
                (k, v.clone())
            })
            .collect()
    };
    let (g, w) = (norm(got), norm(want));
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "{what}: keys differ"
    );
    for (k, v) in &w {
        assert_eq!(g[k].dims(), v.dims(), "{what}: {k}");
        assert!(bits(&g[k]) == bits(v), "{what}: tensor {k} differs");
    }
}

use std::collections::HashMap;

/// tests/fixtures/tiny-sdxl.safetensors (tools/parity/single_file.py sdxl:
/// tiny-sdxl renamed to the SDXL layout by an independent mapping, checked
/// against diffusers' converters) holds exactly the folder's tensors.
#[test]
fn sdxl_single_file_equals_the_diffusers_folder() {
    let c = load_components(&single(), &Device::Cpu, &SingleFileOptions::default()).unwrap();
    assert_eq!(c.family, Family::Sdxl);
    assert!(c.configs_from_metadata);
    let read =
        |rel: &str| dreambooth::nn::read_safetensors(&tiny().join(rel), &Device::Cpu).unwrap();
    assert_same(
        "unet",
        &c.unet,
        &read("unet/diffusion_pytorch_model.safetensors"),
    );
    assert_same(
        "vae",
        &c.vae,
        &read("vae/diffusion_pytorch_model.safetensors"),
    );
    assert_same(
        "text encoder",
        &c.text_encoder,
        &read("text_encoder/model.safetensors"),
    );
    let (cfg2, te2) = c.text_encoder_2.as_ref().expect("a second text encoder");
    assert_same(
        "text encoder 2",
        te2,
        &read("text_encoder_2/model.safetensors"),
    );
    let want = dreambooth::models::clip_text::ClipTextConfig::from_file(
        &tiny().join("text_encoder_2/config.json"),
    )
    .unwrap();
    assert_eq!(
        single_file::text_config_json(cfg2),
        single_file::text_config_json(&want)
    );
    assert_eq!(
        single_file::unet_config_json(&c.unet_config),
        single_file::unet_config_json(
            &dreambooth::models::UNetConfig::from_file(&tiny().join("unet/config.json")).unwrap()
        )
    );

    // The whole model from the file generates the folder's pixels.
    let m = StableDiffusion::load(&single(), &Device::Cpu, LoadOptions::default()).unwrap();
    assert!(m.is_sdxl());
    assert!(
        images(&m) == images(&base()),
        "the single file generates other pixels"
    );
}

/// Without the metadata the configs come from the shapes and SDXL's rules:
/// text_time conditioning from `label_emb`, per-level transformer depths,
/// the second encoder's width, depth and projection, the SDXL VAE factor.
#[test]
fn sdxl_single_file_configs_are_detected_without_metadata() {
    let dir = tmp("sdxl-detect");
    let bare = dir.join("bare.safetensors");
    let t = dreambooth::nn::read_safetensors(&single(), &Device::Cpu).unwrap();
    let t: std::collections::BTreeMap<String, Tensor> = t.into_iter().collect();
    dreambooth::nn::save_safetensors(&t, &bare, None).unwrap();
    let c = single_file::detect_configs(&bare, &SingleFileOptions::default()).unwrap();
    assert_eq!(c.family, Family::Sdxl);
    assert!(!c.from_metadata);
    let w = dreambooth::models::UNetConfig::from_file(&tiny().join("unet/config.json")).unwrap();
    let u = &c.unet;
    assert!(u.is_sdxl());
    assert_eq!(u.block_out_channels, w.block_out_channels);
    assert_eq!(u.down_block_types, w.down_block_types);
    assert_eq!(u.up_block_types, w.up_block_types);
    assert_eq!(u.transformer_layers(), w.transformer_layers());
    assert_eq!(u.cross_attention_dim, w.cross_attention_dim);
    assert!(u.use_linear_projection);
    assert_eq!(
        u.projection_class_embeddings_input_dim,
        w.projection_class_embeddings_input_dim
    );
    // Not in the weights: SDXL's 256 channels per time id, its 1024 px.
    assert_eq!(u.addition_time_embed_dim, Some(256));
    assert_eq!((u.sample_size, c.vae.sample_size), (128, 1024));
    assert_eq!(c.vae.scaling_factor, 0.13025);
    let t2 = c.text_encoder_2.as_ref().unwrap();
    assert_eq!(
        (t2.hidden_size, t2.num_hidden_layers, t2.projection_dim),
        (32, 3, 32)
    );
    assert_eq!(t2.hidden_act, "gelu");
    assert_eq!(c.text_encoder.hidden_act, "quick_gelu");
    assert_eq!(
        c.scheduler.prediction_type,
        dreambooth::diffusion::PredictionType::Epsilon
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The error of loading the fixture without the tensors `drop` picks, as `name`.
fn load_without(dir: &std::path::Path, name: &str, drop: impl Fn(&str) -> bool) -> String {
    let t: std::collections::BTreeMap<String, Tensor> =
        dreambooth::nn::read_safetensors(&single(), &Device::Cpu)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| !drop(k))
            .collect();
    let p = dir.join(name);
    dreambooth::nn::save_safetensors(&t, &p, None).unwrap();
    StableDiffusion::load(&p, &Device::Cpu, LoadOptions::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn sdxl_single_file_errors_name_the_problem() {
    let dir = tmp("sdxl-errors");
    // A refiner-like file: only the second text encoder.
    let e = load_without(&dir, "refiner.safetensors", |k| {
        k.starts_with("conditioner.embedders.0.")
    });
    assert!(
        e.contains("refiner") && e.contains("conditioner.embedders.0.transformer."),
        "{e}"
    );
    // A missing projection.
    let e = load_without(&dir, "noproj.safetensors", |k| {
        k.ends_with("embedders.1.model.text_projection")
    });
    assert!(
        e.contains("conditioner.embedders.1.model.text_projection") && e.contains("noproj"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Our SDXL single-file writer and the independent Python mapping
/// (tools/parity/single_file.py, checked against diffusers' converters) give
/// the same file: the same keys (but the CLIP `position_ids` buffer, which we
/// do not write) and bit-identical tensors.
#[test]
fn sdxl_save_single_file_matches_the_python_mapping() {
    let dir = tmp("sdxl-save");
    let out = dir.join("ours.safetensors");
    dreambooth::dreambooth::export::save_single(&base(), &out, candle_core::DType::F32).unwrap();
    let ours = dreambooth::nn::read_safetensors(&out, &Device::Cpu).unwrap();
    let mut theirs = dreambooth::nn::read_safetensors(&single(), &Device::Cpu).unwrap();
    theirs.remove("conditioner.embedders.0.transformer.text_model.embeddings.position_ids");
    let mut ok: Vec<&String> = ours.keys().collect();
    let mut want: Vec<&String> = theirs.keys().collect();
    ok.sort();
    want.sort();
    assert_eq!(ok, want, "keys differ");
    for (k, v) in &theirs {
        let v = v.to_dtype(candle_core::DType::F32).unwrap();
        assert_eq!(ours[k].dims(), v.dims(), "{k}");
        if ours[k].rank() == 0 {
            let (a, b) = (
                ours[k].to_scalar::<f32>().unwrap(),
                v.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() < 1e-4, "{k}: {a} vs {b}");
        } else {
            assert!(bits(&ours[k]) == bits(&v), "{k} differs");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Trained from a single file, the model is written as a whole SDXL folder
/// (second encoder and both tokenizers from memory) that loads back and
/// generates the same pixels.
#[test]
fn sdxl_single_file_trains_into_a_folder() {
    let dir = tmp("from-single");
    photos(&dir.join("instance"));
    let mut cfg = config(&dir);
    cfg.model = Some(single());
    cfg.with_prior_preservation = false;
    cfg.max_train_steps = 3;
    let (trained, outcome, _) = run(&cfg);
    let folder = outcome.model_dir.expect("a diffusers folder");
    for sub in [
        "text_encoder_2/config.json",
        "tokenizer_2/vocab.json",
        "model_index.json",
    ] {
        assert!(folder.join(sub).is_file(), "{sub} missing");
    }
    let m = StableDiffusion::load(&folder, &Device::Cpu, LoadOptions::default()).unwrap();
    assert!(m.is_sdxl());
    common::assert_identical("UNet", &trained.unet_vb.tensors(), &m.unet_vb.tensors());
    let te2 = |m: &StableDiffusion| m.text_encoder_2.as_ref().unwrap().vb.tensors();
    common::assert_identical("text encoder 2", &te2(&trained), &te2(&m));
    assert_eq!(
        m.text_encoder_2.as_ref().unwrap().tokenizer.pad_id(),
        trained.text_encoder_2.as_ref().unwrap().tokenizer.pad_id()
    );
    assert!(
        images(&m) == images(&trained),
        "the folder generates other pixels"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
