//! Parity of `ClipTextModel` with transformers' `CLIPTextModel`: last hidden
//! state, the clip_skip = 1 state diffusers' pipeline builds, and gradients of
//! sum(last_hidden_state · r) w.r.t. the weights; every parameter must receive a
//! nonzero gradient, and a finite-difference check (in f64) confirms the backward.
//!
//! tests/fixtures/parity/{sd1,sd2}_text.safetensors come from
//! tools/parity/vae_clip.py on the tiny pipelines in tests/fixtures/tiny-sd{1,2}.

mod common;
use common::to_f64;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use dreambooth::models::clip_text::{ClipTextConfig, ClipTextModel};
use dreambooth::nn::{Vb, read_safetensors, save_safetensors};

const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let (a, b) = (to_f64(a), to_f64(b));
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

fn check(name: &str, got: &Tensor, want: &Tensor, worst: &mut f64) {
    let e = rel_err(got, want);
    println!("{name:<60} rel L2 err {e:.2e}");
    assert!(e < TOL, "{name}: relative L2 error {e:.3e} ≥ {TOL:e}");
    *worst = worst.max(e);
}

fn model_dir(sd: &str) -> PathBuf {
    root().join(format!("tests/fixtures/tiny-{sd}/text_encoder"))
}

fn config(sd: &str) -> ClipTextConfig {
    ClipTextConfig::from_file(&model_dir(sd).join("config.json")).unwrap()
}

fn weights(sd: &str) -> HashMap<String, Tensor> {
    read_safetensors(&model_dir(sd).join("model.safetensors"), &Device::Cpu).unwrap()
}

fn fixture(sd: &str) -> HashMap<String, Tensor> {
    read_safetensors(
        &root().join(format!("tests/fixtures/parity/{sd}_text.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn ids(fx: &HashMap<String, Tensor>) -> Tensor {
    fx["ids"].to_dtype(DType::U32).unwrap()
}

fn parity(sd: &str) {
    let cfg = config(sd);
    let path = model_dir(sd).join("model.safetensors");
    let vb = Vb::from_file(&path, &Device::Cpu, true).unwrap();
    let model = ClipTextModel::new(&vb, &cfg).unwrap();
    vb.finish().unwrap();
    assert_eq!(model.key_prefix(), "");
    let fx = fixture(sd);
    let ids = ids(&fx);
    let mut worst = 0f64;

    let last = model.forward(&ids).unwrap();
    check(
        &format!("{sd} last_hidden_state"),
        &last,
        &fx["last_hidden_state"],
        &mut worst,
    );
    let skip1 = model.forward_with_skip(&ids, 1).unwrap();
    check(
        &format!("{sd} clip_skip=1"),
        &skip1,
        &fx["clip_skip_1"],
        &mut worst,
    );
    let states = model.all_hidden_states(&ids).unwrap();
    assert_eq!(states.len(), cfg.num_hidden_layers + 1);
    let from_states = model
        .final_layer_norm
        .forward(&states[cfg.num_hidden_layers - 1])
        .unwrap();
    assert!(rel_err(&from_states, &skip1) < 1e-7);
    assert!(
        model
            .forward_with_skip(&ids, cfg.num_hidden_layers)
            .is_err()
    );

    let loss = (&last * &fx["r"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let vars = vb.vars();
    assert_eq!(vars.len(), 4 + 16 * cfg.num_hidden_layers);
    for (key, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{key}`"));
        let m = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m > 0.0, "zero gradient for `{key}`");
    }

    // Token embedding: only the rows of ids that occur carry a gradient.
    let tok = grads
        .get(vars["embeddings.token_embedding.weight"].as_tensor())
        .unwrap();
    let rows = fx["grad_rows"].to_dtype(DType::U32).unwrap();
    let got_rows = tok.index_select(&rows, 0).unwrap();
    check(
        &format!("{sd} grad embeddings.token_embedding.weight (rows)"),
        &got_rows,
        &fx["grad.embeddings.token_embedding.weight.rows"],
        &mut worst,
    );
    let total = tok
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let in_rows = got_rows
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (total - in_rows).abs() <= 1e-6 * total,
        "gradient on token rows that do not occur"
    );

    let mut keys: Vec<&String> = fx
        .keys()
        .filter(|k| k.starts_with("grad.") && !k.ends_with(".rows"))
        .collect();
    keys.sort();
    assert!(keys.len() >= 7);
    for k in keys {
        let key = &k["grad.".len()..];
        let got = grads.get(vars[key].as_tensor()).unwrap();
        check(&format!("{sd} grad {key}"), got, &fx[k], &mut worst);
    }
    println!("{sd}: max rel L2 err over all text encoder tensors {worst:.2e}");
}

#[test]
fn clip_text_parity_sd1() {
    parity("sd1");
}

#[test]
fn clip_text_parity_sd2() {
    parity("sd2");
}

/// A checkpoint in the older layout (`text_model.` prefix, a stored
/// `position_ids` buffer) loads to the same model.
#[test]
fn clip_text_prefixed_checkpoint() {
    let cfg = config("sd1");
    let mut tensors: BTreeMap<String, Tensor> = weights("sd1")
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect();
    let pos = Tensor::arange(0i64, 77, &Device::Cpu)
        .unwrap()
        .reshape((1, 77))
        .unwrap();
    tensors.insert("text_model.embeddings.position_ids".into(), pos);
    let dir = std::env::temp_dir().join(format!("dreambooth-clip-prefixed-{}", std::process::id()));
    let path = dir.join("model.safetensors");
    save_safetensors(&tensors, &path, None).unwrap();
    let (model, vb) = ClipTextModel::load(&path, &cfg, &Device::Cpu, true).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(model.key_prefix(), "text_model");
    assert_eq!(vb.vars().len(), 4 + 16 * cfg.num_hidden_layers);
    assert!(
        vb.vars()
            .contains_key("text_model.encoder.layers.0.self_attn.q_proj.weight")
    );
    let fx = fixture("sd1");
    let last = model.forward(&ids(&fx)).unwrap();
    assert!(rel_err(&last, &fx["last_hidden_state"]) < TOL);

    // A random init uses the prefixed names too.
    let vb = Vb::random(0, &Device::Cpu, true);
    let m = ClipTextModel::new(&vb, &cfg).unwrap();
    assert_eq!(m.key_prefix(), "text_model");
    assert!(vb.vars().contains_key("text_model.final_layer_norm.weight"));
}

#[test]
fn clip_text_config_defaults_and_errors() {
    let d = ClipTextConfig::default();
    assert_eq!(
        (d.vocab_size, d.hidden_size, d.num_hidden_layers),
        (49408, 512, 12)
    );
    assert_eq!(d.hidden_act, "quick_gelu");
    assert_eq!(d.layer_norm_eps, 1e-5);
    assert_eq!(
        (d.pad_token_id, d.bos_token_id, d.eos_token_id),
        (1, 49406, 49407)
    );
    assert_eq!(config("sd2").hidden_act, "gelu");

    let dir = std::env::temp_dir().join(format!("dreambooth-clip-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        r#"{"hidden_act": "relu", "hidden_size": 32, "num_attention_heads": 4}"#,
    )
    .unwrap();
    let err = ClipTextConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("relu") && err.contains(&path.display().to_string()),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Central differences in f64 against the autograd gradient, on a few elements
/// of several weights (attention, MLP, layer norm, embeddings), both activations.
#[test]
fn clip_text_finite_differences() {
    for sd in ["sd1", "sd2"] {
        let cfg = config(sd);
        let tensors: HashMap<String, Tensor> = weights(sd)
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
            .collect();
        let vb = Vb::from_tensors(&PathBuf::from("f64"), tensors, &Device::Cpu, true);
        let model = ClipTextModel::new(&vb, &cfg).unwrap();
        let fx = fixture(sd);
        // Two short rows keep it fast; the causal mask still matters.
        let ids = ids(&fx).narrow(1, 0, 12).unwrap();
        let r = fx["r"]
            .narrow(1, 0, 12)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let loss_of = || -> f64 {
            let out = model.forward(&ids).unwrap();
            (out * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let out = model.forward(&ids).unwrap();
        let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let vars = vb.vars();
        let tok_id = ids.i((0, 2)).unwrap().to_scalar::<u32>().unwrap() as usize;
        let cases: [(&str, [usize; 2]); 6] = [
            ("encoder.layers.0.self_attn.q_proj.weight", [3, 5]),
            ("encoder.layers.1.self_attn.k_proj.weight", [7, 1]),
            ("encoder.layers.2.mlp.fc1.weight", [10, 20]),
            ("encoder.layers.0.layer_norm2.weight", [4, 0]),
            ("final_layer_norm.bias", [9, 0]),
            ("embeddings.token_embedding.weight", [tok_id, 6]),
        ];
        let h = 1e-5;
        for (key, idx) in cases {
            let var = &vars[key];
            let g = grads.get(var.as_tensor()).unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let flat = if orig.rank() == 1 {
                idx[0]
            } else {
                idx[0] * orig.dim(1).unwrap() + idx[1]
            };
            let analytic = to_f64(g)[flat];
            let at = |delta: f64| -> f64 {
                let mut v = to_f64(&orig);
                v[flat] += delta;
                var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            var.set(&orig).unwrap();
            let err = (numeric - analytic).abs() / analytic.abs().max(1e-3);
            println!(
                "{sd} {key}{idx:?}: autograd {analytic:.8} finite diff {numeric:.8} rel {err:.1e}"
            );
            // 5e-6: candle's gelu_erf backward uses 0.398942 for 1/sqrt(2π) (7e-7 off).
            assert!(
                err < 5e-6,
                "{sd} {key}{idx:?}: autograd {analytic} vs finite difference {numeric}"
            );
        }
    }
}
