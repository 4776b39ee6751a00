//! `nn.Conv2d` (groups = 1), NCHW.

use std::sync::Arc;

use candle_core::Tensor;

use super::lora::Lora;
use super::store::{Init, Vb};
use crate::Result;

#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    /// A LoRA adapter added to the output ([`super::lora`]).
    pub lora: Option<Arc<Lora>>,
}

impl Conv2d {
    pub fn new(
        vb: &Vb,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let init = Init::torch_default(in_ch * kernel * kernel);
        let weight = vb.get(&[out_ch, in_ch, kernel, kernel], "weight", init)?;
        let bias = Some(vb.get(&[out_ch], "bias", init)?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            lora: None,
        })
    }

    /// The CPU path: convolution + `bias` ((O,) or (B, O)) as one autograd
    /// node (`conv_cpu`), plus the LoRA adapter's output if there is one.
    fn forward_cpu(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let y = super::conv_cpu::conv2d_bias(x, &self.weight, bias, self.stride, self.padding)?;
        match &self.lora {
            Some(lora) => Ok((y + lora.forward_conv(x, self.stride, self.padding)?)?),
            None => Ok(y),
        }
    }

    /// `forward(x) + extra[b, o]` for a per-image, per-channel `extra`
    /// (B, O) — a ResNet block's projected time embedding. On the CPU the
    /// addition is folded into the convolution's bias (one node, no
    /// broadcast add over the whole output and its backward).
    pub fn forward_add_channels(&self, x: &Tensor, extra: &Tensor) -> Result<Tensor> {
        let (b, o) = extra.dims2()?;
        if super::fused::use_fused(x)
            && super::fused::use_fused(extra)
            && super::fused::use_fused(&self.weight)
        {
            let bias = match &self.bias {
                Some(bias) => extra.broadcast_add(&bias.reshape((1, o))?)?,
                None => extra.clone(),
            };
            return self.forward_cpu(x, &bias);
        }
        Ok(self
            .forward(x)?
            .broadcast_add(&extra.reshape((b, o, 1, 1))?)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused::use_fused(x) && super::fused::use_fused(&self.weight) {
            return match &self.bias {
                Some(b) => self.forward_cpu(x, b),
                None => {
                    let zero = Tensor::zeros(self.weight.dim(0)?, x.dtype(), x.device())?;
                    self.forward_cpu(x, &zero)
                }
            };
        }
        let k = self.weight.dim(2)?;
        let cpu_f32 = x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
        // Mixed precision: the f32 weight in the activation's dtype.
        let weight = &super::precision::like(&self.weight, x)?;
        let y = if k == 1 && self.stride == 1 && self.padding == 0 && cpu_f32 {
            super::im2col::conv2d_1x1(x, weight)?
        } else if k == 1 && self.stride == 1 && self.padding == 0 {
            // A 1×1 convolution is a matmul over channels: cheaper than im2col.
            let (b, c, h, w) = x.dims4()?;
            let o = weight.dim(0)?;
            let w2 = weight.reshape((o, c))?;
            let x2 = x.reshape((b, c, h * w))?;
            let frozen_path = !(x.device().is_cuda()
                && super::kernel_paths::turned_off(super::kernel_paths::GpuPath::Frozen));
            if !w2.track_op() && x2.track_op() && frozen_path {
                // A frozen weight (LoRA's base): no weight gradient computed.
                super::lora::frozen_weight_bmm(&w2, &x2)?.reshape((b, o, h, w))?
            } else {
                w2.broadcast_matmul(&x2)?.reshape((b, o, h, w))?
            }
        } else if cpu_f32 {
            super::im2col::conv2d_im2col(x, weight, self.stride, self.padding)?
        } else if x.device().is_cuda() && super::conv_gemm::enabled() {
            // GEMM backward on recomputed columns instead of candle's naive one.
            super::conv_gemm::conv2d(x, weight, self.stride, self.padding)?
        } else {
            x.conv2d(weight, self.padding, self.stride, 1, 1)?
        };
        let y = match &self.lora {
            Some(lora) => (y + lora.forward_conv(x, self.stride, self.padding)?)?,
            None => y,
        };
        match &self.bias {
            Some(b) => super::fused::add_bias(&y, b, 1),
            None => Ok(y),
        }
    }
}
