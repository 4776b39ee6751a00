//! UNet2DConditionModel parity with diffusers (fixtures from tools/parity/unet.py):
//! outputs and gradients of sum(out * R) w.r.t. inputs and weights.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, load};
use dreambooth::models::UNet2DConditionModel;

fn check(name: &str) {
    let fx = load(&format!("parity/{name}_unet.safetensors"));
    let dir = fixtures().join(format!("tiny-{name}")).join("unet");
    let (unet, vb) = UNet2DConditionModel::load(&dir, &Device::Cpu, true).unwrap();
    let sample = candle_core::Var::from_tensor(&fx["sample"]).unwrap();
    let context = candle_core::Var::from_tensor(&fx["context"]).unwrap();
    let out = unet.forward(&sample, &fx["timesteps"], &context).unwrap();
    assert_close(&format!("{name} unet out"), &out, &fx["out"], 1e-4);
    // A latent whose sides do not divide by 2^levels (10×6).
    let odd = unet
        .forward(
            &fx["odd_sample"],
            &fx["timesteps"].narrow(0, 0, 1).unwrap(),
            &fx["context"].narrow(0, 0, 1).unwrap(),
        )
        .unwrap();
    assert_close(
        &format!("{name} unet out 10x6 latent"),
        &odd,
        &fx["odd_out"],
        1e-4,
    );

    let loss = (out * &fx["r"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_close(
        &format!("{name} grad sample"),
        grads.get(&sample).unwrap(),
        &fx["grad.sample"],
        1e-4,
    );
    assert_close(
        &format!("{name} grad context"),
        grads.get(&context).unwrap(),
        &fx["grad.context"],
        1e-4,
    );
    let vars = vb.vars();
    let mut n = 0;
    for (k, v) in fx
        .iter()
        .filter(|(k, _)| k.starts_with("grad.") && *k != "grad.sample" && *k != "grad.context")
    {
        let key = &k["grad.".len()..];
        let var = vars
            .get(key)
            .unwrap_or_else(|| panic!("no parameter {key}"));
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        assert_close(&format!("{name} grad {key}"), g, v, 1e-4);
        n += 1;
    }
    assert!(n >= 6, "fixture holds too few weight gradients");

    // Every trainable parameter receives a nonzero gradient.
    let mut missing = Vec::new();
    for (k, var) in &vars {
        match grads.get(var) {
            Some(g)
                if g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0 => {}
            _ => missing.push(k.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{name}: parameters without gradient: {missing:?}"
    );
}

#[test]
fn unet_sd1_matches_diffusers() {
    check("sd1");
}

#[test]
fn unet_sd2_matches_diffusers() {
    check("sd2");
}

/// A diffusers folder stored in float16 loads and gives diffusers' output
/// computed with the same f16-rounded weights.
#[test]
fn unet_loads_f16_checkpoint() {
    let fx = load("parity/sd1_unet.safetensors");
    let src = fixtures().join("tiny-sd1").join("unet");
    let tmp = std::env::temp_dir().join(format!("db-f16-unet-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let weights = dreambooth::nn::read_safetensors(
        &src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let half: BTreeMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    dreambooth::nn::save_safetensors(
        &half,
        &tmp.join("diffusion_pytorch_model.safetensors"),
        None,
    )
    .unwrap();
    let (unet, _) = UNet2DConditionModel::load(&tmp, &Device::Cpu, false).unwrap();
    let out = unet
        .forward(&fx["sample"], &fx["timesteps"], &fx["context"])
        .unwrap();
    assert_close("sd1 unet f16 weights", &out, &fx["out_f16w"], 1e-4);
    std::fs::remove_dir_all(&tmp).ok();
}
