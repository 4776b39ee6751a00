//! LoRA on a Stable Diffusion model: which layers get adapters, trainable
//! adapters for `dreambooth train --lora`, and the two file formats people
//! exchange (see [`crate::nn::lora`] for the adapter itself).
//!
//! **Names.** Every adaptable layer is named by its diffusers module path
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`; the text
//! encoder's as transformers ≤ 4 named them,
//! `text_model.encoder.layers.0.self_attn.q_proj`).
//!
//! **peft / diffusers** (`pytorch_lora_weights.safetensors`, what
//! `pipe.load_lora_weights` reads): `unet.<path>.lora_A.weight` (A) and
//! `.lora_B.weight` (B), `text_encoder.<path>.…`. The scale is
//! `lora_alpha / r` from the `lora_adapter_metadata` header when present, and
//! one otherwise. Read also: the older diffusers names `.lora.down.weight` /
//! `.lora.up.weight`, `.lora_linear_layer.down/up.weight`,
//! `.processor.to_q_lora.down.weight`, the text encoder with or without
//! `text_model.`. Written with alpha / r folded into B, so every loader
//! agrees on the scale.
//!
//! **kohya** (sd-scripts, A1111, ComfyUI): `lora_unet_<path with _>` and
//! `lora_te_<path with _>`, each with `.lora_down.weight` (A),
//! `.lora_up.weight` (B) and `.alpha` (scale = alpha / r). The UNet's names
//! may also be the original LDM ones (`lora_unet_input_blocks_4_1_…`,
//! `lora_unet_middle_block_1_…`), mapped through the single-file key table.
//!
//! A key of no known family, or naming no layer of the model, is an error
//! naming the key; so is a tensor of the wrong shape (naming both shapes).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use serde_json::json;

use super::StableDiffusion;
use super::clip_text::ClipTextModel;
use super::resnet::ResnetBlock2D;
use super::single_file::{Family, unet_keys};
use super::transformer::{Projection, Transformer2DModel};
use super::unet::UNet2DConditionModel;
use crate::nn::lora::{Lora, LoraDropout};
use crate::nn::{Conv2d, Init, Linear, Vb, read_safetensors, save_safetensors};
use crate::{Error, Result};

/// The file name diffusers' `load_lora_weights(dir)` looks for.
pub const PEFT_FILE: &str = "pytorch_lora_weights.safetensors";
/// The file name `dreambooth train --lora` gives its kohya export.
pub const KOHYA_FILE: &str = "lora_kohya.safetensors";

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

/// What kind of layer a module is; decides which `--lora-targets` include it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// to_q, to_k, to_v, to_out.0 of the UNet's attention.
    Attn,
    /// ff.net.0.proj, ff.net.2.
    FeedForward,
    /// proj_in / proj_out as linear layers (SD 2.x).
    ProjLinear,
    /// proj_in / proj_out as 1×1 convolutions (SD 1.x).
    ProjConv,
    /// time_emb_proj, time_embedding.linear_1/2.
    TimeEmb,
    /// The resnets' convolutions, down- and upsamplers.
    Conv,
    /// conv_in, conv_out (never trained; a file may still adapt them).
    ConvIo,
    /// The text encoder's q/k/v/out_proj.
    TextAttn,
    /// The text encoder's mlp.fc1 / fc2 (kohya adapts them).
    TextMlp,
}

/// `--lora-targets`: `attn`, `attn+ff`, `all-linear`, each optionally `+conv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LoraTargets {
    pub attn: bool,
    pub ff: bool,
    /// Every linear layer of the UNet: attn, ff, linear proj_in/proj_out,
    /// time_emb_proj, the time embedding.
    pub all_linear: bool,
    /// The convolutions: resnets, samplers, 1×1 proj_in/proj_out.
    pub conv: bool,
}

impl LoraTargets {
    pub fn includes(&self, kind: ModuleKind) -> bool {
        use ModuleKind::*;
        match kind {
            Attn => self.attn || self.all_linear,
            FeedForward => self.ff || self.all_linear,
            ProjLinear | TimeEmb => self.all_linear,
            Conv | ProjConv => self.conv,
            ConvIo | TextAttn | TextMlp => false,
        }
    }
}

impl std::str::FromStr for LoraTargets {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut t = LoraTargets::default();
        for (i, part) in s.split('+').enumerate() {
            match part.trim() {
                // `+conv` alone: attention plus convolutions.
                "" if i == 0 => t.attn = true,
                "attn" => t.attn = true,
                "ff" => t.ff = true,
                "all-linear" => t.all_linear = true,
                "conv" => t.conv = true,
                other => {
                    return Err(Error::msg(format!(
                        "--lora-targets `{s}`: unknown part `{other}` \
                         (use attn, attn+ff or all-linear, optionally with +conv)"
                    )));
                }
            }
        }
        if t == LoraTargets::default() {
            return Err(Error::msg(format!("--lora-targets `{s}` names no layers")));
        }
        Ok(t)
    }
}

impl fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.all_linear {
            parts.push("all-linear");
        } else {
            if self.attn {
                parts.push("attn");
            }
            if self.ff {
                parts.push("ff");
            }
        }
        if self.conv {
            parts.push("conv");
        }
        write!(f, "{}", parts.join("+"))
    }
}

/// The adapters `dreambooth train --lora` attaches.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapters' input while training (0: none).
    pub dropout: f64,
    pub targets: LoraTargets,
    /// Also adapt the text encoder's q/k/v/out_proj.
    pub text_encoder: bool,
    /// Seeds A's initialisation and the dropout masks.
    pub seed: u64,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 16.0,
            dropout: 0.0,
            targets: LoraTargets {
                attn: true,
                ..Default::default()
            },
            text_encoder: false,
            seed: 0,
        }
    }
}

impl LoraSpec {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::msg("invalid option: --rank must be at least 1"));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(Error::msg(format!(
                "invalid option: --lora-alpha {} must be > 0",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::msg(format!(
                "invalid option: --lora-dropout {} must lie in [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Walking a model's adaptable layers
// ---------------------------------------------------------------------------

/// The network a module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    /// `unet` / `text_encoder` / `text_encoder_2`: the key prefix of peft files.
    pub fn prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

pub enum Layer<'a> {
    Linear(&'a Linear),
    Conv(&'a Conv2d),
}

pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

impl Layer<'_> {
    pub fn weight(&self) -> &Tensor {
        match self {
            Layer::Linear(l) => &l.weight,
            Layer::Conv(c) => &c.weight,
        }
    }

    pub fn lora(&self) -> Option<&Arc<Lora>> {
        match self {
            Layer::Linear(l) => l.lora.as_ref(),
            Layer::Conv(c) => c.lora.as_ref(),
        }
    }
}

impl LayerMut<'_> {
    pub fn weight(&self) -> &Tensor {
        match self {
            LayerMut::Linear(l) => &l.weight,
            LayerMut::Conv(c) => &c.weight,
        }
    }

    pub fn lora(&self) -> Option<&Arc<Lora>> {
        match self {
            LayerMut::Linear(l) => l.lora.as_ref(),
            LayerMut::Conv(c) => c.lora.as_ref(),
        }
    }

    pub fn set_lora(&mut self, lora: Option<Arc<Lora>>) {
        match self {
            LayerMut::Linear(l) => l.lora = lora,
            LayerMut::Conv(c) => c.lora = lora,
        }
    }
}

/// One adaptable layer and its diffusers module path.
pub struct Module<L> {
    pub component: Component,
    pub path: String,
    pub kind: ModuleKind,
    pub layer: L,
}

/// Writes the UNet and text-encoder walkers once for `&` and once for `&mut`.
macro_rules! walkers {
    ($unet_fn:ident, $text_fn:ident, $Layer:ident $(, $m:tt)?) => {
        /// Every adaptable layer of a UNet, in model order.
        pub fn $unet_fn<'a>(u: &'a $($m)? UNet2DConditionModel) -> Vec<Module<$Layer<'a>>> {
            use ModuleKind::*;
            type V<'a> = Vec<Module<$Layer<'a>>>;
            fn lin<'a>(v: &mut V<'a>, path: String, kind: ModuleKind, l: &'a $($m)? Linear) {
                v.push(Module { component: Component::Unet, path, kind, layer: $Layer::Linear(l) });
            }
            fn conv<'a>(v: &mut V<'a>, path: String, kind: ModuleKind, c: &'a $($m)? Conv2d) {
                v.push(Module { component: Component::Unet, path, kind, layer: $Layer::Conv(c) });
            }
            fn proj<'a>(v: &mut V<'a>, path: String, p: &'a $($m)? Projection) {
                match p {
                    Projection::Conv(c) => conv(v, path, ProjConv, c),
                    Projection::Linear(l) => lin(v, path, ProjLinear, l),
                }
            }
            fn resnet<'a>(v: &mut V<'a>, p: &str, r: &'a $($m)? ResnetBlock2D) {
                conv(v, format!("{p}.conv1"), Conv, &$($m)? r.conv1);
                if let Some(t) = &$($m)? r.time_emb_proj {
                    lin(v, format!("{p}.time_emb_proj"), TimeEmb, t);
                }
                conv(v, format!("{p}.conv2"), Conv, &$($m)? r.conv2);
                if let Some(c) = &$($m)? r.conv_shortcut {
                    conv(v, format!("{p}.conv_shortcut"), Conv, c);
                }
            }
            fn transformer<'a>(v: &mut V<'a>, p: &str, t: &'a $($m)? Transformer2DModel) {
                proj(v, format!("{p}.proj_in"), &$($m)? t.proj_in);
                for (k, b) in (&$($m)? t.transformer_blocks).into_iter().enumerate() {
                    let bp = format!("{p}.transformer_blocks.{k}");
                    for (name, a) in [("attn1", &$($m)? b.attn1), ("attn2", &$($m)? b.attn2)] {
                        lin(v, format!("{bp}.{name}.to_q"), Attn, &$($m)? a.to_q);
                        lin(v, format!("{bp}.{name}.to_k"), Attn, &$($m)? a.to_k);
                        lin(v, format!("{bp}.{name}.to_v"), Attn, &$($m)? a.to_v);
                        lin(v, format!("{bp}.{name}.to_out.0"), Attn, &$($m)? a.to_out);
                    }
                    lin(v, format!("{bp}.ff.net.0.proj"), FeedForward, &$($m)? b.ff.proj);
                    lin(v, format!("{bp}.ff.net.2"), FeedForward, &$($m)? b.ff.out);
                }
                proj(v, format!("{p}.proj_out"), &$($m)? t.proj_out);
            }

            let mut v: V<'a> = Vec::new();
            conv(&mut v, "conv_in".into(), ConvIo, &$($m)? u.conv_in);
            lin(&mut v, "time_embedding.linear_1".into(), TimeEmb, &$($m)? u.time_embedding.linear_1);
            lin(&mut v, "time_embedding.linear_2".into(), TimeEmb, &$($m)? u.time_embedding.linear_2);
            for (i, b) in (&$($m)? u.down_blocks).into_iter().enumerate() {
                for (j, r) in (&$($m)? b.resnets).into_iter().enumerate() {
                    resnet(&mut v, &format!("down_blocks.{i}.resnets.{j}"), r);
                }
                for (j, t) in (&$($m)? b.attentions).into_iter().enumerate() {
                    transformer(&mut v, &format!("down_blocks.{i}.attentions.{j}"), t);
                }
                if let Some(d) = &$($m)? b.downsampler {
                    conv(&mut v, format!("down_blocks.{i}.downsamplers.0.conv"), Conv, &$($m)? d.conv);
                }
            }
            if let Some(mid) = &$($m)? u.mid_block {
                for (j, r) in (&$($m)? mid.resnets).into_iter().enumerate() {
                    resnet(&mut v, &format!("mid_block.resnets.{j}"), r);
                }
                for (j, t) in (&$($m)? mid.attentions).into_iter().enumerate() {
                    transformer(&mut v, &format!("mid_block.attentions.{j}"), t);
                }
            }
            for (i, b) in (&$($m)? u.up_blocks).into_iter().enumerate() {
                for (j, r) in (&$($m)? b.resnets).into_iter().enumerate() {
                    resnet(&mut v, &format!("up_blocks.{i}.resnets.{j}"), r);
                }
                for (j, t) in (&$($m)? b.attentions).into_iter().enumerate() {
                    transformer(&mut v, &format!("up_blocks.{i}.attentions.{j}"), t);
                }
                if let Some(up) = &$($m)? b.upsampler {
                    conv(&mut v, format!("up_blocks.{i}.upsamplers.0.conv"), Conv, &$($m)? up.conv);
                }
            }
            conv(&mut v, "conv_out".into(), ConvIo, &$($m)? u.conv_out);
            v
        }

        /// Every adaptable layer of a CLIP text encoder, in model order.
        pub fn $text_fn<'a>(te: &'a $($m)? ClipTextModel, component: Component) -> Vec<Module<$Layer<'a>>> {
            let mut v = Vec::new();
            let mut push = |path: String, kind, l: &'a $($m)? Linear| {
                v.push(Module { component, path, kind, layer: $Layer::Linear(l) });
            };
            for (i, layer) in (&$($m)? te.layers).into_iter().enumerate() {
                let p = format!("text_model.encoder.layers.{i}");
                let a = &$($m)? layer.self_attn;
                push(format!("{p}.self_attn.q_proj"), ModuleKind::TextAttn, &$($m)? a.q_proj);
                push(format!("{p}.self_attn.k_proj"), ModuleKind::TextAttn, &$($m)? a.k_proj);
                push(format!("{p}.self_attn.v_proj"), ModuleKind::TextAttn, &$($m)? a.v_proj);
                push(format!("{p}.self_attn.out_proj"), ModuleKind::TextAttn, &$($m)? a.out_proj);
                let m = &$($m)? layer.mlp;
                push(format!("{p}.mlp.fc1"), ModuleKind::TextMlp, &$($m)? m.fc1);
                push(format!("{p}.mlp.fc2"), ModuleKind::TextMlp, &$($m)? m.fc2);
            }
            v
        }
    };
}

walkers!(unet_modules, text_modules, Layer);
walkers!(unet_modules_mut, text_modules_mut, LayerMut, mut);

/// The UNet's and the text encoders' adaptable layers.
pub fn modules(sd: &StableDiffusion) -> Vec<Module<Layer<'_>>> {
    let mut v = unet_modules(&sd.unet);
    v.extend(text_modules(&sd.text_encoder, Component::TextEncoder));
    if let Some(te2) = &sd.text_encoder_2 {
        v.extend(text_modules(&te2.model, Component::TextEncoder2));
    }
    v
}

pub fn modules_mut(sd: &mut StableDiffusion) -> Vec<Module<LayerMut<'_>>> {
    let mut v = unet_modules_mut(&mut sd.unet);
    v.extend(text_encoder_modules_mut(
        sd.text_encoder_2.as_mut(),
        &mut sd.text_encoder,
    ));
    v
}

/// The text encoders' adaptable layers (SDXL's second one after the first).
fn text_encoder_modules_mut<'a>(
    te2: Option<&'a mut crate::models::sd::SecondTextEncoder>,
    te: &'a mut ClipTextModel,
) -> Vec<Module<LayerMut<'a>>> {
    let mut v = text_modules_mut(te, Component::TextEncoder);
    if let Some(te2) = te2 {
        v.extend(text_modules_mut(&mut te2.model, Component::TextEncoder2));
    }
    v
}

/// The adapters attached to a model: (component, module path, adapter).
pub fn attached(sd: &StableDiffusion) -> Vec<(Component, String, Arc<Lora>)> {
    modules(sd)
        .into_iter()
        .filter_map(|m| {
            m.layer
                .lora()
                .map(|l| (m.component, m.path.clone(), l.clone()))
        })
        .collect()
}

/// Removes every adapter from the model.
pub fn detach_all(sd: &mut StableDiffusion) {
    for mut m in modules_mut(sd) {
        m.layer.set_lora(None);
    }
}

// ---------------------------------------------------------------------------
// Trainable adapters
// ---------------------------------------------------------------------------

/// Attaches fresh trainable adapters per `spec` to the UNet (and the text
/// encoder when `spec.text_encoder`) and returns their `Var`s, keyed
/// `unet.<module path>.lora_A.weight` / `.lora_B.weight` (and
/// `text_encoder.…`). The base weights are untouched: load the model frozen.
pub fn attach_trainable(
    sd: &mut StableDiffusion,
    spec: &LoraSpec,
) -> Result<BTreeMap<String, Var>> {
    let device = sd.device.clone();
    let mut mods = unet_modules_mut(&mut sd.unet);
    if spec.text_encoder {
        mods.extend(text_encoder_modules_mut(
            sd.text_encoder_2.as_mut(),
            &mut sd.text_encoder,
        ));
    }
    attach_new(mods, spec, &device)
}

/// [`attach_trainable`] for a bare UNet (benchmarks).
pub fn attach_trainable_unet(
    unet: &mut UNet2DConditionModel,
    spec: &LoraSpec,
    device: &Device,
) -> Result<BTreeMap<String, Var>> {
    attach_new(unet_modules_mut(unet), spec, device)
}

fn attach_new(
    mods: Vec<Module<LayerMut<'_>>>,
    spec: &LoraSpec,
    device: &Device,
) -> Result<BTreeMap<String, Var>> {
    spec.validate()?;
    let vb = Vb::random(spec.seed ^ 0x10_4A_u64, device, true);
    let dropout = (spec.dropout > 0.0).then(|| LoraDropout::new(spec.dropout, spec.seed));
    let r = spec.rank;
    let mut n = 0;
    for (id, mut m) in mods.into_iter().enumerate() {
        let wanted = match m.component {
            Component::Unet => spec.targets.includes(m.kind),
            Component::TextEncoder | Component::TextEncoder2 => m.kind == ModuleKind::TextAttn,
        };
        if !wanted {
            continue;
        }
        if m.layer.lora().is_some() {
            return Err(Error::msg(format!(
                "{}.{} already has a LoRA adapter",
                m.component.prefix(),
                m.path
            )));
        }
        let dims = m.layer.weight().dims().to_vec();
        let (down_shape, up_shape) = match dims.as_slice() {
            [o, i] => (vec![r, *i], vec![*o, r]),
            [o, i, kh, kw] => (vec![r, *i, *kh, *kw], vec![*o, r, 1, 1]),
            d => {
                return Err(Error::msg(format!(
                    "{}: unexpected weight shape {d:?}",
                    m.path
                )));
            }
        };
        let fan_in: usize = down_shape[1..].iter().product();
        let mvb = vb.pp(m.component.prefix()).pp(&m.path);
        // peft's init: A kaiming-uniform with a = √5 (bound 1/√fan_in), B zero.
        let down = mvb.get(&down_shape, "lora_A.weight", Init::torch_default(fan_in))?;
        let up = mvb.get(&up_shape, "lora_B.weight", Init::Const(0.0))?;
        m.layer.set_lora(Some(Arc::new(Lora {
            down,
            up,
            alpha: spec.alpha,
            multiplier: 1.0,
            dropout: dropout.clone(),
            id: id as u64,
        })));
        n += 1;
    }
    if n == 0 {
        return Err(Error::msg(format!(
            "--lora-targets {}: no layer of this model matches",
            spec.targets
        )));
    }
    Ok(vb.vars())
}

/// The trainable adapter parameters attached to a model, keyed as
/// [`attach_trainable`] returns them (the same `Var`s, not copies).
pub fn trainable_vars(sd: &StableDiffusion) -> BTreeMap<String, Var> {
    let mut out = BTreeMap::new();
    for (c, path, l) in attached(sd) {
        for (name, t) in [("lora_A", &l.down), ("lora_B", &l.up)] {
            if t.is_variable()
                && let Ok(v) = Var::from_tensor(t)
            {
                out.insert(format!("{}.{path}.{name}.weight", c.prefix()), v);
            }
        }
    }
    out
}

/// The dropout switch shared by a model's trainable adapters, if they use dropout.
pub fn dropout_control(sd: &StableDiffusion) -> Option<Arc<LoraDropout>> {
    attached(sd)
        .into_iter()
        .find_map(|(_, _, l)| l.dropout.clone())
}

// ---------------------------------------------------------------------------
// Reading LoRA files
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// peft / diffusers keys (`unet.….lora_A.weight`).
    Peft,
    /// kohya keys (`lora_unet_….lora_down.weight`, `.alpha`).
    Kohya,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraFormat::Peft => "peft",
            LoraFormat::Kohya => "kohya",
        })
    }
}

/// One adapter read from a file, matched to a layer of the model.
#[derive(Clone, Debug)]
pub struct FileAdapter {
    pub component: Component,
    /// The diffusers module path.
    pub module: String,
    /// A, in the layer's layout ((r, in) or (r, in, kh, kw)).
    pub down: Tensor,
    /// B ((out, r) or (out, r, 1, 1)).
    pub up: Tensor,
    pub alpha: f64,
}

/// A LoRA file matched against a model.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    pub adapters: Vec<FileAdapter>,
}

impl LoraFile {
    /// How many adapters target the UNet and the text encoder.
    pub fn counts(&self) -> (usize, usize) {
        let u = self
            .adapters
            .iter()
            .filter(|a| a.component == Component::Unet)
            .count();
        (u, self.adapters.len() - u)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

const SUFFIXES: [(&str, Role); 9] = [
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".alpha", Role::Alpha),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
];

/// Splits a file key into (module name as the file spells it, role), or says
/// why the key is not one this reader understands.
fn split_key(key: &str) -> std::result::Result<(String, Role), String> {
    // diffusers' attention-processor files: `….attn1.processor.to_q_lora.down.weight`.
    if let Some((stem, rest)) = key.split_once(".processor.") {
        for (proc_name, module) in [
            ("to_q_lora", "to_q"),
            ("to_k_lora", "to_k"),
            ("to_v_lora", "to_v"),
            ("to_out_lora", "to_out.0"),
        ] {
            for (suffix, role) in [(".down.weight", Role::Down), (".up.weight", Role::Up)] {
                if rest == format!("{proc_name}{suffix}") {
                    return Ok((format!("{stem}.{module}"), role));
                }
            }
        }
    }
    for (suffix, role) in SUFFIXES {
        if let Some(stem) = key.strip_suffix(suffix) {
            return Ok((stem.to_string(), role));
        }
    }
    let kind = if key.contains("hada_") {
        "a LoHa (LyCORIS) tensor, which is not supported"
    } else if key.contains("lokr_") {
        "a LoKr (LyCORIS) tensor, which is not supported"
    } else if key.contains("dora_scale") || key.contains("magnitude_vector") {
        "a DoRA magnitude, which is not supported"
    } else if key.contains("lora_mid") {
        "a LoCon Tucker core (`lora_mid`), which is not supported"
    } else if key.ends_with(".diff") || key.ends_with(".diff_b") {
        "a full weight difference, which is not supported"
    } else if key.ends_with(".bias") {
        "a LoRA bias, which is not supported"
    } else {
        "not a LoRA tensor of a known format (peft/diffusers `….lora_A.weight` / \
         `….lora_B.weight`, kohya `lora_unet_….lora_down.weight` / `.lora_up.weight` / `.alpha`)"
    };
    Err(kind.to_string())
}

/// A layer a file may name: where it is, and its weight's shape.
struct Target {
    component: Component,
    path: String,
    dims: Vec<usize>,
}

/// Every adaptable layer of `sd`, and every name a file may give it.
fn name_index(sd: &StableDiffusion) -> (Vec<Target>, HashMap<String, usize>) {
    let keymap = unet_keys::key_map(&sd.unet.config);
    let mut targets = Vec::new();
    let mut names = HashMap::new();
    for (i, m) in modules(sd).into_iter().enumerate() {
        let p = &m.path;
        let mut add = |n: String| {
            names.entry(n).or_insert(i);
        };
        match m.component {
            Component::Unet => {
                add(format!("unet.{p}"));
                add(p.clone());
                add(format!("lora_unet_{}", p.replace('.', "_")));
                if let Some((ldm, _)) = keymap.to_ldm(p) {
                    add(format!("lora_unet_{}", ldm.replace('.', "_")));
                }
            }
            c @ (Component::TextEncoder | Component::TextEncoder2) => {
                // kohya's prefix; SDXL's first encoder also answers to plain `lora_te`.
                let own = kohya_text_prefix(sd, c);
                let kohya: &[&str] = match own {
                    "lora_te1" => &["lora_te1", "lora_te"],
                    _ => &[own],
                };
                let short = p.strip_prefix("text_model.").unwrap_or(p);
                for name in [p.as_str(), short] {
                    add(format!("{}.{name}", c.prefix()));
                    for k in kohya {
                        add(format!("{k}_{}", name.replace('.', "_")));
                    }
                }
            }
        }
        targets.push(Target {
            component: m.component,
            path: m.path,
            dims: m.layer.weight().dims().to_vec(),
        });
    }
    (targets, names)
}

/// The safetensors header's `__metadata__`.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::reading(path, e))?;
    let bad = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| bad(e.to_string()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        return Err(bad(format!("header of {n} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    Ok(v.get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// alpha from diffusers' `lora_adapter_metadata` (peft's LoraConfig per
/// component): `alpha_pattern`, else `lora_alpha`; rsLoRA's alpha/√r as an
/// equivalent alpha/r.
fn peft_alpha(
    meta: &Option<serde_json::Value>,
    c: Component,
    module: &str,
    r: usize,
) -> Option<f64> {
    let v = meta.as_ref()?;
    let p = c.prefix();
    let get = |k: &str| v.get(format!("{p}.{k}"));
    let short = module.strip_prefix("text_model.").unwrap_or(module);
    let pattern = get("alpha_pattern")
        .and_then(|a| a.as_object())
        .and_then(|o| {
            o.iter().find_map(|(k, a)| {
                let hit = [module, short]
                    .iter()
                    .any(|m| *m == k || m.ends_with(&format!(".{k}")));
                if hit { a.as_f64() } else { None }
            })
        });
    let alpha = pattern.or_else(|| get("lora_alpha")?.as_f64())?;
    if get("use_rslora").and_then(|b| b.as_bool()) == Some(true) {
        Some(alpha * (r as f64).sqrt())
    } else {
        Some(alpha)
    }
}

/// Reads a LoRA file (peft/diffusers or kohya, told apart by the keys) and
/// matches every tensor to a layer of `sd`.
pub fn read_lora(sd: &StableDiffusion, path: &Path) -> Result<LoraFile> {
    let path = &super::hub::resolve(path)?;
    let tensors = read_safetensors(path, &sd.device)?;
    let meta = read_metadata(path)?;
    let peft_meta: Option<serde_json::Value> = meta
        .get("lora_adapter_metadata")
        .and_then(|s| serde_json::from_str(s).ok());
    let (targets, names) = name_index(sd);
    let cfg_err = |msg: String| Error::config(path, msg);

    #[derive(Default)]
    struct Parts {
        down: Option<(String, Tensor)>,
        up: Option<(String, Tensor)>,
        alpha: Option<f64>,
    }
    let mut parts: BTreeMap<usize, Parts> = BTreeMap::new();
    let (mut kohya, mut peft) = (None::<String>, None::<String>);
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for key in keys {
        let t = &tensors[key];
        let (stem, role) =
            split_key(key).map_err(|why| cfg_err(format!("tensor `{key}` is {why}")))?;
        let is_kohya = stem.starts_with("lora_unet_") || stem.starts_with("lora_te");
        let Some(&idx) = names.get(&stem) else {
            let hint = if (stem.starts_with("lora_te1_")
                || stem.starts_with("lora_te2_")
                || stem.starts_with("text_encoder_2."))
                && !sd.is_sdxl()
            {
                " (an SDXL LoRA? this model is Stable Diffusion 1.x / 2.x)"
            } else if !is_kohya && !stem.starts_with("unet.") && !stem.starts_with("text_encoder.")
            {
                " (peft/diffusers keys start with `unet.` or `text_encoder.`, kohya keys with `lora_unet_` or `lora_te_`)"
            } else {
                " (a LoRA made for another architecture?)"
            };
            return Err(cfg_err(format!(
                "tensor `{key}`: no layer `{stem}` in this model{hint}"
            )));
        };
        if is_kohya {
            kohya.get_or_insert_with(|| key.clone());
        } else {
            peft.get_or_insert_with(|| key.clone());
        }
        let e = parts.entry(idx).or_default();
        match role {
            Role::Down => e.down = Some((key.clone(), t.clone())),
            Role::Up => e.up = Some((key.clone(), t.clone())),
            Role::Alpha => {
                let v = t
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?;
                match v.as_slice() {
                    [a] => e.alpha = Some(*a),
                    _ => {
                        return Err(Error::ShapeMismatch {
                            path: path.to_path_buf(),
                            key: key.clone(),
                            expected: vec![],
                            found: t.dims().to_vec(),
                        });
                    }
                }
            }
        }
    }
    let format = match (&kohya, &peft) {
        (Some(k), Some(p)) => {
            return Err(cfg_err(format!(
                "mixes kohya keys (`{k}`) with peft/diffusers keys (`{p}`)"
            )));
        }
        (Some(_), None) => LoraFormat::Kohya,
        (None, Some(_)) => LoraFormat::Peft,
        (None, None) => return Err(cfg_err("holds no LoRA tensors".into())),
    };

    let mut adapters = Vec::with_capacity(parts.len());
    for (idx, p) in parts {
        let tgt = &targets[idx];
        let (down_key, down) = match (p.down, &p.up) {
            (Some(d), _) => d,
            (None, Some((k, _))) => {
                return Err(cfg_err(format!(
                    "tensor `{k}` has no matching down/A tensor"
                )));
            }
            (None, None) => {
                return Err(cfg_err(format!(
                    "`{}` has an alpha but no down/up tensors",
                    tgt.path
                )));
            }
        };
        let Some((up_key, up)) = p.up else {
            return Err(cfg_err(format!(
                "tensor `{down_key}` has no matching up/B tensor"
            )));
        };
        let r = down.dim(0)?;
        let (exp_down, exp_up) = match tgt.dims.as_slice() {
            [o, i] => (vec![r, *i], vec![*o, r]),
            [o, i, kh, kw] => (vec![r, *i, *kh, *kw], vec![*o, r, 1, 1]),
            d => {
                return Err(cfg_err(format!(
                    "{}: unexpected weight shape {d:?}",
                    tgt.path
                )));
            }
        };
        let fit = |t: Tensor, key: String, expected: Vec<usize>| -> Result<Tensor> {
            // A 1×1 conv and a linear layer hold the same numbers.
            let squeeze = |d: &[usize]| -> Vec<usize> {
                let mut d = d.to_vec();
                while d.len() > 2 && d.last() == Some(&1) {
                    d.pop();
                }
                d
            };
            if t.dims() == expected.as_slice() {
                Ok(t)
            } else if squeeze(t.dims()) == squeeze(&expected) {
                Ok(t.reshape(expected)?)
            } else {
                Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    key,
                    expected,
                    found: t.dims().to_vec(),
                })
            }
        };
        let down = fit(down, down_key, exp_down)?;
        let up = fit(up, up_key, exp_up)?;
        let alpha = p
            .alpha
            .or_else(|| peft_alpha(&peft_meta, tgt.component, &tgt.path, r))
            .unwrap_or(r as f64);
        adapters.push(FileAdapter {
            component: tgt.component,
            module: tgt.path.clone(),
            down,
            up,
            alpha,
        });
    }
    Ok(LoraFile {
        path: path.to_path_buf(),
        format,
        adapters,
    })
}

// ---------------------------------------------------------------------------
// Applying LoRA files: at run time, or folded into the weights
// ---------------------------------------------------------------------------

/// Reads a LoRA file and attaches its adapters at strength `multiplier`
/// (runtime: y = base(x) + multiplier · alpha/r · B·A·x). A layer that
/// already has an adapter is an error; use [`merge_file`] to stack LoRAs.
pub fn attach_file(sd: &mut StableDiffusion, path: &Path, multiplier: f64) -> Result<LoraFile> {
    let file = read_lora(sd, path)?;
    let by_module: HashMap<(Component, &str), &FileAdapter> = file
        .adapters
        .iter()
        .map(|a| ((a.component, a.module.as_str()), a))
        .collect();
    for mut m in modules_mut(sd) {
        if let Some(a) = by_module.get(&(m.component, m.path.as_str())) {
            if m.layer.lora().is_some() {
                return Err(Error::config(
                    path,
                    format!(
                        "`{}` already has a LoRA adapter (merge the first one instead)",
                        m.path
                    ),
                ));
            }
            m.layer.set_lora(Some(Arc::new(Lora::new(
                a.down.clone(),
                a.up.clone(),
                a.alpha,
                multiplier,
            ))));
        }
    }
    Ok(file)
}

/// Reads a LoRA file and folds it into the weights: W += multiplier ·
/// alpha/r · B·A. The networks it touches are rebuilt frozen from the merged
/// weights (runtime adapters on them are dropped), so an export writes them.
pub fn merge_file(sd: &mut StableDiffusion, path: &Path, multiplier: f64) -> Result<LoraFile> {
    let file = read_lora(sd, path)?;
    let mut deltas = Vec::with_capacity(file.adapters.len());
    for a in &file.adapters {
        let l = Lora::new(a.down.clone(), a.up.clone(), a.alpha, multiplier);
        deltas.push((a.component, a.module.clone(), l.delta_weight()?));
    }
    merge_deltas(sd, deltas)?;
    Ok(file)
}

/// Folds the adapters attached to the model (e.g. just trained) into its
/// weights, as [`merge_file`] does.
pub fn merge_attached(sd: &mut StableDiffusion) -> Result<usize> {
    let mut deltas = Vec::new();
    for (c, path, l) in attached(sd) {
        deltas.push((c, path, l.delta_weight()?.detach()));
    }
    let n = deltas.len();
    merge_deltas(sd, deltas)?;
    Ok(n)
}

fn merge_deltas(sd: &mut StableDiffusion, deltas: Vec<(Component, String, Tensor)>) -> Result<()> {
    let te_root = sd.text_encoder.key_prefix();
    let mut unet_t = None;
    let mut te_t = None;
    let mut te2_t = None;
    let text_key = |root: &str, module: &str| {
        let rel = module.strip_prefix("text_model.").unwrap_or(module);
        if root.is_empty() {
            format!("{rel}.weight")
        } else {
            format!("{root}.{rel}.weight")
        }
    };
    for (c, module, delta) in deltas {
        let (map, key) = match (c, &sd.text_encoder_2) {
            (Component::Unet, _) => (
                unet_t.get_or_insert_with(|| sd.unet_vb.tensors()),
                format!("{module}.weight"),
            ),
            (Component::TextEncoder, _) => (
                te_t.get_or_insert_with(|| sd.text_encoder_vb.tensors()),
                text_key(te_root, &module),
            ),
            (Component::TextEncoder2, Some(te2)) => (
                te2_t.get_or_insert_with(|| te2.vb.tensors()),
                text_key(te2.model.key_prefix(), &module),
            ),
            (Component::TextEncoder2, None) => {
                return Err(Error::msg(
                    "merging a LoRA: adapters for a second text encoder, which the model lacks",
                ));
            }
        };
        let w = map.get(&key).ok_or_else(|| {
            Error::msg(format!("merging a LoRA: the model has no weight `{key}`"))
        })?;
        let merged = (w.to_dtype(delta.dtype())? + &delta)?.to_dtype(w.dtype())?;
        map.insert(key, merged);
    }
    let device = sd.device.clone();
    if let Some(t) = unet_t {
        let vb = Vb::from_tensors(&sd.source, t.into_iter().collect(), &device, false);
        let unet = UNet2DConditionModel::new(&vb, &sd.unet.config)?;
        vb.finish()?;
        sd.unet = unet;
        sd.unet_vb = vb;
    }
    if let Some(t) = te_t {
        let vb = Vb::from_tensors(&sd.source, t.into_iter().collect(), &device, false);
        let te = ClipTextModel::new(&vb, sd.text_encoder.config())?;
        vb.finish()?;
        sd.text_encoder = te;
        sd.text_encoder_vb = vb;
    }
    if let (Some(t), Some(te2)) = (te2_t, sd.text_encoder_2.as_mut()) {
        let vb = Vb::from_tensors(&sd.source, t.into_iter().collect(), &device, false);
        te2.model = ClipTextModel::new_with_projection(&vb, te2.model.config())?;
        vb.finish()?;
        te2.vb = vb;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Writing LoRA files
// ---------------------------------------------------------------------------

/// How a kohya file names the UNet's layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KohyaNames {
    /// `lora_unet_down_blocks_0_attentions_0_…` (sd-scripts).
    #[default]
    Diffusers,
    /// `lora_unet_input_blocks_1_1_…` (the original LDM module names).
    Ldm,
}

fn attached_or_err(sd: &StableDiffusion) -> Result<Vec<(Component, String, Arc<Lora>)>> {
    let a = attached(sd);
    if a.is_empty() {
        return Err(Error::msg("the model has no LoRA adapters to export"));
    }
    Ok(a)
}

/// Writes the model's adapters as a peft / diffusers file (what
/// `StableDiffusionPipeline.load_lora_weights` reads), alpha/r and the
/// adapters' multiplier folded into B.
pub fn export_peft(sd: &StableDiffusion, path: &Path) -> Result<PathBuf> {
    let mut tensors = BTreeMap::new();
    let adapters = attached_or_err(sd)?;
    for (c, module, l) in &adapters {
        let k = format!("{}.{module}", c.prefix());
        let s = l.scale();
        let up = if s == 1.0 {
            l.up.detach()
        } else {
            (l.up.detach() * s)?
        };
        tensors.insert(format!("{k}.lora_A.weight"), l.down.detach());
        tensors.insert(format!("{k}.lora_B.weight"), up);
    }
    let (_, _, first) = &adapters[0];
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "dreambooth.lora".to_string(),
            json!({
                "rank": first.rank(),
                "alpha": first.alpha,
                "note": "alpha / rank is folded into lora_B",
                "base_model": base_model_version(sd),
            })
            .to_string(),
        ),
    ]);
    write(&tensors, path, meta)
}

/// `sd_v1` / `sd_v2` / `sdxl_base_v1-0`, kohya's `ss_base_model_version`.
pub fn base_model_version(sd: &StableDiffusion) -> &'static str {
    if sd.is_sdxl() {
        return "sdxl_base_v1-0";
    }
    match Family::from_text_config(sd.text_encoder.config()) {
        Family::Sd2 => "sd_v2",
        Family::Sd1 | Family::Sdxl => "sd_v1",
    }
}

/// kohya's prefix for a text encoder's layers: `lora_te`, or sd-scripts'
/// `lora_te1` / `lora_te2` for SDXL's two.
fn kohya_text_prefix(sd: &StableDiffusion, c: Component) -> &'static str {
    match c {
        Component::TextEncoder2 => "lora_te2",
        _ if sd.is_sdxl() => "lora_te1",
        _ => "lora_te",
    }
}

/// The kohya name of a layer: `lora_unet_…` / `lora_te_…`.
pub fn kohya_name(
    sd: &StableDiffusion,
    c: Component,
    module: &str,
    names: KohyaNames,
) -> Result<String> {
    Ok(match (c, names) {
        (Component::TextEncoder | Component::TextEncoder2, _) => {
            format!("{}_{}", kohya_text_prefix(sd, c), module.replace('.', "_"))
        }
        (Component::Unet, KohyaNames::Diffusers) => {
            format!("lora_unet_{}", module.replace('.', "_"))
        }
        (Component::Unet, KohyaNames::Ldm) => {
            let (ldm, _) = unet_keys::key_map(&sd.unet.config)
                .to_ldm(module)
                .ok_or_else(|| Error::msg(format!("`{module}` has no original LDM name")))?;
            format!("lora_unet_{}", ldm.replace('.', "_"))
        }
    })
}

/// Writes the model's adapters as a kohya file (`lora_down` / `lora_up` /
/// `alpha`, sd-scripts' `ss_*` metadata); the multiplier is folded into up.
pub fn export_kohya(sd: &StableDiffusion, path: &Path, names: KohyaNames) -> Result<PathBuf> {
    let adapters = attached_or_err(sd)?;
    let mut tensors = BTreeMap::new();
    let mut conv: Option<(usize, f64)> = None;
    let mut linear: Option<(usize, f64)> = None;
    for (c, module, l) in &adapters {
        let name = kohya_name(sd, *c, module, names)?;
        let up = if l.multiplier == 1.0 {
            l.up.detach()
        } else {
            (l.up.detach() * l.multiplier)?
        };
        let is_conv = l.down.rank() == 4 && l.down.dims()[2..] != [1, 1];
        let slot = if is_conv { &mut conv } else { &mut linear };
        slot.get_or_insert((l.rank(), l.alpha));
        tensors.insert(format!("{name}.lora_down.weight"), l.down.detach());
        tensors.insert(format!("{name}.lora_up.weight"), up);
        tensors.insert(
            format!("{name}.alpha"),
            Tensor::new(l.alpha as f32, &Device::Cpu)?,
        );
    }
    let (dim, alpha) = linear.or(conv).expect("at least one adapter");
    let v2 = base_model_version(sd) == "sd_v2";
    let mut meta = HashMap::from([
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), dim.to_string()),
        ("ss_network_alpha".to_string(), format_alpha(alpha)),
        (
            "ss_base_model_version".to_string(),
            base_model_version(sd).to_string(),
        ),
        (
            "ss_v2".to_string(),
            if v2 { "True" } else { "False" }.to_string(),
        ),
        (
            "ss_v_parameterization".to_string(),
            if sd.prediction_type() == crate::diffusion::PredictionType::VPrediction {
                "True"
            } else {
                "False"
            }
            .to_string(),
        ),
    ]);
    if let Some((cd, ca)) = conv {
        meta.insert(
            "ss_network_args".to_string(),
            json!({"conv_dim": cd.to_string(), "conv_alpha": format_alpha(ca)}).to_string(),
        );
    }
    write(&tensors, path, meta)
}

fn format_alpha(a: f64) -> String {
    if a.fract() == 0.0 {
        format!("{a:.1}")
    } else {
        a.to_string()
    }
}

fn write(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
    meta: HashMap<String, String>,
) -> Result<PathBuf> {
    if let Some(d) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    save_safetensors(tensors, path, Some(meta))?;
    Ok(path.to_path_buf())
}

/// Pairs `--lora` files with `--lora-scale` values: none (1 each), one for
/// all, or one per file.
pub fn pair_scales(files: &[PathBuf], scales: &[f64]) -> Result<Vec<(PathBuf, f64)>> {
    let s = |i: usize| match scales.len() {
        0 => Ok(1.0),
        1 => Ok(scales[0]),
        n if n == files.len() => Ok(scales[i]),
        n => Err(Error::msg(format!(
            "{n} --lora-scale values for {} --lora files (give one for all, or one per file)",
            files.len()
        ))),
    };
    if files.is_empty() && !scales.is_empty() {
        return Err(Error::msg("--lora-scale without --lora"));
    }
    files
        .iter()
        .enumerate()
        .map(|(i, f)| Ok((f.clone(), s(i)?)))
        .collect()
}

/// One line about an applied file: format, layers, scale.
pub fn describe(file: &LoraFile, scale: f64) -> String {
    let (u, t) = file.counts();
    format!(
        "LoRA {} ({}, {u} UNet + {t} text-encoder layers, scale {scale})",
        file.path.display(),
        file.format
    )
}

/// Parameters of the adapters attached to a model (A and B of each).
pub fn num_params(sd: &StableDiffusion) -> usize {
    attached(sd)
        .iter()
        .map(|(_, _, l)| l.down.elem_count() + l.up.elem_count())
        .sum()
}
