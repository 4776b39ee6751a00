//! `dreambooth bench step`: time a UNet training step (forward, backward,
//! AdamW) with random weights; optionally run the PyTorch twin
//! (`tools/bench/pytorch_cpu_step.py`) with the same shapes and print the ratio.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use clap::Subcommand;
use dreambooth::bench::{Arch, StepBenchOptions, bench_step};

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
}

#[derive(clap::Args)]
pub struct StepArgs {
    /// `sd15`, `toy` (the bundled tiny model) or a diffusers UNet config.json.
    #[arg(long, default_value = "toy")]
    pub arch: String,
    /// `cpu` (the only device this command supports so far) or `cuda`.
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
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also run tools/bench/pytorch_cpu_step.py with this Python (torch +
    /// diffusers installed) and print both and the ratio.
    #[arg(long)]
    pub compare_pytorch: Option<PathBuf>,
    /// The PyTorch script (default: tools/bench/pytorch_cpu_step.py next to the crate).
    #[arg(long)]
    pub pytorch_script: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Step(a) => step(a),
        BenchCommand::Paper(a) => super::paper::run(*a),
    }
}

fn step(a: StepArgs) -> anyhow::Result<()> {
    let device = match a.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0).context("--device cuda")?,
        d => bail!("unknown --device `{d}` (cpu or cuda)"),
    };
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
    };
    let r = bench_step(&opts, &device, &mut |l| println!("{l}"))?;
    let m = &r.median;
    let rss = r
        .peak_rss
        .map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "ours    median of {}: forward {:.3}s  backward {:.3}s  optimizer {:.3}s  step {:.3}s  peak RSS {rss}",
        r.steps.len(),
        m.forward,
        m.backward,
        m.optimizer,
        m.total()
    );

    if let Some(python) = a.compare_pytorch {
        let script = a.pytorch_script.unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/bench/pytorch_cpu_step.py")
        });
        let config = match &arch {
            Arch::Config(p) => p.display().to_string(),
            other => other.name(),
        };
        let out = Command::new(&python)
            .arg(&script)
            .args(["--arch", &config])
            .args(["--latent", &r.latent.to_string()])
            .args(["--batch", &a.batch.to_string()])
            .args(["--warmup", &a.warmup.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .args(["--threads", &r.threads.to_string()])
            .output()
            .with_context(|| format!("running {} {}", python.display(), script.display()))?;
        if !out.status.success() {
            bail!(
                "the PyTorch benchmark failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("the PyTorch benchmark printed no JSON result")?;
        let v: serde_json::Value = serde_json::from_str(last)?;
        let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let (pf, pb, po) = (get("forward"), get("backward"), get("optimizer"));
        let pt = pf + pb + po;
        let prss = v["peak_rss"]
            .as_f64()
            .map(|b| format!("{:.2} GiB", b / (1u64 << 30) as f64))
            .unwrap_or_else(|| "n/a".into());
        println!(
            "pytorch median of {}: forward {pf:.3}s  backward {pb:.3}s  optimizer {po:.3}s  step {pt:.3}s  peak RSS {prss}  (torch {}, {} threads)",
            a.steps,
            v["torch"].as_str().unwrap_or("?"),
            v["threads"]
        );
        println!(
            "ratio ours/pytorch: forward {:.2}  backward {:.2}  optimizer {:.2}  step {:.2}",
            m.forward / pf,
            m.backward / pb,
            m.optimizer / po,
            m.total() / pt
        );
    }
    Ok(())
}
