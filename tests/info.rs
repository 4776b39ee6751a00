//! `dreambooth info`: a model's format, family, sizes and schedule as this
//! tool reads them; a path that is not a model is an error naming it.

mod common;

use candle_core::Device;
use dreambooth::nn::read_safetensors;

fn info(model: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["info", "--model"])
        .arg(model)
        .output()
        .unwrap()
}

#[test]
fn info_describes_sd1_and_sdxl_models() {
    let fx = common::fixtures();
    let o = info(&fx.join("tiny-sd1"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let unet = read_safetensors(
        &fx.join("tiny-sd1/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let n: usize = unet.values().map(|t| t.elem_count()).sum();
    for want in [
        "(diffusers folder)".to_string(),
        "family         SD 1.x (CLIP text encoder)".to_string(),
        format!("UNet           {:.1} M parameters", n as f64 / 1e6),
        "scheduler      prediction epsilon; 1000 training timesteps".to_string(),
        "hash           ".to_string(),
    ] {
        assert!(out.contains(&want), "no `{want}` in:\n{out}");
    }
    assert!(!out.contains("text encoder 2"), "{out}");

    let o = info(&fx.join("tiny-sdxl"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("family         SDXL") && out.contains("text encoder 2 "),
        "{out}"
    );
    assert!(out.contains("scaling factor 0.13025"), "{out}");

    // SD 2.x: v-prediction as its config says, epsilon when told.
    let sd2 = fx.join("tiny-sd2");
    let o = info(&sd2);
    assert!(String::from_utf8_lossy(&o.stdout).contains("prediction v_prediction;"));
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
            .args(["info", "--model"])
            .arg(&sd2)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--prediction-type", "epsilon"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("prediction epsilon;"));
    let o = run(&["--prediction-type", "x0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown prediction type `x0`"));

    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let o = info(&readme);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("README.md"), "{err}");
}
