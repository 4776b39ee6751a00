//! AdamW exactly as `torch.optim.AdamW` computes it (decoupled weight decay,
//! bias-corrected moments), over named parameters. Its state saves and
//! restores for resumable training.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

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
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        for (key, slot) in self.slots.iter_mut() {
            let Some(g) = grads.get(key) else {
                continue;
            };
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
        }
        Ok(())
    }

    /// Moments by name (`m.<key>`, `v.<key>`) for checkpoints.
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
            s.m = get(format!("m.{k}"))?;
            s.v = get(format!("v.{k}"))?;
        }
        self.step = step;
        Ok(())
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
