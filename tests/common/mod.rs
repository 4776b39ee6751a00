//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// All tensors of a fixture file, as f32 on the CPU.
pub fn load(rel: &str) -> HashMap<String, Tensor> {
    dreambooth::nn::read_safetensors(&fixtures().join(rel), &Device::Cpu).unwrap()
}

/// Relative L2 error ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let b = b
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (num / den.max(1e-30)).sqrt()
}

/// Asserts relative L2 error below `tol`, printing the figure.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let e = rel_err(a, b);
    println!("{what}: rel err {e:.2e}");
    assert!(
        e < tol,
        "{what}: relative L2 error {e:.3e} exceeds {tol:.0e}"
    );
}

/// Every element of `t`, in order, as f64.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Every tensor of `a` equals the same-named tensor of `b`, bit for bit.
pub fn assert_identical(
    what: &str,
    a: &std::collections::BTreeMap<String, Tensor>,
    b: &std::collections::BTreeMap<String, Tensor>,
) {
    assert_eq!(a.len(), b.len(), "{what}: different tensor counts");
    for (k, ta) in a {
        let tb = b.get(k).unwrap_or_else(|| panic!("{what}: `{k}` missing"));
        assert_eq!(ta.dims(), tb.dims(), "{what}: `{k}` shapes differ");
        let va = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vb = tb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if let Some(i) = (0..va.len()).find(|&i| va[i].to_bits() != vb[i].to_bits()) {
            panic!(
                "{what}: `{k}` differs at element {i}: {} vs {}",
                va[i], vb[i]
            );
        }
    }
}

/// Copies a folder tree (a fixture model to change in a test).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Trains per `cfg` on the CPU, raising the stop flag after step `stop_at`:
/// the model, the outcome, every step's info and the lines the trainer logged.
pub fn train_until(
    cfg: &dreambooth::dreambooth::config::TrainConfig,
    stop_at: Option<u64>,
) -> dreambooth::Result<(
    dreambooth::models::StableDiffusion,
    dreambooth::dreambooth::trainer::TrainOutcome,
    Vec<dreambooth::dreambooth::trainer::StepInfo>,
    Vec<String>,
)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    let mut steps = Vec::new();
    let mut lines = Vec::new();
    let mut log = |l: &str| lines.push(l.to_string());
    let mut on_step = |s: &dreambooth::dreambooth::trainer::StepInfo| {
        steps.push(s.clone());
        if Some(s.step) == stop_at {
            stop.store(true, Ordering::SeqCst);
        }
    };
    let mut ev = dreambooth::dreambooth::trainer::Events {
        log: &mut log,
        step: &mut on_step,
        stop: &stop,
    };
    let (model, outcome) = dreambooth::dreambooth::trainer::train(cfg, &Device::Cpu, &mut ev)?;
    Ok((model, outcome, steps, lines))
}

/// A fixture model (`tests/fixtures/NAME`), f32 on the CPU.
pub fn fixture_model(name: &str) -> dreambooth::models::StableDiffusion {
    dreambooth::models::StableDiffusion::load(
        &fixtures().join(name),
        &Device::Cpu,
        dreambooth::models::LoadOptions::default(),
    )
    .unwrap()
}

/// The largest |a − b|.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A pipeline's final latents against a diffusers fixture's
/// `final_latents` (relative L2 within 1e-4), and their decoded images
/// against its `images` (within 2/255).
pub fn assert_pipeline_parity(
    name: &str,
    model: &dreambooth::models::StableDiffusion,
    latents: &Tensor,
    fx: &HashMap<String, Tensor>,
) {
    assert_close(
        &format!("{name} final latents"),
        latents,
        &fx["final_latents"],
        1e-4,
    );
    let ours = dreambooth::diffusion::pipeline::decode_latents(model, latents).unwrap();
    let d = max_abs(&ours, &fx["images"]);
    println!("{name}: images max |Δ| {d:.2e} (×255 = {:.3})", d * 255.0);
    assert!(d < 2.0 / 255.0, "{name}: images differ by {d}");
}

/// The cases of a JSON fixture (`tests/fixtures/REL`): an object of name → case.
pub fn json_cases(rel: &str) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join(rel)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object().unwrap().clone()
}

/// A JSON array of strings (or numbers, via `f`) as a Vec.
pub fn json_list<T>(v: &serde_json::Value, f: impl Fn(&serde_json::Value) -> Option<T>) -> Vec<T> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| f(x).unwrap())
        .collect()
}
