//! The fused backward pass (kohya's `--fused_backward_pass`): AdamW updates
//! each checkpointed block's parameters as soon as the block's backward has
//! produced their gradients, and the gradients are dropped right there. The
//! whole set of gradients never exists at once, so a full fine-tune's peak
//! memory falls by up to their size (3.2 GiB for SD 1.5's UNet in f32): all of
//! it under gradient checkpointing, less where the activations held at the
//! start of the backward set the peak (docs/performance.md).
//!
//! The update is the one [`AdamW::step`] makes, parameter by parameter: with
//! no clipping the weights come out bit-identical to a plain backward then
//! step. Clipping cannot use the global gradient norm (it is known only when
//! the backward is over, after the updates); as in kohya's implementation,
//! `max_grad_norm` then clips each parameter's gradient by its own norm. The
//! global norm is still computed when asked for (the trainer logs it).
//!
//! Needs: no gradient accumulation (each backward is an update), no loss
//! scaling (the overflow check needs every gradient before any update).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};

use super::adamw::{AdamW, StepCoefs};
use crate::nn::checkpoint::{Checkpointing, GradSink};
use crate::{Error, Result};

/// One backward pass of `loss` through `ck`'s blocks with each parameter of
/// `groups` (an optimizer and this step's learning rate) updated as its
/// gradient arrives; `max_grad_norm > 0` clips each parameter's gradient to
/// that norm first. Returns the global L2 norm of the gradients (before
/// clipping) when `want_norm` (without it and without clipping, no norm is
/// computed: one pass over the gradients and, on a GPU, three launches per
/// weight fewer). Every optimizer advances one step.
pub fn fused_backward(
    ck: &Checkpointing,
    loss: &Tensor,
    groups: &mut [(&mut AdamW, f64)],
    max_grad_norm: f64,
    want_norm: bool,
) -> Result<Option<f64>> {
    let mut ids = HashMap::new();
    let mut taken = Vec::with_capacity(groups.len());
    for (gi, (opt, lr)) in groups.iter_mut().enumerate() {
        let config = opt.config;
        let mut opt = std::mem::replace(&mut **opt, AdamW::empty(config));
        let coefs = opt.begin_step(*lr);
        for (id, key) in opt.ids() {
            ids.insert(id, (gi, key.clone()));
        }
        taken.push((opt, coefs));
    }
    let sink = Arc::new(FusedStep {
        inner: Mutex::new(Inner {
            groups: taken,
            ids,
            seen: HashSet::new(),
            sq_host: 0.0,
            sq_dev: None,
            max_grad_norm,
            want_norm,
        }),
    });
    let result = ck
        .backward_into(loss, sink.clone())
        .and_then(|rest| sink.apply(&rest))
        .and_then(|()| {
            if want_norm {
                sink.norm().map(Some)
            } else {
                Ok(None)
            }
        });
    // The optimizers go back whatever happened.
    let mut inner = sink.lock()?;
    for ((opt, _), (slot, _)) in inner.groups.drain(..).zip(groups.iter_mut()) {
        **slot = opt;
    }
    result
}

struct FusedStep {
    inner: Mutex<Inner>,
}

struct Inner {
    groups: Vec<(AdamW, StepCoefs)>,
    /// Which group and name each trained parameter has.
    ids: HashMap<TensorId, (usize, String)>,
    /// The parameters updated so far this step.
    seen: HashSet<TensorId>,
    /// Σ‖g‖² so far: of CPU gradients, and of the others on their device
    /// (read once, at the end).
    sq_host: f64,
    sq_dev: Option<Tensor>,
    max_grad_norm: f64,
    want_norm: bool,
}

impl FusedStep {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| Error::msg("fused backward pass: an update panicked"))
    }

    /// Updates every trained parameter with a gradient in `grads`. A
    /// parameter updated before is an error: a block's gradients are final,
    /// so a weight used in two blocks (or in a block and outside) cannot be
    /// updated this way.
    fn apply(&self, grads: &GradStore) -> Result<()> {
        let mut inner = self.lock()?;
        let inner = &mut *inner;
        let mut todo: Vec<(TensorId, usize, String)> = grads
            .get_ids()
            .filter_map(|id| inner.ids.get(id).map(|(g, k)| (*id, *g, k.clone())))
            .collect();
        // A fixed order (names), whatever the store's.
        todo.sort_by(|a, b| (a.1, &a.2).cmp(&(b.1, &b.2)));
        for (id, gi, key) in todo {
            if !inner.seen.insert(id) {
                return Err(Error::msg(format!(
                    "fused backward pass: parameter {key} got gradients from two places \
                     (a weight shared between blocks); train without --fused-backward-pass"
                )));
            }
            if let Some(g) = grads.get_id(id) {
                inner.update(gi, &key, g, true)?;
            }
        }
        Ok(())
    }

    fn norm(&self) -> Result<f64> {
        let inner = self.lock()?;
        let dev = match &inner.sq_dev {
            Some(s) => s.to_scalar::<f32>()? as f64,
            None => 0.0,
        };
        Ok((inner.sq_host + dev).sqrt())
    }
}

impl Inner {
    /// Clips (per `max_grad_norm`) and applies one gradient, adding its
    /// squared norm to the total: on the host where `host_ok` and `g` is a
    /// CPU f32 tensor, else with tensor ops where `g` lives.
    fn update(&mut self, gi: usize, key: &str, g: &Tensor, host_ok: bool) -> Result<()> {
        let max = self.max_grad_norm;
        let (opt, coefs) = &mut self.groups[gi];
        let coefs = *coefs;
        if max <= 0.0 && !self.want_norm {
            opt.update(key, g, 1.0, &coefs)?;
            return Ok(());
        }
        if let Some(sq) = cpu_sum_sq(g).filter(|_| host_ok) {
            // On the CPU: one read of g, the clip factor as a scalar.
            self.sq_host += sq;
            opt.update(key, g, super::clip_factor(sq.sqrt(), max), &coefs)?;
            return Ok(());
        }
        let sq = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F32)?;
        let g = if max > 0.0 {
            // min(1, max / (‖g‖ + 1e-6)), torch's clip_grad_norm_ on this
            // one tensor, computed where g lives (no host sync).
            let factor = (sq.sqrt()? + 1e-6)?
                .recip()?
                .affine(max, 0.0)?
                .clamp(0f32, 1f32)?
                .to_dtype(g.dtype())?;
            g.broadcast_mul(&factor)?
        } else {
            g.clone()
        };
        opt.update(key, &g, 1.0, &coefs)?;
        self.sq_dev = Some(match self.sq_dev.take() {
            Some(s) => (s + sq)?,
            None => sq,
        });
        Ok(())
    }
}

impl GradSink for FusedStep {
    fn receive(&self, grads: GradStore) -> Result<()> {
        self.apply(&grads)
    }
}

/// ‖g‖² of a contiguous f32 CPU tensor, read once in parallel (f32 lanes
/// within chunks, f64 across them); None for anything else.
fn cpu_sum_sq(g: &Tensor) -> Option<f64> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    if !g.device().is_cpu() || g.dtype() != candle_core::DType::F32 {
        return None;
    }
    let (storage, layout) = g.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(d)), Some((a, b))) = (&*storage, layout.contiguous_offsets())
    else {
        return None;
    };
    let chunk_sum = |c: &[f32]| {
        let mut acc = [0f32; 16];
        let mut it = c.chunks_exact(16);
        for x in &mut it {
            for i in 0..16 {
                acc[i] += x[i] * x[i];
            }
        }
        let tail: f32 = it.remainder().iter().map(|x| x * x).sum();
        acc.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
    };
    Some(d[a..b].par_chunks(1 << 14).map(chunk_sum).sum())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::optim::AdamWConfig;

    fn inner(w: &Tensor, max_grad_norm: f64) -> (Inner, Var) {
        let var = Var::from_tensor(w).unwrap();
        let mut opt = AdamW::new(
            BTreeMap::from([("w".to_string(), var.clone())]),
            AdamWConfig::default(),
        )
        .unwrap();
        let coefs = opt.begin_step(1e-2);
        let inner = Inner {
            groups: vec![(opt, coefs)],
            ids: HashMap::new(),
            seen: HashSet::new(),
            sq_host: 0.0,
            sq_dev: None,
            max_grad_norm,
            want_norm: true,
        };
        (inner, var)
    }

    /// The device path (tensor ops, as on a GPU) and the host path clip,
    /// update and sum the same, clipped or not.
    #[test]
    fn device_and_host_paths_agree() {
        // Zero weights: the update is then the new weight itself, with no
        // rounding of w + step to hide or add a difference.
        let w = Tensor::zeros((64, 33), candle_core::DType::F32, &Device::Cpu).unwrap();
        let g = (Tensor::randn(0f32, 1.0, (64, 33), &Device::Cpu).unwrap() * 0.1).unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        // Clipping to half the norm, to twice it (no clip), and none.
        for max in [0.5 * norm as f64, 2.0 * norm as f64, 0.0] {
            let (mut host, wh) = inner(&w, max);
            let (mut dev, wd) = inner(&w, max);
            host.update(0, "w", &g, true).unwrap();
            dev.update(0, "w", &g, false).unwrap();
            assert!(dev.sq_dev.is_some() && host.sq_dev.is_none());
            let sq_dev = dev.sq_dev.as_ref().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!((host.sq_host - sq_dev).abs() <= 1e-5 * sq_dev, "{max}");
            let step_h = (wh.as_tensor() - &w).unwrap();
            let step_d = (wd.as_tensor() - &w).unwrap();
            let diff = (&step_h - &step_d)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            let size = step_h.abs().unwrap().max_all().unwrap();
            let (diff, size) = (
                diff.to_scalar::<f32>().unwrap(),
                size.to_scalar::<f32>().unwrap(),
            );
            assert!(
                size > 0.0 && diff <= 1e-5 * size,
                "max {max}: {diff} vs {size}"
            );
        }
        // Clipping changes the update (Adam's first step is about lr·sign(g)
        // whatever the scale, so look at a second step's moments instead):
        // the clipped and unclipped first moments differ by the factor.
        let (mut a, _) = inner(&w, 0.5 * norm as f64);
        let (mut b, _) = inner(&w, 0.0);
        a.update(0, "w", &g, false).unwrap();
        b.update(0, "w", &g, false).unwrap();
        let (ma, mb) = (a.groups[0].0.state(), b.groups[0].0.state());
        let ratio = (&ma["m.w"] / &mb["m.w"]).unwrap().mean_all().unwrap();
        let ratio = ratio.to_scalar::<f32>().unwrap();
        assert!((ratio - 0.5).abs() < 1e-3, "{ratio}");
    }
}
