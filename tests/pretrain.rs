//! `toy pretrain` end to end at a tiny budget: it writes a diffusers folder that
//! loads like any model, and `init_from` continues training it (VAE kept,
//! UNet trained further).

use candle_core::Device;
use dreambooth::models::{LoadOptions, StableDiffusion};
use dreambooth::toy::pretrain::{PretrainOptions, pretrain};

fn tiny(out: std::path::PathBuf, init_from: Option<std::path::PathBuf>) -> PretrainOptions {
    PretrainOptions {
        out,
        vae_steps: 2,
        vae_batch: 2,
        num_scenes: 16,
        unet_steps: 2,
        batch: 2,
        log_every: 1,
        init_from,
        ..Default::default()
    }
}

#[test]
fn pretrain_writes_a_loadable_model_and_continues() {
    let root = std::env::temp_dir().join(format!("db-pretrain-{}", std::process::id()));
    let a = root.join("a");
    let b = root.join("b");
    let mut lines = Vec::new();
    pretrain(&tiny(a.clone(), None), &mut |l| lines.push(l.to_string())).unwrap();
    assert!(lines.iter().any(|l| l.starts_with("vae step")), "{lines:?}");
    let m = StableDiffusion::load(&a, &Device::Cpu, LoadOptions::default()).unwrap();
    assert_eq!(m.default_size(), 64);

    let mut lines = Vec::new();
    pretrain(&tiny(b.clone(), Some(a.clone())), &mut |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert!(
        !lines.iter().any(|l| l.starts_with("vae step")),
        "VAE retrained: {lines:?}"
    );
    let n = StableDiffusion::load(&b, &Device::Cpu, LoadOptions::default()).unwrap();
    let (va, vb) = (m.vae_vb.tensors(), n.vae_vb.tensors());
    for (k, t) in &va {
        let d = (t - &vb[k])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "VAE tensor {k} changed");
    }
    assert_eq!(m.vae.scaling_factor(), n.vae.scaling_factor());
    let (ua, ub) = (m.unet_vb.tensors(), n.unet_vb.tensors());
    let changed = ua
        .iter()
        .filter(|(k, t)| {
            (*t - &ub[*k])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        })
        .count();
    assert!(
        changed > ua.len() / 2,
        "only {changed} of {} UNet tensors trained further",
        ua.len()
    );
    std::fs::remove_dir_all(&root).ok();
}
