//! One module per subcommand; each has `Args` (clap) and `run(args) -> anyhow::Result<()>`.

pub mod bench;
pub mod demo;
pub mod device;
pub mod eval;
pub mod generate;
pub mod identifier;
pub mod merge;
pub mod paper;
pub mod toy;
pub mod train;
