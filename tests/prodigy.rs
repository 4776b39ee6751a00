//! Prodigy against prodigyopt 1.1 (tools/parity/prodigy.py): the same
//! weights and step-size estimate after every step of two configurations
//! (diffusers' advanced-script settings; prodigyopt's own with a growth cap),
//! a first step of zero gradients skipped, and a save / restore of the state
//! in the middle that ends where an uninterrupted run ends.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use dreambooth::optim::{Prodigy, ProdigyConfig};
use serde_json::Value;

fn cases() -> serde_json::Map<String, Value> {
    common::json_cases("parity/prodigy.json")
}

fn config(case: &Value) -> ProdigyConfig {
    ProdigyConfig {
        weight_decay: case["weight_decay"].as_f64().unwrap(),
        use_bias_correction: case["use_bias_correction"].as_bool().unwrap(),
        safeguard_warmup: case["safeguard_warmup"].as_bool().unwrap(),
        beta3: case["beta3"].as_f64(),
        d_coef: case["d_coef"].as_f64().unwrap(),
        growth_rate: case["growth_rate"].as_f64().unwrap_or(f64::INFINITY),
        ..ProdigyConfig::default()
    }
}

fn vars(fx: &std::collections::HashMap<String, Tensor>, name: &str) -> BTreeMap<String, Var> {
    ["a", "b"]
        .iter()
        .map(|k| {
            let t = fx[&format!("{name}.{k}")].copy().unwrap();
            (k.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn grads(
    fx: &std::collections::HashMap<String, Tensor>,
    name: &str,
    t: usize,
) -> BTreeMap<String, Tensor> {
    ["a", "b"]
        .iter()
        .map(|k| (k.to_string(), fx[&format!("{name}.g{t}.{k}")].clone()))
        .collect()
}

#[test]
fn prodigy_matches_prodigyopt() {
    let fx = common::load("parity/prodigy.safetensors");
    for (name, case) in cases() {
        let lrs: Vec<f64> = common::json_list(&case["lrs"], Value::as_f64);
        let want_d = common::to_f64(&fx[&format!("{name}.d")]);
        let vs = vars(&fx, &name);
        let mut opt = Prodigy::new(vs.clone(), config(&case)).unwrap();
        for (t, &lr) in lrs.iter().enumerate() {
            opt.step_map(&grads(&fx, &name, t), lr, 1.0).unwrap();
            let rel = (opt.d - want_d[t]).abs() / want_d[t];
            assert!(
                rel < 1e-5,
                "{name} step {t}: d {} vs prodigyopt {}",
                opt.d,
                want_d[t]
            );
            for k in ["a", "b"] {
                let want = &fx[&format!("{name}.p{t}.{k}")];
                let got = vs[k].as_tensor();
                let e = common::rel_err(got, want);
                assert!(e < 1e-5, "{name} step {t} `{k}`: rel err {e:.2e}");
            }
        }
        // prodigyopt does not count the all-zero first step.
        assert_eq!(opt.step, case["final_k"].as_u64().unwrap(), "{name}");
        assert!(opt.d > 2.0 * 1e-6, "{name}: d never grew ({})", opt.d);
    }
}

#[test]
fn prodigy_state_round_trip_resumes_exactly() {
    let fx = common::load("parity/prodigy.safetensors");
    let cases = cases();
    let case = &cases["plain"];
    let lrs: Vec<f64> = common::json_list(&case["lrs"], Value::as_f64);
    let whole_vars = vars(&fx, "plain");
    let mut whole = Prodigy::new(whole_vars.clone(), config(case)).unwrap();
    for (t, &lr) in lrs.iter().enumerate() {
        whole.step_map(&grads(&fx, "plain", t), lr, 0.8).unwrap();
    }
    // The first half, saved; a fresh optimizer on the saved weights, the rest.
    let half = lrs.len() / 2;
    let first_vars = vars(&fx, "plain");
    let mut first = Prodigy::new(first_vars.clone(), config(case)).unwrap();
    for (t, &lr) in lrs.iter().enumerate().take(half) {
        first.step_map(&grads(&fx, "plain", t), lr, 0.8).unwrap();
    }
    let state = first.state().unwrap();
    let resumed_vars: BTreeMap<String, Var> = first_vars
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect();
    let mut resumed = Prodigy::new(resumed_vars.clone(), config(case)).unwrap();
    resumed.load_state(&state, first.step).unwrap();
    for (t, &lr) in lrs.iter().enumerate().skip(half) {
        resumed.step_map(&grads(&fx, "plain", t), lr, 0.8).unwrap();
    }
    assert_eq!(resumed.d.to_bits(), whole.d.to_bits());
    for k in ["a", "b"] {
        let (a, b) = (resumed_vars[k].as_tensor(), whole_vars[k].as_tensor());
        let same = a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "`{k}` differs after resuming");
    }
    // A state from another optimizer is an error naming what is missing.
    let mut other = Prodigy::new(vars(&fx, "plain"), config(case)).unwrap();
    let mut bad = state.clone();
    bad.remove("p0.a");
    let e = other.load_state(&bad, 3).unwrap_err().to_string();
    assert!(e.contains("p0.a") && e.contains("--optimizer"), "{e}");
    let _ = Device::Cpu;
}
