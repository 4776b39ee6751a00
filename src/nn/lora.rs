//! LoRA (Hu et al. 2021): a frozen layer plus a trainable low-rank update,
//!
//! ```text
//! y = base(x) + scale · B(A(dropout(x))),   scale = alpha / r
//! ```
//!
//! with A: (r, in) and B: (out, r) for a linear layer, and for a convolution
//! A: (r, in, kh, kw) with the base layer's stride and padding and B a 1×1
//! convolution (out, r, 1, 1) — peft's and kohya's layout. A [`Lora`] hangs
//! off a [`Linear`](super::Linear) or [`Conv2d`](super::Conv2d) (their `lora`
//! field); the model files are unchanged. Trainable adapters start as peft's:
//! A kaiming-uniform (a = √5), B zero, so an untrained adapter changes nothing.
//!
//! The base weight stays a plain tensor. [`matmul`] (which `Linear` and the
//! im2col convolution use) computes no gradient for an operand that takes no
//! part in backprop: candle's own matmul backward computes both operands'
//! gradients, so a frozen UNet would still pay for every weight gradient.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use rand::{Rng, SeedableRng};

use crate::Result;

/// Dropout on the adapters' input, shared by the adapters of one training
/// run. Masks are drawn from (seed, step, adapter id) alone, so a resumed run
/// draws what an uninterrupted one would; outside [`begin_step`](Self::begin_step)
/// / [`end_step`](Self::end_step) (validation, sampling) dropout is off.
#[derive(Debug)]
pub struct LoraDropout {
    pub p: f64,
    pub seed: u64,
    step: AtomicU64,
    active: AtomicBool,
}

impl LoraDropout {
    pub fn new(p: f64, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            p,
            seed,
            step: AtomicU64::new(0),
            active: AtomicBool::new(false),
        })
    }

    /// Turns dropout on for (micro-)step `step`.
    pub fn begin_step(&self, step: u64) {
        self.step.store(step, Ordering::SeqCst);
        self.active.store(true, Ordering::SeqCst);
    }

    /// Turns dropout off (after the step's backward).
    pub fn end_step(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    fn mask_seed(&self, id: u64) -> Option<u64> {
        if self.p <= 0.0 || !self.active.load(Ordering::SeqCst) {
            return None;
        }
        let step = self.step.load(Ordering::SeqCst);
        Some(splitmix(splitmix(self.seed ^ 0x10BA_D809) ^ step) ^ splitmix(id))
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One low-rank adapter. `down` is A, `up` is B (trainable adapters hold the
/// tensors of their `Var`s, so an optimizer step is seen at once).
#[derive(Debug)]
pub struct Lora {
    /// A: (r, in) or (r, in, kh, kw).
    pub down: Tensor,
    /// B: (out, r) or (out, r, 1, 1).
    pub up: Tensor,
    /// kohya's / peft's alpha: the update is scaled by alpha / r.
    pub alpha: f64,
    /// The user's strength (`--lora-scale`), 1 for training.
    pub multiplier: f64,
    pub dropout: Option<Arc<LoraDropout>>,
    /// Distinguishes this adapter's dropout masks from the others'.
    pub id: u64,
}

impl Lora {
    /// An adapter of fixed (loaded) weights.
    pub fn new(down: Tensor, up: Tensor, alpha: f64, multiplier: f64) -> Self {
        Self {
            down,
            up,
            alpha,
            multiplier,
            dropout: None,
            id: 0,
        }
    }

    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(1).max(1)
    }

    /// alpha / r × multiplier: what B·A is multiplied by.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64 * self.multiplier
    }

    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        let Some(seed) = self.dropout.as_ref().and_then(|d| d.mask_seed(self.id)) else {
            return Ok(x.clone());
        };
        let p = self.dropout.as_ref().map(|d| d.p).unwrap_or(0.0);
        let keep = 1.0 - p;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let inv = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < keep { inv } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.dims(), &candle_core::Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }

    /// scale · B(A(x)) for a linear layer's input `x` (rows, in) → (rows, out).
    pub fn forward_linear(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.drop(x)?;
        let like = super::precision::like;
        let mut h = matmul(&x, &like(&self.down, &x)?.t()?)?;
        let s = self.scale();
        if s != 1.0 {
            h = (h * s)?;
        }
        Ok(matmul(&h, &like(&self.up, &h)?.t()?)?)
    }

    /// scale · B(A(x)) for a convolution's input `x` (B, C, H, W), A applied
    /// with the base layer's `stride` and `padding`.
    pub fn forward_conv(&self, x: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
        let x = self.drop(x)?;
        let conv = |w: &Tensor, stride, padding| super::Conv2d {
            weight: w.clone(),
            bias: None,
            stride,
            padding,
            lora: None,
        };
        let mut h = conv(&self.down, stride, padding).forward(&x)?;
        let s = self.scale();
        if s != 1.0 {
            h = (h * s)?;
        }
        conv(&self.up, 1, 0).forward(&h)
    }

    /// The weight update scale · B·A in the base weight's shape: (out, in)
    /// or (out, in, kh, kw). Folding it into the weight gives the same layer.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let r = self.rank();
        let out = self.up.dim(0)?;
        let down_dims = self.down.dims().to_vec();
        let a = self.down.reshape((r, self.down.elem_count() / r))?;
        let b = self.up.reshape((out, r))?;
        let d = (b.matmul(&a)? * self.scale())?;
        let mut shape = vec![out];
        shape.extend_from_slice(&down_dims[1..]);
        Ok(d.reshape(shape)?)
    }
}

/// `a · b` for 2-D tensors. When exactly one operand takes part in backprop
/// (a frozen weight times a tracked activation, or a trained weight times a
/// constant input) the product is a custom op whose backward computes that
/// operand's gradient only; otherwise it is candle's matmul. Same numbers.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (ta, tb) = (a.track_op(), b.track_op());
    let fits = a.rank() == 2
        && b.rank() == 2
        && a.dim(1)? == b.dim(0)?
        && a.dtype() == b.dtype()
        && ((b.device().is_cpu() && super::fused::use_fused(a))
            || (cfg!(feature = "cuda")
                && a.device().is_cuda()
                && b.device().is_cuda()
                && !super::kernel_paths::turned_off(super::kernel_paths::GpuPath::Frozen)));
    if ta != tb && fits {
        if ta {
            a.apply_op1(FrozenMatmul {
                other: b.clone(),
                tracked: Tracked::Lhs,
            })
        } else {
            b.apply_op1(FrozenMatmul {
                other: a.clone(),
                tracked: Tracked::Rhs,
            })
        }
    } else {
        a.matmul(b)
    }
}

/// `x · other`, `other · x`, or `other · x[b]` for each matrix of a batch,
/// differentiable in `x` only.
struct FrozenMatmul {
    other: Tensor,
    tracked: Tracked,
}

/// Which operand of a [`FrozenMatmul`] is the tracked `x`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracked {
    /// `x · other`, both 2-D.
    Lhs,
    /// `other · x`, both 2-D.
    Rhs,
    /// `other · x[b]`: a 2-D `other` broadcast over a batch `x` (B, K, N).
    BatchRhs,
}

impl FrozenMatmul {
    /// The product on one backend's storage: `s` (layout `l`) is the tracked
    /// operand, `o` (layout `ol`) the other one.
    fn product<S: BackendStorage>(
        &self,
        s: &S,
        l: &Layout,
        o: &S,
        ol: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        match self.tracked {
            Tracked::Lhs | Tracked::Rhs => {
                let (lhs, ll, rhs, rl) = if self.tracked == Tracked::Lhs {
                    (s, l, o, ol)
                } else {
                    (o, ol, s, l)
                };
                let (m, k) = ll.shape().dims2()?;
                let (_, n) = rl.shape().dims2()?;
                let out = lhs.matmul(rhs, (1, m, n, k), ll, rl)?;
                Ok((out, Shape::from((m, n))))
            }
            Tracked::BatchRhs => {
                let (b, k, n) = l.shape().dims3()?;
                let (m, _) = ol.shape().dims2()?;
                let wide = ol.broadcast_as((b, m, k))?;
                let out = o.matmul(s, (b, m, n, k), &wide, l)?;
                Ok((out, Shape::from((b, m, n))))
            }
        }
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (os, ol) = self.other.storage_and_layout();
        let Storage::Cpu(oc) = &*os else {
            candle_core::bail!("frozen-matmul: the other operand is not on the CPU")
        };
        self.product(s, l, oc, ol)
    }

    /// The same product on the GPU (cuBLAS through candle's storage).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (os, ol) = self.other.storage_and_layout();
        let Storage::Cuda(oc) = &*os else {
            candle_core::bail!("frozen-matmul: the other operand is not on the GPU")
        };
        self.product(s, l, oc, ol)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = match self.tracked {
            Tracked::Lhs => matmul(grad, &self.other.t()?)?,
            Tracked::Rhs => matmul(&self.other.t()?, grad)?,
            Tracked::BatchRhs => {
                let grad = grad.to_dtype(self.other.dtype())?;
                frozen_weight_bmm(&self.other.t()?, &grad)?
            }
        };
        Ok(Some(g))
    }
}

/// `w · x[b]` for every image of a batch: a frozen 2-D weight `w` (O, C)
/// times a tracked batch `x` (B, C, N) → (B, O, N), as one batched GEMM with
/// the weight broadcast (stride 0); the backward computes `x`'s gradient
/// only (wᵀ · dy), never the frozen weight's. A LoRA base's 1×1
/// convolutions on the GPU take it.
pub fn frozen_weight_bmm(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, c) = w.dims2()?;
    let (_, cx, _) = x.dims3()?;
    if c != cx || w.dtype() != x.dtype() {
        candle_core::bail!(
            "frozen_weight_bmm: weight {:?} {:?}, input {:?} {:?}",
            w.dims(),
            w.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    x.contiguous()?.apply_op1(FrozenMatmul {
        other: w.contiguous()?.detach(),
        tracked: Tracked::BatchRhs,
    })
}
