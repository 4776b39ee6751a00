//! The paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) against NumPy, on
//! tests/fixtures/metrics.safetensors (tools/parity/metrics.py), and on
//! constructed cases; the identifier-removal rule of CLIP-T's prompts.

mod common;
use common::to_f64;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dreambooth::eval::metrics::{self, prompt_for_clip_t};

const TOL: f64 = 1e-5;

fn fixture() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics.safetensors");
    // candle's loader keeps the expected values in f64.
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    to_f64(t)[0]
}

fn close(name: &str, got: f64, want: f64) {
    let e = (got - want).abs() / want.abs().max(1.0);
    println!("{name:<14} ours {got:+.10}  numpy {want:+.10}  err {e:.1e}");
    assert!(e < TOL, "{name}: {got} vs {want} (error {e:.2e})");
}

fn t(rows: &[&[f32]]) -> Tensor {
    let d = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).unwrap()
}

#[test]
fn metrics_match_numpy() {
    let fx = fixture();
    let (g, r, txt, cls) = (&fx["gen"], &fx["real"], &fx["text"], &fx["cls"]);
    let want_cos = to_f64(&fx["cos"]);
    let cos = metrics::cosine_matrix(g, r).unwrap();
    assert_eq!((cos.len(), cos[0].len()), (6, 4));
    for (i, (&got, &want)) in cos.iter().flatten().zip(&want_cos).enumerate() {
        close(&format!("cos[{i}]"), got, want);
    }
    let mp = scalar(&fx["mean_pairwise"]);
    close(
        "mean_pairwise",
        metrics::mean_pairwise_cosine(g, r).unwrap(),
        mp,
    );
    close("dino", metrics::dino(g, r).unwrap(), mp);
    close("clip_i", metrics::clip_i(g, r).unwrap(), mp);
    close(
        "distinct",
        metrics::mean_pairwise_cosine_distinct(r).unwrap(),
        scalar(&fx["distinct"]),
    );
    let rowwise = metrics::rowwise_cosine(g, txt).unwrap();
    for (i, (&got, want)) in rowwise.iter().zip(to_f64(&fx["rowwise"])).enumerate() {
        close(&format!("rowwise[{i}]"), got, want);
    }
    close(
        "clip_t",
        metrics::clip_t(g, txt).unwrap(),
        scalar(&fx["clip_t"]),
    );
    close("pres", metrics::pres(cls, r).unwrap(), scalar(&fx["pres"]));

    let groups: Vec<Vec<Vec<f64>>> = (0..3)
        .map(|k| {
            fx[&format!("div.g{k}")]
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec2()
                .unwrap()
        })
        .collect();
    let l2 = |a: &Vec<f64>, b: &Vec<f64>| -> dreambooth::Result<f64> {
        Ok(a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt())
    };
    close(
        "div_l2",
        metrics::div(&groups, l2).unwrap(),
        scalar(&fx["div_l2"]),
    );
}

#[test]
fn constructed_cases() {
    let e = [1.0f32, 2.0, -0.5, 3.0];
    let e2 = [2.0f32, 4.0, -1.0, 6.0]; // same direction, other length
    // One embedding repeated (at any scale): every pair has cosine 1.
    let one = t(&[&e, &e2, &e]);
    let cos1 = metrics::mean_pairwise_cosine(&one, &t(&[&e2, &e])).unwrap();
    assert!((cos1 - 1.0).abs() < 1e-12, "{cos1}");
    assert!((metrics::mean_pairwise_cosine_distinct(&one).unwrap() - 1.0).abs() < 1e-12);
    // A set against itself is 1 only when its embeddings agree: here the
    // diagonal pairs give 1, the two off-diagonal ones 0.
    let x = [1.0f32, 0.0, 0.0];
    let y = [0.0f32, 5.0, 0.0];
    let z = [0.0f32, 0.0, -2.0];
    let orth = t(&[&x, &y]);
    assert_eq!(metrics::mean_pairwise_cosine(&orth, &orth).unwrap(), 0.5);
    assert_eq!(metrics::mean_pairwise_cosine_distinct(&orth).unwrap(), 0.0);
    // Orthogonal sets: 0. Opposite: −1.
    assert_eq!(metrics::dino(&orth, &t(&[&z])).unwrap(), 0.0);
    let neg = [-1.0f32, 0.0, 0.0];
    assert_eq!(metrics::clip_i(&t(&[&x]), &t(&[&neg])).unwrap(), -1.0);
    // PRES is DINO on other inputs.
    assert_eq!(
        metrics::pres(&orth, &t(&[&x])).unwrap(),
        metrics::dino(&orth, &t(&[&x])).unwrap()
    );
    // CLIP-T pairs row by row; one text row serves every image.
    assert_eq!(
        metrics::rowwise_cosine(&orth, &t(&[&y, &x])).unwrap(),
        vec![0.0, 0.0]
    );
    assert_eq!(metrics::clip_t(&orth, &t(&[&x, &y])).unwrap(), 1.0);
    assert_eq!(metrics::clip_t(&orth, &t(&[&x])).unwrap(), 0.5);
    // DIV: group means, then the mean over groups (each prompt weighs the same).
    let groups = vec![vec![0.0, 1.0, 3.0], vec![10.0, 10.0]];
    let d = metrics::div(&groups, |a: &f64, b: &f64| Ok((a - b).abs())).unwrap();
    assert_eq!(d, ((1.0 + 3.0 + 2.0) / 3.0 + 0.0) / 2.0);
}

#[test]
fn invalid_inputs_are_errors() {
    let a = t(&[&[1.0, 0.0, 0.0]]);
    let b = t(&[&[1.0, 0.0]]);
    let e = metrics::dino(&a, &b).unwrap_err().to_string();
    assert!(e.contains("3 wide") && e.contains("2 wide"), "{e}");
    let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(metrics::clip_i(&empty, &a).is_err());
    assert!(metrics::dino(&a, &empty).is_err());
    let flat = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    assert!(metrics::dino(&flat, &a).is_err());
    let zero = t(&[&[0.0, 0.0, 0.0]]);
    let e = metrics::pres(&zero, &a).unwrap_err().to_string();
    assert!(e.contains("all zeros"), "{e}");
    let nan = t(&[&[f32::NAN, 0.0, 0.0]]);
    assert!(metrics::dino(&nan, &a).is_err());
    let two = t(&[&[1.0, 0.0, 0.0], &[0.0, 1.0, 0.0]]);
    let three = t(&[&[1.0, 0.0, 0.0], &[0.0, 1.0, 0.0], &[0.0, 0.0, 1.0]]);
    assert!(metrics::clip_t(&two, &three).is_err());
    assert!(metrics::rowwise_cosine(&two, &three).is_err());
    assert!(metrics::mean_pairwise_cosine_distinct(&a).is_err());
    let dist = |a: &f64, b: &f64| Ok((a - b).abs());
    assert!(metrics::div::<f64>(&[], dist).is_err());
    let e = metrics::div(&[vec![1.0, 2.0], vec![3.0]], dist)
        .unwrap_err()
        .to_string();
    assert!(e.contains("group 1 has 1 image"), "{e}");
    assert!(metrics::div(&[vec![]], dist).is_err());
    // The distance's own error comes through.
    let failing = |_: &f64, _: &f64| Err(dreambooth::Error::msg("boom"));
    assert!(metrics::div(&[vec![1.0, 2.0]], failing).is_err());
}

#[test]
fn identifier_is_removed_for_clip_t() {
    let cases = [
        ("a sks dog on the beach", "sks", "a dog on the beach"),
        ("a photo of sks dog", "sks", "a photo of dog"),
        ("sks dog", "sks", "dog"),
        ("a dog, sks", "sks", "a dog,"),
        ("A SKS dog", "sks", "A dog"),
        ("a Sks dog", "SKS", "a dog"),
        ("sks, a dog in the snow", "sks", ", a dog in the snow"),
        ("a (sks) dog", "sks", "a () dog"),
        ("the sks's toy", "sks", "the 's toy"),
        ("a sks dog and a sks cat", "sks", "a dog and a cat"),
        // Not whole words: kept.
        ("a sksdog and asks", "sks", "a sksdog and asks"),
        ("a sks_dog", "sks", "a sks_dog"),
        ("a sks2 dog", "sks", "a sks2 dog"),
        // Whitespace collapses; the identifier is trimmed.
        ("  a   sks\tdog  ", " sks ", "a dog"),
        // No identifier in the prompt, or an empty one.
        ("a dog on the beach", "sks", "a dog on the beach"),
        ("a  sks dog", "", "a sks dog"),
        // Other identifiers and non-ASCII neighbours.
        ("a photo of ohwx man", "ohwx", "a photo of man"),
        ("un chien sks à la plage", "sks", "un chien à la plage"),
        ("a ésks dog", "sks", "a ésks dog"),
        ("a <sks> dog", "<sks>", "a dog"),
    ];
    for (prompt, ident, want) in cases {
        assert_eq!(
            prompt_for_clip_t(prompt, ident),
            want,
            "{prompt:?} − {ident:?}"
        );
    }
}
