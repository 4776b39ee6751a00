//! Parity of `AutoencoderKL` with diffusers: encoder moments, reparameterised
//! sample, decoder output, and gradients w.r.t. the inputs and a dozen weights.
//!
//! tests/fixtures/parity/{sd1,sd2}_vae.safetensors come from
//! tools/parity/vae_clip.py on the tiny pipelines in tests/fixtures/tiny-sd{1,2}.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use dreambooth::models::vae::{AutoencoderKL, VaeConfig};
use dreambooth::nn::{Vb, read_safetensors};

const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let a: Vec<f64> = a
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Compares, prints, and returns the relative L2 error.
fn check(name: &str, got: &Tensor, want: &Tensor, worst: &mut f64) {
    let e = rel_err(got, want);
    println!("{name:<60} rel L2 err {e:.2e}");
    assert!(e < TOL, "{name}: relative L2 error {e:.3e} ≥ {TOL:e}");
    *worst = worst.max(e);
}

fn load(sd: &str) -> (AutoencoderKL, Vb) {
    let dir = root().join(format!("tests/fixtures/tiny-{sd}/vae"));
    let cfg = VaeConfig::from_file(&dir.join("config.json")).unwrap();
    let vb = Vb::from_file(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
        true,
    )
    .unwrap();
    let vae = AutoencoderKL::new(&vb, &cfg).unwrap();
    vb.finish().unwrap();
    (vae, vb)
}

fn parity(sd: &str) {
    let (vae, vb) = load(sd);
    let fx: HashMap<String, Tensor> = read_safetensors(
        &root().join(format!("tests/fixtures/parity/{sd}_vae.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let x = Var::from_tensor(&fx["x"]).unwrap();
    let z = Var::from_tensor(&fx["z"]).unwrap();
    let mut worst = 0f64;

    let post = vae.encode(x.as_tensor()).unwrap();
    check(&format!("{sd} mean"), &post.mean, &fx["mean"], &mut worst);
    check(
        &format!("{sd} logvar"),
        &post.logvar,
        &fx["logvar"],
        &mut worst,
    );
    let sample = post.sample(&fx["noise"]).unwrap();
    check(&format!("{sd} sample"), &sample, &fx["sample"], &mut worst);
    let dec = vae.decode(z.as_tensor()).unwrap();
    check(&format!("{sd} decode"), &dec, &fx["dec"], &mut worst);

    let loss = ((dec * &fx["r_dec"]).unwrap().sum_all().unwrap()
        + (sample * &fx["r_sample"]).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    check(
        &format!("{sd} grad x"),
        grads.get(x.as_tensor()).unwrap(),
        &fx["grad.x"],
        &mut worst,
    );
    check(
        &format!("{sd} grad z"),
        grads.get(z.as_tensor()).unwrap(),
        &fx["grad.z"],
        &mut worst,
    );
    let vars = vb.vars();
    let mut n = 0;
    let mut keys: Vec<&String> = fx.keys().filter(|k| k.starts_with("grad.")).collect();
    keys.sort();
    for k in keys
        .into_iter()
        .filter(|k| *k != "grad.x" && *k != "grad.z")
    {
        let (key, want) = (&k["grad.".len()..], &fx[k]);
        let var = vars
            .get(key)
            .unwrap_or_else(|| panic!("no parameter `{key}`"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{key}`"));
        check(&format!("{sd} grad {key}"), got, want, &mut worst);
        n += 1;
    }
    assert!(n >= 10, "fixture lists only {n} weight gradients");

    // Every parameter on the path of the loss gets a gradient.
    for (key, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{key}`"));
        let m = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m > 0.0, "zero gradient for `{key}`");
    }
    println!("{sd}: max rel L2 err over all VAE tensors {worst:.2e}");
}

#[test]
fn vae_parity_sd1() {
    parity("sd1");
}

#[test]
fn vae_parity_sd2() {
    parity("sd2");
}

#[test]
fn vae_config_defaults_and_errors() {
    let d = VaeConfig::default();
    assert_eq!(d.block_out_channels, vec![64]);
    assert_eq!(d.norm_num_groups, 32);
    assert_eq!(d.scaling_factor, 0.18215);
    assert!(d.use_quant_conv && d.use_post_quant_conv && d.mid_block_add_attention);
    assert_eq!(d.shift_factor, None);

    let cfg =
        VaeConfig::from_file(&root().join("tests/fixtures/tiny-sd2/vae/config.json")).unwrap();
    assert_eq!(cfg.scaling_factor, 0.13025);
    assert_eq!(cfg.downscale_factor(), 2);

    let dir = std::env::temp_dir().join(format!("dreambooth-vae-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    let text = r#"{"block_out_channels": [32, 32], "norm_num_groups": 8,
        "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
    std::fs::write(&path, text).unwrap();
    let err = VaeConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("AttnDownEncoderBlock2D") && err.contains(&path.display().to_string()),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A VAE without quant convs and without mid-block attention builds from a
/// random init and runs with the shapes diffusers gives.
#[test]
fn vae_variants_build() {
    let cfg: VaeConfig = serde_json::from_str(
        r#"{"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "layers_per_block": 2,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "use_quant_conv": false, "use_post_quant_conv": false, "mid_block_add_attention": false,
            "shift_factor": 0.1}"#,
    )
    .unwrap();
    let vb = Vb::random(0, &Device::Cpu, false);
    let vae = AutoencoderKL::new(&vb, &cfg).unwrap();
    assert!(vae.quant_conv.is_none() && vae.encoder.mid_block.attention.is_none());
    assert_eq!(vae.shift_factor(), 0.1);
    let x = Tensor::zeros((1, 3, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
    let post = vae.encode(&x).unwrap();
    assert_eq!(post.mean.dims(), &[1, 4, 4, 4]);
    assert_eq!(vae.decode(&post.mean).unwrap().dims(), &[1, 3, 16, 16]);
    assert!(vae.encode(&x.narrow(2, 0, 14).unwrap()).is_err());
}
