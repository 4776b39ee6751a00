//! Choosing the rare-token identifier ("sks" in "a photo of sks dog") the
//! paper's way (Ruiz et al. 2023, §3.2): a token of the model's own
//! vocabulary that is rare and carries a weak prior, so fine-tuning binds it to
//! the subject instead of fighting a meaning it already has.
//!
//! Candidates are single tokens of the tokenizer's vocabulary that
//!
//! - are whole words (end in `</w>`) of at most 3 characters;
//! - are letters only (a–z): CLIP's pre-tokenizer splits digits into single
//!   tokens and cuts words at punctuation, so an identifier with either would
//!   not stay one token, and letters survive prompt editing and lowercasing;
//! - come back as exactly that one token when the word is typed alone.
//!
//! Two signals rank them:
//!
//! - **rarity**: the BPE merge rank (the token's id minus the 512 byte tokens;
//!   the vocabulary's ids follow merge order). BPE merges the most frequent pair
//!   first, so a later merge means a rarer string in CLIP's training text.
//! - **prior**: how much the token changes the text encoder's reading of
//!   "a photo of": the relative L2 distance between the final-layer hidden
//!   states at the end-of-text token (CLIP's summary of the sentence, which every
//!   later padding position repeats) of "a photo of X" and "a photo of". A small
//!   change means the model reads little into the token.
//!
//! The combined rank orders by the sum of the two ranks (lower is better).

use candle_core::{DType, Tensor};

use crate::models::StableDiffusion;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The template the prior is measured in.
pub const PRIOR_TEMPLATE: &str = "a photo of";

/// Which tokens to consider.
#[derive(Debug, Clone)]
pub struct IdentifierOptions {
    /// Longest token, in characters (without `</w>`).
    pub max_chars: usize,
    /// Measure the prior of only this many of the rarest eligible tokens (plus
    /// `sks`); the text encoder runs once per token.
    pub pool: usize,
    /// Prompts per text-encoder batch.
    pub batch_size: usize,
}

impl Default for IdentifierOptions {
    fn default() -> Self {
        Self {
            max_chars: 3,
            pool: 1000,
            batch_size: 64,
        }
    }
}

/// One candidate identifier.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The word to type (the token without `</w>`).
    pub word: String,
    pub id: u32,
    /// BPE merge rank (0 = the first, most frequent merge).
    pub merge_rank: usize,
    /// Relative change of the text encoder's summary of "a photo of" when the
    /// token is appended (smaller = weaker prior).
    pub prior: f64,
    /// 1 = the rarest among the measured candidates.
    pub rarity_rank: usize,
    /// 1 = the weakest prior among the measured candidates.
    pub prior_rank: usize,
    /// 1 = the best candidate (smallest rarity_rank + prior_rank).
    pub combined_rank: usize,
}

/// The result of [`rank_identifiers`].
#[derive(Debug, Clone)]
pub struct IdentifierRanking {
    /// Measured candidates, best first.
    pub candidates: Vec<Candidate>,
    /// Tokens passing the filters (of which `candidates.len()` were measured).
    pub eligible: usize,
    /// Tokens in the vocabulary, and BPE merges (ranks 0..merges).
    pub vocab_size: usize,
    pub merges: usize,
}

impl IdentifierRanking {
    /// The candidate for `word`, if it was measured.
    pub fn get(&self, word: &str) -> Option<&Candidate> {
        self.candidates.iter().find(|c| c.word == word)
    }
}

/// The tokens of a vocabulary that pass the filters (see the module documentation).
#[derive(Debug, Clone)]
pub struct EligibleTokens {
    /// (id, word without `</w>`), in id order.
    pub tokens: Vec<(u32, String)>,
    /// Ids below this are the byte alphabet; merge rank = id − n_base.
    pub n_base: usize,
    /// BPE merges in the vocabulary.
    pub merges: usize,
    pub vocab_size: usize,
}

/// Whole-word tokens of 1..=`max_chars` letters a–z that encode back to
/// themselves alone.
pub fn eligible_tokens(tok: &ClipTokenizer, max_chars: usize) -> Result<EligibleTokens> {
    let vocab_size = tok.vocab_size();
    let tokens: Vec<Option<String>> = (0..vocab_size as u32)
        .map(|id| tok.id_to_token(id))
        .collect();
    // The byte alphabet comes first (each byte, then each byte + </w>): its
    // end is the first token longer than one character.
    let n_base = tokens
        .iter()
        .position(|t| {
            t.as_deref()
                .is_some_and(|t| t.trim_end_matches("</w>").chars().count() > 1)
        })
        .ok_or_else(|| Error::msg("the tokenizer's vocabulary has no merged tokens"))?;
    let is_special = |t: &str| t.starts_with("<|") && t.ends_with("|>");
    let merges = tokens
        .iter()
        .skip(n_base)
        .filter(|t| t.as_deref().is_some_and(|t| !is_special(t)))
        .count();
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    let mut eligible = Vec::new();
    for (id, t) in tokens.iter().enumerate().skip(n_base) {
        let Some(t) = t else { continue };
        let Some(word) = t.strip_suffix("</w>") else {
            continue;
        };
        let n = word.chars().count();
        if n == 0 || n > max_chars || !word.chars().all(|c| c.is_ascii_lowercase()) {
            continue;
        }
        if tok.encode(word) != [bos, id as u32, eos] {
            continue;
        }
        eligible.push((id as u32, word.to_string()));
    }
    Ok(EligibleTokens {
        tokens: eligible,
        n_base,
        merges,
        vocab_size,
    })
}

/// Ranks the identifier candidates of `model`'s vocabulary (see the module
/// documentation).
pub fn rank_identifiers(
    model: &StableDiffusion,
    opts: &IdentifierOptions,
) -> Result<IdentifierRanking> {
    let EligibleTokens {
        tokens: mut eligible,
        n_base,
        merges,
        vocab_size,
    } = eligible_tokens(&model.tokenizer, opts.max_chars)?;
    if eligible.is_empty() {
        return Err(Error::msg(format!(
            "no token of this vocabulary is a whole word of 1 to {} letters",
            opts.max_chars
        )));
    }
    let n_eligible = eligible.len();
    // The rarest first (latest merge), then keep the pool and `sks`.
    eligible.sort_by_key(|e| std::cmp::Reverse(e.0));
    let sks = eligible.iter().position(|(_, w)| w == "sks");
    let mut pool: Vec<(u32, String)> = eligible.iter().take(opts.pool.max(1)).cloned().collect();
    if let Some(i) = sks
        && i >= pool.len()
    {
        pool.push(eligible[i].clone());
    }

    let priors = prior_scores(model, &pool, opts.batch_size.max(1))?;
    let mut cands: Vec<Candidate> = pool
        .iter()
        .zip(&priors)
        .enumerate()
        .map(|(i, ((id, word), &prior))| Candidate {
            word: word.clone(),
            id: *id,
            merge_rank: *id as usize - n_base,
            prior,
            rarity_rank: i + 1,
            prior_rank: 0,
            combined_rank: 0,
        })
        .collect();
    let mut by_prior: Vec<usize> = (0..cands.len()).collect();
    by_prior.sort_by(|&a, &b| cands[a].prior.total_cmp(&cands[b].prior));
    for (r, &i) in by_prior.iter().enumerate() {
        cands[i].prior_rank = r + 1;
    }
    cands.sort_by(|a, b| {
        (a.rarity_rank + a.prior_rank)
            .cmp(&(b.rarity_rank + b.prior_rank))
            .then(a.prior.total_cmp(&b.prior))
    });
    for (r, c) in cands.iter_mut().enumerate() {
        c.combined_rank = r + 1;
    }
    Ok(IdentifierRanking {
        candidates: cands,
        eligible: n_eligible,
        vocab_size,
        merges,
    })
}

/// ‖h(template + X) − h(template)‖ / ‖h(template)‖ at the end-of-text token,
/// for each token X of `pool`.
fn prior_scores(model: &StableDiffusion, pool: &[(u32, String)], batch: usize) -> Result<Vec<f64>> {
    let tok = &model.tokenizer;
    let base = tok.encode(PRIOR_TEMPLATE); // BOS … EOS
    let eos = *base.last().expect("BOS and EOS");
    let dev = &model.device;
    let eos_state = |ids: Vec<u32>, b: usize, l: usize| -> Result<Tensor> {
        let ids = Tensor::from_vec(ids, (b, l), dev)?;
        let h = model.text_encoder.forward(&ids)?.detach();
        Ok(h.narrow(1, l - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?)
    };
    let h0 = eos_state(base.clone(), 1, base.len())?; // (1, D)
    let norm0 = h0.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    let l = base.len() + 1;
    let mut out = Vec::with_capacity(pool.len());
    for chunk in pool.chunks(batch) {
        let mut ids = Vec::with_capacity(chunk.len() * l);
        for (id, _) in chunk {
            ids.extend_from_slice(&base[..base.len() - 1]);
            ids.push(*id);
            ids.push(eos);
        }
        let h = eos_state(ids, chunk.len(), l)?;
        let d = h
            .broadcast_sub(&h0)?
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_vec1::<f32>()?;
        out.extend(d.into_iter().map(|d| d as f64 / norm0.max(1e-12)));
    }
    Ok(out)
}
