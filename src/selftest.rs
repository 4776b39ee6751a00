//! `dreambooth selftest --device D`: the paths a device takes, checked
//! against the CPU's f32 reference in one command — for a GPU machine, where
//! `cargo test` does not run: the fused AdamW kernel against the plain
//! update and the CPU, the convolution's GEMM backward against candle's, the
//! fused GroupNorm+SiLU, LayerNorm, softmax, GEGLU and attention (f32 and
//! half) and the flash attention kernel (bf16 and f16, CUDA only) against
//! the plain ops, the
//! toy UNet's outputs and every weight gradient in f32 and in mixed precision
//! (bf16 on a GPU, f16 on the CPU), the frozen-operand matmuls and LoRA on a
//! frozen base (only adapters get gradients, equal to the CPU's).
//!
//! Its quick part is also the start-up check of every GPU run
//! ([`preflight`]): a family of our paths that fails it on the machine at
//! hand is sent back to candle's plain ops ([`kernel_paths`]).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::models::UNet2DConditionModel;
use crate::models::config::UNetConfig;
use crate::nn::kernel_paths::{self, GpuPath};
use crate::nn::{Precision, Vb};
use crate::optim::{AdamW, AdamWConfig};
use crate::{Error, Result};

/// One comparison: the worst relative L2 error over what it compares.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tol: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tol
    }
}

/// ‖a − b‖ / ‖b‖ over f64 copies on the CPU (0 when both are zero).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let f = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let (a, b) = (f(a)?, f(b)?);
    if a.len() != b.len() {
        return Err(Error::msg("selftest: compared tensors differ in size"));
    }
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    Ok(if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    })
}

/// Runs every check on `device`; `log` gets a line per check.
pub fn run(device: &Device, log: &mut dyn FnMut(&str)) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut push = |c: Check, log: &mut dyn FnMut(&str)| {
        log(&format!(
            "{:<62} rel err {:.2e}  (tolerance {:.0e})  {}",
            c.name,
            c.rel_err,
            c.tol,
            if c.passed() { "ok" } else { "FAILED" }
        ));
        checks.push(c);
    };
    for c in adamw_checks(device)? {
        push(c, log);
    }
    for c in conv_checks(device)? {
        push(c, log);
    }
    for c in frozen_matmul_checks(device)? {
        push(c, log);
    }
    let half = if device.is_cpu() {
        Precision::F16
    } else {
        Precision::Bf16
    };
    for c in flash_attention_checks(device)? {
        push(c, log);
    }
    for p in [Precision::F32, half] {
        for c in fused_op_checks(device, p)? {
            push(c, log);
        }
    }
    for c in unet_checks(device, Precision::F32)? {
        push(c, log);
    }
    for c in unet_checks(device, half)? {
        push(c, log);
    }
    for c in lora_checks(device)? {
        push(c, log);
    }
    for c in checkpointing_checks(device)? {
        push(c, log);
    }
    Ok(checks)
}

/// A family's comparisons on a device.
type ChecksOf<'a> = dyn Fn(&Device) -> Result<Vec<Check>> + 'a;

/// The start-up check's result on one device ([`preflight`]).
#[derive(Clone, Debug, Default)]
pub struct Preflight {
    /// How many comparisons ran.
    pub checks: usize,
    /// The paths turned off, each with why (the failing check or the error).
    pub turned_off: Vec<(GpuPath, String)>,
    pub seconds: f64,
}

/// The quick part of [`run`] as a start-up check: each family of our GPU
/// paths ([`GpuPath`]: the fused AdamW, the GEMM convolution backward, the
/// fused norms/softmax/GEGLU and attention node in f32 and the half
/// precision, the frozen-base matmuls) against the plain ops on the CPU, at
/// small sizes (well under a second of GPU work). A family whose check fails
/// or errors is turned off for the rest of the process
/// ([`kernel_paths::turn_off`]): the run goes on, slower, on candle's
/// plain ops. Runs the same comparisons on the CPU (where nothing it turns
/// off applies), which is how `cargo test` exercises it.
pub fn preflight(device: &Device) -> Preflight {
    let start = std::time::Instant::now();
    let half = if device.is_cpu() {
        Precision::F16
    } else {
        Precision::Bf16
    };
    let fused = |d: &Device| -> Result<Vec<Check>> {
        let mut c = fused_op_checks(d, Precision::F32)?;
        c.extend(fused_op_checks(d, half)?);
        Ok(c)
    };
    // Flash before the fused family: that family's attention check goes
    // through the flash kernel unless it is turned off.
    let families: [(GpuPath, &ChecksOf<'_>); 5] = [
        (GpuPath::AdamW, &adamw_checks),
        (GpuPath::Conv, &conv_checks),
        (GpuPath::Flash, &flash_attention_checks),
        (GpuPath::Fused, &fused),
        (GpuPath::Frozen, &frozen_matmul_checks),
    ];
    let mut out = Preflight::default();
    for (path, check) in families {
        let outcome = check(device);
        if let Ok(c) = &outcome {
            out.checks += c.len();
        }
        if let Some(why) = failure(&outcome) {
            kernel_paths::turn_off(path);
            out.turned_off.push((path, why));
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    out
}

/// Why a family's checks did not pass (the first failing check with its
/// error, or the error that stopped them; its first line), or `None`.
pub fn failure(outcome: &Result<Vec<Check>>) -> Option<String> {
    match outcome {
        Ok(checks) => checks.iter().find(|c| !c.passed()).map(|c| {
            format!(
                "{}: relative error {:.2e} over the tolerance {:.0e}",
                c.name, c.rel_err, c.tol
            )
        }),
        Err(e) => Some(e.to_string().lines().next().unwrap_or("").to_string()),
    }
}

/// A frozen right operand times a tracked left one (`nn::lora::matmul`,
/// LoRA's base linear layers) and a frozen weight times a tracked batch
/// (`frozen_weight_bmm`, its 1×1 convolutions) on `device`: outputs and the
/// tracked operand's gradient against plain matmuls on the CPU.
fn frozen_matmul_checks(device: &Device) -> Result<Vec<Check>> {
    use crate::nn::lora::{frozen_weight_bmm, matmul};
    let grad_of = |y: &Tensor, x: &Var, seed: u64| -> Result<Tensor> {
        let r = randn(seed, y.dims(), y.device())?;
        let g = (y * r)?.sum_all()?.backward()?;
        Ok(g.get(x)
            .ok_or_else(|| Error::msg("frozen matmul: the tracked operand got no gradient"))?
            .clone())
    };
    let run = |dev: &Device, ours: bool| -> Result<[Tensor; 4]> {
        let x = Var::from_tensor(&randn(80, &[74, 48], dev)?)?;
        let w = randn(81, &[48, 20], dev)?;
        let y = if ours {
            matmul(x.as_tensor(), &w)?
        } else {
            x.as_tensor().matmul(&w)?
        };
        let gx = grad_of(&y, &x, 82)?;
        let xb = Var::from_tensor(&randn(83, &[2, 48, 37], dev)?)?;
        let wb = randn(84, &[20, 48], dev)?;
        let yb = if ours {
            frozen_weight_bmm(&wb, xb.as_tensor())?
        } else {
            wb.broadcast_matmul(xb.as_tensor())?
        };
        let gb = grad_of(&yb, &xb, 85)?;
        Ok([y, gx, yb, gb])
    };
    let ours = run(device, true)?;
    let want = run(&Device::Cpu, false)?;
    let mut worst = [0f64; 2];
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        worst[i % 2] = worst[i % 2].max(rel_err(a, b)?);
    }
    Ok(vec![
        Check {
            name: "frozen-operand matmuls vs plain matmul on the CPU: output".into(),
            rel_err: worst[0],
            tol: 1e-5,
        },
        Check {
            name: "frozen-operand matmuls vs plain matmul on the CPU: gradient".into(),
            rel_err: worst[1],
            tol: 1e-5,
        },
    ])
}

fn randn(seed: u64, dims: &[usize], device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    Ok(crate::util::randn(&mut rng, dims, &Device::Cpu)?.to_device(device)?)
}

/// Three AdamW steps (one with a gradient scale) on parameters of a few
/// shapes: the fused update against the plain one on `device`, and against
/// the CPU's fused update.
fn adamw_checks(device: &Device) -> Result<Vec<Check>> {
    let shapes: [&[usize]; 3] = [&[4099], &[64, 33], &[7]];
    let run = |dev: &Device, fused: bool| -> Result<BTreeMap<String, Tensor>> {
        let mut vars = BTreeMap::new();
        for (i, s) in shapes.iter().enumerate() {
            vars.insert(
                format!("p{i}"),
                Var::from_tensor(&randn(10 + i as u64, s, dev)?)?,
            );
        }
        let mut opt = AdamW::new(
            vars.clone(),
            AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
        )?;
        opt.fused = fused;
        for step in 0..3u64 {
            let grads: BTreeMap<String, Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| Ok((format!("p{i}"), randn(100 * step + i as u64, s, dev)?)))
                .collect::<Result<_>>()?;
            opt.step_map(&grads, 1e-2, if step == 1 { 0.5 } else { 1.0 })?;
        }
        let mut out: BTreeMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        out.extend(opt.state());
        Ok(out)
    };
    let fused = run(device, true)?;
    let plain = run(device, false)?;
    let cpu = run(&Device::Cpu, true)?;
    let worst = |a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>| -> Result<f64> {
        let mut w = 0f64;
        for (k, t) in a {
            w = w.max(rel_err(t, &b[k])?);
        }
        Ok(w)
    };
    Ok(vec![
        Check {
            name: "AdamW: fused update vs plain ops (weights, moments)".into(),
            rel_err: worst(&fused, &plain)?,
            tol: 1e-6,
        },
        Check {
            name: "AdamW: fused update on the device vs the CPU".into(),
            rel_err: worst(&fused, &cpu)?,
            tol: 1e-6,
        },
    ])
}

/// The GPU convolution (candle's forward, GEMM backward on recomputed
/// columns: `nn::conv_gemm`) on `device` against candle's conv2d and its
/// autograd on the CPU, stride 1 and 2.
fn conv_checks(device: &Device) -> Result<Vec<Check>> {
    let mut worst_y = 0f64;
    let mut worst_g = 0f64;
    for (seed, stride) in [(40u64, 1usize), (41, 2)] {
        let run = |dev: &Device, ours: bool| -> Result<(Tensor, Tensor, Tensor)> {
            let x = Var::from_tensor(&randn(seed, &[2, 8, 12, 12], dev)?)?;
            let w = Var::from_tensor(&randn(seed + 1, &[6, 8, 3, 3], dev)?)?;
            let y = if ours {
                crate::nn::conv_gemm::conv2d(x.as_tensor(), w.as_tensor(), stride, 1)?
            } else {
                x.as_tensor().conv2d(w.as_tensor(), 1, stride, 1, 1)?
            };
            let r = randn(seed + 2, y.dims(), dev)?;
            let g = (&y * r)?.sum_all()?.backward()?;
            let gx = g.get(&x).ok_or_else(|| Error::msg("no conv dx"))?.clone();
            let gw = g.get(&w).ok_or_else(|| Error::msg("no conv dw"))?.clone();
            Ok((y, gx, gw))
        };
        let (y, gx, gw) = run(device, true)?;
        let (y0, gx0, gw0) = run(&Device::Cpu, false)?;
        worst_y = worst_y.max(rel_err(&y, &y0)?);
        worst_g = worst_g.max(rel_err(&gx, &gx0)?).max(rel_err(&gw, &gw0)?);
    }
    Ok(vec![
        Check {
            name: "conv (GEMM backward) vs candle on the CPU: output".into(),
            rel_err: worst_y,
            tol: 1e-5,
        },
        Check {
            name: "conv (GEMM backward) vs candle on the CPU: dx, dw".into(),
            rel_err: worst_g,
            tol: 1e-5,
        },
    ])
}

/// GroupNorm + SiLU, LayerNorm, scaled softmax, GEGLU and multi-head
/// attention (our CUDA kernels and the recomputing attention node on a GPU,
/// `src/nn/fused.rs` and `attention_cpu` on the CPU) in `precision`: outputs and the
/// gradients of every input against the plain ops in f32 on the CPU (inputs
/// rounded to the precision first).
fn fused_op_checks(device: &Device, precision: Precision) -> Result<Vec<Check>> {
    use crate::nn::attention::{multi_head_attention, plain_multi_head_attention};
    use crate::nn::fused::{self, plain};
    let cases: [OpCase; 6] = [
        (
            "group_norm+silu",
            vec![vec![2, 64, 24, 24], vec![64], vec![64]],
            1,
            |t, f| {
                if f {
                    fused::group_norm(&t[0], &t[1], &t[2], 32, 1e-5, true)
                } else {
                    plain::group_norm(&t[0], &t[1], &t[2], 32, 1e-5, true)
                }
            },
        ),
        (
            "layer_norm",
            vec![vec![2, 300, 320], vec![320], vec![320]],
            1,
            |t, f| {
                if f {
                    fused::layer_norm(&t[0], &t[1], &t[2], 1e-5)
                } else {
                    plain::layer_norm(&t[0], &t[1], &t[2], 1e-5)
                }
            },
        ),
        (
            "softmax (scale 0.125)",
            vec![vec![2, 8, 256, 300]],
            1,
            |t, f| {
                if f {
                    fused::softmax_last_dim(&t[0], 0.125)
                } else {
                    plain::softmax_last_dim(&t[0], 0.125)
                }
            },
        ),
        ("geglu", vec![vec![2, 256, 640]], 1, |t, f| {
            if f {
                fused::geglu(&t[0])
            } else {
                plain::geglu(&t[0])
            }
        }),
        (
            "attention (8 heads)",
            vec![vec![2, 256, 320], vec![2, 77, 320], vec![2, 77, 320]],
            3,
            |t, f| {
                let scale = 1.0 / 40f64.sqrt();
                if f {
                    multi_head_attention(&t[0], &t[1], &t[2], 8, scale)
                } else {
                    plain_multi_head_attention(&t[0], &t[1], &t[2], 8, scale)
                }
            },
        ),
        (
            // The recomputing node (the GPU's attention) in chunks of 3 of
            // the 16 (image, head) pairs.
            "recomputing attention in chunks",
            vec![vec![2, 256, 320], vec![2, 256, 320], vec![2, 256, 320]],
            3,
            |t, f| {
                let scale = 1.0 / 40f64.sqrt();
                if f {
                    crate::nn::attention_recompute::multi_head_attention_chunked(
                        &t[0],
                        &t[1],
                        &t[2],
                        8,
                        scale,
                        3 * 256 * 256,
                    )
                } else {
                    plain_multi_head_attention(&t[0], &t[1], &t[2], 8, scale)
                }
            },
        ),
    ];
    // The recomputing node's CPU softmax is f32 only (the CPU's half
    // attention is `attention_cpu`'s).
    let skip = |name: &str| {
        device.is_cpu() && precision != Precision::F32 && name.starts_with("recomputing")
    };
    let cases = cases.into_iter().filter(|c| !skip(c.0)).collect();
    compare_ops(device, precision, 60, cases)
}

/// A data-type tolerance of [`compare_ops`]: relative error of the outputs
/// (twice that for the gradients).
fn op_tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-5,
        Precision::Bf16 => 3e-2,
        Precision::F16 => 5e-3,
    }
}

/// An op checked by [`compare_ops`]: op(inputs, ours) is our path when
/// `ours`, the plain ops' otherwise.
type Op = fn(&[Tensor], bool) -> Result<Tensor>;
/// (name, input shapes, how many of them are data (in the precision's dtype;
/// the rest are f32 parameters), op).
type OpCase = (&'static str, Vec<Vec<usize>>, usize, Op);

/// Each case's output and the gradients of every input on `device` (data
/// in `precision`) against the plain ops in f32 on the CPU (inputs rounded
/// to the precision first); random inputs from `seed` on.
fn compare_ops(
    device: &Device,
    precision: Precision,
    seed: u64,
    cases: Vec<OpCase>,
) -> Result<Vec<Check>> {
    let dtype = precision.dtype();
    let tol = op_tolerance(precision);
    let mut out = Vec::new();
    for (i, (name, shapes, n_data, op)) in cases.into_iter().enumerate() {
        let seed = seed + 10 * i as u64;
        let run = |dev: &Device, fused_op: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let mut vars = Vec::new();
            for (k, dims) in shapes.iter().enumerate() {
                let mut t = randn(seed + k as u64, dims, &Device::Cpu)?;
                if k >= n_data {
                    t = (t + 1.0)?;
                } else {
                    // Rounded to the precision, then in it (device) or f32 (reference).
                    t = t.to_dtype(dtype)?;
                    t = if fused_op { t } else { t.to_dtype(DType::F32)? };
                }
                vars.push(Var::from_tensor(&t.to_device(dev)?)?);
            }
            let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = op(&inputs, fused_op)?;
            let r = randn(seed + 9, y.dims(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?
                .to_device(dev)?;
            let grads = (y.to_dtype(DType::F32)? * r)?.sum_all()?.backward()?;
            let mut g = Vec::new();
            for v in &vars {
                g.push(
                    grads
                        .get(v.as_tensor())
                        .ok_or_else(|| Error::msg(format!("{name}: an input got no gradient")))?
                        .clone(),
                );
            }
            Ok((y, g))
        };
        let (y, g) = run(device, true)?;
        let (y0, g0) = run(&Device::Cpu, false)?;
        let mut worst = 0f64;
        for (a, b) in g.iter().zip(&g0) {
            worst = worst.max(rel_err(a, b)?);
        }
        let what = format!("{name} {} vs plain ops on the CPU", dtype.as_str());
        out.push(Check {
            name: format!("{what}: output"),
            rel_err: rel_err(&y, &y0)?,
            tol,
        });
        out.push(Check {
            name: format!("{what}: gradients"),
            rel_err: worst,
            tol: 2.0 * tol,
        });
    }
    Ok(out)
}

/// Our flash attention kernel ([`crate::nn::attention_flash`]) on a CUDA
/// device in bf16 and f16 at SD's head sizes (40 with 77 text keys, 64, 160;
/// rows and keys that fill no whole tile): outputs and gradients against
/// the plain ops on the CPU. None elsewhere (the kernel is CUDA-only; the
/// tests run it on the CPU simulation, tests/cuda_sim.rs).
fn flash_attention_checks(device: &Device) -> Result<Vec<Check>> {
    use crate::nn::attention::plain_multi_head_attention;
    use crate::nn::attention_flash::multi_head_attention;
    if !cfg!(feature = "cuda") || !device.is_cuda() {
        return Ok(Vec::new());
    }
    // Heads of 40, 64 and 160 channels.
    fn op(t: &[Tensor], ours: bool, heads: usize) -> Result<Tensor> {
        let d = t[0].dim(2)? / heads;
        let scale = 1.0 / (d as f64).sqrt();
        if ours {
            multi_head_attention(&t[0], &t[1], &t[2], heads, scale)
        } else {
            plain_multi_head_attention(&t[0], &t[1], &t[2], heads, scale)
        }
    }
    let mut out = Vec::new();
    for precision in [Precision::Bf16, Precision::F16] {
        let cases: Vec<OpCase> = vec![
            (
                "flash attention (8 heads of 40, 77 keys)",
                vec![vec![2, 300, 320], vec![2, 77, 320], vec![2, 77, 320]],
                3,
                |t, f| op(t, f, 8),
            ),
            (
                "flash attention (5 heads of 64)",
                vec![vec![2, 200, 320], vec![2, 200, 320], vec![2, 200, 320]],
                3,
                |t, f| op(t, f, 5),
            ),
            (
                "flash attention (8 heads of 160)",
                vec![vec![1, 70, 1280], vec![1, 100, 1280], vec![1, 100, 1280]],
                3,
                |t, f| op(t, f, 8),
            ),
        ];
        out.extend(compare_ops(device, precision, 160, cases)?);
    }
    Ok(out)
}

struct UNetRun {
    out: Tensor,
    grads: BTreeMap<String, Tensor>,
}

/// The toy UNet (random weights, seed 7) on `device`: output of a fixed
/// input and the gradients of sum(out · r) w.r.t. the input and every
/// trainable tensor (`lora`: adapters on a frozen base; `checkpointed`:
/// every block a checkpointed node in that mode).
fn toy_unet(
    device: &Device,
    precision: Precision,
    lora: bool,
    checkpointed: Option<crate::nn::checkpoint::Mode>,
) -> Result<UNetRun> {
    let cfg: UNetConfig = serde_json::from_value(crate::toy::pretrain::unet_config())
        .map_err(|e| Error::msg(format!("toy UNet config: {e}")))?;
    let vb = Vb::random(7, device, !lora);
    let mut unet = UNet2DConditionModel::new(&vb, &cfg)?;
    let vars = if lora {
        let spec = crate::models::lora::LoraSpec {
            rank: 4,
            alpha: 4.0,
            seed: 3,
            ..Default::default()
        };
        let vars = crate::models::lora::attach_trainable_unet(&mut unet, &spec, device)?;
        // peft starts B at zero; nonzero B makes every adapter's A gradient nonzero.
        for (k, v) in &vars {
            if k.ends_with("lora_B.weight") {
                v.set(&(randn(5, v.dims(), device)? * 0.1)?)?;
            }
        }
        vars
    } else {
        vb.vars()
    };
    let ck = if let Some(mode) = checkpointed {
        let ck = crate::nn::checkpoint::Checkpointing::with_mode(device, vars.values(), mode)?;
        unet = unet.with_gradient_checkpointing(&ck);
        Some(ck)
    } else {
        None
    };
    let b = 2;
    let x = Var::from_tensor(&randn(1, &[b, cfg.in_channels, 16, 16], device)?)?;
    let ctx = randn(
        2,
        &[b, crate::toy::pretrain::MAX_TOKENS, cfg.cross_attention_dim],
        device,
    )?;
    let t = Tensor::from_vec(vec![10f32, 700.0], b, device)?;
    let out = unet
        .forward(&precision.cast(x.as_tensor())?, &t, &ctx)?
        .to_dtype(DType::F32)?;
    let r = randn(3, out.dims(), device)?;
    let grads = crate::nn::checkpoint::backward(ck.as_deref(), &(&out * r)?.sum_all()?)?;
    let mut g = BTreeMap::new();
    g.insert(
        "input".to_string(),
        grads
            .get(&x)
            .ok_or_else(|| Error::msg("selftest: no input gradient"))?
            .clone(),
    );
    for (k, v) in &vars {
        let gk = grads
            .get(v)
            .ok_or_else(|| Error::msg(format!("selftest: no gradient for {k}")))?;
        if gk.dtype() != DType::F32 {
            return Err(Error::msg(format!(
                "selftest: gradient of {k} is {:?}, not f32",
                gk.dtype()
            )));
        }
        g.insert(k.clone(), gk.clone());
    }
    Ok(UNetRun { out, grads: g })
}

fn compare_unet(name: &str, got: &UNetRun, want: &UNetRun, tol: (f64, f64)) -> Result<Vec<Check>> {
    let mut worst = 0f64;
    for (k, g) in &want.grads {
        let h = got
            .grads
            .get(k)
            .ok_or_else(|| Error::msg(format!("selftest: {name}: no gradient for {k}")))?;
        worst = worst.max(rel_err(h, g)?);
    }
    Ok(vec![
        Check {
            name: format!("{name}: output"),
            rel_err: rel_err(&got.out, &want.out)?,
            tol: tol.0,
        },
        Check {
            name: format!("{name}: worst of {} gradients", want.grads.len()),
            rel_err: worst,
            tol: tol.1,
        },
    ])
}

fn unet_checks(device: &Device, precision: Precision) -> Result<Vec<Check>> {
    let want = toy_unet(&Device::Cpu, Precision::F32, false, None)?;
    let got = toy_unet(device, precision, false, None)?;
    let (name, tol) = match precision {
        Precision::F32 => ("toy UNet f32 vs CPU f32", (1e-4, 1e-4)),
        // 8 significant bits (bf16) / 11 (f16) per rounding, over the network.
        Precision::Bf16 => ("toy UNet bf16 (f32 weights) vs CPU f32", (3e-2, 8e-2)),
        Precision::F16 => ("toy UNet f16 (f32 weights) vs CPU f32", (5e-3, 2e-2)),
    };
    compare_unet(name, &got, &want, tol)
}

fn lora_checks(device: &Device) -> Result<Vec<Check>> {
    let want = toy_unet(&Device::Cpu, Precision::F32, true, None)?;
    let got = toy_unet(device, Precision::F32, true, None)?;
    compare_unet(
        "toy UNet LoRA (frozen base) vs CPU",
        &got,
        &want,
        (1e-4, 1e-4),
    )
}

/// Gradient checkpointing and released block graphs on the device (the
/// checkpointed node's forward hands over a device buffer): the full UNet and
/// LoRA against the CPU's plain f32 run.
fn checkpointing_checks(device: &Device) -> Result<Vec<Check>> {
    use crate::nn::checkpoint::Mode;
    let mut checks = Vec::new();
    for lora in [false, true] {
        let want = toy_unet(&Device::Cpu, Precision::F32, lora, None)?;
        for mode in [Mode::Recompute, Mode::Release] {
            let got = toy_unet(device, Precision::F32, lora, Some(mode))?;
            let name = format!(
                "toy UNet{}, {}, vs CPU",
                if lora { " LoRA" } else { "" },
                match mode {
                    Mode::Recompute => "gradient checkpointing",
                    Mode::Release => "block graphs released",
                }
            );
            checks.extend(compare_unet(&name, &got, &want, (1e-4, 1e-4))?);
        }
    }
    Ok(checks)
}
