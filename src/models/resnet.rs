//! diffusers' `ResnetBlock2D`, `Downsample2D`, `Upsample2D`.

use candle_core::Tensor;

use crate::Result;
use crate::nn::{Conv2d, GroupNorm, Linear, Vb, silu, upsample_nearest, upsample_nearest_2x};

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// `temb_channels` None for the VAE's blocks (no time embedding).
    pub fn new(
        vb: &Vb,
        in_ch: usize,
        out_ch: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(Conv2d::new(
                &vb.pp("conv_shortcut"),
                in_ch,
                out_ch,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let time_emb_proj = match temb_channels {
            Some(t) => Some(Linear::new(&vb.pp("time_emb_proj"), t, out_ch, true)?),
            None => None,
        };
        Ok(Self {
            norm1: GroupNorm::new(&vb.pp("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::new(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(&vb.pp("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::new(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let hn = self.norm1.forward_silu(x)?;
        let h = match (&self.time_emb_proj, temb) {
            // conv1(h) + proj(silu(temb))[:, :, None, None], the addition
            // folded into conv1's bias on the CPU.
            (Some(proj), Some(t)) => self
                .conv1
                .forward_add_channels(&hn, &proj.forward(&silu(t)?)?)?,
            _ => self.conv1.forward(&hn)?,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = crate::nn::fused::add(&shortcut, &h)?;
        if self.output_scale_factor != 1.0 {
            Ok((out / self.output_scale_factor)?)
        } else {
            Ok(out)
        }
    }
}

/// Stride-2 3×3 convolution. With `padding == 0` (the VAE) the input is padded
/// by one on the right and bottom first, as diffusers does.
#[derive(Clone, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub padding: usize,
}

impl Downsample2D {
    pub fn new(vb: &Vb, channels: usize, out_ch: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&vb.pp("conv"), channels, out_ch, 3, 2, padding)?,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest 2× upsampling then a 3×3 convolution.
#[derive(Clone, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: &Vb, channels: usize, out_ch: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&vb.pp("conv"), channels, out_ch, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&upsample_nearest_2x(x)?)
    }

    /// Upsamples to `(h, w)` (the matching skip connection's size) instead of 2×.
    pub fn forward_to(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.conv.forward(&upsample_nearest(x, size.0, size.1)?)
    }
}
