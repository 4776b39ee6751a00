//! PNG files with their generation parameters in text chunks, and image grids.
//!
//! A generated image carries how it was made ([`GenerationInfo`]: prompt,
//! negative prompt, seed, steps, sampler, guidance, model, size) as PNG `tEXt`
//! chunks (`iTXt` where a value is not Latin-1), one per field, so the image
//! alone reproduces itself and the evaluation reads its prompt back.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use image::RgbImage;

use crate::{Error, Result};

/// How an image was generated, as stored in its PNG text chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationInfo {
    pub prompt: String,
    pub negative_prompt: String,
    /// The seed that reproduces this image alone (`-n 1 --seed SEED`).
    pub seed: u64,
    pub steps: usize,
    /// Sampler name as the CLI takes it (`ddim`, `euler`, `euler-a`, `dpm++`).
    pub sampler: String,
    pub guidance: f64,
    pub eta: f64,
    pub clip_skip: usize,
    /// The model's name (its folder or file name).
    pub model: String,
    /// [`crate::models::sd::StableDiffusion::model_hash`].
    pub model_hash: String,
    pub width: usize,
    pub height: usize,
}

impl GenerationInfo {
    /// Text chunk keywords, in the order they are written.
    pub const KEYS: [&'static str; 12] = [
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "sampler",
        "guidance",
        "eta",
        "clip_skip",
        "model",
        "model_hash",
        "width",
        "height",
    ];

    /// The fields as (keyword, text) pairs.
    pub fn to_text(&self) -> Vec<(String, String)> {
        let values = [
            self.prompt.clone(),
            self.negative_prompt.clone(),
            self.seed.to_string(),
            self.steps.to_string(),
            self.sampler.clone(),
            self.guidance.to_string(),
            self.eta.to_string(),
            self.clip_skip.to_string(),
            self.model.clone(),
            self.model_hash.clone(),
            self.width.to_string(),
            self.height.to_string(),
        ];
        Self::KEYS
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// Parses the text chunks of a PNG; `path` names the file in errors.
    /// `eta`, `clip_skip` and `model_hash` may be absent (then 0, 0, "").
    pub fn from_text(text: &BTreeMap<String, String>, path: &Path) -> Result<Self> {
        let get = |k: &str| -> Result<&str> {
            text.get(k).map(String::as_str).ok_or_else(|| Error::Image {
                path: path.to_path_buf(),
                msg: format!(
                    "no `{k}` text chunk (not an image written by `dreambooth generate`?)"
                ),
            })
        };
        fn num<T: std::str::FromStr>(path: &Path, k: &str, v: &str) -> Result<T> {
            v.trim().parse().map_err(|_| Error::Image {
                path: path.to_path_buf(),
                msg: format!("text chunk `{k}` = \"{v}\" is not a valid number"),
            })
        }
        let opt = |k: &str, default: &str| text.get(k).cloned().unwrap_or_else(|| default.into());
        Ok(Self {
            prompt: get("prompt")?.to_string(),
            negative_prompt: opt("negative_prompt", ""),
            seed: num(path, "seed", get("seed")?)?,
            steps: num(path, "steps", get("steps")?)?,
            sampler: get("sampler")?.to_string(),
            guidance: num(path, "guidance", get("guidance")?)?,
            eta: num(path, "eta", &opt("eta", "0"))?,
            clip_skip: num(path, "clip_skip", &opt("clip_skip", "0"))?,
            model: opt("model", ""),
            model_hash: opt("model_hash", ""),
            width: num(path, "width", get("width")?)?,
            height: num(path, "height", get("height")?)?,
        })
    }
}

/// Encodes an RGB image as PNG bytes with the given text chunks.
pub fn encode_png(image: &RgbImage, text: &[(String, String)]) -> Result<Vec<u8>> {
    let err = |e: png::EncodingError| Error::msg(format!("PNG encoding failed: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, image.width(), image.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            if k.is_empty() || k.len() > 79 {
                return Err(Error::msg(format!(
                    "PNG text keyword \"{k}\" must be 1 to 79 characters"
                )));
            }
            if v.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(k.clone(), v.clone()).map_err(err)?;
            } else {
                enc.add_itxt_chunk(k.clone(), v.clone()).map_err(err)?;
            }
        }
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(image.as_raw()).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(out)
}

/// Writes `image` as a PNG with text chunks (atomically: temp file + rename).
pub fn save_png(path: &Path, image: &RgbImage, text: &[(String, String)]) -> Result<()> {
    let bytes = encode_png(image, text)?;
    crate::util::write_atomic(path, &bytes)
}

/// Writes a generated image with its [`GenerationInfo`].
pub fn save_generated(path: &Path, image: &RgbImage, info: &GenerationInfo) -> Result<()> {
    save_png(path, image, &info.to_text())
}

/// The text chunks (`tEXt`, `zTXt`, `iTXt`) of PNG bytes, by keyword.
pub fn png_text(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, String>> {
    let bad = |e: png::DecodingError| Error::Image {
        path: path.to_path_buf(),
        msg: format!("invalid PNG: {e}"),
    };
    let mut reader = png::Decoder::new(Cursor::new(bytes))
        .read_info()
        .map_err(bad)?;
    reader.finish().map_err(bad)?;
    let info = reader.info();
    let mut out = BTreeMap::new();
    for c in &info.uncompressed_latin1_text {
        out.insert(c.keyword.clone(), c.text.clone());
    }
    for c in &info.compressed_latin1_text {
        out.insert(c.keyword.clone(), c.get_text().map_err(bad)?);
    }
    for c in &info.utf8_text {
        out.insert(c.keyword.clone(), c.get_text().map_err(bad)?);
    }
    Ok(out)
}

/// Reads a PNG (any colour type, converted to 8-bit RGB) and its text chunks.
pub fn read_png(path: &Path) -> Result<(RgbImage, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound {
            path: path.to_path_buf(),
        },
        _ => Error::io(path, e),
    })?;
    let text = png_text(&bytes, path)?;
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: format!("invalid PNG: {e}"),
        })?
        .to_rgb8();
    Ok((image, text))
}

/// Reads a generated image and its [`GenerationInfo`].
pub fn read_generated(path: &Path) -> Result<(RgbImage, GenerationInfo)> {
    let (image, text) = read_png(path)?;
    let info = GenerationInfo::from_text(&text, path)?;
    Ok((image, info))
}

/// The images side by side in rows of `cols` (default: ⌈√n⌉ columns), left
/// to right, top to bottom; empty cells black. All images must be one size.
pub fn grid(images: &[RgbImage], cols: Option<usize>) -> Result<RgbImage> {
    let first = images
        .first()
        .ok_or_else(|| Error::msg("grid: no images given"))?;
    let (w, h) = first.dimensions();
    if let Some(bad) = images.iter().find(|i| i.dimensions() != (w, h)) {
        return Err(Error::msg(format!(
            "grid: images differ in size ({w}×{h} and {}×{})",
            bad.width(),
            bad.height()
        )));
    }
    let n = images.len();
    let cols = cols
        .unwrap_or_else(|| (n as f64).sqrt().ceil() as usize)
        .clamp(1, n);
    let rows = n.div_ceil(cols);
    let mut out = RgbImage::new(w * cols as u32, h * rows as u32);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % cols) as i64 * w as i64, (i / cols) as i64 * h as i64);
        image::imageops::replace(&mut out, img, x, y);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> GenerationInfo {
        GenerationInfo {
            prompt: "a photo of sks dog, «café» 犬".into(),
            negative_prompt: "blurry".into(),
            seed: 42,
            steps: 30,
            sampler: "dpm++".into(),
            guidance: 7.5,
            eta: 0.0,
            clip_skip: 1,
            model: "tiny-sd1".into(),
            model_hash: "0123456789abcdef".into(),
            width: 3,
            height: 2,
        }
    }

    #[test]
    fn png_text_round_trip() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 80, y as u8 * 100, 7]));
        let bytes = encode_png(&img, &info().to_text()).unwrap();
        let path = Path::new("mem.png");
        let text = png_text(&bytes, path).unwrap();
        assert_eq!(GenerationInfo::from_text(&text, path).unwrap(), info());
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back, img);
    }

    #[test]
    fn missing_chunk_is_named() {
        let text = BTreeMap::new();
        let e = GenerationInfo::from_text(&text, Path::new("x.png")).unwrap_err();
        assert!(
            e.to_string().contains("x.png") && e.to_string().contains("`prompt`"),
            "{e}"
        );
    }

    #[test]
    fn grid_layout() {
        let imgs: Vec<RgbImage> = (0..3u8)
            .map(|i| RgbImage::from_pixel(2, 2, image::Rgb([i * 100, 0, 0])))
            .collect();
        let g = grid(&imgs, None).unwrap();
        assert_eq!(g.dimensions(), (4, 4));
        assert_eq!(g.get_pixel(2, 0)[0], 100);
        assert_eq!(g.get_pixel(0, 2)[0], 200);
        assert_eq!(g.get_pixel(3, 3)[0], 0);
        assert_eq!(grid(&imgs, Some(3)).unwrap().dimensions(), (6, 2));
    }
}
