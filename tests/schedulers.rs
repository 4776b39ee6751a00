//! Parity of the noise schedule and the samplers with diffusers 0.42.1.
//! Fixtures: `tools/parity/schedulers.py` → `tests/fixtures/schedulers/`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor};
use dreambooth::diffusion::{
    NoiseSchedule, PredictionType, SamplerKind, SchedulerConfig, make_sampler,
};
use serde_json::Value;

const TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

fn cases() -> Value {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap() as f64;
    let norm = norm.to_scalar::<f32>().unwrap() as f64;
    (diff / norm.max(1e-30)).sqrt()
}

/// The stand-in denoiser of the fixtures: 0.5·input·r1 + (t/1000)·r2.
fn model(x_in: &Tensor, t: f64, r1: &Tensor, r2: &Tensor) -> Tensor {
    let a = ((x_in * 0.5).unwrap() * r1).unwrap();
    (a + (r2 * (t / 1000.0)).unwrap()).unwrap()
}

#[test]
fn sampler_trajectories_match_diffusers() {
    let t = load("trajectories.safetensors");
    let (x_init, r1, r2, noise) = (&t["x_init"], &t["r1"], &t["r2"], &t["noise"]);
    let cases = cases();
    let mut worst: BTreeMap<String, (f64, String)> = BTreeMap::new();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind: SamplerKind = case["sampler"].as_str().unwrap().parse().unwrap();
        let cfg =
            SchedulerConfig::from_file(fixtures().join(case["config"].as_str().unwrap())).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let eta = case["eta"].as_f64().unwrap();
        let mut s = make_sampler(kind, &cfg, steps, eta).unwrap();

        let want_ts: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(s.timesteps(), want_ts.as_slice(), "{name}: timesteps");
        let want_sigma = case["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (s.init_noise_sigma() - want_sigma).abs() <= 1e-6 * want_sigma,
            "{name}: init_noise_sigma {} vs {want_sigma}",
            s.init_noise_sigma()
        );
        assert_eq!(
            s.needs_noise(),
            kind == SamplerKind::EulerAncestral || eta > 0.0
        );

        let samples = &t[&format!("{name}.samples")];
        let inputs = t.get(&format!("{name}.model_inputs"));
        let mut x = (x_init * s.init_noise_sigma()).unwrap();
        let mut case_worst = 0f64;
        for i in 0..steps {
            let x_in = s.scale_model_input(&x, i).unwrap();
            if let Some(inputs) = inputs {
                let e = rel_l2(&x_in, &inputs.i(i).unwrap());
                assert!(e < TOL, "{name}: model input at step {i}: rel err {e:e}");
            } else {
                assert_eq!(
                    rel_l2(&x_in, &x),
                    0.0,
                    "{name}: scale_model_input is identity"
                );
            }
            let out = model(&x_in, s.timesteps()[i], r1, r2);
            let z = noise.i(i).unwrap();
            let z = s.needs_noise().then_some(&z);
            x = s.step(&out, i, &x, z).unwrap();
            let e = rel_l2(&x, &samples.i(i).unwrap());
            assert!(e < TOL, "{name}: sample after step {i}: rel err {e:e}");
            case_worst = case_worst.max(e);
        }
        let entry = worst
            .entry(kind.name().to_string())
            .or_insert((0.0, String::new()));
        if case_worst >= entry.0 {
            *entry = (case_worst, name.to_string());
        }
    }
    for (kind, (e, case)) in &worst {
        println!("{kind:8} max rel L2 error {e:.2e} ({case})");
    }
    assert_eq!(worst.len(), 4);
}

#[test]
fn noise_schedule_matches_diffusers() {
    let t = load("schedules.safetensors");
    let (x0, eps) = (&t["x0"], &t["noise"]);
    for sch in cases()["schedules"].as_array().unwrap() {
        let name = sch["name"].as_str().unwrap();
        let cfg =
            SchedulerConfig::from_file(fixtures().join(sch["config"].as_str().unwrap())).unwrap();
        let ns = NoiseSchedule::new(&cfg).unwrap();
        assert_eq!(
            ns.prediction_type.as_str(),
            sch["prediction_type"].as_str().unwrap()
        );

        for (field, ours) in [("betas", &ns.betas), ("alphas_cumprod", &ns.alphas_cumprod)] {
            let want = t[&format!("{name}.{field}")].to_vec1::<f32>().unwrap();
            assert_eq!(ours.len(), want.len());
            let max_rel = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - *b as f64).abs() / (*b as f64).abs())
                .fold(0.0, f64::max);
            // Betas agree to an ulp of float32 (torch.linspace's own rounding).
            assert!(max_rel < 3e-7, "{name}: {field} max rel err {max_rel:e}");
            println!("{name:20} {field:15} max rel err {max_rel:.2e}");
        }

        let ts: Vec<usize> = sch["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let noisy = ns.add_noise(x0, eps, &ts).unwrap();
        let e = rel_l2(&noisy, &t[&format!("{name}.noisy")]);
        assert!(e < 1e-6, "{name}: add_noise rel err {e:e}");
        println!("{name:20} add_noise       rel L2 err  {e:.2e}");
        let v = ns.velocity(x0, eps, &ts).unwrap();
        let e = rel_l2(&v, &t[&format!("{name}.velocity")]);
        assert!(e < 1e-6, "{name}: velocity rel err {e:e}");
        let target = ns.target(x0, eps, &ts).unwrap();
        let want = match ns.prediction_type {
            PredictionType::Epsilon => eps,
            PredictionType::VPrediction => &v,
        };
        assert_eq!(rel_l2(&target, want), 0.0, "{name}: target");

        let snr_ts = sch["snr_timesteps"].as_array().unwrap();
        let snr = sch["snr"].as_array().unwrap();
        for (t, want) in snr_ts.iter().zip(snr) {
            let (t, want) = (t.as_u64().unwrap() as usize, want.as_f64().unwrap());
            let got = ns.snr(t);
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "{name}: snr({t}) = {got} vs {want}"
            );
        }
    }
}

#[test]
fn per_sample_coefficients_broadcast() {
    let cfg = SchedulerConfig::default();
    let ns = NoiseSchedule::new(&cfg).unwrap();
    let x0 = Tensor::ones((2, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let eps = x0.zeros_like().unwrap();
    let noisy = ns.add_noise(&x0, &eps, &[0, 999]).unwrap();
    let v = noisy.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    let a = |t: usize| ns.alphas_cumprod[t].sqrt() as f32;
    assert!(v[0].iter().all(|&x| (x - a(0)).abs() < 1e-7));
    assert!(v[1].iter().all(|&x| (x - a(999)).abs() < 1e-7));
    assert!(
        ns.add_noise(&x0, &eps, &[0]).is_err(),
        "batch of 2, one timestep"
    );
    assert!(
        ns.add_noise(&x0, &eps, &[0, 1000]).is_err(),
        "timestep out of range"
    );
}

#[test]
fn sampler_misuse_is_an_error() {
    let cfg = SchedulerConfig::default();
    assert!(make_sampler(SamplerKind::Ddim, &cfg, 0, 0.0).is_err());
    assert!(make_sampler(SamplerKind::Euler, &cfg, 1001, 0.0).is_err());
    assert!(make_sampler(SamplerKind::Ddim, &cfg, 10, -1.0).is_err());
    // Leading spacing with steps_offset pushes the first DDIM timestep past the end.
    let mut off = cfg.clone();
    off.steps_offset = 1;
    assert!(make_sampler(SamplerKind::Ddim, &off, 1000, 0.0).is_err());

    let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut a = make_sampler(SamplerKind::EulerAncestral, &cfg, 5, 0.0).unwrap();
    let err = a.step(&x, 0, &x, None).unwrap_err().to_string();
    assert!(err.contains("needs noise"), "{err}");
    assert!(a.step(&x, 5, &x, Some(&x)).is_err(), "step out of range");

    let mut d = make_sampler(SamplerKind::DpmPlusPlus, &cfg, 5, 0.0).unwrap();
    d.step(&x, 0, &x, None).unwrap();
    let err = d.step(&x, 2, &x, None).unwrap_err().to_string();
    assert!(err.contains("in order"), "{err}");
    // Restarting at step 0 is allowed.
    d.step(&x, 0, &x, None).unwrap();
    d.step(&x, 1, &x, None).unwrap();
}
