//! `dreambooth bench step --with-encoders`: the whole step (VAE + text
//! encoding, then the UNet step) runs and is timed, for SD 1.x and SDXL
//! (both text encoders), and SD 1.5's and SDXL's encoder configs are the
//! published ones and validate; random-weight models (`bench sample --arch`).

use std::path::Path;

use dreambooth::bench::Arch;
use dreambooth::models::clip_text::ClipTextConfig;
use dreambooth::models::vae::VaeConfig;

#[test]
fn sd15_encoder_configs_validate() {
    let c = Arch::Sd15.encoder_configs().unwrap();
    let vae: VaeConfig = serde_json::from_value(c.vae).unwrap();
    vae.validate(Path::new("sd15 vae")).unwrap();
    assert_eq!(vae.downscale_factor(), 8);
    let text: ClipTextConfig = serde_json::from_value(c.text).unwrap();
    text.validate(Path::new("sd15 text encoder")).unwrap();
    assert_eq!((text.hidden_size, text.num_hidden_layers), (768, 12));
    assert!(c.text_2.is_none());
    // SDXL: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 side by side make the
    // UNet's 2048-wide context; the pooled projection fills its text_time input.
    let c = Arch::Sdxl.encoder_configs().unwrap();
    let vae: VaeConfig = serde_json::from_value(c.vae).unwrap();
    vae.validate(Path::new("sdxl vae")).unwrap();
    assert_eq!(vae.scaling_factor, 0.13025);
    let text: ClipTextConfig = serde_json::from_value(c.text).unwrap();
    let text_2: ClipTextConfig = serde_json::from_value(c.text_2.unwrap()).unwrap();
    text_2.validate(Path::new("sdxl text encoder 2")).unwrap();
    assert_eq!(
        (text_2.num_hidden_layers, text_2.hidden_act.as_str()),
        (32, "gelu")
    );
    let unet: dreambooth::models::UNetConfig =
        serde_json::from_value(Arch::Sdxl.config_json().unwrap()).unwrap();
    assert_eq!(
        text.hidden_size + text_2.hidden_size,
        unet.cross_attention_dim
    );
    let (time_dim, in_dim) = unet.text_time_dims().unwrap();
    assert_eq!(text_2.projection_dim + 6 * time_dim, in_dim);
    // A UNet config outside a diffusers folder has no encoders to go with it.
    let err = Arch::parse("some/unet.json").encoder_configs().unwrap_err();
    assert!(
        err.to_string().contains("--with-encoders") && err.to_string().contains("vae"),
        "{err}"
    );
}

#[test]
fn bench_step_with_encoders_times_the_whole_step() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["bench", "step", "--arch", "toy", "--with-encoders"])
        .args(["--batch", "2", "--warmup", "0", "--steps", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("median encode (VAE + text encoder)"))
        .unwrap_or_else(|| panic!("no encode figure in:\n{stdout}"));
    // "... encoder) 0.003s, whole step 0.021s"
    let secs: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(',').strip_suffix('s'))
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(secs.len(), 2, "{line}");
    assert!(secs[0] > 0.0 && secs[1] > secs[0], "{line}");
}

#[test]
fn random_weight_models_build_and_generate() {
    // StableDiffusion::random (bench sample --arch sd15) on a small
    // architecture: CLIP's tokenizer, the SD schedule, seeded weights.
    use candle_core::Device;
    use dreambooth::models::StableDiffusion;
    use dreambooth::models::config::UNetConfig;
    let unet: UNetConfig =
        serde_json::from_value(dreambooth::toy::pretrain::unet_config()).unwrap();
    let vae: VaeConfig = serde_json::from_value(dreambooth::toy::pretrain::vae_config()).unwrap();
    let mut text = ClipTextConfig::default();
    (text.hidden_size, text.intermediate_size) = (64, 128);
    (text.num_hidden_layers, text.num_attention_heads) = (1, 4);
    let build = |seed| {
        StableDiffusion::random(
            "small (random)",
            &unet,
            &text,
            None,
            &vae,
            &Device::Cpu,
            seed,
        )
        .unwrap()
    };
    let image = |m: &StableDiffusion| first_image(m, None);
    let (a, b) = (build(3), build(3));
    assert_eq!(a.tokenizer.vocab_size(), 49408);
    assert_eq!(a.name(), "small (random)");
    let (ia, ib) = (image(&a), image(&b));
    assert_eq!(ia.dimensions(), (64, 64));
    assert_eq!(ia, ib, "same seed, same weights, same image");
    assert_ne!(ia, image(&build(4)), "another seed draws other weights");
    // Mismatched parts are refused with the model's name.
    let mut wide = text.clone();
    wide.hidden_size = 128;
    let err =
        StableDiffusion::random("bad", &unet, &wide, None, &vae, &Device::Cpu, 0).unwrap_err();
    assert!(err.to_string().contains("cross_attention_dim"), "{err}");
}

#[test]
fn bench_sample_names_the_architectures_it_knows() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["bench", "sample", "--arch", "toy"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--arch toy") && stderr.contains("sd15 and sdxl"),
        "{stderr}"
    );
}

#[test]
fn gpu_memory_watch_watches_nothing_on_the_cpu() {
    let w = dreambooth::bench::GpuMemoryWatch::start(&candle_core::Device::Cpu);
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(w.peak(), None);
}

/// `bench step` on an SDXL UNet (`text_time` conditioning: random pooled
/// embeds and time ids): the tiny SDXL's config through the same binary path
/// as `--arch sdxl`; with `--with-encoders`, its folder's VAE and both text
/// encoders (random weights) encode each step's batch.
#[test]
fn bench_step_runs_an_sdxl_unet() {
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-sdxl/unet/config.json");
    for (extra, expect) in [
        (None, "median of 1"),
        (Some("--with-encoders"), "whole step"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
            .args(["bench", "step", "--arch"])
            .arg(&cfg)
            .args(["--res", "16", "--warmup", "0", "--steps", "1"])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(expect),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sdxl: dreambooth::models::UNetConfig =
        serde_json::from_value(Arch::Sdxl.config_json().unwrap()).unwrap();
    sdxl.validate(std::path::Path::new("sdxl")).unwrap();
    assert_eq!(sdxl.text_time_dims(), Some((256, 2816)));
}

/// `StableDiffusion::random` with a second text encoder (what `bench sample
/// --arch sdxl` builds at full size): an SDXL pipeline that generates, seeded.
#[test]
fn random_weight_sdxl_models_build_and_generate() {
    use candle_core::Device;
    use dreambooth::models::StableDiffusion;
    use dreambooth::models::config::UNetConfig;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
    let read = |c: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(c).join("config.json")).unwrap())
            .unwrap()
    };
    let unet: UNetConfig = serde_json::from_value(read("unet")).unwrap();
    let vae: VaeConfig = serde_json::from_value(read("vae")).unwrap();
    // CLIP's vocabulary (the random model's tokenizer is CLIP's BPE).
    let text_cfg = |c: &str| {
        let mut t: ClipTextConfig = serde_json::from_value(read(c)).unwrap();
        (t.vocab_size, t.bos_token_id, t.eos_token_id) = (49408, 49406, 49407);
        t
    };
    let (text, text_2) = (text_cfg("text_encoder"), text_cfg("text_encoder_2"));
    let build = |seed| {
        StableDiffusion::random(
            "sdxl (random)",
            &unet,
            &text,
            Some(&text_2),
            &vae,
            &Device::Cpu,
            seed,
        )
        .unwrap()
    };
    let image = |m: &StableDiffusion| first_image(m, Some(64));
    let a = build(5);
    assert!(a.is_sdxl());
    let ia = image(&a);
    assert_eq!(ia.dimensions(), (64, 64));
    assert_eq!(ia, image(&build(5)), "same seed, same weights, same image");
    assert_ne!(ia, image(&build(6)), "another seed draws other weights");
}

/// The first image `m` generates for "a photo of a dog" in 2 steps, at
/// `size` × `size` (the model's own size by default).
fn first_image(m: &dreambooth::models::StableDiffusion, size: Option<usize>) -> image::RgbImage {
    use dreambooth::diffusion::pipeline::{GenerateOptions, generate};
    let opts = GenerateOptions {
        steps: 2,
        width: size,
        height: size,
        ..GenerateOptions::new("a photo of a dog", 1)
    };
    generate(m, &opts, &mut |_| {})
        .unwrap()
        .images
        .remove(0)
        .image
}
