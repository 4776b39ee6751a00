//! `dreambooth eval`: encode real and generated images, score them the
//! paper's way, and collect the figures the report shows.
//!
//! - DINO / CLIP-I: mean cosine similarity over every (generated, real) pair of
//!   DINO CLS / CLIP image embeddings.
//! - CLIP-T: mean cosine similarity between each generated image's CLIP image
//!   embedding and its prompt's CLIP text embedding, the identifier removed from
//!   the prompt ([`metrics::prompt_for_clip_t`]).
//! - PRES: DINO between the class-prompt generations and the real subject.
//! - DIV: mean LPIPS distance over the pairs of images of one prompt, averaged
//!   over prompts (needs LPIPS weights; otherwise reported as unavailable).
//! - The "real images" row: DINO and CLIP-I among the real photos themselves
//!   (every ordered pair of two different photos).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::metrics;
use super::preprocess::ImageProcessor;
use super::processor_config::processor_for;
use crate::dreambooth::data::{ImageFolder, load_image};
use crate::models::clip_vision::ClipModel;
use crate::models::dino::ViTModel;
use crate::models::lpips::Lpips;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// Where the encoders' weights are.
#[derive(Clone, Debug, Default)]
pub struct EncoderPaths {
    /// DINO `ViTModel`: `model.safetensors` or its folder (with `config.json`).
    pub dino: PathBuf,
    /// `CLIPModel`: `model.safetensors` or its folder (with `config.json`).
    pub clip: PathBuf,
    /// The CLIP tokenizer folder (default: the CLIP folder, or its `tokenizer/`).
    pub clip_tokenizer: Option<PathBuf>,
    /// LPIPS weights (safetensors, the `lpips` package's names); DIV needs them.
    pub lpips: Option<PathBuf>,
}

/// The evaluation encoders and their image processors.
pub struct Encoders {
    pub dino: ViTModel,
    pub dino_processor: ImageProcessor,
    pub clip: ClipModel,
    pub clip_processor: ImageProcessor,
    pub tokenizer: ClipTokenizer,
    pub lpips: Option<Lpips>,
    pub paths: EncoderPaths,
    device: Device,
}

/// How many images the encoders see at once.
const CHUNK: usize = 16;

fn folder_of(p: &Path) -> &Path {
    if p.is_dir() {
        p
    } else {
        p.parent().unwrap_or(Path::new("."))
    }
}

impl Encoders {
    /// Loads DINO, CLIP (+ tokenizer) and, when given, LPIPS. A file of the wrong
    /// architecture fails here with an error naming it.
    pub fn load(paths: &EncoderPaths, device: &Device) -> Result<Self> {
        // Hub names (`facebook/dino-vits16`) from the local Hugging Face cache.
        let resolve = crate::models::hub::resolve;
        let paths = &EncoderPaths {
            dino: resolve(&paths.dino)?,
            clip: resolve(&paths.clip)?,
            clip_tokenizer: paths.clip_tokenizer.as_deref().map(resolve).transpose()?,
            lpips: paths.lpips.as_deref().map(resolve).transpose()?,
        };
        let dino = ViTModel::load(&paths.dino, device).map_err(|e| {
            Error::msg(format!(
                "loading the DINO encoder (a transformers ViTModel) from {}: {e}",
                paths.dino.display()
            ))
        })?;
        let clip = ClipModel::load(&paths.clip, device).map_err(|e| {
            Error::msg(format!(
                "loading the CLIP encoder (a transformers CLIPModel) from {}: {e}",
                paths.clip.display()
            ))
        })?;
        let dino_processor = processor_for(
            &paths.dino,
            ImageProcessor::dino(),
            dino.config.image_size as u32,
        )?;
        let clip_processor = processor_for(
            &paths.clip,
            ImageProcessor::clip(),
            clip.config.vision_config.image_size as u32,
        )?;
        let tok_dir = match &paths.clip_tokenizer {
            Some(d) => d.clone(),
            None => {
                let dir = folder_of(&paths.clip);
                if dir.join("tokenizer").is_dir() {
                    dir.join("tokenizer")
                } else {
                    dir.to_path_buf()
                }
            }
        };
        let tokenizer = ClipTokenizer::from_dir(&tok_dir).map_err(|e| {
            Error::msg(format!(
                "loading the CLIP tokenizer from {} (pass --clip-tokenizer DIR if it is elsewhere): {e}",
                tok_dir.display()
            ))
        })?;
        let vocab = clip.config.text_config.vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(Error::msg(format!(
                "the tokenizer in {} has {} tokens but the CLIP text model in {} has {vocab}: \
                 they do not belong together",
                tok_dir.display(),
                tokenizer.vocab_size(),
                paths.clip.display()
            )));
        }
        let lpips = match &paths.lpips {
            Some(p) => Some(Lpips::load(p, device).map_err(|e| {
                Error::msg(format!(
                    "loading the LPIPS weights from {}: {e}",
                    p.display()
                ))
            })?),
            None => None,
        };
        Ok(Self {
            dino,
            dino_processor,
            clip,
            clip_processor,
            tokenizer,
            lpips,
            paths: paths.clone(),
            device: device.clone(),
        })
    }

    fn embed(
        &self,
        images: &[RgbImage],
        proc: &ImageProcessor,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in images.chunks(CHUNK) {
            let px = proc.batch(chunk, &self.device)?;
            out.push(f(&px)?.to_dtype(DType::F32)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// DINO CLS embeddings, (N, D).
    pub fn dino_embeds(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.embed(images, &self.dino_processor, &|px| self.dino.cls_embeds(px))
    }

    /// CLIP image embeddings, (N, P).
    pub fn clip_image_embeds(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.embed(images, &self.clip_processor, &|px| {
            self.clip.image_embeds(px)
        })
    }

    /// CLIP text embeddings of the prompts, (N, P) (truncated to the text
    /// model's positions, as transformers' processor does with truncation).
    pub fn clip_text_embeds(&self, prompts: &[String]) -> Result<Tensor> {
        let len = self.clip.config.text_config.max_position_embeddings;
        let mut out = Vec::new();
        for chunk in prompts.chunks(CHUNK) {
            let mut ids = Vec::with_capacity(chunk.len() * len);
            for p in chunk {
                ids.extend(self.tokenizer.encode_padded(p, len).0);
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), len), &self.device)?;
            out.push(self.clip.text_embeds(&ids)?.to_dtype(DType::F32)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Mean LPIPS distance over the unordered pairs of `images` (one prompt's
    /// generations), or `None` without LPIPS weights. The images must share a size.
    pub fn lpips_mean_pairwise(&self, images: &[LabeledImage]) -> Result<Option<f64>> {
        let Some(lpips) = &self.lpips else {
            return Ok(None);
        };
        if images.len() < 2 {
            return Ok(None);
        }
        let first = &images[0];
        for im in &images[1..] {
            if im.image.dimensions() != first.image.dimensions() {
                return Err(Error::Image {
                    path: im.path.clone(),
                    msg: format!(
                        "is {}×{} but {} (same prompt) is {}×{}: DIV compares images of one size",
                        im.image.width(),
                        im.image.height(),
                        first.path.display(),
                        first.image.width(),
                        first.image.height()
                    ),
                });
            }
        }
        let t: Vec<Tensor> = images
            .iter()
            .map(|im| to_signed_tensor(&im.image, &self.device))
            .collect::<Result<_>>()?;
        let dists = lpips.pairwise_distances(&Tensor::cat(&t, 0)?)?;
        Ok(Some(dists.iter().sum::<f64>() / dists.len() as f64))
    }
}

/// (1, 3, H, W) in [−1, 1], LPIPS's input convention.
fn to_signed_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let t = Tensor::from_vec(img.as_raw().clone(), (h, w, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?
        .affine(2.0 / 255.0, -1.0)?
        .unsqueeze(0)?;
    Ok(t)
}

/// An image with the file it came from and, for generations, its prompt.
#[derive(Clone, Debug)]
pub struct LabeledImage {
    pub path: PathBuf,
    pub image: RgbImage,
    pub prompt: Option<String>,
}

/// The smallest side an image may have to be evaluated.
pub const MIN_SIDE: u32 = 16;
/// The largest long side / short side ratio.
pub const MAX_ASPECT: u32 = 8;

fn check_image(path: &Path, img: &RgbImage) -> Result<()> {
    let (w, h) = img.dimensions();
    if w.min(h) < MIN_SIDE {
        return Err(Error::Image {
            path: path.to_path_buf(),
            msg: format!("is {w}×{h}: too small to evaluate (each side must be ≥ {MIN_SIDE} px)"),
        });
    }
    if w.max(h) > MAX_ASPECT * w.min(h) {
        return Err(Error::Image {
            path: path.to_path_buf(),
            msg: format!(
                "is {w}×{h}: aspect ratio beyond {MAX_ASPECT}:1 (the encoders center-crop \
                 a square and would see a sliver)"
            ),
        });
    }
    Ok(())
}

/// The images of a folder (see [`ImageFolder::list`]), checked for size.
pub fn read_images(dir: &Path) -> Result<Vec<LabeledImage>> {
    let (paths, _) = ImageFolder::list(dir)?;
    paths
        .into_iter()
        .map(|path| {
            let image = load_image(&path)?;
            check_image(&path, &image)?;
            Ok(LabeledImage {
                path,
                image,
                prompt: None,
            })
        })
        .collect()
}

/// Generated images and their prompts: from `prompts` when given, else from
/// each PNG's `prompt` text chunk (what `dreambooth generate` writes).
///
/// A prompts file is either `FILE<TAB>PROMPT` lines (file names of `dir`, any
/// order, every image listed) or, with no tab on any line, one prompt per line
/// in the sorted order of the images (as many lines as images).
pub fn read_generated(dir: &Path, prompts: Option<&Path>) -> Result<Vec<LabeledImage>> {
    let mut images = read_images(dir)?;
    match prompts {
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim_end)
                .filter(|l| !l.trim().is_empty())
                .collect();
            if lines.iter().any(|l| l.contains('\t')) {
                let mut map = BTreeMap::new();
                for (i, l) in lines.iter().enumerate() {
                    let Some((name, prompt)) = l.split_once('\t') else {
                        return Err(Error::config(
                            file,
                            format!("line {}: expected FILE<TAB>PROMPT, got \"{l}\"", i + 1),
                        ));
                    };
                    map.insert(name.trim().to_string(), prompt.trim().to_string());
                }
                for im in &mut images {
                    let name = file_name(&im.path);
                    let p = map.remove(&name).ok_or_else(|| {
                        Error::config(file, format!("no prompt for {name} (in {})", dir.display()))
                    })?;
                    im.prompt = Some(p);
                }
                if let Some(name) = map.keys().next() {
                    return Err(Error::config(
                        file,
                        format!("lists {name}, which is not an image in {}", dir.display()),
                    ));
                }
            } else {
                if lines.len() != images.len() {
                    return Err(Error::config(
                        file,
                        format!(
                            "has {} prompts but {} holds {} images (one prompt per image in \
                             sorted file order, or FILE<TAB>PROMPT lines)",
                            lines.len(),
                            dir.display(),
                            images.len()
                        ),
                    ));
                }
                for (im, l) in images.iter_mut().zip(lines) {
                    im.prompt = Some(l.trim().to_string());
                }
            }
        }
        None => {
            for im in &mut images {
                let text = if im
                    .path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("png"))
                {
                    crate::image_io::read_png(&im.path)?.1
                } else {
                    BTreeMap::new()
                };
                let p = text.get("prompt").ok_or_else(|| Error::Image {
                    path: im.path.clone(),
                    msg: "has no `prompt` text chunk (not written by `dreambooth generate`): \
                          pass --prompts FILE"
                        .into(),
                })?;
                im.prompt = Some(p.clone());
            }
        }
    }
    Ok(images)
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One generated image's scores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageScores {
    pub file: String,
    pub prompt: String,
    /// Mean DINO similarity to the real images.
    pub dino: f64,
    /// Mean CLIP image similarity to the real images.
    pub clip_i: f64,
    /// CLIP similarity to its prompt (identifier removed).
    pub clip_t: f64,
}

/// One prompt's scores (means over its images).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptScores {
    pub prompt: String,
    /// The text CLIP-T compared against (the identifier removed).
    pub clip_t_text: String,
    pub images: usize,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    /// Mean pairwise LPIPS among its images.
    pub div: Option<f64>,
}

/// A class-prompt generation's similarity to the subject.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClassImageScores {
    pub file: String,
    pub prompt: String,
    pub pres: f64,
}

/// The headline figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Scores {
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    /// DINO of class-prompt generations vs the real subject (lower: less drift).
    pub pres: Option<f64>,
    /// Mean pairwise LPIPS among generations of one prompt (higher: more diverse).
    pub div: Option<f64>,
    /// DIV of the class-prompt generations.
    pub div_class: Option<f64>,
}

/// The real photos compared among themselves (the paper's "Real images" row).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RealScores {
    pub images: usize,
    pub dino: Option<f64>,
    pub clip_i: Option<f64>,
}

/// Everything `dreambooth eval` measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalResult {
    pub real_dir: PathBuf,
    pub generated_dir: PathBuf,
    pub class_dir: Option<PathBuf>,
    pub identifier: String,
    pub dino_model: PathBuf,
    pub clip_model: PathBuf,
    pub lpips_model: Option<PathBuf>,
    pub scores: Scores,
    pub real: RealScores,
    /// Why DIV is missing, when it is.
    pub div_note: Option<String>,
    pub prompts: Vec<PromptScores>,
    pub images: Vec<ImageScores>,
    pub class_images: Vec<ClassImageScores>,
    pub real_images: Vec<String>,
}

/// The inputs of one evaluation.
pub struct EvalInputs<'a> {
    pub real_dir: &'a Path,
    pub real: &'a [LabeledImage],
    pub generated_dir: &'a Path,
    pub generated: &'a [LabeledImage],
    pub class_dir: Option<&'a Path>,
    pub class_generated: &'a [LabeledImage],
    pub identifier: &'a str,
}

fn prompt_of(im: &LabeledImage) -> Result<&str> {
    im.prompt.as_deref().ok_or_else(|| Error::Image {
        path: im.path.clone(),
        msg: "has no prompt".into(),
    })
}

/// Scores `inputs` with `enc`.
pub fn evaluate(enc: &Encoders, inputs: &EvalInputs) -> Result<EvalResult> {
    if inputs.real.is_empty() {
        return Err(Error::Image {
            path: inputs.real_dir.to_path_buf(),
            msg: "holds no real images".into(),
        });
    }
    if inputs.generated.is_empty() {
        return Err(Error::Image {
            path: inputs.generated_dir.to_path_buf(),
            msg: "holds no generated images".into(),
        });
    }
    let real_imgs: Vec<RgbImage> = inputs.real.iter().map(|i| i.image.clone()).collect();
    let gen_imgs: Vec<RgbImage> = inputs.generated.iter().map(|i| i.image.clone()).collect();
    let real_dino = enc.dino_embeds(&real_imgs)?;
    let real_clip = enc.clip_image_embeds(&real_imgs)?;
    let gen_dino = enc.dino_embeds(&gen_imgs)?;
    let gen_clip = enc.clip_image_embeds(&gen_imgs)?;

    let prompts: Vec<String> = inputs
        .generated
        .iter()
        .map(|im| prompt_of(im).map(str::to_string))
        .collect::<Result<_>>()?;
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| metrics::prompt_for_clip_t(p, inputs.identifier))
        .collect();
    let text_emb = enc.clip_text_embeds(&texts)?;

    let dino_sim = metrics::cosine_matrix(&gen_dino, &real_dino)?; // (G, R)
    let clip_sim = metrics::cosine_matrix(&gen_clip, &real_clip)?;
    let clip_t_each = metrics::rowwise_cosine(&gen_clip, &text_emb)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;

    let images: Vec<ImageScores> = inputs
        .generated
        .iter()
        .enumerate()
        .map(|(i, im)| ImageScores {
            file: file_name(&im.path),
            prompt: prompts[i].clone(),
            dino: mean(&dino_sim[i]),
            clip_i: mean(&clip_sim[i]),
            clip_t: clip_t_each[i],
        })
        .collect();

    // Per prompt, in first-seen order.
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        if !groups.contains_key(p) {
            order.push(p.clone());
        }
        groups.entry(p.clone()).or_default().push(i);
    }
    let mut prompt_rows = Vec::new();
    let mut divs = Vec::new();
    for p in &order {
        let idx = &groups[p];
        let members: Vec<LabeledImage> = idx.iter().map(|&i| inputs.generated[i].clone()).collect();
        let div = enc.lpips_mean_pairwise(&members)?;
        if let Some(d) = div {
            divs.push(d);
        }
        let pick = |f: &dyn Fn(&ImageScores) -> f64| {
            mean(&idx.iter().map(|&i| f(&images[i])).collect::<Vec<_>>())
        };
        prompt_rows.push(PromptScores {
            prompt: p.clone(),
            clip_t_text: metrics::prompt_for_clip_t(p, inputs.identifier),
            images: idx.len(),
            dino: pick(&|s| s.dino),
            clip_i: pick(&|s| s.clip_i),
            clip_t: pick(&|s| s.clip_t),
            div,
        });
    }

    // Aggregates over all pairs (= the mean of the per-image means, every image
    // being compared with the same real set).
    let mut scores = Scores {
        dino: metrics::mean_pairwise_cosine(&gen_dino, &real_dino)?,
        clip_i: metrics::mean_pairwise_cosine(&gen_clip, &real_clip)?,
        clip_t: mean(&clip_t_each),
        ..Default::default()
    };
    let div_note = if enc.lpips.is_none() {
        Some("DIV unavailable: no LPIPS weights given (--lpips FILE)".to_string())
    } else if divs.is_empty() {
        Some("DIV unavailable: no prompt has two or more images".to_string())
    } else {
        scores.div = Some(mean(&divs));
        None
    };

    let mut class_images = Vec::new();
    if !inputs.class_generated.is_empty() {
        let imgs: Vec<RgbImage> = inputs
            .class_generated
            .iter()
            .map(|i| i.image.clone())
            .collect();
        let cls_dino = enc.dino_embeds(&imgs)?;
        scores.pres = Some(metrics::pres(&cls_dino, &real_dino)?);
        let sim = metrics::cosine_matrix(&cls_dino, &real_dino)?;
        for (i, im) in inputs.class_generated.iter().enumerate() {
            class_images.push(ClassImageScores {
                file: file_name(&im.path),
                prompt: im.prompt.clone().unwrap_or_default(),
                pres: mean(&sim[i]),
            });
        }
        // DIV of the class prompt(s): grouped by prompt when known.
        let mut by_prompt: BTreeMap<String, Vec<LabeledImage>> = BTreeMap::new();
        for im in inputs.class_generated {
            by_prompt
                .entry(im.prompt.clone().unwrap_or_default())
                .or_default()
                .push(im.clone());
        }
        let mut d = Vec::new();
        for g in by_prompt.values() {
            if let Some(x) = enc.lpips_mean_pairwise(g)? {
                d.push(x);
            }
        }
        if !d.is_empty() {
            scores.div_class = Some(mean(&d));
        }
    }

    let real = RealScores {
        images: inputs.real.len(),
        dino: metrics::mean_pairwise_cosine_distinct(&real_dino).ok(),
        clip_i: metrics::mean_pairwise_cosine_distinct(&real_clip).ok(),
    };

    Ok(EvalResult {
        real_dir: inputs.real_dir.to_path_buf(),
        generated_dir: inputs.generated_dir.to_path_buf(),
        class_dir: inputs.class_dir.map(Path::to_path_buf),
        identifier: inputs.identifier.to_string(),
        dino_model: enc.paths.dino.clone(),
        clip_model: enc.paths.clip.clone(),
        lpips_model: enc.paths.lpips.clone(),
        scores,
        real,
        div_note,
        prompts: prompt_rows,
        images,
        class_images,
        real_images: inputs.real.iter().map(|i| file_name(&i.path)).collect(),
    })
}
