//! An analytic oracle for the toy world: it reads any 64×64 image (a rendered
//! scene or an imperfect generated one: blurry, noisy, colour-shifted) back
//! into context, object class and colour, and scores subject fidelity and
//! image diversity, using only the world's known rendering rules.
//!
//! How it reads an image:
//! 1. a 3×3 median filter takes the pixel noise out;
//! 2. context: each context's background model (its flat colours and the
//!    blends of adjacent ones, see [`Context::bg_distance`]) explains each
//!    pixel with a soft weight `exp(-d²/2σ²)`; the context that explains the
//!    image best wins, and its score is the mean weight;
//! 3. the winning context's colours are re-estimated from the pixels near
//!    them (this absorbs colour shifts), and the object mask is the largest
//!    8-connected set of pixels far from that background;
//! 4. class: each class's silhouette is placed on the image with the mask's
//!    area and centroid; the best pixel intersection-over-union wins;
//! 5. colour: the median colour of the mask's interior, nearest palette
//!    colour.
//!
//! Subject fidelity places the subject's silhouette the same way and compares
//! colours on a [`GRID`]×[`GRID`] grid of its unit bounding box (see
//! [`subject_fidelity`]).

use std::sync::OnceLock;

use image::RgbImage;
use image::imageops::{FilterType, resize};

use super::world::{Class, Color, Context, SIZE, Subject, dist};

/// Side of the grids objects are compared on.
pub const GRID: usize = 24;
/// Scale of the soft background weight of the context test.
const CONTEXT_SIGMA: f32 = 30.0;
/// Pixels closer than this to a background colour re-estimate it.
const ADAPT_RADIUS: f32 = 60.0;
/// Pixels farther than this from the background are object pixels.
const MASK_THRESHOLD: f32 = 40.0;
/// Smaller components are not objects (the moon is about 38 px).
const MIN_OBJECT_AREA: usize = 60;
/// Scale of the colour match kernels.
const COLOR_SIGMA: f32 = 40.0;
const PATTERN_SIGMA: f32 = 50.0;

type Rgbf = [f32; 3];

/// What the oracle sees in an image.
#[derive(Clone, Debug)]
pub struct Reading {
    pub context: Context,
    /// Fraction of the image (soft) the winning context's background explains.
    pub context_score: f32,
    /// The same for every context, indexed by [`Context::index`].
    pub context_scores: [f32; 6],
    /// The main object, if there is one.
    pub object: Option<ObjectReading>,
}

impl Reading {
    pub fn class(&self) -> Option<Class> {
        self.object.as_ref().map(|o| o.class)
    }

    pub fn color(&self) -> Option<Color> {
        self.object.as_ref().map(|o| o.color)
    }
}

/// The main object of an image.
#[derive(Clone, Debug)]
pub struct ObjectReading {
    pub class: Class,
    /// Intersection-over-union of the canonical mask with the class silhouette.
    pub class_score: f32,
    /// The same for every class, indexed by [`Class::index`].
    pub class_scores: [f32; 6],
    pub color: Color,
    /// `exp(-d²/2σ²)` of the distance `d` to the palette colour (σ = 40).
    pub color_score: f32,
    /// Median colour of the object's interior, 0..255.
    pub rgb: [f32; 3],
    /// Bounding box `[x0, y0, x1, y1]`, ends exclusive, in pixels.
    pub bbox: [usize; 4],
    /// Pixel count of the mask.
    pub area: usize,
    /// Mask centroid `(x, y)`, in pixels.
    pub centroid: (f32, f32),
    /// The object mask, `SIZE·SIZE`, row-major.
    pub mask: Vec<bool>,
}

/// Reads an image (resized to 64×64 first if it is another size).
pub fn read(img: &RgbImage) -> Reading {
    let px = pixels(img);
    read_pixels(&px).0
}

/// The image as `SIZE·SIZE` RGB floats.
fn pixels(img: &RgbImage) -> Vec<Rgbf> {
    let owned;
    let img = if img.width() as usize != SIZE || img.height() as usize != SIZE {
        owned = resize(img, SIZE as u32, SIZE as u32, FilterType::Triangle);
        &owned
    } else {
        img
    };
    img.pixels()
        .map(|p| [p.0[0] as f32, p.0[1] as f32, p.0[2] as f32])
        .collect()
}

fn median3x3(px: &[Rgbf]) -> Vec<Rgbf> {
    let n = SIZE;
    let mut out = vec![[0f32; 3]; px.len()];
    for y in 0..n {
        let rows = [y.saturating_sub(1), y, (y + 1).min(n - 1)];
        for x in 0..n {
            let cols = [x.saturating_sub(1), x, (x + 1).min(n - 1)];
            for k in 0..3 {
                let mut v = [0f32; 9];
                for (a, &r) in rows.iter().enumerate() {
                    for (b, &c) in cols.iter().enumerate() {
                        v[3 * a + b] = px[r * n + c][k];
                    }
                }
                out[y * n + x][k] = median9(v);
            }
        }
    }
    out
}

/// Median of nine values with a fixed 19-exchange sorting network.
fn median9(mut p: [f32; 9]) -> f32 {
    #[inline(always)]
    fn s(p: &mut [f32; 9], a: usize, b: usize) {
        let (x, y) = (p[a], p[b]);
        p[a] = x.min(y);
        p[b] = x.max(y);
    }
    s(&mut p, 1, 2);
    s(&mut p, 4, 5);
    s(&mut p, 7, 8);
    s(&mut p, 0, 1);
    s(&mut p, 3, 4);
    s(&mut p, 6, 7);
    s(&mut p, 1, 2);
    s(&mut p, 4, 5);
    s(&mut p, 7, 8);
    s(&mut p, 0, 3);
    s(&mut p, 5, 8);
    s(&mut p, 4, 7);
    s(&mut p, 3, 6);
    s(&mut p, 1, 4);
    s(&mut p, 2, 5);
    s(&mut p, 4, 7);
    s(&mut p, 4, 2);
    s(&mut p, 6, 4);
    s(&mut p, 4, 2);
    p[4]
}

/// A context's background colours, possibly re-estimated from an image.
struct BgModel {
    colors: Vec<Rgbf>,
    blends: &'static [(usize, usize)],
}

impl BgModel {
    fn of(context: Context) -> BgModel {
        BgModel {
            colors: context.bg_colors().to_vec(),
            blends: context.bg_blends(),
        }
    }

    /// The nearest background colour (or blend) to `c`, and its distance.
    fn nearest(&self, c: Rgbf) -> (f32, Rgbf) {
        let mut best = (f32::INFINITY, c);
        for &b in &self.colors {
            let d = dist(c, b);
            if d < best.0 {
                best = (d, b);
            }
        }
        for &(i, j) in self.blends {
            let (a, b) = (self.colors[i], self.colors[j]);
            let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
            let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
            if len2 <= 0.0 {
                continue;
            }
            let t = (((c[0] - a[0]) * ab[0] + (c[1] - a[1]) * ab[1] + (c[2] - a[2]) * ab[2])
                / len2)
                .clamp(0.0, 1.0);
            let q = [a[0] + t * ab[0], a[1] + t * ab[1], a[2] + t * ab[2]];
            let d = dist(c, q);
            if d < best.0 {
                best = (d, q);
            }
        }
        best
    }

    fn distance(&self, c: Rgbf) -> f32 {
        let mut best = f32::INFINITY;
        for &b in &self.colors {
            best = best.min(dist(c, b));
        }
        for &(i, j) in self.blends {
            best = best.min(super::world::segment_distance(
                c,
                self.colors[i],
                self.colors[j],
            ));
        }
        best
    }

    /// One k-means step from the nominal colours: each colour moves to the
    /// mean of the pixels nearest to it (within [`ADAPT_RADIUS`]).
    fn adapt(&mut self, px: &[Rgbf]) {
        let k = self.colors.len();
        let mut sum = vec![[0f64; 3]; k];
        let mut count = vec![0usize; k];
        for &p in px {
            let (j, d) = self
                .colors
                .iter()
                .enumerate()
                .map(|(j, &c)| (j, dist(p, c)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or((0, f32::INFINITY));
            if d < ADAPT_RADIUS {
                count[j] += 1;
                for (s, &v) in sum[j].iter_mut().zip(&p) {
                    *s += v as f64;
                }
            }
        }
        for ((color, s), &c) in self.colors.iter_mut().zip(&sum).zip(&count) {
            if c >= 16 {
                for (o, &v) in color.iter_mut().zip(s) {
                    *o = (v / c as f64) as f32;
                }
            }
        }
    }
}

fn read_pixels(px: &[Rgbf]) -> (Reading, Vec<Rgbf>) {
    let den = median3x3(px);

    // context, on every other pixel of every other row
    let probe: Vec<Rgbf> = (0..SIZE / 2)
        .flat_map(|y| (0..SIZE / 2).map(move |x| (2 * y + (x % 2)) * SIZE + 2 * x))
        .map(|i| den[i])
        .collect();
    let mut context_scores = [0f32; 6];
    for ctx in Context::ALL {
        let model = BgModel::of(ctx);
        let s: f32 = probe
            .iter()
            .map(|&p| {
                let d = model.distance(p) / CONTEXT_SIGMA;
                (-0.5 * d * d).exp()
            })
            .sum();
        context_scores[ctx.index()] = s / probe.len() as f32;
    }
    let context = Context::ALL
        .into_iter()
        .max_by(|a, b| context_scores[a.index()].total_cmp(&context_scores[b.index()]))
        .unwrap_or(Context::Beach);

    // object mask
    let mut model = BgModel::of(context);
    model.adapt(&den);
    let far: Vec<bool> = den
        .iter()
        .map(|&p| model.distance(p) > MASK_THRESHOLD)
        .collect();
    let rough = largest_component(&far);
    let mask = refine_mask(&den, &model, &rough);
    let area = mask.iter().filter(|&&m| m).count();
    let object = (area >= MIN_OBJECT_AREA).then(|| describe_object(&den, mask, area));
    (
        Reading {
            context,
            context_score: context_scores[context.index()],
            context_scores,
            object,
        },
        den,
    )
}

/// Re-thresholds a rough object mask at half contrast: near the object a
/// pixel belongs to it when it is closer to the local object colour (that of
/// the nearest interior pixel of the rough mask) than to the background. A
/// fixed threshold dilates high-contrast blurred objects (a black star on the
/// snow turns into a blob); half contrast keeps their shape.
fn refine_mask(den: &[Rgbf], model: &BgModel, rough: &[bool]) -> Vec<bool> {
    let n = SIZE as isize;
    let inside = |x: isize, y: isize| (0..n).contains(&x) && (0..n).contains(&y);
    let interior: Vec<usize> = (0..rough.len())
        .filter(|&i| {
            let (x, y) = ((i as isize) % n, (i as isize) / n);
            rough[i]
                && (-1..=1).all(|dy| {
                    (-1..=1)
                        .all(|dx| inside(x + dx, y + dy) && rough[((y + dy) * n + x + dx) as usize])
                })
        })
        .collect();
    // sources: interior pixels that are not a blend of a stronger nearby
    // object colour with the background (a blurred, filled-in ring hole is)
    let interior: Vec<usize> = interior
        .into_iter()
        .filter(|&i| {
            let p = den[i];
            let (bp, g) = model.nearest(p);
            let (x, y) = ((i as isize) % n, (i as isize) / n);
            !(-3..=3).any(|dy| {
                (-3..=3).any(|dx| {
                    let (xx, yy) = (x + dx, y + dy);
                    if !inside(xx, yy) || !rough[(yy * n + xx) as usize] {
                        return false;
                    }
                    let q = den[(yy * n + xx) as usize];
                    let gq = dist(q, g);
                    bp < 0.75 * gq
                        && super::world::segment_distance(p, g, q) < (0.15 * gq).max(12.0)
                })
            })
        })
        .collect();
    let sources: Vec<usize> = if interior.len() >= 4 {
        interior
    } else {
        (0..rough.len()).filter(|&i| rough[i]).collect()
    };
    if sources.is_empty() {
        return rough.to_vec();
    }
    // breadth-first propagation of the nearest source's colour, up to 3 px
    let mut local: Vec<Option<Rgbf>> = vec![None; rough.len()];
    let mut depth = vec![0u8; rough.len()];
    let mut queue = std::collections::VecDeque::new();
    for &i in &sources {
        local[i] = Some(den[i]);
        queue.push_back(i);
    }
    while let Some(i) = queue.pop_front() {
        let (x, y) = ((i as isize) % n, (i as isize) / n);
        let far_enough = !rough[i] && depth[i] >= 3;
        if far_enough {
            continue;
        }
        for (dx, dy) in [(-1, 0), (1, 0), (0, -1), (0, 1)] {
            let (xx, yy) = (x + dx, y + dy);
            if inside(xx, yy) {
                let j = (yy * n + xx) as usize;
                if local[j].is_none() {
                    local[j] = local[i];
                    depth[j] = if rough[j] { 0 } else { depth[i] + 1 };
                    queue.push_back(j);
                }
            }
        }
    }
    let candidate: Vec<bool> = (0..rough.len())
        .map(|i| {
            local[i].is_some_and(|c| {
                let b = model.distance(den[i]);
                b > 0.5 * MASK_THRESHOLD && dist(den[i], c) < b
            })
        })
        .collect();
    let refined = largest_component(&candidate);
    if refined.iter().filter(|&&m| m).count() >= MIN_OBJECT_AREA {
        refined
    } else {
        rough.to_vec()
    }
}

/// The largest object in a `SIZE·SIZE` mask: the pixels of the mask in the
/// largest 8-connected component of its 3×3 dilation, so that 1 px gaps (a
/// row of blended pixels between two stripes that happens to look like the
/// background) do not split an object.
fn largest_component(far: &[bool]) -> Vec<bool> {
    let n = SIZE as isize;
    let dilated: Vec<bool> = (0..far.len())
        .map(|i| {
            let (x, y) = ((i as isize) % n, (i as isize) / n);
            (-1..=1).any(|dy| {
                (-1..=1).any(|dx| {
                    let (xx, yy) = (x + dx, y + dy);
                    (0..n).contains(&xx) && (0..n).contains(&yy) && far[(yy * n + xx) as usize]
                })
            })
        })
        .collect();
    let mut label = vec![0u32; far.len()];
    let mut best = (0u32, 0usize);
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..far.len() {
        if !far[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        // component size counts only the original mask's pixels
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += far[i] as usize;
            let (x, y) = ((i as isize) % n, (i as isize) / n);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (xx, yy) = (x + dx, y + dy);
                    if (0..n).contains(&xx) && (0..n).contains(&yy) {
                        let j = (yy * n + xx) as usize;
                        if dilated[j] && label[j] == 0 {
                            label[j] = next;
                            stack.push(j);
                        }
                    }
                }
            }
        }
        if size > best.1 {
            best = (next, size);
        }
    }
    (0..far.len())
        .map(|i| far[i] && label[i] == best.0 && best.0 != 0)
        .collect()
}

fn describe_object(den: &[Rgbf], mask: Vec<bool>, area: usize) -> ObjectReading {
    let n = SIZE;
    let (mut x0, mut y0, mut x1, mut y1) = (n, n, 0, 0);
    let (mut sx, mut sy) = (0f32, 0f32);
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let (x, y) = (i % n, i / n);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x + 1);
        y1 = y1.max(y + 1);
        sx += x as f32 + 0.5;
        sy += y as f32 + 0.5;
    }
    let bbox = [x0, y0, x1, y1];
    let centroid = (sx / area as f32, sy / area as f32);

    // class: the silhouette, placed to match the mask's area and centroid,
    // that overlaps the mask best
    let mut class_scores = [0f32; 6];
    for class in Class::ALL {
        let f = Fit::of(class, area, centroid);
        class_scores[class.index()] = f.iou(class, &mask, bbox);
    }
    let class = Class::ALL
        .into_iter()
        .max_by(|a, b| class_scores[a.index()].total_cmp(&class_scores[b.index()]))
        .unwrap_or(Class::Ball);

    // colour: median of the interior (mask pixels whose 4 neighbours are in
    // the mask), or of the whole mask if the interior is tiny
    let interior: Vec<usize> = (0..mask.len())
        .filter(|&i| {
            let (x, y) = (i % n, i / n);
            mask[i]
                && x > 0
                && y > 0
                && x + 1 < n
                && y + 1 < n
                && mask[i - 1]
                && mask[i + 1]
                && mask[i - n]
                && mask[i + n]
        })
        .collect();
    let idx: Vec<usize> = if interior.len() >= 12 {
        interior
    } else {
        (0..mask.len()).filter(|&i| mask[i]).collect()
    };
    let mut rgb = [0f32; 3];
    for (ch, o) in rgb.iter_mut().enumerate() {
        let mut v: Vec<f32> = idx.iter().map(|&i| den[i][ch]).collect();
        v.sort_unstable_by(f32::total_cmp);
        *o = v[v.len() / 2];
    }
    let (color, d) = nearest_color(rgb);
    let d = d / COLOR_SIGMA;
    ObjectReading {
        class,
        class_score: class_scores[class.index()],
        class_scores,
        color,
        color_score: (-0.5 * d * d).exp(),
        rgb,
        bbox,
        area,
        centroid,
        mask,
    }
}

/// The palette colour nearest to an RGB colour, and its distance.
pub fn nearest_color(rgb: [f32; 3]) -> (Color, f32) {
    Color::ALL
        .into_iter()
        .map(|c| (c, dist(rgb, c.rgb())))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((Color::Black, f32::INFINITY))
}

fn bilinear(px: &[Rgbf], x: f32, y: f32) -> Rgbf {
    let m = (SIZE - 1) as f32;
    let (x, y) = (x.clamp(0.0, m), y.clamp(0.0, m));
    let (xi, yi) = (x.floor() as usize, y.floor() as usize);
    let (xj, yj) = ((xi + 1).min(SIZE - 1), (yi + 1).min(SIZE - 1));
    let (fx, fy) = (x - xi as f32, y - yi as f32);
    let mut out = [0f32; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let a = px[yi * SIZE + xi][k] * (1.0 - fx) + px[yi * SIZE + xj][k] * fx;
        let b = px[yj * SIZE + xi][k] * (1.0 - fx) + px[yj * SIZE + xj][k] * fx;
        *o = a * (1.0 - fy) + b * fy;
    }
    out
}

/// Colour at an image point (pixel centres at `k + 0.5`).
fn sample_color(px: &[Rgbf], x: f32, y: f32) -> Rgbf {
    bilinear(px, x - 0.5, y - 0.5)
}

/// Mask value at an image point (false outside the image).
fn sample_mask(mask: &[bool], x: f32, y: f32) -> bool {
    x >= 0.0
        && y >= 0.0
        && (x as usize) < SIZE
        && (y as usize) < SIZE
        && mask[y as usize * SIZE + x as usize]
}

/// Unit-space geometry of a class silhouette.
struct ClassGeom {
    /// Area, in unit².
    area: f32,
    /// Centroid.
    cu: f32,
    cv: f32,
    /// Bounding box `[u0, v0, u1, v1]`.
    bbox: [f32; 4],
}

fn geoms() -> &'static [ClassGeom; 6] {
    static G: OnceLock<[ClassGeom; 6]> = OnceLock::new();
    G.get_or_init(|| {
        Class::ALL.map(|class| {
            let steps = 400;
            let cell = 2.0 / steps as f32;
            let (mut n, mut su, mut sv) = (0usize, 0f32, 0f32);
            let mut bbox = [1f32, 1.0, -1.0, -1.0];
            for a in 0..steps {
                for b in 0..steps {
                    let u = -1.0 + (a as f32 + 0.5) * cell;
                    let v = -1.0 + (b as f32 + 0.5) * cell;
                    if class.inside(u, v) {
                        n += 1;
                        su += u;
                        sv += v;
                        bbox = [
                            bbox[0].min(u),
                            bbox[1].min(v),
                            bbox[2].max(u),
                            bbox[3].max(v),
                        ];
                    }
                }
            }
            ClassGeom {
                area: n as f32 * cell * cell,
                cu: su / n as f32,
                cv: sv / n as f32,
                bbox: [
                    bbox[0] - cell / 2.0,
                    bbox[1] - cell / 2.0,
                    bbox[2] + cell / 2.0,
                    bbox[3] + cell / 2.0,
                ],
            }
        })
    })
}

/// A class silhouette placed on an image: unit coordinates `(u, v)` sit at
/// pixel `(x + u·scale, y + v·scale)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    pub x: f32,
    pub y: f32,
    pub scale: f32,
}

impl Fit {
    /// The placement whose silhouette has the mask's area and centroid.
    pub fn of(class: Class, area: usize, centroid: (f32, f32)) -> Fit {
        let g = &geoms()[class.index()];
        let scale = (area as f32 / g.area).sqrt();
        Fit {
            x: centroid.0 - g.cu * scale,
            y: centroid.1 - g.cv * scale,
            scale,
        }
    }

    fn point(&self, u: f32, v: f32) -> (f32, f32) {
        (self.x + u * self.scale, self.y + v * self.scale)
    }

    /// Pixel-level intersection-over-union of the placed silhouette with a
    /// mask whose pixels lie in `bbox`.
    fn iou(&self, class: Class, mask: &[bool], bbox: [usize; 4]) -> f32 {
        let g = &geoms()[class.index()];
        let (tx0, ty0) = self.point(g.bbox[0], g.bbox[1]);
        let (tx1, ty1) = self.point(g.bbox[2], g.bbox[3]);
        let lo = |a: f32, b: usize| (a.floor().max(0.0) as usize).min(b);
        let hi = |a: f32, b: usize| (a.ceil().max(0.0) as usize).max(b).min(SIZE);
        let (x0, y0) = (lo(tx0, bbox[0]), lo(ty0, bbox[1]));
        let (x1, y1) = (hi(tx1, bbox[2]), hi(ty1, bbox[3]));
        let (mut inter, mut union) = (0usize, 0usize);
        for y in y0..y1 {
            for x in x0..x1 {
                let u = (x as f32 + 0.5 - self.x) / self.scale;
                let v = (y as f32 + 0.5 - self.y) / self.scale;
                let t = u.abs() <= 1.0 && v.abs() <= 1.0 && class.inside(u, v);
                let m = mask[y * SIZE + x];
                inter += (t && m) as usize;
                union += (t || m) as usize;
            }
        }
        if union == 0 {
            0.0
        } else {
            inter as f32 / union as f32
        }
    }
}

// ---------------------------------------------------------------------------
// Subject fidelity
// ---------------------------------------------------------------------------

/// How closely an image's object matches a subject.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SubjectScore {
    /// IoU of the object's mask with the subject's silhouette (placed to
    /// match the mask's area and centroid).
    pub shape: f32,
    /// Mean colour agreement over the subject's silhouette cells,
    /// `exp(-d²/2σ²)` with σ = 50.
    pub color: f32,
    /// Pattern agreement: the covariance of the object's colours with the
    /// subject's over its silhouette, divided by the larger of the two
    /// variances (clamped at 0): near 1 for the same pattern at the same
    /// contrast, 0 for a plain object or an unrelated pattern.
    pub pattern: f32,
    /// Geometric mean of the three, in `[0, 1]`.
    pub score: f32,
}

/// An image's main object, ready for comparisons.
struct Object {
    px: Vec<Rgbf>,
    reading: ObjectReading,
}

fn object(img: &RgbImage) -> Option<Object> {
    let px = pixels(img);
    let (reading, _) = read_pixels(&px);
    reading.object.map(|reading| Object { px, reading })
}

/// The canonical `GRID`×`GRID` cells of a class's unit bounding box: each
/// cell's centre and whether it lies in the silhouette.
fn class_cells(class: Class) -> Vec<((f32, f32), bool)> {
    let [u0, v0, u1, v1] = geoms()[class.index()].bbox;
    let mut out = Vec::with_capacity(GRID * GRID);
    for i in 0..GRID {
        for j in 0..GRID {
            let u = u0 + (j as f32 + 0.5) / GRID as f32 * (u1 - u0);
            let v = v0 + (i as f32 + 0.5) / GRID as f32 * (v1 - v0);
            out.push(((u, v), class.inside(u, v)));
        }
    }
    out
}

/// Colour pairs (image, appearance) over a class silhouette placed on the
/// image's object.
fn paired_colors(
    obj: &Object,
    class: Class,
    paint: impl Fn(f32, f32) -> Rgbf,
) -> Vec<(Rgbf, Rgbf)> {
    let o = &obj.reading;
    let fit = Fit::of(class, o.area, o.centroid);
    class_cells(class)
        .into_iter()
        .filter(|&(_, inside)| inside)
        .map(|((u, v), _)| {
            let (x, y) = fit.point(u, v);
            (sample_color(&obj.px, x, y), paint(u, v))
        })
        .collect()
}

fn color_match(pairs: &[(Rgbf, Rgbf)]) -> f32 {
    if pairs.is_empty() {
        return 0.0;
    }
    pairs
        .iter()
        .map(|(a, b)| {
            let d = dist(*a, *b) / PATTERN_SIGMA;
            (-0.5 * d * d).exp()
        })
        .sum::<f32>()
        / pairs.len() as f32
}

fn pattern_agreement(pairs: &[(Rgbf, Rgbf)]) -> f32 {
    if pairs.len() < 2 {
        return 0.0;
    }
    let n = pairs.len() as f32;
    let (mut sab, mut saa, mut sbb) = (0f32, 0f32, 0f32);
    for k in 0..3 {
        let ma = pairs.iter().map(|p| p.0[k]).sum::<f32>() / n;
        let mb = pairs.iter().map(|p| p.1[k]).sum::<f32>() / n;
        for (a, b) in pairs {
            let (da, db) = (a[k] - ma, b[k] - mb);
            sab += da * db;
            saa += da * da;
            sbb += db * db;
        }
    }
    if saa <= 0.0 || sbb <= 0.0 {
        0.0
    } else {
        (sab / saa.max(sbb)).max(0.0)
    }
}

/// Subject fidelity of an image's main object: shape, colour agreement and
/// pattern agreement with the subject's canonical appearance (the subject's
/// silhouette is placed to match the object's area and centroid, so place
/// and size do not matter). All zero if the image has no object.
pub fn subject_fidelity(img: &RgbImage, subject: Subject) -> SubjectScore {
    let Some(obj) = object(img) else {
        return SubjectScore::default();
    };
    let class = subject.class();
    let o = &obj.reading;
    let shape = Fit::of(class, o.area, o.centroid).iou(class, &o.mask, o.bbox);
    let pairs = paired_colors(&obj, class, |u, v| subject.color_at(u, v));
    let color = color_match(&pairs);
    let pattern = pattern_agreement(&pairs);
    SubjectScore {
        shape,
        color,
        pattern,
        score: (shape * color * pattern).cbrt(),
    }
}

/// Does an image's object look like the subject, or like a plain instance of
/// its class?
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SubjectLikeness {
    /// Colour agreement with the subject's canonical appearance.
    pub subject: f32,
    /// Best colour agreement with a plain object of the subject's class.
    pub plain: f32,
    /// The palette colour of that best plain object.
    pub plain_color: Option<Color>,
    /// `sigmoid((subject - plain) / 0.1)`: near 1 for the subject, near 0
    /// for a plain object.
    pub p_subject: f32,
}

/// Compares an image's object with the subject and with plain objects of the
/// subject's class in every palette colour.
pub fn subject_likeness(img: &RgbImage, subject: Subject) -> SubjectLikeness {
    let Some(obj) = object(img) else {
        return SubjectLikeness::default();
    };
    let class = subject.class();
    let s = color_match(&paired_colors(&obj, class, |u, v| subject.color_at(u, v)));
    let (plain_color, p) = Color::ALL
        .into_iter()
        .map(|c| {
            let rgb = c.rgb();
            (c, color_match(&paired_colors(&obj, class, |_, _| rgb)))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((Color::Black, 0.0));
    SubjectLikeness {
        subject: s,
        plain: p,
        plain_color: Some(plain_color),
        p_subject: 1.0 / (1.0 + (-(s - p) / 0.1).exp()),
    }
}

/// An object in a class-free frame: centred on its centroid, scaled by its
/// equivalent disc radius, sampled on a `GRID`×`GRID` grid over ±1.6 radii.
fn normalized_cells(obj: &Object) -> Vec<(bool, Rgbf)> {
    let o = &obj.reading;
    let r = (o.area as f32 / std::f32::consts::PI).sqrt();
    let mut out = Vec::with_capacity(GRID * GRID);
    for i in 0..GRID {
        for j in 0..GRID {
            let p = |k: usize| -1.6 + 3.2 * (k as f32 + 0.5) / GRID as f32;
            let (x, y) = (o.centroid.0 + p(j) * r, o.centroid.1 + p(i) * r);
            out.push((sample_mask(&o.mask, x, y), sample_color(&obj.px, x, y)));
        }
    }
    out
}

/// Appearance similarity of the main objects of two images in `[0, 1]` (a
/// CLIP-I/DINO analog): both objects are centred on their centroids and
/// scaled to the same area, then compared cell by cell, a cell in both masks
/// scoring its colour agreement and a cell in only one scoring 0, averaged
/// over the union of the masks.
pub fn object_similarity(a: &RgbImage, b: &RgbImage) -> f32 {
    let (Some(oa), Some(ob)) = (object(a), object(b)) else {
        return 0.0;
    };
    let (ca, cb) = (normalized_cells(&oa), normalized_cells(&ob));
    let (mut s, mut n) = (0f32, 0usize);
    for ((ma, xa), (mb, xb)) in ca.iter().zip(&cb) {
        match (ma, mb) {
            (true, true) => {
                let d = dist(*xa, *xb) / PATTERN_SIGMA;
                s += (-0.5 * d * d).exp();
                n += 1;
            }
            (false, false) => {}
            _ => n += 1,
        }
    }
    if n == 0 { 0.0 } else { s / n as f32 }
}

// ---------------------------------------------------------------------------
// Diversity
// ---------------------------------------------------------------------------

/// Perceptual-ish distance of two images in `[0, 1]` (an LPIPS analog for
/// DreamBooth's DIV): the mean absolute difference averaged over four scales
/// (64, 32, 16, 8 px), so both fine appearance and layout count.
pub fn image_distance(a: &RgbImage, b: &RgbImage) -> f32 {
    let (mut pa, mut pb) = (pixels(a), pixels(b));
    let mut side = SIZE;
    let mut total = 0f32;
    for _ in 0..4 {
        let d: f32 = pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| (0..3).map(|k| (x[k] - y[k]).abs()).sum::<f32>())
            .sum();
        total += d / (pa.len() * 3) as f32 / 255.0;
        pa = downsample(&pa, side);
        pb = downsample(&pb, side);
        side /= 2;
    }
    total / 4.0
}

fn downsample(px: &[Rgbf], side: usize) -> Vec<Rgbf> {
    let h = side / 2;
    let mut out = vec![[0f32; 3]; h * h];
    for y in 0..h {
        for x in 0..h {
            for k in 0..3 {
                out[y * h + x][k] = 0.25
                    * (px[2 * y * side + 2 * x][k]
                        + px[2 * y * side + 2 * x + 1][k]
                        + px[(2 * y + 1) * side + 2 * x][k]
                        + px[(2 * y + 1) * side + 2 * x + 1][k]);
            }
        }
    }
    out
}

/// Mean pairwise [`image_distance`] of a set of images (DIV analog); 0 for
/// fewer than two.
pub fn diversity(images: &[RgbImage]) -> f32 {
    let (mut s, mut n) = (0f32, 0usize);
    for i in 0..images.len() {
        for j in i + 1..images.len() {
            s += image_distance(&images[i], &images[j]);
            n += 1;
        }
    }
    if n == 0 { 0.0 } else { s / n as f32 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy::world::ToyRng;

    #[test]
    fn median9_is_the_median() {
        let mut rng = ToyRng::new(1);
        for _ in 0..2000 {
            let mut v = [0f32; 9];
            for x in v.iter_mut() {
                *x = (rng.below(12)) as f32;
            }
            let mut s = v;
            s.sort_unstable_by(f32::total_cmp);
            assert_eq!(median9(v), s[4], "{v:?}");
        }
    }
}
