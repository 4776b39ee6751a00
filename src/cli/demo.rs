//! `dreambooth demo`: DreamBooth end to end on the bundled tiny model, with a report.

use std::path::PathBuf;

use dreambooth::toy::demo::{DemoOptions, parse_subject, run_demo, summary};

#[derive(clap::Args)]
pub struct Args {
    /// Output folder (photos, class images, trained model, report.html).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Base model (default: the bundled tiny model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Toy subject: spot_ball, stripe_box, dot_star, buoy_ring.
    #[arg(long, default_value = "spot_ball")]
    pub subject: String,
    #[arg(long, default_value = "sks")]
    pub identifier: String,
    #[arg(long, default_value_t = DemoOptions::default().steps)]
    pub steps: u64,
    #[arg(long, default_value_t = DemoOptions::default().learning_rate)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = DemoOptions::default().num_class_images)]
    pub num_class_images: usize,
    /// Train without the prior-preservation loss (to see language drift).
    #[arg(long)]
    pub no_prior_preservation: bool,
    #[arg(long, default_value_t = DemoOptions::default().images_per_prompt)]
    pub images_per_prompt: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the text encoder frozen (by default it trains too, which lets the
    /// identifier's embedding move away from its untrained neighbours).
    #[arg(long)]
    pub freeze_text_encoder: bool,
    /// The text encoder's learning rate.
    #[arg(long, default_value_t = DemoOptions::default().text_encoder_lr.unwrap_or(1e-4))]
    pub text_encoder_lr: f64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = DemoOptions {
        out: a.out,
        model: a.model,
        subject: parse_subject(&a.subject)?,
        identifier: a.identifier,
        steps: a.steps,
        learning_rate: a.learning_rate,
        num_class_images: a.num_class_images,
        prior_preservation: !a.no_prior_preservation,
        images_per_prompt: a.images_per_prompt,
        seed: a.seed,
        train_text_encoder: !a.freeze_text_encoder,
        text_encoder_lr: Some(a.text_encoder_lr),
        ..Default::default()
    };
    let r = run_demo(&opts, &mut |line| println!("{line}"))?;
    println!("\n{:<45} {:>7} {:>7}", "metric", "before", "after");
    for (name, b, a) in summary(&r.results) {
        println!("{name:<45} {b:>7.2} {a:>7.2}");
    }
    println!(
        "\nreport: {} ({:.0}s in all)",
        std::fs::canonicalize(&r.report)
            .unwrap_or(r.report.clone())
            .display(),
        r.seconds
    );
    Ok(())
}
