//! `dreambooth convert`: write a model in another format.

use std::path::PathBuf;

use anyhow::bail;
use candle_core::{DType, Device};
use dreambooth::dreambooth::export;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SaveDType {
    F32,
    Fp16,
    Bf16,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// A folder (diffusers layout, safetensors), or a `.safetensors` file
    /// (original single-file layout, as A1111 and ComfyUI load).
    #[arg(long)]
    pub out: PathBuf,
    /// A VAE to write in place of the model's (folder or file, as `generate --vae`).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Precision of the written weights (folder or single file).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: SaveDType,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dtype = match args.dtype {
        SaveDType::F32 => DType::F32,
        SaveDType::Fp16 => DType::F16,
        SaveDType::Bf16 => DType::BF16,
    };
    if args.out.exists() && args.out.canonicalize().ok() == args.model.model.canonicalize().ok() {
        bail!("{}: --out is the model itself", args.out.display());
    }
    let mut model = args.model.load(&Device::Cpu)?;
    if let Some(vae) = &args.vae {
        model.set_vae(vae)?;
    }
    let what = export::save_to(&model, &args.out, dtype)?;
    println!("wrote {what} {}", args.out.display());
    Ok(())
}
