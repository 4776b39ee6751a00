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
    Eval(eval::EvalArgs),
    OracleCheck(eval::OracleCheckArgs),
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        ToyCommand::Eval(a) => eval::run_eval(a),
        ToyCommand::OracleCheck(a) => eval::run_oracle_check(a),
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
                ..Default::default()
            };
            let t0 = std::time::Instant::now();
            pretrain(&opts, &mut |line| println!("{line}"))?;
            println!("pretraining took {:.1} min", t0.elapsed().as_secs_f64() / 60.0);
            Ok(())
        }
    }
}
