//! Small helpers shared across the crate.

use std::path::Path;

use crate::{Error, Result};

/// A temporary name beside `path` (same folder, created if missing) to write
/// to and then rename over `path`.
pub fn temp_beside(path: &Path) -> Result<std::path::PathBuf> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.tmp{}", std::process::id())))
}

/// Writes `data` to `path` through a temporary file in the same folder and a
/// rename, so a kill never leaves a half-written file behind.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = temp_beside(path)?;
    std::fs::write(&tmp, data).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads a JSON file into `T`, with errors naming the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::reading(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Reads a JSON config with [`read_json`] and checks it with `validate`
/// (whose errors name `path`).
pub fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T, &Path) -> Result<()>,
) -> Result<T> {
    let cfg: T = read_json(path)?;
    validate(&cfg, path)?;
    Ok(cfg)
}

/// A tensor of standard-normal draws from `rng` (reproducible for a seed).
pub fn randn(
    rng: &mut impl rand::Rng,
    shape: &[usize],
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng))
        .collect();
    Ok(candle_core::Tensor::from_vec(data, shape, device)?)
}

/// The image as a `data:image/png;base64,…` URI, for self-contained HTML reports.
pub fn png_data_uri(img: &image::RgbImage) -> String {
    use base64::Engine;
    let mut buf = std::io::Cursor::new(Vec::new());
    // Encoding an in-memory RGB image as PNG cannot fail short of allocation.
    let _ = img.write_to(&mut buf, image::ImageFormat::Png);
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
    )
}

/// `img` scaled down (aspect kept) so its longer side is at most `max_side`.
pub fn thumbnail(img: &image::RgbImage, max_side: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    if w.max(h) <= max_side {
        return img.clone();
    }
    let s = max_side as f64 / w.max(h) as f64;
    let (nw, nh) = (
        ((w as f64 * s).round() as u32).max(1),
        ((h as f64 * s).round() as u32).max(1),
    );
    image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle)
}

/// `s` with HTML's special characters escaped.
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
