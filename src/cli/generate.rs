//! `dreambooth generate`: text-to-image with a Stable Diffusion model.
//!
//! Writes `OUT/00000.png`, `OUT/00001.png`, ... (each with its generation
//! parameters in PNG text chunks) and `OUT/grid.png`; a folder that already
//! holds numbered images gets the next numbers (and `grid-NNNNN.png`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use dreambooth::diffusion::SamplerKind;
use dreambooth::diffusion::pipeline::{GenerateOptions, generate};
use dreambooth::image_io;
use dreambooth::models::{FrozenDTypes, StableDiffusion};

/// Where the bundled tiny model lives, relative to the crate, the binary or the
/// working directory.

#[derive(clap::Args)]
pub struct Args {
    /// A diffusers model folder or a single-file .safetensors or .ckpt checkpoint
    /// (default: the bundled tiny model, assets/tiny-model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub prediction: super::PredictionArg,
    /// A VAE in place of the model's: a diffusers VAE folder, or a file
    /// (original layout or diffusers names, e.g. vae-ft-mse-840000-ema-pruned.safetensors).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// What to draw (cut to 77 CLIP tokens, with a warning naming the dropped words).
    #[arg(
        long,
        required_unless_present = "prompt_file",
        conflicts_with = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Several prompts: a text file with one per line (blank lines and lines
    /// starting with `#` are skipped); -n images of each, in file order.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// What to steer away from (used when --guidance > 1).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Number of images per prompt (default 4, or the batch of --latents).
    #[arg(short = 'n', long = "num-images")]
    pub num_images: Option<usize>,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// ddim, euler, euler-a or dpm++.
    #[arg(long, default_value = "dpm++")]
    pub sampler: String,
    /// Classifier-free guidance scale (≤ 1: no negative-prompt pass).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// DDIM's noise weight (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Image i uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Pixels (default: the model's native size, UNet sample_size × VAE factor).
    #[arg(long)]
    pub width: Option<usize>,
    /// Pixels (default: as width).
    #[arg(long)]
    pub height: Option<usize>,
    /// Initial latents: a .safetensors file with a tensor `latents` (N, 4, H/8, W/8)
    /// (with --init-image: the noise added to the image's latents).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Image-to-image: start from this picture (PNG, JPEG, WebP, TIFF) instead
    /// of noise. Its size is the output size (--width/--height resize it),
    /// rounded down to what the model takes.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// With --init-image: how much to change it, in (0, 1] (the share of
    /// --steps that run; 1 keeps only its size and layout's faint trace).
    #[arg(long, default_value_t = 0.8)]
    pub strength: f64,
    /// 0: the text encoder's last layer; 1: the penultimate; ...
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// Images per UNet batch (default: all, at most 4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// A LoRA file (peft/diffusers or kohya .safetensors) to apply; repeatable.
    #[arg(long = "lora")]
    pub lora: Vec<PathBuf>,
    /// Strength of the LoRA(s): one value for all, or one per --lora (default 1).
    #[arg(long = "lora-scale")]
    pub lora_scale: Vec<f64>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// auto (a GPU in a `cuda` build, else the CPU), cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// The UNet's dtype: f32 (default), bf16 (GPU) or fp16; latents, guidance
    /// and the sampler stay f32. Without --lora the UNet is read straight into
    /// it (a half-precision UNet is never held in f32 too: half the memory).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Cheap checks first: a typo should not wait for the model to load.
    let sampler: SamplerKind = args.sampler.parse()?;
    let precision = dreambooth::nn::Precision::parse(&args.dtype)?;
    let loras = dreambooth::models::lora::pair_scales(&args.lora, &args.lora_scale)?;
    let prompts = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => read_prompt_file(f)?,
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    // The first sampler step that runs (image-to-image starts part-way).
    let first_step = match &args.init_image {
        Some(_) => dreambooth::diffusion::pipeline::first_step(args.steps, args.strength)?,
        None => 0,
    };
    // Read (and its errors shown) before the model loads.
    let init_rgb = match &args.init_image {
        Some(p) => Some(dreambooth::dreambooth::data::load_image(p)?),
        None => None,
    };
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => find_tiny_model()?,
    };
    let device = super::device::select(args.device.as_deref())?;
    precision.check_device(&device)?;
    let mut load = args.prediction.load_options()?;
    if loras.is_empty() {
        // The UNet read straight into its sampling dtype: a half-precision
        // UNet is never held in f32 as well. LoRA files are folded into f32
        // weights first, and the UNet converted after.
        load.dtypes = FrozenDTypes::unet_only(precision.dtype());
    }
    // Library errors name the file at fault; no extra context needed.
    let mut model = StableDiffusion::load(&model_path, &device, load)?;
    if let Some(vae) = &args.vae {
        model.set_vae(vae)?;
    }
    // Folded into the weights: no per-step cost, and several files stack.
    for (path, scale) in &loras {
        let f = dreambooth::models::lora::merge_file(&mut model, path, *scale)?;
        eprintln!("{}", dreambooth::models::lora::describe(&f, *scale));
    }
    // A no-op when the UNet was read in that dtype.
    model.set_unet_precision(precision)?;

    let latents = match &args.latents {
        Some(p) => Some(read_latents(p, &device)?),
        None => None,
    };
    let k = prompts.len();
    let per_prompt = match (&latents, args.num_images) {
        (Some(l), Some(n)) if l.dim(0)? != n * k => bail!(
            "{}: latents hold {} images but {k} prompt(s) × -n {n} = {} were asked for",
            args.latents.as_ref().unwrap().display(),
            l.dim(0)?,
            n * k
        ),
        (Some(l), None) if l.dim(0)? % k != 0 => bail!(
            "{}: latents hold {} images, not a multiple of the {k} prompts",
            args.latents.as_ref().unwrap().display(),
            l.dim(0)?
        ),
        (Some(l), _) => l.dim(0)? / k,
        (None, Some(n)) => n,
        (None, None) => 4,
    };
    if per_prompt == 0 {
        bail!("-n must be at least 1");
    }
    let prompts: Vec<String> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), per_prompt))
        .collect();
    let n = prompts.len();
    let init = match (&args.init_image, init_rgb) {
        (Some(path), Some(rgb)) => {
            let (w, h) = init_size(&model, &rgb, args.width, args.height);
            let rgb = if (w, h) == (rgb.width() as usize, rgb.height() as usize) {
                rgb
            } else {
                eprintln!(
                    "{}: {}×{} resized to {w}×{h}",
                    path.display(),
                    rgb.width(),
                    rgb.height()
                );
                image::imageops::resize(
                    &rgb,
                    w as u32,
                    h as u32,
                    image::imageops::FilterType::Lanczos3,
                )
            };
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            );
            Some(dreambooth::diffusion::pipeline::InitImage::from_rgb(
                &rgb,
                args.strength,
                name,
            )?)
        }
        _ => None,
    };
    let opts = GenerateOptions {
        prompts,
        negative_prompt: args.negative_prompt.clone(),
        guidance_scale: args.guidance,
        steps: args.steps,
        sampler,
        eta: args.eta,
        seed: args.seed,
        batch_size: args.batch_size.unwrap_or(n.min(4)),
        // With an initial image, its (resized) size.
        width: args.width.filter(|_| init.is_none()),
        height: args.height.filter(|_| init.is_none()),
        clip_skip: args.clip_skip,
        latents,
        init,
    };
    // Size errors before the output folder is made.
    dreambooth::diffusion::pipeline::image_size(&model, &opts)?;

    let batches = n.div_ceil(opts.batch_size);
    let bar = ProgressBar::new((batches * (args.steps - first_step)) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let result = generate(&model, &opts, &mut |p| {
        bar.set_position((p.batch * p.steps + p.step) as u64);
        bar.set_message(format!("images {}/{}", p.images_done, p.images));
    });
    bar.finish_and_clear();
    let result = result?;
    for w in &result.warnings {
        eprintln!("warning: {w}");
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    // Numbered on from what the folder already holds: a second run into the
    // same folder adds its images instead of writing over the first's.
    let first_index = next_index(&args.out)?;
    for (i, g) in result.images.iter().enumerate() {
        let path = args.out.join(format!("{:05}.png", first_index + i));
        image_io::save_generated(&path, &g.image, &g.info)?;
    }
    let imgs: Vec<_> = result.images.iter().map(|g| g.image.clone()).collect();
    let grid = image_io::grid(&imgs, None)?;
    let first = &result.images[0].info;
    let mut text = first.to_text();
    text.retain(|(k, _)| k != "seed");
    text.push((
        "seed".into(),
        format!("{}..{}", args.seed, args.seed.wrapping_add(n as u64 - 1)),
    ));
    let grid_name = if first_index == 0 {
        "grid.png".to_string()
    } else {
        format!("grid-{first_index:05}.png")
    };
    image_io::save_png(&args.out.join(&grid_name), &grid, &text)?;
    println!(
        "wrote {n} image(s) of {}×{} to {} ({:05}.png to {:05}.png, and {grid_name})",
        first.width,
        first.height,
        args.out.display(),
        first_index,
        first_index + n - 1
    );
    Ok(())
}

/// One past the highest `NNNNN.png` in `dir` (0 when there is none).
fn next_index(dir: &Path) -> anyhow::Result<usize> {
    let mut next = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".png")
            && stem.len() >= 5
            && stem.bytes().all(|b| b.is_ascii_digit())
            && let Ok(i) = stem.parse::<usize>()
        {
            next = next.max(i + 1);
        }
    }
    Ok(next)
}

/// The image-to-image output size: --width / --height (one given: the other
/// keeps the picture's aspect ratio), else the picture's; rounded down to a
/// multiple of what the model takes (at least one multiple).
fn init_size(
    model: &StableDiffusion,
    rgb: &image::RgbImage,
    width: Option<usize>,
    height: Option<usize>,
) -> (usize, usize) {
    let (iw, ih) = (rgb.width() as f64, rgb.height() as f64);
    let (w, h) = match (width, height) {
        (Some(w), Some(h)) => (w, h),
        (Some(w), None) => (w, (w as f64 * ih / iw).round() as usize),
        (None, Some(h)) => ((h as f64 * iw / ih).round() as usize, h),
        (None, None) => (iw as usize, ih as usize),
    };
    let m = model.size_multiple();
    let down = |v: usize| (v / m).max(1) * m;
    (down(w), down(h))
}

/// The prompts of a `--prompt-file`: one per line, trimmed; blank lines and
/// `#` comments skipped.
fn read_prompt_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the prompt file {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        bail!(
            "{}: no prompts (one per line; blank lines and lines starting with # are skipped)",
            path.display()
        );
    }
    Ok(prompts)
}

/// The tensor `latents` of a safetensors file.
fn read_latents(path: &Path, device: &Device) -> anyhow::Result<candle_core::Tensor> {
    let mut tensors = dreambooth::nn::read_safetensors(path, device)?;
    match tensors.remove("latents") {
        Some(t) => Ok(t),
        None => {
            let mut names: Vec<_> = tensors.keys().cloned().collect();
            names.sort();
            bail!(
                "{}: no tensor named `latents` (found: {})",
                path.display(),
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            )
        }
    }
}

/// The bundled tiny model (see [`dreambooth::models::sd::default_model_dir`]).
fn find_tiny_model() -> anyhow::Result<PathBuf> {
    Ok(dreambooth::models::sd::default_model_dir()?)
}
