//! Mixed precision (nn::precision): the UNet computing in f16 on f32 master
//! weights gives diffusers' f32 outputs and gradients to f16 rounding, every
//! weight's gradient arrives in f32, norms and softmax keep f32 statistics,
//! and the trainer runs f16 with loss scaling (bf16, which candle's CPU matmul
//! lacks, is refused on the CPU with a message).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixtures, load, rel_err};
use dreambooth::models::UNet2DConditionModel;
use dreambooth::nn::{Precision, fused};

#[test]
fn unet_in_f16_matches_diffusers_f32_outputs_and_gradients() {
    for name in ["sd1", "sd2"] {
        let fx = load(&format!("parity/{name}_unet.safetensors"));
        let dir = fixtures().join(format!("tiny-{name}")).join("unet");
        let (unet, vb) = UNet2DConditionModel::load(&dir, &Device::Cpu, true).unwrap();
        let sample = Var::from_tensor(&fx["sample"]).unwrap();
        let context = Var::from_tensor(&fx["context"]).unwrap();
        let x16 = Precision::F16.cast(&sample).unwrap();
        let out16 = unet.forward(&x16, &fx["timesteps"], &context).unwrap();
        assert_eq!(
            out16.dtype(),
            DType::F16,
            "{name}: output in the compute dtype"
        );
        let out = out16.to_dtype(DType::F32).unwrap();
        let e = rel_err(&out, &fx["out"]);
        // f16 keeps 11 significant bits (2^-11 ≈ 4.9e-4 per rounding).
        eprintln!("{name}: f16 output vs diffusers f32: {e:.2e}");
        assert!(e < 5e-3, "{name}: f16 output vs diffusers f32: {e:.2e}");
        assert!(e > 1e-6, "{name}: the forward did not run in f16 ({e:.2e})");

        let loss = (out * &fx["r"]).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gs = grads.get(&sample).unwrap();
        assert_eq!(gs.dtype(), DType::F32);
        let e = rel_err(gs, &fx["grad.sample"]);
        assert!(e < 1e-2, "{name}: grad sample {e:.2e}");
        let e = rel_err(grads.get(&context).unwrap(), &fx["grad.context"]);
        assert!(e < 1e-2, "{name}: grad context {e:.2e}");
        let vars = vb.vars();
        let mut checked = 0;
        let mut worst = 0f64;
        for (k, v) in fx
            .iter()
            .filter(|(k, _)| k.starts_with("grad.") && *k != "grad.sample" && *k != "grad.context")
        {
            let key = &k["grad.".len()..];
            let g = grads.get(&vars[key]).unwrap();
            assert_eq!(g.dtype(), DType::F32, "{name}: {key} gradient dtype");
            let e = rel_err(g, v);
            assert!(e < 2e-2, "{name}: grad {key} {e:.2e}");
            worst = worst.max(e);
            checked += 1;
        }
        assert!(checked >= 6);
        eprintln!("{name}: worst of {checked} weight gradients vs diffusers f32: {worst:.2e}");
        // The master weights stay f32 and every one of them gets a gradient.
        for (k, var) in &vars {
            assert_eq!(var.dtype(), DType::F32, "{name}: {k} master weight");
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient for {k}"));
            assert_eq!(g.dtype(), DType::F32, "{name}: {k}");
            assert_eq!(g.dims(), var.dims(), "{name}: {k}");
        }
    }
}

fn randn(dims: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    dreambooth::util::randn(&mut rng, dims, &Device::Cpu).unwrap()
}

#[test]
fn half_inputs_normalize_and_softmax_in_f32() {
    // (2, 8, 5, 3) with a large offset: the statistics of f16 values
    // computed in f16 would lose the small spread around the mean.
    let x = (randn(&[2, 8, 5, 3], 1) + 300.0).unwrap();
    let x16 = x.to_dtype(DType::F16).unwrap();
    let w = randn(&[8], 2);
    let b = randn(&[8], 3);
    let reference = |x: &Tensor| fused::group_norm(x, &w, &b, 4, 1e-5, true).unwrap();
    // The reference sees the same f16-rounded input, in f32.
    let want = reference(&x16.to_dtype(DType::F32).unwrap());
    let got = reference(&x16);
    assert_eq!(got.dtype(), DType::F16);
    let e = rel_err(&got.to_dtype(DType::F32).unwrap(), &want);
    assert!(e < 2e-3, "group norm f16: {e:.2e}");

    let h = randn(&[3, 7, 16], 4).to_dtype(DType::F16).unwrap();
    let (lw, lb) = (randn(&[16], 5), randn(&[16], 6));
    let want = fused::layer_norm(&h.to_dtype(DType::F32).unwrap(), &lw, &lb, 1e-5).unwrap();
    let got = fused::layer_norm(&h, &lw, &lb, 1e-5).unwrap();
    assert_eq!(got.dtype(), DType::F16);
    assert!(rel_err(&got.to_dtype(DType::F32).unwrap(), &want) < 2e-3);

    let s = (randn(&[2, 4, 9], 7) * 20.0)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let want = fused::softmax_last_dim(&s.to_dtype(DType::F32).unwrap(), 0.5).unwrap();
    let got = fused::softmax_last_dim(&s, 0.5).unwrap();
    assert_eq!(got.dtype(), DType::F16);
    assert!(rel_err(&got.to_dtype(DType::F32).unwrap(), &want) < 2e-3);
}

#[test]
fn precision_names_and_bf16_on_cpu() {
    assert_eq!(Precision::parse("no").unwrap(), Precision::F32);
    assert_eq!(Precision::parse("BF16").unwrap(), Precision::Bf16);
    assert_eq!(Precision::parse("fp16").unwrap(), Precision::F16);
    let e = Precision::parse("fp8").unwrap_err().to_string();
    assert!(e.contains("fp8"), "{e}");
    let e = Precision::Bf16
        .check_device(&Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("CUDA"), "{e}");
    assert!(Precision::F16.check_device(&Device::Cpu).is_ok());
}

/// Sampling with the bundled tiny model's UNet converted to f16 follows the
/// f32 run: the same images to within f16 rounding, not bit-identical.
#[test]
fn sampling_with_an_f16_unet_follows_f32() {
    use dreambooth::diffusion::{GenerateOptions, SamplerKind, generate};
    use dreambooth::models::{LoadOptions, StableDiffusion};
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-model");
    let load = || StableDiffusion::load(&dir, &Device::Cpu, LoadOptions::default()).unwrap();
    let opts = GenerateOptions {
        steps: 10,
        sampler: SamplerKind::Ddim,
        guidance_scale: 5.0,
        seed: 3,
        batch_size: 2,
        ..GenerateOptions::new("a photo of a red ball on the beach", 2)
    };
    let f32_run = generate(&load(), &opts, &mut |_| {}).unwrap();
    let mut half = load();
    half.set_unet_precision(Precision::F16).unwrap();
    assert_eq!(half.unet.conv_in.weight.dtype(), DType::F16);
    let f16_run = generate(&half, &opts, &mut |_| {}).unwrap();
    assert_eq!(f16_run.latents.dtype(), DType::F32);
    let e = rel_err(&f16_run.latents, &f32_run.latents);
    println!("f16 UNet sampling: final latents vs f32 {e:.2e}");
    assert!(e > 1e-6 && e < 3e-2, "{e:.2e}");
    for (a, b) in f16_run.images.iter().zip(&f32_run.images) {
        let mse: f64 = a
            .image
            .as_raw()
            .iter()
            .zip(b.image.as_raw())
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            / a.image.as_raw().len() as f64;
        let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10();
        println!("  image PSNR vs f32: {psnr:.1} dB");
        assert!(psnr > 30.0, "PSNR {psnr:.1} dB");
    }

    // The VAE decodes in the UNet's dtype too: the same latents decode to
    // pixels within f16 rounding of the f32 decode, not to the same bytes.
    use dreambooth::diffusion::pipeline::decode_latents;
    let (p16, p32) = (
        decode_latents(&half, &f32_run.latents).unwrap(),
        decode_latents(&load(), &f32_run.latents).unwrap(),
    );
    assert_eq!(p16.dtype(), DType::F32);
    let e = rel_err(&p16, &p32);
    println!("f16 VAE decode vs f32: {e:.2e}");
    assert!(e > 1e-6 && e < 1e-2, "{e:.2e}");

    // A model being trained keeps its f32 master weights.
    let mut trainable = StableDiffusion::load(
        &dir,
        &Device::Cpu,
        LoadOptions {
            train_unet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let e = trainable
        .set_unet_precision(Precision::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("f32"), "{e}");
}

/// A text encoder being trained under `--mixed-precision fp16` computes in
/// f16 on its f32 weights: transformers' f32 output and gradients to f16
/// rounding, every gradient in f32.
#[test]
fn text_encoder_in_f16_matches_transformers_f32() {
    use dreambooth::models::clip_text::{ClipTextConfig, ClipTextModel};
    use dreambooth::nn::Vb;
    for name in ["sd1", "sd2"] {
        let dir = fixtures().join(format!("tiny-{name}")).join("text_encoder");
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
        let vb = Vb::from_file(&dir.join("model.safetensors"), &Device::Cpu, true).unwrap();
        let model = ClipTextModel::new(&vb, &cfg)
            .unwrap()
            .with_mixed_precision(Precision::F16);
        let fx = load(&format!("parity/{name}_text.safetensors"));
        let ids = fx["ids"].to_dtype(DType::U32).unwrap();
        let out16 = model.forward(&ids).unwrap();
        assert_eq!(out16.dtype(), DType::F16, "{name}: output dtype");
        let out = out16.to_dtype(DType::F32).unwrap();
        let e = rel_err(&out, &fx["last_hidden_state"]);
        eprintln!("{name}: f16 text encoder vs transformers f32: {e:.2e}");
        assert!(e < 5e-3 && e > 1e-6, "{name}: output {e:.2e}");
        let grads = (out * &fx["r"])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut worst = 0f64;
        let mut checked = 0;
        for (k, want) in fx.iter().filter(|(k, _)| k.starts_with("grad.")) {
            let key = &k["grad.".len()..];
            let Some(var) = vb.vars().get(key).cloned() else {
                continue; // the token embedding's rows are stored apart
            };
            let g = grads.get(&var).unwrap();
            assert_eq!(g.dtype(), DType::F32, "{name}: {key}");
            let e = rel_err(g, want);
            assert!(e < 2e-2, "{name}: grad {key} {e:.2e}");
            worst = worst.max(e);
            checked += 1;
        }
        assert!(checked >= 6, "{name}: {checked} gradients in the fixture");
        eprintln!("{name}: worst of {checked} f16 gradients vs transformers f32: {worst:.2e}");
    }
}
