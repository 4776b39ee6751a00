//! Models named as on the Hugging Face Hub (`stable-diffusion-v1-5/stable-diffusion-v1-5`,
//! `facebook/dino-vits16`, `org/name@revision`), found in the local Hub cache
//! that diffusers, transformers and `huggingface-cli download` fill. Nothing
//! is ever downloaded: a name that is neither a local path nor in the cache
//! is an error that says where it looked and how to fetch it.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, as in
//! `huggingface_hub`. A repository `org/name` lives in `models--org--name/`:
//! `refs/<revision>` holds a commit hash, `snapshots/<hash>/` the files (links
//! into `blobs/`). The snapshot is the model folder; a snapshot holding no
//! `model_index.json` or `config.json` but exactly one weights file at its
//! root (a single-file checkpoint or LoRA repository) resolves to that file.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `spec` itself when it exists (or does not look like a Hub name), else the
/// snapshot of the Hub repository it names in the local cache.
pub fn resolve(spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let Some((repo, revision)) = spec.to_str().and_then(repo_id) else {
        return Ok(spec.to_path_buf());
    };
    let caches = cache_dirs();
    let folder = format!("models--{}", repo.replace('/', "--"));
    for cache in &caches {
        let dir = cache.join(&folder);
        if dir.is_dir() {
            return snapshot_in(&dir, spec, revision).map(|s| model_in(&s));
        }
    }
    let looked: Vec<String> = caches.iter().map(|c| c.display().to_string()).collect();
    Err(Error::config(
        spec,
        format!(
            "not a local file or folder, and the Hugging Face repository `{repo}` is not in the \
             local Hub cache (looked for {folder}/ in {}); this tool never downloads: fetch it \
             with `huggingface-cli download {repo}` or give a local path",
            if looked.is_empty() {
                "no cache folder (HOME is not set)".to_string()
            } else {
                looked.join(", ")
            }
        ),
    ))
}

/// (`org/name`, revision) of a Hub name: two parts of letters, digits, `-`,
/// `_`, `.` (neither starting with `.`), optionally `@revision`.
fn repo_id(s: &str) -> Option<(&str, Option<&str>)> {
    let (repo, revision) = match s.split_once('@') {
        Some((r, v)) if !v.is_empty() && !v.contains('/') => (r, Some(v)),
        Some(_) => return None,
        None => (s, None),
    };
    let (org, name) = repo.split_once('/')?;
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (part(org) && part(name)).then_some((repo, revision))
}

/// Where the Hub cache may be, in `huggingface_hub`'s order.
fn cache_dirs() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(c) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return vec![c];
    }
    if let Some(h) = var("HF_HOME") {
        return vec![h.join("hub")];
    }
    let mut dirs = Vec::new();
    if let Some(x) = var("XDG_CACHE_HOME") {
        dirs.push(x.join("huggingface").join("hub"));
    }
    if let Some(home) = var("HOME") {
        let d = home.join(".cache").join("huggingface").join("hub");
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// The snapshot folder of `revision` (default `main`: a branch or tag name in
/// `refs/`, or a commit hash) in a repository's cache folder `dir`.
fn snapshot_in(dir: &Path, spec: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let snapshots = dir.join("snapshots");
    let rev = revision.unwrap_or("main");
    let hash = match std::fs::read_to_string(dir.join("refs").join(rev)) {
        Ok(h) => h.trim().to_string(),
        Err(_) => rev.to_string(),
    };
    let snap = snapshots.join(&hash);
    if snap.is_dir() {
        return Ok(snap);
    }
    // No `refs/main` (a cache filled by a revision download): the one snapshot there is.
    let mut all: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    all.retain(|p| p.is_dir());
    if revision.is_none() && all.len() == 1 {
        return Ok(all.remove(0));
    }
    let names: Vec<String> = all
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    Err(Error::config(
        spec,
        format!(
            "the Hub cache {} has no snapshot for revision `{rev}` (snapshots: {}); name one \
             with {}@<revision>",
            dir.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            },
            spec.display()
        ),
    ))
}

/// The model a snapshot holds: the folder, or its one weights file when it is
/// not a diffusers or transformers folder.
fn model_in(snap: &Path) -> PathBuf {
    if snap.join("model_index.json").is_file() || snap.join("config.json").is_file() {
        return snap.to_path_buf();
    }
    let weights: Vec<PathBuf> = std::fs::read_dir(snap)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .is_some_and(|e| e == "safetensors" || e == "ckpt")
                })
                .collect()
        })
        .unwrap_or_default();
    match weights.as_slice() {
        [one] => one.clone(),
        // diffusers' `load_lora_weights` default among several.
        many => many
            .iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n == "pytorch_lora_weights.safetensors")
            })
            .cloned()
            .unwrap_or_else(|| snap.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::repo_id;

    #[test]
    fn hub_names_and_what_is_not_one() {
        assert_eq!(
            repo_id("facebook/dino-vits16"),
            Some(("facebook/dino-vits16", None))
        );
        assert_eq!(
            repo_id("org/model.v1@fp16"),
            Some(("org/model.v1", Some("fp16")))
        );
        for not in [
            "model",
            "./org/name",
            "/abs/path",
            "a/b/c",
            "org/",
            "/name",
            "org/.hidden",
            "org/name@",
            "org/na me",
        ] {
            assert_eq!(repo_id(not), None, "{not}");
        }
    }
}
