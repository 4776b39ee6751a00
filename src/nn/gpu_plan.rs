//! Launch plans for our CUDA normalization, softmax, GEGLU and convolution
//! column kernels (`src/cuda/kernels.cu`): which kernels run, in which order, on which
//! buffers (the op's inputs, then scratch and output buffers), with which
//! launch shapes and arguments.
//!
//! A plan is plain data, built in every build: `src/cuda/exec.rs` runs it on
//! the GPU (`cuda` feature), and `tests/cuda_sim.rs` runs the same plan on the
//! CPU through a simulation of the CUDA kernels (`tools/cuda/sim`), so the
//! kernels, the scratch sizes and the argument order are all checked against
//! the plain candle ops without a GPU.

/// The element type of a buffer: the op's dtype (f32, bf16 or f16) or f32
/// (statistics, partial sums, parameter gradients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    T,
    F32,
}

/// A buffer of `len` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub len: usize,
    pub elem: Elem,
}

/// One kernel argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A pointer to element `offset` of buffer `id` (inputs first, then scratch).
    Buf {
        id: usize,
        offset: usize,
    },
    Usize(usize),
    F32(f32),
    I32(i32),
}

/// One kernel launch: 1-D grid and block.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: String,
    pub grid: u32,
    pub block: u32,
    pub args: Vec<Arg>,
}

/// The kernels of one op.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The op's inputs (buffer ids 0..).
    pub inputs: Vec<Buffer>,
    /// Buffers the plan allocates (ids after the inputs), zero-filled.
    pub scratch: Vec<Buffer>,
    pub launches: Vec<Launch>,
    /// The buffer id of the result.
    pub output: usize,
}

/// The kernel-name suffix of a dtype (`f32`, `bf16`, `f16`), if our kernels
/// have it.
pub fn suffix(dtype: candle_core::DType) -> Option<&'static str> {
    match dtype {
        candle_core::DType::F32 => Some("f32"),
        candle_core::DType::BF16 => Some("bf16"),
        candle_core::DType::F16 => Some("f16"),
        _ => None,
    }
}

/// [`suffix`], or the error an op reports for a dtype our kernels lack.
pub fn kernel_suffix(dtype: candle_core::DType) -> candle_core::Result<&'static str> {
    suffix(dtype)
        .ok_or_else(|| candle_core::Error::Msg(format!("our CUDA kernels do not take {dtype:?}")))
}

/// (rows, last dimension) of a row-wise op's input dims.
pub fn rows(dims: &[usize]) -> (usize, usize) {
    let d = dims.last().copied().unwrap_or(1);
    (dims.iter().product::<usize>() / d.max(1), d)
}

const MAX_GRID: usize = 65535;
/// Row kernels' blocks: enough threads for the row, 32 to 256.
fn row_block(d: usize) -> u32 {
    d.next_power_of_two().clamp(32, 256) as u32
}
fn row_grid(rows: usize) -> u32 {
    rows.clamp(1, MAX_GRID) as u32
}
/// Element-wise kernels: 256-thread blocks, a grid stride past 65535 blocks.
fn flat_grid(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, MAX_GRID) as u32
}

fn t(len: usize) -> Buffer {
    Buffer { len, elem: Elem::T }
}
fn f32s(len: usize) -> Buffer {
    Buffer {
        len,
        elem: Elem::F32,
    }
}
fn buf(id: usize) -> Arg {
    Arg::Buf { id, offset: 0 }
}
fn at(id: usize, offset: usize) -> Arg {
    Arg::Buf { id, offset }
}
fn launch(kernel: String, grid: u32, block: u32, args: Vec<Arg>) -> Launch {
    Launch {
        kernel,
        grid,
        block,
        args,
    }
}

/// A row-wise op: one block per row of `d` (grid-stride over `rows`), the
/// kernel's arguments (inputs..., output, rows, d, scalar), the output of the
/// op's dtype and the first input's size.
fn row_op(kernel: String, inputs: Vec<Buffer>, rows: usize, d: usize, scalar: f32) -> Plan {
    let out = inputs.len();
    let mut args: Vec<Arg> = (0..=out).map(buf).collect();
    args.extend([Arg::Usize(rows), Arg::Usize(d), Arg::F32(scalar)]);
    Plan {
        scratch: vec![t(rows * d)],
        launches: vec![launch(kernel, row_grid(rows), row_block(d), args)],
        inputs,
        output: out,
    }
}

/// softmax(scale · x) over `rows` rows of `d`: inputs [x].
pub fn softmax_fwd(sfx: &str, rows: usize, d: usize, scale: f32) -> Plan {
    let kernel = format!("dreambooth_softmax_fwd_{sfx}");
    row_op(kernel, vec![t(rows * d)], rows, d, scale)
}

/// Its backward: inputs [y, dy] → dx.
pub fn softmax_bwd(sfx: &str, rows: usize, d: usize, scale: f32) -> Plan {
    let kernel = format!("dreambooth_softmax_bwd_{sfx}");
    row_op(kernel, vec![t(rows * d), t(rows * d)], rows, d, scale)
}

/// LayerNorm over rows of `d`: inputs [x, w (d, f32), b (d, f32)] → y.
pub fn layer_norm_fwd(sfx: &str, rows: usize, d: usize, eps: f32) -> Plan {
    let kernel = format!("dreambooth_layer_norm_fwd_{sfx}");
    row_op(kernel, vec![t(rows * d), f32s(d), f32s(d)], rows, d, eps)
}

/// LayerNorm's input gradient: inputs [x, dy, w (f32)] → dx.
pub fn layer_norm_bwd_dx(sfx: &str, rows: usize, d: usize, eps: f32) -> Plan {
    let kernel = format!("dreambooth_layer_norm_bwd_dx_{sfx}");
    row_op(
        kernel,
        vec![t(rows * d), t(rows * d), f32s(d)],
        rows,
        d,
        eps,
    )
}

/// LayerNorm's parameter gradients: inputs [x, dy] → f32 [dw (d); db (d)].
/// Row statistics first, then partial column sums over chunks of rows, then
/// their sum.
pub fn layer_norm_bwd_params(sfx: &str, rows: usize, d: usize, eps: f32) -> Plan {
    let n_chunks = 65536usize.div_ceil(d.max(1)).clamp(1, rows.max(1));
    let chunk = rows.max(1).div_ceil(n_chunks);
    let n_chunks = rows.max(1).div_ceil(chunk);
    let (stats, partial, out) = (2, 3, 4);
    Plan {
        inputs: vec![t(rows * d), t(rows * d)],
        scratch: vec![f32s(2 * rows), f32s(n_chunks * 2 * d), f32s(2 * d)],
        launches: vec![
            launch(
                format!("dreambooth_layer_norm_stats_{sfx}"),
                row_grid(rows),
                row_block(d),
                vec![
                    buf(0),
                    buf(stats),
                    Arg::Usize(rows),
                    Arg::Usize(d),
                    Arg::F32(eps),
                ],
            ),
            launch(
                format!("dreambooth_layer_norm_bwd_params_{sfx}"),
                flat_grid(n_chunks * d),
                256,
                vec![
                    buf(0),
                    buf(1),
                    buf(stats),
                    buf(partial),
                    Arg::Usize(rows),
                    Arg::Usize(d),
                    Arg::Usize(chunk),
                    Arg::Usize(n_chunks),
                ],
            ),
            launch(
                "dreambooth_sum_partials".into(),
                flat_grid(2 * d),
                256,
                vec![
                    buf(partial),
                    buf(out),
                    Arg::Usize(n_chunks),
                    Arg::Usize(2 * d),
                ],
            ),
        ],
        output: out,
    }
}

/// The shape of a GroupNorm: (B, C, S) with S the product of the spatial
/// dimensions, in G groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Groups {
    pub b: usize,
    pub c: usize,
    pub s: usize,
    pub g: usize,
}

impl Groups {
    /// The (B, C, S, G) of a GroupNorm input of `dims` in `g` groups.
    pub fn of(dims: &[usize], g: usize) -> candle_core::Result<Self> {
        if dims.len() < 2 || g == 0 || !dims[1].is_multiple_of(g) {
            candle_core::bail!("group_norm: input {dims:?} does not split into {g} groups");
        }
        Ok(Self {
            b: dims[0],
            c: dims[1],
            s: dims[2..].iter().product(),
            g,
        })
    }

    fn rows(&self) -> usize {
        self.b * self.g
    }
    /// Elements per (sample, group).
    fn m(&self) -> usize {
        self.c / self.g * self.s
    }
    fn n(&self) -> usize {
        self.b * self.c * self.s
    }
    fn dims(&self) -> [Arg; 4] {
        [
            Arg::Usize(self.b),
            Arg::Usize(self.c),
            Arg::Usize(self.s),
            Arg::Usize(self.g),
        ]
    }
    /// Blocks per row for the statistics: enough blocks to fill an H100
    /// (about 4 per SM), at least 2048 elements each.
    fn parts(&self) -> usize {
        528usize
            .div_ceil(self.rows().max(1))
            .clamp(1, (self.m() / 2048).max(1))
    }
}

/// The two launches that leave (mean, 1/std) of every (sample, group) at
/// `stats`, from input buffer 0, through buffer `partial`.
fn group_stats(sfx: &str, gs: Groups, eps: f32, partial: usize, stats: Arg) -> [Launch; 2] {
    let (rows, parts) = (gs.rows(), gs.parts());
    [
        launch(
            format!("dreambooth_group_norm_stats_{sfx}"),
            row_grid(rows * parts),
            256,
            vec![
                buf(0),
                buf(partial),
                Arg::Usize(rows),
                Arg::Usize(gs.m()),
                Arg::Usize(parts),
            ],
        ),
        launch(
            "dreambooth_group_norm_finalize".into(),
            flat_grid(rows),
            256,
            vec![
                buf(partial),
                stats,
                Arg::Usize(rows),
                Arg::Usize(parts),
                Arg::Usize(gs.m()),
                Arg::F32(eps),
            ],
        ),
    ]
}

/// The statistics' partial sums.
fn group_partials(gs: Groups) -> Buffer {
    f32s(3 * gs.rows() * gs.parts())
}

/// GroupNorm (+ SiLU): inputs [x, w (C, f32), b (C, f32)] → y.
pub fn group_norm_fwd(sfx: &str, gs: Groups, eps: f32, silu: bool) -> Plan {
    let (partial, stats, y) = (3, 4, 5);
    let [l1, l2] = group_stats(sfx, gs, eps, partial, buf(stats));
    let mut args = vec![buf(0), buf(stats), buf(1), buf(2), buf(y)];
    args.extend(gs.dims());
    args.push(Arg::I32(silu as i32));
    Plan {
        inputs: vec![t(gs.n()), f32s(gs.c), f32s(gs.c)],
        scratch: vec![group_partials(gs), f32s(2 * gs.rows()), t(gs.n())],
        launches: vec![
            l1,
            l2,
            launch(
                format!("dreambooth_group_norm_apply_{sfx}"),
                flat_grid(gs.n()),
                256,
                args,
            ),
        ],
        output: y,
    }
}

/// GroupNorm's parameter gradients, the per-row coefficients of its input
/// gradient and the rows' statistics: inputs [x, dy, wb = [w; b] (2C, f32)]
/// → f32 [dw (C); db (C); coef (2·B·G); stats (2·B·G)] (the input gradient's
/// plan reads the last two, so x's statistics are computed once).
pub fn group_norm_bwd_params(sfx: &str, gs: Groups, eps: f32, silu: bool) -> Plan {
    let (partial, chan, out) = (3, 4, 5);
    let stats = at(out, 2 * gs.c + 2 * gs.rows());
    let [l1, l2] = group_stats(sfx, gs, eps, partial, stats);
    let mut args = vec![buf(0), buf(1), stats, at(2, 0), at(2, gs.c), buf(chan)];
    args.extend(gs.dims());
    args.push(Arg::I32(silu as i32));
    let c3 = launch(
        format!("dreambooth_group_norm_bwd_channel_{sfx}"),
        row_grid(gs.b * gs.c),
        row_block(gs.s),
        args,
    );
    let c4 = launch(
        "dreambooth_group_norm_bwd_reduce".into(),
        flat_grid(gs.c.max(gs.rows())),
        256,
        vec![
            buf(chan),
            at(2, 0),
            at(out, 0),
            at(out, 2 * gs.c),
            Arg::Usize(gs.b),
            Arg::Usize(gs.c),
            Arg::Usize(gs.g),
            Arg::Usize(gs.m()),
        ],
    );
    Plan {
        inputs: vec![t(gs.n()), t(gs.n()), f32s(2 * gs.c)],
        scratch: vec![
            group_partials(gs),
            f32s(2 * gs.b * gs.c),
            f32s(2 * gs.c + 4 * gs.rows()),
        ],
        launches: vec![l1, l2, c3, c4],
        output: out,
    }
}

/// GroupNorm's input gradient: inputs [x, dy, aux = [w; b; dw; db; coef;
/// stats] (f32: [w; b] then the parameter plan's output)] → dx.
pub fn group_norm_bwd_dx(sfx: &str, gs: Groups, silu: bool) -> Plan {
    let dx = 3;
    let (c, r) = (gs.c, gs.rows());
    let mut args = vec![
        buf(0),
        buf(1),
        at(2, 4 * c + 2 * r),
        at(2, 4 * c),
        at(2, 0),
        at(2, c),
        buf(dx),
    ];
    args.extend(gs.dims());
    args.push(Arg::I32(silu as i32));
    Plan {
        inputs: vec![t(gs.n()), t(gs.n()), f32s(4 * c + 4 * r)],
        scratch: vec![t(gs.n())],
        launches: vec![launch(
            format!("dreambooth_group_norm_bwd_dx_{sfx}"),
            flat_grid(gs.n()),
            256,
            args,
        )],
        output: dx,
    }
}

/// GEGLU over rows of 2·d: inputs [h] → y (rows · d).
pub fn geglu_fwd(sfx: &str, rows: usize, d: usize) -> Plan {
    Plan {
        inputs: vec![t(rows * 2 * d)],
        scratch: vec![t(rows * d)],
        launches: vec![launch(
            format!("dreambooth_geglu_fwd_{sfx}"),
            flat_grid(rows * d),
            256,
            vec![buf(0), buf(1), Arg::Usize(rows), Arg::Usize(d)],
        )],
        output: 1,
    }
}

/// Its backward: inputs [h, dy] → dh (rows · 2d).
pub fn geglu_bwd(sfx: &str, rows: usize, d: usize) -> Plan {
    Plan {
        inputs: vec![t(rows * 2 * d), t(rows * d)],
        scratch: vec![t(rows * 2 * d)],
        launches: vec![launch(
            format!("dreambooth_geglu_bwd_{sfx}"),
            flat_grid(rows * d),
            256,
            vec![buf(0), buf(1), buf(2), Arg::Usize(rows), Arg::Usize(d)],
        )],
        output: 2,
    }
}

/// The sizes of a convolution's columns: (B, C, H, W) input, KH×KW kernel,
/// stride, padding, (HO, WO) output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvDims {
    /// Elements of the input image batch.
    pub fn image_len(&self) -> usize {
        self.b * self.c * self.h * self.w
    }
    /// Elements of the columns (B, C·KH·KW, HO·WO).
    pub fn cols_len(&self) -> usize {
        self.b * self.c * self.kh * self.kw * self.ho * self.wo
    }
    fn args(&self) -> [Arg; 10] {
        [
            self.b,
            self.c,
            self.h,
            self.w,
            self.kh,
            self.kw,
            self.stride,
            self.pad,
            self.ho,
            self.wo,
        ]
        .map(Arg::Usize)
    }
}

/// im2col: inputs [x (B, C, H, W)] → columns (B, C·KH·KW, HO·WO), zeros in
/// the padding.
pub fn im2col(sfx: &str, d: ConvDims) -> Plan {
    columns("im2col", sfx, d.image_len(), d.cols_len(), d)
}

/// col2im: inputs [column gradients] → the input gradient (B, C, H, W), each
/// pixel the sum of the columns that read it (the adjoint of im2col).
pub fn col2im(sfx: &str, d: ConvDims) -> Plan {
    columns("col2im", sfx, d.cols_len(), d.image_len(), d)
}

fn columns(kind: &str, sfx: &str, in_len: usize, out_len: usize, d: ConvDims) -> Plan {
    let mut args = vec![buf(0), buf(1)];
    args.extend(d.args());
    Plan {
        inputs: vec![t(in_len)],
        scratch: vec![t(out_len)],
        launches: vec![launch(
            format!("dreambooth_{kind}_{sfx}"),
            flat_grid(out_len),
            256,
            args,
        )],
        output: 1,
    }
}

/// The head sizes our flash attention kernels are built for: a head of `d`
/// channels runs in the smallest one ≥ `d`, zero-padded.
pub const FLASH_HEAD_SIZES: [usize; 7] = [32, 48, 64, 80, 96, 128, 160];

/// The padded head size of the flash kernel for heads of `d` channels, if
/// one is built.
pub fn flash_head_size(d: usize) -> Option<usize> {
    FLASH_HEAD_SIZES.iter().copied().find(|&p| p >= d)
}

/// Query rows one flash attention block takes (4 warps of 16).
const FLASH_ROWS: usize = 64;

/// The shapes of one multi-head attention call: q (B, N, H·d), k and v (B,
/// M, H·d), token-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub b: usize,
    pub n: usize,
    pub m: usize,
    pub heads: usize,
    pub d: usize,
}

impl AttentionDims {
    /// The shapes of q, k, v (dims) split into `heads` heads, checked: q
    /// (B, N, C), k and v both (B, M, C), C a multiple of `heads`.
    pub fn of(q: &[usize], k: &[usize], v: &[usize], heads: usize) -> candle_core::Result<Self> {
        let (&[b, n, c], &[bk, m, ck]) = (q, k) else {
            candle_core::bail!("attention: q {q:?} and k {k:?} must be (B, N, C)")
        };
        if v != k || bk != b || ck != c || heads == 0 || !c.is_multiple_of(heads) {
            candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?}, {heads} heads");
        }
        Ok(Self {
            b,
            n,
            m,
            heads,
            d: c / heads,
        })
    }
}

/// Flash attention forward (tensor cores, bf16 / f16 only): inputs [q, k,
/// v] → o (B, N, H·d) = softmax(q kᵀ · scale) v per head, the scores never
/// stored. `None` for f32 or heads wider than the widest kernel.
pub fn flash_attention_fwd(sfx: &str, a: AttentionDims, scale: f32) -> Option<Plan> {
    if sfx == "f32" {
        return None;
    }
    let padded = flash_head_size(a.d)?;
    let c = a.heads * a.d;
    let tiles = a.b * a.heads * a.n.div_ceil(FLASH_ROWS);
    let mut args = vec![buf(0), buf(1), buf(2), buf(3)];
    args.extend([a.b, a.n, a.m, a.heads, a.d].map(Arg::Usize));
    args.push(Arg::F32(scale));
    Some(Plan {
        inputs: vec![t(a.b * a.n * c), t(a.b * a.m * c), t(a.b * a.m * c)],
        scratch: vec![t(a.b * a.n * c)],
        launches: vec![launch(
            format!("dreambooth_flash_fwd_d{padded}_{sfx}"),
            tiles.clamp(1, MAX_GRID) as u32,
            128,
            args,
        )],
        output: 3,
    })
}

/// The widest head the flash backward kernels take (their 64 keys' dk and
/// dv accumulators live in registers); wider heads take the recomputing
/// backward.
pub const FLASH_BWD_MAX_HEAD: usize = 80;

/// Flash attention backward (bf16 / f16): inputs [q, k, v, o, dO] (o the
/// forward's output, dO its gradient, token-major like q) → one buffer
/// [dq; dk; dv] in their layouts. Three passes: each query row's log-sum-exp
/// and δ = Σ dO·o (scratch, f32), dq over the keys of each query tile, dk
/// and dv over the queries of each key tile, the probabilities recomputed in
/// each, nothing (B·H, N, M)-sized stored. `None` for f32 or heads wider
/// than [`FLASH_BWD_MAX_HEAD`].
pub fn flash_attention_bwd(sfx: &str, a: AttentionDims, scale: f32) -> Option<Plan> {
    if sfx == "f32" || a.d > FLASH_BWD_MAX_HEAD {
        return None;
    }
    let padded = flash_head_size(a.d)?;
    let c = a.heads * a.d;
    let (nq, nk) = (a.b * a.n * c, a.b * a.m * c);
    let rows = a.b * a.heads * a.n;
    let grid = |len: usize| (a.b * a.heads * len.div_ceil(FLASH_ROWS)).clamp(1, MAX_GRID) as u32;
    let tail = |mut args: Vec<Arg>| {
        args.extend([a.b, a.n, a.m, a.heads, a.d].map(Arg::Usize));
        args.push(Arg::F32(scale));
        args
    };
    // Buffers: 0 q, 1 k, 2 v, 3 o, 4 dO; scratch 5 lse, 6 δ, 7 [dq; dk; dv].
    let name = |pass: &str| format!("dreambooth_flash_{pass}_d{padded}_{sfx}");
    Some(Plan {
        inputs: vec![t(nq), t(nk), t(nk), t(nq), t(nq)],
        scratch: vec![f32s(rows), f32s(rows), t(nq + 2 * nk)],
        launches: vec![
            launch(
                name("stats"),
                grid(a.n),
                128,
                tail(vec![buf(0), buf(1), buf(3), buf(4), buf(5), buf(6)]),
            ),
            launch(
                name("bwd_dq"),
                grid(a.n),
                128,
                tail(vec![buf(0), buf(1), buf(2), buf(4), buf(5), buf(6), buf(7)]),
            ),
            launch(
                name("bwd_dkv"),
                grid(a.m),
                128,
                tail(vec![
                    buf(0),
                    buf(1),
                    buf(2),
                    buf(4),
                    buf(5),
                    buf(6),
                    at(7, nq),
                    at(7, nq + nk),
                ]),
            ),
        ],
        output: 7,
    })
}
