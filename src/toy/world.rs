//! The procedural toy world: 64×64 scenes of one bold, flat-coloured object
//! (a ball, a box, a cone, ...) in one of a few contexts with analytically
//! recognizable backgrounds (beach, snow, grass, night, desert, room), plus
//! captions and the DreamBooth "subjects": objects with an appearance the world
//! itself never shows.
//!
//! Everything is deterministic from a `u64` seed, with our own generator
//! ([`ToyRng`]) so the pixels do not depend on the `rand` version.
//!
//! Geometry: an object has a centre `(x, y)` and a radius `size` in pixels; its
//! shape lives in unit coordinates `u = (px - x) / size`, `v = (py - y) / size`
//! inside the square `[-1, 1]²`, so the object's bounding box always lies
//! within `size` of its centre and placement keeps it 2 px inside the frame.
//! Colours that would be hard to see on a context (white in the snow, green on
//! the grass, black at night, ...) are never drawn there: see
//! [`Color::allowed_in`].

use std::path::Path;
use std::sync::OnceLock;

use image::{Rgb, RgbImage};
use rand::RngCore;

/// Side of every scene, in pixels.
pub const SIZE: usize = 64;
/// Smallest and largest object radius, in pixels.
pub const MIN_OBJECT_SIZE: f32 = 10.0;
pub const MAX_OBJECT_SIZE: f32 = 18.0;
/// Gap kept between an object's bounding box and the frame, in pixels.
pub const MARGIN: f32 = 2.0;
/// Minimum RGB distance between an object colour and every background colour
/// (and every blend of two adjacent background colours) of a context where
/// the world draws it.
pub const MIN_CONTRAST: f32 = 80.0;
/// Standard deviation of the per-pixel noise, per channel, in 0..255 units.
pub const PIXEL_NOISE: f32 = 3.0;

/// Rare words the world never uses in captions, meant as DreamBooth subject
/// identifiers (the model's tokenizer should include them).
pub const RARE_TOKENS: &[&str] = &["sks", "zwx", "pqv", "tnb"];

// ---------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------

/// SplitMix64: tiny, fast and fully specified here, so scenes never change
/// with a dependency upgrade. Implements [`RngCore`] so it can be passed
/// wherever a `rand` generator is expected.
#[derive(Clone, Debug)]
pub struct ToyRng(u64);

impl ToyRng {
    pub fn new(seed: u64) -> Self {
        ToyRng(seed ^ 0x5851_F42D_4C95_7F2D)
    }

    /// A uniform `f32` in `[0, 1)`.
    pub fn unit(&mut self) -> f32 {
        unit(self)
    }

    /// A uniform `f32` in `[lo, hi)`.
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        below(self, n)
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.unit() as f64).max(1e-12);
        let u2 = self.unit() as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// A cheap approximately normal sample (mean 0, variance 1, within ±3.5):
    /// the scaled sum of four 16-bit uniforms from one draw.
    pub fn approx_normal(&mut self) -> f32 {
        let r = self.next_u64();
        let s: u64 = (0..4).map(|k| (r >> (16 * k)) & 0xFFFF).sum();
        (s as f32 / 65536.0 - 2.0) * 3f32.sqrt()
    }
}

impl RngCore for ToyRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives an independent seed from a seed and a stream index.
pub fn derive_seed(seed: u64, index: u64) -> u64 {
    mix64(
        mix64(seed ^ 0xD1B5_4A32_D192_ED03).wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    )
}

fn unit<R: RngCore + ?Sized>(rng: &mut R) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}

fn below<R: RngCore + ?Sized>(rng: &mut R, n: usize) -> usize {
    ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * n as f64) as usize % n.max(1)
}

// ---------------------------------------------------------------------------
// Vocabulary: contexts, classes, colours
// ---------------------------------------------------------------------------

/// Where the object is: the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Context {
    Beach,
    Snow,
    Grass,
    Night,
    Desert,
    Room,
}

impl Context {
    pub const ALL: [Context; 6] = [
        Context::Beach,
        Context::Snow,
        Context::Grass,
        Context::Night,
        Context::Desert,
        Context::Room,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// One-word name (also the last word of the phrase).
    pub fn name(self) -> &'static str {
        match self {
            Context::Beach => "beach",
            Context::Snow => "snow",
            Context::Grass => "grass",
            Context::Night => "night",
            Context::Desert => "desert",
            Context::Room => "room",
        }
    }

    /// The caption phrase: "on the beach", "in the snow", ...
    pub fn phrase(self) -> &'static str {
        match self {
            Context::Beach => "on the beach",
            Context::Snow => "in the snow",
            Context::Grass => "on the grass",
            Context::Night => "at night",
            Context::Desert => "in a desert",
            Context::Room => "in a room",
        }
    }

    pub fn from_name(name: &str) -> Option<Context> {
        Context::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The flat colours the background is painted with (stars and the moon
    /// excluded), in 0..255 RGB.
    pub fn bg_colors(self) -> &'static [[f32; 3]] {
        match self {
            // sky, sea, sand
            Context::Beach => &[
                [140.0, 200.0, 245.0],
                [25.0, 105.0, 165.0],
                [235.0, 210.0, 150.0],
            ],
            // pale sky, snow
            Context::Snow => &[[200.0, 212.0, 228.0], [246.0, 247.0, 250.0]],
            // sky, grass
            Context::Grass => &[[90.0, 150.0, 235.0], [75.0, 160.0, 55.0]],
            // night sky, dark ground
            Context::Night => &[[14.0, 20.0, 56.0], [8.0, 10.0, 30.0]],
            // pale hot sky, dunes
            Context::Desert => &[[250.0, 222.0, 170.0], [214.0, 135.0, 68.0]],
            // wall, wooden floor, plank line
            Context::Room => &[
                [175.0, 165.0, 150.0],
                [125.0, 85.0, 55.0],
                [100.0, 68.0, 44.0],
            ],
        }
    }

    /// Pairs of [`Context::bg_colors`] indices that meet along an edge, so a
    /// blurred image shows their blends.
    pub fn bg_blends(self) -> &'static [(usize, usize)] {
        match self {
            Context::Beach => &[(0, 1), (1, 2)],
            Context::Room => &[(0, 1), (1, 2)],
            _ => &[(0, 1)],
        }
    }

    /// Distance from an RGB colour to the context's background: to the nearest
    /// background colour or blend of two adjacent ones.
    pub fn bg_distance(self, c: [f32; 3]) -> f32 {
        let cols = self.bg_colors();
        let mut best = f32::INFINITY;
        for &(i, j) in self.bg_blends() {
            best = best.min(segment_distance(c, cols[i], cols[j]));
        }
        for &b in cols {
            best = best.min(dist(c, b));
        }
        best
    }
}

/// The object's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Ball,
    Box,
    Cone,
    Ring,
    Cross,
    Star,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Ball,
        Class::Box,
        Class::Cone,
        Class::Ring,
        Class::Cross,
        Class::Star,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The noun used in captions.
    pub fn noun(self) -> &'static str {
        match self {
            Class::Ball => "ball",
            Class::Box => "box",
            Class::Cone => "cone",
            Class::Ring => "ring",
            Class::Cross => "cross",
            Class::Star => "star",
        }
    }

    pub fn from_noun(noun: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.noun() == noun)
    }

    /// Whether the unit-coordinate point `(u, v)` lies inside the shape
    /// (`v` grows downwards). Every shape fits in `[-1, 1]²`.
    pub fn inside(self, u: f32, v: f32) -> bool {
        match self {
            Class::Ball => u * u + v * v <= 1.0,
            Class::Box => u.abs() <= 0.8 && v.abs() <= 0.8,
            Class::Cone => {
                // apex (0, -0.95), base v = 0.85 from u = -0.9 to 0.9
                (-0.95..=0.85).contains(&v) && u.abs() <= 0.5 * (v + 0.95)
            }
            Class::Ring => {
                let r2 = u * u + v * v;
                (0.27..=1.0).contains(&r2)
            }
            Class::Cross => {
                (u.abs() <= 0.34 && v.abs() <= 0.95) || (v.abs() <= 0.34 && u.abs() <= 0.95)
            }
            Class::Star => point_in_polygon(u, v, star_polygon()),
        }
    }
}

/// The 10 vertices of a five-pointed star, point up, outer radius 1, centred
/// so its bounding box is vertically centred.
fn star_polygon() -> &'static [(f32, f32)] {
    static STAR: OnceLock<Vec<(f32, f32)>> = OnceLock::new();
    STAR.get_or_init(|| {
        // outer points span v in [-1, cos 36°]; shift down to centre the box
        let shift = (1.0 - (36f32).to_radians().cos()) / 2.0;
        (0..10)
            .map(|k| {
                let a = (k as f32) * std::f32::consts::PI / 5.0;
                let r = if k % 2 == 0 { 1.0 } else { 0.45 };
                (r * a.sin(), -r * a.cos() + shift)
            })
            .collect()
    })
}

fn point_in_polygon(x: f32, y: f32, poly: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let n = poly.len();
    let mut j = n - 1;
    for i in 0..n {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The object's colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Color {
    Red,
    Orange,
    Yellow,
    Green,
    Cyan,
    Blue,
    Purple,
    Pink,
    White,
    Black,
}

impl Color {
    pub const ALL: [Color; 10] = [
        Color::Red,
        Color::Orange,
        Color::Yellow,
        Color::Green,
        Color::Cyan,
        Color::Blue,
        Color::Purple,
        Color::Pink,
        Color::White,
        Color::Black,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The adjective used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Orange => "orange",
            Color::Yellow => "yellow",
            Color::Green => "green",
            Color::Cyan => "cyan",
            Color::Blue => "blue",
            Color::Purple => "purple",
            Color::Pink => "pink",
            Color::White => "white",
            Color::Black => "black",
        }
    }

    pub fn from_name(name: &str) -> Option<Color> {
        Color::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The flat paint, in 0..255 RGB.
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Color::Red => [220.0, 40.0, 40.0],
            Color::Orange => [250.0, 140.0, 30.0],
            Color::Yellow => [245.0, 220.0, 40.0],
            Color::Green => [40.0, 170.0, 70.0],
            Color::Cyan => [40.0, 210.0, 215.0],
            Color::Blue => [40.0, 70.0, 220.0],
            Color::Purple => [140.0, 50.0, 190.0],
            Color::Pink => [250.0, 130.0, 200.0],
            Color::White => [248.0, 248.0, 248.0],
            Color::Black => [25.0, 25.0, 25.0],
        }
    }

    /// Whether the world draws this colour in this context: its distance to
    /// the context's background is at least [`MIN_CONTRAST`].
    pub fn allowed_in(self, context: Context) -> bool {
        context.bg_distance(self.rgb()) >= MIN_CONTRAST
    }

    /// The colours the world draws in a context.
    pub fn allowed(context: Context) -> Vec<Color> {
        Color::ALL
            .into_iter()
            .filter(|c| c.allowed_in(context))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Subjects
// ---------------------------------------------------------------------------

/// A DreamBooth subject: one specific object whose appearance the world never
/// shows (its class is one of the world's classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// A ball, left half red and right half blue, with a yellow spot.
    SpotBall,
    /// A box with three horizontal bands: purple, cyan, purple.
    StripeBox,
    /// A pink star with a blue dot in the middle.
    DotStar,
    /// A life buoy: a ring of alternating red and yellow quarters.
    BuoyRing,
}

const SUBJ_RED: [f32; 3] = [215.0, 30.0, 40.0];
const SUBJ_BLUE: [f32; 3] = [35.0, 60.0, 210.0];
const SUBJ_YELLOW: [f32; 3] = [250.0, 225.0, 30.0];
const SUBJ_PURPLE: [f32; 3] = [120.0, 40.0, 170.0];
const SUBJ_PINK: [f32; 3] = [250.0, 120.0, 195.0];
const SUBJ_CYAN: [f32; 3] = [40.0, 215.0, 210.0];

impl Subject {
    pub const ALL: [Subject; 4] = [
        Subject::SpotBall,
        Subject::StripeBox,
        Subject::DotStar,
        Subject::BuoyRing,
    ];

    pub fn class(self) -> Class {
        match self {
            Subject::SpotBall => Class::Ball,
            Subject::StripeBox => Class::Box,
            Subject::DotStar => Class::Star,
            Subject::BuoyRing => Class::Ring,
        }
    }

    /// A short name for files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Subject::SpotBall => "spot_ball",
            Subject::StripeBox => "stripe_box",
            Subject::DotStar => "dot_star",
            Subject::BuoyRing => "buoy_ring",
        }
    }

    pub fn from_name(name: &str) -> Option<Subject> {
        Subject::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The contexts its input photos are taken in.
    pub fn photo_contexts(self) -> &'static [Context] {
        match self {
            Subject::SpotBall => &[Context::Grass, Context::Room],
            Subject::StripeBox => &[Context::Room, Context::Snow],
            Subject::DotStar => &[Context::Night, Context::Grass],
            Subject::BuoyRing => &[Context::Beach],
        }
    }

    /// The subject's paint at unit coordinates `(u, v)` inside its shape.
    pub fn color_at(self, u: f32, v: f32) -> [f32; 3] {
        match self {
            Subject::SpotBall => {
                let (du, dv) = (u - 0.42, v + 0.3);
                if du * du + dv * dv <= 0.3 * 0.3 {
                    SUBJ_YELLOW
                } else if u < 0.0 {
                    SUBJ_RED
                } else {
                    SUBJ_BLUE
                }
            }
            Subject::StripeBox => {
                if v.abs() <= 0.8 / 3.0 {
                    SUBJ_CYAN
                } else {
                    SUBJ_PURPLE
                }
            }
            Subject::DotStar => {
                let c = star_center_v();
                if u * u + (v - c) * (v - c) <= 0.36 * 0.36 {
                    SUBJ_BLUE
                } else {
                    SUBJ_PINK
                }
            }
            Subject::BuoyRing => {
                if (u >= 0.0) == (v >= 0.0) {
                    SUBJ_RED
                } else {
                    SUBJ_YELLOW
                }
            }
        }
    }
}

/// The vertical unit coordinate of the star's centre (it is shifted to centre
/// its bounding box).
fn star_center_v() -> f32 {
    (1.0 - (36f32).to_radians().cos()) / 2.0
}

/// How an object is painted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Paint {
    /// One flat palette colour (the world's objects).
    Plain(Color),
    /// A subject's own pattern.
    Subject(Subject),
}

impl Paint {
    /// The paint at unit coordinates `(u, v)`, before shading.
    pub fn color_at(self, u: f32, v: f32) -> [f32; 3] {
        match self {
            Paint::Plain(c) => c.rgb(),
            Paint::Subject(s) => s.color_at(u, v),
        }
    }
}

// ---------------------------------------------------------------------------
// Scenes
// ---------------------------------------------------------------------------

/// Everything needed to render one picture.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scene {
    pub context: Context,
    pub class: Class,
    pub paint: Paint,
    /// Object centre, in pixels.
    pub x: f32,
    pub y: f32,
    /// Object radius, in pixels.
    pub size: f32,
    /// Seed of the background layout (horizon, dunes, stars).
    pub bg_seed: u64,
    /// Seed of the per-pixel noise.
    pub noise_seed: u64,
}

impl Scene {
    /// The object's colour, for plain objects.
    pub fn color(&self) -> Option<Color> {
        match self.paint {
            Paint::Plain(c) => Some(c),
            Paint::Subject(_) => None,
        }
    }

    /// The subject, if the object is one.
    pub fn subject(&self) -> Option<Subject> {
        match self.paint {
            Paint::Plain(_) => None,
            Paint::Subject(s) => Some(s),
        }
    }

    /// A scene with the given content at a random place and size.
    pub fn placed(context: Context, class: Class, paint: Paint, seed: u64) -> Scene {
        let mut rng = ToyRng::new(derive_seed(seed, 1));
        let size = rng.range(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE);
        let lo = size + MARGIN;
        let hi = SIZE as f32 - size - MARGIN;
        let x = rng.range(lo, hi);
        let y = rng.range(lo, hi);
        Scene {
            context,
            class,
            paint,
            x,
            y,
            size,
            bg_seed: derive_seed(seed, 2),
            noise_seed: derive_seed(seed, 3),
        }
    }
}

/// The world's scene distribution.
pub struct World;

impl World {
    /// A random scene of the world: uniform context and class, a uniform
    /// colour among those allowed in the context, random place and size.
    pub fn sample(seed: u64) -> Scene {
        let mut rng = ToyRng::new(derive_seed(seed, 0));
        let context = Context::ALL[rng.below(Context::ALL.len())];
        let class = Class::ALL[rng.below(Class::ALL.len())];
        let colors = Color::allowed(context);
        let color = colors[rng.below(colors.len())];
        Scene::placed(context, class, Paint::Plain(color), seed)
    }
}

/// One training example.
#[derive(Clone, Debug)]
pub struct Sample {
    pub scene: Scene,
    pub image: RgbImage,
    pub caption: String,
}

/// `n` independent examples: item `i` depends only on `(seed, i)`.
pub fn sample_batch(seed: u64, n: usize) -> impl Iterator<Item = Sample> {
    scene_batch(seed, n).map(|(scene, caption)| Sample {
        image: render(&scene),
        scene,
        caption,
    })
}

/// The scenes and captions of [`sample_batch`], without rendering.
pub fn scene_batch(seed: u64, n: usize) -> impl Iterator<Item = (Scene, String)> {
    (0..n as u64).map(move |i| {
        let s = derive_seed(seed, i);
        let scene = World::sample(s);
        let caption = caption(&scene, &mut ToyRng::new(derive_seed(s, 7)));
        (scene, caption)
    })
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// The background layout of one scene.
struct Background {
    context: Context,
    /// Horizon (first ground row), in pixels.
    horizon: f32,
    /// Beach: first sea row. Snow: slope. Grass/desert: wave amplitude.
    a: f32,
    /// Wave frequency (radians per pixel) and phase.
    freq: f32,
    phase: f32,
    stars: Vec<(usize, usize)>,
    moon: (f32, f32),
}

const STAR_RGB: [f32; 3] = [225.0, 225.0, 240.0];
const MOON_RGB: [f32; 3] = [240.0, 235.0, 190.0];
const MOON_RADIUS: f32 = 3.5;

impl Background {
    fn new(scene: &Scene) -> Background {
        let mut rng = ToyRng::new(scene.bg_seed);
        let context = scene.context;
        let horizon = rng.range(24.0, 38.0);
        let (a, freq, phase) = match context {
            Context::Beach => (horizon - rng.range(7.0, 12.0), 0.0, 0.0),
            Context::Snow => (rng.range(-0.2, 0.2), 0.0, 0.0),
            Context::Grass => (
                rng.range(1.0, 3.0),
                rng.range(0.04, 0.1),
                rng.range(0.0, 6.3),
            ),
            Context::Desert => (
                rng.range(3.0, 6.0),
                rng.range(0.08, 0.15),
                rng.range(0.0, 6.3),
            ),
            _ => (0.0, 0.0, 0.0),
        };
        let mut stars = Vec::new();
        // the moon sits in the top corner away from the object
        let moon = if scene.x < SIZE as f32 / 2.0 {
            (56.0, 8.0)
        } else {
            (8.0, 8.0)
        };
        if context == Context::Night {
            let n = 6 + rng.below(5);
            while stars.len() < n {
                let x = rng.below(SIZE);
                let y = rng.below((horizon as usize).saturating_sub(4).max(1));
                // stars stay off the object's box and away from the moon
                let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                let off_object = (fx - scene.x).abs() > scene.size + 2.0
                    || (fy - scene.y).abs() > scene.size + 2.0;
                let off_moon = (fx - moon.0).abs() > 6.0 || (fy - moon.1).abs() > 6.0;
                if off_object && off_moon {
                    stars.push((x, y));
                } else if rng.unit() < 0.05 {
                    break;
                }
            }
        }
        Background {
            context,
            horizon,
            a,
            freq,
            phase,
            stars,
            moon,
        }
    }

    /// Whether the background is one flat colour over the whole pixel
    /// (conservatively: its four sub-pixel samples and centre agree, and no
    /// star or moon is near).
    fn is_flat_at(&self, px: usize, py: usize) -> bool {
        if self.context == Context::Night {
            let (mx, my) = self.moon;
            let near_moon = (px as f32 + 0.5 - mx).abs() < MOON_RADIUS + 1.5
                && (py as f32 + 0.5 - my).abs() < MOON_RADIUS + 1.5;
            if near_moon || self.stars.contains(&(px, py)) {
                return false;
            }
        }
        let (x, y) = (px as f32, py as f32);
        let c = self.color(x + 0.5, y + 0.5);
        SUBPIXELS
            .iter()
            .all(|&(dx, dy)| self.color(x + dx, y + dy) == c)
    }

    /// Background colour at a continuous point.
    fn color(&self, x: f32, y: f32) -> [f32; 3] {
        let cols = self.context.bg_colors();
        match self.context {
            Context::Beach => {
                if y < self.a {
                    cols[0]
                } else if y < self.horizon {
                    cols[1]
                } else {
                    cols[2]
                }
            }
            Context::Snow => {
                let h = self.horizon + self.a * (x - SIZE as f32 / 2.0);
                if y < h { cols[0] } else { cols[1] }
            }
            Context::Grass | Context::Desert => {
                let h = self.horizon + self.a * (self.freq * x + self.phase).sin();
                if y < h { cols[0] } else { cols[1] }
            }
            Context::Night => {
                let (mx, my) = self.moon;
                if (x - mx).powi(2) + (y - my).powi(2) <= MOON_RADIUS * MOON_RADIUS {
                    return MOON_RGB;
                }
                let (px, py) = (x as usize, y as usize);
                if self.stars.contains(&(px, py)) {
                    return STAR_RGB;
                }
                if y < self.horizon { cols[0] } else { cols[1] }
            }
            Context::Room => {
                if y < self.horizon {
                    cols[0]
                } else if (y - self.horizon).rem_euclid(6.0) >= 5.0 {
                    cols[2]
                } else {
                    cols[1]
                }
            }
        }
    }
}

/// Sub-pixel sample offsets (2×2 supersampling for smooth edges).
const SUBPIXELS: [(f32, f32); 4] = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)];

/// Mild light from the upper left: a factor in about `[0.93, 1.07]`.
fn shade(u: f32, v: f32) -> f32 {
    1.0 - 0.05 * (u + v).clamp(-1.4, 1.4)
}

/// Renders a scene to a 64×64 RGB image.
pub fn render(scene: &Scene) -> RgbImage {
    let bg = Background::new(scene);
    let mut rng = ToyRng::new(scene.noise_seed);
    let mut img = RgbImage::new(SIZE as u32, SIZE as u32);
    for py in 0..SIZE {
        for px in 0..SIZE {
            let (cx, cy) = (px as f32 + 0.5, py as f32 + 0.5);
            let off_object =
                (cx - scene.x).abs() > scene.size + 1.0 || (cy - scene.y).abs() > scene.size + 1.0;
            let c = if off_object && bg.is_flat_at(px, py) {
                // away from the object and from background edges: flat
                bg.color(cx, cy)
            } else {
                let mut acc = [0f32; 3];
                for (sx, sy) in SUBPIXELS {
                    let (x, y) = (px as f32 + sx, py as f32 + sy);
                    let u = (x - scene.x) / scene.size;
                    let v = (y - scene.y) / scene.size;
                    let c = if u.abs() <= 1.0 && v.abs() <= 1.0 && scene.class.inside(u, v) {
                        let p = scene.paint.color_at(u, v);
                        let f = shade(u, v);
                        [p[0] * f, p[1] * f, p[2] * f]
                    } else {
                        bg.color(x, y)
                    };
                    for k in 0..3 {
                        acc[k] += c[k] / SUBPIXELS.len() as f32;
                    }
                }
                acc
            };
            let mut out = [0u8; 3];
            for k in 0..3 {
                out[k] = (c[k] + PIXEL_NOISE * rng.approx_normal())
                    .round()
                    .clamp(0.0, 255.0) as u8;
            }
            img.put_pixel(px as u32, py as u32, Rgb(out));
        }
    }
    img
}

// ---------------------------------------------------------------------------
// Captions
// ---------------------------------------------------------------------------

/// Builds a caption from its parts: `[a photo of ]a[n] [color ][identifier ]class[ context]`,
/// e.g. `describe(true, None, Some(Color::Orange), Class::Ball, Some(Context::Beach))`
/// is "a photo of an orange ball on the beach" and
/// `describe(false, Some("sks"), None, Class::Box, Some(Context::Snow))` is
/// "a sks box in the snow".
pub fn describe(
    photo: bool,
    identifier: Option<&str>,
    color: Option<Color>,
    class: Class,
    context: Option<Context>,
) -> String {
    let mut words: Vec<&str> = Vec::new();
    if let Some(c) = color {
        words.push(c.name());
    }
    if let Some(id) = identifier {
        words.push(id);
    }
    words.push(class.noun());
    let article = if words[0].starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    let mut s = String::new();
    if photo {
        s.push_str("a photo of ");
    }
    s.push_str(article);
    for w in words {
        s.push(' ');
        s.push_str(w);
    }
    if let Some(ctx) = context {
        s.push(' ');
        s.push_str(ctx.phrase());
    }
    s
}

/// A random caption of a scene: the full one ("a photo of a red ball on the
/// beach") about half the time, otherwise with the colour and/or the context
/// left out, and with "a photo of" left out one time in five. Subjects are
/// described by their class only.
pub fn caption<R: RngCore + ?Sized>(scene: &Scene, rng: &mut R) -> String {
    let u = unit(rng);
    let (with_color, with_context) = if u < 0.5 {
        (true, true)
    } else if u < 0.68 {
        (true, false)
    } else if u < 0.86 {
        (false, true)
    } else {
        (false, false)
    };
    let photo = unit(rng) < 0.8;
    describe(
        photo,
        None,
        scene.color().filter(|_| with_color),
        scene.class,
        Some(scene.context).filter(|_| with_context),
    )
}

/// Every word the world's captions use, sorted (subject identifiers, see
/// [`RARE_TOKENS`], are not included).
pub fn vocabulary() -> Vec<&'static str> {
    let mut words: Vec<&'static str> = vec!["a", "an", "photo", "of"];
    for c in Context::ALL {
        words.extend(c.phrase().split(' '));
    }
    words.extend(Class::ALL.iter().map(|c| c.noun()));
    words.extend(Color::ALL.iter().map(|c| c.name()));
    words.sort_unstable();
    words.dedup();
    words
}

// ---------------------------------------------------------------------------
// Subject photos
// ---------------------------------------------------------------------------

/// `n` "photos" of a subject (DreamBooth's 3–5 input images), at varied places
/// and sizes, in the subject's one or two photo contexts.
pub fn subject_photos(subject: Subject, n: usize, seed: u64) -> Vec<(Scene, RgbImage)> {
    let contexts = subject.photo_contexts();
    (0..n as u64)
        .map(|i| {
            let context = contexts[i as usize % contexts.len()];
            let scene = Scene::placed(
                context,
                subject.class(),
                Paint::Subject(subject),
                derive_seed(seed ^ 0x5B_1EC7, i),
            );
            let image = render(&scene);
            (scene, image)
        })
        .collect()
}

/// A subject rendered in any context (for checks and illustrations).
pub fn subject_scene(subject: Subject, context: Context, seed: u64) -> Scene {
    Scene::placed(context, subject.class(), Paint::Subject(subject), seed)
}

// ---------------------------------------------------------------------------
// Conversions and files
// ---------------------------------------------------------------------------

/// An RGB image as `f32` CHW in `[-1, 1]` (length `3·h·w`).
pub fn to_chw_f32(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (x, y, p) in img.enumerate_pixels() {
        let i = y as usize * w + x as usize;
        for k in 0..3 {
            out[k * w * h + i] = p.0[k] as f32 / 127.5 - 1.0;
        }
    }
    out
}

/// The inverse of [`to_chw_f32`]: values are clamped to `[-1, 1]`.
pub fn from_chw_f32(data: &[f32], width: usize, height: usize) -> crate::Result<RgbImage> {
    if data.len() != 3 * width * height {
        return Err(crate::Error::msg(format!(
            "from_chw_f32: {} values for a 3×{height}×{width} image",
            data.len()
        )));
    }
    let mut img = RgbImage::new(width as u32, height as u32);
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            let mut p = [0u8; 3];
            for k in 0..3 {
                let v = data[k * width * height + i];
                let v = if v.is_nan() { 0.0 } else { v };
                p[k] = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
            }
            img.put_pixel(x as u32, y as u32, Rgb(p));
        }
    }
    Ok(img)
}

/// Lays images out in a grid (`cols` per row, 2 px gaps), each scaled up by
/// an integer `scale` (nearest neighbour).
pub fn grid(images: &[RgbImage], cols: usize, scale: u32) -> RgbImage {
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let (cw, ch) = images
        .iter()
        .fold((1, 1), |(w, h), im| (w.max(im.width()), h.max(im.height())));
    let (cw, ch) = (cw * scale, ch * scale);
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols as u32 * (cw + gap) + gap,
        rows as u32 * (ch + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (i, im) in images.iter().enumerate() {
        let ox = gap + (i % cols) as u32 * (cw + gap);
        let oy = gap + (i / cols) as u32 * (ch + gap);
        for y in 0..im.height() * scale {
            for x in 0..im.width() * scale {
                out.put_pixel(ox + x, oy + y, *im.get_pixel(x / scale, y / scale));
            }
        }
    }
    out
}

/// Saves a grid of images (see [`grid`]) as a PNG.
pub fn save_grid(images: &[RgbImage], cols: usize, scale: u32, path: &Path) -> crate::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    }
    grid(images, cols, scale)
        .save(path)
        .map_err(|e| crate::Error::Image {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

// ---------------------------------------------------------------------------
// Small colour helpers (shared with the oracle)
// ---------------------------------------------------------------------------

/// Euclidean RGB distance.
pub fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// Distance from `c` to the RGB segment `[a, b]` (the blends of `a` and `b`).
pub fn segment_distance(c: [f32; 3], a: [f32; 3], b: [f32; 3]) -> f32 {
    let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let ac = [c[0] - a[0], c[1] - a[1], c[2] - a[2]];
    let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
    let t = if len2 > 0.0 {
        ((ac[0] * ab[0] + ac[1] * ab[1] + ac[2] * ab[2]) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    dist(c, [a[0] + t * ab[0], a[1] + t * ab[1], a[2] + t * ab[2]])
}
