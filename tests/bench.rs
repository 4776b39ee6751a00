//! `dreambooth bench step --with-encoders`: the whole step (VAE + text
//! encoding, then the UNet step) runs and is timed, and SD 1.5's encoder
//! configs are the published ones and validate.

use std::path::Path;

use dreambooth::bench::Arch;
use dreambooth::models::clip_text::ClipTextConfig;
use dreambooth::models::vae::VaeConfig;

#[test]
fn sd15_encoder_configs_validate() {
    let (vae, text) = Arch::Sd15.encoder_configs().unwrap();
    let vae: VaeConfig = serde_json::from_value(vae).unwrap();
    vae.validate(Path::new("sd15 vae")).unwrap();
    assert_eq!(vae.downscale_factor(), 8);
    let text: ClipTextConfig = serde_json::from_value(text).unwrap();
    text.validate(Path::new("sd15 text encoder")).unwrap();
    assert_eq!((text.hidden_size, text.num_hidden_layers), (768, 12));
    let err = Arch::parse("some/unet.json").encoder_configs().unwrap_err();
    assert!(err.to_string().contains("--with-encoders"), "{err}");
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
