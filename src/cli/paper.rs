//! `dreambooth bench paper`: the paper's protocol on the DreamBooth dataset.

use std::path::PathBuf;

use dreambooth::eval::paper::{PaperOptions, method_name, run_paper, table_markdown};
use dreambooth::eval::run::Encoders;

#[derive(clap::Args)]
pub struct Args {
    /// The DreamBooth dataset folder (subject folders + prompts_and_classes.txt).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Base model (default: the bundled tiny model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Train LoRA adapters instead of the full weights.
    #[arg(long)]
    pub lora: bool,
    #[arg(long = "rank", default_value_t = 4)]
    pub lora_rank: usize,
    /// Comma-separated subject names (default: all 30).
    #[arg(long, value_delimiter = ',')]
    pub subjects: Vec<String>,
    #[arg(long, default_value = "sks")]
    pub identifier: String,
    #[arg(long, default_value_t = 4)]
    pub images_per_prompt: usize,
    /// Only the first N of the 25 prompts (quick runs).
    #[arg(long)]
    pub prompts_limit: Option<usize>,
    /// Images of the bare class prompt per subject after training (PRES).
    #[arg(long, default_value_t = 8)]
    pub class_images_per_subject: usize,
    /// Training steps per subject (default: 800 full, 400 LoRA).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Learning rate (default: 5e-6 full fine-tune on a real model, 5e-5 on the
    /// tiny model; 1e-4 LoRA).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Prior-preservation class images per class (generated once, cached).
    #[arg(long, default_value_t = 200)]
    pub num_class_images: usize,
    #[arg(long)]
    pub train_text_encoder: bool,
    #[arg(long)]
    pub resolution: Option<usize>,
    /// DDIM steps for class images and evaluation images.
    #[arg(long, default_value_t = 50)]
    pub sample_steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub encoders: super::EncoderArgs,
    #[arg(long, default_value = "paper-out")]
    pub out: PathBuf,
    /// A VAE in place of the model's (folder or file, as `train --vae`).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Overrides the model's prediction type: epsilon or v_prediction (an SD
    /// 2.x single file is read as the 768-v model).
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Training's compute dtype: no, fp16 or bf16 (bf16 needs a GPU).
    #[arg(long, default_value = "no")]
    pub mixed_precision: String,
    /// auto (a GPU when the binary has the `cuda` feature and one opens),
    /// cpu, cuda or cuda:N: training, generation and the encoders.
    #[arg(long)]
    pub device: Option<String>,
    /// Train every subject again, even those an earlier run into the same
    /// --out finished with the same settings (by default they are reused).
    #[arg(long)]
    pub redo: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = super::device::select(a.device.as_deref())?;
    let command = super::command_line();
    let enc = Encoders::load(&a.encoders.paths(), &device)?;
    let tiny = a.model.is_none();
    let opts = PaperOptions {
        dataset: a.dataset,
        model: a.model,
        lora: a.lora,
        lora_rank: a.lora_rank,
        subjects: a.subjects,
        identifier: a.identifier,
        images_per_prompt: a.images_per_prompt,
        prompts_limit: a.prompts_limit,
        class_images_per_subject: a.class_images_per_subject,
        steps: a.steps.unwrap_or(if a.lora { 400 } else { 800 }),
        learning_rate: a.learning_rate.unwrap_or(match (a.lora, tiny) {
            (true, _) => 1e-4,
            (false, true) => 5e-5,
            (false, false) => 5e-6,
        }),
        num_class_images: a.num_class_images,
        train_text_encoder: a.train_text_encoder,
        resolution: a.resolution,
        sample_steps: a.sample_steps,
        guidance: a.guidance,
        seed: a.seed,
        out: a.out,
        vae: a.vae,
        prediction_type: a.prediction_type,
        mixed_precision: a.mixed_precision,
        device,
        redo: a.redo,
    };
    let (_rows, table) = run_paper(&opts, &enc, &command, &mut |l| println!("{l}"))?;
    println!("\n{command}\n");
    print!("{}", table_markdown(&table, &method_name(&opts)));
    if enc.lpips.is_none() {
        println!("DIV unavailable: no LPIPS weights given (--lpips FILE)");
    }
    println!(
        "\nwrote {} (per-subject reports in {}/<subject>/report/)",
        opts.out.join("paper.md").display(),
        opts.out.display()
    );
    Ok(())
}
