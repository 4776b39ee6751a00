//! The image processors of the evaluation encoders, as transformers' PIL backend
//! runs them: resize (Pillow's resampling, reproduced bit for bit, including
//! Pillow 13's choice of which pass runs first), center crop, rescale by 1/255,
//! normalize with the model's mean and std. Given the pixels Pillow decodes
//! (JPEG photos through [`crate::image_io::decode_jpeg`]), the output equals
//! transformers' exactly (tests/encoders.rs, on photos of the DreamBooth dataset).
//!
//! [`ImageProcessor::clip`] is `CLIPImageProcessor` (shortest edge 224, bicubic,
//! center crop 224, OpenAI's mean/std); [`ImageProcessor::dino`] is
//! `ViTImageProcessor` with facebook/dino-vits16's `preprocessor_config.json`
//! (224×224, bilinear, no crop, ImageNet mean/std).

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)] // transformers' digits, rounded to f32 as numpy does
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// transformers' `IMAGENET_DEFAULT_MEAN` / `IMAGENET_DEFAULT_STD` (DINO's).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Pillow's resampling filters used by the processors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (triangle, support 1).
    Bilinear,
    /// `Image.BICUBIC` (Keys cubic with a = −0.5, support 2).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// How the processor sizes the image before cropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Shortest edge to this length, aspect kept (the long edge truncated, as
    /// transformers' `get_resize_output_image_size` does).
    ShortestEdge(u32),
    /// Exactly this height and width.
    Exact { height: u32, width: u32 },
}

/// One transformers image processor's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub resize: Resize,
    pub resample: Filter,
    /// Center crop (height, width), when the processor crops.
    pub crop: Option<(u32, u32)>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageProcessor {
    /// `CLIPImageProcessor`'s defaults (every OpenAI CLIP checkpoint's config).
    pub fn clip() -> Self {
        Self {
            resize: Resize::ShortestEdge(224),
            resample: Filter::Bicubic,
            crop: Some((224, 224)),
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// facebook/dino-vits16's `ViTImageProcessor`: 224×224 bilinear, ImageNet
    /// mean/std, no crop.
    pub fn dino() -> Self {
        Self {
            resize: Resize::Exact {
                height: 224,
                width: 224,
            },
            resample: Filter::Bilinear,
            crop: None,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// The (height, width) the resize step produces for an image of this size.
    pub fn resized_size(&self, height: u32, width: u32) -> (u32, u32) {
        match self.resize {
            Resize::Exact { height, width } => (height, width),
            Resize::ShortestEdge(s) => {
                let (short, long) = (height.min(width), height.max(width));
                // Python: int(size * long / short), in f64.
                let new_long = (s as f64 * long as f64 / short as f64) as u32;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// The resized and cropped image, still 8-bit (what the model sees before
    /// rescaling and normalization).
    pub fn resize_and_crop(&self, img: &RgbImage) -> Result<RgbImage> {
        let (h, w) = self.resized_size(img.height(), img.width());
        let img = pil_resize(img, w, h, self.resample)?;
        Ok(match self.crop {
            None => img,
            Some((ch, cw)) => {
                if ch > h || cw > w {
                    return Err(Error::msg(format!(
                        "center crop {ch}×{cw} is larger than the resized image {h}×{w}"
                    )));
                }
                let (top, left) = ((h - ch) / 2, (w - cw) / 2);
                image::imageops::crop_imm(&img, left, top, cw, ch).to_image()
            }
        })
    }

    /// One image → its pixel values, (3, H, W) in CHW order, as the processor's
    /// numpy output: `float32(u8 · float64(1/255))`, then `(x − mean) / std` in f32.
    pub fn pixel_values(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let img = self.resize_and_crop(img)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let raw = img.as_raw();
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            let (m, s) = (self.mean[c], self.std[c]);
            for i in 0..h * w {
                let x = (raw[i * 3 + c] as f64 * (1.0 / 255.0)) as f32;
                out[c * h * w + i] = (x - m) / s;
            }
        }
        Ok(out)
    }

    /// A batch of images → (B, 3, H, W) f32 on `device`. The output size must
    /// agree across the batch (it does whenever the processor crops or resizes
    /// to an exact size).
    pub fn batch(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let mut data = Vec::new();
        let mut shape = None;
        for img in images {
            let (h, w) = self.resized_size(img.height(), img.width());
            let (h, w) = self.crop.unwrap_or((h, w));
            if *shape.get_or_insert((h, w)) != (h, w) {
                return Err(Error::msg(
                    "images of one batch preprocess to different sizes".to_string(),
                ));
            }
            data.extend(self.pixel_values(img)?);
        }
        let (h, w) = shape.unwrap_or((0, 0));
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, h as usize, w as usize),
            device,
        )?)
    }
}

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index and the fixed-point weights
/// (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| filter.eval((x as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            let one = (1u64 << PRECISION_BITS) as f64;
            let fixed = k
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Whether Pillow runs the vertical pass first: when the height shrinks by more
/// than twice as many pixels as the width does, `in_h − out_h > 0 &&
/// in_h − out_h > 2·(in_w − out_w)` (`ImagingResampleInner` in Pillow 13's
/// Resample.c, to make the second pass cheaper; Pillow 12 always went horizontal
/// first). The order matters: each pass rounds to 8 bits.
pub fn pil_vertical_first(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
    let dy = in_h as i64 - out_h as i64;
    let dx = in_w as i64 - out_w as i64;
    dy > 0 && dy > dx * 2
}

/// One 8-bit pass along the rows (`_ImagingResampleHorizontal_8bpc`):
/// (h, w) → (h, out_w).
fn horizontal(src: &[u8], w: usize, h: usize, out_w: usize, filter: Filter) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let kx = coeffs(w, out_w, filter);
    let mut out = vec![0u8; h * out_w * 3];
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        for (x, (xmin, k)) in kx.iter().enumerate() {
            for c in 0..3 {
                let mut ss = half;
                for (j, &wt) in k.iter().enumerate() {
                    ss += row[(xmin + j) * 3 + c] as i64 * wt as i64;
                }
                out[(y * out_w + x) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}

/// One 8-bit pass along the columns (`_ImagingResampleVertical_8bpc`):
/// (h, w) → (out_h, w).
fn vertical(src: &[u8], w: usize, h: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let ky = coeffs(h, out_h, filter);
    let mut out = vec![0u8; out_h * w * 3];
    for (y, (ymin, k)) in ky.iter().enumerate() {
        for x in 0..w * 3 {
            let mut ss = half;
            for (j, &wt) in k.iter().enumerate() {
                ss += src[(ymin + j) * w * 3 + x] as i64 * wt as i64;
            }
            out[y * w * 3 + x] = clip8(ss);
        }
    }
    out
}

/// `Image.resize((width, height), filter)` of an RGB image (no `box`, no
/// `reducing_gap`: how transformers calls it), bit-identical to Pillow 13: two
/// separable passes, each rounding to 8 bits, a side left alone when its size
/// does not change, in Pillow's order ([`pil_vertical_first`]).
pub fn pil_resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    if width == 0 || height == 0 || img.width() == 0 || img.height() == 0 {
        return Err(Error::msg(format!(
            "cannot resize a {}×{} image to {width}×{height}",
            img.width(),
            img.height()
        )));
    }
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    let src = img.as_raw();
    let out = match (ow != iw, oh != ih) {
        (false, false) => src.clone(),
        (true, false) => horizontal(src, iw, ih, ow, filter),
        (false, true) => vertical(src, iw, ih, oh, filter),
        (true, true) => {
            if pil_vertical_first(img.width(), img.height(), width, height) {
                let tmp = vertical(src, iw, ih, oh, filter);
                horizontal(&tmp, iw, oh, ow, filter)
            } else {
                let tmp = horizontal(src, iw, ih, ow, filter);
                vertical(&tmp, ow, ih, oh, filter)
            }
        }
    };
    RgbImage::from_raw(width, height, out)
        .ok_or_else(|| Error::msg("resize produced a buffer of the wrong size".to_string()))
}
