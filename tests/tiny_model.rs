//! The bundled tiny model (assets/tiny-model) loads like any diffusers folder,
//! uses the real SD architecture, and generates deterministic 64×64 images.

use candle_core::Device;
use dreambooth::diffusion::{GenerateOptions, SamplerKind, generate};
use dreambooth::models::{LoadOptions, StableDiffusion};

fn load() -> StableDiffusion {
    let dir = dreambooth::models::sd::default_model_dir().expect("assets/tiny-model is shipped");
    StableDiffusion::load(&dir, &Device::Cpu, LoadOptions::default()).unwrap()
}

#[test]
fn shipped_model_loads_with_sd_architecture() {
    let m = load();
    assert_eq!(m.default_size(), 64);
    assert_eq!(m.unet.config.in_channels, m.vae.config().latent_channels);
    assert_eq!(
        m.unet.config.cross_attention_dim,
        m.text_encoder.config().hidden_size
    );
    // Identifier candidates and every caption word are single tokens.
    for w in ["sks", "ball", "beach", "photo", "purple"] {
        let ids = m.tokenizer.encode(w);
        assert_eq!(ids.len(), 3, "`{w}` is not one token: {ids:?}");
    }
    let dir = dreambooth::models::sd::default_model_dir().unwrap();
    let bytes: u64 = walk(&dir);
    assert!(
        bytes < 30 * 1024 * 1024,
        "tiny model is {bytes} bytes (limit 30 MB)"
    );
}

fn walk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p)
            } else {
                p.metadata().unwrap().len()
            }
        })
        .sum()
}

#[test]
fn shipped_model_generates_deterministically() {
    let m = load();
    let mut o = GenerateOptions::new("a photo of a red ball on the beach", 2);
    o.steps = 4;
    o.sampler = SamplerKind::Ddim;
    o.guidance_scale = 5.0;
    let a = generate(&m, &o, &mut |_| {}).unwrap();
    let b = generate(&m, &o, &mut |_| {}).unwrap();
    assert_eq!(a.images.len(), 2);
    assert_eq!(a.images[0].image.dimensions(), (64, 64));
    assert_eq!(a.images[0].image.as_raw(), b.images[0].image.as_raw());
    assert_ne!(a.images[0].image.as_raw(), a.images[1].image.as_raw());
}
