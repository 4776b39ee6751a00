//! Hub names (`org/name`) resolve to snapshots of the local Hugging Face
//! cache, laid out as `huggingface_hub` lays it out (files are links into
//! `blobs/`): a diffusers repository loads and generates, a single-file
//! repository resolves to its file, `@revision` picks another snapshot, and a
//! name that is not cached is an error saying where it looked and how to fetch
//! it. One test: it sets HF_HUB_CACHE for this process.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use dreambooth::models::hub::resolve;
use dreambooth::models::{LoadOptions, StableDiffusion};

/// `from` copied into a cache snapshot as huggingface_hub stores it: every
/// file a blob under `repo/blobs/`, linked from `repo/snapshots/<hash>/`.
fn snapshot(repo: &Path, hash: &str, from: &Path, rel: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let rel = rel.join(e.file_name());
        if e.path().is_dir() {
            snapshot(repo, hash, &e.path(), &rel);
            continue;
        }
        let blob = repo.join("blobs").join(format!(
            "{hash}-{}",
            rel.to_string_lossy().replace('/', "_")
        ));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::copy(e.path(), &blob).unwrap();
        let link = repo.join("snapshots").join(hash).join(&rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, &link).unwrap();
    }
}

#[test]
fn hub_names_resolve_in_the_local_cache() {
    let cache = std::env::temp_dir().join(format!("dreambooth-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    // SAFETY: the only test in this binary; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("HF_HUB_CACHE", &cache) };
    let tiny = common::fixtures().join("tiny-sd1");
    let repo = cache.join("models--org--tiny-sd1");
    snapshot(&repo, "abc123", &tiny, Path::new(""));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    assert_eq!(
        resolve(Path::new("org/tiny-sd1")).unwrap(),
        repo.join("snapshots/abc123")
    );
    let m = StableDiffusion::load(
        Path::new("org/tiny-sd1"),
        &Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap();
    let want = StableDiffusion::load(&tiny, &Device::Cpu, LoadOptions::default()).unwrap();
    assert_eq!(m.model_hash().unwrap(), want.model_hash().unwrap());

    // Another revision through refs/, and a commit hash named directly.
    let other = tempdir_copy(&tiny, &cache.join("other"));
    snapshot(&repo, "def456", &other, Path::new(""));
    std::fs::write(repo.join("refs/v2"), "def456\n").unwrap();
    for spec in ["org/tiny-sd1@v2", "org/tiny-sd1@def456"] {
        assert_eq!(
            resolve(Path::new(spec)).unwrap(),
            repo.join("snapshots/def456")
        );
    }
    let e = resolve(Path::new("org/tiny-sd1@nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("revision `nope`") && e.contains("abc123"), "{e}");

    // A single-file repository (no refs/: its one snapshot) is its file.
    let single_repo = cache.join("models--org--tiny-single");
    let files = cache.join("single-src");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::copy(
        common::fixtures().join("tiny-sd1.safetensors"),
        files.join("tiny-sd1.safetensors"),
    )
    .unwrap();
    std::fs::write(files.join("README.md"), "a model card").unwrap();
    snapshot(&single_repo, "0f0f", &files, Path::new(""));
    assert_eq!(
        resolve(Path::new("org/tiny-single")).unwrap(),
        single_repo.join("snapshots/0f0f/tiny-sd1.safetensors")
    );

    // Not cached: where it looked, and how to fetch it; a local path that does
    // not exist keeps its not-found error.
    let e = resolve(Path::new("org/missing")).unwrap_err().to_string();
    assert!(
        e.contains("huggingface-cli download org/missing")
            && e.contains(&cache.display().to_string()),
        "{e}"
    );
    assert_eq!(
        resolve(Path::new("./no/such")).unwrap(),
        PathBuf::from("./no/such")
    );

    // End to end: generate from a Hub name.
    let out = cache.join("gen");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args([
            "generate",
            "--model",
            "org/tiny-sd1",
            "--prompt",
            "a photo of a dog",
        ])
        .args(["--steps", "2", "--out"])
        .arg(&out)
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read_dir(&out).unwrap().count() > 0);
    let _ = std::fs::remove_dir_all(&cache);
}

/// A copy of `from` with one file more (another revision).
fn tempdir_copy(from: &Path, to: &Path) -> PathBuf {
    common::copy_dir(from, to);
    std::fs::write(to.join("NOTE.txt"), "revision 2").unwrap();
    to.to_path_buf()
}
