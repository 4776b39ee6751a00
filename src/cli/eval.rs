//! `dreambooth eval`: the paper's metrics for a folder of generations.

use std::path::PathBuf;

use dreambooth::eval::report::{ReportImages, write_report};
use dreambooth::eval::run::{Encoders, EvalInputs, evaluate, read_generated, read_images};

#[derive(clap::Args)]
pub struct Args {
    /// The real photos of the subject.
    #[arg(long)]
    pub real: PathBuf,
    /// Generated images of the subject (PNGs from `dreambooth generate` carry
    /// their prompt; otherwise pass --prompts).
    #[arg(long)]
    pub generated: PathBuf,
    /// Prompts of the generated images: `FILE<TAB>PROMPT` lines, or one prompt
    /// per line in sorted file order.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Generations of the bare class prompt (e.g. "a dog") after training: PRES.
    #[arg(long)]
    pub class_generated: Option<PathBuf>,
    /// Prompts of the class-prompt generations (same formats as --prompts).
    #[arg(long)]
    pub class_prompts: Option<PathBuf>,
    /// The rare-token identifier, removed from prompts before CLIP-T.
    #[arg(long, default_value = "sks")]
    pub identifier: String,
    #[command(flatten)]
    pub encoders: super::EncoderArgs,
    /// Output folder: metrics.json, metrics.md, index.html.
    #[arg(long, default_value = "eval-report")]
    pub out: PathBuf,
    /// Where the encoders run: auto (a GPU when the binary has the `cuda`
    /// feature and one opens), cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = super::device::select(a.device.as_deref())?;
    let command = super::command_line();
    let real = read_images(&a.real)?;
    let generated = read_generated(&a.generated, a.prompts.as_deref())?;
    let class_generated = match &a.class_generated {
        Some(d) => read_generated_or_unlabeled(d, a.class_prompts.as_deref())?,
        None => Vec::new(),
    };
    let enc = Encoders::load(&a.encoders.paths(), &device)?;
    println!(
        "evaluating {} generated images against {} real ones{}",
        generated.len(),
        real.len(),
        if class_generated.is_empty() {
            String::new()
        } else {
            format!(" ({} class-prompt generations)", class_generated.len())
        }
    );
    let result = evaluate(
        &enc,
        &EvalInputs {
            real_dir: &a.real,
            real: &real,
            generated_dir: &a.generated,
            generated: &generated,
            class_dir: a.class_generated.as_deref(),
            class_generated: &class_generated,
            identifier: &a.identifier,
        },
    )?;
    let files = write_report(
        &a.out,
        &result,
        &ReportImages {
            real: &real,
            generated: &generated,
            class_generated: &class_generated,
        },
        &command,
    )?;
    print!("{}", dreambooth::eval::report::headline_markdown(&result));
    if let Some(n) = &result.div_note {
        println!("{n}");
    }
    println!(
        "report: {} (also {} and {})",
        files.html.display(),
        files.markdown.display(),
        files.json.display()
    );
    Ok(())
}

/// Class-prompt generations: prompts are optional (they only group DIV).
fn read_generated_or_unlabeled(
    dir: &std::path::Path,
    prompts: Option<&std::path::Path>,
) -> anyhow::Result<Vec<dreambooth::eval::run::LabeledImage>> {
    match read_generated(dir, prompts) {
        Ok(v) => Ok(v),
        Err(_) if prompts.is_none() => Ok(read_images(dir)?),
        Err(e) => Err(e.into()),
    }
}
