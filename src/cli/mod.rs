//! One module per subcommand; each has `Args` (clap) and `run(args) -> anyhow::Result<()>`.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod device;
pub mod eval;
pub mod generate;
pub mod identifier;
pub mod info;
pub mod merge;
pub mod paper;
pub mod selftest;
pub mod toy;
pub mod train;

/// The command line as the user typed it, the program named `dreambooth`
/// (reports print it so a figure can be reproduced).
pub fn command_line() -> String {
    let mut argv: Vec<String> = std::env::args().collect();
    if let Some(first) = argv.first_mut() {
        *first = "dreambooth".into();
    }
    argv.join(" ")
}

/// `--prediction-type`, for the commands that load a model to use it frozen.
#[derive(clap::Args)]
pub struct PredictionArg {
    /// Overrides the model's prediction type: epsilon or v_prediction (an SD
    /// 2.x single file is read as the 768-v model; SD 2.x base is epsilon).
    #[arg(long)]
    pub prediction_type: Option<String>,
}

impl PredictionArg {
    /// Loading options of a frozen model with the prediction type (when given).
    pub fn load_options(&self) -> anyhow::Result<dreambooth::models::LoadOptions> {
        Ok(dreambooth::models::LoadOptions {
            prediction_type: self
                .prediction_type
                .as_deref()
                .map(dreambooth::diffusion::PredictionType::parse)
                .transpose()?,
            ..Default::default()
        })
    }
}

/// `--model` and `--prediction-type` of the commands that load a given model
/// frozen (`convert`, `info`, `identifier`, `merge`).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A diffusers folder, a single-file .safetensors or .ckpt, or a Hub name
    /// (`org/name`) in the local Hugging Face cache.
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[command(flatten)]
    pub prediction: PredictionArg,
}

impl ModelArgs {
    /// An error when `out` is the model being read (writing over it while it
    /// is read would destroy it).
    pub fn check_out(&self, out: &std::path::Path) -> anyhow::Result<()> {
        if out.exists() && out.canonicalize().ok() == self.model.canonicalize().ok() {
            anyhow::bail!("{}: --out is the model itself", out.display());
        }
        Ok(())
    }

    /// The model, frozen, on `device`.
    pub fn load(
        &self,
        device: &candle_core::Device,
    ) -> anyhow::Result<dreambooth::models::StableDiffusion> {
        self.load_in(device, Default::default())
    }

    /// The model, frozen, on `device`, each component read in its dtype of
    /// `dtypes` (cast tensor by tensor while reading).
    pub fn load_in(
        &self,
        device: &candle_core::Device,
        dtypes: dreambooth::models::FrozenDTypes,
    ) -> anyhow::Result<dreambooth::models::StableDiffusion> {
        Ok(dreambooth::models::StableDiffusion::load(
            &self.model,
            device,
            dreambooth::models::LoadOptions {
                dtypes,
                ..self.prediction.load_options()?
            },
        )?)
    }
}

/// The precision weights are written in (`convert --dtype`, `merge --dtype`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SaveDType {
    F32,
    Fp16,
    Bf16,
}

impl SaveDType {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            SaveDType::F32 => candle_core::DType::F32,
            SaveDType::Fp16 => candle_core::DType::F16,
            SaveDType::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// The evaluation encoders' flags, shared by `eval` and `bench paper`.
#[derive(clap::Args)]
pub struct EncoderArgs {
    /// DINO ViT-S/16 (`ViTModel`): model.safetensors (or pytorch_model.bin) or its folder with config.json.
    #[arg(long)]
    pub dino: std::path::PathBuf,
    /// CLIP (`CLIPModel`, e.g. ViT-B/32 or ViT-L/14): model.safetensors (or pytorch_model.bin) or its folder.
    #[arg(long)]
    pub clip: std::path::PathBuf,
    /// The CLIP tokenizer folder (default: the CLIP folder or its tokenizer/).
    #[arg(long)]
    pub clip_tokenizer: Option<std::path::PathBuf>,
    /// LPIPS weights (safetensors, `tools/convert_lpips.py`): needed for DIV.
    #[arg(long)]
    pub lpips: Option<std::path::PathBuf>,
}

impl EncoderArgs {
    pub fn paths(self) -> dreambooth::eval::run::EncoderPaths {
        dreambooth::eval::run::EncoderPaths {
            dino: self.dino,
            clip: self.clip,
            clip_tokenizer: self.clip_tokenizer,
            lpips: self.lpips,
        }
    }
}
