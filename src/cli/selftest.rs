//! `dreambooth selftest --device D`: checks the device's paths (fused AdamW,
//! the UNet in f32 and mixed precision, LoRA on a frozen base) against the
//! CPU's f32 reference and exits non-zero if any is off
//! (`dreambooth::selftest`). Meant for a GPU machine, where `cargo test` does
//! not run.

#[derive(clap::Args)]
pub struct Args {
    /// `cuda`, `cuda:N` or `cpu` (the CPU checks its fused paths against the
    /// plain ones and f16 mixed precision against f32).
    #[arg(long, default_value = "cuda")]
    pub device: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = super::device::open(Some(&args.device))?;
    println!("selftest on {}", super::device::describe(&device));
    let checks = dreambooth::selftest::run(&device, &mut |l| println!("  {l}"))?;
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.name.as_str())
        .collect();
    println!(
        "{} passed, {} failed",
        checks.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        anyhow::bail!("selftest failed: {}", failed.join("; "));
    }
    Ok(())
}
