//! `dreambooth identifier`: candidate rare-token identifiers of a model's
//! vocabulary, ranked by rarity and prior (see `dreambooth::dreambooth::identifier`).

use candle_core::Device;

use dreambooth::dreambooth::identifier::{IdentifierOptions, PRIOR_TEMPLATE, rank_identifiers};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// How many candidates to list.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Longest token, in letters.
    #[arg(long, default_value_t = 3)]
    pub max_chars: usize,
    /// Measure the prior of this many of the rarest eligible tokens.
    #[arg(long, default_value_t = 1000)]
    pub pool: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = Device::cuda_if_available(0)?;
    super::device::preflight(&device);
    let model = args.model.load(&device)?;
    let opts = IdentifierOptions {
        max_chars: args.max_chars,
        pool: args.pool,
        ..Default::default()
    };
    let r = rank_identifiers(&model, &opts)?;
    println!(
        "{} of {} tokens are whole words of 1-{} letters a-z that stay one token; \
         measured the {} rarest",
        r.eligible,
        r.vocab_size,
        args.max_chars,
        r.candidates.len()
    );
    println!(
        "ranked by rarity (later BPE merge = rarer in CLIP's training text) + prior (how little \
         the token changes the text encoder's reading of \"{PRIOR_TEMPLATE}\"); lower is better\n"
    );
    println!(
        "{:>4}  {:<6} {:>6} {:>14} {:>8} {:>6} {:>6}",
        "rank", "token", "id", "merge rank", "prior", "rare#", "prior#"
    );
    for c in r.candidates.iter().take(args.top) {
        println!(
            "{:>4}  {:<6} {:>6} {:>7}/{:<6} {:>8.4} {:>6} {:>6}",
            c.combined_rank,
            c.word,
            c.id,
            c.merge_rank,
            r.merges,
            c.prior,
            c.rarity_rank,
            c.prior_rank
        );
    }
    match r.get("sks") {
        Some(c) => println!(
            "\n`sks` (the common choice) ranks {} here: merge rank {}/{}, prior {:.4}. In Stable \
             Diffusion's CLIP vocabulary it is also a rifle brand (SKS) — a token with a prior, \
             the paper's point: check the prior column, not just rarity.",
            c.combined_rank, c.merge_rank, r.merges, c.prior
        ),
        None => println!(
            "\n`sks` is the common choice, but it is not a single token of this vocabulary. In \
             Stable Diffusion's CLIP vocabulary it is also a rifle brand (SKS) — a token with a \
             prior, the paper's point: prefer a rare token that changes little."
        ),
    }
    Ok(())
}
