//! The `dreambooth` command line: parse, call the library, print.

use clap::{Parser, Subcommand};

mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "dreambooth", version, about = "DreamBooth for Stable Diffusion, in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks: time a UNet training step (and PyTorch's, to compare).
    Bench(cli::bench::Args),
    /// Generate images from a prompt with a Stable Diffusion model.
    Generate(cli::generate::Args),
    /// The procedural toy world and the bundled tiny model.
    Toy(cli::toy::Args),
}

fn main() {
    let args = Cli::parse();
    let result = match args.command {
        Command::Bench(a) => cli::bench::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Toy(a) => cli::toy::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
