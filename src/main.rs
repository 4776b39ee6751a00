//! The `dreambooth` command line: parse, call the library, print.

use clap::{Parser, Subcommand};

mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "dreambooth",
    version,
    about = "DreamBooth for Stable Diffusion, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks: time a UNet training step (and PyTorch's, to compare).
    Bench(cli::bench::Args),
    /// Write a model in another format (diffusers folder, single-file .safetensors).
    Convert(cli::convert::Args),
    /// Run DreamBooth end to end on the bundled tiny model and write report.html.
    Demo(cli::demo::Args),
    /// Score generated images the DreamBooth paper's way (DINO, CLIP-I, CLIP-T, PRES, DIV).
    Eval(cli::eval::Args),
    /// Generate images from a prompt with a Stable Diffusion model.
    Generate(cli::generate::Args),
    /// Describe a model: format, family, architecture, sizes, schedule, hash.
    Info(cli::info::Args),
    /// List candidate rare-token identifiers of a model's vocabulary (like `sks`).
    Identifier(cli::identifier::Args),
    /// Fold LoRA files into a model and write it (diffusers folder or single file).
    Merge(cli::merge::Args),
    /// Check a device's kernels against the CPU (on a GPU machine: `selftest --device cuda`).
    Selftest(cli::selftest::Args),
    /// Personalize a model on a few photos of a subject (DreamBooth).
    Train(Box<cli::train::Args>),
    /// The procedural toy world and the bundled tiny model.
    Toy(cli::toy::Args),
}

fn main() {
    dreambooth::nn::cpu::configure();
    let args = Cli::parse();
    let result = dreambooth::nn::cpu::run_in_pool(|| match args.command {
        Command::Bench(a) => cli::bench::run(a),
        Command::Convert(a) => cli::convert::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Identifier(a) => cli::identifier::run(a),
        Command::Info(a) => cli::info::run(a),
        Command::Merge(a) => cli::merge::run(a),
        Command::Selftest(a) => cli::selftest::run(a),
        Command::Train(a) => cli::train::run(*a),
        Command::Toy(a) => cli::toy::run(a),
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
