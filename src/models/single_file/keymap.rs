//! A two-way name table between one component's LDM keys and its diffusers keys.
//!
//! Each [`Entry`] pairs a module path on both sides (`input_blocks.4.1` ↔
//! `down_blocks.1.attentions.0`); the names below it are either the same on
//! both sides or renamed by a fixed list of [`Rename`]s (`in_layers.0` ↔
//! `norm1`). Both directions read the same table, so load and save cannot
//! disagree. A rename may also change the tensor ([`Transform`]).

use candle_core::Tensor;

use crate::{Error, Result};

/// What a tensor goes through between the two layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    None,
    /// LDM stores a 1×1 conv weight `[C, C, 1, 1]`, diffusers a linear `[C, C]`.
    ConvToLinear,
    /// LDM stores q, k, v stacked on dim 0 in one tensor; this is part `i` of 3.
    Chunk(usize),
    /// OpenCLIP's `text_projection` (x @ P) is the transpose of a linear weight.
    Transpose,
}

/// One renamed sub-module (or leaf) below an [`Entry`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rename {
    pub ldm: &'static str,
    pub diffusers: &'static str,
    pub transform: Transform,
}

pub(crate) const fn rename(ldm: &'static str, diffusers: &'static str) -> Rename {
    Rename {
        ldm,
        diffusers,
        transform: Transform::None,
    }
}

/// How the names below an entry's module path correspond.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Inner {
    /// The same names on both sides.
    Same,
    /// Only these sub-paths exist, renamed as listed.
    Renames(&'static [Rename]),
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub ldm: String,
    pub diffusers: String,
    pub inner: Inner,
}

/// The name table of one component (UNet, VAE or text encoder), without the
/// component's LDM prefix (`model.diffusion_model.` ...).
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyMap {
    entries: Vec<Entry>,
}

/// `rest` if `key` is `prefix` or lies below it (`prefix.rest`).
fn below<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = key.strip_prefix(prefix)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('.')
    }
}

fn join(prefix: &str, rest: &str) -> String {
    if rest.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{rest}")
    }
}

impl KeyMap {
    pub fn push(&mut self, ldm: impl Into<String>, diffusers: impl Into<String>, inner: Inner) {
        self.entries.push(Entry {
            ldm: ldm.into(),
            diffusers: diffusers.into(),
            inner,
        });
    }

    /// The diffusers names an LDM key becomes (three for a fused q/k/v tensor,
    /// none when the table has no place for it).
    pub fn to_diffusers(&self, key: &str) -> Vec<(String, Transform)> {
        let best = self
            .entries
            .iter()
            .filter_map(|e| below(key, &e.ldm).map(|rest| (e, rest)))
            .max_by_key(|(e, _)| e.ldm.len());
        let Some((entry, rest)) = best else {
            return Vec::new();
        };
        match entry.inner {
            Inner::Same => vec![(join(&entry.diffusers, rest), Transform::None)],
            Inner::Renames(list) => list
                .iter()
                .filter_map(|r| {
                    below(rest, r.ldm).map(|leaf| {
                        (
                            join(&join(&entry.diffusers, r.diffusers), leaf),
                            r.transform,
                        )
                    })
                })
                .collect(),
        }
    }

    /// The LDM name of a diffusers key, or `None` when the table has no place for it.
    pub fn to_ldm(&self, key: &str) -> Option<(String, Transform)> {
        let (entry, rest) = self
            .entries
            .iter()
            .filter_map(|e| below(key, &e.diffusers).map(|rest| (e, rest)))
            .max_by_key(|(e, _)| e.diffusers.len())?;
        match entry.inner {
            Inner::Same => Some((join(&entry.ldm, rest), Transform::None)),
            Inner::Renames(list) => list.iter().find_map(|r| {
                below(rest, r.diffusers)
                    .map(|leaf| (join(&join(&entry.ldm, r.ldm), leaf), r.transform))
            }),
        }
    }
}

/// LDM tensor → diffusers tensor. `key` names the tensor in errors.
pub(crate) fn to_diffusers_tensor(t: &Tensor, transform: Transform, key: &str) -> Result<Tensor> {
    match transform {
        Transform::None => Ok(t.clone()),
        Transform::ConvToLinear => match t.dims() {
            [o, i, 1, 1] | [o, i, 1] => Ok(t.reshape((*o, *i))?),
            _ => Ok(t.clone()),
        },
        Transform::Transpose => Ok(t.t()?.contiguous()?),
        Transform::Chunk(part) => {
            let n = t.dim(0)?;
            if !n.is_multiple_of(3) {
                return Err(Error::msg(format!(
                    "tensor `{key}` of shape {:?} does not split into q, k, v along dim 0",
                    t.dims()
                )));
            }
            Ok(t.narrow(0, part * n / 3, n / 3)?.contiguous()?)
        }
    }
}

/// diffusers tensor → LDM tensor (chunks are stacked by the caller with [`stack_qkv`]).
pub(crate) fn to_ldm_tensor(t: &Tensor, transform: Transform) -> Result<Tensor> {
    match (transform, t.dims()) {
        (Transform::ConvToLinear, [o, i]) => Ok(t.reshape((*o, *i, 1, 1))?),
        (Transform::Transpose, [_, _]) => Ok(t.t()?.contiguous()?),
        _ => Ok(t.clone()),
    }
}

/// q, k, v → one tensor stacked on dim 0.
pub(crate) fn stack_qkv(parts: &[Tensor; 3]) -> Result<Tensor> {
    Ok(Tensor::cat(parts, 0)?)
}
