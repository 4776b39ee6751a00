//! The toy world's model metrics on constructed cases: rendered ground truth
//! scores (nearly) perfectly, mismatched images score low, subject metrics
//! tell subject photos from plain objects and catch "language drift", and
//! both metrics run end to end on a random-weight model.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use dreambooth::diffusion::SamplerKind;
use dreambooth::models::{LoadOptions, StableDiffusion};
use dreambooth::toy::metrics::{
    self, PromptFidelity, PromptRole, PromptSpec, SampleSettings, SubjectEvalOptions, SubjectPrompt,
};
use dreambooth::toy::world::{
    self, Class, Color, Context, Paint, Scene, Subject, ToyRng, derive_seed,
};
use image::RgbImage;

/// A rendered scene that shows everything `spec` names (unnamed attributes
/// drawn at random, colours only where the world draws them).
fn matching_scene(spec: &PromptSpec, seed: u64) -> Scene {
    let mut rng = ToyRng::new(seed);
    let context = spec.context.unwrap_or_else(|| {
        let ok: Vec<Context> = Context::ALL
            .into_iter()
            .filter(|c| spec.color.is_none_or(|col| col.allowed_in(*c)))
            .collect();
        ok[rng.below(ok.len())]
    });
    let color = spec.color.unwrap_or_else(|| {
        let ok = Color::allowed(context);
        ok[rng.below(ok.len())]
    });
    Scene::placed(context, spec.class.unwrap(), Paint::Plain(color), seed)
}

/// A scene that differs from `spec` in every attribute it names.
fn mismatched_scene(spec: &PromptSpec, seed: u64) -> Scene {
    let mut rng = ToyRng::new(seed);
    let other = |n: usize, i: Option<usize>, rng: &mut ToyRng| loop {
        let k = rng.below(n);
        if Some(k) != i {
            break k;
        }
    };
    let class = Class::ALL[other(6, spec.class.map(|c| c.index()), &mut rng)];
    loop {
        let context = Context::ALL[other(6, spec.context.map(|c| c.index()), &mut rng)];
        let colors: Vec<Color> = Color::allowed(context)
            .into_iter()
            .filter(|c| Some(*c) != spec.color)
            .collect();
        if !colors.is_empty() {
            let color = colors[rng.below(colors.len())];
            return Scene::placed(context, class, Paint::Plain(color), seed);
        }
    }
}

#[test]
fn world_prompts_cover_the_world() {
    let all = metrics::world_prompts(None, 0);
    let full: usize = Context::ALL
        .iter()
        .map(|c| 6 * Color::allowed(*c).len())
        .sum();
    assert_eq!(all.len(), full + 60 + 36 + 6);
    let mut texts: Vec<&str> = all.iter().map(|p| p.prompt.as_str()).collect();
    texts.sort_unstable();
    texts.dedup();
    assert_eq!(texts.len(), all.len(), "prompts are distinct");
    for p in &all {
        assert!(p.prompt.starts_with("a photo of "), "{}", p.prompt);
        assert!(p.prompt.contains(p.class.unwrap().noun()));
        if let Some(c) = p.color {
            assert!(p.prompt.contains(c.name()));
        }
        if let Some(c) = p.context {
            assert!(p.prompt.ends_with(c.phrase()));
        }
    }
    assert!(
        all.iter()
            .any(|p| p.prompt == "a photo of a red ball on the beach")
    );

    let a = metrics::world_prompts(Some(60), 3);
    assert_eq!(a, metrics::world_prompts(Some(60), 3), "seeded");
    assert_ne!(a, metrics::world_prompts(Some(60), 4));
    assert_eq!(a.len(), 60);
    let mut t: Vec<&str> = a.iter().map(|p| p.prompt.as_str()).collect();
    t.sort_unstable();
    t.dedup();
    assert_eq!(t.len(), 60, "a sample has no repeats");
    let count = |f: &dyn Fn(&PromptSpec) -> bool| a.iter().filter(|p| f(p)).count();
    assert_eq!(count(&|p| p.color.is_some() && p.context.is_some()), 32);
    assert_eq!(count(&|p| p.color.is_some() && p.context.is_none()), 11);
    assert_eq!(count(&|p| p.color.is_none() && p.context.is_some()), 11);
    assert_eq!(count(&|p| p.color.is_none() && p.context.is_none()), 6);
    let bare = count(&|p| !p.prompt.starts_with("a photo of"));
    assert!(bare > 3 && bare < 25, "{bare} prompts without 'a photo of'");
    assert_eq!(metrics::world_prompts(Some(10_000), 0).len(), all.len());
    for n in 0..12 {
        assert_eq!(metrics::world_prompts(Some(n), 1).len(), n);
    }
}

#[test]
fn ground_truth_scores_near_perfect_and_mismatches_low() {
    let specs = metrics::world_prompts(None, 0);
    let pairs: Vec<(PromptSpec, RgbImage)> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), world::render(&matching_scene(s, i as u64))))
        .collect();
    let good = PromptFidelity::from_images(pairs);
    println!(
        "ground truth:\n{}{}",
        good.table(),
        good.confusion_summary(3)
    );
    assert_eq!(good.images, specs.len());
    assert_eq!(good.prompts, specs.len());
    assert_eq!(good.class.total, specs.len());
    assert_eq!(
        good.context.total,
        specs.iter().filter(|s| s.context.is_some()).count()
    );
    assert_eq!(
        good.color.total,
        specs.iter().filter(|s| s.color.is_some()).count()
    );
    for r in [
        good.context,
        good.class,
        good.color,
        good.all,
        good.object_found,
    ] {
        assert_eq!(r.correct, r.total, "{r:?}");
    }
    // the confusion matrices hold every checked image, mostly on the diagonal
    let diag = |c: &metrics::Confusion| -> (usize, usize) {
        let total = c.counts.iter().flatten().sum();
        let d = (0..c.prompted.len()).map(|i| c.counts[i][i]).sum();
        (d, total)
    };
    assert_eq!(
        diag(&good.class_confusion),
        (good.class.correct, good.class.total)
    );
    assert_eq!(
        diag(&good.color_confusion),
        (good.color.correct, good.color.total)
    );
    assert_eq!(
        diag(&good.context_confusion),
        (good.context.correct, good.context.total)
    );

    let pairs: Vec<(PromptSpec, RgbImage)> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                s.clone(),
                world::render(&mismatched_scene(s, 1000 + i as u64)),
            )
        })
        .collect();
    let bad = PromptFidelity::from_images(pairs);
    println!("mismatched:\n{}{}", bad.table(), bad.confusion_summary(3));
    for r in [bad.context, bad.class, bad.color, bad.all] {
        assert!(r.value().unwrap() <= 0.05, "{r:?}");
    }
    assert!(bad.object_found.value().unwrap() >= 0.97);
    assert!(!bad.class_confusion.top_mistakes(3).is_empty());

    let grid = good.grid(5, 1);
    assert_eq!(grid.height(), 5 * (64 + 4 + 2 + 4) + 4);
}

#[test]
fn judge_checks_only_named_attributes() {
    let scene = Scene::placed(Context::Snow, Class::Cone, Paint::Plain(Color::Red), 5);
    let r = dreambooth::toy::oracle::read(&world::render(&scene));
    let v = metrics::judge(&PromptSpec::new(false, None, None, Class::Cone, None), &r);
    assert_eq!((v.context, v.class, v.color), (None, Some(true), None));
    assert!(v.all());
    let v = metrics::judge(
        &PromptSpec::new(
            true,
            None,
            Some(Color::Blue),
            Class::Cone,
            Some(Context::Snow),
        ),
        &r,
    );
    assert_eq!(
        (v.context, v.class, v.color),
        (Some(true), Some(true), Some(false))
    );
    assert!(!v.all());
}

#[test]
fn oracle_accuracy_on_fresh_scenes() {
    let acc = metrics::oracle_accuracy(200, 0);
    println!("{}", acc.table());
    assert_eq!(acc.images, 200);
    for r in [acc.context, acc.class, acc.color] {
        assert_eq!(r.total, 200);
        assert!(r.value().unwrap() >= 0.95, "{r:?}");
    }
    let img = world::render(&world::World::sample(3));
    assert_eq!(metrics::degrade(&img, 0.0, 0.0, 0.0, 1), img);
    assert_ne!(metrics::degrade(&img, 1.0, 0.0, 0.0, 1), img);
    let d = metrics::oracle_accuracy_degraded(100, 0, 1.0, 6.0, 15.0);
    assert!(d.all.value().unwrap() >= 0.95, "{}", d.summary());
    for c in metrics::oracle_subject_check(6, 0) {
        assert!(c.photo_fidelity > 0.7 && c.plain_fidelity < 0.4, "{c:?}");
        assert!(c.photo_likeness > 0.9 && c.plain_likeness < 0.1, "{c:?}");
    }
}

/// Images for subject prompts: the subject (in the prompt's context), or a
/// plain object of its class, per role.
fn subject_groups(
    subject: Subject,
    prompts: &[SubjectPrompt],
    show_subject: &dyn Fn(PromptRole) -> bool,
    per_prompt: usize,
) -> Vec<(SubjectPrompt, Vec<RgbImage>)> {
    prompts
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let images = (0..per_prompt as u64)
                .map(|i| {
                    let seed = derive_seed(k as u64, i);
                    let mut scene = matching_scene(&p.spec, seed);
                    if show_subject(p.role) {
                        scene.paint = Paint::Subject(subject);
                        if p.spec.context.is_none() {
                            scene.context = subject.photo_contexts()[0];
                        }
                    }
                    world::render(&scene)
                })
                .collect();
            (p.clone(), images)
        })
        .collect()
}

#[test]
fn subject_metrics_tell_a_learned_subject_from_drift() {
    let subject = Subject::SpotBall;
    let opts = SubjectEvalOptions::default();
    let prompts = metrics::subject_prompts(subject, "sks", "ball", &opts);
    let texts: Vec<&str> = prompts.iter().map(|p| p.spec.prompt.as_str()).collect();
    assert_eq!(texts[0], "a photo of a sks ball");
    assert!(texts.contains(&"a sks ball in the snow"));
    assert!(texts.contains(&"a red sks ball"));
    assert!(texts.contains(&"a white sks ball"));
    assert_eq!(*texts.last().unwrap(), "a photo of a ball");
    assert_eq!(prompts.len(), 1 + 6 + 4 + 1);
    let reference: Vec<RgbImage> = world::subject_photos(subject, 4, 9)
        .into_iter()
        .map(|(_, im)| im)
        .collect();

    // the ideal DreamBooth model: the subject where the identifier is, its
    // colour changed on request, plain balls for the class prompt
    let ideal = subject_groups(
        subject,
        &prompts,
        &|r| matches!(r, PromptRole::Subject | PromptRole::Context),
        3,
    );
    let good = metrics::score_subject(subject, "sks", "ball", ideal, &reference);
    println!("{}", serde_json::to_string(&good).unwrap());
    assert!(good.fidelity > 0.7, "{}", good.fidelity);
    assert!(good.likeness > 0.9 && good.similarity > 0.6);
    assert_eq!(good.context.total, 6 * 3);
    assert_eq!(good.color.total, 4 * 3);
    assert_eq!(good.class.total, 11 * 3);
    assert!(good.context.value().unwrap() >= 0.95);
    assert!(good.color.value().unwrap() >= 0.9);
    assert!(good.class.value().unwrap() >= 0.95);
    assert!(good.pres < 0.1, "{}", good.pres);
    assert!(good.div > 0.05 && good.div_class > 0.05);

    // a drifted model: the identifier draws plain balls, the class prompt
    // draws the subject
    let drifted = subject_groups(subject, &prompts, &|r| matches!(r, PromptRole::Prior), 3);
    let bad = metrics::score_subject(subject, "sks", "ball", drifted, &reference);
    assert!(bad.fidelity < 0.4, "{}", bad.fidelity);
    assert!(bad.likeness < 0.1 && bad.similarity < good.similarity - 0.2);
    assert!(bad.pres > 0.9, "{}", bad.pres);
    assert!(bad.pres_similarity > good.pres_similarity + 0.2);

    // a collapsed model: one image for every seed
    let same: Vec<(SubjectPrompt, Vec<RgbImage>)> = subject_groups(
        subject,
        &prompts,
        &|r| matches!(r, PromptRole::Subject | PromptRole::Context),
        1,
    )
    .into_iter()
    .map(|(p, imgs)| (p, vec![imgs[0].clone(); 3]))
    .collect();
    let collapsed = metrics::score_subject(subject, "sks", "ball", same, &reference);
    assert_eq!((collapsed.div, collapsed.div_class), (0.0, 0.0));
}

fn tiny_sd1() -> StableDiffusion {
    StableDiffusion::load(
        &common::fixtures().join("tiny-sd1"),
        &Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap()
}

fn quick() -> SampleSettings {
    SampleSettings {
        images_per_prompt: 2,
        seed: 1,
        sampler: SamplerKind::Ddim,
        steps: 2,
        guidance: 5.0,
        batch_size: 8,
    }
}

#[test]
fn metrics_run_end_to_end_on_a_random_model() {
    let model = tiny_sd1();
    let prompts = metrics::world_prompts(Some(5), 0);
    let mut steps = 0;
    let r = metrics::prompt_fidelity(&model, &prompts, &quick(), &mut |_| steps += 1).unwrap();
    assert_eq!(steps, 2 * 2, "10 images in 2 batches of 2 steps");
    assert_eq!((r.prompts, r.images), (5, 10));
    let seeds: Vec<u64> = r.items.iter().map(|j| j.seed.unwrap()).collect();
    assert_eq!(seeds, (1..11).collect::<Vec<u64>>());
    assert_eq!(r.items[1].spec, prompts[0]);
    assert_eq!(r.items[2].spec, prompts[1]);
    assert_eq!(r.class.total, 10);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["items"].as_array().unwrap().len(), 10);
    assert!(json["class"]["rate"].is_number());
    let _ = r.grid(16, 2);

    let opts = SubjectEvalOptions {
        contexts: vec![Context::Beach],
        colors: vec![Color::Red],
        class_images: 2,
        reference: Vec::new(),
    };
    let s = metrics::subject_metrics(
        &model,
        Subject::DotStar,
        "sks",
        "star",
        &opts,
        &quick(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(s.prompts.len(), 4);
    assert_eq!(s.prompts.iter().map(|p| p.images).sum::<usize>(), 8);
    assert!((0.0..=1.0).contains(&s.fidelity) && (0.0..=1.0).contains(&s.pres));
    assert!(s.div > 0.0, "different seeds give different images");

    let c = metrics::vae_ceiling(&model, 3, 0).unwrap();
    assert_eq!((c.images, c.class.total, c.context.total), (3, 3, 3));

    let mut bad = quick();
    bad.images_per_prompt = 0;
    assert!(metrics::prompt_fidelity(&model, &prompts, &bad, &mut |_| {}).is_err());
}

fn tmp(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("toy_metrics")
        .join(name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn eval_and_oracle_check_commands() {
    let out = tmp("eval");
    let o = Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["toy", "eval", "--model"])
        .arg(common::fixtures().join("tiny-sd1"))
        .args(["--prompts", "3", "--steps", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("context") && stdout.contains("color"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("prompt_fidelity.json")).unwrap()).unwrap();
    assert_eq!(json["result"]["images"], 6);
    assert_eq!(json["settings"]["sampler"], "ddim");
    assert!(image::open(out.join("grid.png")).is_ok());

    let o = Command::new(env!("CARGO_BIN_EXE_dreambooth"))
        .args(["toy", "oracle-check", "--n", "30"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("30 fresh scenes") && stdout.contains("spot_ball"),
        "{stdout}"
    );
}
