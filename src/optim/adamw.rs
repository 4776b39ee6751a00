//! AdamW exactly as `torch.optim.AdamW` computes it (decoupled weight decay,
//! bias-corrected moments), over named parameters. Its state saves and
//! restores for resumable training.
//!
//! On the CPU with f32 parameters the update is one fused, multi-threaded
//! pass per parameter that rewrites the weight and both moments in place
//! ([`fused_update`]); it performs the same f32 operations in the same order
//! as the plain candle-op version (kept for other devices and dtypes, and as
//! the reference in tests), so both give bit-identical results.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// diffusers' DreamBooth defaults (lr 5e-6, betas 0.9/0.999, wd 1e-2, eps 1e-8).
    fn default() -> Self {
        Self {
            lr: 5e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// One parameter group with its own hyper-parameters.
pub struct AdamW {
    pub config: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    pub step: u64,
    /// Use the fused in-place CPU update where it applies (f32, CPU,
    /// contiguous; off with `DREAMBOOTH_NO_FUSED`). `false` forces the plain
    /// candle-op update (the reference in tests).
    pub fused: bool,
}

impl AdamW {
    pub fn new(vars: BTreeMap<String, Var>, config: AdamWConfig) -> Result<Self> {
        let mut slots = BTreeMap::new();
        for (k, var) in vars {
            let m = var.as_tensor().zeros_like()?;
            let v = var.as_tensor().zeros_like()?;
            slots.insert(k, Slot { var, m, v });
        }
        Ok(Self {
            config,
            slots,
            step: 0,
            fused: true,
        })
    }

    pub fn num_params(&self) -> usize {
        self.slots
            .values()
            .map(|s| s.var.as_tensor().elem_count())
            .sum()
    }

    pub fn vars(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.slots.iter().map(|(k, s)| (k, &s.var))
    }

    /// Each parameter's tensor id with its name.
    pub fn ids(&self) -> impl Iterator<Item = (candle_core::TensorId, &String)> {
        self.slots.iter().map(|(k, s)| (s.var.as_tensor().id(), k))
    }

    /// An empty group (no parameters), e.g. to stand in for one moved away.
    pub fn empty(config: AdamWConfig) -> Self {
        Self {
            config,
            slots: BTreeMap::new(),
            step: 0,
            fused: true,
        }
    }

    /// Gradients of this group's parameters present in `grads`, by name.
    pub fn grads<'a>(
        &'a self,
        grads: &'a GradStore,
    ) -> impl Iterator<Item = (&'a String, &'a Tensor)> {
        self.slots
            .iter()
            .filter_map(|(k, s)| grads.get(s.var.as_tensor()).map(|g| (k, g)))
    }

    /// The gradients of this group's parameters, detached, by name.
    pub fn collect(&self, grads: &GradStore) -> BTreeMap<String, Tensor> {
        self.grads(grads)
            .map(|(k, g)| (k.clone(), g.detach()))
            .collect()
    }

    /// Adds `grads` into `acc` (gradient accumulation).
    pub fn accumulate(
        acc: &mut BTreeMap<String, Tensor>,
        grads: BTreeMap<String, Tensor>,
    ) -> Result<()> {
        for (k, g) in grads {
            let sum = match acc.remove(&k) {
                Some(a) => (a + g)?,
                None => g,
            };
            acc.insert(k, sum);
        }
        Ok(())
    }

    /// One update from a backward pass's gradient store.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let map = self.collect(grads);
        self.step_map(&map, lr, grad_scale)
    }

    /// One update with learning rate `lr` from gradients by name; `grad_scale`
    /// multiplies every gradient first (gradient-norm clipping, accumulation averaging).
    pub fn step_map(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let coefs = self.begin_step(lr);
        for (key, slot) in self.slots.iter_mut() {
            if let Some(g) = grads.get(key) {
                update(slot, g, grad_scale, &coefs, self.fused)?;
            }
        }
        Ok(())
    }

    /// Starts update number `step + 1` with learning rate `lr`: the step
    /// count advances and the returned coefficients go to
    /// [`AdamW::update`] for each parameter of this step (the parameters
    /// may come one by one, as in a fused backward pass).
    pub fn begin_step(&mut self, lr: f64) -> StepCoefs {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.config.beta1.powi(t);
        let bc2 = 1.0 - self.config.beta2.powi(t);
        StepCoefs {
            config: self.config,
            lr,
            step_size: lr / bc1,
            bc2_sqrt: bc2.sqrt(),
        }
    }

    /// Updates parameter `key` from its gradient `g` (times `grad_scale`)
    /// with the coefficients of the current step; `false` when the group
    /// has no parameter `key`.
    pub fn update(
        &mut self,
        key: &str,
        g: &Tensor,
        grad_scale: f64,
        coefs: &StepCoefs,
    ) -> Result<bool> {
        let fused = self.fused;
        match self.slots.get_mut(key) {
            Some(slot) => update(slot, g, grad_scale, coefs, fused).map(|()| true),
            None => Ok(false),
        }
    }

    /// Moments by name (`m.<key>`, `v.<key>`) for checkpoints. The tensors
    /// share storage with the optimizer's, which the next [`AdamW::step`]
    /// overwrites in place: save them (or copy them) before stepping again.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, s) in &self.slots {
            out.insert(format!("m.{k}"), s.m.clone());
            out.insert(format!("v.{k}"), s.v.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`]; errors name a missing key.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for (k, s) in self.slots.iter_mut() {
            let get = |name: String| {
                state
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| crate::Error::msg(format!("optimizer state lacks `{name}`")))
            };
            // Own copies: the fused update writes the moments in place, and
            // the caller's tensors must not change under it.
            s.m = get(format!("m.{k}"))?.copy()?;
            s.v = get(format!("v.{k}"))?.copy()?;
        }
        self.step = step;
        Ok(())
    }
}

/// The f32 constants of one fused AdamW step, each rounded from f64 exactly
/// as candle's `tensor * f64` / `tensor + f64` (affine) ops round them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FusedScalars {
    pub(crate) grad_scale: Option<f32>,
    pub(crate) beta1: f32,
    pub(crate) one_minus_beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) inv_bc2_sqrt: f32,
    pub(crate) eps: f32,
    pub(crate) decay: f32,
    pub(crate) step_size: f32,
}

/// The learning rate and bias corrections of one AdamW update
/// ([`AdamW::begin_step`]).
#[derive(Clone, Copy, Debug)]
pub struct StepCoefs {
    config: AdamWConfig,
    lr: f64,
    step_size: f64,
    bc2_sqrt: f64,
}

/// One parameter's update: the fused kernel where it applies, else the
/// plain candle ops (the same f32 operations in the same order).
fn update(slot: &mut Slot, g: &Tensor, grad_scale: f64, s: &StepCoefs, fused: bool) -> Result<()> {
    let (c, lr, step_size, bc2_sqrt) = (s.config, s.lr, s.step_size, s.bc2_sqrt);
    let on_gpu = cfg!(feature = "cuda") && slot.var.device().is_cuda();
    if fused && (fused_applies(slot, g) || on_gpu && cuda_applies(slot, g)) {
        let k = FusedScalars {
            grad_scale: (grad_scale != 1.0).then_some(grad_scale as f32),
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            eps: c.eps as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
            step_size: step_size as f32,
        };
        return if on_gpu {
            cuda_step(slot, g, &k)
        } else {
            fused_step(slot, g, &k)
        };
    }
    let g = if grad_scale != 1.0 {
        (g * grad_scale)?
    } else {
        g.clone()
    };
    let p = slot.var.as_tensor();
    slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
    slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
    let denom = ((slot.v.sqrt()? / bc2_sqrt)? + c.eps)?;
    let decayed = (p * (1.0 - lr * c.weight_decay))?;
    let new = (decayed - ((&slot.m / denom)? * step_size)?)?;
    slot.var.set(&new)?;
    Ok(())
}

/// Whether the fused update can run for this slot and gradient: f32 on the
/// CPU, weight and moments contiguous, not sharing storage with the gradient.
fn fused_applies(slot: &Slot, g: &Tensor) -> bool {
    let p = slot.var.as_tensor();
    crate::nn::fused::use_fused(p)
        && [&slot.m, &slot.v, g].iter().all(|t| {
            t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.dims() == p.dims()
        })
        && [p, &slot.m, &slot.v]
            .iter()
            .all(|t| t.layout().contiguous_offsets().is_some())
}

/// Whether the CUDA kernel ([`crate::cuda::adamw`]) can run this update.
/// (`DREAMBOOTH_NO_FUSED` turns it off, as it does the CPU kernels.)
#[cfg(feature = "cuda")]
fn cuda_applies(slot: &Slot, g: &Tensor) -> bool {
    !crate::nn::fused::disabled()
        && !crate::nn::kernel_paths::turned_off(crate::nn::kernel_paths::GpuPath::AdamW)
        && crate::cuda::adamw::applies(slot.var.as_tensor(), &slot.m, &slot.v, g)
}

#[cfg(not(feature = "cuda"))]
fn cuda_applies(_: &Slot, _: &Tensor) -> bool {
    false
}

#[cfg(feature = "cuda")]
fn cuda_step(slot: &Slot, g: &Tensor, k: &FusedScalars) -> Result<()> {
    crate::cuda::adamw::step(slot.var.as_tensor(), &slot.m, &slot.v, g, k)
}

#[cfg(not(feature = "cuda"))]
fn cuda_step(_: &Slot, _: &Tensor, _: &FusedScalars) -> Result<()> {
    Err(crate::Error::msg(
        "fused AdamW: built without the cuda feature",
    ))
}

/// Runs `f` on the contiguous f32 data of `t`, borrowed mutably (through
/// candle's in-place op, which holds the storage's write lock meanwhile).
fn with_mut_f32<'a>(
    t: &Tensor,
    f: impl FnOnce(&mut [f32]) -> candle_core::Result<()> + 'a,
) -> candle_core::Result<()> {
    type Body<'a> = Box<dyn FnOnce(&mut [f32]) -> candle_core::Result<()> + 'a>;
    struct Access<'a>(RefCell<Option<Body<'a>>>);
    impl InplaceOp1 for Access<'_> {
        fn name(&self) -> &'static str {
            "adamw-in-place"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            let CpuStorage::F32(data) = s else {
                candle_core::bail!("fused AdamW: only f32 is supported");
            };
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("fused AdamW: tensor is not contiguous");
            };
            match self.0.borrow_mut().take() {
                Some(f) => f(&mut data[a..b]),
                None => candle_core::bail!("fused AdamW: body ran twice"),
            }
        }
    }
    t.inplace_op1(&Access(RefCell::new(Some(Box::new(f)))))
}

/// The fused update of one parameter: p, m and v rewritten in place from g.
fn fused_step(slot: &Slot, g: &Tensor, k: &FusedScalars) -> Result<()> {
    let g = g.contiguous()?;
    let (gs, gl) = g.storage_and_layout();
    let g = match (&*gs, gl.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(d)), Some((a, b))) => &d[a..b],
        _ => {
            return Err(crate::Error::msg(
                "fused AdamW: gradient is not f32 on the CPU",
            ));
        }
    };
    let k = *k;
    with_mut_f32(slot.var.as_tensor(), |p| {
        with_mut_f32(&slot.m, |m| {
            with_mut_f32(&slot.v, |v| {
                fused_update(p, m, v, g, &k);
                Ok(())
            })
        })
    })?;
    Ok(())
}

/// One AdamW update over flat f32 slices, in place and multi-threaded. The
/// operations (and their order, and the `+ 0.0` of candle's affine op) are
/// those of the plain version, so the results are bit-identical to it.
fn fused_update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &FusedScalars) {
    const CHUNK: usize = 1 << 15;
    let n = p.len();
    assert!(m.len() == n && v.len() == n && g.len() == n);
    let kernel = |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
        let n = p.len();
        let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
        for i in 0..n {
            let gi = match k.grad_scale {
                Some(s) => g[i] * s + 0.0,
                None => g[i],
            };
            let mi = (m[i] * k.beta1 + 0.0) + (gi * k.one_minus_beta1 + 0.0);
            let vi = (v[i] * k.beta2 + 0.0) + ((gi * gi) * k.one_minus_beta2 + 0.0);
            let denom = (vi.sqrt() * k.inv_bc2_sqrt + 0.0) + k.eps;
            let decayed = p[i] * k.decay + 0.0;
            p[i] = decayed - ((mi / denom) * k.step_size + 0.0);
            m[i] = mi;
            v[i] = vi;
        }
    };
    if n <= CHUNK {
        kernel(p, m, v, g);
    } else {
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| kernel(p, m, v, g));
    }
}

/// Global L2 norm of the gradients of `vars` (those present).
pub fn grad_norm<'a>(grads: impl Iterator<Item = &'a Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// The factor that scales gradients of norm `norm` down to `max_norm`
/// (torch's `clip_grad_norm_`: max_norm / (norm + 1e-6), never above 1).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}
