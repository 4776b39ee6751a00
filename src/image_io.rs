//! PNG files with their generation parameters in text chunks, and image grids.
//!
//! A generated image carries how it was made ([`GenerationInfo`]: prompt,
//! negative prompt, seed, steps, sampler, guidance, model, size) as PNG `tEXt`
//! chunks (`iTXt` where a value is not Latin-1), one per field, so the image
//! alone reproduces itself and the evaluation reads its prompt back.
//!
//! [`decode_jpeg`] decodes JPEG photos bit for bit as Pillow does (libjpeg-turbo's
//! code, built from source by `mozjpeg-sys`), so the evaluation encoders see the
//! pixels transformers' image processors see.

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
    /// Image-to-image: the image it started from (its file name) and the
    /// strength; both absent for text-to-image.
    pub init_image: Option<String>,
    pub strength: Option<f64>,
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
        let mut text: Vec<(String, String)> = Self::KEYS
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if let Some(i) = &self.init_image {
            text.push(("init_image".into(), i.clone()));
        }
        if let Some(s) = self.strength {
            text.push(("strength".into(), s.to_string()));
        }
        text.push(("parameters".into(), self.a1111_parameters()));
        text
    }

    /// The parameters as AUTOMATIC1111's web UI writes them in its
    /// `parameters` chunk (its "PNG Info" tab, and ComfyUI's import, read
    /// it): the prompt, a `Negative prompt:` line when there is one, then
    /// `Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …`
    /// (+ `Denoising strength`, `Clip skip` counted as A1111 does — 2 is the
    /// penultimate layer — and DDIM's `Eta` when they apply). Its samplers'
    /// names: DDIM, Euler, Euler a, DPM++ 2M. The seed is ours: A1111's noise
    /// generator differs, so the same seed there gives other images.
    pub fn a1111_parameters(&self) -> String {
        let sampler = match self.sampler.as_str() {
            "ddim" => "DDIM",
            "euler" => "Euler",
            "euler-a" => "Euler a",
            "dpm++" => "DPM++ 2M",
            other => other,
        };
        let mut out = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            out.push_str("\nNegative prompt: ");
            out.push_str(&self.negative_prompt);
        }
        // A1111 quotes a value holding a comma, colon or quote.
        let quoted = |v: &str| {
            if v.contains([',', ':', '"']) {
                serde_json::to_string(v).unwrap_or_default()
            } else {
                v.to_string()
            }
        };
        let mut fields = vec![
            format!("Steps: {}", self.steps),
            format!("Sampler: {sampler}"),
            format!("CFG scale: {}", self.guidance),
            format!("Seed: {}", self.seed),
            format!("Size: {}x{}", self.width, self.height),
        ];
        if !self.model.is_empty() {
            fields.push(format!("Model: {}", quoted(&self.model)));
        }
        if let Some(s) = self.strength {
            fields.push(format!("Denoising strength: {s}"));
        }
        if self.clip_skip > 0 {
            fields.push(format!("Clip skip: {}", self.clip_skip + 1));
        }
        if self.sampler == "ddim" && self.eta > 0.0 {
            fields.push(format!("Eta DDIM: {}", self.eta));
        }
        out.push('\n');
        out.push_str(&fields.join(", "));
        out
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
            init_image: text.get("init_image").cloned(),
            strength: match text.get("strength") {
                Some(v) => Some(num(path, "strength", v)?),
                None => None,
            },
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
    let bytes = std::fs::read(path).map_err(|e| Error::reading(path, e))?;
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

/// The largest decoded image (in bytes) [`decode_jpeg`] allocates, as the `image`
/// crate's default limit: a corrupt or hostile header cannot claim gigabytes.
const MAX_DECODED_BYTES: usize = 512 << 20;

/// Decodes a JPEG as Pillow (`Image.open(f).convert("RGB")`) does, bit for bit:
/// libjpeg-turbo's decoder (from mozjpeg's sources) with its defaults, the
/// accurate integer IDCT (`JDCT_ISLOW`) and fancy (triangle-filter) chroma
/// upsampling, then Pillow's conversions — grayscale replicated to RGB, CMYK
/// taken with Adobe's inverted polarity and converted with Pillow's `cmyk2rgb`.
/// The EXIF orientation is then applied (Pillow leaves that to
/// `ImageOps.exif_transpose`), so the image is upright as a viewer shows it.
///
/// `path` names the file in errors. A corrupt file or one whose data ends early
/// is an error (Pillow's "image file is truncated"); libjpeg's warnings about
/// recoverable damage (extraneous bytes, say) are ignored, as Pillow ignores them.
pub fn decode_jpeg(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let bad = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let jpeg::Decoded {
        width,
        height,
        cmyk,
        mut pixels,
        exif,
    } = jpeg::decode(bytes).map_err(bad)?;
    if cmyk {
        pixels = cmyk_inverted_to_rgb(&pixels);
    }
    let img = RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| bad("JPEG decoder returned a buffer of the wrong size".into()))?;
    let orientation = exif
        .as_deref()
        .and_then(image::metadata::Orientation::from_exif_chunk);
    Ok(match orientation {
        None | Some(image::metadata::Orientation::NoTransforms) => img,
        Some(o) => {
            let mut img = image::DynamicImage::ImageRgb8(img);
            img.apply_orientation(o);
            img.into_rgb8()
        }
    })
}

/// libjpeg's CMYK output (Adobe polarity, 0 = full ink) → RGB as Pillow gets it:
/// unpacked as `CMYK;I` (inverted), then `cmyk2rgb` in Convert.c.
fn cmyk_inverted_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        let nk = p[3] as i32; // 255 − k, with k = 255 − raw
        for &raw in &p[..3] {
            let c = 255 - raw as i32;
            out.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
        }
    }
    out
}

/// The libjpeg side of [`decode_jpeg`]. libjpeg reports a fatal error by calling
/// `error_exit`, which must not return: ours unwinds (`resume_unwind`, so no
/// panic message is printed) through the C code — built with `-fexceptions` by
/// `mozjpeg-sys`' `unwinding` feature, and declared `C-unwind` — to the
/// `catch_unwind` in [`decode`], which turns it into an `Err`.
mod jpeg {
    use std::os::raw::c_int;
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

    use mozjpeg_sys as sys;

    use super::MAX_DECODED_BYTES;

    /// A decoded image: RGB, or CMYK (4 bytes a pixel) as libjpeg returns it.
    pub struct Decoded {
        pub width: u32,
        pub height: u32,
        pub cmyk: bool,
        pub pixels: Vec<u8>,
        /// The first APP1 `Exif` segment's TIFF data.
        pub exif: Option<Vec<u8>>,
    }

    /// The payload of the unwinding that stands for a libjpeg error.
    struct Failure(String);

    /// libjpeg's text for its current message (`format_message`).
    unsafe fn message(cinfo: &mut sys::jpeg_common_struct) -> String {
        // libjpeg writes up to JMSG_LENGTH_MAX (200) bytes; mozjpeg-sys declares
        // the buffer as `&[u8; 80]`, so call it through the type C has.
        type FormatMessage = unsafe extern "C-unwind" fn(&mut sys::jpeg_common_struct, *mut u8);
        let mut buf = [0u8; 200];
        // SAFETY: `err` was set by `decode` and outlives `cinfo`; the function
        // pointer types differ only in how the buffer pointer is spelled.
        unsafe {
            if let Some(f) = (*cinfo.err).format_message {
                let f = std::mem::transmute::<
                    unsafe extern "C-unwind" fn(&mut sys::jpeg_common_struct, &[u8; 80]),
                    FormatMessage,
                >(f);
                f(cinfo, buf.as_mut_ptr());
            }
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }

    unsafe extern "C-unwind" fn error_exit(cinfo: &mut sys::jpeg_common_struct) {
        // SAFETY: called by libjpeg with its own live `cinfo`.
        let msg = unsafe { message(cinfo) };
        // libjpeg reports a frame header of 0 rows as a DNL marker it does not
        // support; say what the file actually holds.
        let msg = if msg.starts_with("Empty JPEG image") {
            format!("the frame header gives a zero width or height ({msg})")
        } else {
            msg
        };
        resume_unwind(Box::new(Failure(format!("corrupt JPEG file: {msg}"))));
    }

    /// Warnings (level −1) and traces: ignored, but for the end of the data
    /// before the image is complete, which is an error as in Pillow.
    unsafe extern "C-unwind" fn emit_message(cinfo: &mut sys::jpeg_common_struct, level: c_int) {
        // SAFETY: `err` was set by `decode` and outlives `cinfo`.
        let code = unsafe { (*cinfo.err).msg_code };
        if level < 0 && code == sys::JWRN_JPEG_EOF as c_int {
            resume_unwind(Box::new(Failure(
                "truncated JPEG: the file ends before the image data does \
                 (an interrupted download or copy?); replace or remove it"
                    .into(),
            )));
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Decoded, String> {
        // SAFETY: plain C structs, for which all-zero is the state libjpeg's
        // `jpeg_std_error` / `jpeg_create_decompress` expect to start from.
        let mut err: sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
        let mut cinfo: sys::jpeg_decompress_struct = unsafe { std::mem::zeroed() };
        // SAFETY: `err` lives until the end of this function, after
        // `jpeg_destroy_decompress`, and is reached only through `cinfo`.
        unsafe {
            let e = sys::jpeg_std_error(&mut err);
            e.error_exit = Some(error_exit);
            e.emit_message = Some(emit_message);
            cinfo.common.err = e;
        }
        let run = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: the libjpeg calls in their documented order on one
            // `cinfo`; `bytes` outlives the decoding; every scanline pointer
            // points into `pixels` with room for a full row.
            unsafe { read(&mut cinfo, bytes) }
        }));
        // SAFETY: valid in any state `cinfo` can be left in, also after an
        // error in the middle of decoding (or before its creation finished).
        unsafe { sys::jpeg_destroy_decompress(&mut cinfo) };
        match run {
            Ok(decoded) => decoded,
            Err(payload) => Err(match payload.downcast::<Failure>() {
                Ok(f) => f.0,
                Err(other) => resume_unwind(other),
            }),
        }
    }

    unsafe fn read(
        cinfo: &mut sys::jpeg_decompress_struct,
        bytes: &[u8],
    ) -> Result<Decoded, String> {
        unsafe {
            sys::jpeg_create_decompress(cinfo);
            sys::jpeg_save_markers(cinfo, 0xE1, 0xFFFF);
            sys::jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as _);
            sys::jpeg_read_header(cinfo, 1);
            // Pillow: 1 component → "L", 3 → "RGB" (libjpeg's conversion from
            // whatever it takes the file's colour space to be), 4 → "CMYK".
            let cmyk = cinfo.num_components == 4;
            cinfo.out_color_space = if cmyk {
                sys::J_COLOR_SPACE::JCS_CMYK
            } else {
                sys::J_COLOR_SPACE::JCS_RGB
            };
            cinfo.dct_method = sys::J_DCT_METHOD::JDCT_ISLOW;
            cinfo.do_fancy_upsampling = 1;
            let (w, h) = (cinfo.image_width as usize, cinfo.image_height as usize);
            let channels = if cmyk { 4 } else { 3 };
            if w.saturating_mul(h).saturating_mul(channels) > MAX_DECODED_BYTES {
                return Err(format!(
                    "a {w}×{h} px JPEG is too large to decode (over {} MiB)",
                    MAX_DECODED_BYTES >> 20
                ));
            }
            sys::jpeg_start_decompress(cinfo);
            let (w, h) = (cinfo.output_width as usize, cinfo.output_height as usize);
            if cinfo.output_components as usize != channels {
                return Err(format!(
                    "corrupt JPEG file: unexpected {} output components",
                    cinfo.output_components
                ));
            }
            let stride = w * channels;
            let mut pixels = vec![0u8; stride * h];
            let mut rows: Vec<*mut u8> = pixels
                .chunks_exact_mut(stride)
                .map(|r| r.as_mut_ptr())
                .collect();
            while (cinfo.output_scanline as usize) < h {
                let at = cinfo.output_scanline as usize;
                let n = sys::jpeg_read_scanlines(cinfo, rows[at..].as_mut_ptr(), (h - at) as _);
                if n == 0 {
                    return Err("corrupt JPEG file: the decoder made no progress".into());
                }
            }
            let mut exif = None;
            let mut m = cinfo.marker_list;
            while !m.is_null() {
                let marker = &*m;
                if marker.marker == 0xE1 && exif.is_none() && !marker.data.is_null() {
                    let data = std::slice::from_raw_parts(marker.data, marker.data_length as usize);
                    if let Some(tiff) = data.strip_prefix(b"Exif\0\0") {
                        exif = Some(tiff.to_vec());
                    }
                }
                m = marker.next;
            }
            sys::jpeg_finish_decompress(cinfo);
            Ok(Decoded {
                width: w as u32,
                height: h as u32,
                cmyk,
                pixels,
                exif,
            })
        }
    }
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
            init_image: None,
            strength: None,
        }
    }

    #[test]
    fn png_text_round_trip() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 80, y as u8 * 100, 7]));
        let path = Path::new("mem.png");
        let img2img = GenerationInfo {
            init_image: Some("my dog.jpg".into()),
            strength: Some(0.65),
            ..info()
        };
        let text = png_text(&encode_png(&img, &img2img.to_text()).unwrap(), path).unwrap();
        assert_eq!(text["strength"], "0.65");
        assert_eq!(GenerationInfo::from_text(&text, path).unwrap(), img2img);
        assert_eq!(
            text["parameters"],
            "a photo of sks dog, «café» 犬\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, \
             CFG scale: 7.5, Seed: 42, Size: 3x2, Model: tiny-sd1, Denoising strength: 0.65, \
             Clip skip: 2"
        );
        let bytes = encode_png(&img, &info().to_text()).unwrap();
        let text = png_text(&bytes, path).unwrap();
        assert!(!text.contains_key("strength") && !text.contains_key("init_image"));
        let plain = GenerationInfo {
            negative_prompt: String::new(),
            sampler: "ddim".into(),
            eta: 0.5,
            clip_skip: 0,
            model: "my, model".into(),
            ..info()
        };
        assert_eq!(
            plain.a1111_parameters(),
            "a photo of sks dog, «café» 犬\nSteps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, \
             Size: 3x2, Model: \"my, model\", Eta DDIM: 0.5"
        );
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
