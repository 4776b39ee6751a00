//! `dreambooth info --model M`: what a model is, as this tool reads it
//! (format, family, each network's architecture and size, the noise schedule
//! and prediction type, the hash class images are keyed by), to check a
//! checkpoint before training on it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dreambooth::models::{FrozenDTypes, ModelFormat};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// A VAE in place of the model's (as `train --vae`).
    #[arg(long)]
    pub vae: Option<PathBuf>,
}

/// Millions of parameters in a state dict.
fn millions(t: &BTreeMap<String, Tensor>) -> f64 {
    t.values().map(|t| t.elem_count()).sum::<usize>() as f64 / 1e6
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Read in f16 (each tensor cast as it is read; as stored for the usual
    // fp16 checkpoints): the model is loaded in full, which proves it loads,
    // at half the memory of f32. Nothing here computes with it.
    let mut m = args
        .model
        .load_in(&Device::Cpu, FrozenDTypes::all(DType::F16))?;
    if let Some(vae) = &args.vae {
        m.set_vae(vae)?;
    }
    let format = match m.format {
        ModelFormat::Diffusers => "diffusers folder",
        ModelFormat::SingleFile => "single-file checkpoint",
        ModelFormat::Random => "random weights",
    };
    let te = m.text_encoder.config();
    let family = if m.is_sdxl() {
        "SDXL (two text encoders, size/crop conditioning)"
    } else if te.hidden_act == "gelu" {
        "SD 2.x (OpenCLIP text encoder)"
    } else {
        "SD 1.x (CLIP text encoder)"
    };
    let u = &m.unet.config;
    let px = m.default_size();
    println!("model          {} ({format})", m.source.display());
    println!("family         {family}");
    println!(
        "UNet           {:.1} M parameters; block channels {:?}; cross-attention width {}; \
         {} → {} channels; native size {px} px",
        millions(&m.unet_vb.tensors()),
        u.block_out_channels,
        u.cross_attention_dim,
        u.in_channels,
        u.out_channels
    );
    let text = |name: &str, c: &dreambooth::models::clip_text::ClipTextConfig, p: f64| {
        println!(
            "{name:<14} {p:.1} M parameters; {} layers, {} wide, {}, {} positions",
            c.num_hidden_layers, c.hidden_size, c.hidden_act, c.max_position_embeddings
        );
    };
    text("text encoder", te, millions(&m.text_encoder_vb.tensors()));
    if let Some(te2) = &m.text_encoder_2 {
        text(
            "text encoder 2",
            te2.model.config(),
            millions(&te2.vb.tensors()),
        );
    }
    let v = m.vae.config();
    println!(
        "VAE            {:.1} M parameters; {} latent channels; downscale {}; scaling factor {}",
        millions(&m.vae_vb.tensors()),
        v.latent_channels,
        v.downscale_factor(),
        v.scaling_factor
    );
    let s = &m.scheduler;
    println!(
        "scheduler      prediction {}; {} training timesteps; {} betas {}–{}",
        s.prediction_type.as_str(),
        s.num_train_timesteps,
        s.beta_schedule.as_str(),
        s.beta_start,
        s.beta_end
    );
    println!(
        "tokenizer      {} tokens, prompts cut at {}",
        m.tokenizer.vocab_size(),
        m.max_tokens()
    );
    println!("hash           {}", m.model_hash()?);
    Ok(())
}
