//! Instance and class images: finding them, reading them, and turning them into
//! the square pixel tensors the VAE encodes.
//!
//! - [`load_image`]: any JPEG, PNG or WebP (recognized by content, not by its
//!   name) as 8-bit RGB, upright as the camera's EXIF orientation says.
//! - [`ImageFolder::scan`]: the images of a folder, every one opened and
//!   decoded up front so a bad file stops the run before training starts.
//! - [`prepare`]: resize the short side to the training resolution and crop a
//!   square, as the diffusers DreamBooth script's `Resize` + `CenterCrop` /
//!   `RandomCrop` do; optional horizontal flip.
//! - [`to_tensor`]: images → (B, 3, H, W) f32 in [-1, 1].

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// File extensions (lower case) taken as images when a folder is scanned.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// The smallest short side, in pixels, an image may have to be trained at
/// `resolution`: a quarter of it (at least 1). Smaller photos would be blown
/// up more than 4× and teach the model blur.
pub fn min_side(resolution: usize) -> usize {
    (resolution / 4).max(1)
}

fn image_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads an image file as 8-bit RGB.
///
/// - The format comes from the file's content: a JPEG named `.png` loads.
///   JPEG, PNG and WebP are read (TIFF too); other content is an error that
///   says what the file is (text, HEIC, GIF, ...).
/// - The EXIF orientation (JPEG, WebP) is applied, so a phone photo taken
///   upright is upright here, with its width and height swapped where the tag
///   says so.
/// - Grayscale is replicated to three channels, 16-bit is scaled to 8-bit,
///   CMYK JPEGs are converted to RGB by the decoder.
/// - Transparency is **composited on white**: a cut-out with a transparent
///   background trains as the object on white, rather than on whatever colour
///   the transparent pixels happen to hold (often black), which is what dropping
///   the alpha channel would show.
///
/// A truncated JPEG (no end-of-image marker after its image data, as an
/// interrupted download or copy leaves it) is an error, though decoders would
/// fill the missing part with grey.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::reading(path, e))?;
    decode_image(&bytes, path)
}

/// [`load_image`] of bytes already read; `path` names them in errors.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(image_err(path, "empty file (0 bytes), not an image"));
    }
    let format = image::guess_format(bytes).ok();
    let name = match format {
        Some(ImageFormat::Jpeg) => "JPEG",
        Some(ImageFormat::Png) => "PNG",
        Some(ImageFormat::WebP) => "WebP",
        Some(ImageFormat::Tiff) => "TIFF",
        Some(other) => {
            return Err(image_err(
                path,
                format!(
                    "a {} image, which is not supported; convert it to JPEG or PNG \
                     (supported: JPEG, PNG, WebP)",
                    other
                        .extensions_str()
                        .first()
                        .map(|e| e.to_ascii_uppercase())
                        .unwrap_or_else(|| format!("{other:?}"))
                ),
            ));
        }
        None => return Err(image_err(path, not_an_image(bytes))),
    };
    if format == Some(ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(image_err(
            path,
            "truncated JPEG: the file ends before the image data does \
             (an interrupted download or copy?); replace or remove it",
        ));
    }
    if format == Some(ImageFormat::Jpeg) {
        // Pillow's decoder (libjpeg-turbo) bit for bit, EXIF orientation applied:
        // the evaluation encoders see the pixels transformers' processors see.
        return crate::image_io::decode_jpeg(bytes, path);
    }
    let corrupt = |e: image::ImageError| image_err(path, format!("corrupt {name} file: {e}"));
    let reader = ImageReader::with_format(Cursor::new(bytes), format.expect("known"));
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let orientation = decoder.orientation().map_err(corrupt)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    img.apply_orientation(orientation);
    Ok(to_rgb8_on_white(&img))
}

/// What a file that no image decoder recognizes looks like, for the error.
fn not_an_image(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(512)];
    if head.len() >= 12 && &head[4..8] == b"ftyp" {
        let brand = String::from_utf8_lossy(&head[8..12]).to_string();
        let kind = match brand.as_str() {
            "heic" | "heix" | "hevc" | "heim" | "heis" | "mif1" | "msf1" => "a HEIC/HEIF photo",
            "avif" | "avis" => "an AVIF image",
            _ => "a video or ISO media file",
        };
        return format!(
            "{kind} (brand `{brand}`), which is not supported; convert it to JPEG or PNG"
        );
    }
    let texty = head
        .iter()
        .all(|&b| b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80);
    if texty && std::str::from_utf8(head).is_ok() {
        return "not an image: the file holds text, not JPEG, PNG or WebP data".into();
    }
    "not an image: its content is not JPEG, PNG or WebP data".into()
}

/// Whether a JPEG's entropy-coded data is followed by an end-of-image marker
/// (`FF D9`). Walks the marker segments from the start to the first
/// start-of-scan so an EXIF thumbnail's own marker does not count.
fn jpeg_is_complete(b: &[u8]) -> bool {
    let mut i = 2; // after SOI (FF D8)
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return false;
        }
        let marker = b[i + 1];
        match marker {
            0xFF => {
                i += 1; // fill byte
                continue;
            }
            0xD8 | 0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            0xD9 => return false, // EOI before any scan: no image data
            _ => {}
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        if marker == 0xDA {
            let data = i + 2 + len;
            return data < b.len() && b[data..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        i += 2 + len;
    }
    false
}

/// 8-bit RGB of any colour type; alpha composited on white (see [`load_image`]).
fn to_rgb8_on_white(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba32f();
    let mut out = RgbImage::new(img.width(), img.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3].clamp(0.0, 1.0);
        for c in 0..3 {
            let v = p[c].clamp(0.0, 1.0) * a + (1.0 - a);
            o[c] = (v * 255.0).round() as u8;
        }
    }
    out
}

/// Errors unless `img` (from `path`) is large enough to train at `resolution`
/// (short side at least [`min_side`]).
pub fn check_size(path: &Path, width: u32, height: u32, resolution: usize) -> Result<()> {
    let min = min_side(resolution);
    if (width.min(height) as usize) < min {
        return Err(image_err(
            path,
            format!(
                "{width}×{height} px is too small to train at {resolution} px; \
                 use at least {min} px on the short side (it would be enlarged more than 4×)"
            ),
        ));
    }
    Ok(())
}

/// [`load_image`], then [`check_size`] for `resolution`.
pub fn load_for_training(path: &Path, resolution: usize) -> Result<RgbImage> {
    let img = load_image(path)?;
    check_size(path, img.width(), img.height(), resolution)?;
    Ok(img)
}

/// The images of a folder.
pub struct ImageFolder;

impl ImageFolder {
    /// The image files of `dir` (extension `.jpg`, `.jpeg`, `.png` or `.webp`,
    /// any case; sorted by name; subfolders, hidden files such as macOS's
    /// `._photo.jpg`, and other files ignored), each decoded once to prove it
    /// is an image. Returns the paths and warnings for the user (ignored
    /// files, skipped images).
    ///
    /// Errors: the folder is missing or holds no images; an image does not
    /// decode (the error names the file and the problem) — unless `skip_bad`,
    /// which skips it with a warning (still an error if none is left).
    pub fn scan(dir: &Path, skip_bad: bool) -> Result<(Vec<PathBuf>, Vec<String>)> {
        Self::scan_impl(dir, None, skip_bad)
    }

    /// [`Self::scan`], also checking every image is large enough to train at
    /// `resolution` ([`check_size`]; a too-small image is a bad one).
    pub fn scan_for_resolution(
        dir: &Path,
        resolution: usize,
        skip_bad: bool,
    ) -> Result<(Vec<PathBuf>, Vec<String>)> {
        Self::scan_impl(dir, Some(resolution), skip_bad)
    }

    /// The image files of `dir` by extension, sorted, not opened; and the
    /// names of the other (non-hidden) files.
    pub fn list(dir: &Path) -> Result<(Vec<PathBuf>, Vec<String>)> {
        if !dir.exists() {
            return Err(image_err(dir, "image folder not found"));
        }
        if !dir.is_dir() {
            return Err(image_err(
                dir,
                "not a folder (pass the folder that holds the images)",
            ));
        }
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut images = Vec::new();
        let mut others = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || path.is_dir() {
                continue;
            }
            if has_image_extension(&path) {
                images.push(path);
            } else {
                others.push(name);
            }
        }
        images.sort();
        others.sort();
        Ok((images, others))
    }

    fn scan_impl(
        dir: &Path,
        resolution: Option<usize>,
        skip_bad: bool,
    ) -> Result<(Vec<PathBuf>, Vec<String>)> {
        let (listed, others) = Self::list(dir)?;
        let mut warnings = Vec::new();
        if listed.is_empty() {
            let mut msg = format!("no images in this folder (looked for {})", extension_list());
            if !others.is_empty() {
                msg += &format!(
                    "; it holds {} other file(s), e.g. `{}`",
                    others.len(),
                    others[0]
                );
                if others.iter().any(|n| {
                    let l = n.to_ascii_lowercase();
                    l.ends_with(".heic") || l.ends_with(".heif") || l.ends_with(".avif")
                }) {
                    msg += " (HEIC/AVIF photos are not supported: convert them to JPEG)";
                }
            }
            return Err(image_err(dir, msg));
        }
        if !others.is_empty() {
            warnings.push(format!(
                "{}: ignored {} file(s) that are not {} (e.g. `{}`)",
                dir.display(),
                others.len(),
                extension_list(),
                others[0]
            ));
        }
        let mut paths = Vec::with_capacity(listed.len());
        let mut skipped = 0;
        for path in listed {
            let checked = load_image(&path).and_then(|img| match resolution {
                Some(r) => check_size(&path, img.width(), img.height(), r),
                None => Ok(()),
            });
            match checked {
                Ok(()) => paths.push(path),
                Err(e) if skip_bad => {
                    skipped += 1;
                    warnings.push(format!("skipped {e}"));
                }
                Err(e) => {
                    return Err(match e {
                        Error::Image { path, msg } => Error::Image {
                            path,
                            msg: format!(
                                "{msg} (fix or remove the file, or skip bad images with \
                                 --skip-bad-images)"
                            ),
                        },
                        e => e,
                    });
                }
            }
        }
        if paths.is_empty() {
            let first = warnings.iter().find(|w| w.starts_with("skipped ")).cloned();
            return Err(image_err(
                dir,
                format!(
                    "none of the {skipped} image(s) in this folder could be used (first: {})",
                    first.unwrap_or_default().trim_start_matches("skipped ")
                ),
            ));
        }
        Ok((paths, warnings))
    }
}

/// Whether `path` ends in one of [`IMAGE_EXTENSIONS`] (any case).
/// The prompt of each photo: the text of the caption file beside it
/// (`photo.jpg` → `photo{ext}`, e.g. `photo.txt`; trimmed, lines joined by
/// spaces) when `ext` is given and the file exists, else `default`. Returns
/// the prompts and how many came from captions. An empty or unreadable
/// caption file is an error naming it.
pub fn photo_prompts(
    photos: &[PathBuf],
    ext: Option<&str>,
    default: &str,
) -> Result<(Vec<String>, usize)> {
    let mut prompts = Vec::with_capacity(photos.len());
    let mut captioned = 0;
    for p in photos {
        let caption = ext.map(|e| {
            let mut name = p.file_stem().unwrap_or_default().to_os_string();
            name.push(e);
            p.with_file_name(name)
        });
        match caption.filter(|c| c.is_file()) {
            Some(c) => {
                let bytes = std::fs::read(&c).map_err(|e| Error::io(&c, e))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::config(&c, "the caption is not UTF-8 text"))?;
                let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                if text.is_empty() {
                    return Err(Error::config(
                        &c,
                        format!(
                            "the caption of {} is empty (delete it to train that photo on the instance prompt)",
                            p.display()
                        ),
                    ));
                }
                captioned += 1;
                prompts.push(text);
            }
            None => prompts.push(default.to_string()),
        }
    }
    Ok((prompts, captioned))
}

pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn extension_list() -> String {
    let v: Vec<String> = IMAGE_EXTENSIONS.iter().map(|e| format!(".{e}")).collect();
    v.join(", ")
}

/// Where to cut the square out of a resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crop {
    /// The middle, as torchvision's `CenterCrop` (offsets rounded half to even).
    Center,
    /// A position drawn uniformly from a generator seeded with this seed, as
    /// `RandomCrop`.
    Random(u64),
}

/// The training view of an image: the short side resized to `resolution`
/// (long side `⌊resolution · long / short⌋`, as torchvision's `Resize(size)`),
/// a `resolution`×`resolution` square cut out per `crop`, mirrored left–right
/// when `flip`.
///
/// Resampling is image's `FilterType::Triangle`: bilinear whose support widens
/// with the reduction factor, i.e. antialiased like torchvision's
/// `Resize(antialias=True)` / PIL's `BILINEAR`, the diffusers script's default.
/// An image already `resolution` on its short side is not resampled.
///
/// Check the size first ([`check_size`]): this enlarges any image.
///
/// # Panics
/// If `resolution` is 0 or the image is empty.
pub fn prepare(img: &RgbImage, resolution: usize, crop: Crop, flip: bool) -> RgbImage {
    assert!(resolution > 0, "resolution must be positive");
    let resolution = u32::try_from(resolution).expect("resolution fits in u32");
    let (w, h) = img.dimensions();
    assert!(w > 0 && h > 0, "empty image");
    let (nw, nh) = if w <= h {
        (
            resolution,
            ((resolution as u64 * h as u64) / w as u64).max(1) as u32,
        )
    } else {
        (
            ((resolution as u64 * w as u64) / h as u64).max(1) as u32,
            resolution,
        )
    };
    let (nw, nh) = (nw.max(resolution), nh.max(resolution));
    let resized;
    let src = if (nw, nh) == (w, h) {
        img
    } else {
        resized = image::imageops::resize(img, nw, nh, FilterType::Triangle);
        &resized
    };
    let (dx, dy) = (nw - resolution, nh - resolution);
    let (x, y) = match crop {
        Crop::Center => (half_even(dx), half_even(dy)),
        Crop::Random(seed) => {
            let mut rng = StdRng::seed_from_u64(seed);
            (rng.random_range(0..=dx), rng.random_range(0..=dy))
        }
    };
    let mut out = image::imageops::crop_imm(src, x, y, resolution, resolution).to_image();
    if flip {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// `round(d / 2)` with Python's rounding (half to even), as torchvision's
/// `CenterCrop` places its window.
fn half_even(d: u32) -> u32 {
    (d as f64 / 2.0).round_ties_even() as u32
}

/// Images of one size → (B, 3, H, W) f32 in [-1, 1] (`x / 127.5 − 1`) on `device`.
pub fn to_tensor(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let first = images
        .first()
        .ok_or_else(|| Error::msg("to_tensor: no images given"))?;
    let (w, h) = first.dimensions();
    if let Some(bad) = images.iter().find(|i| i.dimensions() != (w, h)) {
        return Err(Error::msg(format!(
            "to_tensor: images differ in size ({w}×{h} and {}×{})",
            bad.width(),
            bad.height()
        )));
    }
    let (w, h) = (w as usize, h as usize);
    let mut data = Vec::with_capacity(images.len() * 3 * h * w);
    for img in images {
        let raw = img.as_raw();
        for c in 0..3 {
            data.extend(raw[c..].iter().step_by(3).map(|&v| v as f32 / 127.5 - 1.0));
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, h, w), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_even_matches_python_round() {
        assert_eq!(
            [0, 1, 2, 3, 4, 5].map(half_even),
            [0, 0, 1, 2, 2, 2] // round(0.5)=0, round(1.5)=2, round(2.5)=2
        );
    }

    #[test]
    fn resize_keeps_aspect_like_torchvision() {
        let img = RgbImage::new(300, 200);
        // torchvision: Resize(64) of 300×200 → 96×64 (int(64·300/200)).
        let out = prepare(&img, 64, Crop::Center, false);
        assert_eq!(out.dimensions(), (64, 64));
    }

    #[test]
    fn to_tensor_layout() {
        let img = RgbImage::from_fn(2, 1, |x, _| image::Rgb([0, 255, x as u8 * 51]));
        let t = to_tensor(&[img], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 1, 2]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[..4], [-1.0, -1.0, 1.0, 1.0]);
        assert!((v[5] - (51.0 / 127.5 - 1.0)).abs() < 1e-6);
    }
}
