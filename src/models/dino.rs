//! transformers' `ViTModel` (models/vit/modeling_vit.py) as DINO uses it
//! (facebook/dino-vits16, the DreamBooth paper's DINO metric): pixels → the
//! class token of the final layer norm's output.
//!
//! Keys are a `ViTModel` checkpoint's (`embeddings.cls_token`,
//! `encoder.layer.N.attention.attention.query.weight`, ..., `layernorm.*`), at
//! the root or under `vit.` (a `ViTFor...` checkpoint); a pooler or a
//! classification head in the file is ignored. Inputs must be `image_size`
//! square: position embeddings are not interpolated. Inference only.

use std::path::Path;

use candle_core::{Device, IndexOp, Tensor};
use serde::Deserialize;

use super::clip_text::{check_encoder_shape, check_patches};
use super::clip_vision::{read_without, resolve_model_path};
use crate::nn::{Activation, Conv2d, Init, LayerNorm, Linear, Vb, scaled_dot_product_attention};
use crate::{Error, Result};

fn d_act() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-12
}

/// `ViTConfig` with transformers' defaults; unknown fields ignored.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct ViTConfig {
    #[serde(default = "super::serde_default::int::<768>")]
    pub hidden_size: usize,
    #[serde(default = "super::serde_default::int::<3072>")]
    pub intermediate_size: usize,
    #[serde(default = "super::serde_default::int::<12>")]
    pub num_hidden_layers: usize,
    #[serde(default = "super::serde_default::int::<12>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::serde_default::int::<3>")]
    pub num_channels: usize,
    #[serde(default = "super::serde_default::int::<224>")]
    pub image_size: usize,
    #[serde(default = "super::serde_default::int::<16>")]
    pub patch_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "super::serde_default::yes")]
    pub qkv_bias: bool,
}

impl Default for ViTConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all ViTConfig fields have defaults")
    }
}

impl ViTConfig {
    /// Reads and validates a transformers ViT `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::read_config(path, Self::validate)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::config(path, msg));
        if Activation::parse(&self.hidden_act).is_none() {
            return bad(format!(
                "unsupported hidden_act `{}` (supported: gelu, quick_gelu, silu)",
                self.hidden_act
            ));
        }
        check_encoder_shape(
            self.hidden_size,
            self.num_attention_heads,
            self.num_hidden_layers,
        )
        .and_then(|()| check_patches(self.image_size, self.patch_size))
        .or_else(bad)
    }
}

/// One pre-norm ViT layer: h = x + attn(layernorm_before(x)),
/// out = h + output.dense(act(intermediate.dense(layernorm_after(h)))).
#[derive(Clone, Debug)]
pub struct ViTLayer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attention_output: Linear,
    pub intermediate: Linear,
    pub output: Linear,
    pub layernorm_before: LayerNorm,
    pub layernorm_after: LayerNorm,
    pub heads: usize,
    pub act: Activation,
}

impl ViTLayer {
    fn new(vb: &Vb, cfg: &ViTConfig, act: Activation) -> Result<Self> {
        let (d, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let att = vb.pp("attention").pp("attention");
        let lin = |vb: &Vb, a, b, bias| Linear::new(vb, a, b, bias);
        Ok(Self {
            query: lin(&att.pp("query"), d, d, cfg.qkv_bias)?,
            key: lin(&att.pp("key"), d, d, cfg.qkv_bias)?,
            value: lin(&att.pp("value"), d, d, cfg.qkv_bias)?,
            attention_output: lin(&vb.pp("attention").pp("output").pp("dense"), d, d, true)?,
            intermediate: lin(&vb.pp("intermediate").pp("dense"), d, i, true)?,
            output: lin(&vb.pp("output").pp("dense"), i, d, true)?,
            layernorm_before: LayerNorm::new(&vb.pp("layernorm_before"), d, eps)?,
            layernorm_after: LayerNorm::new(&vb.pp("layernorm_after"), d, eps)?,
            heads: cfg.num_attention_heads,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let dh = d / self.heads;
        let n = self.layernorm_before.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.query.forward(&n)?)?;
        let k = split(self.key.forward(&n)?)?;
        let v = split(self.value.forward(&n)?)?;
        let o = scaled_dot_product_attention(&q, &k, &v, 1.0 / (dh as f64).sqrt(), None)?;
        let o = o.transpose(1, 2)?.reshape((b, l, d))?;
        let h = (x + self.attention_output.forward(&o)?)?;
        let m = self.act.forward(
            &self
                .intermediate
                .forward(&self.layernorm_after.forward(&h)?)?,
        )?;
        Ok((&h + self.output.forward(&m)?)?)
    }
}

/// transformers' `ViTModel` without the pooler.
#[derive(Clone, Debug)]
pub struct ViTModel {
    pub patch_embeddings: Conv2d,
    pub cls_token: Tensor,
    pub position_embeddings: Tensor,
    pub layers: Vec<ViTLayer>,
    pub layernorm: LayerNorm,
    pub config: ViTConfig,
}

impl ViTModel {
    /// Loads a `ViTModel` checkpoint (DINO): `path` is its `model.safetensors` or
    /// the folder holding it; `config.json` is read from the same folder.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (weights, config) = resolve_model_path(path)?;
        let cfg = ViTConfig::from_file(&config)?;
        let tensors = read_without(&weights, device, |k| {
            let k = k.strip_prefix("vit.").unwrap_or(k);
            k.starts_with("pooler.") || k.starts_with("classifier.")
        })?;
        let vb = Vb::from_tensors(&weights, tensors, device, false);
        let model = if vb.contains("vit.embeddings.cls_token") {
            Self::new(&vb.pp("vit"), &cfg)?
        } else {
            Self::new(&vb, &cfg)?
        };
        vb.finish()?;
        Ok(model)
    }

    /// Builds the model from `vb` rooted at the `ViTModel`.
    pub fn new(vb: &Vb, cfg: &ViTConfig) -> Result<Self> {
        cfg.validate(&vb.path())?;
        let act = Activation::parse(&cfg.hidden_act).expect("validated");
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let n_pos = (cfg.image_size / p).pow(2) + 1;
        Ok(Self {
            patch_embeddings: Conv2d::new(
                &emb.pp("patch_embeddings").pp("projection"),
                cfg.num_channels,
                d,
                p,
                p,
                0,
            )?,
            cls_token: emb.get(&[1, 1, d], "cls_token", Init::Normal(0.02))?,
            position_embeddings: emb.get(
                &[1, n_pos, d],
                "position_embeddings",
                Init::Normal(0.02),
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ViTLayer::new(&vb.pp("encoder").pp("layer").pp(i), cfg, act))
                .collect::<Result<Vec<_>>>()?,
            layernorm: LayerNorm::new(&vb.pp("layernorm"), d, cfg.layer_norm_eps)?,
            config: cfg.clone(),
        })
    }

    /// pixels (B, C, image_size, image_size), preprocessed → the last hidden
    /// state (B, 1 + patches, hidden) after the final layer norm.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (s, ch) = (self.config.image_size, self.config.num_channels);
        if (c, h, w) != (ch, s, s) {
            return Err(Error::msg(format!(
                "ViT input is {c}×{h}×{w}, the model takes {ch}×{s}×{s} \
                 (preprocess with eval::preprocess::vit)"
            )));
        }
        let x = self.patch_embeddings.forward(pixels)?;
        let d = x.dim(1)?;
        let x = x.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls_token.expand((b, 1, d))?;
        let mut h = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.position_embeddings)?;
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        self.layernorm.forward(&h)
    }

    /// pixels → the class token's embedding (B, hidden): DINO's image feature.
    pub fn cls_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.forward(pixels)?.i((.., 0))?.contiguous()?)
    }
}
