//! `dreambooth convert`: write a model in another format.

use std::path::PathBuf;

use candle_core::Device;
use dreambooth::dreambooth::export;
use dreambooth::models::FrozenDTypes;

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
    /// Precision of the written weights (folder or single file). The model is
    /// read straight into it, one tensor at a time: fp16 / bf16 output takes
    /// half the memory of f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: super::SaveDType,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dtype = args.dtype.dtype();
    args.model.check_out(&args.out)?;
    // Every component read straight into the output dtype (the weights are
    // only written out): a half-precision output never needs the model in f32.
    let mut model = args.model.load_in(&Device::Cpu, FrozenDTypes::all(dtype))?;
    if let Some(vae) = &args.vae {
        model.set_vae(vae)?;
    }
    let what = export::save_to(&model, &args.out, dtype)?;
    println!("wrote {what} {}", args.out.display());
    Ok(())
}
