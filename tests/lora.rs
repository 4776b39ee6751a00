//! LoRA: adapters against peft + diffusers (fixtures from tools/parity/lora.py),
//! the peft and kohya formats, merging, errors, and a LoRA training run.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, load, rel_err};
use dreambooth::dreambooth::config::TrainConfig;
use dreambooth::models::lora::{self, KohyaNames, LoraFormat, LoraSpec};
use dreambooth::models::{LoadOptions, StableDiffusion};
use dreambooth::nn::{read_safetensors, save_safetensors};

fn tiny(name: &str) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(name), &Device::Cpu, LoadOptions::default()).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dreambooth-lora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn io() -> std::collections::HashMap<String, Tensor> {
    load("parity/sd1_lora_io.safetensors")
}

fn peft_file() -> PathBuf {
    fixtures().join("parity/sd1_lora_peft.safetensors")
}

/// UNet output and text-encoder output at the fixture's inputs.
fn outputs(
    sd: &StableDiffusion,
    fx: &std::collections::HashMap<String, Tensor>,
) -> (Tensor, Tensor) {
    let u = sd
        .unet
        .forward(&fx["sample"], &fx["timesteps"], &fx["context"])
        .unwrap();
    let ids = fx["ids"].to_dtype(DType::U32).unwrap();
    let t = sd.text_encoder.forward(&ids).unwrap();
    (u, t)
}

fn err_text<T: std::fmt::Debug>(r: dreambooth::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn randomize(vars: &BTreeMap<String, candle_core::Var>, seed: u64) {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    for v in vars.values() {
        let t = dreambooth::util::randn(&mut rng, v.as_tensor().dims(), &Device::Cpu).unwrap();
        v.set(&(t * 0.2).unwrap()).unwrap();
    }
}

#[test]
fn peft_file_gives_diffusers_output() {
    let fx = io();
    let mut sd = tiny("tiny-sd1");
    let (base_u, base_t) = outputs(&sd, &fx);
    assert_close("unet without LoRA", &base_u, &fx["out_base"], 1e-4);
    assert_close("text encoder without LoRA", &base_t, &fx["te_base"], 1e-4);

    let f = lora::attach_file(&mut sd, &peft_file(), 1.0).unwrap();
    assert_eq!(f.format, LoraFormat::Peft);
    // UNet: 11 transformer blocks (4 down, 1 mid, 6 up) × 2 attentions × 4; TE: 3 layers × 4.
    assert_eq!(f.counts(), (11 * 2 * 4, 3 * 4));
    assert!(
        f.adapters.iter().all(|a| a.alpha == 8.0),
        "alpha from lora_adapter_metadata"
    );
    let (u, t) = outputs(&sd, &fx);
    assert_close("unet with peft LoRA (runtime)", &u, &fx["out"], 1e-4);
    assert_close(
        "text encoder with peft LoRA (runtime)",
        &t,
        &fx["te_out"],
        1e-4,
    );

    lora::detach_all(&mut sd);
    lora::attach_file(&mut sd, &peft_file(), 0.5).unwrap();
    let (u, _) = outputs(&sd, &fx);
    assert_close(
        "unet with peft LoRA at scale 0.5",
        &u,
        &fx["out_half"],
        1e-4,
    );

    // The same weights under diffusers' older names, alpha folded into B.
    let mut sd = tiny("tiny-sd1");
    lora::attach_file(
        &mut sd,
        &fixtures().join("parity/sd1_lora_diffusers.safetensors"),
        1.0,
    )
    .unwrap();
    let (u, t) = outputs(&sd, &fx);
    assert_close("unet with diffusers-named LoRA", &u, &fx["out"], 1e-4);
    assert_close(
        "text encoder with diffusers-named LoRA",
        &t,
        &fx["te_out"],
        1e-4,
    );

    // Folded into the weights.
    let mut sd = tiny("tiny-sd1");
    lora::merge_file(&mut sd, &peft_file(), 1.0).unwrap();
    let (u, t) = outputs(&sd, &fx);
    assert_close("unet with peft LoRA merged", &u, &fx["out"], 1e-4);
    assert_close(
        "text encoder with peft LoRA merged",
        &t,
        &fx["te_out"],
        1e-4,
    );
}

/// Gradients of sum(out · R) w.r.t. the adapters' A and B equal peft's.
#[test]
fn adapter_gradients_match_peft() {
    let fx = io();
    let mut sd = tiny("tiny-sd1");
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let vars = lora::attach_trainable(&mut sd, &spec).unwrap();
    let file = read_safetensors(&peft_file(), &Device::Cpu).unwrap();
    assert_eq!(vars.len(), 11 * 2 * 4 * 2);
    for (k, v) in &vars {
        v.set(
            file.get(k)
                .unwrap_or_else(|| panic!("{k} not in the peft file")),
        )
        .unwrap();
    }
    let out = sd
        .unet
        .forward(&fx["sample"], &fx["timesteps"], &fx["context"])
        .unwrap();
    assert_close("unet with trainable adapters", &out, &fx["out"], 1e-4);
    let grads = (out * &fx["r"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut n = 0;
    for (k, g) in fx.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let key = &k["grad.".len()..];
        let ours = grads
            .get(&vars[key])
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        assert_close(&format!("grad {key}"), ours, g, 1e-4);
        n += 1;
    }
    assert_eq!(n, 6);
    // The frozen base takes no gradient.
    let base = sd.unet_vb.tensors();
    let w = &base["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"];
    assert!(grads.get(w).is_none());
}

#[test]
fn untrained_adapters_change_nothing() {
    let fx = io();
    let mut sd = tiny("tiny-sd1");
    let (base_u, base_t) = outputs(&sd, &fx);
    let spec = LoraSpec {
        rank: 2,
        alpha: 3.0,
        targets: "all-linear+conv".parse().unwrap(),
        text_encoder: true,
        ..Default::default()
    };
    let vars = lora::attach_trainable(&mut sd, &spec).unwrap();
    assert!(vars.keys().any(|k| k.contains("resnets.0.conv1.lora_A")));
    assert!(vars.keys().any(|k| k.contains("time_emb_proj.lora_B")));
    assert!(
        vars.keys().any(|k| k.contains("proj_in.lora_A")),
        "SD1's 1×1 conv proj_in under +conv"
    );
    assert!(
        vars.keys()
            .any(|k| k.starts_with("text_encoder.text_model.encoder.layers.0.self_attn.q_proj"))
    );
    let (u, t) = outputs(&sd, &fx);
    assert_eq!(
        rel_err(&u, &base_u),
        0.0,
        "an untrained (B = 0) adapter must change nothing"
    );
    assert_eq!(rel_err(&t, &base_t), 0.0);
    // A's init is peft's kaiming-uniform(a=√5): |A| ≤ 1/√fan_in.
    let a = &vars["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"];
    let bound = 1.0 / (a.dim(1).unwrap() as f32).sqrt();
    let max = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        max <= bound && max > 0.5 * bound,
        "max |A| {max} vs bound {bound}"
    );
}

/// peft → kohya (diffusers and LDM names) → the same model.
#[test]
fn kohya_round_trip() {
    let fx = io();
    let dir = tmp("kohya");
    let mut sd = tiny("tiny-sd1");
    lora::attach_file(&mut sd, &peft_file(), 1.0).unwrap();
    let (ref_u, ref_t) = outputs(&sd, &fx);

    let kohya = lora::export_kohya(&sd, &dir.join("k.safetensors"), KohyaNames::Diffusers).unwrap();
    let ldm = lora::export_kohya(&sd, &dir.join("k_ldm.safetensors"), KohyaNames::Ldm).unwrap();
    let peft = lora::export_peft(&sd, &dir.join("p.safetensors")).unwrap();

    let meta = lora::read_metadata(&kohya).unwrap();
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_network_alpha"], "8.0");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    let k = read_safetensors(&kohya, &Device::Cpu).unwrap();
    for key in [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ] {
        assert!(k.contains_key(key), "kohya export lacks {key}");
    }
    let l = read_safetensors(&ldm, &Device::Cpu).unwrap();
    for key in [
        // tiny-sd1 has SD 1.5's numbering: 2 layers per block, 3 levels.
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_up.weight",
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_k.alpha",
        "lora_unet_output_blocks_8_1_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
    ] {
        assert!(l.contains_key(key), "LDM-named kohya export lacks {key}");
    }

    for (name, path, format) in [
        ("kohya", &kohya, LoraFormat::Kohya),
        ("kohya LDM names", &ldm, LoraFormat::Kohya),
        ("peft export", &peft, LoraFormat::Peft),
    ] {
        let mut sd2 = tiny("tiny-sd1");
        let f = lora::attach_file(&mut sd2, path, 1.0).unwrap();
        assert_eq!(f.format, format);
        let (u, t) = outputs(&sd2, &fx);
        assert_close(&format!("unet via {name}"), &u, &ref_u, 1e-5);
        assert_close(&format!("text encoder via {name}"), &t, &ref_t, 1e-5);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Folding adapters (with convolutions) into the weights equals applying them
/// at run time, and `merge`'s written model reloads with that output.
#[test]
fn merge_equals_runtime_adapter() {
    let fx = io();
    let dir = tmp("merge");
    let mut sd = tiny("tiny-sd1");
    let spec = LoraSpec {
        rank: 3,
        alpha: 5.0,
        targets: "all-linear+conv".parse().unwrap(),
        text_encoder: true,
        seed: 9,
        ..Default::default()
    };
    let vars = lora::attach_trainable(&mut sd, &spec).unwrap();
    randomize(&vars, 1);
    let file = lora::export_peft(&sd, &dir.join("l.safetensors")).unwrap();
    let (trained_u, _) = outputs(&sd, &fx);

    let mut runtime = tiny("tiny-sd1");
    lora::attach_file(&mut runtime, &file, 0.7).unwrap();
    let mut merged = tiny("tiny-sd1");
    lora::merge_file(&mut merged, &file, 0.7).unwrap();
    let (ru, rt) = outputs(&runtime, &fx);
    let (mu, mt) = outputs(&merged, &fx);
    assert_close("merged vs runtime unet", &mu, &ru, 1e-5);
    assert_close("merged vs runtime text encoder", &mt, &rt, 1e-5);
    assert!(
        rel_err(&ru, &trained_u) > 1e-3,
        "scale 0.7 must differ from scale 1"
    );

    // Written as a diffusers folder and reloaded.
    dreambooth::dreambooth::export::save_diffusers(&merged, &dir.join("model")).unwrap();
    let reloaded =
        StableDiffusion::load(&dir.join("model"), &Device::Cpu, LoadOptions::default()).unwrap();
    let (lu, lt) = outputs(&reloaded, &fx);
    assert_close("reloaded merged unet", &lu, &ru, 1e-5);
    assert_close("reloaded merged text encoder", &lt, &rt, 1e-5);

    // Adapters trained on the model fold in the same way.
    let n = lora::merge_attached(&mut sd).unwrap();
    assert!(n > 0 && lora::attached(&sd).is_empty());
    let (fu, _) = outputs(&sd, &fx);
    assert_close("merge_attached", &fu, &trained_u, 1e-5);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn wrong_shapes_and_unknown_keys_are_errors() {
    let dir = tmp("errors");
    let sd = tiny("tiny-sd1");
    let good: BTreeMap<String, Tensor> = read_safetensors(&peft_file(), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let write = |name: &str, t: &BTreeMap<String, Tensor>| -> PathBuf {
        let p = dir.join(name);
        save_safetensors(t, &p, None).unwrap();
        p
    };

    // A of the wrong width: the key and both shapes are named.
    let key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight";
    let mut bad = good.clone();
    bad.insert(
        key.into(),
        Tensor::zeros((4, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = err_text(lora::read_lora(&sd, &write("shape.safetensors", &bad)));
    assert!(
        e.contains(key) && e.contains("[4, 7]") && e.contains("[4, 32]"),
        "{e}"
    );

    // B of the wrong rank.
    let key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight";
    let mut bad = good.clone();
    bad.insert(
        key.into(),
        Tensor::zeros((32, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = err_text(lora::read_lora(&sd, &write("rank.safetensors", &bad)));
    assert!(
        e.contains(key) && e.contains("[32, 5]") && e.contains("[32, 4]"),
        "{e}"
    );

    // Keys of no known family, or naming no layer.
    for key in [
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_a",
        "something_else.weight",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ] {
        let mut bad = good.clone();
        bad.insert(
            key.into(),
            Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = err_text(lora::read_lora(&sd, &write("unknown.safetensors", &bad)));
        assert!(e.contains(key), "error for {key} does not name it: {e}");
        println!("{e}");
    }

    // An A without its B.
    let mut bad = good.clone();
    bad.remove("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight");
    let e = err_text(lora::read_lora(&sd, &write("half.safetensors", &bad)));
    assert!(e.contains("attn1.to_q.lora_A.weight"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The matmul that skips a frozen operand's gradient gives candle's numbers.
#[test]
fn frozen_matmul_matches_candle() {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let dev = Device::Cpu;
    let x =
        candle_core::Var::from_tensor(&dreambooth::util::randn(&mut rng, &[5, 7], &dev).unwrap())
            .unwrap();
    let w = dreambooth::util::randn(&mut rng, &[6, 7], &dev).unwrap();
    let r = dreambooth::util::randn(&mut rng, &[5, 6], &dev).unwrap();
    let ours = dreambooth::nn::lora::matmul(x.as_tensor(), &w.t().unwrap()).unwrap();
    let theirs = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    assert_eq!(rel_err(&ours, &theirs), 0.0);
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(rel_err(g1.get(&x).unwrap(), g2.get(&x).unwrap()), 0.0);
    // Frozen on the right: only the left operand (a weight) is tracked.
    let wv = candle_core::Var::from_tensor(&w).unwrap();
    let c = dreambooth::util::randn(&mut rng, &[7, 4], &dev).unwrap();
    let r2 = dreambooth::util::randn(&mut rng, &[6, 4], &dev).unwrap();
    let a = dreambooth::nn::lora::matmul(wv.as_tensor(), &c).unwrap();
    let b = wv.as_tensor().matmul(&c).unwrap();
    let ga = (a * &r2).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * &r2).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(rel_err(ga.get(&wv).unwrap(), gb.get(&wv).unwrap()), 0.0);
    assert!(ga.get(&c).is_none());
}

#[test]
fn frozen_weight_bmm_matches_broadcast_matmul() {
    // A LoRA base's 1×1 convolution on the GPU: a frozen (O, C) weight times
    // a tracked (B, C, N) batch; the weight gets no gradient.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(4);
    let dev = Device::Cpu;
    let randn =
        |rng: &mut rand::rngs::StdRng, d: &[usize]| dreambooth::util::randn(rng, d, &dev).unwrap();
    let x = candle_core::Var::from_tensor(&randn(&mut rng, &[3, 5, 11])).unwrap();
    let w = randn(&mut rng, &[4, 5]);
    let r = randn(&mut rng, &[3, 4, 11]);
    let ours = dreambooth::nn::lora::frozen_weight_bmm(&w, x.as_tensor()).unwrap();
    let theirs = w.broadcast_matmul(x.as_tensor()).unwrap();
    assert_eq!(ours.dims(), &[3, 4, 11]);
    assert!(rel_err(&ours, &theirs) < 1e-6);
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(rel_err(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-6);
    assert!(g1.get(&w).is_none());
    let err =
        dreambooth::nn::lora::frozen_weight_bmm(&w, &randn(&mut rng, &[3, 6, 2])).unwrap_err();
    assert!(err.to_string().contains("frozen_weight_bmm"), "{err}");
}

/// Whether any element of `t` is nonzero.
fn nonzero(t: &Tensor) -> bool {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        > 0.0
}

/// Two 40×40 patterned photos in `dir/instance`.
fn instance_photos(dir: &Path) -> PathBuf {
    let inst = dir.join("instance");
    std::fs::create_dir_all(&inst).unwrap();
    for i in 0..2u8 {
        let img = image::RgbImage::from_fn(40, 40, |x, y| {
            image::Rgb([(x * 6) as u8 ^ (i * 90), (y * 6) as u8, 128])
        });
        img.save(inst.join(format!("p{i}.png"))).unwrap();
    }
    inst
}

fn lora_config(instance: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: Some(fixtures().join("tiny-sd1")),
        instance_dir: instance.to_path_buf(),
        instance_prompt: "a photo of sks ball".into(),
        class_prompt: Some("a photo of ball".into()),
        with_prior_preservation: true,
        num_class_images: 2,
        output_dir: out.to_path_buf(),
        resolution: Some(32),
        center_crop: true,
        max_train_steps: 4,
        learning_rate: 1e-2,
        checkpointing_steps: 2,
        validation_prompt: vec!["a photo of sks ball".into()],
        validation_steps: 2,
        num_validation_images: 1,
        class_steps: 2,
        sample_steps: 2,
        train_text_encoder: true,
        lora: true,
        lora_rank: 2,
        lora_alpha: Some(4.0),
        lora_dropout: 0.1,
        lora_targets: "attn+ff+conv".into(),
        ..Default::default()
    }
}

fn run(
    cfg: &TrainConfig,
    stop_at: Option<u64>,
) -> (
    StableDiffusion,
    dreambooth::dreambooth::trainer::TrainOutcome,
) {
    let (model, outcome, ..) = common::train_until(cfg, stop_at).unwrap();
    (model, outcome)
}

/// `train --lora`: only the adapters change, checkpoints hold adapters and
/// optimizer state only, a resumed run ends where an uninterrupted one does,
/// and both LoRA files come out and load.
#[test]
fn lora_training_run() {
    let dir = tmp("train");
    let inst = instance_photos(&dir);
    let cfg = lora_config(&inst, &dir.join("full"));
    let (sd, out) = run(&cfg, None);
    assert!(out.model_dir.is_none());
    assert_eq!(out.lora_files.len(), 2);
    let ckpt = out.last_checkpoint.clone().expect("a checkpoint at step 2");
    let mut names: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "state.json",
            "text_encoder_lora.optimizer.safetensors",
            "text_encoder_lora.safetensors",
            "unet_lora.optimizer.safetensors",
            "unet_lora.safetensors"
        ]
    );
    let ck = read_safetensors(&ckpt.join("unet_lora.safetensors"), &Device::Cpu).unwrap();
    assert!(
        ck.keys()
            .all(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
    );

    // The base weights did not move; the adapters did.
    let base = tiny("tiny-sd1");
    let (b0, b1) = (base.unet_vb.tensors(), sd.unet_vb.tensors());
    for (k, t) in &b0 {
        assert_eq!(rel_err(&b1[k], t), 0.0, "{k} changed");
    }
    let vars = lora::trainable_vars(&sd);
    let b = &vars["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"];
    assert!(nonzero(b.as_tensor()));

    // Resume from step 2 → the same adapters at step 4.
    let cfg2 = TrainConfig {
        output_dir: dir.join("resumed"),
        ..cfg.clone()
    };
    let (_, o) = run(&cfg2, Some(2));
    assert!(o.interrupted);
    let cfg3 = TrainConfig {
        resume: Some("latest".into()),
        ..cfg2.clone()
    };
    let (sd3, _) = run(&cfg3, None);
    let v3 = lora::trainable_vars(&sd3);
    for (k, v) in &vars {
        assert_eq!(
            rel_err(v3[k].as_tensor(), v.as_tensor()),
            0.0,
            "{k} differs after resume"
        );
    }

    // Both exports load and give the trained model's output.
    let fx = io();
    let (want, want_t) = outputs(&sd, &fx);
    for f in &out.lora_files {
        let mut m = tiny("tiny-sd1");
        lora::attach_file(&mut m, f, 1.0).unwrap();
        let (u, t) = outputs(&m, &fx);
        assert_close(&format!("unet via {}", f.display()), &u, &want, 1e-5);
        assert_close(
            &format!("text encoder via {}", f.display()),
            &t,
            &want_t,
            1e-5,
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// LoRA with f16 mixed precision: the frozen base is stored in f16, the
/// adapters stay f32 and train, and the exported adapters, loaded on the f32
/// base, give the trained model's output to f16 rounding.
#[test]
fn lora_training_in_fp16_mixed_precision() {
    let dir = tmp("train-fp16");
    let inst = instance_photos(&dir);
    let cfg = TrainConfig {
        mixed_precision: "fp16".into(),
        train_text_encoder: false,
        lora_dropout: 0.0,
        checkpointing_steps: 0,
        validation_steps: 0,
        ..lora_config(&inst, &dir.join("out"))
    };
    let (sd, out) = run(&cfg, None);
    assert_eq!(sd.unet.conv_in.weight.dtype(), candle_core::DType::F16);
    let vars = lora::trainable_vars(&sd);
    assert!(!vars.is_empty());
    let mut moved = 0;
    for (k, v) in &vars {
        assert_eq!(v.dtype(), candle_core::DType::F32, "{k}");
        if k.ends_with("lora_B.weight") && nonzero(v.as_tensor()) {
            moved += 1;
        }
    }
    assert!(moved > 0, "no adapter trained");
    let fx = io();
    let (want, _) = outputs(&sd, &fx);
    let mut m = tiny("tiny-sd1");
    lora::attach_file(&mut m, &out.lora_files[0], 1.0).unwrap();
    let (got, _) = outputs(&m, &fx);
    let e = rel_err(&got, &want.to_dtype(candle_core::DType::F32).unwrap());
    assert!(
        e < 5e-3,
        "f32 base + exported adapters vs the f16 model: {e:.2e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes files for tools/parity/lora_check.py when DREAMBOOTH_LORA_CHECK_DIR
/// is set: our exports of random adapters on every kind of layer, and our
/// outputs with them.
#[test]
fn export_for_diffusers_check() {
    let Some(dir) = std::env::var_os("DREAMBOOTH_LORA_CHECK_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fx = io();
    for (name, targets) in [("attn", "attn"), ("all", "all-linear+conv")] {
        let mut sd = tiny("tiny-sd1");
        let spec = LoraSpec {
            rank: 4,
            alpha: 2.0,
            targets: targets.parse().unwrap(),
            text_encoder: true,
            seed: 5,
            ..Default::default()
        };
        let vars = lora::attach_trainable(&mut sd, &spec).unwrap();
        randomize(&vars, 2);
        lora::export_peft(&sd, &dir.join(format!("{name}_peft.safetensors"))).unwrap();
        lora::export_kohya(
            &sd,
            &dir.join(format!("{name}_kohya.safetensors")),
            KohyaNames::Diffusers,
        )
        .unwrap();
        let (u, t) = outputs(&sd, &fx);
        let mut io = BTreeMap::new();
        for k in ["sample", "timesteps", "context", "ids"] {
            io.insert(k.to_string(), fx[k].clone());
        }
        io.insert("out".into(), u);
        io.insert("te_out".into(), t);
        save_safetensors(&io, &dir.join(format!("{name}_io.safetensors")), None).unwrap();
    }
}

/// SD 2.x style (linear proj_in/proj_out, one layer per block, gelu text
/// encoder): every adapter kind through peft, kohya and LDM-named kohya.
#[test]
fn sd2_round_trips() {
    let dir = tmp("sd2");
    let fx = load("parity/sd2_unet.safetensors");
    let ids = Tensor::new(&[[5u32, 17, 300, 12, 1, 1]], &Device::Cpu).unwrap();
    let run = |sd: &StableDiffusion| {
        let u = sd
            .unet
            .forward(&fx["sample"], &fx["timesteps"], &fx["context"])
            .unwrap();
        (u, sd.text_encoder.forward(&ids).unwrap())
    };
    let mut sd = tiny("tiny-sd2");
    let spec = LoraSpec {
        rank: 2,
        alpha: 1.0,
        targets: "all-linear+conv".parse().unwrap(),
        text_encoder: true,
        ..Default::default()
    };
    let vars = lora::attach_trainable(&mut sd, &spec).unwrap();
    assert!(
        vars.keys()
            .any(|k| k.ends_with("attentions.0.proj_in.lora_A.weight"))
    );
    randomize(&vars, 4);
    let (ref_u, ref_t) = run(&sd);
    let files = [
        lora::export_peft(&sd, &dir.join("p.safetensors")).unwrap(),
        lora::export_kohya(&sd, &dir.join("k.safetensors"), KohyaNames::Diffusers).unwrap(),
        lora::export_kohya(&sd, &dir.join("l.safetensors"), KohyaNames::Ldm).unwrap(),
    ];
    assert_eq!(
        lora::read_metadata(&files[1]).unwrap()["ss_base_model_version"],
        "sd_v2"
    );
    for f in &files {
        let mut m = tiny("tiny-sd2");
        let lf = lora::attach_file(&mut m, f, 1.0).unwrap();
        assert_eq!(lf.adapters.len() * 2, vars.len());
        let (u, t) = run(&m);
        assert_close(&format!("sd2 unet via {}", f.display()), &u, &ref_u, 1e-5);
        assert_close(
            &format!("sd2 text encoder via {}", f.display()),
            &t,
            &ref_t,
            1e-5,
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
