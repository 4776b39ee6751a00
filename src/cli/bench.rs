//! `dreambooth bench step`: time a UNet training step (forward, backward,
//! AdamW) with random weights; optionally run the PyTorch twin
//! (`tools/bench/pytorch_cpu_step.py`) with the same shapes and print the ratio.
//! `dreambooth bench sample`: images/s of generation with a model folder;
//! optionally diffusers' pipeline on the same folder
//! (`tools/bench/pytorch_cpu_sample.py`) and the ratio.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use clap::Subcommand;
use dreambooth::bench::{Arch, SampleBenchOptions, StepBenchOptions, bench_sample, bench_step};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time forward + MSE + backward + AdamW of a UNet training step.
    Step(StepArgs),
    /// The DreamBooth paper's protocol on its dataset: train, generate, score (Table 1).
    Paper(Box<super::paper::Args>),
    /// Time text-to-image generation (DDIM, guidance) with a model folder, in images/s.
    Sample(SampleArgs),
}

#[derive(clap::Args)]
pub struct SampleArgs {
    /// A diffusers folder (default: the bundled tiny model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `sd15`: Stable Diffusion 1.5's architecture (UNet, VAE, CLIP ViT-L/14
    /// text tower) with random weights at 512 px, instead of --model; `sdxl`:
    /// SDXL base's (both text encoders) at 1024 px.
    #[arg(long, conflicts_with = "model")]
    pub arch: Option<String>,
    /// With --arch: weights are drawn at random (the only mode; accepted for clarity).
    #[arg(long)]
    pub random_weights: bool,
    #[arg(long, default_value = "a photo of a ball")]
    pub prompt: String,
    /// Images in the timed run.
    #[arg(long, default_value_t = 16)]
    pub images: usize,
    /// DDIM steps per image.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Images per UNet batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Untimed batches first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N` (GPUs need a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The UNet's dtype: f32 (default), bf16 (GPU) or fp16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub pytorch: PytorchArgs,
}

#[derive(clap::Args)]
pub struct StepArgs {
    /// `sd15`, `sdxl` (SDXL base), `toy` (the bundled tiny model) or a diffusers UNet config.json.
    #[arg(long, default_value = "toy")]
    pub arch: String,
    /// `cpu`, `cuda` or `cuda:N` (GPUs need a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights are drawn at random (the only mode; accepted for clarity).
    #[arg(long)]
    pub random_weights: bool,
    /// Pixel resolution: the latent is res/4 on a side for toy (its VAE has
    /// three blocks), res/8 otherwise. Default: 64 for toy, 256 otherwise.
    #[arg(long)]
    pub res: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Train LoRA adapters only (the UNet frozen).
    #[arg(long)]
    pub lora: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA targets: attn, attn+ff, all-linear, optionally +conv.
    #[arg(long, default_value = "attn")]
    pub lora_targets: String,
    /// The whole step: also encode the batch's pixels with the VAE and its
    /// prompts with the text encoder (frozen, random weights, in the compute
    /// dtype; --arch sd15, sdxl (both text encoders) or toy), timed as `encode`.
    #[arg(long)]
    with_encoders: bool,
    /// Recompute every UNet block in the backward pass (as `train
    /// --gradient-checkpointing`); the PyTorch twin does the same.
    #[arg(long, conflicts_with = "release_block_graphs")]
    gradient_checkpointing: bool,
    /// Run every UNet block as one node that keeps its graph until its own
    /// backward has run, then frees it (no recompute): activations go as
    /// gradients come (as `train --release-block-graphs`).
    #[arg(long)]
    release_block_graphs: bool,
    /// AdamW inside the backward pass, block by block, each block's
    /// gradients dropped after its update (as `train --fused-backward-pass`;
    /// blocks released as with --release-block-graphs unless
    /// --gradient-checkpointing). Timed as backward; optimizer shows 0.
    #[arg(long)]
    fused_backward_pass: bool,
    /// The UNet's compute dtype: f32 (default), bf16 (GPU) or fp16; with
    /// bf16 / fp16 weights and AdamW state stay f32 (mixed precision).
    #[arg(long, visible_alias = "mixed-precision", default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// With --compare-pytorch: repeat the PyTorch-then-ours pair this many
    /// times and print every pair's step ratio and their median (on a
    /// shared machine single pairs scatter by ±15%). Our process keeps its
    /// peak memory between rounds: use it with models that fit twice.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    #[command(flatten)]
    pub pytorch: PytorchArgs,
}

/// The side-by-side run of a subcommand's PyTorch twin (shared by `step` and
/// `sample`).
#[derive(clap::Args)]
pub struct PytorchArgs {
    /// Also run the PyTorch twin (tools/bench/pytorch_cpu_step.py or
    /// pytorch_cpu_sample.py) with this Python (torch + diffusers installed)
    /// on the same shapes or folder and print both and the ratio.
    #[arg(long)]
    pub compare_pytorch: Option<PathBuf>,
    /// The PyTorch script (default: the twin in tools/bench/ next to the crate).
    #[arg(long)]
    pub pytorch_script: Option<PathBuf>,
    /// KEY=VALUE set in the PyTorch run's environment (repeatable), e.g.
    /// OMP_WAIT_POLICY=PASSIVE: on a loaded machine OpenMP's spin-waiting
    /// threads slow PyTorch down many times.
    #[arg(long = "pytorch-env")]
    pub pytorch_env: Vec<String>,
}

impl PytorchArgs {
    /// `--dtype`, which must be f32 when the (f32) PyTorch twin runs too.
    fn precision(&self, dtype: &str) -> anyhow::Result<dreambooth::nn::Precision> {
        let p = dreambooth::nn::Precision::parse(dtype)?;
        if p != dreambooth::nn::Precision::F32 && self.compare_pytorch.is_some() {
            bail!("--compare-pytorch runs the f32 twin only; drop --dtype {dtype} to compare");
        }
        Ok(p)
    }

    /// With `--compare-pytorch`, runs the twin (`--pytorch-script`, else
    /// `tools/bench/{default_script}`) with `args` and returns its JSON
    /// result; without it, `None`.
    fn run(
        &self,
        default_script: &str,
        args: &[String],
    ) -> anyhow::Result<Option<serde_json::Value>> {
        let Some(python) = &self.compare_pytorch else {
            return Ok(None);
        };
        let script = self.pytorch_script.clone().unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tools/bench")
                .join(default_script)
        });
        println!("load average before PyTorch: {}", load_average());
        run_pytorch(python, &script, args, &self.pytorch_env).map(Some)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Step(a) => step(a),
        BenchCommand::Paper(a) => super::paper::run(*a),
        BenchCommand::Sample(a) => sample(a),
    }
}

/// Runs a PyTorch twin script and returns its last JSON line (the other
/// lines are printed, prefixed).
fn run_pytorch(
    python: &PathBuf,
    script: &PathBuf,
    args: &[String],
    env: &[String],
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(python);
    cmd.arg(script).args(args);
    for kv in env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--pytorch-env `{kv}` is not KEY=VALUE"))?;
        println!("  [pytorch] env {k}={v}");
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!(
            "the PyTorch benchmark failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines().filter(|l| !l.starts_with('{')) {
        println!("  [pytorch] {l}");
    }
    let last = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the PyTorch benchmark printed no JSON result")?;
    Ok(serde_json::from_str(last)?)
}

fn gib(b: Option<f64>) -> String {
    b.map(|b| format!("{:.2} GiB", b / (1u64 << 30) as f64))
        .unwrap_or_else(|| "n/a".into())
}

/// The 1, 5 and 15 minute load averages (the machine is shared: quote them
/// with every figure).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

fn sample(a: SampleArgs) -> anyhow::Result<()> {
    let device = super::device::select(Some(&a.device))?;
    let random = match a.arch.as_deref().map(Arch::parse) {
        None => None,
        Some(arch @ (Arch::Sd15 | Arch::Sdxl)) => Some(arch),
        Some(other) => anyhow::bail!(
            "--arch {}: bench sample knows sd15 and sdxl (or pass --model FOLDER)",
            other.name()
        ),
    };
    if let (Some(arch), Some(_)) = (&random, &a.pytorch.compare_pytorch) {
        anyhow::bail!(
            "--arch {} has no CPU PyTorch twin (it loads a model folder): compare with ../shared/bench/peer_diffusers_step.py on a GPU",
            arch.name()
        );
    }
    let model = match a.model {
        Some(p) => p,
        None => dreambooth::models::sd::default_model_dir()?,
    };
    let opts = SampleBenchOptions {
        model: model.clone(),
        random,
        prompt: a.prompt.clone(),
        images: a.images,
        steps: a.steps,
        batch: a.batch,
        guidance: a.guidance,
        warmup: a.warmup,
        seed: a.seed,
        precision: a.pytorch.precision(&a.dtype)?,
    };
    println!("load average before: {}", load_average());
    let r = bench_sample(&opts, &device, &mut |l| println!("{l}"))?;
    println!(
        "ours    {} images in {:.3}s: {:.3} images/s  (load {:.2}s, peak RSS {})",
        r.images,
        r.seconds,
        r.images_per_second(),
        r.load_seconds,
        gib(r.peak_rss.map(|b| b as f64))
    );
    if let Some(v) = a.pytorch.run(
        "pytorch_cpu_sample.py",
        &[
            "--model".into(),
            model.display().to_string(),
            "--prompt".into(),
            a.prompt.clone(),
            "--images".into(),
            a.images.to_string(),
            "--steps".into(),
            a.steps.to_string(),
            "--batch".into(),
            a.batch.to_string(),
            "--guidance".into(),
            a.guidance.to_string(),
            "--warmup".into(),
            a.warmup.to_string(),
            "--seed".into(),
            a.seed.to_string(),
            "--threads".into(),
            r.threads.to_string(),
        ],
    )? {
        let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
        let ips = r.images as f64 / secs;
        println!(
            "pytorch {} images in {secs:.3}s: {ips:.3} images/s  (load {:.2}s, peak RSS {})  (torch {}, diffusers {}, {} threads)",
            r.images,
            v["load_seconds"].as_f64().unwrap_or(f64::NAN),
            gib(v["peak_rss"].as_f64()),
            v["torch"].as_str().unwrap_or("?"),
            v["diffusers"].as_str().unwrap_or("?"),
            v["threads"]
        );
        println!(
            "ratio ours/pytorch: images/s {:.2}  (time {:.2})",
            r.images_per_second() / ips,
            r.seconds / secs
        );
    }
    println!("load average after: {}", load_average());
    Ok(())
}

fn step(a: StepArgs) -> anyhow::Result<()> {
    let device = super::device::select(Some(&a.device))?;
    let arch = Arch::parse(&a.arch);
    let res = a
        .res
        .unwrap_or(if matches!(arch, Arch::Toy) { 64 } else { 256 });
    let opts = StepBenchOptions {
        arch: arch.clone(),
        res,
        batch: a.batch,
        warmup: a.warmup,
        steps: a.steps,
        seed: a.seed,
        lora: if a.lora {
            Some(dreambooth::models::lora::LoraSpec {
                rank: a.rank,
                alpha: a.rank as f64,
                targets: a.lora_targets.parse()?,
                seed: a.seed,
                ..Default::default()
            })
        } else {
            None
        },
        precision: a.pytorch.precision(&a.dtype)?,
        with_encoders: a.with_encoders,
        checkpointing: if a.gradient_checkpointing {
            Some(dreambooth::nn::checkpoint::Mode::Recompute)
        } else if a.release_block_graphs || a.fused_backward_pass {
            Some(dreambooth::nn::checkpoint::Mode::Release)
        } else {
            None
        },
        fused_backward_pass: a.fused_backward_pass,
    };
    if a.rounds == 0 {
        anyhow::bail!("--rounds must be at least 1");
    }
    if opts.with_encoders && a.pytorch.compare_pytorch.is_some() {
        anyhow::bail!(
            "--with-encoders has no CPU PyTorch twin: compare the whole step with ../shared/bench/peer_diffusers_step.py on a GPU"
        );
    }
    let mut ratios: Vec<f64> = Vec::new();
    for round in 0..a.rounds {
        if a.rounds > 1 {
            println!("round {}/{}", round + 1, a.rounds);
        }
        if let Some(r) = step_round(&a, &opts, &device)? {
            ratios.push(r);
        }
    }
    if ratios.len() > 1 {
        let line: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "step ratio ours/pytorch over {} rounds: {}  median {:.2}",
            ratios.len(),
            line.join(" "),
            dreambooth::bench::median(ratios)
        );
    }
    Ok(())
}

/// One round of `bench step`: the PyTorch twin (with --compare-pytorch),
/// then ours; returns the step-time ratio ours / PyTorch when both ran.
fn step_round(
    a: &StepArgs,
    opts: &StepBenchOptions,
    device: &candle_core::Device,
) -> anyhow::Result<Option<f64>> {
    let (arch, res) = (&opts.arch, opts.res);
    // The PyTorch twin runs first: our process keeps its peak memory after
    // the benchmark (mimalloc's purging is off), and two full SD 1.5
    // fine-tuning processes do not fit side by side in memory.
    let pytorch = a.pytorch.run(
        "pytorch_cpu_step.py",
        &[
            "--arch".into(),
            arch.name(),
            "--latent".into(),
            (res / arch.vae_factor()).to_string(),
            "--batch".into(),
            a.batch.to_string(),
            "--warmup".into(),
            a.warmup.to_string(),
            "--steps".into(),
            a.steps.to_string(),
            "--threads".into(),
            dreambooth::nn::cpu::num_threads().to_string(),
        ]
        .into_iter()
        .chain(
            a.gradient_checkpointing
                .then(|| "--gradient-checkpointing".to_string()),
        )
        .collect::<Vec<_>>(),
    )?;
    println!("load average before ours: {}", load_average());
    let r = bench_step(opts, device, &mut |l| println!("{l}"))?;
    let m = &r.median;
    let rss = gib(r.peak_rss.map(|b| b as f64));
    if opts.with_encoders {
        println!(
            "ours    median encode (VAE + text encoder) {:.3}s, whole step {:.3}s",
            m.encode,
            m.total()
        );
    }
    println!(
        "ours    median of {}: forward {:.3}s  backward {:.3}s  optimizer {:.3}s  step {:.3}s  peak RSS {rss}  CPU/step {:.3}s",
        r.steps.len(),
        m.forward,
        m.backward,
        m.optimizer,
        m.total(),
        m.cpu
    );
    if let Some(g) = r.gpu_memory {
        let base = r.gpu_baseline.unwrap_or(0);
        println!(
            "ours    {:.2} it/s, peak GPU memory in use (driver total − free, polled every 1 ms) {}, {} above the {} in use before the model",
            1.0 / m.total(),
            gib(Some(g as f64)),
            gib(Some(g.saturating_sub(base) as f64)),
            gib(Some(base as f64))
        );
    }

    if let Some(v) = pytorch {
        let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let (pf, pb, po) = (get("forward"), get("backward"), get("optimizer"));
        let pt = pf + pb + po;
        let pc = get("cpu");
        let prss = gib(v["peak_rss"].as_f64());
        println!(
            "pytorch median of {}: forward {pf:.3}s  backward {pb:.3}s  optimizer {po:.3}s  step {pt:.3}s  peak RSS {prss}  CPU/step {pc:.3}s  (torch {}, {} threads)",
            a.steps,
            v["torch"].as_str().unwrap_or("?"),
            v["threads"]
        );
        let rss_ratio = match (r.peak_rss, v["peak_rss"].as_f64()) {
            (Some(o), Some(p)) => format!("{:.2}", o as f64 / p),
            _ => "n/a".into(),
        };
        println!(
            "ratio ours/pytorch: forward {:.2}  backward {:.2}  optimizer {:.2}  step {:.2}  peak RSS {rss_ratio}  CPU/step {:.2}",
            m.forward / pf,
            m.backward / pb,
            m.optimizer / po,
            m.total() / pt,
            m.cpu / pc
        );
        println!("load average after: {}", load_average());
        return Ok(Some(m.total() / pt));
    }
    println!("load average after: {}", load_average());
    Ok(None)
}
