//! The paper's metrics on embeddings: DINO, CLIP-I, CLIP-T, PRES, DIV.
//!
//! Embeddings are (N, D) tensors, one row per image (or prompt), as the
//! encoders return them (`ViTModel::cls_embeds`, `ClipModel::image_embeds`,
//! `ClipModel::text_embeds`); any float dtype and device. Rows need not be
//! normalized: every similarity here is the cosine, computed in f64. An empty
//! set, a row of zero norm or a non-finite value, and sets of different widths
//! are errors.
//!
//! - DINO, CLIP-I ([`dino`], [`clip_i`]): the mean cosine similarity over every
//!   (generated, real) pair of DINO CLS / CLIP image embeddings, "the average
//!   pairwise cosine similarity between ViT-S/16 DINO embeddings of generated
//!   and real images".
//! - CLIP-T ([`clip_t`]): the mean cosine similarity between each generated
//!   image's CLIP image embedding and its prompt's CLIP text embedding, the
//!   prompt taken without the identifier ([`prompt_for_clip_t`]).
//! - PRES ([`pres`]): DINO between generations of the bare class prompt and the
//!   real subject images (higher: the prior drifted toward the subject).
//! - DIV ([`div`], [`div_lpips`]): the mean LPIPS distance over the unordered
//!   pairs of images generated for one prompt, averaged over prompts.

use candle_core::{DType, Tensor};

use crate::models::lpips::Lpips;
use crate::{Error, Result};

/// The rows of an (N, D) tensor as f64, N ≥ 1, D ≥ 1, every value finite.
fn rows(t: &Tensor, what: &str) -> Result<Vec<Vec<f64>>> {
    if t.rank() != 2 {
        return Err(Error::msg(format!(
            "{what}: expected an (N, D) tensor of embeddings, got shape {:?}",
            t.dims()
        )));
    }
    let (n, d) = t.dims2()?;
    if n == 0 || d == 0 {
        return Err(Error::msg(format!(
            "{what}: no embeddings (shape {:?})",
            t.dims()
        )));
    }
    let r: Vec<Vec<f64>> = t.to_dtype(DType::F64)?.to_vec2()?;
    for (i, row) in r.iter().enumerate() {
        if row.iter().any(|x| !x.is_finite()) {
            return Err(Error::msg(format!(
                "{what}: embedding {i} holds a non-finite value"
            )));
        }
    }
    Ok(r)
}

/// The rows scaled to unit length.
fn unit_rows(t: &Tensor, what: &str) -> Result<Vec<Vec<f64>>> {
    let mut r = rows(t, what)?;
    for (i, row) in r.iter_mut().enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return Err(Error::msg(format!(
                "{what}: embedding {i} is all zeros (its cosine similarity is undefined)"
            )));
        }
        row.iter_mut().for_each(|x| *x /= norm);
    }
    Ok(r)
}

fn same_width(a: &[Vec<f64>], b: &[Vec<f64>], what_a: &str, what_b: &str) -> Result<()> {
    let (da, db) = (a[0].len(), b[0].len());
    if da != db {
        return Err(Error::msg(format!(
            "{what_a} are {da} wide but {what_b} are {db} wide: embeddings of one encoder are needed"
        )));
    }
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v {
        s += x;
        n += 1;
    }
    s / n.max(1) as f64
}

/// cos(a_i, b_j) for every row i of `a` (N, D) and row j of `b` (M, D): N rows of M.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Vec<Vec<f64>>> {
    let a = unit_rows(a, "the first embeddings")?;
    let b = unit_rows(b, "the second embeddings")?;
    same_width(&a, &b, "the first embeddings", "the second embeddings")?;
    Ok(a.iter()
        .map(|x| b.iter().map(|y| dot(x, y)).collect())
        .collect())
}

/// The mean of [`cosine_matrix`]: the average cosine over all N·M pairs.
pub fn mean_pairwise_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(mean(cosine_matrix(a, b)?.into_iter().flatten()))
}

/// The mean cosine over the pairs of two different rows of `x` (N ≥ 2): how
/// alike a set is within itself (e.g. the real photos, a reference for DINO).
/// Rows are told apart by position, not value: a set of one repeated embedding
/// scores exactly 1.
pub fn mean_pairwise_cosine_distinct(x: &Tensor) -> Result<f64> {
    let r = unit_rows(x, "the embeddings")?;
    if r.len() < 2 {
        return Err(Error::msg(format!(
            "the embeddings: {} row(s); pairs of different rows need at least 2",
            r.len()
        )));
    }
    Ok(mean((0..r.len()).flat_map(|i| {
        let r = &r;
        (i + 1..r.len()).map(move |j| dot(&r[i], &r[j]))
    })))
}

/// cos(a_i, b_i) for each row i: `a` and `b` are (N, D) with the same N.
pub fn rowwise_cosine(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let a = unit_rows(a, "the first embeddings")?;
    let b = unit_rows(b, "the second embeddings")?;
    same_width(&a, &b, "the first embeddings", "the second embeddings")?;
    if a.len() != b.len() {
        return Err(Error::msg(format!(
            "{} first embeddings but {} second ones: they are compared row by row",
            a.len(),
            b.len()
        )));
    }
    Ok(a.iter().zip(&b).map(|(x, y)| dot(x, y)).collect())
}

/// DINO: the mean cosine similarity between every generated image's DINO
/// embedding (N, D) and every real image's (M, D).
pub fn dino(generated: &Tensor, real: &Tensor) -> Result<f64> {
    mean_pairwise_cosine(generated, real)
}

/// CLIP-I: the mean cosine similarity between every generated image's CLIP
/// image embedding (N, P) and every real image's (M, P).
pub fn clip_i(generated: &Tensor, real: &Tensor) -> Result<f64> {
    mean_pairwise_cosine(generated, real)
}

/// CLIP-T: the mean over images of cos(image embedding, its prompt's text
/// embedding). Row i of `text_embeds` (N, P) is the embedding of image i's
/// prompt, the identifier removed ([`prompt_for_clip_t`]); a single row is
/// used for every image (all generated from one prompt).
pub fn clip_t(image_embeds: &Tensor, text_embeds: &Tensor) -> Result<f64> {
    let n = image_embeds.dims().first().copied().unwrap_or(0);
    let text = if text_embeds.rank() == 2 && text_embeds.dim(0)? == 1 && n > 1 {
        text_embeds.broadcast_as((n, text_embeds.dim(1)?))?
    } else {
        text_embeds.clone()
    };
    Ok(mean(rowwise_cosine(image_embeds, &text)?))
}

/// PRES (prior preservation): the mean DINO cosine similarity between every
/// image generated from the bare class prompt ("a dog") and every real image of
/// the subject. The same computation as [`dino`], on other inputs.
pub fn pres(class_generated: &Tensor, real_subject: &Tensor) -> Result<f64> {
    mean_pairwise_cosine(class_generated, real_subject)
}

/// DIV: for each prompt's group of generations, the mean of `distance` over
/// its unordered pairs (i < j), then the mean over the groups (each prompt
/// weighs the same). No groups, or a group of fewer than 2 images, is an
/// error. With LPIPS as `distance` this is the paper's DIV ([`div_lpips`]).
pub fn div<T>(groups: &[Vec<T>], mut distance: impl FnMut(&T, &T) -> Result<f64>) -> Result<f64> {
    if groups.is_empty() {
        return Err(Error::msg("DIV: no groups of generations"));
    }
    let mut per_group = Vec::with_capacity(groups.len());
    for (g, items) in groups.iter().enumerate() {
        if items.len() < 2 {
            return Err(Error::msg(format!(
                "DIV: group {g} has {} image(s); pairs need at least 2",
                items.len()
            )));
        }
        let mut d = Vec::new();
        for i in 0..items.len() {
            for j in i + 1..items.len() {
                d.push(distance(&items[i], &items[j])?);
            }
        }
        per_group.push(mean(d));
    }
    Ok(mean(per_group))
}

/// DIV with LPIPS: `groups[p]` holds prompt p's generations as (n_p, 3, H, W)
/// in [-1, 1] (n_p ≥ 2; sizes may differ between groups). The mean LPIPS
/// distance over the pairs i < j of each group, averaged over groups.
pub fn div_lpips(lpips: &Lpips, groups: &[Tensor]) -> Result<f64> {
    if groups.is_empty() {
        return Err(Error::msg("DIV: no groups of generations"));
    }
    let mut per_group = Vec::with_capacity(groups.len());
    for (g, images) in groups.iter().enumerate() {
        let n = images.dims().first().copied().unwrap_or(0);
        if images.rank() != 4 || n < 2 {
            return Err(Error::msg(format!(
                "DIV: group {g} has shape {:?}; expected (n, 3, H, W) with n ≥ 2",
                images.dims()
            )));
        }
        per_group.push(mean(lpips.pairwise_distances(images)?));
    }
    Ok(mean(per_group))
}

/// The prompt CLIP-T compares an image with: `prompt` without the rare
/// identifier ("a sks dog on the beach" → "a dog on the beach").
///
/// The rule, exactly: every occurrence of `identifier` (trimmed of surrounding
/// whitespace; matched case-insensitively, character by character) that stands
/// as a whole word, i.e. neither the character just before it nor the one just
/// after it is a letter, a digit or `_`, is deleted; characters next to it,
/// punctuation included, stay ("sks, a dog" → ", a dog"; "sks's toy" → "'s
/// toy"; "sksdog" and "sks_dog" are left alone). Matches are found left to right
/// without overlap. Then every run of whitespace becomes one space and both
/// ends are trimmed. An empty identifier deletes nothing.
pub fn prompt_for_clip_t(prompt: &str, identifier: &str) -> String {
    let ident: Vec<char> = identifier.trim().chars().collect();
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let chars: Vec<char> = prompt.chars().collect();
    let mut kept = String::with_capacity(prompt.len());
    let mut i = 0;
    while i < chars.len() {
        let end = i + ident.len();
        let matches = !ident.is_empty()
            && end <= chars.len()
            && chars[i..end]
                .iter()
                .zip(&ident)
                .all(|(a, b)| a.to_lowercase().eq(b.to_lowercase()))
            && (i == 0 || !is_word(chars[i - 1]))
            && (end == chars.len() || !is_word(chars[end]));
        if matches {
            i = end;
        } else {
            kept.push(chars[i]);
            i += 1;
        }
    }
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}
