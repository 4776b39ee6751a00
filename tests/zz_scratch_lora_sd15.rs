use candle_core::Device;
use dreambooth::models::lora::{self, LoraSpec};
#[test]
#[ignore]
fn sd15_sizes() {
    let cfg: dreambooth::models::UNetConfig = serde_json::from_value(dreambooth::bench::sd15_unet_config()).unwrap();
    let t0 = std::time::Instant::now();
    let vb = dreambooth::nn::Vb::random(0, &Device::Cpu, false);
    let unet = dreambooth::models::UNet2DConditionModel::new(&vb, &cfg).unwrap();
    println!("built in {:.1}s", t0.elapsed().as_secs_f64());
    for r in [4usize, 16] {
        for t in ["attn", "attn+ff", "all-linear", "all-linear+conv"] {
            let mut u = unet.clone();
            let spec = LoraSpec { rank: r, alpha: r as f64, targets: t.parse().unwrap(), ..Default::default() };
            let vars = lora::attach_trainable_unet(&mut u, &spec, &Device::Cpu).unwrap();
            let n: usize = vars.values().map(|v| v.elem_count()).sum();
            // Bytes as written: f32 tensors plus the safetensors header.
            let tensors: std::collections::BTreeMap<String, candle_core::Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
            let p = std::env::temp_dir().join("sd15-lora-size.safetensors");
            dreambooth::nn::save_safetensors(&tensors, &p, None).unwrap();
            let sz = std::fs::metadata(&p).unwrap().len();
            println!("rank {r:2} {t:16} {:4} layers {:.3}M params, peft file {:.2} MiB", vars.len() / 2, n as f64 / 1e6, sz as f64 / (1u64 << 20) as f64);
        }
    }
}
