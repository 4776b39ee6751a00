//! f32 math for the CPU kernels' inner loops: `exp`, `erf` and the lane-wise
//! sums, written without branches or library calls so that a loop over a
//! slice compiles to SIMD instructions, and [`simd`], which runs a kernel's
//! loop compiled for AVX2 + FMA where the processor has them (the binary
//! itself targets baseline x86-64, whose SSE2 has 4 lanes and no FMA).
//!
//! libm's `expf` and candle's `erf` are exact to an ulp or so but are
//! function calls per element; these are within 2e-7 relative (`exp`) and
//! 5e-7 absolute (`erf`) of them, far below what the training tests and the
//! parity fixtures resolve.

/// Runs `f` compiled with the best instruction set the CPU has (AVX2 + FMA
/// on x86-64 machines since 2013; the baseline elsewhere). `f` and what it
/// calls are inlined into a function built for those features, so loops in
/// it are vectorized for them. Call it around a whole inner loop (per row
/// block), not per element.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2²³: adding it rounds an f32 below 2²² to an integer, in its low bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x (Cephes' polynomial on [−ln2/2, ln2/2] and an exponent built from
/// bits); 0 below −87.3, +∞ above 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n is in [−126, 128]: its bits sit in the low mantissa bits of t. 2ⁿ
    // as 2^(n/2) · 2^(n − n/2), each a normal f32.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let (n1, n2) = (ni >> 1, ni - (ni >> 1));
    let pow2 = |k: i32| f32::from_bits(((k + 127) << 23) as u32);
    let scaled = e * pow2(n1) * pow2(n2);
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        scaled
    }
}

/// erf(x), Abramowitz & Stegun 7.1.26 (absolute error below 5e-7 in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_given_exp(x, exp(-x * x))
}

/// erf(x) from `e` = e^(−x²), which the caller may need for itself (the
/// Gaussian density in GELU's derivative is the same exponential).
#[inline(always)]
pub fn erf_given_exp(x: f32, e: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * e;
    y.copysign(x)
}

/// 1 / (1 + e^−z).
#[inline(always)]
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

/// Lanes of the vectorized sums below.
const LANES: usize = 16;

/// Σ v, in f32 lanes, returned as f64.
#[inline(always)]
pub fn sum(v: &[f32]) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().chain(rest).map(|&a| a as f64).sum()
}

/// Σ (v − m)², in f32 lanes, returned as f64.
#[inline(always)]
pub fn sum_sq_dev(v: &[f32], m: f32) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += (x - m) * (x - m);
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>()
        + rest
            .iter()
            .map(|&x| ((x - m) * (x - m)) as f64)
            .sum::<f64>()
}

/// max v (−∞ for an empty slice), in lanes.
#[inline(always)]
pub fn max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x))
}

/// Σ a·b, in f32 lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_dev(a, b, 0.0)
}

/// Σ a·(b − m), in f32 lanes.
#[inline(always)]
pub fn dot_dev(a: &[f32], b: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let full = n - n % LANES;
    for (ca, cb) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += ca[l] * (cb[l] - m);
        }
    }
    let tail: f32 = a[full..]
        .iter()
        .zip(&b[full..])
        .map(|(x, y)| x * (y - m))
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// `row` ← softmax(scale · row) (scale > 0).
#[inline(always)]
pub fn softmax_in_place(row: &mut [f32], scale: f32) {
    let m = max(row);
    for v in row.iter_mut() {
        *v = exp((*v - m) * scale);
    }
    let inv = (1.0 / sum(row)) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        for i in -19_700..=20_000 {
            let x = i as f32 * 0.004_4;
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "exp relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!((exp(88.5) as f64 / 88.5f64.exp() - 1.0).abs() < 3e-7);
    }

    #[test]
    fn erf_matches_libm() {
        let mut worst = 0f64;
        for i in -10_000..=10_000 {
            let x = i as f32 * 0.000_7;
            let (a, b) = (erf(x) as f64, candle_core::cpu::erf::erf_f64(x as f64));
            worst = worst.max((a - b).abs());
        }
        assert!(worst < 5e-7, "erf absolute error {worst}");
        assert_eq!(erf(0.0), 0.0);
        assert!(erf(-3.0) < -0.999);
    }

    #[test]
    fn softmax_max_dot_match_plain() {
        let v: Vec<f32> = (0..37)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.7)
            .collect();
        assert_eq!(max(&v), v.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)));
        let d: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!((dot(&v, &v) as f64 - d).abs() / d < 1e-6);
        let dd: f64 = v.iter().map(|&x| (x as f64) * (x as f64 - 0.25)).sum();
        assert!((dot_dev(&v, &v, 0.25) as f64 - dd).abs() / dd < 1e-6);
        let mut p = v.clone();
        softmax_in_place(&mut p, 0.5);
        let m = v.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let z: f64 = v.iter().map(|&x| ((x as f64 - m) * 0.5).exp()).sum();
        for (&pi, &x) in p.iter().zip(&v) {
            let want = ((x as f64 - m) * 0.5).exp() / z;
            assert!(
                (pi as f64 - want).abs() < 1e-6 * want.max(1e-3),
                "{pi} vs {want}"
            );
        }
    }

    #[test]
    fn lane_sums_match_f64() {
        let v: Vec<f32> = (0..1037)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let s: f64 = v.iter().map(|&x| x as f64).sum();
        assert!((sum(&v) - s).abs() < 1e-5);
        let m = (s / v.len() as f64) as f32;
        let q: f64 = v.iter().map(|&x| ((x - m) as f64).powi(2)).sum();
        assert!((sum_sq_dev(&v, m) - q).abs() / q < 1e-6);
    }
}
