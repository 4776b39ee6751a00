//! `dreambooth toy eval` and `dreambooth toy oracle-check`: the oracle's
//! measures of a model on the toy world, and of the oracle itself.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use dreambooth::diffusion::SamplerKind;
use dreambooth::models::{LoadOptions, StableDiffusion};
use dreambooth::toy::metrics::{
    SampleSettings, oracle_accuracy, oracle_accuracy_degraded, oracle_subject_check,
    prompt_fidelity, vae_ceiling, world_prompts,
};

/// Where the bundled tiny model lives, relative to the crate, the binary or the
/// working directory.
const TINY_MODEL: &str = "assets/tiny-model";

#[derive(clap::Args)]
#[command(about = "Prompt fidelity of a model on the toy world, measured by the oracle")]
pub struct EvalArgs {
    /// A diffusers folder (default: the bundled tiny model, assets/tiny-model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Number of world prompts (a seeded sample of full and partial captions).
    #[arg(long, default_value_t = 60)]
    pub prompts: usize,
    /// Every combination of context, class and colour (and the partial
    /// captions) instead of a sample.
    #[arg(long)]
    pub all_prompts: bool,
    #[arg(long, default_value_t = SampleSettings::default().images_per_prompt)]
    pub images_per_prompt: usize,
    /// Seed of the prompt sample and of the images (image i: seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = SampleSettings::default().steps)]
    pub steps: usize,
    #[arg(long, default_value_t = SampleSettings::default().guidance)]
    pub guidance: f64,
    /// ddim, euler, euler-a or dpm++.
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    #[arg(long, default_value_t = SampleSettings::default().batch_size)]
    pub batch_size: usize,
    /// Also score this many real scenes passed through the model's VAE (the
    /// ceiling a generator with this decoder can reach); 0: skip.
    #[arg(long, default_value_t = 64)]
    pub ceiling: usize,
    /// Prompts shown in grid.png.
    #[arg(long, default_value_t = 16)]
    pub grid_prompts: usize,
    /// Output folder: prompt_fidelity.json, grid.png (and ceiling.png).
    #[arg(long, default_value = "toy-eval")]
    pub out: PathBuf,
}

#[derive(clap::Args)]
#[command(about = "The oracle's accuracy on freshly rendered scenes and subjects")]
pub struct OracleCheckArgs {
    /// Number of scenes.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let sampler: SamplerKind = a.sampler.parse()?;
    if a.images_per_prompt == 0 {
        bail!("--images-per-prompt must be at least 1");
    }
    let model_path = match &a.model {
        Some(p) => p.clone(),
        None => find_tiny_model()?,
    };
    let device = Device::cuda_if_available(0)?;
    crate::cli::device::preflight(&device);
    let model = StableDiffusion::load(&model_path, &device, LoadOptions::default())?;
    let prompts = world_prompts((!a.all_prompts).then_some(a.prompts), a.seed);
    if prompts.is_empty() {
        bail!("no prompts: --prompts must be at least 1");
    }
    let settings = SampleSettings {
        images_per_prompt: a.images_per_prompt,
        seed: a.seed,
        sampler,
        steps: a.steps,
        guidance: a.guidance,
        batch_size: a.batch_size,
    };

    let batches = (prompts.len() * a.images_per_prompt).div_ceil(a.batch_size.max(1));
    let bar = ProgressBar::new((batches * a.steps) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    let t0 = Instant::now();
    let result = prompt_fidelity(&model, &prompts, &settings, &mut |p| {
        bar.set_position((p.batch * p.steps + p.step) as u64)
    });
    bar.finish_and_clear();
    let result = result?;
    let seconds = t0.elapsed().as_secs_f64();

    println!(
        "prompt fidelity of {} — {} prompts × {} images, {} {} steps, guidance {} ({:.1} s)",
        model_path.display(),
        result.prompts,
        a.images_per_prompt,
        sampler,
        a.steps,
        a.guidance,
        seconds
    );
    print!("{}", result.table());
    print!("{}", result.confusion_summary(4));
    let ceiling = if a.ceiling > 0 {
        let c = vae_ceiling(&model, a.ceiling, a.seed)?;
        println!(
            "ceiling (oracle on {} real scenes through the VAE): {}",
            c.images,
            c.summary()
        );
        Some(c)
    } else {
        None
    };

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let json = serde_json::json!({
        "model": model_path.display().to_string(),
        "settings": settings,
        "prompt_sample": if a.all_prompts { serde_json::Value::Null } else { a.prompts.into() },
        "seconds": seconds,
        "result": result,
        "vae_ceiling": ceiling.as_ref().map(|c| serde_json::json!({
            "images": c.images,
            "context": c.context,
            "class": c.class,
            "color": c.color,
            "all": c.all,
        })),
    });
    let json_path = a.out.join("prompt_fidelity.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    if let Some(c) = &ceiling {
        let path = a.out.join("ceiling.png");
        c.grid(a.grid_prompts, 2)
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let grid_path = a.out.join("grid.png");
    result
        .grid(a.grid_prompts, 2)
        .save(&grid_path)
        .with_context(|| format!("writing {}", grid_path.display()))?;
    println!("wrote {} and {}", json_path.display(), grid_path.display());
    Ok(())
}

pub fn run_oracle_check(a: OracleCheckArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let acc = oracle_accuracy(a.n, a.seed);
    println!(
        "oracle accuracy on {} fresh scenes (seed {}, {:.1} s):",
        acc.images,
        a.seed,
        t0.elapsed().as_secs_f64()
    );
    print!("{}", acc.table());
    print!("{}", acc.confusion_summary(4));
    for (blur, noise, shift) in [(0.7, 4.0, 10.0), (1.2, 8.0, 20.0)] {
        let d = oracle_accuracy_degraded(a.n, a.seed, blur, noise, shift);
        println!(
            "degraded (blur σ {blur} px, noise σ {noise}, colour shift ±{shift}): {}",
            d.summary()
        );
    }
    let per = (a.n / 4).clamp(8, 100);
    println!("\nsubjects ({per} photos and {per} plain objects of the class each):");
    println!(
        "{:<12}{:>16}{:>16}{:>16}{:>16}",
        "subject", "fidelity photo", "fidelity plain", "likeness photo", "likeness plain"
    );
    for c in oracle_subject_check(per, a.seed) {
        println!(
            "{:<12}{:>16.3}{:>16.3}{:>16.3}{:>16.3}",
            c.subject, c.photo_fidelity, c.plain_fidelity, c.photo_likeness, c.plain_likeness
        );
    }
    Ok(())
}

/// The bundled tiny model: next to the sources this binary was built from,
/// next to the binary, or under the working directory.
fn find_tiny_model() -> anyhow::Result<PathBuf> {
    let mut candidates = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(TINY_MODEL)];
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(TINY_MODEL));
        candidates.push(dir.join("tiny-model"));
    }
    candidates.push(PathBuf::from(TINY_MODEL));
    if let Some(p) = candidates
        .iter()
        .find(|p| p.join("model_index.json").is_file())
    {
        return Ok(p.clone());
    }
    bail!(
        "no --model given and the bundled tiny model was not found (looked in {}); \
         pass --model PATH",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}
