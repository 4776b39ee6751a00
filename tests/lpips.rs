//! Parity of LPIPS with the `lpips` package.
//!
//! tests/fixtures/lpips/ comes from tools/parity/lpips.py: random-weight
//! `lpips.LPIPS(net='alex')` and `(net='vgg')` with narrowed channels, image
//! pairs (random, identical, slightly perturbed; 64×48 and 40×33) and the
//! package's distances, and two groups of images with their DIV.

mod common;
use common::to_f64;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixtures, load};
use dreambooth::eval::metrics;
use dreambooth::models::lpips::{Backbone, Lpips};
use dreambooth::nn::{read_safetensors, save_safetensors};

const TOL: f64 = 1e-4;

fn model(net: &str) -> Lpips {
    Lpips::load(
        &fixtures().join(format!("lpips/{net}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

/// Per-element relative error; where the package gives exactly 0 (identical
/// images), ours must be below 1e-7 in absolute terms.
fn check(name: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == 0.0 {
            assert!(g.abs() < 1e-7, "{name}[{i}]: {g} for identical images");
            continue;
        }
        let e = (g - w).abs() / w.abs();
        println!("{name}[{i}]: ours {g:.8e}, lpips {w:.8e}, rel err {e:.2e}");
        assert!(e < TOL, "{name}[{i}]: relative error {e:.3e} ≥ {TOL:e}");
        worst = worst.max(e);
    }
    worst
}

fn parity(dir: &Path, nets: &[&str]) {
    let io = read_safetensors(&dir.join("io.safetensors"), &Device::Cpu).unwrap();
    for net in nets {
        let m = Lpips::load(&dir.join(format!("{net}.safetensors")), &Device::Cpu).unwrap();
        for size in ["64x48", "40x33"] {
            let d = m
                .distance(&io[&format!("a.{size}")], &io[&format!("b.{size}")])
                .unwrap();
            let want = to_f64(&io[&format!("{net}.{size}")]);
            check(&format!("{net}.{size}"), &to_f64(&d), &want);
        }
        let groups = [io["div.g0"].clone(), io["div.g1"].clone()];
        let div = metrics::div_lpips(&m, &groups).unwrap();
        let want = to_f64(&io[&format!("{net}.div")])[0];
        check(&format!("{net}.div"), &[div], &[want]);
    }
}

#[test]
fn distances_match_lpips_package() {
    parity(&fixtures().join("lpips"), &["alex", "vgg"]);
}

/// Full-width random models written by `tools/parity/lpips.py --full DIR`
/// (not committed: 60 MB): `LPIPS_FULL_DIR=DIR cargo test --test lpips -- --ignored`.
#[test]
#[ignore]
fn full_width_models_match_lpips_package() {
    let dir = std::env::var("LPIPS_FULL_DIR").expect("set LPIPS_FULL_DIR");
    parity(Path::new(&dir), &["alex", "vgg"]);
}

#[test]
fn backbone_and_widths_come_from_the_file() {
    let alex = model("alex");
    assert_eq!(alex.backbone(), Backbone::Alex);
    assert_eq!(alex.channels(), vec![8, 12, 16, 12, 12]);
    let vgg = model("vgg");
    assert_eq!(vgg.backbone(), Backbone::Vgg16);
    assert_eq!(vgg.channels(), vec![4, 8, 8, 12, 12]);
}

#[test]
fn pairwise_and_batched_distances_agree() {
    let io = load("lpips/io.safetensors");
    let m = model("alex");
    let g = &io["div.g1"]; // 4 images
    let pairs = m.pairwise_distances(g).unwrap();
    assert_eq!(pairs.len(), 6);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..4 {
        for j in i + 1..4 {
            a.push(g.get(i).unwrap());
            b.push(g.get(j).unwrap());
        }
    }
    let d = to_f64(
        &m.distance(
            &Tensor::stack(&a, 0).unwrap(),
            &Tensor::stack(&b, 0).unwrap(),
        )
        .unwrap(),
    );
    for (x, y) in pairs.iter().zip(&d) {
        assert!((x - y).abs() <= 1e-6 * y.abs(), "{x} vs {y}");
    }
    // Symmetric, and zero on identical images.
    let (x, y) = (g.narrow(0, 0, 1).unwrap(), g.narrow(0, 1, 1).unwrap());
    let ab = to_f64(&m.distance(&x, &y).unwrap())[0];
    let ba = to_f64(&m.distance(&y, &x).unwrap())[0];
    assert!((ab - ba).abs() <= 1e-6 * ab, "{ab} vs {ba}");
    assert_eq!(to_f64(&m.distance(&x, &x).unwrap())[0], 0.0);
}

/// A temporary file, removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

/// The alex fixture's tensors with `edit` applied, written to a temporary file.
fn edited(name: &str, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> TempFile {
    let mut t: BTreeMap<String, Tensor> = load("lpips/alex.safetensors").into_iter().collect();
    edit(&mut t);
    let path = std::env::temp_dir().join(format!("dreambooth-lpips-{}-{name}", std::process::id()));
    save_safetensors(&t, &path, None).unwrap();
    TempFile(path)
}

#[test]
fn heads_under_either_name_and_default_scaling_load() {
    let io = load("lpips/io.safetensors");
    let want = to_f64(
        &model("alex")
            .distance(&io["a.64x48"], &io["b.64x48"])
            .unwrap(),
    );
    let variants = [
        // The package's .pth naming (linN) only.
        edited("lin_only.safetensors", |t| {
            t.retain(|k, _| !k.starts_with("lins."))
        }),
        // The ModuleList naming only.
        edited("lins_only.safetensors", |t| {
            t.retain(|k, _| k.starts_with("lins.") || !k.starts_with("lin"))
        }),
        // No scaling-layer buffers: the package's constants.
        edited("no_scaling.safetensors", |t| {
            t.retain(|k, _| !k.starts_with("scaling_layer."))
        }),
    ];
    for path in variants {
        let m = Lpips::load(&path, &Device::Cpu).unwrap();
        let got = to_f64(&m.distance(&io["a.64x48"], &io["b.64x48"]).unwrap());
        assert_eq!(got, want, "{}", path.display());
    }
}

fn load_err(path: &Path) -> String {
    let e = Lpips::load(path, &Device::Cpu).unwrap_err().to_string();
    println!("{e}");
    assert!(
        e.contains(&path.display().to_string()),
        "names the file: {e}"
    );
    e
}

#[test]
fn other_architectures_are_clear_errors() {
    for rel in [
        "encoders/clip/model.safetensors",
        "encoders/dino/model.safetensors",
        "tiny-sd1/unet/diffusion_pytorch_model.safetensors",
    ] {
        let e = load_err(&fixtures().join(rel));
        assert!(e.contains("not an LPIPS checkpoint"), "{e}");
        assert!(e.contains("net.slice1.0.weight"), "{e}");
    }
    let heads = edited("heads_only.safetensors", |t| {
        t.retain(|k, _| !k.starts_with("net."))
    });
    assert!(load_err(&heads).contains("no backbone"));
    let squeeze = edited("squeeze.safetensors", |t| {
        let w = t["net.slice1.0.weight"].clone();
        t.clear();
        t.insert("net.slice1.0.weight".into(), w.clone());
        t.insert("net.slice2.3.squeeze.weight".into(), w);
    });
    assert!(load_err(&squeeze).contains("SqueezeNet"));
    let torchvision = edited("torchvision.safetensors", |t| {
        let w = t["net.slice1.0.weight"].clone();
        t.clear();
        t.insert("features.0.weight".into(), w);
    });
    assert!(load_err(&torchvision).contains("convert_lpips.py --backbone"));
}

#[test]
fn broken_lpips_files_name_the_tensor() {
    let missing = edited("missing.safetensors", |t| {
        t.remove("net.slice3.6.weight");
    });
    assert!(load_err(&missing).contains("missing tensor `net.slice3.6.weight`"));
    let no_head = edited("no_head.safetensors", |t| {
        t.remove("lins.2.model.1.weight");
        t.remove("lin2.model.1.weight");
    });
    assert!(load_err(&no_head).contains("lins.2.model.1.weight"));
    // A head whose width disagrees with its layer's.
    let narrow = edited("narrow_head.safetensors", |t| {
        let w = t["lins.1.model.1.weight"].narrow(1, 0, 5).unwrap();
        t.insert("lins.1.model.1.weight".into(), w.clone());
        t.insert("lin1.model.1.weight".into(), w);
    });
    assert!(load_err(&narrow).contains("lins.1.model.1.weight` has shape [1, 5, 1, 1]"));
    // A convolution whose input width does not chain.
    let chain = edited("chain.safetensors", |t| {
        let w = t["net.slice3.6.weight"].narrow(1, 0, 4).unwrap();
        t.insert("net.slice3.6.weight".into(), w);
    });
    assert!(load_err(&chain).contains("net.slice3.6.weight"));
    let differ = edited("differ.safetensors", |t| {
        let w = (&t["lin0.model.1.weight"] * 2.0).unwrap();
        t.insert("lin0.model.1.weight".into(), w);
    });
    assert!(load_err(&differ).contains("differ"));
    let extra = edited("extra.safetensors", |t| {
        let w = t["lin0.model.1.weight"].clone();
        t.insert("net.slice5.12.weight".into(), w);
    });
    assert!(load_err(&extra).contains("net.slice5.12.weight"));
}

#[test]
fn bad_inputs_are_errors() {
    let m = model("alex");
    let a = Tensor::zeros((1, 3, 64, 48), DType::F32, &Device::Cpu).unwrap();
    let small = Tensor::zeros((1, 3, 30, 30), DType::F32, &Device::Cpu).unwrap();
    let e = m.distance(&small, &small).unwrap_err().to_string();
    assert!(e.contains("at least 31"), "{e}");
    let other = Tensor::zeros((1, 3, 48, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(m.distance(&a, &other).is_err());
    let gray = Tensor::zeros((1, 1, 64, 48), DType::F32, &Device::Cpu).unwrap();
    assert!(
        m.distance(&gray, &gray)
            .unwrap_err()
            .to_string()
            .contains("3")
    );
    let e = model("vgg")
        .distance(&a.narrow(2, 0, 15).unwrap(), &a.narrow(2, 0, 15).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 16"), "{e}");
    let one = [a.clone()];
    assert!(metrics::div_lpips(&m, &one).is_err());
    assert!(metrics::div_lpips(&m, &[]).is_err());
}
