//! `dreambooth toy …`: the procedural world and the bundled tiny model.

use std::path::PathBuf;

use clap::Subcommand;
use dreambooth::toy::pretrain::{PretrainOptions, pretrain};

mod eval;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ToyCommand,
}

#[derive(Subcommand)]
pub enum ToyCommand {
    /// Train the tiny text-to-image model from scratch on the procedural world.
    Pretrain(PretrainArgs),
    /// Generate prompts of the world and measure context/class/colour accuracy with the oracle.
    Eval(eval::EvalArgs),
    /// The oracle's own accuracy on freshly rendered scenes.
    OracleCheck(eval::OracleCheckArgs),
    /// Train each toy subject with/without prior preservation and without the
    /// class noun; print the paper-style table.
    Ablation(AblationArgs),
}

#[derive(clap::Args)]
pub struct AblationArgs {
    /// Base model (default: the bundled tiny model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Comma-separated subjects (default: all).
    #[arg(long)]
    pub subjects: Option<String>,
    #[arg(long, default_value_t = dreambooth::toy::demo::DemoOptions::default().steps)]
    pub steps: u64,
    #[arg(long, default_value_t = dreambooth::toy::demo::DemoOptions::default().learning_rate)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = dreambooth::toy::demo::DemoOptions::default().num_class_images)]
    pub num_class_images: usize,
    #[arg(long, default_value_t = 8)]
    pub images_per_prompt: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the text encoder frozen (by default it trains, as in the demo).
    #[arg(long)]
    pub freeze_text_encoder: bool,
    #[arg(long, default_value_t = dreambooth::toy::demo::DemoOptions::default().text_encoder_lr.unwrap_or(1e-4))]
    pub text_encoder_lr: f64,
    /// Working folder (photos, class images, runs).
    #[arg(long, default_value = "ablation-out")]
    pub out: PathBuf,
}

fn run_ablation(a: AblationArgs) -> anyhow::Result<()> {
    use dreambooth::toy::{ablation, demo, world::Subject};
    let subjects: Vec<Subject> = match &a.subjects {
        Some(list) => list
            .split(',')
            .map(|s| demo::parse_subject(s.trim()))
            .collect::<Result<_, _>>()?,
        None => Subject::ALL.to_vec(),
    };
    let opts = demo::DemoOptions {
        steps: a.steps,
        learning_rate: a.learning_rate,
        num_class_images: a.num_class_images,
        images_per_prompt: a.images_per_prompt,
        seed: a.seed,
        train_text_encoder: !a.freeze_text_encoder,
        text_encoder_lr: Some(a.text_encoder_lr),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let rows = ablation::run_ablation(a.model, &subjects, &opts, &a.out, &mut |l| println!("{l}"))?;
    let table = ablation::markdown(&rows);
    println!("\n{table}");
    let json = serde_json::to_string_pretty(&rows)?;
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("ablation.md"), &table)?;
    std::fs::write(a.out.join("ablation.json"), json)?;
    println!(
        "({:.1} min; table in {})",
        t0.elapsed().as_secs_f64() / 60.0,
        a.out.join("ablation.md").display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PretrainArgs {
    /// Output diffusers folder.
    #[arg(long, default_value = "tiny-model")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = PretrainOptions::default().vae_steps)]
    pub vae_steps: usize,
    #[arg(long, default_value_t = PretrainOptions::default().unet_steps)]
    pub unet_steps: usize,
    #[arg(long, default_value_t = PretrainOptions::default().num_scenes)]
    pub num_scenes: usize,
    #[arg(long, default_value_t = PretrainOptions::default().batch)]
    pub batch: usize,
    #[arg(long, default_value_t = PretrainOptions::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = PretrainOptions::default().log_every)]
    pub log_every: usize,
    /// Wall-clock budget of the VAE stage, minutes.
    #[arg(long, default_value_t = PretrainOptions::default().vae_minutes)]
    pub vae_minutes: f64,
    /// Wall-clock budget of the UNet + text-encoder stage, minutes.
    #[arg(long, default_value_t = PretrainOptions::default().unet_minutes)]
    pub unet_minutes: f64,
    /// Continue training a model this command wrote (keeps its VAE).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        ToyCommand::Eval(a) => eval::run_eval(a),
        ToyCommand::OracleCheck(a) => eval::run_oracle_check(a),
        ToyCommand::Ablation(a) => run_ablation(a),
        ToyCommand::Pretrain(a) => {
            let opts = PretrainOptions {
                out: a.out,
                seed: a.seed,
                vae_steps: a.vae_steps,
                unet_steps: a.unet_steps,
                num_scenes: a.num_scenes,
                batch: a.batch,
                lr: a.lr,
                log_every: a.log_every,
                vae_minutes: a.vae_minutes,
                unet_minutes: a.unet_minutes,
                init_from: a.init_from,
                ..Default::default()
            };
            let t0 = std::time::Instant::now();
            pretrain(&opts, &mut |line| println!("{line}"))?;
            println!(
                "pretraining took {:.1} min",
                t0.elapsed().as_secs_f64() / 60.0
            );
            Ok(())
        }
    }
}
