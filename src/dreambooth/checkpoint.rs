//! Resumable checkpoints: trained weights, optimizer moments and the step,
//! written atomically (a temporary folder renamed into place, so a kill never
//! leaves a half-written checkpoint) and pruned to the last K.
//!
//! Every random draw of a training step is derived from (seed, step), so a
//! run resumed from step k ends bit-identical (CPU) to one never interrupted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::nn::{read_safetensors, save_safetensors};
use crate::optim::Optimizer;
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub seed: u64,
    /// Optimizer step counters (bias correction) per parameter group.
    pub optimizer_steps: BTreeMap<String, u64>,
    /// The f16 loss scaler's state (absent for f32 / bf16 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::optim::LossScaler>,
}

/// One parameter group: its name ("unet", "text_encoder"), vars and optimizer.
pub struct Group<'a> {
    pub name: &'a str,
    pub vars: &'a BTreeMap<String, Var>,
    pub opt: &'a mut Optimizer,
}

pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:06}")
}

/// Writes `root/checkpoint-<step>/` and keeps only the newest `keep`.
pub fn save(
    root: &Path,
    state: &CheckpointState,
    groups: &[Group],
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let final_dir = root.join(checkpoint_name(state.step));
    let tmp = root.join(format!(
        ".tmp-{}-{}",
        checkpoint_name(state.step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for g in groups {
        let weights: BTreeMap<String, Tensor> = g
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        save_safetensors(&weights, &tmp.join(format!("{}.safetensors", g.name)), None)?;
        save_safetensors(
            &g.opt.state()?,
            &tmp.join(format!("{}.optimizer.safetensors", g.name)),
            None,
        )?;
    }
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::msg(e.to_string()))?;
    crate::util::write_atomic(&tmp.join("state.json"), json.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    prune(root, keep)?;
    Ok(final_dir)
}

/// Finished checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("checkpoint-"))
                        && p.join("state.json").is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root);
    if keep == 0 || all.len() <= keep {
        return Ok(());
    }
    for old in &all[..all.len() - keep] {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(())
}

/// `latest` → the newest checkpoint under `root`; otherwise a path.
pub fn resolve(root: &Path, which: &str) -> Result<PathBuf> {
    if which == "latest" {
        return list(root).pop().ok_or_else(|| {
            Error::msg(format!(
                "--resume latest: no checkpoint found in {}",
                root.display()
            ))
        });
    }
    let p = PathBuf::from(which);
    if p.join("state.json").is_file() {
        Ok(p)
    } else {
        Err(Error::NotFound {
            path: p.join("state.json"),
        })
    }
}

/// Restores weights and optimizer state into `groups`; returns the state.
pub fn load(dir: &Path, groups: &mut [Group], device: &Device) -> Result<CheckpointState> {
    let state: CheckpointState = crate::util::read_json(&dir.join("state.json"))?;
    for g in groups.iter_mut() {
        let wpath = dir.join(format!("{}.safetensors", g.name));
        let weights = read_safetensors(&wpath, device)?;
        for (k, var) in g.vars {
            let t = weights.get(k).ok_or_else(|| Error::MissingKey {
                path: wpath.clone(),
                key: k.clone(),
                expected: var.as_tensor().dims().to_vec(),
            })?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::ShapeMismatch {
                    path: wpath.clone(),
                    key: k.clone(),
                    expected: var.as_tensor().dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            var.set(t)?;
        }
        let opath = dir.join(format!("{}.optimizer.safetensors", g.name));
        let ostate: BTreeMap<String, Tensor> =
            read_safetensors(&opath, device)?.into_iter().collect();
        let steps = state
            .optimizer_steps
            .get(g.name)
            .copied()
            .unwrap_or(state.step);
        g.opt
            .load_state(&ostate, steps)
            .map_err(|e| Error::config(&opath, e.to_string()))?;
    }
    Ok(state)
}
