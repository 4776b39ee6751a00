//! `dreambooth demo`: the whole method in minutes on the bundled tiny model.
//! It renders a toy subject's "photos", generates class images with the frozen
//! model, trains DreamBooth with prior preservation, generates the subject in
//! new contexts and colours before and after, scores everything with the
//! world's analytic oracle, and writes a self-contained `report.html`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::Device;
use image::RgbImage;

use super::oracle;
use super::world::{self, Color, Context, Subject};
use crate::diffusion::{GenerateOptions, SamplerKind, generate};
use crate::dreambooth::config::TrainConfig;
use crate::dreambooth::trainer::{Events, train_model};
use crate::models::{LoadOptions, StableDiffusion};
use crate::optim::LrScheduleKind;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub model: Option<PathBuf>,
    pub subject: Subject,
    pub identifier: String,
    pub num_photos: usize,
    pub steps: u64,
    pub learning_rate: f64,
    /// Also train the text encoder (binds the identifier's embedding).
    pub train_text_encoder: bool,
    /// The text encoder's learning rate (default: `learning_rate`).
    pub text_encoder_lr: Option<f64>,
    pub num_class_images: usize,
    pub prior_preservation: bool,
    pub images_per_prompt: usize,
    pub sample_steps: usize,
    pub guidance: f64,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("demo-out"),
            model: None,
            subject: Subject::SpotBall,
            identifier: "sks".into(),
            num_photos: 5,
            steps: 600,
            learning_rate: 1e-4,
            train_text_encoder: true,
            text_encoder_lr: Some(1e-4),
            num_class_images: 40,
            prior_preservation: true,
            images_per_prompt: 4,
            sample_steps: 20,
            guidance: 5.0,
            seed: 0,
        }
    }
}

/// One evaluation prompt and what the oracle should see.
#[derive(Clone, Debug)]
pub struct EvalPrompt {
    pub prompt: String,
    pub kind: &'static str,
    pub context: Option<Context>,
    pub color: Option<Color>,
    /// Whether the prompt names the identifier (the subject should appear).
    pub subject: bool,
}

/// The prompts the demo scores: the subject plain, in contexts its photos
/// never showed, recoloured, and the bare class prompt (prior preservation).
pub fn eval_prompts(subject: Subject, id: &str) -> Vec<EvalPrompt> {
    let class = subject.class();
    let mut v = vec![EvalPrompt {
        prompt: world::describe(true, Some(id), None, class, None),
        kind: "subject",
        context: None,
        color: None,
        subject: true,
    }];
    let unseen: Vec<Context> = Context::ALL
        .iter()
        .copied()
        .filter(|c| !subject.photo_contexts().contains(c))
        .take(3)
        .collect();
    for c in unseen {
        v.push(EvalPrompt {
            prompt: world::describe(false, Some(id), None, class, Some(c)),
            kind: "new context",
            context: Some(c),
            color: None,
            subject: true,
        });
    }
    for color in [Color::Green, Color::Purple] {
        v.push(EvalPrompt {
            prompt: world::describe(false, Some(id), Some(color), class, None),
            kind: "new colour",
            context: None,
            color: Some(color),
            subject: true,
        });
    }
    v.push(EvalPrompt {
        prompt: world::describe(true, None, None, class, None),
        kind: "class (prior)",
        context: None,
        color: None,
        subject: false,
    });
    v
}

/// Oracle scores of one prompt's images.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PromptScores {
    /// Mean probability that the object is the subject (vs a plain object of its class).
    pub subject_likeness: f64,
    /// Mean pattern/shape/colour fidelity to the subject (oracle, 0..1).
    pub subject_fidelity: f64,
    /// Fraction showing the prompted context (when the prompt names one).
    pub context_acc: Option<f64>,
    /// Fraction showing the prompted colour (when named).
    pub color_acc: Option<f64>,
    /// Fraction showing an object of the prompted class.
    pub class_acc: f64,
    /// Mean pairwise distance among the images (DIV analog).
    pub diversity: f64,
}

pub fn score(images: &[RgbImage], p: &EvalPrompt, subject: Subject) -> PromptScores {
    let n = images.len().max(1) as f64;
    let mut s = PromptScores::default();
    let (mut ctx, mut col, mut cls) = (0usize, 0usize, 0usize);
    for im in images {
        s.subject_likeness += oracle::subject_likeness(im, subject).p_subject as f64 / n;
        s.subject_fidelity += oracle::subject_fidelity(im, subject).score as f64 / n;
        let r = oracle::read(im);
        if p.context.is_some_and(|c| r.context == c) {
            ctx += 1;
        }
        if let Some(o) = &r.object {
            if o.class == subject.class() {
                cls += 1;
            }
            if p.color.is_some_and(|c| o.color == c) {
                col += 1;
            }
        }
    }
    s.context_acc = p.context.map(|_| ctx as f64 / n);
    s.color_acc = p.color.map(|_| col as f64 / n);
    s.class_acc = cls as f64 / n;
    s.diversity = oracle::diversity(images) as f64;
    s
}

#[derive(Clone, Debug)]
pub struct PromptResult {
    pub prompt: EvalPrompt,
    pub before: Vec<RgbImage>,
    pub after: Vec<RgbImage>,
    pub before_scores: PromptScores,
    pub after_scores: PromptScores,
}

#[derive(Clone, Debug)]
pub struct DemoReport {
    pub report: PathBuf,
    pub results: Vec<PromptResult>,
    pub seconds: f64,
}

/// `opts.images_per_prompt` images of `prompt` (DDIM, the demo's seeds).
pub fn gen_images(
    model: &StableDiffusion,
    prompt: &str,
    opts: &DemoOptions,
) -> Result<Vec<RgbImage>> {
    let mut g = GenerateOptions::new(prompt, opts.images_per_prompt);
    g.steps = opts.sample_steps;
    g.guidance_scale = opts.guidance;
    g.sampler = SamplerKind::Ddim;
    g.seed = opts.seed + 1000;
    g.batch_size = opts.images_per_prompt;
    Ok(generate(model, &g, &mut |_| {})?
        .images
        .into_iter()
        .map(|i| i.image)
        .collect())
}

/// Renders `n` photos of `subject` into `dir` (photo-0.png, ...) and returns them.
pub fn write_photos(
    dir: &std::path::Path,
    subject: Subject,
    n: usize,
    seed: u64,
) -> Result<Vec<RgbImage>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let photos: Vec<RgbImage> = world::subject_photos(subject, n, seed)
        .into_iter()
        .map(|(_, im)| im)
        .collect();
    for (i, im) in photos.iter().enumerate() {
        let p = dir.join(format!("photo-{i}.png"));
        im.save(&p).map_err(|e| Error::Image {
            path: p.clone(),
            msg: e.to_string(),
        })?;
    }
    Ok(photos)
}

/// Runs the demo; `log` receives progress lines.
pub fn run_demo(opts: &DemoOptions, log: &mut dyn FnMut(&str)) -> Result<DemoReport> {
    let t0 = Instant::now();
    let device = Device::Cpu;
    let model_dir = match &opts.model {
        Some(p) => p.clone(),
        None => crate::models::sd::default_model_dir()?,
    };
    let model = StableDiffusion::load(
        &model_dir,
        &device,
        LoadOptions {
            train_unet: true,
            train_text_encoder: opts.train_text_encoder,
            ..Default::default()
        },
    )?;
    let res = model.default_size();
    let out = &opts.out;
    let photos_dir = out.join("photos");
    let photos = write_photos(&photos_dir, opts.subject, opts.num_photos, opts.seed)?;
    let class = opts.subject.class();
    let instance_prompt = world::describe(true, Some(&opts.identifier), None, class, None);
    let class_prompt = world::describe(true, None, None, class, None);
    log(&format!(
        "subject `{}` ({} photos in {}); instance prompt \"{instance_prompt}\", class prompt \"{class_prompt}\"",
        opts.subject.name(),
        photos.len(),
        photos_dir.display()
    ));

    let prompts = eval_prompts(opts.subject, &opts.identifier);
    let mut before = Vec::new();
    for p in &prompts {
        before.push(gen_images(&model, &p.prompt, opts)?);
    }
    log(&format!(
        "generated 'before' images for {} prompts ({:.0}s)",
        prompts.len(),
        t0.elapsed().as_secs_f64()
    ));

    let cfg = TrainConfig {
        model: Some(model_dir.clone()),
        instance_dir: photos_dir.clone(),
        instance_prompt,
        class_prompt: Some(class_prompt),
        class_dir: Some(out.join("class_images")),
        // The folder is this command's own cache: images a previous run made
        // with another model (the bundled one was retrained) are moved to a
        // replaced-<time>/ subfolder and made again, instead of stopping.
        regenerate_class_images: true,
        with_prior_preservation: opts.prior_preservation,
        num_class_images: opts.num_class_images,
        output_dir: out.join("run"),
        resolution: Some(res),
        center_crop: false,
        random_flip: true,
        max_train_steps: opts.steps,
        learning_rate: opts.learning_rate,
        train_text_encoder: opts.train_text_encoder,
        text_encoder_lr: opts.text_encoder_lr,
        lr_scheduler: LrScheduleKind::Constant,
        checkpointing_steps: 0,
        seed: opts.seed,
        sample_batch_size: 8,
        class_sampler: "ddim".into(),
        class_steps: opts.sample_steps,
        class_guidance: opts.guidance,
        sample_steps: opts.sample_steps,
        sample_guidance: opts.guidance,
        ..Default::default()
    };
    let stop = AtomicBool::new(false);
    let t_train = Instant::now();
    let mut last_print = Instant::now();
    let mut log_line = |s: &str| log(s);
    let mut step_cb = |s: &crate::dreambooth::trainer::StepInfo| {
        if last_print.elapsed().as_secs_f64() > 10.0 || s.step == s.total {
            last_print = Instant::now();
            println!(
                "  step {}/{} loss {:.4} (instance {:.4}, prior {:.4}) {:.1} it/s",
                s.step,
                s.total,
                s.loss,
                s.loss_instance,
                s.loss_prior.unwrap_or(0.0),
                s.step as f64 / s.seconds.max(1e-9)
            );
        }
    };
    let mut ev = Events {
        log: &mut log_line,
        step: &mut step_cb,
        stop: &stop,
    };
    train_model(&cfg, &model, &mut ev)?;
    log(&format!(
        "trained {} steps in {:.0}s",
        opts.steps,
        t_train.elapsed().as_secs_f64()
    ));

    let mut results = Vec::new();
    for (p, b) in prompts.into_iter().zip(before) {
        let a = gen_images(&model, &p.prompt, opts)?;
        results.push(PromptResult {
            before_scores: score(&b, &p, opts.subject),
            after_scores: score(&a, &p, opts.subject),
            prompt: p,
            before: b,
            after: a,
        });
    }
    let class_imgs: Vec<RgbImage> =
        crate::dreambooth::data::ImageFolder::list(&out.join("class_images"))
            .map(|(paths, _)| paths)
            .unwrap_or_default()
            .iter()
            .take(8)
            .filter_map(|p| image::open(p).ok().map(|i| i.to_rgb8()))
            .collect();
    let report = out.join("report.html");
    let html = render_html(
        opts,
        &photos,
        &class_imgs,
        &results,
        t0.elapsed().as_secs_f64(),
    );
    crate::util::write_atomic(&report, html.as_bytes())?;
    Ok(DemoReport {
        report,
        results,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn data_uri(img: &RgbImage) -> String {
    crate::util::png_data_uri(img)
}

fn strip(images: &[RgbImage]) -> String {
    images
        .iter()
        .map(|i| format!("<img src=\"{}\" width=96 height=96>", data_uri(i)))
        .collect()
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.0}%", 100.0 * x))
        .unwrap_or_else(|| "–".into())
}

fn render_html(
    opts: &DemoOptions,
    photos: &[RgbImage],
    class_imgs: &[RgbImage],
    results: &[PromptResult],
    seconds: f64,
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><title>dreambooth demo</title><style>\
         body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
         img{{image-rendering:pixelated;margin:2px;border:1px solid #ccc}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ddd;padding:4px 8px;vertical-align:middle}}\
         th{{background:#f4f4f4}} .num{{text-align:right}}</style></head><body>\
         <h1>DreamBooth on the bundled tiny model</h1>\
         <p>Subject <b>{}</b> (class <i>{}</i>), identifier <code>{}</code>; {} steps at lr {:.0e} ({}), \
         prior preservation {} with {} class images; {} images per prompt, DDIM {} steps, guidance {}. \
         Total time {:.0}s. Scores come from the world's analytic oracle: <i>subject</i> = probability the \
         object is the subject rather than a plain {} (DINO analog), <i>context/colour</i> = the prompt's \
         context/colour is what the image shows (CLIP-T analog), <i>div</i> = mean pairwise image distance \
         (DIV analog). On the class prompt, a high subject score after training is language drift (PRES).</p>",
        opts.subject.name(),
        opts.subject.class().noun(),
        opts.identifier,
        opts.steps,
        opts.learning_rate,
        if opts.train_text_encoder {
            format!(
                "text encoder trained too, lr {:.0e}",
                opts.text_encoder_lr.unwrap_or(opts.learning_rate)
            )
        } else {
            "text encoder frozen".to_string()
        },
        if opts.prior_preservation { "on" } else { "off" },
        opts.num_class_images,
        opts.images_per_prompt,
        opts.sample_steps,
        opts.guidance,
        seconds,
        opts.subject.class().noun()
    );
    let _ = write!(h, "<h2>Subject photos</h2><p>{}</p>", strip(photos));
    if !class_imgs.is_empty() {
        let _ = write!(
            h,
            "<h2>Class images (frozen model, class prompt)</h2><p>{}</p>",
            strip(class_imgs)
        );
    }
    let _ = write!(
        h,
        "<h2>Before and after</h2><table><tr><th>prompt</th><th>before</th><th>after</th>\
         <th>subject<br>before → after</th><th>context</th><th>colour</th><th>div</th></tr>"
    );
    for r in results {
        let (b, a) = (&r.before_scores, &r.after_scores);
        let _ = write!(
            h,
            "<tr><td><b>{}</b><br><small>{}</small></td><td>{}</td><td>{}</td>\
             <td class=num>{:.2} → {:.2}</td><td class=num>{} → {}</td><td class=num>{} → {}</td>\
             <td class=num>{:.3} → {:.3}</td></tr>",
            html_escape(&r.prompt.prompt),
            r.prompt.kind,
            strip(&r.before),
            strip(&r.after),
            b.subject_likeness,
            a.subject_likeness,
            pct(b.context_acc),
            pct(a.context_acc),
            pct(b.color_acc),
            pct(a.color_acc),
            b.diversity,
            a.diversity
        );
    }
    let _ = write!(h, "</table>{}</body></html>", summary_html(results));
    h
}

/// The paper's metrics in miniature, averaged over prompt kinds.
pub fn summary(results: &[PromptResult]) -> Vec<(String, f64, f64)> {
    let mean = |f: &dyn Fn(&PromptResult) -> Option<(f64, f64)>| -> Option<(f64, f64)> {
        let v: Vec<(f64, f64)> = results.iter().filter_map(f).collect();
        if v.is_empty() {
            return None;
        }
        let n = v.len() as f64;
        Some((
            v.iter().map(|x| x.0).sum::<f64>() / n,
            v.iter().map(|x| x.1).sum::<f64>() / n,
        ))
    };
    let mut rows = Vec::new();
    if let Some((b, a)) = mean(&|r| {
        r.prompt.subject.then_some((
            r.before_scores.subject_likeness,
            r.after_scores.subject_likeness,
        ))
    }) {
        rows.push(("subject fidelity (identifier prompts)".to_string(), b, a));
    }
    if let Some((b, a)) = mean(&|r| {
        r.after_scores
            .context_acc
            .map(|a| (r.before_scores.context_acc.unwrap_or(0.0), a))
    }) {
        rows.push(("context follows prompt".to_string(), b, a));
    }
    if let Some((b, a)) = mean(&|r| {
        r.after_scores
            .color_acc
            .map(|a| (r.before_scores.color_acc.unwrap_or(0.0), a))
    }) {
        rows.push(("colour follows prompt".to_string(), b, a));
    }
    if let Some((b, a)) = mean(&|r| {
        (!r.prompt.subject).then_some((
            r.before_scores.subject_likeness,
            r.after_scores.subject_likeness,
        ))
    }) {
        rows.push((
            "PRES: class prompt looks like the subject".to_string(),
            b,
            a,
        ));
    }
    if let Some((b, a)) = mean(&|r| {
        (!r.prompt.subject).then_some((r.before_scores.diversity, r.after_scores.diversity))
    }) {
        rows.push(("DIV: diversity of class-prompt images".to_string(), b, a));
    }
    rows
}

fn summary_html(results: &[PromptResult]) -> String {
    let mut h = String::from(
        "<h2>Summary</h2><table><tr><th>metric</th><th>before</th><th>after</th></tr>",
    );
    for (name, b, a) in summary(results) {
        let _ = write!(
            h,
            "<tr><td>{name}</td><td class=num>{b:.2}</td><td class=num>{a:.2}</td></tr>"
        );
    }
    h.push_str("</table>");
    h
}

use crate::util::html_escape;

/// The subject named on the command line.
pub fn parse_subject(name: &str) -> Result<Subject> {
    Subject::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Subject::ALL.iter().map(|s| s.name()).collect();
        Error::msg(format!(
            "unknown subject `{name}` (choose one of {})",
            names.join(", ")
        ))
    })
}
