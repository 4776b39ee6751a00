//! The GPU convolution's backward (nn::conv_gemm: GEMMs on recomputed
//! columns, col2im) against candle's conv2d and its autograd, on the CPU:
//! values, input and weight gradients, strides, paddings, 1×1 and odd sizes,
//! and no gradient computed for a frozen operand.

use candle_core::{Device, Tensor, Var};
use dreambooth::nn::conv_gemm;

fn randn(dims: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    dreambooth::util::randn(&mut rng, dims, &Device::Cpu).unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() as f64 / n.to_scalar::<f32>().unwrap() as f64).sqrt()
}

#[test]
fn gradients_match_candle_conv2d() {
    // (B, C, H, W), (O, kh, kw), stride, padding
    let cases: [([usize; 4], [usize; 3], usize, usize); 6] = [
        ([2, 3, 8, 8], [5, 3, 3], 1, 1),
        ([2, 4, 8, 8], [4, 3, 3], 2, 1),
        ([1, 3, 7, 9], [2, 3, 3], 2, 0),
        ([2, 6, 5, 5], [3, 1, 1], 1, 0),
        ([1, 2, 6, 10], [3, 3, 2], 1, 2),
        ([3, 2, 4, 4], [2, 4, 4], 1, 1),
    ];
    for (i, (xd, [o, kh, kw], stride, pad)) in cases.into_iter().enumerate() {
        let x = Var::from_tensor(&randn(&xd, 10 + i as u64)).unwrap();
        let w = Var::from_tensor(&randn(&[o, xd[1], kh, kw], 20 + i as u64)).unwrap();
        let ours = conv_gemm::conv2d(x.as_tensor(), w.as_tensor(), stride, pad).unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(w.as_tensor(), pad, stride, 1, 1)
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "case {i}");
        assert_eq!(rel(&ours, &theirs), 0.0, "case {i}: forward");
        let r = randn(ours.dims(), 30 + i as u64);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ex = rel(g1.get(&x).unwrap(), g2.get(&x).unwrap());
        let ew = rel(g1.get(&w).unwrap(), g2.get(&w).unwrap());
        assert!(ex < 1e-5 && ew < 1e-5, "case {i}: dx {ex:.2e} dw {ew:.2e}");
    }
}

#[test]
fn frozen_operands_get_no_gradient() {
    let x = Var::from_tensor(&randn(&[2, 3, 6, 6], 1)).unwrap();
    let w = randn(&[4, 3, 3, 3], 2);
    let y = conv_gemm::conv2d(x.as_tensor(), &w, 1, 1).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_some());
    assert!(g.get(&w).is_none());
    let xc = randn(&[2, 3, 6, 6], 3);
    let wv = Var::from_tensor(&randn(&[4, 3, 3, 3], 4)).unwrap();
    let y = conv_gemm::conv2d(&xc, wv.as_tensor(), 1, 1).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&wv).is_some());
    assert!(g.get(&xc).is_none());
    let e = conv_gemm::conv2d(&xc, &randn(&[4, 2, 3, 3], 5), 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv2d"), "{e}");
}
