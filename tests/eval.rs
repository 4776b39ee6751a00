//! `dreambooth eval` and `bench paper` end to end on the tiny random-weight
//! encoder fixtures (tests/fixtures/encoders, tests/fixtures/lpips) and the
//! bundled tiny model: the numbers are those of random encoders, so these tests
//! check the plumbing and the metric definitions on constructed cases.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use dreambooth::eval::paper::{PaperDataset, PaperOptions, run_paper};
use dreambooth::eval::report::{ReportImages, write_report};
use dreambooth::eval::run::{
    EncoderPaths, Encoders, EvalInputs, LabeledImage, evaluate, read_generated, read_images,
};
use dreambooth::image_io::save_png;
use dreambooth::toy::world::{self, Subject};
use image::RgbImage;

fn encoder_paths(lpips: bool) -> EncoderPaths {
    let f = common::fixtures();
    EncoderPaths {
        dino: f.join("encoders/dino"),
        clip: f.join("encoders/clip"),
        clip_tokenizer: Some(f.join("tiny-sd1/tokenizer")),
        lpips: lpips.then(|| f.join("lpips/alex.safetensors")),
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dreambooth-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn photos(subject: Subject, n: usize, seed: u64) -> Vec<RgbImage> {
    world::subject_photos(subject, n, seed)
        .into_iter()
        .map(|(_, im)| im)
        .collect()
}

fn labeled(dir: &Path, images: &[RgbImage], prompt: Option<&str>) -> Vec<LabeledImage> {
    images
        .iter()
        .enumerate()
        .map(|(i, im)| LabeledImage {
            path: dir.join(format!("{i}.png")),
            image: im.clone(),
            prompt: prompt.map(str::to_string),
        })
        .collect()
}

#[test]
fn identical_images_score_one_and_the_identifier_is_removed() {
    let enc = Encoders::load(&encoder_paths(true), &Device::Cpu).unwrap();
    let one = photos(Subject::SpotBall, 1, 3);
    let dir = PathBuf::from("x");
    let real = labeled(&dir, &one, None);
    // Two copies of the single real image: every (generated, real) pair is identical.
    let generated = labeled(
        &dir,
        &[one[0].clone(), one[0].clone()],
        Some("a sks ball on the beach"),
    );
    let r = evaluate(
        &enc,
        &EvalInputs {
            real_dir: &dir,
            real: &real,
            generated_dir: &dir,
            generated: &generated,
            class_dir: None,
            class_generated: &[],
            identifier: "sks",
        },
    )
    .unwrap();
    assert!((r.scores.dino - 1.0).abs() < 1e-5, "DINO {}", r.scores.dino);
    assert!(
        (r.scores.clip_i - 1.0).abs() < 1e-5,
        "CLIP-I {}",
        r.scores.clip_i
    );
    assert_eq!(r.prompts.len(), 1);
    assert_eq!(r.prompts[0].clip_t_text, "a ball on the beach");
    // Identical images: LPIPS 0, so DIV 0.
    assert!(r.scores.div.unwrap().abs() < 1e-6);
    // CLIP-T equals the cosine of the image and the identifier-free prompt.
    let img = enc.clip_image_embeds(&one).unwrap();
    let txt = enc
        .clip_text_embeds(&["a ball on the beach".to_string()])
        .unwrap();
    let want = dreambooth::eval::metrics::rowwise_cosine(&img, &txt).unwrap()[0];
    assert!((r.scores.clip_t - want).abs() < 1e-6);
    // The real row needs two photos.
    assert!(r.real.dino.is_none());
}

#[test]
fn without_lpips_div_is_unavailable_and_image_means_agree() {
    let enc = Encoders::load(&encoder_paths(false), &Device::Cpu).unwrap();
    let dir = PathBuf::from("x");
    let real = labeled(&dir, &photos(Subject::SpotBall, 3, 1), None);
    let same = labeled(&dir, &photos(Subject::SpotBall, 2, 9), Some("p"));
    let other = labeled(&dir, &photos(Subject::StripeBox, 2, 9), Some("p"));
    let score = |g: &[LabeledImage]| {
        evaluate(
            &enc,
            &EvalInputs {
                real_dir: &dir,
                real: &real,
                generated_dir: &dir,
                generated: g,
                class_dir: None,
                class_generated: &[],
                identifier: "sks",
            },
        )
        .unwrap()
    };
    let (a, b) = (score(&same), score(&other));
    // (Random-weight encoders: no claim which set scores higher.)
    // Without LPIPS weights DIV is reported unavailable, not substituted.
    assert!(a.scores.div.is_none());
    assert!(a.div_note.as_deref().unwrap().contains("unavailable"));
    // Per-image means average to the headline figure.
    let m = a.images.iter().map(|i| i.dino).sum::<f64>() / a.images.len() as f64;
    assert!((m - a.scores.dino).abs() < 1e-9);
    assert!(a.real.dino.is_some() && a.real.clip_i.is_some());
    assert!(a.scores.dino.is_finite() && b.scores.dino.is_finite());
}

#[test]
fn eval_reads_prompts_writes_reports_and_rejects_bad_inputs() {
    let root = tmp("io");
    let (real_dir, gen_dir) = (root.join("real"), root.join("gen"));
    std::fs::create_dir_all(&real_dir).unwrap();
    std::fs::create_dir_all(&gen_dir).unwrap();
    for (i, im) in photos(Subject::DotStar, 3, 2).iter().enumerate() {
        save_png(&real_dir.join(format!("r{i}.png")), im, &[]).unwrap();
    }
    for (i, im) in photos(Subject::DotStar, 4, 5).iter().enumerate() {
        save_png(&gen_dir.join(format!("g{i}.png")), im, &[]).unwrap();
    }
    // No prompt metadata and no --prompts: a clear error naming the file.
    let e = read_generated(&gen_dir, None).unwrap_err().to_string();
    assert!(e.contains("g0.png") && e.contains("--prompts"), "{e}");
    // One prompt per line, sorted order; count must match.
    let pf = root.join("prompts.txt");
    std::fs::write(&pf, "a sks star\na sks star\na red sks star\n").unwrap();
    let e = read_generated(&gen_dir, Some(&pf)).unwrap_err().to_string();
    assert!(e.contains("3 prompts") && e.contains("4 images"), "{e}");
    std::fs::write(
        &pf,
        "g0.png\ta sks star\ng1.png\ta sks star\ng2.png\ta red sks star\ng3.png\ta red sks star\n",
    )
    .unwrap();
    let generated = read_generated(&gen_dir, Some(&pf)).unwrap();
    assert_eq!(generated[2].prompt.as_deref(), Some("a red sks star"));
    std::fs::write(
        &pf,
        "g0.png\ta\ng1.png\tb\ng2.png\tc\ng3.png\td\nzz.png\te\n",
    )
    .unwrap();
    let e = read_generated(&gen_dir, Some(&pf)).unwrap_err().to_string();
    assert!(e.contains("zz.png"), "{e}");

    let real = read_images(&real_dir).unwrap();
    let enc = Encoders::load(&encoder_paths(true), &Device::Cpu).unwrap();
    let r = evaluate(
        &enc,
        &EvalInputs {
            real_dir: &real_dir,
            real: &real,
            generated_dir: &gen_dir,
            generated: &generated,
            class_dir: Some(&gen_dir),
            class_generated: &generated,
            identifier: "sks",
        },
    )
    .unwrap();
    assert_eq!(r.prompts.len(), 2);
    assert!(r.scores.pres.is_some() && r.scores.div.is_some() && r.scores.div_class.is_some());
    let out = root.join("report");
    let files = write_report(
        &out,
        &r,
        &ReportImages {
            real: &real,
            generated: &generated,
            class_generated: &generated,
        },
        "dreambooth eval ...",
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files.json).unwrap()).unwrap();
    assert_eq!(json["result"]["images"].as_array().unwrap().len(), 4);
    let html = std::fs::read_to_string(&files.html).unwrap();
    assert_eq!(html.matches("<img").count(), 3 + 4 + 4);
    assert!(
        std::fs::read_to_string(&files.markdown)
            .unwrap()
            .contains("| a red sks star | 2 |")
    );

    // Odd sizes: too small, and a sliver.
    let bad = root.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    save_png(&bad.join("tiny.png"), &RgbImage::new(8, 8), &[]).unwrap();
    let e = read_images(&bad).unwrap_err().to_string();
    assert!(e.contains("tiny.png") && e.contains("too small"), "{e}");
    std::fs::remove_file(bad.join("tiny.png")).unwrap();
    save_png(&bad.join("sliver.png"), &RgbImage::new(400, 20), &[]).unwrap();
    let e = read_images(&bad).unwrap_err().to_string();
    assert!(e.contains("sliver.png") && e.contains("aspect"), "{e}");

    // Encoders of the wrong architecture.
    let f = common::fixtures();
    let mut p = encoder_paths(false);
    p.dino = f.join("encoders/clip");
    let e = Encoders::load(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("DINO") && e.contains("encoders/clip"), "{e}");
    let mut p = encoder_paths(false);
    p.clip = f.join("encoders/dino");
    let e = Encoders::load(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("CLIP") && e.contains("encoders/dino"), "{e}");
    let mut p = encoder_paths(false);
    p.lpips = Some(f.join("encoders/clip/model.safetensors"));
    let e = Encoders::load(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("LPIPS"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A miniature DreamBooth dataset in the real one's format, from toy photos.
fn mini_dataset(root: &Path) -> PathBuf {
    let ds = root.join("dataset");
    for (name, subject) in [
        ("spot_ball", Subject::SpotBall),
        ("puppy", Subject::StripeBox),
    ] {
        let d = ds.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (i, im) in photos(subject, 3, 4).iter().enumerate() {
            save_png(&d.join(format!("{i:02}.png")), im, &[]).unwrap();
        }
    }
    let text = "Classes\n\nsubject_name,class\nspot_ball,ball\npuppy,dog\n\nPrompts\n\nObject Prompts\n\n\
                prompt_list = [\n'a {0} {1} in the snow'.format(unique_token, class_token),\n\
                'a red {0} {1}'.format(unique_token, class_token),\n'a {0} {1} on the beach'.format(unique_token, class_token)\n]\n\n\
                Live Subject Prompts\n\nprompt_list = [\n'a {0} {1} wearing a red hat'.format(unique_token, class_token),\n\
                'a {0} {1} on the beach'.format(unique_token, class_token)\n]\n";
    std::fs::write(ds.join("prompts_and_classes.txt"), text).unwrap();
    ds
}

#[test]
fn bench_paper_runs_end_to_end_on_the_tiny_model() {
    let root = tmp("paper");
    let ds_dir = mini_dataset(&root);
    let ds = PaperDataset::load(&ds_dir).unwrap();
    assert_eq!(ds.subjects.len(), 2);
    assert!(ds.subjects[1].live && !ds.subjects[0].live);
    assert_eq!(
        ds.prompts(&ds.subjects[1], "sks"),
        vec!["a sks dog wearing a red hat", "a sks dog on the beach"]
    );
    let enc = Encoders::load(&encoder_paths(true), &Device::Cpu).unwrap();
    let opts = PaperOptions {
        dataset: ds_dir.clone(),
        model: None,
        lora: false,
        lora_rank: 4,
        subjects: vec![],
        identifier: "sks".into(),
        images_per_prompt: 2,
        prompts_limit: Some(2),
        class_images_per_subject: 2,
        steps: 2,
        learning_rate: 5e-5,
        num_class_images: 2,
        train_text_encoder: false,
        resolution: None,
        sample_steps: 2,
        guidance: 5.0,
        seed: 0,
        out: root.join("out"),
        ..Default::default()
    };
    let mut log = Vec::new();
    let (rows, table) = run_paper(&opts, &enc, "dreambooth bench paper ...", &mut |l| {
        log.push(l.to_string())
    })
    .unwrap();
    assert!(!log.iter().any(|l| l.contains("earlier run")), "{log:?}");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].result.images.len(), 4);
    assert_eq!(table.subjects, 2);
    for v in [
        table.dino,
        table.clip_i,
        table.clip_t,
        table.pres.unwrap(),
        table.div.unwrap(),
    ] {
        assert!(v.is_finite());
    }
    let md = std::fs::read_to_string(opts.out.join("paper.md")).unwrap();
    assert!(
        md.contains("| Real Images |") && md.contains("DreamBooth (tiny-model, full fine-tune)")
    );
    assert!(opts.out.join("spot_ball/report/index.html").is_file());
    assert!(opts.out.join("puppy/generated/p01-1.png").is_file());

    // A second run with the same settings reuses both subjects' records; one
    // with other settings, or --redo, trains again.
    let rerun = |o: &PaperOptions| {
        let mut log = Vec::new();
        let (rows, _) = run_paper(o, &enc, "dreambooth bench paper ...", &mut |l| {
            log.push(l.to_string())
        })
        .unwrap();
        let reused = log.iter().filter(|l| l.contains("earlier run")).count();
        (rows, reused)
    };
    let (again, reused) = rerun(&opts);
    assert_eq!(reused, 2);
    assert_eq!(again.len(), 2);
    for (a, b) in again.iter().zip(&rows) {
        assert_eq!(a.subject.name, b.subject.name);
        assert_eq!(a.result.scores.dino, b.result.scores.dino);
        assert_eq!(a.result.images.len(), b.result.images.len());
    }
    let md_again = std::fs::read_to_string(opts.out.join("paper.md")).unwrap();
    assert_eq!(md_again, md);
    let mut other = opts.clone();
    other.subjects = vec!["puppy".into()];
    other.steps = 3;
    assert_eq!(rerun(&other).1, 0);
    // Puppy's record now holds the 3-step settings: the 2-step run trains it again.
    let mut back = opts.clone();
    back.subjects = vec!["puppy".into()];
    assert_eq!(rerun(&back).1, 0);
    let mut redo = opts.clone();
    redo.subjects = vec!["spot_ball".into()];
    redo.redo = true;
    assert_eq!(rerun(&redo).1, 0);
    // A damaged record is not reused.
    std::fs::write(opts.out.join("spot_ball/subject.json"), "{").unwrap();
    let mut one = opts.clone();
    one.subjects = vec!["spot_ball".into()];
    assert_eq!(rerun(&one).1, 0);
    // A subject that is not in the dataset.
    let mut bad = opts.clone();
    bad.subjects = vec!["unicorn".into()];
    let e = run_paper(&bad, &enc, "", &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("unicorn") && e.contains("spot_ball"), "{e}");
    // Not a dataset folder.
    let e = PaperDataset::load(&root).unwrap_err().to_string();
    assert!(e.contains("prompts_and_classes.txt"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}
