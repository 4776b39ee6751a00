//! Single-file (LDM layout) checkpoints against the tiny diffusers pipelines.
//!
//! tests/fixtures/tiny-sd{1,2}.safetensors were written by
//! tools/parity/single_file.py: the tiny pipelines' weights renamed to the LDM
//! layout by an independent Python mapping (checked there against diffusers' own
//! single-file converters), with the pipeline configs in the metadata.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dreambooth::diffusion::{PredictionType, SchedulerConfig};
use dreambooth::models::UNetConfig;
use dreambooth::models::clip_text::ClipTextConfig;
use dreambooth::models::single_file::{
    self, Family, SaveConfigs, SingleFileComponents, SingleFileOptions, load_components,
    save_single_file,
};
use dreambooth::models::vae::VaeConfig;
use dreambooth::nn::{read_safetensors, save_safetensors};

fn pipeline(name: &str) -> PathBuf {
    common::fixtures().join(format!("tiny-{name}"))
}

fn single(name: &str) -> PathBuf {
    common::fixtures().join(format!("tiny-{name}.safetensors"))
}

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dreambooth-single-file-{tag}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The diffusers folder's weights; text encoder keys under `text_model.`.
fn folder_weights(name: &str) -> [HashMap<String, Tensor>; 3] {
    let dir = pipeline(name);
    let unet = read_safetensors(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let vae = read_safetensors(
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let text = read_safetensors(&dir.join("text_encoder/model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let k = if k.starts_with("text_model.") {
                k
            } else {
                format!("text_model.{k}")
            };
            (k, t)
        })
        .collect();
    [unet, vae, text]
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.dtype() == b.dtype()
        && a.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            == b.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
}

/// Exactly the same keys, every tensor bit-identical.
fn assert_same_tensors<K: AsRef<str> + Ord + Clone + std::fmt::Debug>(
    what: &str,
    got: impl IntoIterator<Item = (K, Tensor)>,
    want: impl IntoIterator<Item = (K, Tensor)>,
) {
    let got: BTreeMap<K, Tensor> = got.into_iter().collect();
    let want: BTreeMap<K, Tensor> = want.into_iter().collect();
    let gk: Vec<&K> = got.keys().collect();
    let wk: Vec<&K> = want.keys().collect();
    if gk != wk {
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !want.contains_key(*k))
            .take(5)
            .collect();
        let missing: Vec<_> = want
            .keys()
            .filter(|k| !got.contains_key(*k))
            .take(5)
            .collect();
        panic!("{what}: keys differ; extra {extra:?}, missing {missing:?}");
    }
    for (k, w) in &want {
        assert!(same(&got[k], w), "{what}: tensor `{}` differs", k.as_ref());
    }
    println!("{what}: {} tensors identical", want.len());
}

struct FolderConfigs {
    unet: UNetConfig,
    vae: VaeConfig,
    text: ClipTextConfig,
    scheduler: SchedulerConfig,
}

fn folder_configs(name: &str) -> FolderConfigs {
    let dir = pipeline(name);
    FolderConfigs {
        unet: UNetConfig::from_file(&dir.join("unet/config.json")).unwrap(),
        vae: VaeConfig::from_file(&dir.join("vae/config.json")).unwrap(),
        text: ClipTextConfig::from_file(&dir.join("text_encoder/config.json")).unwrap(),
        scheduler: SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json")).unwrap(),
    }
}

fn without_source(mut s: SchedulerConfig) -> SchedulerConfig {
    s.source = PathBuf::new();
    s
}

/// The components' configs equal the folder's, field for field.
fn assert_configs(c: &SingleFileComponents, want: &FolderConfigs) {
    assert_eq!(
        single_file::unet_config_json(&c.unet_config),
        single_file::unet_config_json(&want.unet)
    );
    assert_eq!(
        single_file::vae_config_json(&c.vae_config),
        single_file::vae_config_json(&want.vae)
    );
    assert_eq!(
        single_file::text_config_json(&c.text_config),
        single_file::text_config_json(&want.text)
    );
    assert_eq!(
        without_source(c.scheduler.clone()),
        without_source(want.scheduler.clone())
    );
}

fn check_against_folder(name: &str, family: Family) {
    let c = load_components(&single(name), &Device::Cpu, &SingleFileOptions::default()).unwrap();
    assert_eq!(c.family, family);
    assert_eq!(c.tokenizer_pad, family.tokenizer_pad());
    assert!(c.configs_from_metadata);
    assert_configs(&c, &folder_configs(name));
    let [unet, vae, text] = folder_weights(name);
    assert_same_tensors(&format!("{name} unet"), c.unet, unet);
    assert_same_tensors(&format!("{name} vae"), c.vae, vae);
    assert_same_tensors(&format!("{name} text encoder"), c.text_encoder, text);
}

#[test]
fn sd1_file_equals_the_diffusers_folder() {
    check_against_folder("sd1", Family::Sd1);
}

#[test]
fn sd2_file_equals_the_diffusers_folder() {
    check_against_folder("sd2", Family::Sd2);
}

/// Tensors in the LDM file that are not weights of the diffusers models.
fn is_unused_ldm_key(key: &str, family: Family, text_layers: usize) -> bool {
    ["betas", "alphas_cumprod"].contains(&key)
        || key.ends_with("position_ids")
        || key == "cond_stage_model.model.text_projection"
        || key == "cond_stage_model.model.logit_scale"
        || (family == Family::Sd2
            && key.starts_with(&format!(
                "cond_stage_model.model.transformer.resblocks.{text_layers}."
            )))
}

/// diffusers → LDM: writing the folder's weights gives the Python-written file's
/// tensors under the same names (all keys covered both ways).
fn check_save_matches_python(name: &str, family: Family) {
    let cfg = folder_configs(name);
    let [unet, vae, text] = folder_weights(name);
    let sorted = |m: HashMap<String, Tensor>| m.into_iter().collect::<BTreeMap<_, _>>();
    let dir = tmp_dir(&format!("save-{name}"));
    let out = dir.join("exported.safetensors");
    let configs = SaveConfigs {
        family: Family::from_text_config(&cfg.text),
        unet: &cfg.unet,
        vae: &cfg.vae,
        text_encoder: &cfg.text,
        text_encoder_2: None,
        scheduler: &cfg.scheduler,
        tokenizer_files: None,
    };
    assert_eq!(configs.family, family);
    save_single_file(
        &out,
        &sorted(unet),
        &sorted(vae),
        &sorted(text),
        None,
        &configs,
        DType::F32,
    )
    .unwrap();

    let n = cfg.text.num_hidden_layers;
    let ours = read_safetensors(&out, &Device::Cpu).unwrap();
    let python = read_safetensors(&single(name), &Device::Cpu).unwrap();
    let keep = |m: &HashMap<String, Tensor>| -> Vec<(String, Tensor)> {
        m.iter()
            .filter(|(k, _)| !is_unused_ldm_key(k, family, n))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect()
    };
    assert_same_tensors(
        &format!("{name} exported vs python"),
        keep(&ours),
        keep(&python),
    );

    if family == Family::Sd2 {
        // The identity layer after the used ones, and an identity text projection.
        let extra: Vec<_> = ours
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&format!(
                    "cond_stage_model.model.transformer.resblocks.{n}."
                ))
            })
            .collect();
        assert_eq!(extra.len(), 12, "one extra OpenCLIP resblock");
        for (k, t) in extra {
            let max = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(max, 0.0, "{k} is not zero");
        }
        let proj = &ours["cond_stage_model.model.text_projection"];
        assert!(same(
            proj,
            &Tensor::eye(cfg.text.hidden_size, DType::F32, &Device::Cpu).unwrap()
        ));
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sd1_save_matches_python_mapping() {
    check_save_matches_python("sd1", Family::Sd1);
}

#[test]
fn sd2_save_matches_python_mapping() {
    check_save_matches_python("sd2", Family::Sd2);
}

fn check_round_trip(name: &str) {
    let c = load_components(&single(name), &Device::Cpu, &SingleFileOptions::default()).unwrap();
    let dir = tmp_dir(&format!("round-{name}"));
    let sorted = |m: &HashMap<String, Tensor>| m.clone().into_iter().collect::<BTreeMap<_, _>>();
    let configs = SaveConfigs {
        family: c.family,
        unet: &c.unet_config,
        vae: &c.vae_config,
        text_encoder: &c.text_config,
        text_encoder_2: None,
        scheduler: &c.scheduler,
        tokenizer_files: None,
    };
    let path = dir.join("round.safetensors");
    save_single_file(
        &path,
        &sorted(&c.unet),
        &sorted(&c.vae),
        &sorted(&c.text_encoder),
        None,
        &configs,
        DType::F32,
    )
    .unwrap();
    let back = load_components(&path, &Device::Cpu, &SingleFileOptions::default()).unwrap();
    assert!(back.configs_from_metadata);
    assert_eq!(back.family, c.family);
    let folder = FolderConfigs {
        unet: c.unet_config.clone(),
        vae: c.vae_config.clone(),
        text: c.text_config.clone(),
        scheduler: c.scheduler.clone(),
    };
    assert_configs(&back, &folder);
    assert_same_tensors(
        &format!("{name} unet round trip"),
        back.unet,
        c.unet.clone(),
    );
    assert_same_tensors(&format!("{name} vae round trip"), back.vae, c.vae.clone());
    assert_same_tensors(
        &format!("{name} text round trip"),
        back.text_encoder,
        c.text_encoder.clone(),
    );

    // f16 export: stored as f16, reloads to the f16-rounded weights.
    let half = dir.join("half.safetensors");
    save_single_file(
        &half,
        &sorted(&c.unet),
        &sorted(&c.vae),
        &sorted(&c.text_encoder),
        None,
        &configs,
        DType::F16,
    )
    .unwrap();
    let bytes = std::fs::read(&half).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.iter().all(|(_, v)| v.dtype() == safetensors::Dtype::F16));
    let back = load_components(&half, &Device::Cpu, &SingleFileOptions::default()).unwrap();
    for (k, t) in &c.unet {
        let rounded = t
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert!(same(&back.unet[k], &rounded), "f16 {k}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sd1_save_load_round_trip() {
    check_round_trip("sd1");
}

#[test]
fn sd2_save_load_round_trip() {
    check_round_trip("sd2");
}

/// A copy of `src` with tensors removed / added and no metadata.
fn rewrite(src: &Path, dst: &Path, drop: &[&str], add: &[(&str, Tensor)], keep_metadata: bool) {
    let mut tensors: BTreeMap<String, Tensor> = read_safetensors(src, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    for k in drop {
        assert!(tensors.remove(*k).is_some(), "{k} not in the file");
    }
    for (k, t) in add {
        tensors.insert(k.to_string(), t.clone());
    }
    let metadata = keep_metadata.then(|| {
        let bytes = std::fs::read(src).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        m.metadata().clone().unwrap()
    });
    save_safetensors(&tensors, dst, metadata).unwrap();
}

#[test]
fn configs_are_detected_without_metadata() {
    let dir = tmp_dir("detect");
    for (name, family) in [("sd1", Family::Sd1), ("sd2", Family::Sd2)] {
        let stripped = dir.join(format!("{name}.safetensors"));
        rewrite(&single(name), &stripped, &[], &[], false);
        let want = folder_configs(name);
        let c = single_file::detect_configs(&stripped, &SingleFileOptions::default()).unwrap();
        assert!(!c.from_metadata);
        assert_eq!(c.family, family);
        let (u, w) = (&c.unet, &want.unet);
        assert_eq!(u.block_out_channels, w.block_out_channels, "{name}");
        assert_eq!(u.layers_per_block, w.layers_per_block, "{name}");
        assert_eq!(u.down_block_types, w.down_block_types, "{name}");
        assert_eq!(u.up_block_types, w.up_block_types, "{name}");
        assert_eq!(u.mid_block_type, w.mid_block_type, "{name}");
        assert_eq!(u.in_channels, w.in_channels, "{name}");
        assert_eq!(u.out_channels, w.out_channels, "{name}");
        assert_eq!(u.cross_attention_dim, w.cross_attention_dim, "{name}");
        assert_eq!(u.use_linear_projection, w.use_linear_projection, "{name}");
        assert_eq!(u.transformer_layers(), w.transformer_layers(), "{name}");
        // Heads are not in the weights: the SD rule (8 per block; 64 channels per head,
        // one head where the channels are fewer).
        let heads = match family {
            Family::Sd1 => vec![8, 8, 8],
            _ => vec![1, 1, 1],
        };
        assert_eq!(u.heads(), heads, "{name}");
        assert_eq!(u.groups(), 32);

        let (v, w) = (&c.vae, &want.vae);
        assert_eq!(v.block_out_channels, w.block_out_channels, "{name}");
        assert_eq!(v.layers_per_block, w.layers_per_block, "{name}");
        assert_eq!(v.latent_channels, w.latent_channels, "{name}");
        assert_eq!(
            (v.in_channels, v.out_channels),
            (w.in_channels, w.out_channels)
        );
        assert_eq!(v.mid_block_add_attention, w.mid_block_add_attention);
        assert_eq!((v.use_quant_conv, v.use_post_quant_conv), (true, true));
        assert_eq!(v.scaling_factor, 0.18215);

        let (t, w) = (&c.text_encoder, &want.text);
        assert_eq!(t.vocab_size, w.vocab_size, "{name}");
        assert_eq!(t.hidden_size, w.hidden_size, "{name}");
        assert_eq!(t.intermediate_size, w.intermediate_size, "{name}");
        // SD 2.x: the file's extra (unused) OpenCLIP layer is not counted.
        assert_eq!(t.num_hidden_layers, w.num_hidden_layers, "{name}");
        assert_eq!(
            t.max_position_embeddings, w.max_position_embeddings,
            "{name}"
        );
        assert_eq!(t.hidden_act, w.hidden_act, "{name}");
        assert_eq!(t.num_attention_heads, 1, "hidden 32 < 64: one head");

        let s = &c.scheduler;
        assert_eq!(s.prediction_type, family.default_prediction_type());
        assert_eq!(
            (
                s.beta_start,
                s.beta_end,
                s.num_train_timesteps,
                s.steps_offset
            ),
            (0.00085, 0.012, 1000, 1)
        );
        let (sample, vae_sample) = match family {
            Family::Sd1 => (64, 512),
            _ => (96, 768),
        };
        assert_eq!((u.sample_size, v.sample_size), (sample, vae_sample));

        // The 32 norm groups of the SD rule do not divide the tiny model's 16
        // channels: loading says so instead of building a wrong model.
        let err =
            load_components(&stripped, &Device::Cpu, &SingleFileOptions::default()).unwrap_err();
        let msg = err.to_string();
        println!("{msg}");
        assert!(
            msg.contains(&stripped.display().to_string())
                && msg.contains("norm_num_groups")
                && msg.contains("no `dreambooth.vae_config` metadata"),
            "{msg}"
        );
    }

    // SD 2.x base: epsilon prediction, 512 px.
    let c = single_file::detect_configs(
        &dir.join("sd2.safetensors"),
        &SingleFileOptions {
            prediction_type: Some(PredictionType::Epsilon),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.scheduler.prediction_type, PredictionType::Epsilon);
    assert_eq!(
        (
            c.unet.sample_size,
            c.vae.sample_size,
            c.unet.upcast_attention
        ),
        (64, 512, false)
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn prediction_type_override_beats_metadata() {
    let opts = SingleFileOptions {
        prediction_type: Some(PredictionType::Epsilon),
        ..Default::default()
    };
    let c = load_components(&single("sd2"), &Device::Cpu, &opts).unwrap();
    assert_eq!(c.scheduler.prediction_type, PredictionType::Epsilon);
    // The metadata's UNet config is kept as it is.
    assert_eq!(c.unet_config.sample_size, 8);
}

#[test]
fn errors_name_the_file_and_the_tensor() {
    let dir = tmp_dir("errors");
    let err_of = |path: &Path| {
        let e = load_components(path, &Device::Cpu, &SingleFileOptions::default()).unwrap_err();
        let msg = e.to_string();
        println!("{msg}");
        assert!(
            msg.contains(&path.display().to_string()),
            "no file name in: {msg}"
        );
        msg
    };

    // A tensor of no known family.
    let p = dir.join("unknown.safetensors");
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    rewrite(
        &single("sd1"),
        &p,
        &[],
        &[("foo.bar.weight", t.clone())],
        true,
    );
    assert!(err_of(&p).contains("`foo.bar.weight`"));

    // An SDXL-style key.
    let p = dir.join("sdxl.safetensors");
    rewrite(
        &single("sd1"),
        &p,
        &[],
        &[("conditioner.embedders.0.x", t.clone())],
        true,
    );
    assert!(err_of(&p).contains("SDXL"));

    // A UNet tensor the config has no place for.
    let p = dir.join("extra.safetensors");
    rewrite(
        &single("sd1"),
        &p,
        &[],
        &[(
            "model.diffusion_model.input_blocks.99.0.in_layers.0.weight",
            t,
        )],
        true,
    );
    assert!(err_of(&p).contains("`model.diffusion_model.input_blocks.99.0.in_layers.0.weight`"));

    // A missing tensor is reported by its name in the file.
    let p = dir.join("missing.safetensors");
    let key = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight";
    rewrite(&single("sd1"), &p, &[key], &[], true);
    assert!(err_of(&p).contains(&format!("`{key}`")));
    let p = dir.join("missing-vae.safetensors");
    let key = "first_stage_model.decoder.up.0.block.1.norm2.bias";
    rewrite(&single("sd1"), &p, &[key], &[], true);
    assert!(err_of(&p).contains(&format!("`{key}`")));
    let p = dir.join("missing-qkv.safetensors");
    let key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight";
    rewrite(&single("sd2"), &p, &[key], &[], true);
    assert!(err_of(&p).contains(&format!("`{key}`")));

    // Truncated file.
    let p = dir.join("truncated.safetensors");
    let bytes = std::fs::read(single("sd1")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(err_of(&p).contains("invalid safetensors"));

    // Not there.
    let p = dir.join("absent.safetensors");
    assert!(err_of(&p).contains("not found"));
    std::fs::remove_dir_all(dir).ok();
}

/// Random weights of a model built on a seeded store, by state-dict key.
fn random_weights(seed: u64, build: impl FnOnce(&dreambooth::nn::Vb)) -> BTreeMap<String, Tensor> {
    let vb = dreambooth::nn::Vb::random(seed, &Device::Cpu, true);
    build(&vb);
    vb.vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect()
}

/// A Stable Diffusion-shaped model (4 UNet levels, the last without attention,
/// channels that follow the SD rules), written without metadata: detection alone
/// must give back the exact configs, and loading the exact tensors.
fn check_sd_shaped_without_metadata(family: Family) {
    use dreambooth::models::UNet2DConditionModel;
    use dreambooth::models::clip_text::ClipTextModel;
    use dreambooth::models::vae::AutoencoderKL;

    let sd2 = family == Family::Sd2;
    let unet: UNetConfig = serde_json::from_value(serde_json::json!({
        "sample_size": if sd2 { 96 } else { 64 },
        "block_out_channels": if sd2 { vec![64, 128, 128, 128] } else { vec![32, 64, 64, 64] },
        "layers_per_block": 2,
        "cross_attention_dim": 64,
        "attention_head_dim": if sd2 { serde_json::json!([1, 2, 2, 2]) } else { serde_json::json!(8) },
        "use_linear_projection": sd2,
        "upcast_attention": sd2,
    }))
    .unwrap();
    let vae: VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "sample_size": if sd2 { 768 } else { 512 },
    }))
    .unwrap();
    let text: ClipTextConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "hidden_act": if sd2 { "gelu" } else { "quick_gelu" },
        "projection_dim": if sd2 { 512 } else { 768 },
        "pad_token_id": if sd2 { 0 } else { 49407 },
    }))
    .unwrap();
    let prediction = family.default_prediction_type();
    let scheduler = single_file::default_scheduler(prediction, Path::new("x")).unwrap();

    let unet_w = random_weights(1, |vb| drop(UNet2DConditionModel::new(vb, &unet).unwrap()));
    let vae_w = random_weights(2, |vb| drop(AutoencoderKL::new(vb, &vae).unwrap()));
    let text_w = random_weights(3, |vb| drop(ClipTextModel::new(vb, &text).unwrap()));

    let dir = tmp_dir(&format!("sd-shaped-{family:?}"));
    let with_meta = dir.join("with.safetensors");
    let configs = SaveConfigs {
        family,
        unet: &unet,
        vae: &vae,
        text_encoder: &text,
        text_encoder_2: None,
        scheduler: &scheduler,
        tokenizer_files: None,
    };
    save_single_file(
        &with_meta,
        &unet_w,
        &vae_w,
        &text_w,
        None,
        &configs,
        DType::F32,
    )
    .unwrap();
    let bare = dir.join("bare.safetensors");
    rewrite(&with_meta, &bare, &[], &[], false);

    let c = load_components(&bare, &Device::Cpu, &SingleFileOptions::default()).unwrap();
    assert!(!c.configs_from_metadata);
    assert_eq!(c.family, family);
    let want = FolderConfigs {
        unet,
        vae,
        text,
        scheduler,
    };
    assert_configs(&c, &want);
    assert_same_tensors("unet", c.unet, unet_w);
    assert_same_tensors("vae", c.vae, vae_w);
    assert_same_tensors("text", c.text_encoder, text_w);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sd1_shaped_model_loads_without_metadata() {
    check_sd_shaped_without_metadata(Family::Sd1);
}

#[test]
fn sd2_shaped_model_loads_without_metadata() {
    check_sd_shaped_without_metadata(Family::Sd2);
}
