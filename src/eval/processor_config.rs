//! Reading a checkpoint's `preprocessor_config.json` (transformers'
//! `CLIPImageProcessor` / `ViTImageProcessor` settings) into an
//! [`ImageProcessor`], so an encoder is fed exactly as transformers feeds it.

use std::path::Path;

use serde_json::Value;

use super::preprocess::{Filter, ImageProcessor, Resize};
use crate::{Error, Result};

/// The processor for the encoder whose weights are at `model_path` (a
/// `model.safetensors` file or its folder): the `preprocessor_config.json`
/// beside the weights when there is one, else `default` (the processor of the
/// checkpoints people use) with its sizes set to the model's `image_size`.
/// The result always produces `image_size`×`image_size` inputs, else an error
/// names the file and both sizes.
pub fn processor_for(
    model_path: &Path,
    default: ImageProcessor,
    image_size: u32,
) -> Result<ImageProcessor> {
    let dir = if model_path.is_dir() {
        model_path
    } else {
        model_path.parent().unwrap_or(Path::new("."))
    };
    let path = dir.join("preprocessor_config.json");
    let proc = if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
        from_json(&json, &default).map_err(|m| Error::config(&path, m))?
    } else {
        with_size(default, image_size)
    };
    match output_size(&proc) {
        Some(out) if out == (image_size, image_size) => Ok(proc),
        Some(out) => Err(Error::config(
            &path,
            format!(
                "the processor produces {}×{} images but the model's config.json says \
                 image_size {image_size}",
                out.0, out.1
            ),
        )),
        None => Err(Error::config(
            &path,
            "the processor neither crops nor resizes to a fixed size, so its output size \
             would depend on each image's aspect ratio",
        )),
    }
}

/// The (height, width) every image comes out at, when it is fixed.
pub fn output_size(p: &ImageProcessor) -> Option<(u32, u32)> {
    match (p.crop, p.resize) {
        (Some(c), _) => Some(c),
        (None, Resize::Exact { height, width }) => Some((height, width)),
        (None, Resize::ShortestEdge(_)) => None,
    }
}

/// `default` with its resize and crop scaled to `size` (no config file).
fn with_size(mut p: ImageProcessor, size: u32) -> ImageProcessor {
    p.resize = match p.resize {
        Resize::ShortestEdge(_) => Resize::ShortestEdge(size),
        Resize::Exact { .. } => Resize::Exact {
            height: size,
            width: size,
        },
    };
    if p.crop.is_some() {
        p.crop = Some((size, size));
    }
    p
}

/// transformers' size dict (`{"shortest_edge": n}`, `{"height": h, "width": w}`)
/// or a legacy bare integer (shortest edge for CLIP, square for ViT).
fn parse_size(v: &Value, bare_is_square: bool) -> std::result::Result<Resize, String> {
    let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as u32);
    if let Some(n) = v.as_u64() {
        let n = n as u32;
        return Ok(if bare_is_square {
            Resize::Exact {
                height: n,
                width: n,
            }
        } else {
            Resize::ShortestEdge(n)
        });
    }
    if let Some(s) = get("shortest_edge") {
        return Ok(Resize::ShortestEdge(s));
    }
    match (get("height"), get("width")) {
        (Some(height), Some(width)) => Ok(Resize::Exact { height, width }),
        _ => Err(format!("unsupported `size` {v}")),
    }
}

fn from_json(j: &Value, default: &ImageProcessor) -> std::result::Result<ImageProcessor, String> {
    let mut p = default.clone();
    let flag = |k: &str, d: bool| j.get(k).and_then(Value::as_bool).unwrap_or(d);
    let is_vit = j
        .get("image_processor_type")
        .or_else(|| j.get("feature_extractor_type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t.starts_with("ViT"));
    if !flag("do_resize", true) {
        return Err(
            "do_resize = false is not supported (images of any size must be resized)".into(),
        );
    }
    if let Some(s) = j.get("size") {
        p.resize = parse_size(s, is_vit)?;
    }
    if let Some(r) = j.get("resample") {
        p.resample = match r.as_u64() {
            Some(2) => Filter::Bilinear,
            Some(3) => Filter::Bicubic,
            _ => {
                return Err(format!(
                    "unsupported resample {r} (2 bilinear and 3 bicubic are)"
                ));
            }
        };
    }
    if flag("do_center_crop", p.crop.is_some()) {
        let crop = match j.get("crop_size") {
            Some(c) => match parse_size(c, true)? {
                Resize::Exact { height, width } => (height, width),
                Resize::ShortestEdge(s) => (s, s),
            },
            None => p.crop.ok_or("do_center_crop without crop_size")?,
        };
        p.crop = Some(crop);
    } else {
        p.crop = None;
    }
    if !flag("do_rescale", true) {
        return Err("do_rescale = false is not supported".into());
    }
    if flag("do_normalize", true) {
        let triple = |k: &str, d: [f32; 3]| -> std::result::Result<[f32; 3], String> {
            match j.get(k).and_then(Value::as_array) {
                None => Ok(d),
                Some(a) if a.len() == 3 => {
                    let mut o = [0f32; 3];
                    for (o, v) in o.iter_mut().zip(a) {
                        *o = v.as_f64().ok_or(format!("`{k}` must hold numbers"))? as f32;
                    }
                    Ok(o)
                }
                Some(_) => Err(format!("`{k}` must have 3 values")),
            }
        };
        p.mean = triple("image_mean", p.mean)?;
        p.std = triple("image_std", p.std)?;
    } else {
        p.mean = [0.0; 3];
        p.std = [1.0; 3];
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_config_reads_like_transformers() {
        let j: Value = serde_json::from_str(
            r#"{"crop_size": {"height": 336, "width": 336}, "do_center_crop": true,
                "do_normalize": true, "do_resize": true, "image_processor_type": "CLIPImageProcessor",
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
                "resample": 3, "size": {"shortest_edge": 336}}"#,
        )
        .unwrap();
        let p = from_json(&j, &ImageProcessor::clip()).unwrap();
        assert_eq!(p.resize, Resize::ShortestEdge(336));
        assert_eq!(p.crop, Some((336, 336)));
        assert_eq!(p.mean, [0.5; 3]);
        assert_eq!(p.std, [0.25; 3]);
        assert_eq!(output_size(&p), Some((336, 336)));
    }

    #[test]
    fn vit_legacy_integer_size_is_square() {
        let j: Value = serde_json::from_str(
            r#"{"do_normalize": true, "do_resize": true, "feature_extractor_type": "ViTFeatureExtractor",
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                "resample": 2, "size": 224}"#,
        )
        .unwrap();
        let p = from_json(&j, &ImageProcessor::dino()).unwrap();
        assert_eq!(p, ImageProcessor::dino());
        let bad: Value = serde_json::from_str(r#"{"resample": 1}"#).unwrap();
        assert!(from_json(&bad, &ImageProcessor::dino()).is_err());
    }
}
