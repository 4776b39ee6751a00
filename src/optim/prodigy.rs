//! Prodigy (Mishchenko & Defazio 2023): Adam whose step size is estimated as
//! it trains, as `prodigyopt.Prodigy` (1.1) computes it with
//! `decouple=True` and `slice_p=1`. `lr` is a multiplier of the estimate
//! (leave it at 1); the estimate `d` starts at `d0` and grows with the
//! distance the weights moved along their gradients:
//!
//! ```text
//! dlr = d · lr · bias correction
//! numerator = β₃ · numerator + Σ (d/d0) · dlr · ⟨g, p₀ − p⟩
//! m = β₁m + d(1−β₁)g      v = β₂v + d²(1−β₂)g²      s = β₃s + (d/d0)·c·g
//! d̂ = d_coef · numerator / Σ|s|,  d = min(max(d, d̂) so far, d · growth)
//! p ← p − dlr·decay·p − dlr · m / (√v + d·eps)
//! ```
//!
//! with c = d under `safeguard_warmup`, else dlr; m, v, s and d as of before
//! the step, except the denominator's d. Its state (moments, s, the initial
//! weights p₀, and the scalars) saves and restores for resumable training.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// Prodigy's hyper-parameters (diffusers' `train_dreambooth_lora_sdxl_advanced`
/// defaults: bias correction and safeguarded warm-up on).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProdigyConfig {
    pub beta1: f64,
    pub beta2: f64,
    /// The step-size estimate's averaging; `None`: √β₂.
    pub beta3: Option<f64>,
    pub eps: f64,
    /// Decoupled (AdamW-style) weight decay.
    pub weight_decay: f64,
    pub use_bias_correction: bool,
    pub safeguard_warmup: bool,
    pub d0: f64,
    pub d_coef: f64,
    pub growth_rate: f64,
}

impl Default for ProdigyConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            beta3: None,
            eps: 1e-8,
            weight_decay: 0.0,
            use_bias_correction: true,
            safeguard_warmup: true,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
        }
    }
}

struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
    s: Tensor,
    p0: Tensor,
}

/// One parameter group with its own step-size estimate.
pub struct Prodigy {
    pub config: ProdigyConfig,
    slots: BTreeMap<String, Slot>,
    /// Updates taken (prodigyopt's `k`).
    pub step: u64,
    /// The current step-size estimate, its largest value so far, and the
    /// running numerator of its estimate.
    pub d: f64,
    d_max: f64,
    d_numerator: f64,
}

impl Prodigy {
    pub fn new(vars: BTreeMap<String, Var>, config: ProdigyConfig) -> Result<Self> {
        if !(config.d0 > 0.0 && config.eps > 0.0 && config.d_coef > 0.0) {
            return Err(Error::msg(format!(
                "prodigy: d0 ({}), eps ({}) and d_coef ({}) must be > 0",
                config.d0, config.eps, config.d_coef
            )));
        }
        if config.growth_rate.is_nan() || config.growth_rate < 1.0 {
            return Err(Error::msg(format!(
                "prodigy: growth rate {} must be >= 1",
                config.growth_rate
            )));
        }
        let mut slots = BTreeMap::new();
        for (k, var) in vars {
            let t = var.as_tensor();
            let zeros = || t.zeros_like();
            slots.insert(
                k,
                Slot {
                    m: zeros()?,
                    v: zeros()?,
                    s: zeros()?,
                    p0: t.detach().copy()?,
                    var,
                },
            );
        }
        Ok(Self {
            config,
            slots,
            step: 0,
            d: config.d0,
            d_max: config.d0,
            d_numerator: 0.0,
        })
    }

    pub fn num_params(&self) -> usize {
        self.slots
            .values()
            .map(|s| s.var.as_tensor().elem_count())
            .sum()
    }

    /// The gradients of this group's parameters in `grads`, detached, by name.
    pub fn collect(&self, grads: &candle_core::backprop::GradStore) -> BTreeMap<String, Tensor> {
        self.slots
            .iter()
            .filter_map(|(k, s)| {
                grads
                    .get(s.var.as_tensor())
                    .map(|g| (k.clone(), g.detach()))
            })
            .collect()
    }

    fn beta3(&self) -> f64 {
        self.config.beta3.unwrap_or(self.config.beta2.sqrt())
    }

    /// One update with learning-rate multiplier `lr` from gradients by name;
    /// `grad_scale` multiplies every gradient first (clipping, accumulation).
    /// Parameters without a gradient are left as they are. Like prodigyopt,
    /// a step whose gradients are all zero (or `lr` 0) changes nothing and
    /// is not counted.
    pub fn step_map(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let c = self.config;
        let (b1, b2, b3) = (c.beta1, c.beta2, self.beta3());
        let k = self.step as i32;
        let bias_correction = if c.use_bias_correction {
            (1.0 - b2.powi(k + 1)).sqrt() / (1.0 - b1.powi(k + 1))
        } else {
            1.0
        };
        let d = self.d;
        let dlr = d * lr * bias_correction;
        let mut delta_numerator = 0.0;
        let mut d_denom = 0.0;
        let mut stepped = Vec::new();
        for (key, slot) in self.slots.iter_mut() {
            let Some(g) = grads.get(key) else { continue };
            let g = g.to_dtype(DType::F32)?;
            let g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g
            };
            if lr > 0.0 {
                let p = slot.var.as_tensor().detach();
                let moved = (&slot.p0 - &p)?;
                let dot = (&g * &moved)?.sum_all()?.to_dtype(DType::F64)?;
                delta_numerator += (d / c.d0) * dlr * dot.to_scalar::<f64>()?;
                slot.m = ((&slot.m * b1)? + (&g * (d * (1.0 - b1)))?)?;
                slot.v = ((&slot.v * b2)? + (g.sqr()? * (d * d * (1.0 - b2)))?)?;
                let coef = if c.safeguard_warmup { d } else { dlr };
                slot.s = ((&slot.s * b3)? + (&g * ((d / c.d0) * coef))?)?;
                let s_abs = slot.s.abs()?.sum_all()?.to_dtype(DType::F64)?;
                d_denom += s_abs.to_scalar::<f64>()?;
            }
            stepped.push(key.clone());
        }
        if d_denom == 0.0 {
            return Ok(());
        }
        let numerator = self.d_numerator * b3 + delta_numerator;
        let d_hat = c.d_coef * numerator / d_denom;
        let mut d_new = d;
        if d_new == c.d0 {
            d_new = d_new.max(d_hat);
        }
        self.d_max = self.d_max.max(d_hat);
        d_new = self.d_max.min(d_new * c.growth_rate);
        self.d_numerator = numerator;
        self.d = d_new;
        for key in stepped {
            let slot = self.slots.get_mut(&key).expect("stepped slots exist");
            let denom = (slot.v.sqrt()? + d_new * c.eps)?;
            let p = slot.var.as_tensor().detach();
            let p = if c.weight_decay != 0.0 {
                (&p + (&p * (-c.weight_decay * dlr))?)?
            } else {
                p
            };
            let p = (p - ((&slot.m / denom)? * dlr)?)?;
            slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
        }
        self.step += 1;
        Ok(())
    }

    /// Moments, `s` and the initial weights by name (`m.<key>`, `v.<key>`,
    /// `s.<key>`, `p0.<key>`) and the step-size scalars d, d_max and the
    /// numerator (`prodigy.d_bits`: their f64 bits) for checkpoints.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (k, s) in &self.slots {
            out.insert(format!("m.{k}"), s.m.clone());
            out.insert(format!("v.{k}"), s.v.clone());
            out.insert(format!("s.{k}"), s.s.clone());
            out.insert(format!("p0.{k}"), s.p0.clone());
        }
        // The f64 scalars as the two u32 halves of their bits: checkpoints
        // read floating-point tensors back in f32, integers as stored.
        let bits: Vec<u32> = [self.d, self.d_max, self.d_numerator]
            .iter()
            .flat_map(|x| {
                let b = x.to_bits();
                [(b >> 32) as u32, b as u32]
            })
            .collect();
        out.insert(
            "prodigy.d_bits".into(),
            Tensor::from_vec(bits, 6, &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores a state saved by [`Prodigy::state`]; errors name a missing key.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        let get = |name: String| {
            state.get(&name).cloned().ok_or_else(|| {
                Error::msg(format!(
                    "optimizer state lacks `{name}` (was the checkpoint written with another --optimizer?)"
                ))
            })
        };
        for (k, s) in self.slots.iter_mut() {
            let dev = s.var.device().clone();
            s.m = get(format!("m.{k}"))?.to_device(&dev)?.copy()?;
            s.v = get(format!("v.{k}"))?.to_device(&dev)?.copy()?;
            s.s = get(format!("s.{k}"))?.to_device(&dev)?.copy()?;
            s.p0 = get(format!("p0.{k}"))?.to_device(&dev)?.copy()?;
        }
        let bits = get("prodigy.d_bits".into())?;
        let words = match bits.dtype() {
            DType::U32 => bits.flatten_all()?.to_vec1::<u32>()?,
            other => {
                return Err(Error::msg(format!(
                    "optimizer state `prodigy.d_bits` is {}, not u32",
                    other.as_str()
                )));
            }
        };
        let [d, d_max, num] = match words.as_slice() {
            [a, b, c, d, e, f] => [(a, b), (c, d), (e, f)]
                .map(|(hi, lo)| f64::from_bits(((*hi as u64) << 32) | *lo as u64)),
            _ => {
                return Err(Error::msg(format!(
                    "optimizer state `prodigy.d_bits` holds {} values, not 6",
                    words.len()
                )));
            }
        };
        (self.d, self.d_max, self.d_numerator) = (d, d_max, num);
        self.step = step;
        Ok(())
    }
}
