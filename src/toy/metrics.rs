//! Oracle metrics of a text-to-image model on the toy world: the paper's
//! evaluation in miniature, with the analytic [`oracle`](super::oracle) in
//! place of CLIP and DINO.
//!
//! - [`prompt_fidelity`]: does the model draw what a world caption asks for?
//!   For each prompt ("a photo of a red ball on the beach", or a partial one
//!   such as "a ball in the snow") it generates images and checks with the
//!   oracle the context, class and colour the prompt names, each rate over the
//!   prompts that name that attribute, with confusion matrices.
//! - [`subject_metrics`]: DreamBooth's measures for one subject: subject
//!   fidelity (DINO/CLIP-I analog) of "a photo of a sks ball" and "a sks ball
//!   on the beach", prompt fidelity of identifier prompts (context and colour
//!   agreement), PRES (how much the plain class prompt "a photo of a ball"
//!   shows the subject: language drift) and DIV (diversity among the images of
//!   one prompt).
//!
//! Both take an already-loaded [`StableDiffusion`], so a trainer can measure
//! its in-memory model before and after training. The scoring cores
//! ([`PromptFidelity::from_images`], [`score_subject`]) take given images, so
//! they are tested on rendered ground truth, and [`oracle_accuracy`] measures
//! the oracle itself on fresh scenes.

use image::{Rgb, RgbImage};
use rayon::prelude::*;
use serde::{Serialize, Serializer};

use super::oracle::{self, Reading};
use super::world::{
    self, Class, Color, Context, Scene, Subject, ToyRng, World, derive_seed, describe,
};
use crate::diffusion::SamplerKind;
use crate::diffusion::pipeline::{GenerateOptions, Progress, generate, to_rgb8};
use crate::models::StableDiffusion;
use crate::{Error, Result};

// ---------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------

/// A prompt and the attributes an image of it should show (`None`: the prompt
/// does not name it, so it is not checked).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptSpec {
    pub prompt: String,
    #[serde(serialize_with = "ser_name")]
    pub context: Option<Context>,
    #[serde(serialize_with = "ser_name")]
    pub class: Option<Class>,
    #[serde(serialize_with = "ser_name")]
    pub color: Option<Color>,
}

impl PromptSpec {
    /// A world caption built with [`describe`], expecting what it names.
    pub fn new(
        photo: bool,
        identifier: Option<&str>,
        color: Option<Color>,
        class: Class,
        context: Option<Context>,
    ) -> Self {
        PromptSpec {
            prompt: describe(photo, identifier, color, class, context),
            context,
            class: Some(class),
            color,
        }
    }

    /// The full caption of a scene ("a photo of a red ball on the beach"; a
    /// subject's by its class only): the scene's ground truth.
    pub fn of_scene(scene: &Scene) -> Self {
        PromptSpec::new(true, None, scene.color(), scene.class, Some(scene.context))
    }
}

/// Prompts built from the world, each naming a class and possibly a colour
/// and a context (colours only where the world draws them, see
/// [`Color::allowed_in`]).
///
/// `None`: every combination, with "a photo of": full captions, class +
/// colour, class + context, class alone (6·Σ allowed colours + 60 + 36 + 6).
/// `Some(n)`: a seeded sample of `n` distinct ones (at most all), in the
/// proportions of the training captions (half full, 18% class + colour, 18%
/// class + context, the rest class alone as far as there are), "a photo of"
/// four times in five, in random order.
pub fn world_prompts(n: Option<usize>, seed: u64) -> Vec<PromptSpec> {
    type Parts = (Option<Color>, Class, Option<Context>);
    let mut strata: [Vec<Parts>; 4] = Default::default();
    for ctx in Context::ALL {
        for class in Class::ALL {
            for color in Color::allowed(ctx) {
                strata[0].push((Some(color), class, Some(ctx)));
            }
        }
    }
    for class in Class::ALL {
        for color in Color::ALL {
            strata[1].push((Some(color), class, None));
        }
    }
    for ctx in Context::ALL {
        for class in Class::ALL {
            strata[2].push((None, class, Some(ctx)));
        }
    }
    for class in Class::ALL {
        strata[3].push((None, class, None));
    }
    let Some(n) = n else {
        return strata
            .iter()
            .flatten()
            .map(|&(color, class, ctx)| PromptSpec::new(true, None, color, class, ctx))
            .collect();
    };
    let mut rng = ToyRng::new(derive_seed(seed, 0x9A0_3937));
    for s in strata.iter_mut() {
        shuffle(s, &mut rng);
    }
    let total: usize = strata.iter().map(Vec::len).sum();
    let n = n.min(total);
    let mut take = [0usize; 4];
    for (i, f) in [0.5, 0.18, 0.18, 1.0].into_iter().enumerate() {
        let left = n - take.iter().sum::<usize>();
        take[i] = ((f * n as f64).round() as usize).min(left);
    }
    // what a small stratum cannot give, the others give (full captions first)
    for i in 0..4 {
        take[i] = take[i].min(strata[i].len());
    }
    let mut missing = n - take.iter().sum::<usize>();
    for i in 0..4 {
        let extra = missing.min(strata[i].len() - take[i]);
        take[i] += extra;
        missing -= extra;
    }
    let mut picked: Vec<Parts> = strata
        .iter()
        .zip(take)
        .flat_map(|(s, k)| s[..k].iter().copied())
        .collect();
    shuffle(&mut picked, &mut rng);
    picked
        .into_iter()
        .map(|(color, class, ctx)| {
            let photo = rng.unit() < 0.8;
            PromptSpec::new(photo, None, color, class, ctx)
        })
        .collect()
}

fn shuffle<T>(v: &mut [T], rng: &mut ToyRng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// How images are sampled for a metric. Image `i` of a metric's prompt list
/// (each prompt repeated `images_per_prompt` times) uses seed `seed + i`.
#[derive(Clone, Debug, Serialize)]
pub struct SampleSettings {
    pub images_per_prompt: usize,
    pub seed: u64,
    #[serde(serialize_with = "ser_sampler")]
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance: f64,
    /// Images per UNet batch.
    pub batch_size: usize,
}

impl Default for SampleSettings {
    /// 2 images per prompt, seed 0, 20 DDIM steps, guidance 5, batches of 16:
    /// seconds on the tiny model.
    fn default() -> Self {
        SampleSettings {
            images_per_prompt: 2,
            seed: 0,
            sampler: SamplerKind::Ddim,
            steps: 20,
            guidance: 5.0,
            batch_size: 16,
        }
    }
}

/// Generates `per_prompt[k]` images of each prompt `k`, in order, at the
/// model's native size.
fn generate_for(
    model: &StableDiffusion,
    prompts: &[&str],
    per_prompt: &[usize],
    settings: &SampleSettings,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<Vec<RgbImage>>> {
    if per_prompt.contains(&0) {
        return Err(Error::msg("images per prompt must be at least 1"));
    }
    let all: Vec<String> = prompts
        .iter()
        .zip(per_prompt)
        .flat_map(|(p, &k)| std::iter::repeat_n(p.to_string(), k))
        .collect();
    let opts = GenerateOptions {
        prompts: all,
        guidance_scale: settings.guidance,
        steps: settings.steps,
        sampler: settings.sampler,
        seed: settings.seed,
        batch_size: settings.batch_size.max(1),
        ..GenerateOptions::new("", 0)
    };
    let mut images = generate(model, &opts, progress)?
        .images
        .into_iter()
        .map(|g| g.image);
    Ok(per_prompt
        .iter()
        .map(|&k| images.by_ref().take(k).collect())
        .collect())
}

// ---------------------------------------------------------------------------
// Rates and confusion matrices
// ---------------------------------------------------------------------------

/// `correct` out of `total` checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate {
    pub correct: usize,
    pub total: usize,
}

impl Rate {
    /// The fraction correct; `None` when nothing was checked.
    pub fn value(&self) -> Option<f64> {
        (self.total > 0).then(|| self.correct as f64 / self.total as f64)
    }

    fn add(&mut self, ok: Option<bool>) {
        if let Some(ok) = ok {
            self.total += 1;
            self.correct += ok as usize;
        }
    }

    /// "83.3%" or "—".
    pub fn percent(&self) -> String {
        match self.value() {
            Some(v) => format!("{:.1}%", 100.0 * v),
            None => "—".into(),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Rate", 3)?;
        st.serialize_field("rate", &self.value())?;
        st.serialize_field("correct", &self.correct)?;
        st.serialize_field("total", &self.total)?;
        st.end()
    }
}

/// Counts of (prompted, read) pairs; the last read column is "none" where
/// an image can show none (no object found).
#[derive(Clone, Debug, Serialize)]
pub struct Confusion {
    /// Row labels: what the prompt asked for.
    pub prompted: Vec<&'static str>,
    /// Column labels: what the oracle read.
    pub read: Vec<&'static str>,
    /// `counts[prompted][read]`.
    pub counts: Vec<Vec<usize>>,
}

impl Confusion {
    fn new(prompted: Vec<&'static str>, read: Vec<&'static str>) -> Self {
        let counts = vec![vec![0; read.len()]; prompted.len()];
        Confusion {
            prompted,
            read,
            counts,
        }
    }

    /// The `k` most frequent mistakes, `(prompted, read, count)`, most
    /// frequent first.
    pub fn top_mistakes(&self, k: usize) -> Vec<(&'static str, &'static str, usize)> {
        let mut m: Vec<_> = self
            .counts
            .iter()
            .enumerate()
            .flat_map(|(i, row)| {
                row.iter()
                    .enumerate()
                    .filter(move |&(j, &c)| c > 0 && self.prompted[i] != self.read[j])
                    .map(move |(j, &c)| (self.prompted[i], self.read[j], c))
            })
            .collect();
        m.sort_by_key(|x| std::cmp::Reverse(x.2));
        m.truncate(k);
        m
    }
}

// ---------------------------------------------------------------------------
// Prompt fidelity
// ---------------------------------------------------------------------------

/// Whether an image shows each attribute its prompt names (`None`: not named).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub context: Option<bool>,
    pub class: Option<bool>,
    pub color: Option<bool>,
}

impl Verdict {
    /// Every named attribute is right.
    pub fn all(&self) -> bool {
        [self.context, self.class, self.color]
            .iter()
            .all(|v| v.unwrap_or(true))
    }
}

/// Checks an oracle reading against a prompt. A class or colour counts wrong
/// when no object was found.
pub fn judge(spec: &PromptSpec, reading: &Reading) -> Verdict {
    Verdict {
        context: spec.context.map(|c| reading.context == c),
        class: spec.class.map(|c| reading.class() == Some(c)),
        color: spec.color.map(|c| reading.color() == Some(c)),
    }
}

/// One image, what the oracle read in it, and the verdict.
#[derive(Clone, Debug, Serialize)]
pub struct JudgedImage {
    #[serde(flatten)]
    pub spec: PromptSpec,
    /// The generation seed (none for given images).
    pub seed: Option<u64>,
    #[serde(serialize_with = "ser_name")]
    pub read_context: Option<Context>,
    #[serde(serialize_with = "ser_name")]
    pub read_class: Option<Class>,
    #[serde(serialize_with = "ser_name")]
    pub read_color: Option<Color>,
    pub verdict: Verdict,
    #[serde(skip)]
    pub image: RgbImage,
}

/// The result of [`prompt_fidelity`].
#[derive(Clone, Debug, Serialize)]
pub struct PromptFidelity {
    pub prompts: usize,
    pub images: usize,
    /// The prompted context, over images of prompts that name one.
    pub context: Rate,
    /// The prompted class (a missing object counts wrong).
    pub class: Rate,
    /// The prompted colour, over images of prompts that name one.
    pub color: Rate,
    /// Every named attribute right, over all images.
    pub all: Rate,
    /// Images in which the oracle found an object at all.
    pub object_found: Rate,
    pub context_confusion: Confusion,
    pub class_confusion: Confusion,
    pub color_confusion: Confusion,
    /// Every image, in prompt order.
    pub items: Vec<JudgedImage>,
}

impl PromptFidelity {
    /// Scores given (prompt, image) pairs with the oracle (the core of
    /// [`prompt_fidelity`], without generation).
    pub fn from_images(pairs: Vec<(PromptSpec, RgbImage)>) -> Self {
        let items: Vec<JudgedImage> = pairs
            .into_par_iter()
            .map(|(spec, image)| {
                let r = oracle::read(&image);
                JudgedImage {
                    verdict: judge(&spec, &r),
                    read_context: Some(r.context),
                    read_class: r.class(),
                    read_color: r.color(),
                    spec,
                    seed: None,
                    image,
                }
            })
            .collect();
        Self::from_judged(items)
    }

    fn from_judged(items: Vec<JudgedImage>) -> Self {
        let names = |v: &[&'static str], none: bool| {
            let mut v = v.to_vec();
            if none {
                v.push("none");
            }
            v
        };
        let ctx: Vec<_> = Context::ALL.iter().map(|c| c.name()).collect();
        let cls: Vec<_> = Class::ALL.iter().map(|c| c.noun()).collect();
        let col: Vec<_> = Color::ALL.iter().map(|c| c.name()).collect();
        let mut out = PromptFidelity {
            prompts: 0,
            images: items.len(),
            context: Rate::default(),
            class: Rate::default(),
            color: Rate::default(),
            all: Rate::default(),
            object_found: Rate::default(),
            context_confusion: Confusion::new(ctx.clone(), ctx),
            class_confusion: Confusion::new(cls.clone(), names(&cls, true)),
            color_confusion: Confusion::new(col.clone(), names(&col, true)),
            items: Vec::new(),
        };
        let mut prompts: Vec<&str> = items.iter().map(|j| j.spec.prompt.as_str()).collect();
        prompts.sort_unstable();
        prompts.dedup();
        out.prompts = prompts.len();
        for j in &items {
            let v = j.verdict;
            out.context.add(v.context);
            out.class.add(v.class);
            out.color.add(v.color);
            out.all.add(Some(v.all()));
            out.object_found.add(Some(j.read_class.is_some()));
            if let (Some(p), Some(r)) = (j.spec.context, j.read_context) {
                out.context_confusion.counts[p.index()][r.index()] += 1;
            }
            if let Some(p) = j.spec.class {
                let r = j.read_class.map_or(Class::ALL.len(), |c| c.index());
                out.class_confusion.counts[p.index()][r] += 1;
            }
            if let Some(p) = j.spec.color {
                let r = j.read_color.map_or(Color::ALL.len(), |c| c.index());
                out.color_confusion.counts[p.index()][r] += 1;
            }
        }
        out.items = items;
        out
    }

    /// A plain-text table: accuracy and N per attribute, with chance levels.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<14}{:>10}{:>8}{:>10}\n",
            "attribute", "accuracy", "n", "chance"
        );
        let rows = [
            ("context", &self.context, "16.7%"),
            ("class", &self.class, "16.7%"),
            ("color", &self.color, "10.0%"),
            ("all named", &self.all, ""),
            ("object found", &self.object_found, ""),
        ];
        for (name, r, chance) in rows {
            s += &format!("{name:<14}{:>10}{:>8}{chance:>10}\n", r.percent(), r.total);
        }
        s
    }

    /// One line: "context 95.0%, class 90.0%, color 85.0%, all 80.0%".
    pub fn summary(&self) -> String {
        format!(
            "context {}, class {}, color {}, all {}",
            self.context.percent(),
            self.class.percent(),
            self.color.percent(),
            self.all.percent()
        )
    }

    /// The most frequent mistakes per attribute, one line each.
    pub fn confusion_summary(&self, k: usize) -> String {
        let mut s = String::new();
        for (name, c) in [
            ("context", &self.context_confusion),
            ("class", &self.class_confusion),
            ("color", &self.color_confusion),
        ] {
            let m = c.top_mistakes(k);
            let list: Vec<String> = m.iter().map(|(p, r, n)| format!("{p}→{r} {n}")).collect();
            s += &format!(
                "{name:<8} mistakes: {}\n",
                if list.is_empty() {
                    "none".into()
                } else {
                    list.join(", ")
                }
            );
        }
        s
    }

    /// A labelled grid of the images of the first `max_prompts` prompts (see
    /// [`labeled_grid`]); a bar under each image is green when every named
    /// attribute is right, red otherwise.
    pub fn grid(&self, max_prompts: usize, scale: u32) -> RgbImage {
        let mut rows: Vec<(String, Vec<(RgbImage, bool)>)> = Vec::new();
        for j in &self.items {
            match rows.last_mut() {
                Some((p, imgs)) if *p == j.spec.prompt => {
                    imgs.push((j.image.clone(), j.verdict.all()))
                }
                _ => {
                    if rows.len() == max_prompts {
                        break;
                    }
                    rows.push((
                        j.spec.prompt.clone(),
                        vec![(j.image.clone(), j.verdict.all())],
                    ))
                }
            }
        }
        labeled_grid(&rows, scale)
    }
}

/// Prompt fidelity of a model: `settings.images_per_prompt` images of each
/// prompt, read by the oracle and checked against what the prompt names.
/// `progress` is called after every sampler step.
pub fn prompt_fidelity(
    model: &StableDiffusion,
    prompts: &[PromptSpec],
    settings: &SampleSettings,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PromptFidelity> {
    if prompts.is_empty() {
        return Err(Error::msg("prompt fidelity: no prompts given"));
    }
    let texts: Vec<&str> = prompts.iter().map(|p| p.prompt.as_str()).collect();
    let k = settings.images_per_prompt;
    let groups = generate_for(model, &texts, &vec![k; prompts.len()], settings, progress)?;
    let pairs: Vec<(PromptSpec, RgbImage)> = prompts
        .iter()
        .zip(groups)
        .flat_map(|(p, imgs)| imgs.into_iter().map(move |im| (p.clone(), im)))
        .collect();
    let mut out = PromptFidelity::from_images(pairs);
    for (i, j) in out.items.iter_mut().enumerate() {
        j.seed = Some(settings.seed.wrapping_add(i as u64));
    }
    Ok(out)
}

/// The oracle's own accuracy: `n` fresh world scenes (item `i` from
/// `derive_seed(seed, i)`, a stream apart from the training scenes'), rendered
/// and judged against their full captions.
pub fn oracle_accuracy(n: usize, seed: u64) -> PromptFidelity {
    let pairs: Vec<(PromptSpec, RgbImage)> = (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let scene = World::sample(derive_seed(seed ^ 0x0AC1_E5EE, i));
            (PromptSpec::of_scene(&scene), world::render(&scene))
        })
        .collect();
    PromptFidelity::from_images(pairs)
}

/// The same as [`oracle_accuracy`] on scenes passed through the model's VAE
/// (encode, posterior mean, decode) at the model's native size: the ceiling a
/// generator with this decoder can reach, and the oracle's accuracy on
/// decoder-blurred images.
pub fn vae_ceiling(model: &StableDiffusion, n: usize, seed: u64) -> Result<PromptFidelity> {
    let size = model.default_size() as u32;
    let mut pairs = Vec::with_capacity(n);
    let scenes: Vec<Scene> = (0..n as u64)
        .map(|i| World::sample(derive_seed(seed ^ 0x0AC1_E5EE, i)))
        .collect();
    for chunk in scenes.chunks(16) {
        let mut data = Vec::new();
        for scene in chunk {
            let img = world::render(scene);
            let img = if img.width() != size {
                image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle)
            } else {
                img
            };
            data.extend(world::to_chw_f32(&img));
        }
        let s = size as usize;
        let x = candle_core::Tensor::from_vec(data, (chunk.len(), 3, s, s), &model.device)?;
        let z = model.vae.encode(&x)?.mode().detach();
        let rec = model.vae.decode(&z)?.detach();
        let rec = ((rec / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        for (scene, img) in chunk.iter().zip(to_rgb8(&rec)?) {
            pairs.push((PromptSpec::of_scene(scene), img));
        }
    }
    Ok(PromptFidelity::from_images(pairs))
}

/// A degraded copy of an image: separable Gaussian blur (σ in px; 0 for
/// none), a random per-channel colour shift in `±shift` and Gaussian pixel
/// noise (σ in 0..255 units), all from `seed`. The oracle's robustness test.
pub fn degrade(img: &RgbImage, blur: f32, noise: f32, shift: f32, seed: u64) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut px: Vec<[f32; 3]> = img
        .pixels()
        .map(|p| [p.0[0] as f32, p.0[1] as f32, p.0[2] as f32])
        .collect();
    if blur > 0.0 {
        let r = (3.0 * blur).ceil() as isize;
        let k: Vec<f32> = (-r..=r)
            .map(|i| (-((i * i) as f32) / (2.0 * blur * blur)).exp())
            .collect();
        let ks: f32 = k.iter().sum();
        for horizontal in [true, false] {
            let src = px.clone();
            for y in 0..h as isize {
                for x in 0..w as isize {
                    let mut acc = [0f32; 3];
                    for (t, wt) in (-r..=r).zip(&k) {
                        let (xx, yy) = if horizontal {
                            ((x + t).clamp(0, w as isize - 1), y)
                        } else {
                            (x, (y + t).clamp(0, h as isize - 1))
                        };
                        let p = src[yy as usize * w + xx as usize];
                        for c in 0..3 {
                            acc[c] += wt * p[c] / ks;
                        }
                    }
                    px[y as usize * w + x as usize] = acc;
                }
            }
        }
    }
    let mut rng = ToyRng::new(seed);
    let offset = [0; 3].map(|_| rng.range(-shift, shift));
    let mut out = RgbImage::new(w as u32, h as u32);
    for (i, p) in px.iter().enumerate() {
        let q = [0, 1, 2].map(|c| {
            (p[c] + offset[c] + noise * rng.normal())
                .round()
                .clamp(0.0, 255.0) as u8
        });
        out.put_pixel((i % w) as u32, (i / w) as u32, Rgb(q));
    }
    out
}

/// [`oracle_accuracy`] on [`degrade`]d scenes.
pub fn oracle_accuracy_degraded(
    n: usize,
    seed: u64,
    blur: f32,
    noise: f32,
    shift: f32,
) -> PromptFidelity {
    let pairs: Vec<(PromptSpec, RgbImage)> = (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let s = derive_seed(seed ^ 0x0AC1_E5EE, i);
            let scene = World::sample(s);
            let img = degrade(&world::render(&scene), blur, noise, shift, s);
            (PromptSpec::of_scene(&scene), img)
        })
        .collect();
    PromptFidelity::from_images(pairs)
}

/// The oracle on subjects: mean subject fidelity and subject likeness of
/// rendered subject photos and of plain objects of the subject's class.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectCheck {
    pub subject: &'static str,
    pub photo_fidelity: f32,
    pub plain_fidelity: f32,
    pub photo_likeness: f32,
    pub plain_likeness: f32,
}

/// [`SubjectCheck`] of every subject over `n` photos and `n` plain objects
/// (random colour and context) each.
pub fn oracle_subject_check(n: usize, seed: u64) -> Vec<SubjectCheck> {
    Subject::ALL
        .into_par_iter()
        .map(|subject| {
            let photos: Vec<RgbImage> = (0..n as u64)
                .map(|i| {
                    let ctx = Context::ALL[i as usize % Context::ALL.len()];
                    let s = derive_seed(seed ^ 0x5B_0C4E, i);
                    world::render(&world::subject_scene(subject, ctx, s))
                })
                .collect();
            let plain: Vec<RgbImage> = (0..n as u64)
                .map(|i| {
                    let s = derive_seed(seed ^ 0x91A1_0B1E, i);
                    let ctx = Context::ALL[i as usize % Context::ALL.len()];
                    let colors = Color::allowed(ctx);
                    let color = colors[ToyRng::new(s).below(colors.len())];
                    let scene = Scene::placed(ctx, subject.class(), world::Paint::Plain(color), s);
                    world::render(&scene)
                })
                .collect();
            let fid = |imgs: &[RgbImage]| {
                mean(
                    imgs.iter()
                        .map(|im| oracle::subject_fidelity(im, subject).score),
                )
            };
            let like = |imgs: &[RgbImage]| {
                mean(
                    imgs.iter()
                        .map(|im| oracle::subject_likeness(im, subject).p_subject),
                )
            };
            SubjectCheck {
                subject: subject.name(),
                photo_fidelity: fid(&photos),
                plain_fidelity: fid(&plain),
                photo_likeness: like(&photos),
                plain_likeness: like(&plain),
            }
        })
        .collect()
}

fn mean(v: impl Iterator<Item = f32>) -> f32 {
    let (s, n) = v.fold((0f64, 0usize), |(s, n), x| (s + x as f64, n + 1));
    if n == 0 { 0.0 } else { (s / n as f64) as f32 }
}

// ---------------------------------------------------------------------------
// Subject metrics (DreamBooth evaluation)
// ---------------------------------------------------------------------------

/// What a subject prompt is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptRole {
    /// "a photo of a sks ball": subject fidelity.
    Subject,
    /// "a sks ball on the beach": subject fidelity and context agreement.
    Context,
    /// "a red sks ball": colour agreement.
    Color,
    /// "a photo of a ball": PRES (language drift) and class diversity.
    Prior,
}

/// A prompt of [`subject_prompts`].
#[derive(Clone, Debug, Serialize)]
pub struct SubjectPrompt {
    pub role: PromptRole,
    #[serde(flatten)]
    pub spec: PromptSpec,
}

/// Which identifier prompts [`subject_metrics`] uses.
#[derive(Clone, Debug)]
pub struct SubjectEvalOptions {
    /// "a sks ball {context}" prompts.
    pub contexts: Vec<Context>,
    /// "a {color} sks ball" prompts.
    pub colors: Vec<Color>,
    /// Images of the plain class prompt (PRES, class diversity); 0: none.
    pub class_images: usize,
    /// The subject's real photos (CLIP-I/DINO analog reference); empty: 4
    /// rendered ones.
    pub reference: Vec<RgbImage>,
}

impl Default for SubjectEvalOptions {
    fn default() -> Self {
        SubjectEvalOptions {
            contexts: Context::ALL.to_vec(),
            colors: vec![Color::Red, Color::Green, Color::Blue, Color::White],
            class_images: 8,
            reference: Vec::new(),
        }
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The prompts of [`subject_metrics`]: "a photo of a {id} {class}", "a {id}
/// {class} {context phrase}" per context, "a {color} {id} {class}" per colour,
/// and the class prompt "a photo of a {class}". `class_noun` is the word used
/// in the prompts; the class checked is always the subject's.
pub fn subject_prompts(
    subject: Subject,
    identifier: &str,
    class_noun: &str,
    opts: &SubjectEvalOptions,
) -> Vec<SubjectPrompt> {
    let class = Some(subject.class());
    let spec = |prompt: String, context, color| PromptSpec {
        prompt,
        context,
        class,
        color,
    };
    let mut out = vec![SubjectPrompt {
        role: PromptRole::Subject,
        spec: spec(
            format!(
                "a photo of {} {identifier} {class_noun}",
                article(identifier)
            ),
            None,
            None,
        ),
    }];
    for &ctx in &opts.contexts {
        out.push(SubjectPrompt {
            role: PromptRole::Context,
            spec: spec(
                format!(
                    "{} {identifier} {class_noun} {}",
                    article(identifier),
                    ctx.phrase()
                ),
                Some(ctx),
                None,
            ),
        });
    }
    for &color in &opts.colors {
        out.push(SubjectPrompt {
            role: PromptRole::Color,
            spec: spec(
                format!(
                    "{} {} {identifier} {class_noun}",
                    article(color.name()),
                    color.name()
                ),
                None,
                Some(color),
            ),
        });
    }
    out.push(SubjectPrompt {
        role: PromptRole::Prior,
        spec: spec(
            format!("a photo of {} {class_noun}", article(class_noun)),
            None,
            None,
        ),
    });
    out
}

/// The scores of one subject prompt's images.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectPromptScore {
    #[serde(flatten)]
    pub prompt: SubjectPrompt,
    pub images: usize,
    /// Mean [`oracle::subject_fidelity`] score, and its parts.
    pub fidelity: f32,
    pub fidelity_shape: f32,
    pub fidelity_color: f32,
    pub fidelity_pattern: f32,
    /// Mean [`oracle::subject_likeness`] `p_subject`.
    pub likeness: f32,
    /// Mean [`oracle::object_similarity`] to the reference photos.
    pub similarity: f32,
    pub context: Rate,
    pub class: Rate,
    pub color: Rate,
    /// [`oracle::diversity`] of the prompt's images.
    pub diversity: f32,
}

/// DreamBooth's measures for one subject (see [`subject_metrics`]).
#[derive(Clone, Debug, Serialize)]
pub struct SubjectMetrics {
    pub subject: &'static str,
    pub identifier: String,
    pub class_noun: String,
    /// Subject fidelity: mean oracle subject-fidelity score of the images of
    /// the subject and context prompts (geometric mean of shape, colour and
    /// pattern agreement), and its parts.
    pub fidelity: f32,
    pub fidelity_shape: f32,
    pub fidelity_color: f32,
    pub fidelity_pattern: f32,
    /// Mean subject likeness (`p_subject`: subject rather than a plain object
    /// of its class) of the same images.
    pub likeness: f32,
    /// Mean object similarity of the same images to the reference photos
    /// (the paper's DINO / CLIP-I analog).
    pub similarity: f32,
    /// Context prompts: the prompted context shown.
    pub context: Rate,
    /// Colour prompts: the prompted colour shown.
    pub color: Rate,
    /// All identifier prompts: the subject's class shown.
    pub class: Rate,
    /// PRES: mean subject likeness of images of the plain class prompt (high:
    /// the class prompt drifted to the subject).
    pub pres: f32,
    /// Mean object similarity of those images to the reference photos.
    pub pres_similarity: f32,
    /// DIV: diversity among the images of one identifier prompt (subject and
    /// context prompts), averaged over prompts.
    pub div: f32,
    /// Diversity of the class prompt's images.
    pub div_class: f32,
    pub prompts: Vec<SubjectPromptScore>,
}

/// Scores given images of [`subject_prompts`] (the core of
/// [`subject_metrics`], without generation). `reference`: the subject's real
/// photos for the similarity measures (empty: those two are 0).
pub fn score_subject(
    subject: Subject,
    identifier: &str,
    class_noun: &str,
    groups: Vec<(SubjectPrompt, Vec<RgbImage>)>,
    reference: &[RgbImage],
) -> SubjectMetrics {
    let scores: Vec<SubjectPromptScore> = groups
        .into_par_iter()
        .map(|(prompt, images)| {
            let mut context = Rate::default();
            let mut class = Rate::default();
            let mut color = Rate::default();
            let (mut fid, mut like, mut sim) = (Vec::new(), Vec::new(), Vec::new());
            for im in &images {
                let v = judge(&prompt.spec, &oracle::read(im));
                context.add(v.context);
                class.add(v.class);
                color.add(v.color);
                fid.push(oracle::subject_fidelity(im, subject));
                like.push(oracle::subject_likeness(im, subject).p_subject);
                sim.push(mean(
                    reference.iter().map(|r| oracle::object_similarity(im, r)),
                ));
            }
            SubjectPromptScore {
                images: images.len(),
                fidelity: mean(fid.iter().map(|s| s.score)),
                fidelity_shape: mean(fid.iter().map(|s| s.shape)),
                fidelity_color: mean(fid.iter().map(|s| s.color)),
                fidelity_pattern: mean(fid.iter().map(|s| s.pattern)),
                likeness: mean(like.into_iter()),
                similarity: mean(sim.into_iter()),
                context,
                class,
                color,
                diversity: oracle::diversity(&images),
                prompt,
            }
        })
        .collect();

    // image-weighted means over the prompts of some roles
    let over = |roles: &[PromptRole], f: &dyn Fn(&SubjectPromptScore) -> f32| {
        let (mut s, mut n) = (0f64, 0usize);
        for p in scores.iter().filter(|p| roles.contains(&p.prompt.role)) {
            s += f(p) as f64 * p.images as f64;
            n += p.images;
        }
        if n == 0 { 0.0 } else { (s / n as f64) as f32 }
    };
    let rate = |roles: &[PromptRole], f: &dyn Fn(&SubjectPromptScore) -> Rate| {
        scores
            .iter()
            .filter(|p| roles.contains(&p.prompt.role))
            .fold(Rate::default(), |a, p| {
                let r = f(p);
                Rate {
                    correct: a.correct + r.correct,
                    total: a.total + r.total,
                }
            })
    };
    use PromptRole as R;
    let fid_roles = [R::Subject, R::Context];
    let ident_roles = [R::Subject, R::Context, R::Color];
    let div_prompts: Vec<f32> = scores
        .iter()
        .filter(|p| fid_roles.contains(&p.prompt.role) && p.images >= 2)
        .map(|p| p.diversity)
        .collect();
    SubjectMetrics {
        subject: subject.name(),
        identifier: identifier.to_string(),
        class_noun: class_noun.to_string(),
        fidelity: over(&fid_roles, &|p| p.fidelity),
        fidelity_shape: over(&fid_roles, &|p| p.fidelity_shape),
        fidelity_color: over(&fid_roles, &|p| p.fidelity_color),
        fidelity_pattern: over(&fid_roles, &|p| p.fidelity_pattern),
        likeness: over(&fid_roles, &|p| p.likeness),
        similarity: over(&fid_roles, &|p| p.similarity),
        context: rate(&[R::Context], &|p| p.context),
        color: rate(&[R::Color], &|p| p.color),
        class: rate(&ident_roles, &|p| p.class),
        pres: over(&[R::Prior], &|p| p.likeness),
        pres_similarity: over(&[R::Prior], &|p| p.similarity),
        div: mean(div_prompts.into_iter()),
        div_class: over(&[R::Prior], &|p| p.diversity),
        prompts: scores,
    }
}

/// DreamBooth's measures for one subject on a model: images of
/// [`subject_prompts`] (`settings.images_per_prompt` per identifier prompt,
/// `opts.class_images` of the class prompt), scored by [`score_subject`].
pub fn subject_metrics(
    model: &StableDiffusion,
    subject: Subject,
    identifier: &str,
    class_noun: &str,
    opts: &SubjectEvalOptions,
    settings: &SampleSettings,
    progress: &mut dyn FnMut(&Progress),
) -> Result<SubjectMetrics> {
    let mut prompts = subject_prompts(subject, identifier, class_noun, opts);
    if opts.class_images == 0 {
        prompts.retain(|p| p.role != PromptRole::Prior);
    }
    let texts: Vec<&str> = prompts.iter().map(|p| p.spec.prompt.as_str()).collect();
    let counts: Vec<usize> = prompts
        .iter()
        .map(|p| match p.role {
            PromptRole::Prior => opts.class_images,
            _ => settings.images_per_prompt,
        })
        .collect();
    let groups = generate_for(model, &texts, &counts, settings, progress)?;
    let rendered;
    let reference = if opts.reference.is_empty() {
        rendered = world::subject_photos(subject, 4, settings.seed)
            .into_iter()
            .map(|(_, im)| im)
            .collect::<Vec<_>>();
        &rendered
    } else {
        &opts.reference
    };
    Ok(score_subject(
        subject,
        identifier,
        class_noun,
        prompts.into_iter().zip(groups).collect(),
        reference,
    ))
}

// ---------------------------------------------------------------------------
// Labelled grids
// ---------------------------------------------------------------------------

/// One row per prompt: the prompt in a small bitmap font on the left, then
/// its images scaled by `scale`, each with a bar under it, green when the
/// flag is true and red when false.
pub fn labeled_grid(rows: &[(String, Vec<(RgbImage, bool)>)], scale: u32) -> RgbImage {
    let scale = scale.max(1);
    let (cw, ch) = rows
        .iter()
        .flat_map(|(_, imgs)| imgs.iter())
        .fold((1, 1), |(w, h), (im, _)| {
            (w.max(im.width()), h.max(im.height()))
        });
    let (cw, ch) = (cw * scale, ch * scale);
    let cols = rows.iter().map(|(_, imgs)| imgs.len()).max().unwrap_or(0) as u32;
    let text_scale = 2;
    let advance = (GLYPH_W + 1) * text_scale;
    let label_w = rows
        .iter()
        .map(|(p, _)| p.chars().count() as u32)
        .max()
        .unwrap_or(0)
        * advance
        + 8;
    let (gap, bar) = (4, 4);
    let row_h = ch + bar + 2 + gap;
    let width = label_w + cols * (cw + gap) + gap;
    let height = rows.len() as u32 * row_h + gap;
    let mut out = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([255, 255, 255]));
    for (r, (prompt, imgs)) in rows.iter().enumerate() {
        let y0 = gap + r as u32 * row_h;
        let ty = y0 + ch / 2 - (GLYPH_H * text_scale) / 2;
        draw_text(&mut out, prompt, 4, ty, text_scale, Rgb([0, 0, 0]));
        for (c, (im, ok)) in imgs.iter().enumerate() {
            let x0 = label_w + c as u32 * (cw + gap);
            for y in 0..im.height() * scale {
                for x in 0..im.width() * scale {
                    out.put_pixel(x0 + x, y0 + y, *im.get_pixel(x / scale, y / scale));
                }
            }
            let color = if *ok {
                Rgb([30, 170, 60])
            } else {
                Rgb([210, 40, 40])
            };
            for y in 0..bar {
                for x in 0..cw {
                    out.put_pixel(x0 + x, y0 + ch + 2 + y, color);
                }
            }
        }
    }
    out
}

const GLYPH_W: u32 = 3;
const GLYPH_H: u32 = 5;

/// A 3×5 bitmap font: five rows of three bits, the high bit on the left.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 7, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [6, 1, 2, 4, 7],
        '3' => [6, 1, 2, 1, 6],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 6, 1, 6],
        '6' => [3, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 6],
        ' ' => [0; 5],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        '-' => [0, 0, 7, 0, 0],
        ':' => [0, 2, 0, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        '%' => [5, 1, 2, 4, 5],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        _ => [7, 1, 2, 0, 2],
    }
}

fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, scale: u32, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let gx = x + i as u32 * (GLYPH_W + 1) * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits >> (GLYPH_W - 1 - col) & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (px, py) = (gx + col * scale + dx, y + row as u32 * scale + dy);
                            if px < img.width() && py < img.height() {
                                img.put_pixel(px, py, color);
                            }
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Serialization helpers
// ---------------------------------------------------------------------------

/// Things serialized by their caption word.
trait Named {
    fn word(&self) -> &'static str;
}

impl Named for Context {
    fn word(&self) -> &'static str {
        self.name()
    }
}

impl Named for Class {
    fn word(&self) -> &'static str {
        self.noun()
    }
}

impl Named for Color {
    fn word(&self) -> &'static str {
        self.name()
    }
}

fn ser_name<T: Named, S: Serializer>(v: &Option<T>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(v.word()),
        None => s.serialize_none(),
    }
}

fn ser_sampler<S: Serializer>(v: &SamplerKind, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(v.name())
}
