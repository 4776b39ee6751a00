//! `dreambooth merge`: fold LoRA files into a model and write it out.

use std::path::PathBuf;

use candle_core::{DType, Device};
use dreambooth::dreambooth::export;
use dreambooth::models::lora::{describe, merge_file, pair_scales};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// A LoRA file (peft/diffusers or kohya); repeatable.
    #[arg(long = "lora", required = true)]
    pub lora: Vec<PathBuf>,
    /// Strength: one value for all, or one per --lora (default 1).
    #[arg(long = "lora-scale")]
    pub lora_scale: Vec<f64>,
    /// A folder (diffusers layout), or a `.safetensors` file (original single-file layout).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let loras = pair_scales(&args.lora, &args.lora_scale)?;
    let device = Device::Cpu;
    let mut model = args.model.load(&device)?;
    for (path, scale) in &loras {
        let f = merge_file(&mut model, path, *scale)?;
        println!("merged {}", describe(&f, *scale));
    }
    let what = export::save_to(&model, &args.out, DType::F32)?;
    println!("wrote {what} {}", args.out.display());
    Ok(())
}
