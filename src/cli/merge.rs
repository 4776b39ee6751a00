//! `dreambooth merge`: fold LoRA files into a model and write it out.

use std::path::PathBuf;

use candle_core::Device;
use dreambooth::dreambooth::export;
use dreambooth::models::FrozenDTypes;
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
    /// Precision of the written weights. The model is read straight into it,
    /// one tensor at a time, and each adapted weight gets its LoRA delta
    /// added in f32 before it is rounded: fp16 / bf16 output takes half the
    /// memory of f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: super::SaveDType,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dtype = args.dtype.dtype();
    args.model.check_out(&args.out)?;
    let loras = pair_scales(&args.lora, &args.lora_scale)?;
    let mut model = args.model.load_in(&Device::Cpu, FrozenDTypes::all(dtype))?;
    for (path, scale) in &loras {
        let f = merge_file(&mut model, path, *scale)?;
        println!("merged {}", describe(&f, *scale));
    }
    let what = export::save_to(&model, &args.out, dtype)?;
    println!("wrote {what} {}", args.out.display());
    Ok(())
}
