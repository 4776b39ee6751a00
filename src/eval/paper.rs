//! `dreambooth bench paper`: the DreamBooth paper's evaluation protocol on its
//! dataset. For every subject: train (full fine-tune or LoRA, with prior
//! preservation on the subject's class), generate `images_per_prompt` images
//! for each of the 25 evaluation prompts (object or live-subject list) and
//! some images of the bare class prompt, score them with [`super::run::evaluate`],
//! and write the subject's report; then average over subjects into a table
//! shaped like the paper's Table 1 (with a "real images" row) plus PRES / DIV.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::report::{ReportImages, write_report};
use super::run::{
    EncoderPaths, Encoders, EvalInputs, EvalResult, LabeledImage, evaluate, read_images,
};
use crate::diffusion::{GenerateOptions, SamplerKind, generate};
use crate::dreambooth::config::TrainConfig;
use crate::dreambooth::trainer::{Events, StepInfo, load_model, train_model};
use crate::image_io::save_generated;
use crate::models::StableDiffusion;
use crate::util::{html_escape, write_atomic};
use crate::{Error, Result};

/// The classes the paper treats as live subjects (they get the live-subject
/// prompt list: outfits, hats…); every other class gets the object list.
pub const LIVE_CLASSES: [&str; 2] = ["dog", "cat"];

/// One subject of the dataset.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PaperSubject {
    pub name: String,
    pub class: String,
    pub live: bool,
}

/// The DreamBooth dataset: subjects, classes and the two prompt lists.
#[derive(Clone, Debug)]
pub struct PaperDataset {
    pub dir: PathBuf,
    pub subjects: Vec<PaperSubject>,
    /// Templates with `{0}` (identifier) and `{1}` (class noun).
    pub object_prompts: Vec<String>,
    pub live_prompts: Vec<String>,
}

/// The file of the dataset that lists classes and prompts.
pub const PROMPTS_FILE: &str = "prompts_and_classes.txt";

impl PaperDataset {
    /// Reads `dir/prompts_and_classes.txt` (the dataset's own format: a
    /// `subject_name,class` CSV block, then the "Object Prompts" and "Live
    /// Subject Prompts" lists as Python `'…'.format(unique_token, class_token)`
    /// lines) and checks every subject's folder holds images.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(PROMPTS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::config(
                &path,
                "not found: --dataset must be the DreamBooth dataset folder (subject folders + prompts_and_classes.txt)",
            ),
            _ => Error::io(&path, e),
        })?;
        let mut subjects = Vec::new();
        let (mut object_prompts, mut live_prompts) = (Vec::new(), Vec::new());
        #[derive(PartialEq)]
        enum Sec {
            None,
            Classes,
            Object,
            Live,
        }
        let mut sec = Sec::None;
        for line in text.lines() {
            let l = line.trim();
            let lower = l.to_ascii_lowercase();
            if lower.starts_with("subject_name") {
                sec = Sec::Classes;
                continue;
            }
            if lower.starts_with("object prompts") {
                sec = Sec::Object;
                continue;
            }
            if lower.starts_with("live subject prompts") {
                sec = Sec::Live;
                continue;
            }
            match sec {
                Sec::Classes => {
                    if l.is_empty() || lower == "prompts" {
                        sec = Sec::None;
                        continue;
                    }
                    let Some((name, class)) = l.split_once(',') else {
                        return Err(Error::config(
                            &path,
                            format!("expected `subject_name,class`, got \"{l}\""),
                        ));
                    };
                    let class = class.trim().to_string();
                    subjects.push(PaperSubject {
                        name: name.trim().to_string(),
                        live: LIVE_CLASSES.contains(&class.as_str()),
                        class,
                    });
                }
                Sec::Object | Sec::Live => {
                    if let Some(t) = parse_template(l) {
                        if sec == Sec::Object {
                            object_prompts.push(t);
                        } else {
                            live_prompts.push(t);
                        }
                    }
                }
                Sec::None => {}
            }
        }
        if subjects.is_empty() || object_prompts.is_empty() || live_prompts.is_empty() {
            return Err(Error::config(
                &path,
                format!(
                    "found {} subjects, {} object prompts, {} live-subject prompts: each must be present",
                    subjects.len(),
                    object_prompts.len(),
                    live_prompts.len()
                ),
            ));
        }
        for s in &subjects {
            let d = dir.join(&s.name);
            if !d.is_dir() {
                return Err(Error::config(
                    &path,
                    format!(
                        "lists subject `{}` but {} is not a folder",
                        s.name,
                        d.display()
                    ),
                ));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            subjects,
            object_prompts,
            live_prompts,
        })
    }

    /// The subjects named in `names` (all when empty), in the dataset's order.
    pub fn select(&self, names: &[String]) -> Result<Vec<PaperSubject>> {
        if names.is_empty() {
            return Ok(self.subjects.clone());
        }
        for n in names {
            if !self.subjects.iter().any(|s| &s.name == n) {
                let all: Vec<&str> = self.subjects.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::msg(format!(
                    "unknown subject `{n}` (the dataset has {})",
                    all.join(", ")
                )));
            }
        }
        Ok(self
            .subjects
            .iter()
            .filter(|s| names.contains(&s.name))
            .cloned()
            .collect())
    }

    /// The evaluation prompts of `s`, identifier and class filled in.
    pub fn prompts(&self, s: &PaperSubject, identifier: &str) -> Vec<String> {
        let list = if s.live {
            &self.live_prompts
        } else {
            &self.object_prompts
        };
        list.iter()
            .map(|t| t.replace("{0}", identifier).replace("{1}", &s.class))
            .collect()
    }
}

/// `'a {0} {1} in the jungle'.format(unique_token, class_token),` → the template.
fn parse_template(line: &str) -> Option<String> {
    let l = line.trim();
    let q = l.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let rest = &l[1..];
    let end = rest.find(q)?;
    let t = &rest[..end];
    (t.contains("{0}") && t.contains("{1}")).then(|| t.to_string())
}

/// Settings of one `bench paper` run.
#[derive(Clone, Debug)]
pub struct PaperOptions {
    pub dataset: PathBuf,
    pub model: Option<PathBuf>,
    pub lora: bool,
    pub lora_rank: usize,
    pub subjects: Vec<String>,
    pub identifier: String,
    pub images_per_prompt: usize,
    /// Use only the first N prompts of each list (quick runs).
    pub prompts_limit: Option<usize>,
    pub class_images_per_subject: usize,
    pub steps: u64,
    pub learning_rate: f64,
    pub num_class_images: usize,
    pub train_text_encoder: bool,
    pub resolution: Option<usize>,
    pub sample_steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub out: PathBuf,
    /// A VAE in place of the model's (as `train --vae`).
    pub vae: Option<PathBuf>,
    /// Overrides the model's prediction type (as `train --prediction-type`).
    pub prediction_type: Option<String>,
    /// Training's compute dtype (`no`, `fp16`, `bf16`; as `train --mixed-precision`).
    pub mixed_precision: String,
    /// Where training, generation and the encoders run.
    pub device: Device,
    /// Train and evaluate every subject again, even those an earlier run
    /// with the same settings finished.
    pub redo: bool,
}

impl Default for PaperOptions {
    /// The command line's defaults, on the CPU with the bundled tiny model.
    fn default() -> Self {
        Self {
            dataset: PathBuf::new(),
            model: None,
            lora: false,
            lora_rank: 4,
            subjects: Vec::new(),
            identifier: "sks".into(),
            images_per_prompt: 4,
            prompts_limit: None,
            class_images_per_subject: 8,
            steps: 800,
            learning_rate: 5e-5,
            num_class_images: 200,
            train_text_encoder: false,
            resolution: None,
            sample_steps: 50,
            guidance: 7.5,
            seed: 0,
            out: PathBuf::from("paper-out"),
            vae: None,
            prediction_type: None,
            mixed_precision: "no".into(),
            device: Device::Cpu,
            redo: false,
        }
    }
}

impl PaperOptions {
    /// What a subject's figures depend on: a subject whose record
    /// (`<out>/<subject>/subject.json`) holds the same settings is reused
    /// instead of trained again. (The device is not among them.)
    pub fn settings(&self, encoders: &EncoderPaths) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "vae": self.vae,
            "prediction_type": self.prediction_type,
            "lora": self.lora,
            "lora_rank": self.lora_rank,
            "identifier": self.identifier,
            "images_per_prompt": self.images_per_prompt,
            "prompts_limit": self.prompts_limit,
            "class_images_per_subject": self.class_images_per_subject,
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "num_class_images": self.num_class_images,
            "train_text_encoder": self.train_text_encoder,
            "resolution": self.resolution,
            "sample_steps": self.sample_steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "mixed_precision": self.mixed_precision,
            "dino": encoders.dino,
            "clip": encoders.clip,
            "clip_tokenizer": encoders.clip_tokenizer,
            "lpips": encoders.lpips,
        })
    }

    pub fn instance_prompt(&self, s: &PaperSubject) -> String {
        format!("a photo of {} {}", self.identifier, s.class)
    }

    pub fn class_prompt(s: &PaperSubject) -> String {
        format!("a photo of {}", s.class)
    }
}

/// One subject's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubjectRow {
    pub subject: PaperSubject,
    pub train_seconds: f64,
    pub generate_seconds: f64,
    pub result: EvalResult,
    pub report: PathBuf,
}

/// The averaged table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PaperTable {
    pub subjects: usize,
    pub real_dino: Option<f64>,
    pub real_clip_i: Option<f64>,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    pub pres: Option<f64>,
    pub div: Option<f64>,
}

fn mean_opt(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.collect::<Option<Vec<f64>>>()?;
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

impl PaperTable {
    pub fn from_rows(rows: &[SubjectRow]) -> Self {
        let n = rows.len().max(1) as f64;
        let r = |f: &dyn Fn(&EvalResult) -> f64| rows.iter().map(|x| f(&x.result)).sum::<f64>() / n;
        Self {
            subjects: rows.len(),
            real_dino: mean_opt(rows.iter().map(|x| x.result.real.dino)),
            real_clip_i: mean_opt(rows.iter().map(|x| x.result.real.clip_i)),
            dino: r(&|e| e.scores.dino),
            clip_i: r(&|e| e.scores.clip_i),
            clip_t: r(&|e| e.scores.clip_t),
            pres: mean_opt(rows.iter().map(|x| x.result.scores.pres)),
            div: mean_opt(rows.iter().map(|x| x.result.scores.div)),
        }
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into())
}

/// The table shaped like the paper's Table 1 (+ PRES and DIV), in markdown.
pub fn table_markdown(t: &PaperTable, method: &str) -> String {
    let mut m = String::from(
        "| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | PRES ↓ | DIV ↑ |\n|---|---|---|---|---|---|\n",
    );
    let _ = writeln!(
        m,
        "| Real Images | {} | {} | N/A | | |",
        opt(t.real_dino),
        opt(t.real_clip_i)
    );
    let _ = writeln!(
        m,
        "| {method} | {:.3} | {:.3} | {:.3} | {} | {} |",
        t.dino,
        t.clip_i,
        t.clip_t,
        opt(t.pres),
        opt(t.div)
    );
    m
}

/// Per-subject rows in markdown.
pub fn subjects_markdown(rows: &[SubjectRow]) -> String {
    let mut m = String::from(
        "| subject | class | DINO | CLIP-I | CLIP-T | PRES | DIV | real DINO | real CLIP-I | train s |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let s = &r.result.scores;
        let _ = writeln!(
            m,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.0} |",
            r.subject.name,
            r.subject.class,
            s.dino,
            s.clip_i,
            s.clip_t,
            opt(s.pres),
            opt(s.div),
            opt(r.result.real.dino),
            opt(r.result.real.clip_i),
            r.train_seconds
        );
    }
    m
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Generates `n` images of `prompt` into `dir` (with their generation info) and returns them.
fn generate_into(
    model: &StableDiffusion,
    prompt: &str,
    n: usize,
    seed: u64,
    opts: &PaperOptions,
    dir: &Path,
    stem: &str,
) -> Result<Vec<LabeledImage>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut g = GenerateOptions::new(prompt, n);
    g.steps = opts.sample_steps;
    g.guidance_scale = opts.guidance;
    g.sampler = SamplerKind::Ddim;
    g.seed = seed;
    g.batch_size = n.clamp(1, 4);
    let out = generate(model, &g, &mut |_| {})?;
    let mut v = Vec::new();
    for (k, im) in out.images.into_iter().enumerate() {
        let path = dir.join(format!("{stem}-{k}.png"));
        save_generated(&path, &im.image, &im.info)?;
        v.push(LabeledImage {
            path,
            image: im.image,
            prompt: Some(prompt.to_string()),
        });
    }
    Ok(v)
}

/// Runs the protocol; `log` receives progress lines. Returns the rows and the
/// averaged table (also written to `out/paper.{md,json}` and `out/index.html`).
pub fn run_paper(
    opts: &PaperOptions,
    enc: &Encoders,
    command: &str,
    log: &mut dyn FnMut(&str),
) -> Result<(Vec<SubjectRow>, PaperTable)> {
    let ds = PaperDataset::load(&opts.dataset)?;
    let subjects = ds.select(&opts.subjects)?;
    let device = opts.device.clone();
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let settings = opts.settings(&enc.paths);
    let mut rows = Vec::new();
    for (si, s) in subjects.iter().enumerate() {
        let t0 = Instant::now();
        let sdir = opts.out.join(&s.name);
        let record = sdir.join(SUBJECT_RECORD);
        if !opts.redo
            && let Some(row) = reusable(&record, &settings, s)
        {
            log(&format!(
                "[{}/{}] {} ({}): done by an earlier run with these settings ({}; --redo trains it again)",
                si + 1,
                subjects.len(),
                s.name,
                s.class,
                record.display()
            ));
            rows.push(row);
            write_summary(opts, &rows, command)?;
            continue;
        }
        let cfg = TrainConfig {
            model: opts.model.clone(),
            instance_dir: ds.dir.join(&s.name),
            instance_prompt: opts.instance_prompt(s),
            class_prompt: Some(PaperOptions::class_prompt(s)),
            class_dir: Some(opts.out.join("class-images").join(slug(&s.class))),
            with_prior_preservation: true,
            num_class_images: opts.num_class_images,
            output_dir: sdir.join("run"),
            vae: opts.vae.clone(),
            prediction_type: opts.prediction_type.clone(),
            mixed_precision: opts.mixed_precision.clone(),
            resolution: opts.resolution,
            center_crop: true,
            random_flip: true,
            max_train_steps: opts.steps,
            learning_rate: opts.learning_rate,
            train_text_encoder: opts.train_text_encoder,
            checkpointing_steps: 0,
            seed: opts.seed,
            class_sampler: "ddim".into(),
            class_steps: opts.sample_steps,
            class_guidance: opts.guidance,
            sample_steps: opts.sample_steps,
            sample_guidance: opts.guidance,
            lora: opts.lora,
            lora_rank: opts.lora_rank,
            save_model: false,
            ..Default::default()
        };
        cfg.validate()?;
        log(&format!(
            "[{}/{}] {} ({}): training {} steps{}",
            si + 1,
            subjects.len(),
            s.name,
            s.class,
            opts.steps,
            if opts.lora { " (LoRA)" } else { "" }
        ));
        let model = load_model(&cfg, &device)?;
        let stop = AtomicBool::new(false);
        let mut log_line = |l: &str| log(&format!("  {l}"));
        let mut step_cb = |_: &StepInfo| {};
        let mut ev = Events {
            log: &mut log_line,
            step: &mut step_cb,
            stop: &stop,
        };
        train_model(&cfg, &model, &mut ev)?;
        let train_seconds = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut prompts = ds.prompts(s, &opts.identifier);
        if let Some(k) = opts.prompts_limit {
            prompts.truncate(k);
        }
        let gen_dir = sdir.join("generated");
        let mut generated = Vec::new();
        for (pi, p) in prompts.iter().enumerate() {
            let seed = opts.seed.wrapping_add(1000 * pi as u64);
            generated.extend(generate_into(
                &model,
                p,
                opts.images_per_prompt,
                seed,
                opts,
                &gen_dir,
                &format!("p{pi:02}"),
            )?);
        }
        let class_dir = sdir.join("class-generated");
        let class_generated = if opts.class_images_per_subject > 0 {
            generate_into(
                &model,
                &PaperOptions::class_prompt(s),
                opts.class_images_per_subject,
                opts.seed.wrapping_add(777),
                opts,
                &class_dir,
                "class",
            )?
        } else {
            Vec::new()
        };
        let generate_seconds = t1.elapsed().as_secs_f64();
        drop(model);

        let real_dir = ds.dir.join(&s.name);
        let real = read_images(&real_dir)?;
        let result = evaluate(
            enc,
            &EvalInputs {
                real_dir: &real_dir,
                real: &real,
                generated_dir: &gen_dir,
                generated: &generated,
                class_dir: (!class_generated.is_empty()).then_some(class_dir.as_path()),
                class_generated: &class_generated,
                identifier: &opts.identifier,
            },
        )?;
        let files = write_report(
            &sdir.join("report"),
            &result,
            &ReportImages {
                real: &real,
                generated: &generated,
                class_generated: &class_generated,
            },
            command,
        )?;
        log(&format!(
            "  DINO {:.3} CLIP-I {:.3} CLIP-T {:.3} PRES {} DIV {} (train {:.0}s, generate {:.0}s)",
            result.scores.dino,
            result.scores.clip_i,
            result.scores.clip_t,
            opt(result.scores.pres),
            opt(result.scores.div),
            train_seconds,
            generate_seconds
        ));
        let row = SubjectRow {
            subject: s.clone(),
            train_seconds,
            generate_seconds,
            result,
            report: files.html,
        };
        // The subject's record, then the partial table: an interrupted run
        // loses at most the subject it was on, and a rerun starts there.
        let json = serde_json::to_string_pretty(&serde_json::json!({
            "settings": settings,
            "row": row,
        }))
        .map_err(|e| Error::msg(format!("serializing {}: {e}", record.display())))?;
        write_atomic(&record, json.as_bytes())?;
        rows.push(row);
        write_summary(opts, &rows, command)?;
    }
    let table = PaperTable::from_rows(&rows);
    Ok((rows, table))
}

/// The file in a subject's folder that records its finished row and the
/// settings it was made with.
pub const SUBJECT_RECORD: &str = "subject.json";

/// The row of `record` when it exists, parses, was made with `settings` for
/// this subject and its report is still there; `None` otherwise (the subject
/// is trained again).
fn reusable(record: &Path, settings: &serde_json::Value, s: &PaperSubject) -> Option<SubjectRow> {
    #[derive(Deserialize)]
    struct Record {
        settings: serde_json::Value,
        row: SubjectRow,
    }
    let text = std::fs::read_to_string(record).ok()?;
    let r: Record = serde_json::from_str(&text).ok()?;
    (r.settings == *settings && r.row.subject.name == s.name && r.row.report.is_file())
        .then_some(r.row)
}

/// The method's name in the table.
pub fn method_name(opts: &PaperOptions) -> String {
    let model = opts
        .model
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tiny-model".into());
    format!(
        "DreamBooth ({model}, {}{})",
        if opts.lora {
            format!("LoRA r{}", opts.lora_rank)
        } else {
            "full fine-tune".into()
        },
        if opts.train_text_encoder {
            " + text encoder"
        } else {
            ""
        }
    )
}

/// Writes `paper.md`, `paper.json` and `index.html` for the rows so far.
pub fn write_summary(opts: &PaperOptions, rows: &[SubjectRow], command: &str) -> Result<()> {
    let table = PaperTable::from_rows(rows);
    let method = method_name(opts);
    let mut md = String::from("# DreamBooth paper protocol\n\n");
    let _ = writeln!(md, "```sh\n{command}\n```\n");
    let _ = writeln!(
        md,
        "{} subject(s), {} image(s) per prompt, {} steps at lr {:e}; the identifier `{}` is removed from prompts for CLIP-T.\n",
        rows.len(),
        opts.images_per_prompt,
        opts.steps,
        opts.learning_rate,
        opts.identifier
    );
    md.push_str(&table_markdown(&table, &method));
    md.push_str("\n## Per subject\n\n");
    md.push_str(&subjects_markdown(rows));
    write_atomic(&opts.out.join("paper.md"), md.as_bytes())?;
    let mut by_class: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *by_class.entry(r.subject.class.as_str()).or_default() += 1;
    }
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "command": command,
        "method": method,
        "table": table,
        "subjects_per_class": by_class,
        "rows": rows,
    }))
    .map_err(|e| Error::msg(format!("serializing the paper table: {e}")))?;
    write_atomic(&opts.out.join("paper.json"), json.as_bytes())?;
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=utf-8><title>dreambooth bench paper</title><style>\
         body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:4px 8px}\
         th{background:#f4f4f4}</style></head><body><h1>DreamBooth paper protocol</h1>",
    );
    let _ = write!(h, "<p><code>{}</code></p>", html_escape(command));
    let _ = write!(
        h,
        "<table><tr><th>Method</th><th>DINO</th><th>CLIP-I</th><th>CLIP-T</th><th>PRES</th><th>DIV</th></tr>\
         <tr><td>Real Images</td><td>{}</td><td>{}</td><td>N/A</td><td></td><td></td></tr>\
         <tr><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr></table>\
         <h2>Subjects</h2><table><tr><th>subject</th><th>class</th><th>DINO</th><th>CLIP-I</th>\
         <th>CLIP-T</th><th>PRES</th><th>DIV</th></tr>",
        opt(table.real_dino),
        opt(table.real_clip_i),
        html_escape(&method),
        table.dino,
        table.clip_i,
        table.clip_t,
        opt(table.pres),
        opt(table.div)
    );
    for r in rows {
        let s = &r.result.scores;
        let rel = r
            .report
            .strip_prefix(&opts.out)
            .unwrap_or(&r.report)
            .display()
            .to_string();
        let _ = write!(
            h,
            "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&rel),
            html_escape(&r.subject.name),
            html_escape(&r.subject.class),
            s.dino,
            s.clip_i,
            s.clip_t,
            opt(s.pres),
            opt(s.div)
        );
    }
    h.push_str("</table></body></html>");
    write_atomic(&opts.out.join("index.html"), h.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_python_template_lines() {
        assert_eq!(
            parse_template("'a {0} {1} in the jungle'.format(unique_token, class_token),"),
            Some("a {0} {1} in the jungle".to_string())
        );
        assert_eq!(parse_template("prompt_list = ["), None);
        assert_eq!(parse_template("]"), None);
    }
}
