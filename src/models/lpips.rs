//! LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
//! as a Perceptual Metric"): the `lpips` package's `LPIPS(net='alex'|'vgg',
//! version='0.1')` for inference, the distance the DreamBooth paper's DIV uses.
//!
//! d(a, b) = Σ_l mean_{h,w} Σ_c w_{l,c} (f̂_l(a) − f̂_l(b))²_{c,h,w}, where f_l is
//! the l-th backbone slice's ReLU output on `(x − shift) / scale` and
//! f̂ = f / (‖f‖_channels + 1e-10).
//!
//! Weights are one safetensors file with the key names of `lpips.LPIPS`'s
//! `state_dict()` (`tools/convert_lpips.py` writes it):
//!
//! - `scaling_layer.shift`, `scaling_layer.scale` (1, 3, 1, 1): optional, the
//!   package's constants when absent (they are fixed buffers, not learned);
//! - `net.sliceS.I.{weight,bias}`: the torchvision backbone's convolutions, `I`
//!   their index in `features` (AlexNet: 0, 3, 6, 8, 10; VGG16: 0, 2 | 5, 7 |
//!   10, 12, 14 | 17, 19, 21 | 24, 26, 28);
//! - `lins.N.model.1.weight` (1, C_N, 1, 1), the linear heads (no bias), and/or
//!   the same tensors as `linN.model.1.weight` (the package's `.pth` files and
//!   its state dict name them so; when both are present they must be equal).
//!
//! The backbone (AlexNet or VGG16) is recognised from the key names and every
//! channel width is read from the shapes, so narrowed test models load as real
//! checkpoints do; kernel sizes, strides, paddings and pooling are torchvision's
//! (AlexNet: conv 11/4/2, 5/1/2, then 3/1/1, max-pool 3 stride 2; VGG16: conv
//! 3/1/1, max-pool 2 stride 2; no padding, floor mode).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::nn::{Conv2d, Init, Vb, read_weights};
use crate::{Error, Result};

/// The LPIPS package's ScalingLayer constants (ImageNet statistics in [-1, 1]).
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];
/// `lpips.normalize_tensor`'s epsilon.
const EPS: f64 = 1e-10;

/// The backbone under the linear heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backbone {
    /// torchvision's AlexNet `features` up to relu5 (5 layers).
    Alex,
    /// torchvision's VGG16 `features` up to relu5_3 (5 layers).
    Vgg16,
}

impl Backbone {
    pub fn name(self) -> &'static str {
        match self {
            Backbone::Alex => "alex",
            Backbone::Vgg16 => "vgg",
        }
    }

    /// The slices as torchvision builds them: per slice, its layers by index in
    /// `features`.
    fn layout(self) -> Vec<Vec<(usize, Layer)>> {
        use Layer::*;
        let conv = |kernel, stride, padding, width| Conv {
            kernel,
            stride,
            padding,
            width,
        };
        match self {
            Backbone::Alex => vec![
                vec![(0, conv(11, 4, 2, 64)), (1, Relu)],
                vec![(2, Pool(3, 2)), (3, conv(5, 1, 2, 192)), (4, Relu)],
                vec![(5, Pool(3, 2)), (6, conv(3, 1, 1, 384)), (7, Relu)],
                vec![(8, conv(3, 1, 1, 256)), (9, Relu)],
                vec![(10, conv(3, 1, 1, 256)), (11, Relu)],
            ],
            Backbone::Vgg16 => {
                // features: 64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512
                let plan: [(usize, &[usize]); 5] = [
                    (64, &[0, 2]),
                    (128, &[5, 7]),
                    (256, &[10, 12, 14]),
                    (512, &[17, 19, 21]),
                    (512, &[24, 26, 28]),
                ];
                plan.iter()
                    .enumerate()
                    .map(|(s, (width, convs))| {
                        let mut layers = Vec::new();
                        if s > 0 {
                            layers.push((convs[0] - 1, Pool(2, 2)));
                        }
                        for &i in convs.iter() {
                            layers.push((i, conv(3, 1, 1, *width)));
                            layers.push((i + 1, Relu));
                        }
                        layers
                    })
                    .collect()
            }
        }
    }
}

/// One layer of the layout; `width` is torchvision's (used only in errors).
#[derive(Clone, Copy, Debug)]
enum Layer {
    Conv {
        kernel: usize,
        stride: usize,
        padding: usize,
        width: usize,
    },
    Relu,
    Pool(usize, usize),
}

#[derive(Clone, Debug)]
enum Op {
    Conv(Conv2d),
    Relu,
    /// Max-pool (kernel, stride), no padding, floor mode.
    Pool(usize, usize),
}

/// The normalized features of a batch of images, one tensor (B, C_l, h_l, w_l)
/// per layer: what [`Lpips::features`] returns and [`Lpips::distance_features`] compares.
#[derive(Clone, Debug)]
pub struct LpipsFeatures(pub Vec<Tensor>);

/// LPIPS v0.1 with an AlexNet or VGG16 backbone. Inference only.
#[derive(Clone, Debug)]
pub struct Lpips {
    backbone: Backbone,
    /// (1, 3, 1, 1) each.
    shift: Tensor,
    scale: Tensor,
    slices: Vec<Vec<Op>>,
    /// Per layer, the head's weight as (1, C, 1, 1).
    lins: Vec<Tensor>,
}

/// Why a file is not an LPIPS checkpoint, naming what is missing.
fn not_lpips(path: &Path, tensors: &HashMap<String, Tensor>, what: &str) -> Error {
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let sample = match keys.first() {
        Some(k) => format!("it holds {} tensor(s), e.g. `{k}`", keys.len()),
        None => "it holds no tensors".to_string(),
    };
    Error::config(
        path,
        format!(
            "not an LPIPS checkpoint (the `lpips.LPIPS` state_dict, net 'alex' or 'vgg'): \
             {what}; {sample}. tools/convert_lpips.py writes one"
        ),
    )
}

impl Lpips {
    /// Loads LPIPS weights from a safetensors file with `lpips.LPIPS`'s key names
    /// (see the module docs). A file of another model, or of an LPIPS with the
    /// SqueezeNet backbone, is an error that names the file and what is missing.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = read_weights(path, device)?;
        let has = |k: &str| tensors.contains_key(k);
        let any_net = tensors.keys().any(|k| k.starts_with("net.slice"));
        let any_lin = tensors
            .keys()
            .any(|k| k.starts_with("lins.") || (k.starts_with("lin") && k.contains(".model.")));
        let backbone = if has("net.slice1.2.weight") {
            Backbone::Vgg16
        } else if has("net.slice2.3.weight") {
            Backbone::Alex
        } else if tensors.keys().any(|k| k.contains(".squeeze.")) {
            return Err(not_lpips(
                path,
                &tensors,
                "its backbone is SqueezeNet; only 'alex' and 'vgg' are supported",
            ));
        } else if any_net {
            return Err(not_lpips(
                path,
                &tensors,
                "its `net.slice*` tensors are neither AlexNet's (`net.slice2.3.weight`) \
                 nor VGG16's (`net.slice1.2.weight`)",
            ));
        } else if any_lin {
            return Err(not_lpips(
                path,
                &tensors,
                "it has linear heads but no backbone `net.slice1.0.weight` (the lpips \
                 package's .pth files hold the heads only; the backbone comes from torchvision)",
            ));
        } else if has("features.0.weight") {
            return Err(not_lpips(
                path,
                &tensors,
                "it looks like a torchvision backbone alone (`features.0.weight`), without \
                 the linear heads; `tools/convert_lpips.py --backbone FILE` combines the two",
            ));
        } else {
            return Err(not_lpips(
                path,
                &tensors,
                "missing the backbone `net.slice1.0.weight` and the linear heads \
                 `lins.0.model.1.weight`",
            ));
        };
        let vb = Vb::from_tensors(path, tensors.clone(), device, false);
        let model = Self::build(&vb, &tensors, backbone)?;
        vb.finish()?;
        Ok(model)
    }

    fn build(vb: &Vb, tensors: &HashMap<String, Tensor>, backbone: Backbone) -> Result<Self> {
        let (shift, scale) =
            if vb.contains("scaling_layer.shift") || vb.contains("scaling_layer.scale") {
                let s = vb.pp("scaling_layer");
                (
                    s.get(&[1, 3, 1, 1], "shift", Init::Const(0.0))?,
                    s.get(&[1, 3, 1, 1], "scale", Init::Const(1.0))?,
                )
            } else {
                let c = |v: [f32; 3]| Tensor::from_vec(v.to_vec(), (1, 3, 1, 1), vb.device());
                (c(SHIFT)?, c(SCALE)?)
            };
        let mut c_in = 3;
        let mut slices = Vec::new();
        let mut widths = Vec::new();
        for (s, layers) in backbone.layout().into_iter().enumerate() {
            let svb = vb.pp(format!("net.slice{}", s + 1));
            let mut ops = Vec::new();
            for (i, layer) in layers {
                ops.push(match layer {
                    Layer::Conv {
                        kernel,
                        stride,
                        padding,
                        width,
                    } => {
                        // The width is the file's; the shape check covers the rest.
                        let key = format!("net.slice{}.{i}.weight", s + 1);
                        let out = match tensors.get(&key) {
                            Some(t) if t.rank() == 4 => t.dim(0)?,
                            _ => width,
                        };
                        let conv = Conv2d::new(&svb.pp(i), c_in, out, kernel, stride, padding)?;
                        c_in = out;
                        Op::Conv(conv)
                    }
                    Layer::Relu => Op::Relu,
                    Layer::Pool(k, st) => Op::Pool(k, st),
                });
            }
            slices.push(ops);
            widths.push(c_in);
        }
        let mut lins = Vec::new();
        for (n, &c) in widths.iter().enumerate() {
            let shape = [1, c, 1, 1];
            let in_list = vb.contains(&format!("lins.{n}.model.1.weight"));
            let alone = vb.contains(&format!("lin{n}.model.1.weight"));
            let w = if in_list || !alone {
                vb.pp(format!("lins.{n}.model.1"))
                    .get(&shape, "weight", Init::Const(0.0))?
            } else {
                vb.pp(format!("lin{n}.model.1"))
                    .get(&shape, "weight", Init::Const(0.0))?
            };
            if in_list && alone {
                let other =
                    vb.pp(format!("lin{n}.model.1"))
                        .get(&shape, "weight", Init::Const(0.0))?;
                let diff = (&w - &other)?.abs()?.max_all()?.to_scalar::<f32>()?;
                if diff != 0.0 {
                    return Err(Error::config(
                        vb.path(),
                        format!(
                            "`lins.{n}.model.1.weight` and `lin{n}.model.1.weight` differ \
                             (max |Δ| = {diff:e}); in an LPIPS state_dict they are one tensor"
                        ),
                    ));
                }
            }
            lins.push(w);
        }
        Ok(Self {
            backbone,
            shift,
            scale,
            slices,
            lins,
        })
    }

    pub fn backbone(&self) -> Backbone {
        self.backbone
    }

    /// The channel width of each compared layer (5 for both backbones).
    pub fn channels(&self) -> Vec<usize> {
        self.lins.iter().map(|w| w.dim(1).unwrap_or(0)).collect()
    }

    /// Whether an (h, w) input leaves every layer's output non-empty.
    fn fits(&self, h: usize, w: usize) -> bool {
        let (mut h, mut w) = (h, w);
        for op in self.slices.iter().flatten() {
            match op {
                Op::Conv(c) => {
                    let k = c.weight.dim(2).unwrap_or(1);
                    let p2 = 2 * c.padding;
                    if h + p2 < k || w + p2 < k {
                        return false;
                    }
                    h = (h + p2 - k) / c.stride + 1;
                    w = (w + p2 - k) / c.stride + 1;
                }
                Op::Relu => {}
                Op::Pool(k, s) => {
                    if h < *k || w < *k {
                        return false;
                    }
                    h = (h - k) / s + 1;
                    w = (w - k) / s + 1;
                }
            }
        }
        true
    }

    fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        let (_, c, h, w) = x.dims4().map_err(|_| {
            Error::msg(format!(
                "LPIPS: {what} has shape {:?}, expected (N, 3, H, W)",
                x.dims()
            ))
        })?;
        if c != 3 {
            return Err(Error::msg(format!(
                "LPIPS: {what} has {c} channels, expected 3 (RGB in [-1, 1])"
            )));
        }
        if !self.fits(h, w) {
            let min = (1..=4096).find(|&s| self.fits(s, s)).unwrap_or(0);
            return Err(Error::msg(format!(
                "LPIPS ({}): {what} is {h}×{w}, too small for the backbone \
                 (each side must be at least {min})",
                self.backbone.name()
            )));
        }
        Ok(())
    }

    /// The normalized features of images (N, 3, H, W) in [-1, 1]: per layer,
    /// the slice's output divided by its channel norm (+ 1e-10).
    pub fn features(&self, x: &Tensor) -> Result<LpipsFeatures> {
        self.check_input(x, "the input")?;
        let x = x.to_dtype(DType::F32)?;
        let mut h = x
            .broadcast_sub(&self.shift)?
            .broadcast_div(&self.scale)?
            .contiguous()?;
        let mut out = Vec::with_capacity(self.slices.len());
        for ops in &self.slices {
            for op in ops {
                h = match op {
                    Op::Conv(c) => c.forward(&h)?,
                    Op::Relu => h.relu()?,
                    Op::Pool(k, s) => h.max_pool2d_with_stride(*k, *s)?,
                };
            }
            let norm = h.sqr()?.sum_keepdim(1)?.sqrt()?.affine(1.0, EPS)?;
            out.push(h.broadcast_div(&norm)?);
        }
        Ok(LpipsFeatures(out))
    }

    /// LPIPS between the features of two batches of the same size: (N,).
    pub fn distance_features(&self, a: &LpipsFeatures, b: &LpipsFeatures) -> Result<Tensor> {
        if a.0.len() != self.lins.len() || b.0.len() != self.lins.len() {
            return Err(Error::msg(format!(
                "LPIPS: features of {} and {} layers, the model compares {}",
                a.0.len(),
                b.0.len(),
                self.lins.len()
            )));
        }
        let mut total: Option<Tensor> = None;
        for ((fa, fb), w) in a.0.iter().zip(&b.0).zip(&self.lins) {
            if fa.dims() != fb.dims() {
                return Err(Error::msg(format!(
                    "LPIPS: features of shapes {:?} and {:?} cannot be compared",
                    fa.dims(),
                    fb.dims()
                )));
            }
            let d = (fa - fb)?.sqr()?;
            // The 1×1 head (no bias), then the spatial mean.
            let d = d.broadcast_mul(w)?.sum(1)?; // (N, h, w)
            let d = d.flatten_from(1)?.mean(1)?; // (N,)
            total = Some(match total {
                Some(t) => (t + d)?,
                None => d,
            });
        }
        total.ok_or_else(|| Error::msg("LPIPS: the model has no layers"))
    }

    /// LPIPS distances between `a[i]` and `b[i]`: images (N, 3, H, W) in
    /// [-1, 1] (the package's `normalize=False`) → (N,). Both batches go
    /// through the backbone together.
    pub fn distance(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.check_input(a, "the first batch")?;
        self.check_input(b, "the second batch")?;
        if a.dims() != b.dims() {
            return Err(Error::msg(format!(
                "LPIPS: the batches have shapes {:?} and {:?}; they must be equal",
                a.dims(),
                b.dims()
            )));
        }
        let n = a.dim(0)?;
        let f = self.features(&Tensor::cat(&[a, b], 0)?)?;
        let fa = LpipsFeatures(
            f.0.iter()
                .map(|t| t.narrow(0, 0, n))
                .collect::<candle_core::Result<_>>()?,
        );
        let fb = LpipsFeatures(
            f.0.iter()
                .map(|t| t.narrow(0, n, n))
                .collect::<candle_core::Result<_>>()?,
        );
        self.distance_features(&fa, &fb)
    }

    /// LPIPS between every unordered pair of `images` (N, 3, H, W) in [-1, 1],
    /// in the order (0,1), (0,2), …, (0,N−1), (1,2), …: N(N−1)/2 values. Each
    /// image goes through the backbone once, one at a time (memory stays that
    /// of a single image).
    pub fn pairwise_distances(&self, images: &Tensor) -> Result<Vec<f64>> {
        self.check_input(images, "the images")?;
        let n = images.dim(0)?;
        let feats = (0..n)
            .map(|i| self.features(&images.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(n * n.saturating_sub(1) / 2);
        for i in 0..n {
            for j in i + 1..n {
                let d = self.distance_features(&feats[i], &feats[j])?;
                out.push(d.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0]);
            }
        }
        Ok(out)
    }
}
