//! Our CUDA kernels and their launch plans, checked without a GPU: g++
//! builds `src/cuda/kernels.cu` with the CPU simulation of the CUDA thread
//! model in `tools/cuda/sim` (blocks, threads, __syncthreads, shared memory),
//! and each plan of `nn::gpu_plan` runs on it exactly as `src/cuda/exec.rs`
//! runs it on the GPU. The results are compared with the plain candle ops
//! (values and autograd gradients) in f32, bf16 and f16; every buffer has
//! guard bytes on both sides, so a kernel that writes out of bounds fails.

use std::ffi::{CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use dreambooth::nn::fused::plain;
use dreambooth::nn::gpu_plan::{self, Arg, Elem, Groups, Plan};

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, *mut *mut c_void) -> i32;

/// The simulation library, built once per test run.
fn sim() -> &'static libloading::Library {
    static LIB: OnceLock<libloading::Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libdreambooth_cuda_sim.so");
        let sim = root.join("tools/cuda/sim");
        let status = std::process::Command::new("g++")
            .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread"])
            .arg(format!("-I{}", sim.join("include").display()))
            .arg("-include")
            .arg(sim.join("cuda_sim.h"))
            .arg(sim.join("sim.cpp"))
            .arg("-o")
            .arg(&out)
            .status()
            .expect("g++ runs (the CUDA kernel simulation needs a C++20 compiler)");
        assert!(status.success(), "g++ failed on tools/cuda/sim/sim.cpp");
        // SAFETY: our own library; its constructors only build a static map.
        unsafe { libloading::Library::new(&out) }.expect("load the simulation library")
    })
}

/// Host buffers of a plan's element types: `bytes` per element, with guard
/// bytes before and after.
const GUARD: usize = 256;
const CANARY: u8 = 0xA5;

struct HostBuf {
    data: Vec<u8>,
    elem_bytes: usize,
}

impl HostBuf {
    fn new(len: usize, elem_bytes: usize) -> Self {
        let mut data = vec![CANARY; len * elem_bytes + 2 * GUARD];
        data[GUARD..GUARD + len * elem_bytes].fill(0);
        Self { data, elem_bytes }
    }
    fn ptr(&mut self, offset: usize) -> *mut c_void {
        // SAFETY: in bounds of data (checked by the caller's plan lengths).
        unsafe { self.data.as_mut_ptr().add(GUARD + offset * self.elem_bytes) as *mut c_void }
    }
    fn body(&self) -> &[u8] {
        &self.data[GUARD..self.data.len() - GUARD]
    }
    fn guards_intact(&self) -> bool {
        let n = self.data.len();
        self.data[..GUARD].iter().all(|&b| b == CANARY)
            && self.data[n - GUARD..].iter().all(|&b| b == CANARY)
    }
}

/// A tensor's elements as bytes of `dtype` (contiguous).
fn to_bytes(t: &Tensor, dtype: DType) -> Vec<u8> {
    let t = t.to_dtype(dtype).unwrap().flatten_all().unwrap();
    match dtype {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        d => panic!("{d:?}"),
    }
}

fn from_bytes(b: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        d => panic!("{d:?}"),
    }
}

/// Runs `plan` on the simulated GPU: inputs are tensors (converted to the
/// plan's element types, T = `dtype`), the result comes back as f32 values.
fn run(plan: &Plan, dtype: DType, inputs: &[&Tensor]) -> Vec<f32> {
    assert_eq!(plan.inputs.len(), inputs.len(), "plan inputs");
    let bytes = |e: Elem| match e {
        Elem::T => dtype.size_in_bytes(),
        Elem::F32 => 4,
    };
    let ty = |e: Elem| match e {
        Elem::T => dtype,
        Elem::F32 => DType::F32,
    };
    let mut bufs: Vec<HostBuf> = Vec::new();
    for (t, spec) in inputs.iter().zip(&plan.inputs) {
        assert_eq!(t.elem_count(), spec.len, "input size");
        let mut b = HostBuf::new(spec.len, bytes(spec.elem));
        let src = to_bytes(t, ty(spec.elem));
        b.data[GUARD..GUARD + src.len()].copy_from_slice(&src);
        bufs.push(b);
    }
    for spec in &plan.scratch {
        bufs.push(HostBuf::new(spec.len.max(1), bytes(spec.elem)));
    }
    let specs: Vec<_> = plan.inputs.iter().chain(&plan.scratch).copied().collect();
    // SAFETY: the symbol has this signature (tools/cuda/sim/sim.cpp).
    let launch: libloading::Symbol<LaunchFn> =
        unsafe { sim().get(b"dreambooth_sim_launch") }.unwrap();
    for l in &plan.launches {
        // Each argument's value in an 8-byte slot (f32 / i32 in the low bytes).
        let mut slots: Vec<u64> = l
            .args
            .iter()
            .map(|a| match *a {
                Arg::Buf { id, offset } => {
                    assert!(
                        offset <= specs[id].len,
                        "{}: offset past buffer {id}",
                        l.kernel
                    );
                    bufs[id].ptr(offset) as u64
                }
                Arg::Usize(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::I32(v) => v as u32 as u64,
            })
            .collect();
        let mut args: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // Any grid is correct (grid-stride loops): keep the simulation's
        // thread count small.
        let grid = l.grid.min((4096 / l.block).max(1));
        let name = CString::new(l.kernel.as_str()).unwrap();
        // SAFETY: args point at one value per kernel parameter; the buffers
        // hold what the plan sizes them for (guards checked below).
        let rc = unsafe { launch(name.as_ptr(), grid, l.block, args.as_mut_ptr()) };
        assert_eq!(rc, 0, "simulated launch of {} failed ({rc})", l.kernel);
    }
    for (i, b) in bufs.iter().enumerate() {
        assert!(b.guards_intact(), "a kernel wrote outside buffer {i}");
    }
    let out = &bufs[plan.output];
    from_bytes(out.body(), ty(specs[plan.output].elem))
}

fn randn(dims: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    dreambooth::util::randn(&mut rng, dims, &Device::Cpu).unwrap()
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// ‖a − b‖ / ‖b‖ within `tol`.
fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let (mut d, mut n) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite(), "{what}: non-finite value {x}");
        d += ((x - y) as f64).powi(2);
        n += (y as f64).powi(2);
    }
    let rel = (d / n.max(1e-30)).sqrt();
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.0e}");
}

const DTYPES: [(DType, &str, f64); 3] = [
    (DType::F32, "f32", 1e-5),
    (DType::BF16, "bf16", 2e-2),
    (DType::F16, "f16", 3e-3),
];

/// The input rounded to `dtype` (what the GPU op sees), back in f32.
fn rounded(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn softmax_forward_and_backward_match_plain_ops() {
    for (rows, d, scale) in [
        (37, 77, 0.125f32),
        (9, 300, 1.0),
        (4, 1, 0.5),
        (64, 1024, 0.3),
    ] {
        for (dtype, sfx, tol) in DTYPES {
            let x =
                Var::from_tensor(&rounded(&(randn(&[rows, d], 1) * 3.0).unwrap(), dtype)).unwrap();
            let y = plain::softmax_last_dim(x.as_tensor(), scale as f64).unwrap();
            let g = rounded(&randn(&[rows, d], 2), dtype);
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(x.as_tensor()).unwrap();
            let ours = run(
                &gpu_plan::softmax_fwd(sfx, rows, d, scale),
                dtype,
                &[x.as_tensor()],
            );
            let case = format!("softmax {rows}x{d} {sfx}");
            assert_close(&format!("{case} y"), &ours, &vec(&y), tol);
            let y_t = Tensor::from_vec(ours, (rows, d), &Device::Cpu).unwrap();
            let ours_dx = run(
                &gpu_plan::softmax_bwd(sfx, rows, d, scale),
                dtype,
                &[&y_t, &g],
            );
            assert_close(&format!("{case} dx"), &ours_dx, &vec(dx), tol * 2.0);
        }
    }
}

#[test]
fn layer_norm_forward_and_backward_match_plain_ops() {
    for (rows, d) in [(50, 96), (3000, 40), (3, 1280)] {
        for (dtype, sfx, tol) in DTYPES {
            let x =
                Var::from_tensor(&rounded(&(randn(&[rows, d], 3) + 2.0).unwrap(), dtype)).unwrap();
            let w = Var::from_tensor(&(randn(&[d], 4) + 1.0).unwrap()).unwrap();
            let b = Var::from_tensor(&randn(&[d], 5)).unwrap();
            let eps = 1e-5;
            let y = plain::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps).unwrap();
            let g = rounded(&randn(&[rows, d], 6), dtype);
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let case = format!("layer_norm {rows}x{d} {sfx}");
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let ours = run(
                &gpu_plan::layer_norm_fwd(sfx, rows, d, eps as f32),
                dtype,
                &[xt, wt, bt],
            );
            assert_close(&format!("{case} y"), &ours, &vec(&y), tol);
            let dx = run(
                &gpu_plan::layer_norm_bwd_dx(sfx, rows, d, eps as f32),
                dtype,
                &[xt, &g, wt],
            );
            assert_close(
                &format!("{case} dx"),
                &dx,
                &vec(grads.get(xt).unwrap()),
                tol * 2.0,
            );
            let p = run(
                &gpu_plan::layer_norm_bwd_params(sfx, rows, d, eps as f32),
                dtype,
                &[xt, &g],
            );
            assert_close(
                &format!("{case} dw"),
                &p[..d],
                &vec(grads.get(wt).unwrap()),
                tol * 2.0,
            );
            assert_close(
                &format!("{case} db"),
                &p[d..],
                &vec(grads.get(bt).unwrap()),
                tol * 2.0,
            );
        }
    }
}

#[test]
fn group_norm_silu_forward_and_backward_match_plain_ops() {
    // (B, C, H, W), groups: small, several statistics blocks per row
    // (m = 4608 > 2 · 2048), one channel per group, a 1-D spatial size.
    let cases: [(&[usize], usize); 4] = [
        (&[2, 8, 5, 7], 4),
        (&[2, 64, 48, 48], 32),
        (&[1, 6, 3, 3], 6),
        (&[3, 4, 10], 2),
    ];
    for (dims, groups) in cases {
        for silu in [false, true] {
            for (dtype, sfx, tol) in DTYPES {
                let c = dims[1];
                let x = rounded(&randn(dims, 7).affine(2.0, 5.0).unwrap(), dtype);
                let x = Var::from_tensor(&x).unwrap();
                let w = Var::from_tensor(&(randn(&[c], 8) + 1.0).unwrap()).unwrap();
                let b = Var::from_tensor(&randn(&[c], 9)).unwrap();
                let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
                let eps = 1e-6;
                let y = plain::group_norm(xt, wt, bt, groups, eps, silu).unwrap();
                let g = rounded(&randn(dims, 10), dtype);
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gs = Groups {
                    b: dims[0],
                    c,
                    s: dims[2..].iter().product(),
                    g: groups,
                };
                let case = format!("group_norm {dims:?}/{groups} silu={silu} {sfx}");
                let e = eps as f32;
                let ours = run(
                    &gpu_plan::group_norm_fwd(sfx, gs, e, silu),
                    dtype,
                    &[xt, wt, bt],
                );
                assert_close(&format!("{case} y"), &ours, &vec(&y), tol);
                let wb = Tensor::cat(&[wt, bt], 0).unwrap();
                let plan = gpu_plan::group_norm_bwd_params(sfx, gs, e, silu);
                let params = run(&plan, dtype, &[xt, &g, &wb]);
                assert_close(
                    &format!("{case} dw"),
                    &params[..c],
                    &vec(grads.get(wt).unwrap()),
                    tol * 2.0,
                );
                let db = &params[c..2 * c];
                assert_close(
                    &format!("{case} db"),
                    db,
                    &vec(grads.get(bt).unwrap()),
                    tol * 2.0,
                );
                let n = params.len();
                let aux = Tensor::cat(
                    &[&wb, &Tensor::from_vec(params, n, &Device::Cpu).unwrap()],
                    0,
                )
                .unwrap();
                let dx = run(
                    &gpu_plan::group_norm_bwd_dx(sfx, gs, silu),
                    dtype,
                    &[xt, &g, &aux],
                );
                assert_close(
                    &format!("{case} dx"),
                    &dx,
                    &vec(grads.get(xt).unwrap()),
                    tol * 3.0,
                );
            }
        }
    }
}

#[test]
fn geglu_forward_and_backward_match_plain_ops() {
    for (rows, d) in [(33, 40), (2, 700)] {
        for (dtype, sfx, tol) in DTYPES {
            let h = Var::from_tensor(&rounded(&(randn(&[rows, 2 * d], 11) * 2.0).unwrap(), dtype))
                .unwrap();
            let y = plain::geglu(h.as_tensor()).unwrap();
            let g = rounded(&randn(&[rows, d], 12), dtype);
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let case = format!("geglu {rows}x{d} {sfx}");
            let ours = run(&gpu_plan::geglu_fwd(sfx, rows, d), dtype, &[h.as_tensor()]);
            assert_close(&format!("{case} y"), &ours, &vec(&y), tol);
            let dh = run(
                &gpu_plan::geglu_bwd(sfx, rows, d),
                dtype,
                &[h.as_tensor(), &g],
            );
            assert_close(
                &format!("{case} dh"),
                &dh,
                &vec(grads.get(h.as_tensor()).unwrap()),
                tol * 2.0,
            );
        }
    }
}

#[test]
fn a_kernel_writing_out_of_bounds_is_caught() {
    // The guards work: a plan that sizes its output one row short fails.
    let mut plan = gpu_plan::softmax_fwd("f32", 4, 8, 1.0);
    plan.scratch[0].len -= 8;
    let x = randn(&[4, 8], 13);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&plan, DType::F32, &[&x])
    }));
    assert!(r.is_err(), "an undersized output buffer went unnoticed");
}

#[test]
fn convolution_columns_match_candle_conv2d_and_are_adjoint() {
    // im2col: W (O, C·kh·kw) · cols[b] is candle's conv2d; col2im is its
    // adjoint: <im2col(x), c> = <x, col2im(c)>.
    use dreambooth::nn::gpu_plan::ConvDims;
    let cases: [([usize; 4], usize, usize, usize, usize); 4] = [
        ([2, 3, 8, 8], 3, 3, 1, 1),
        ([1, 4, 9, 7], 3, 3, 2, 1),
        ([2, 2, 6, 10], 3, 2, 1, 2),
        ([1, 3, 5, 5], 1, 1, 1, 0),
    ];
    for (i, ([b, c, h, w], kh, kw, stride, pad)) in cases.into_iter().enumerate() {
        let (ho, wo) = (
            (h + 2 * pad - kh) / stride + 1,
            (w + 2 * pad - kw) / stride + 1,
        );
        let d = ConvDims {
            b,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            ho,
            wo,
        };
        let o = 5;
        let x = randn(&[b, c, h, w], 20 + i as u64);
        let wt = randn(&[o, c, kh, kw], 30 + i as u64);
        let theirs = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
        for (dtype, sfx, tol) in DTYPES {
            let case = format!("columns case {i} {sfx}");
            let xr = rounded(&x, dtype);
            let cols = run(&gpu_plan::im2col(sfx, d), dtype, &[&xr]);
            let cols = Tensor::from_vec(cols, (b, c * kh * kw, ho * wo), &Device::Cpu).unwrap();
            let y = rounded(&wt, dtype)
                .reshape((o, c * kh * kw))
                .unwrap()
                .broadcast_matmul(&cols)
                .unwrap();
            assert_close(&case, &vec(&y), &vec(&theirs), tol * 2.0);
            let cg = rounded(&randn(&[b, c * kh * kw, ho * wo], 40 + i as u64), dtype);
            let dx = run(&gpu_plan::col2im(sfx, d), dtype, &[&cg]);
            let dx = Tensor::from_vec(dx, (b, c, h, w), &Device::Cpu).unwrap();
            let lhs = (&cols * &cg)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rhs = (&xr * &dx)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rel = ((lhs - rhs) / lhs.abs().max(1.0)).abs() as f64;
            assert!(
                rel < tol * 10.0,
                "{case}: <im2col x, c> {lhs} vs <x, col2im c> {rhs}"
            );
        }
    }
}

#[test]
fn flash_attention_forward_matches_plain_attention() {
    use dreambooth::nn::attention::plain_multi_head_attention;
    use gpu_plan::AttentionDims;
    // (B, N, M, heads, d): rows and keys that fill no whole tile, several key
    // tiles (the online softmax rescales), every padded head size, d < 32;
    // heads of 20 (not a multiple of 8) take the element-wise loads, the
    // others 16-byte ones; 40 heads make more tiles than the simulation's
    // 32 blocks (each block loops over several).
    let cases = [
        (1, 40, 45, 3, 20),
        (1, 64, 10, 40, 8),
        (2, 70, 77, 2, 40),
        (1, 64, 130, 3, 64),
        (1, 33, 40, 2, 80),
        (1, 17, 33, 1, 96),
        (1, 17, 33, 1, 128),
        (1, 20, 50, 2, 160),
        (2, 16, 9, 2, 8),
    ];
    let half = [(DType::BF16, "bf16", 2e-2), (DType::F16, "f16", 3e-3)];
    for (i, (b, n, m, heads, d)) in cases.into_iter().enumerate() {
        let dims = AttentionDims { b, n, m, heads, d };
        let c = heads * d;
        let scale = 1.0 / (d as f32).sqrt();
        let seed = 100 + 10 * i as u64;
        for (dtype, sfx, tol) in half {
            // Scaled up so that rows are peaked and a later key tile often
            // holds a larger score than the earlier ones.
            let q = rounded(&(randn(&[b, n, c], seed) * 2.0).unwrap(), dtype);
            let k = rounded(&(randn(&[b, m, c], seed + 1) * 2.0).unwrap(), dtype);
            let v = rounded(&randn(&[b, m, c], seed + 2), dtype);
            let want = plain_multi_head_attention(&q, &k, &v, heads, scale as f64).unwrap();
            let plan = gpu_plan::flash_attention_fwd(sfx, dims, scale).expect("a flash kernel");
            let ours = run(&plan, dtype, &[&q, &k, &v]);
            assert_close(
                &format!("flash attention {dims:?} {sfx}"),
                &ours,
                &vec(&want),
                tol,
            );
        }
    }
    // f32 and heads wider than the widest kernel have no flash plan.
    let wide = AttentionDims {
        b: 1,
        n: 8,
        m: 8,
        heads: 1,
        d: 161,
    };
    assert!(gpu_plan::flash_attention_fwd("bf16", wide, 1.0).is_none());
    assert!(gpu_plan::flash_attention_fwd("f32", AttentionDims { d: 40, ..wide }, 1.0).is_none());
}

#[test]
fn flash_attention_backward_matches_autograd() {
    use dreambooth::nn::attention::plain_multi_head_attention;
    use gpu_plan::AttentionDims;
    // (B, N, M, heads, d): every padded head size of the backward, rows and
    // keys past a tile, more query than key tiles and the reverse, element-
    // wise loads (d = 20), more query and key tiles than blocks (40 heads,
    // every warp's rows and keys in use).
    let cases = [
        (1, 30, 35, 2, 20),
        (1, 64, 70, 40, 8),
        (2, 70, 77, 2, 40),
        (1, 33, 100, 1, 64),
        (1, 50, 20, 2, 80),
        (2, 16, 9, 2, 8),
    ];
    let half = [(DType::BF16, "bf16", 3e-2), (DType::F16, "f16", 5e-3)];
    for (i, (b, n, m, heads, d)) in cases.into_iter().enumerate() {
        let dims = AttentionDims { b, n, m, heads, d };
        let c = heads * d;
        let scale = 1.0 / (d as f32).sqrt();
        let seed = 200 + 10 * i as u64;
        for (dtype, sfx, tol) in half {
            let var = |dims: &[usize], seed: u64, amp: f64| {
                Var::from_tensor(&rounded(&(randn(dims, seed) * amp).unwrap(), dtype)).unwrap()
            };
            let (q, k, v) = (
                var(&[b, n, c], seed, 2.0),
                var(&[b, m, c], seed + 1, 2.0),
                var(&[b, m, c], seed + 2, 1.0),
            );
            let o = plain_multi_head_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                heads,
                scale as f64,
            )
            .unwrap();
            let dout = rounded(&randn(&[b, n, c], seed + 3), dtype);
            let grads = (&o * &dout).unwrap().sum_all().unwrap().backward().unwrap();
            let plan = gpu_plan::flash_attention_bwd(sfx, dims, scale).expect("a flash backward");
            let o_t = rounded(&o, dtype);
            let flat = run(
                &plan,
                dtype,
                &[q.as_tensor(), k.as_tensor(), v.as_tensor(), &o_t, &dout],
            );
            let (nq, nk) = (b * n * c, b * m * c);
            let case = format!("flash attention backward {dims:?} {sfx}");
            for (name, range, x) in [
                ("dq", 0..nq, &q),
                ("dk", nq..nq + nk, &k),
                ("dv", nq + nk..nq + 2 * nk, &v),
            ] {
                let want = vec(grads.get(x.as_tensor()).unwrap());
                assert_close(&format!("{case} {name}"), &flat[range], &want, tol);
            }
        }
    }
    let wide = AttentionDims {
        b: 1,
        n: 8,
        m: 8,
        heads: 1,
        d: 96,
    };
    assert!(gpu_plan::flash_attention_bwd("bf16", wide, 1.0).is_none());
}
