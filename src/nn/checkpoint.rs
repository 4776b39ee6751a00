//! Gradient checkpointing (diffusers' `--gradient_checkpointing`, PyTorch's
//! `torch.utils.checkpoint`): a block's forward keeps none of its
//! activations; its backward runs the block again with autograd on and
//! backpropagates through that copy. Memory for a training step then holds
//! each block's *inputs* rather than every tensor inside it, at the price of
//! one more forward per block.
//!
//! candle's backward visits one node per block here, a custom op whose
//! gradient is the recomputed block's. The gradient with respect to the
//! block's inputs flows on through candle's graph; the gradients of the
//! parameters inside the block cannot (a custom op returns its arguments'
//! gradients only), so they are collected in the [`Checkpointing`] handle and
//! [`Checkpointing::backward`] adds them to the store candle returns.
//!
//! [`Mode::Release`] uses the same nodes without recomputing: each keeps its
//! block's graph from the forward and drops it once the block's backward has
//! run. candle otherwise keeps every activation of a step until its whole
//! backward has returned, while the gradients pile up beside them; released
//! block by block, the activations go as the gradients come, as PyTorch's
//! autograd frees its saved tensors. Same compute, a lower peak.
//!
//! [`Checkpointing::backward_into`] hands each block's parameter gradients
//! to a [`GradSink`] the moment they exist instead of collecting them: the
//! fused backward pass ([`crate::optim::fused_backward`]) updates the
//! parameters there and drops the gradients.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Storage, Tensor, TensorId, Var};

use crate::{Error, Result};

/// A block run under checkpointing: `f(x, context)`.
pub type Block = dyn Fn(&Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync;

/// What a checkpointed node keeps for its backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The block's inputs only; the backward reruns the block.
    Recompute,
    /// The block's graph, dropped as soon as the block's backward has run.
    Release,
}

/// What a model needs to checkpoint its blocks: the trainable parameters
/// (their gradients are the ones worth keeping from a recomputed block) and
/// the parameter gradients collected during the current backward.
#[derive(Debug)]
pub struct Checkpointing {
    params: HashSet<TensorId>,
    /// A variable passed to every checkpointed node, so the node takes part
    /// in backprop even when its inputs do not (a LoRA block after a frozen
    /// layer: only the parameters inside it are trained).
    anchor: Var,
    grads: Mutex<GradStore>,
    mode: Mode,
    /// Where the blocks' parameter gradients go during
    /// [`Checkpointing::backward_into`] (else into `grads`).
    sink: Mutex<Option<Arc<dyn GradSink>>>,
}

/// Takes the parameter gradients of each checkpointed block as soon as the
/// block's backward has run, during [`Checkpointing::backward_into`].
pub trait GradSink: Send + Sync {
    /// The gradients of the trainable parameters inside one block (final:
    /// a model's parameter belongs to one block).
    fn receive(&self, grads: GradStore) -> Result<()>;
}

impl std::fmt::Debug for dyn GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GradSink")
    }
}

impl Checkpointing {
    /// Checkpointing ([`Mode::Recompute`]) for a model whose trainable
    /// parameters are `params`.
    pub fn new<'a>(
        device: &Device,
        params: impl IntoIterator<Item = &'a Var>,
    ) -> Result<Arc<Self>> {
        Self::with_mode(device, params, Mode::Recompute)
    }

    /// Checkpointing in `mode`.
    pub fn with_mode<'a>(
        device: &Device,
        params: impl IntoIterator<Item = &'a Var>,
        mode: Mode,
    ) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            params: params.into_iter().map(|v| v.as_tensor().id()).collect(),
            anchor: Var::zeros(1, candle_core::DType::F32, device)?,
            grads: Mutex::new(GradStore::default()),
            mode,
            sink: Mutex::new(None),
        }))
    }

    /// `f(x, context)` as one node whose activations are recomputed in the
    /// backward pass ([`Mode::Recompute`]; `f` must then compute the same
    /// thing when called again: dropout masks drawn from the step, as
    /// [`super::lora::LoraDropout`]'s) or kept until the node's backward has
    /// run ([`Mode::Release`]).
    pub fn run<F>(self: &Arc<Self>, x: &Tensor, context: Option<&Tensor>, f: F) -> Result<Tensor>
    where
        F: Fn(&Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync + 'static,
    {
        let inputs_tracked = x.track_op() || context.is_some_and(Tensor::track_op);
        let (kept, y) = match self.mode {
            Mode::Recompute => {
                let y = f(&x.detach(), context.map(Tensor::detach).as_ref())?;
                (None, y)
            }
            Mode::Release => {
                let inputs = Inputs::leaves(x, context)?;
                let y = f(&inputs.x, inputs.context.as_ref())?;
                (Some((inputs, y.clone())), y)
            }
        };
        // With detached inputs, `y` is tracked only through parameters inside
        // the block (and, released, through the inputs' leaves).
        if !y.track_op() && !inputs_tracked {
            return Ok(y.detach());
        }
        // Recomputing, dropping the tracked result frees the block's graph;
        // the detached copy shares its storage.
        let out = y.detach();
        drop(y);
        let op = CheckpointOp {
            out: Mutex::new(Some(out)),
            kept: Mutex::new(kept),
            f: Box::new(f),
            has_context: context.is_some(),
            owner: self.clone(),
        };
        let anchor = self.anchor.as_tensor();
        Ok(x.apply_op3(context.unwrap_or(anchor), anchor, op)?)
    }

    /// `loss.backward()` with the gradients of the parameters inside
    /// checkpointed blocks added.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        // Nothing left over from a backward that failed part way.
        *self.lock()? = GradStore::default();
        let mut grads = loss.backward()?;
        let inner = std::mem::take(&mut *self.lock()?);
        grads.extend(inner)?;
        Ok(grads)
    }

    /// `loss.backward()` with every checkpointed block's parameter
    /// gradients handed to `sink` as the block's backward finishes; returns
    /// the gradients of everything outside the blocks.
    pub fn backward_into(&self, loss: &Tensor, sink: Arc<dyn GradSink>) -> Result<GradStore> {
        {
            let mut slot = self
                .sink
                .lock()
                .map_err(|_| Error::msg("gradient checkpointing: a backward pass panicked"))?;
            if slot.is_some() {
                return Err(Error::msg(
                    "gradient checkpointing: a fused backward pass is already running",
                ));
            }
            *slot = Some(sink);
        }
        // With the sink set, nothing is collected for `backward` to add.
        let grads = self.backward(loss);
        // The sink goes whatever happened (its owner takes it back).
        if let Ok(mut s) = self.sink.lock() {
            s.take();
        }
        grads
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, GradStore>> {
        self.grads
            .lock()
            .map_err(|_| Error::msg("gradient checkpointing: a backward pass panicked"))
    }
}

/// `loss.backward()`, through `checkpointing` when the model uses it.
pub fn backward(checkpointing: Option<&Checkpointing>, loss: &Tensor) -> Result<GradStore> {
    match checkpointing {
        Some(c) => c.backward(loss),
        None => Ok(loss.backward()?),
    }
}

/// `f(x, context)`, checkpointed when `checkpointing` is on.
pub fn run<F>(
    checkpointing: Option<&Arc<Checkpointing>>,
    x: &Tensor,
    context: Option<&Tensor>,
    f: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync + 'static,
{
    match checkpointing {
        Some(c) => c.run(x, context, f),
        None => f(x, context),
    }
}

/// [`run`] for a block that always takes a context (a transformer block's
/// text, an encoder layer's mask).
pub fn run_with<F>(
    checkpointing: Option<&Arc<Checkpointing>>,
    x: &Tensor,
    context: &Tensor,
    f: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    run(checkpointing, x, Some(context), move |x, c| match c {
        Some(c) => f(x, c),
        None => Err(Error::msg("checkpointed block run without its context")),
    })
}

/// A block's inputs as the leaves of its own graph: a variable (a copy) for
/// an input that takes part in backprop, the detached input otherwise.
struct Inputs {
    x: Tensor,
    x_var: Option<Var>,
    context: Option<Tensor>,
    context_var: Option<Var>,
}

impl Inputs {
    fn leaves(x: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Self> {
        let leaf = |t: &Tensor| -> candle_core::Result<(Tensor, Option<Var>)> {
            if t.track_op() {
                let v = Var::from_tensor(&t.detach())?;
                Ok((v.as_tensor().clone(), Some(v)))
            } else {
                Ok((t.detach(), None))
            }
        };
        let (x, x_var) = leaf(x)?;
        let (context, context_var) = match context {
            Some(c) => {
                let (c, v) = leaf(c)?;
                (Some(c), v)
            }
            None => (None, None),
        };
        Ok(Self {
            x,
            x_var,
            context,
            context_var,
        })
    }
}

struct CheckpointOp {
    /// The block's output, computed before the node existed; the forward
    /// hands it over (once).
    out: Mutex<Option<Tensor>>,
    /// [`Mode::Release`]: the block's leaves and tracked output from the
    /// forward, taken (and so freed) by the backward.
    kept: Mutex<Option<(Inputs, Tensor)>>,
    f: Box<Block>,
    has_context: bool,
    owner: Arc<Checkpointing>,
}

impl CheckpointOp {
    fn take_out(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .ok()
            .and_then(|mut o| o.take())
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: forward ran twice".into()))
    }
}

/// A contiguous copy of `s` viewed through `l`.
fn copy_out<S>(s: &S, l: &Layout) -> candle_core::Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

fn wrap(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(e) => e,
        e => candle_core::Error::Msg(e.to_string()),
    }
}

impl CustomOp3 for CheckpointOp {
    fn name(&self) -> &'static str {
        "gradient-checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (st, l) = out.storage_and_layout();
        match &*st {
            Storage::Cpu(s) => Ok((copy_out(s, l)?, l.shape().clone())),
            _ => Err(candle_core::Error::Msg(
                "checkpoint: block output not on the CPU".into(),
            )),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take_out()?;
        let (st, l) = out.storage_and_layout();
        match &*st {
            Storage::Cuda(s) => Ok((copy_out(s, l)?, l.shape().clone())),
            _ => Err(candle_core::Error::Msg(
                "checkpoint: block output not on the GPU".into(),
            )),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        context: &Tensor,
        _anchor: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let kept = self
            .kept
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint: poisoned graph".into()))?
            .take();
        let (inputs, y) = match kept {
            Some(k) => k,
            None => {
                // Recompute from fresh leaves.
                let inputs = Inputs::leaves(x, self.has_context.then_some(context))?;
                let y = (self.f)(&inputs.x, inputs.context.as_ref()).map_err(wrap)?;
                (inputs, y)
            }
        };
        if !y.track_op() {
            return Ok((None, None, None));
        }
        // d/dy Σ(y ⊙ grad) = grad: backprop of `grad` through the block.
        let seed = (y * grad.detach())?.sum_all()?;
        let mut inner = seed.backward()?;
        let gx = inputs.x_var.and_then(|v| inner.remove(v.as_tensor()));
        let gc = inputs.context_var.and_then(|v| inner.remove(v.as_tensor()));
        let mut params = GradStore::default();
        for id in inner.get_ids() {
            if self.owner.params.contains(id)
                && let Some(g) = inner.get_id(*id)
            {
                params.insert_id(*id, g.clone());
            }
        }
        drop(inner);
        let sink = self
            .owner
            .sink
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint: poisoned sink".into()))?
            .clone();
        match sink {
            Some(s) => s.receive(params).map_err(wrap)?,
            None => self.owner.lock().map_err(wrap)?.extend(params)?,
        }
        Ok((gx, gc, None))
    }
}
