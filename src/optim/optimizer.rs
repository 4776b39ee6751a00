//! The optimizer a training run uses: AdamW or Prodigy, one per trained
//! network, behind one interface for the trainer and its checkpoints.

use std::collections::BTreeMap;
use std::str::FromStr;

use candle_core::Tensor;
use candle_core::backprop::GradStore;

use super::{AdamW, Prodigy};
use crate::{Error, Result};

/// `--optimizer`: which update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    AdamW,
    Prodigy,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::Prodigy => "prodigy",
        }
    }
}

impl FromStr for OptimizerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adamw" => Ok(OptimizerKind::AdamW),
            "prodigy" => Ok(OptimizerKind::Prodigy),
            _ => Err(Error::msg(format!(
                "unknown optimizer \"{s}\"; expected adamw or prodigy"
            ))),
        }
    }
}

/// One network's optimizer.
pub enum Optimizer {
    AdamW(AdamW),
    Prodigy(Prodigy),
}

impl Optimizer {
    pub fn num_params(&self) -> usize {
        match self {
            Optimizer::AdamW(o) => o.num_params(),
            Optimizer::Prodigy(o) => o.num_params(),
        }
    }

    /// Prodigy's current step-size estimate d (`None` for AdamW).
    pub fn step_size_estimate(&self) -> Option<f64> {
        match self {
            Optimizer::AdamW(_) => None,
            Optimizer::Prodigy(o) => Some(o.d),
        }
    }

    /// Updates taken.
    pub fn step(&self) -> u64 {
        match self {
            Optimizer::AdamW(o) => o.step,
            Optimizer::Prodigy(o) => o.step,
        }
    }

    /// The gradients of this optimizer's parameters in `grads`, by name.
    pub fn collect(&self, grads: &GradStore) -> BTreeMap<String, Tensor> {
        match self {
            Optimizer::AdamW(o) => o.collect(grads),
            Optimizer::Prodigy(o) => o.collect(grads),
        }
    }

    /// One update from gradients by name at learning rate `lr` (Prodigy:
    /// the multiplier of its estimate), each gradient times `grad_scale`.
    pub fn step_map(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step_map(grads, lr, grad_scale),
            Optimizer::Prodigy(o) => o.step_map(grads, lr, grad_scale),
        }
    }

    /// The state for a checkpoint (tensors that may share storage with the
    /// optimizer's: save them before the next step).
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        match self {
            Optimizer::AdamW(o) => Ok(o.state()),
            Optimizer::Prodigy(o) => o.state(),
        }
    }

    /// Restores a state saved by [`Optimizer::state`]; a state of the other
    /// optimizer is an error.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        match self {
            Optimizer::AdamW(_) if state.contains_key("prodigy.d_bits") => Err(Error::msg(
                "the optimizer state is Prodigy's (the checkpoint was written with --optimizer \
                 prodigy), not AdamW's",
            )),
            Optimizer::AdamW(o) => o.load_state(state, step),
            Optimizer::Prodigy(o) => o.load_state(state, step),
        }
    }

    /// The AdamW inside, for the fused backward pass (which updates each
    /// parameter as its gradient arrives: Prodigy needs all of them first).
    pub fn adamw_mut(&mut self) -> Option<&mut AdamW> {
        match self {
            Optimizer::AdamW(o) => Some(o),
            Optimizer::Prodigy(_) => None,
        }
    }
}
