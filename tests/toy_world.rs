//! The toy world and its oracle: determinism, captions, oracle accuracy on
//! clean and degraded scenes, subject fidelity, diversity.

use dreambooth::toy::oracle::{self, Reading};
use dreambooth::toy::world::{
    self, Class, Color, Context, Paint, SIZE, Scene, Subject, ToyRng, World,
};
use image::{Rgb, RgbImage};

/// Gaussian blur (separable, σ in px), then gaussian noise (σ in 0..255) and
/// a per-channel colour shift, all deterministic from `seed`.
fn degrade(img: &RgbImage, blur: f32, noise: f32, shift: f32, seed: u64) -> RgbImage {
    let n = SIZE as isize;
    let r = (3.0 * blur).ceil() as isize;
    let kernel: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * blur * blur)).exp())
        .collect();
    let ks: f32 = kernel.iter().sum();
    let src: Vec<[f32; 3]> = img
        .pixels()
        .map(|p| [p.0[0] as f32, p.0[1] as f32, p.0[2] as f32])
        .collect();
    let pass = |src: &[[f32; 3]], horizontal: bool| -> Vec<[f32; 3]> {
        let mut out = vec![[0f32; 3]; src.len()];
        for y in 0..n {
            for x in 0..n {
                let mut acc = [0f32; 3];
                for (t, w) in (-r..=r).zip(&kernel) {
                    let (xx, yy) = if horizontal {
                        ((x + t).clamp(0, n - 1), y)
                    } else {
                        (x, (y + t).clamp(0, n - 1))
                    };
                    let p = src[(yy * n + xx) as usize];
                    for k in 0..3 {
                        acc[k] += w * p[k] / ks;
                    }
                }
                out[(y * n + x) as usize] = acc;
            }
        }
        out
    };
    let blurred = if blur > 0.0 {
        pass(&pass(&src, true), false)
    } else {
        src
    };
    let mut rng = ToyRng::new(seed);
    let offset = [
        rng.range(-shift, shift),
        rng.range(-shift, shift),
        rng.range(-shift, shift),
    ];
    let mut out = RgbImage::new(SIZE as u32, SIZE as u32);
    for (i, p) in blurred.iter().enumerate() {
        let mut q = [0u8; 3];
        for k in 0..3 {
            q[k] = (p[k] + offset[k] + noise * rng.normal())
                .round()
                .clamp(0.0, 255.0) as u8;
        }
        out.put_pixel((i % SIZE) as u32, (i / SIZE) as u32, Rgb(q));
    }
    out
}

#[derive(Default)]
struct Tally {
    n: usize,
    context: usize,
    class: usize,
    color: usize,
    class_confusion: [[usize; 6]; 6],
    context_confusion: [[usize; 6]; 6],
    color_errors: Vec<(Color, Option<Color>, Context)>,
}

impl Tally {
    fn add(&mut self, scene: &Scene, r: &Reading) {
        self.n += 1;
        self.context += (r.context == scene.context) as usize;
        self.class += (r.class() == Some(scene.class)) as usize;
        self.color += (r.color() == scene.color()) as usize;
        self.context_confusion[scene.context.index()][r.context.index()] += 1;
        if let Some(c) = r.class() {
            self.class_confusion[scene.class.index()][c.index()] += 1;
        }
        if r.color() != scene.color() && self.color_errors.len() < 10 {
            self.color_errors
                .push((scene.color().unwrap(), r.color(), scene.context));
        }
    }

    fn rates(&self) -> (f32, f32, f32) {
        let n = self.n as f32;
        (
            self.context as f32 / n,
            self.class as f32 / n,
            self.color as f32 / n,
        )
    }

    fn report(&self, label: &str) -> (f32, f32, f32) {
        let (a, b, c) = self.rates();
        println!(
            "{label}: {} scenes, context {:.1}%, class {:.1}%, colour {:.1}%",
            self.n,
            100.0 * a,
            100.0 * b,
            100.0 * c
        );
        println!(
            "  class confusion (rows true {:?}): {:?}",
            Class::ALL,
            self.class_confusion
        );
        println!("  context confusion: {:?}", self.context_confusion);
        println!(
            "  colour errors (true, read, context): {:?}",
            self.color_errors
        );
        (a, b, c)
    }
}

const FRESH_SEED: u64 = 0xF00D_0000;

#[test]
fn determinism() {
    for seed in [0u64, 1, 42, 123_456_789] {
        let a = World::sample(seed);
        let b = World::sample(seed);
        assert_eq!(a, b);
        assert_eq!(world::render(&a), world::render(&b));
        let ca = world::caption(&a, &mut ToyRng::new(seed));
        let cb = world::caption(&b, &mut ToyRng::new(seed));
        assert_eq!(ca, cb);
    }
    let a = world::render(&World::sample(1));
    let b = world::render(&World::sample(2));
    assert_ne!(a, b);
    let x: Vec<_> = world::sample_batch(7, 5).map(|s| s.image).collect();
    let y: Vec<_> = world::sample_batch(7, 5).map(|s| s.image).collect();
    assert_eq!(x, y);
    for i in 1..x.len() {
        assert_ne!(x[0], x[i]);
    }
    // item i depends only on (seed, i)
    let z: Vec<_> = world::sample_batch(7, 3).map(|s| s.image).collect();
    assert_eq!(&x[..3], &z[..]);
    let s1 = world::subject_photos(Subject::SpotBall, 5, 3);
    let s2 = world::subject_photos(Subject::SpotBall, 5, 3);
    assert_eq!(s1, s2);
}

#[test]
fn scenes_stay_in_frame_and_vary() {
    let mut sizes = (f32::MAX, f32::MIN);
    let mut counts = [[0usize; 10]; 6];
    let mut classes = [0usize; 6];
    for (sc, _) in world::scene_batch(11, 3000) {
        assert!(sc.x - sc.size >= world::MARGIN - 1e-3);
        assert!(sc.y - sc.size >= world::MARGIN - 1e-3);
        assert!(sc.x + sc.size <= SIZE as f32 - world::MARGIN + 1e-3);
        assert!(sc.y + sc.size <= SIZE as f32 - world::MARGIN + 1e-3);
        sizes = (sizes.0.min(sc.size), sizes.1.max(sc.size));
        let color = sc.color().unwrap();
        assert!(color.allowed_in(sc.context));
        counts[sc.context.index()][color.index()] += 1;
        classes[sc.class.index()] += 1;
    }
    assert!(sizes.0 < 11.0 && sizes.1 > 17.0, "{sizes:?}");
    assert!(classes.iter().all(|&c| c > 350), "{classes:?}");
    for ctx in Context::ALL {
        let allowed = world::Color::allowed(ctx);
        println!(
            "{:>7}: {} colours: {:?}",
            ctx.name(),
            allowed.len(),
            allowed.iter().map(|c| c.name()).collect::<Vec<_>>()
        );
        assert!(allowed.len() >= 7, "{ctx:?} allows {allowed:?}");
        for c in allowed {
            assert!(counts[ctx.index()][c.index()] > 0);
        }
    }
    // every colour appears in most contexts
    for c in Color::ALL {
        let n = Context::ALL.iter().filter(|&&x| c.allowed_in(x)).count();
        assert!(n >= 4, "{c:?} is allowed in {n} contexts");
    }
}

#[test]
fn captions_are_well_formed() {
    let vocab = world::vocabulary();
    println!("vocabulary ({} words): {vocab:?}", vocab.len());
    let mut full = 0;
    let mut bare = 0;
    let n = 2000;
    for (scene, c) in world::scene_batch(5, n) {
        let words: Vec<&str> = c.split(' ').collect();
        for w in &words {
            assert!(vocab.contains(w), "{c:?}: {w:?} not in vocabulary");
        }
        assert!(c.contains(scene.class.noun()), "{c:?}");
        let body = c.strip_prefix("a photo of ").unwrap_or(&c);
        let color = scene.color().unwrap();
        let has_color = body.contains(&format!(" {} ", color.name()));
        let has_ctx = body.ends_with(scene.context.phrase());
        // article agrees with the next word
        let next = body.split(' ').nth(1).unwrap();
        let art = if "aeiou".contains(&next[..1]) {
            "an"
        } else {
            "a"
        };
        assert!(body.starts_with(&format!("{art} ")), "{c:?}");
        let expected = world::describe(
            false,
            None,
            has_color.then_some(color),
            scene.class,
            has_ctx.then_some(scene.context),
        );
        assert_eq!(body, expected);
        full += (has_color && has_ctx) as usize;
        bare += (!has_color && !has_ctx) as usize;
    }
    assert!(full > n / 3 && bare > n / 20, "full {full}, bare {bare}");
    assert_eq!(
        world::describe(
            true,
            None,
            Some(Color::Orange),
            Class::Ball,
            Some(Context::Beach)
        ),
        "a photo of an orange ball on the beach"
    );
    assert_eq!(
        world::describe(
            false,
            Some("sks"),
            Some(Color::Red),
            Class::Box,
            Some(Context::Snow)
        ),
        "a red sks box in the snow"
    );
    assert_eq!(
        world::describe(true, None, None, Class::Ball, None),
        "a photo of a ball"
    );
    for t in world::RARE_TOKENS {
        assert!(!vocab.contains(t));
    }
}

#[test]
fn chw_round_trip() {
    let img = world::render(&World::sample(3));
    let chw = world::to_chw_f32(&img);
    assert_eq!(chw.len(), 3 * SIZE * SIZE);
    assert!(chw.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(world::from_chw_f32(&chw, SIZE, SIZE).unwrap(), img);
    assert!(world::from_chw_f32(&chw[1..], SIZE, SIZE).is_err());
}

#[test]
fn oracle_reads_clean_scenes() {
    let mut t = Tally::default();
    for s in world::sample_batch(FRESH_SEED, 1000) {
        let r = oracle::read(&s.image);
        t.add(&s.scene, &r);
    }
    let (a, b, c) = t.report("clean");
    assert!(a >= 0.95 && b >= 0.95 && c >= 0.95);
}

#[test]
fn oracle_reads_degraded_scenes() {
    // blur σ = 1 px, noise σ = 12, colour shift up to ±20 per channel
    let mut t = Tally::default();
    for (i, s) in world::sample_batch(FRESH_SEED + 1, 1000).enumerate() {
        let img = degrade(&s.image, 1.0, 12.0, 20.0, i as u64);
        t.add(&s.scene, &oracle::read(&img));
    }
    let (a, b, c) = t.report("degraded (blur 1, noise 12, shift 20)");
    assert!(a >= 0.9 && b >= 0.85 && c >= 0.9);

    // heavier: blur σ = 2 px (about what a ×4 VAE loses), noise σ = 20
    let mut t = Tally::default();
    for (i, s) in world::sample_batch(FRESH_SEED + 2, 500).enumerate() {
        let img = degrade(&s.image, 2.0, 20.0, 20.0, i as u64);
        t.add(&s.scene, &oracle::read(&img));
    }
    let (a, b, c) = t.report("degraded (blur 2, noise 20, shift 20)");
    assert!(a >= 0.8 && b >= 0.6 && c >= 0.8);
}

#[test]
fn oracle_finds_no_object_in_empty_background() {
    for ctx in Context::ALL {
        // an object painted in a background colour vanishes into it
        let mut scene = world::Scene::placed(ctx, Class::Ball, Paint::Plain(Color::Red), 9);
        scene.size = 0.01;
        let r = oracle::read(&world::render(&scene));
        assert_eq!(r.context, ctx);
        assert!(
            r.object.is_none(),
            "{ctx:?}: {:?}",
            r.object.map(|o| o.area)
        );
    }
}

#[test]
fn subject_fidelity_separates_subjects_from_plain_objects() {
    for subject in Subject::ALL {
        let photos = world::subject_photos(subject, 5, 17);
        assert_eq!(photos.len(), 5);
        let mut min_subject = f32::MAX;
        let mut min_p = f32::MAX;
        for (scene, img) in &photos {
            assert_eq!(scene.class, subject.class());
            assert!(subject.photo_contexts().contains(&scene.context));
            let f = oracle::subject_fidelity(img, subject);
            let l = oracle::subject_likeness(img, subject);
            let r = oracle::read(img);
            assert_eq!(
                r.class(),
                Some(subject.class()),
                "{subject:?} photo read as {r:?}"
            );
            min_subject = min_subject.min(f.score);
            min_p = min_p.min(l.p_subject);
        }
        // the subject in every context, degraded
        let mut min_degraded = f32::MAX;
        for (i, ctx) in Context::ALL.into_iter().enumerate() {
            let img = world::render(&world::subject_scene(subject, ctx, 100 + i as u64));
            let img = degrade(&img, 1.0, 8.0, 10.0, i as u64);
            min_degraded = min_degraded.min(oracle::subject_fidelity(&img, subject).score);
        }
        // plain objects of the same class, every colour and context
        let mut max_plain = 0f32;
        let mut max_plain_p = 0f32;
        for (i, s) in world::sample_batch(23, 300)
            .filter(|s| s.scene.class == subject.class())
            .enumerate()
            .take(40)
        {
            let _ = i;
            max_plain = max_plain.max(oracle::subject_fidelity(&s.image, subject).score);
            max_plain_p = max_plain_p.max(oracle::subject_likeness(&s.image, subject).p_subject);
        }
        // other subjects
        let mut max_other = 0f32;
        for other in Subject::ALL.into_iter().filter(|&o| o != subject) {
            for (_, img) in world::subject_photos(other, 3, 5) {
                max_other = max_other.max(oracle::subject_fidelity(&img, subject).score);
            }
        }
        println!(
            "{:>10}: photos min fidelity {min_subject:.3} (min p_subject {min_p:.3}), \
             all contexts degraded min {min_degraded:.3}, plain max {max_plain:.3} \
             (max p_subject {max_plain_p:.3}), other subjects max {max_other:.3}",
            subject.name()
        );
        assert!(min_subject > 0.75, "{subject:?}");
        assert!(min_p > 0.9, "{subject:?}");
        assert!(min_degraded > 0.45, "{subject:?}");
        assert!(max_plain < 0.35, "{subject:?}");
        assert!(max_plain_p < 0.1, "{subject:?}");
        assert!(max_other < 0.5, "{subject:?}");
    }
}

#[test]
fn diversity_and_similarity() {
    let img = world::render(&World::sample(1));
    assert_eq!(oracle::image_distance(&img, &img), 0.0);
    let batch: Vec<RgbImage> = world::sample_batch(3, 8).map(|s| s.image).collect();
    let div_world = oracle::diversity(&batch);
    // same prompt, different places: less diverse than the world, more than copies
    let same: Vec<RgbImage> = (0..8)
        .map(|i| {
            let sc = world::Scene::placed(Context::Grass, Class::Ball, Paint::Plain(Color::Red), i);
            world::render(&sc)
        })
        .collect();
    let div_same = oracle::diversity(&same);
    let copies = vec![same[0].clone(); 4];
    let div_copies = oracle::diversity(&copies);
    println!("diversity: world {div_world:.3}, one prompt {div_same:.3}, copies {div_copies:.3}");
    assert!(div_world > div_same && div_same > div_copies + 0.01);
    assert_eq!(div_copies, 0.0);

    let photos = world::subject_photos(Subject::SpotBall, 2, 1);
    let sim_subject = oracle::object_similarity(&photos[0].1, &photos[1].1);
    let sim_plain = oracle::object_similarity(&photos[0].1, &same[0]);
    println!("object similarity: subject/subject {sim_subject:.3}, subject/plain {sim_plain:.3}");
    assert!(sim_subject > 0.8 && sim_plain < 0.6);
}

#[test]
fn save_example_grids() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("toy_world");
    let world_imgs: Vec<RgbImage> = world::sample_batch(1, 48).map(|s| s.image).collect();
    world::save_grid(&world_imgs, 8, 2, &dir.join("world.png")).unwrap();
    for s in world::sample_batch(1, 16) {
        println!("{}", s.caption);
    }
    let mut subj = Vec::new();
    for subject in Subject::ALL {
        subj.extend(
            world::subject_photos(subject, 5, 1)
                .into_iter()
                .map(|p| p.1),
        );
        for ctx in Context::ALL.into_iter().take(5) {
            subj.push(world::render(&world::subject_scene(subject, ctx, 3)));
        }
    }
    world::save_grid(&subj, 10, 2, &dir.join("subjects.png")).unwrap();
    let degraded: Vec<RgbImage> = world_imgs[..16]
        .iter()
        .enumerate()
        .flat_map(|(i, im)| {
            [
                degrade(im, 1.0, 12.0, 20.0, i as u64),
                degrade(im, 2.0, 20.0, 20.0, i as u64),
            ]
        })
        .collect();
    world::save_grid(&degraded, 8, 2, &dir.join("degraded.png")).unwrap();
    assert!(dir.join("world.png").exists());
    println!("grids in {}", dir.display());
}

#[test]
#[ignore]
fn bench_oracle() {
    let imgs: Vec<RgbImage> = world::sample_batch(1, 300).map(|s| s.image).collect();
    let t = std::time::Instant::now();
    let _: Vec<_> = world::sample_batch(1, 300).collect();
    println!("render {:?}/img", t.elapsed() / 300);
    let t = std::time::Instant::now();
    for im in &imgs {
        std::hint::black_box(oracle::read(im));
    }
    println!("read {:?}/img", t.elapsed() / 300);
}
