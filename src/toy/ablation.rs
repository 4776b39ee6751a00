//! `dreambooth toy ablation`: the paper's comparisons in miniature. For each
//! toy subject, DreamBooth is trained (a) with prior preservation, (b) without
//! it, (c) with no class noun in the prompts, and scored in the paper's terms.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::Device;

use super::demo::{DemoOptions, EvalPrompt, eval_prompts, gen_images, score, write_photos};
use super::world::{self, Subject};
use crate::Result;
use crate::dreambooth::config::TrainConfig;
use crate::dreambooth::trainer::{Events, train_model};
use crate::models::{LoadOptions, StableDiffusion};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    PriorPreservation,
    NoPrior,
    NoClassNoun,
}

impl Variant {
    pub const ALL: [Variant; 3] = [
        Variant::PriorPreservation,
        Variant::NoPrior,
        Variant::NoClassNoun,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::PriorPreservation => "with prior preservation",
            Variant::NoPrior => "without prior preservation",
            Variant::NoClassNoun => "no class noun",
        }
    }
}

/// One trained variant's scores, in the paper's terms.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AblationRow {
    pub subject: String,
    pub variant: String,
    /// Subject fidelity on identifier prompts (DINO / CLIP-I analog).
    pub subject_fidelity: f64,
    /// Context and colour agreement on identifier prompts (CLIP-T analog).
    pub prompt_fidelity: f64,
    /// How much class-prompt images now look like the subject (PRES).
    pub pres: f64,
    /// Diversity among class-prompt images (DIV).
    pub div: f64,
}

/// Scores a model on a subject's evaluation prompts.
pub fn evaluate(
    model: &StableDiffusion,
    subject: Subject,
    prompts: &[EvalPrompt],
    opts: &DemoOptions,
) -> Result<AblationRow> {
    let (mut sf, mut n_sf, mut pf, mut n_pf) = (0f64, 0f64, 0f64, 0f64);
    let mut row = AblationRow::default();
    for p in prompts {
        let imgs = gen_images(model, &p.prompt, opts)?;
        let s = score(&imgs, p, subject);
        if p.subject {
            sf += s.subject_likeness;
            n_sf += 1.0;
            for acc in [s.context_acc, s.color_acc].into_iter().flatten() {
                pf += acc;
                n_pf += 1.0;
            }
        } else {
            row.pres = s.subject_likeness;
            row.div = s.diversity;
        }
    }
    row.subject_fidelity = sf / n_sf.max(1.0);
    row.prompt_fidelity = pf / n_pf.max(1.0);
    Ok(row)
}

/// Trains one variant for one subject on a fresh copy of the model and scores it.
pub fn run_variant(
    model_dir: &std::path::Path,
    subject: Subject,
    variant: Variant,
    opts: &DemoOptions,
    work: &std::path::Path,
    log: &mut dyn FnMut(&str),
) -> Result<AblationRow> {
    let model = StableDiffusion::load(
        model_dir,
        &Device::Cpu,
        LoadOptions {
            train_unet: true,
            train_text_encoder: opts.train_text_encoder,
            ..Default::default()
        },
    )?;
    let photos_dir = work.join(format!("photos-{}", subject.name()));
    write_photos(&photos_dir, subject, opts.num_photos, opts.seed)?;
    let class = subject.class();
    let id = opts.identifier.as_str();
    let with_noun = variant != Variant::NoClassNoun;
    let instance_prompt = if with_noun {
        world::describe(true, Some(id), None, class, None)
    } else {
        format!("a photo of {id}")
    };
    let mut prompts = eval_prompts(subject, id);
    if !with_noun {
        let noun = format!(" {}", class.noun());
        for p in prompts.iter_mut().filter(|p| p.subject) {
            p.prompt = p.prompt.replacen(&noun, "", 1);
        }
    }
    let cfg = TrainConfig {
        model: Some(model_dir.to_path_buf()),
        instance_dir: photos_dir,
        instance_prompt,
        class_prompt: Some(world::describe(true, None, None, class, None)),
        class_dir: Some(work.join(format!("class-{}", subject.name()))),
        // The folder is this command's own cache: images a previous run made
        // with another model (the bundled one was retrained) are moved to a
        // replaced-<time>/ subfolder and made again, instead of stopping.
        regenerate_class_images: true,
        with_prior_preservation: variant != Variant::NoPrior,
        num_class_images: opts.num_class_images,
        output_dir: work.join(format!("run-{}-{variant:?}", subject.name())),
        resolution: Some(model.default_size()),
        random_flip: true,
        max_train_steps: opts.steps,
        learning_rate: opts.learning_rate,
        train_text_encoder: opts.train_text_encoder,
        text_encoder_lr: opts.text_encoder_lr,
        checkpointing_steps: 0,
        seed: opts.seed,
        sample_batch_size: 8,
        class_sampler: "ddim".into(),
        class_steps: opts.sample_steps,
        class_guidance: opts.guidance,
        ..Default::default()
    };
    let stop = AtomicBool::new(false);
    let mut l = |s: &str| log(s);
    let mut ev = Events {
        log: &mut l,
        step: &mut |_| {},
        stop: &stop,
    };
    train_model(&cfg, &model, &mut ev)?;
    let mut row = evaluate(&model, subject, &prompts, opts)?;
    row.subject = subject.name().to_string();
    row.variant = variant.name().to_string();
    Ok(row)
}

/// The whole ablation; returns the rows (untrained baseline first per subject).
pub fn run_ablation(
    model_dir: Option<PathBuf>,
    subjects: &[Subject],
    opts: &DemoOptions,
    work: &std::path::Path,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<AblationRow>> {
    let model_dir = match model_dir {
        Some(p) => p,
        None => crate::models::sd::default_model_dir()?,
    };
    let base = StableDiffusion::load(&model_dir, &Device::Cpu, LoadOptions::default())?;
    let mut rows = Vec::new();
    for &s in subjects {
        let mut r = evaluate(&base, s, &eval_prompts(s, &opts.identifier), opts)?;
        r.subject = s.name().into();
        r.variant = "untrained".into();
        log(&format!("{} untrained: {:?}", s.name(), r));
        rows.push(r);
        for v in Variant::ALL {
            let r = run_variant(&model_dir, s, v, opts, work, log)?;
            log(&format!(
                "{} {}: fidelity {:.2} prompt {:.2} PRES {:.2} DIV {:.3}",
                s.name(),
                v.name(),
                r.subject_fidelity,
                r.prompt_fidelity,
                r.pres,
                r.div
            ));
            rows.push(r);
        }
    }
    Ok(rows)
}

/// The rows as a markdown table, plus per-variant means.
pub fn markdown(rows: &[AblationRow]) -> String {
    let mut s = String::from(
        "| subject | variant | subject fidelity ↑ | prompt fidelity ↑ | PRES ↓ | DIV ↑ |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.subject, r.variant, r.subject_fidelity, r.prompt_fidelity, r.pres, r.div
        );
    }
    let mut variants: Vec<String> = Vec::new();
    for r in rows {
        if !variants.contains(&r.variant) {
            variants.push(r.variant.clone());
        }
    }
    for v in variants {
        let sel: Vec<&AblationRow> = rows.iter().filter(|r| r.variant == v).collect();
        let n = sel.len() as f64;
        let m = |f: &dyn Fn(&AblationRow) -> f64| sel.iter().map(|r| f(r)).sum::<f64>() / n;
        let _ = writeln!(
            s,
            "| **mean** | **{v}** | {:.3} | {:.3} | {:.3} | {:.3} |",
            m(&|r| r.subject_fidelity),
            m(&|r| r.prompt_fidelity),
            m(&|r| r.pres),
            m(&|r| r.div)
        );
    }
    s
}
