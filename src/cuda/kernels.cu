// Our CUDA kernels, compiled to PTX by build.rs when the `cuda` feature is on
// (nvcc from CUDA_HOME, arch compute_${CUDA_COMPUTE_CAP:-90}) and loaded at run
// time through candle's custom-module cache (src/cuda/mod.rs).

#include <stddef.h>

// One AdamW update (torch.optim.AdamW: decoupled weight decay, bias-corrected
// moments) over n contiguous f32 elements, in place: the same operations as
// the plain tensor-op update in src/optim/adamw.rs, one pass over memory.
extern "C" __global__ void dreambooth_adamw_f32(
    float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
    const float* __restrict__ g, const size_t n, const float grad_scale,
    const float beta1, const float one_minus_beta1, const float beta2,
    const float one_minus_beta2, const float inv_bc2_sqrt, const float eps,
    const float decay, const float step_size) {
  const size_t stride = (size_t)blockDim.x * gridDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gi = g[i] * grad_scale;
    const float mi = m[i] * beta1 + gi * one_minus_beta1;
    const float vi = v[i] * beta2 + (gi * gi) * one_minus_beta2;
    const float denom = sqrtf(vi) * inv_bc2_sqrt + eps;
    p[i] = p[i] * decay - (mi / denom) * step_size;
    m[i] = mi;
    v[i] = vi;
  }
}

// ---------------------------------------------------------------------------
// Convolution columns (src/nn/conv_gemm.rs): im2col gathers the input patches
// of a (B, C, H, W) image batch into (B, C·KH·KW, HO·WO) columns; col2im sums
// column gradients back onto the input (a gather per input element, f32
// accumulation, no atomics).
// ---------------------------------------------------------------------------

#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <typename T>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ cols, size_t B, size_t C,
                       size_t H, size_t W, size_t KH, size_t KW, size_t stride, size_t pad,
                       size_t HO, size_t WO) {
  const size_t total = B * C * KH * KW * HO * WO;
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += step) {
    size_t t = idx;
    const size_t ow = t % WO; t /= WO;
    const size_t oh = t % HO; t /= HO;
    const size_t kw = t % KW; t /= KW;
    const size_t kh = t % KH; t /= KH;
    const size_t c = t % C;
    const size_t b = t / C;
    const long ih = (long)(oh * stride + kh) - (long)pad;
    const long iw = (long)(ow * stride + kw) - (long)pad;
    T v = from_f<T>(0.0f);
    if (ih >= 0 && ih < (long)H && iw >= 0 && iw < (long)W) {
      v = x[((b * C + c) * H + (size_t)ih) * W + (size_t)iw];
    }
    cols[idx] = v;
  }
}

template <typename T>
__device__ void col2im(const T* __restrict__ cols, T* __restrict__ dx, size_t B, size_t C,
                       size_t H, size_t W, size_t KH, size_t KW, size_t stride, size_t pad,
                       size_t HO, size_t WO) {
  const size_t total = B * C * H * W;
  const size_t step = (size_t)blockDim.x * gridDim.x;
  const size_t L = HO * WO;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += step) {
    size_t t = idx;
    const size_t iw = t % W; t /= W;
    const size_t ih = t % H; t /= H;
    const size_t c = t % C;
    const size_t b = t / C;
    float acc = 0.0f;
    for (size_t kh = 0; kh < KH; ++kh) {
      const long y = (long)ih + (long)pad - (long)kh;
      if (y < 0 || y % (long)stride != 0) continue;
      const size_t oh = (size_t)y / stride;
      if (oh >= HO) continue;
      for (size_t kw = 0; kw < KW; ++kw) {
        const long xx = (long)iw + (long)pad - (long)kw;
        if (xx < 0 || xx % (long)stride != 0) continue;
        const size_t ow = (size_t)xx / stride;
        if (ow >= WO) continue;
        acc += to_f(cols[(((b * C + c) * KH + kh) * KW + kw) * L + oh * WO + ow]);
      }
    }
    dx[idx] = from_f<T>(acc);
  }
}

#define CONV_COLUMNS(NAME, T)                                                               \
  extern "C" __global__ void dreambooth_im2col_##NAME(                                      \
      const T* x, T* cols, size_t B, size_t C, size_t H, size_t W, size_t KH, size_t KW,    \
      size_t stride, size_t pad, size_t HO, size_t WO) {                                    \
    im2col<T>(x, cols, B, C, H, W, KH, KW, stride, pad, HO, WO);                            \
  }                                                                                         \
  extern "C" __global__ void dreambooth_col2im_##NAME(                                      \
      const T* cols, T* dx, size_t B, size_t C, size_t H, size_t W, size_t KH, size_t KW,   \
      size_t stride, size_t pad, size_t HO, size_t WO) {                                    \
    col2im<T>(cols, dx, B, C, H, W, KH, KW, stride, pad, HO, WO);                           \
  }

CONV_COLUMNS(f32, float)
CONV_COLUMNS(bf16, __nv_bfloat16)
CONV_COLUMNS(f16, __half)

// ---------------------------------------------------------------------------
// Normalization, softmax and GEGLU (src/cuda/fused.rs; the CPU versions are
// src/nn/fused.rs). Inputs and outputs in T (f32, bf16 or f16), statistics
// and reductions in f32, parameter gradients in f32. Every kernel loops over
// its rows or elements with a grid stride, so any grid is correct and the
// launch shape only sets the speed; blockDim.x is a power of two <= 1024.
// Only __syncthreads and shared memory (no warp intrinsics): the CPU
// simulation in tools/cuda/sim runs these same sources in the tests.
// ---------------------------------------------------------------------------

#include <math.h>

// The sum / max of v over the block; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_max(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + expf(-z)); }

// (mean, 1/std) of one row of d elements (two passes: no cancellation).
template <typename T>
__device__ void row_moments(const T* xr, size_t d, float eps, float* sh, float* mean,
                            float* rstd) {
  float s = 0.0f;
  for (size_t j = threadIdx.x; j < d; j += blockDim.x) s += to_f(xr[j]);
  const float m = block_sum(s, sh) / (float)d;
  float q = 0.0f;
  for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float c = to_f(xr[j]) - m;
    q += c * c;
  }
  const float var = block_sum(q, sh) / (float)d;
  *mean = m;
  *rstd = 1.0f / sqrtf(var + eps);
}

// softmax(scale * x) over rows of d; scale > 0.
template <typename T>
__device__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ y, size_t rows, size_t d,
                            float scale) {
  __shared__ float sh[1024];
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    float m = -INFINITY;
    for (size_t j = threadIdx.x; j < d; j += blockDim.x) m = fmaxf(m, to_f(xr[j]));
    m = block_max(m, sh);
    if (m == -INFINITY) m = 0.0f;
    float s = 0.0f;
    for (size_t j = threadIdx.x; j < d; j += blockDim.x) s += expf(scale * (to_f(xr[j]) - m));
    const float inv = 1.0f / block_sum(s, sh);
    for (size_t j = threadIdx.x; j < d; j += blockDim.x)
      yr[j] = from_f<T>(expf(scale * (to_f(xr[j]) - m)) * inv);
  }
}

// dx = scale * y * (dy - sum(dy * y)) per row.
template <typename T>
__device__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                            size_t rows, size_t d, float scale) {
  __shared__ float sh[1024];
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + r * d;
    const T* gr = dy + r * d;
    float s = 0.0f;
    for (size_t j = threadIdx.x; j < d; j += blockDim.x) s += to_f(yr[j]) * to_f(gr[j]);
    const float dot = block_sum(s, sh);
    for (size_t j = threadIdx.x; j < d; j += blockDim.x)
      dx[r * d + j] = from_f<T>(scale * to_f(yr[j]) * (to_f(gr[j]) - dot));
  }
}

// LayerNorm over rows of d with affine w, b (f32).
template <typename T>
__device__ void layer_norm_fwd(const T* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ b, T* __restrict__ y, size_t rows,
                               size_t d, float eps) {
  __shared__ float sh[1024];
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    float mean, rstd;
    row_moments(xr, d, eps, sh, &mean, &rstd);
    for (size_t j = threadIdx.x; j < d; j += blockDim.x)
      y[r * d + j] = from_f<T>((to_f(xr[j]) - mean) * rstd * w[j] + b[j]);
  }
}

// stats[2r], stats[2r + 1] = mean, 1/std of row r.
template <typename T>
__device__ void layer_norm_stats(const T* __restrict__ x, float* __restrict__ stats, size_t rows,
                                 size_t d, float eps) {
  __shared__ float sh[1024];
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float mean, rstd;
    row_moments(x + r * d, d, eps, sh, &mean, &rstd);
    if (threadIdx.x == 0) {
      stats[2 * r] = mean;
      stats[2 * r + 1] = rstd;
    }
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, per row.
template <typename T>
__device__ void layer_norm_bwd_dx(const T* __restrict__ x, const T* __restrict__ dy,
                                  const float* __restrict__ w, T* __restrict__ dx, size_t rows,
                                  size_t d, float eps) {
  __shared__ float sh[1024];
  for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    float mean, rstd;
    row_moments(xr, d, eps, sh, &mean, &rstd);
    float a1 = 0.0f, a2 = 0.0f;
    for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
      const float g = to_f(gr[j]) * w[j];
      a1 += g;
      a2 += g * (to_f(xr[j]) - mean) * rstd;
    }
    const float m1 = block_sum(a1, sh) / (float)d;
    const float m2 = block_sum(a2, sh) / (float)d;
    for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
      const float xh = (to_f(xr[j]) - mean) * rstd;
      dx[r * d + j] = from_f<T>(rstd * (to_f(gr[j]) * w[j] - m1 - xh * m2));
    }
  }
}

// Partial sums of dw = sum dy * xhat and db = sum dy over rows
// [c * chunk, (c + 1) * chunk): partial[c * 2d + j] and partial[c * 2d + d + j].
template <typename T>
__device__ void layer_norm_bwd_params(const T* __restrict__ x, const T* __restrict__ dy,
                                      const float* __restrict__ stats, float* __restrict__ partial,
                                      size_t rows, size_t d, size_t chunk, size_t n_chunks) {
  const size_t total = n_chunks * d;
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const size_t c = idx / d, j = idx % d;
    const size_t r1 = (c + 1) * chunk < rows ? (c + 1) * chunk : rows;
    float sw = 0.0f, sb = 0.0f;
    for (size_t r = c * chunk; r < r1; ++r) {
      const float g = to_f(dy[r * d + j]);
      sw += g * (to_f(x[r * d + j]) - stats[2 * r]) * stats[2 * r + 1];
      sb += g;
    }
    partial[c * 2 * d + j] = sw;
    partial[c * 2 * d + d + j] = sb;
  }
}

// out[k] = sum over c of partial[c * width + k].
extern "C" __global__ void dreambooth_sum_partials(const float* __restrict__ partial,
                                                   float* __restrict__ out, size_t n_chunks,
                                                   size_t width) {
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < width; k += step) {
    float s = 0.0f;
    for (size_t c = 0; c < n_chunks; ++c) s += partial[c * width + k];
    out[k] = s;
  }
}

// GroupNorm statistics, split over `parts` blocks per row (rows = B * G of
// m = C / G * S elements each): partial[3 (r * parts + p) ..] = (sum (x - k),
// sum (x - k)^2, k) over part p, shifted by the row's first element k.
template <typename T>
__device__ void group_norm_stats(const T* __restrict__ x, float* __restrict__ partial, size_t rows,
                                 size_t m, size_t parts) {
  __shared__ float sh[1024];
  const size_t len = (m + parts - 1) / parts;
  for (size_t item = blockIdx.x; item < rows * parts; item += gridDim.x) {
    const size_t r = item / parts, p = item % parts;
    const T* xr = x + r * m;
    const float k = to_f(xr[0]);
    const size_t j1 = (p + 1) * len < m ? (p + 1) * len : m;
    float s1 = 0.0f, s2 = 0.0f;
    for (size_t j = p * len + threadIdx.x; j < j1; j += blockDim.x) {
      const float v = to_f(xr[j]) - k;
      s1 += v;
      s2 += v * v;
    }
    s1 = block_sum(s1, sh);
    s2 = block_sum(s2, sh);
    if (threadIdx.x == 0) {
      partial[3 * item] = s1;
      partial[3 * item + 1] = s2;
      partial[3 * item + 2] = k;
    }
  }
}

// stats[2r], stats[2r + 1] = mean, 1/std of row r from its partial sums.
extern "C" __global__ void dreambooth_group_norm_finalize(const float* __restrict__ partial,
                                                         float* __restrict__ stats, size_t rows,
                                                         size_t parts, size_t m, float eps) {
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += step) {
    double s1 = 0.0, s2 = 0.0;
    for (size_t p = 0; p < parts; ++p) {
      s1 += partial[3 * (r * parts + p)];
      s2 += partial[3 * (r * parts + p) + 1];
    }
    const double ms = s1 / (double)m;
    double var = s2 / (double)m - ms * ms;
    if (var < 0.0) var = 0.0;
    stats[2 * r] = (float)(ms + (double)partial[3 * r * parts + 2]);
    stats[2 * r + 1] = (float)(1.0 / sqrt(var + (double)eps));
  }
}

// Index helpers for (B, C, S) tensors split into G groups.
struct GroupIndex {
  size_t c, row;
  __device__ GroupIndex(size_t idx, size_t C, size_t S, size_t G) {
    const size_t bc = idx / S;
    c = bc % C;
    row = (bc / C) * G + c / (C / G);
  }
};

// y = silu?((x - mean) * rstd * w[c] + b[c]).
template <typename T>
__device__ void group_norm_apply(const T* __restrict__ x, const float* __restrict__ stats,
                                 const float* __restrict__ w, const float* __restrict__ b,
                                 T* __restrict__ y, size_t B, size_t C, size_t S, size_t G,
                                 int silu) {
  const size_t n = B * C * S;
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += step) {
    const GroupIndex gi(idx, C, S, G);
    const float z = (to_f(x[idx]) - stats[2 * gi.row]) * stats[2 * gi.row + 1] * w[gi.c] + b[gi.c];
    y[idx] = from_f<T>(silu ? z * sigmoid_f(z) : z);
  }
}

// The gradient before the affine (through SiLU when fused) at one element,
// and xhat.
__device__ __forceinline__ void group_norm_dz(float xv, float gv, float mean, float rstd, float wc,
                                              float bc, int silu, float* dz, float* xh) {
  *xh = (xv - mean) * rstd;
  if (silu) {
    const float z = *xh * wc + bc;
    const float s = sigmoid_f(z);
    *dz = gv * s * (1.0f + z * (1.0f - s));
  } else {
    *dz = gv;
  }
}

// Per (sample, channel) row of S: chan[2 (b C + c)] = sum dz * xhat,
// chan[2 (b C + c) + 1] = sum dz.
template <typename T>
__device__ void group_norm_bwd_channel(const T* __restrict__ x, const T* __restrict__ dy,
                                       const float* __restrict__ stats,
                                       const float* __restrict__ w, const float* __restrict__ b,
                                       float* __restrict__ chan, size_t B, size_t C, size_t S,
                                       size_t G, int silu) {
  __shared__ float sh[1024];
  for (size_t bc = blockIdx.x; bc < B * C; bc += gridDim.x) {
    const GroupIndex gi(bc * S, C, S, G);
    const float mean = stats[2 * gi.row], rstd = stats[2 * gi.row + 1];
    float s1 = 0.0f, s2 = 0.0f;
    for (size_t j = threadIdx.x; j < S; j += blockDim.x) {
      float dz, xh;
      group_norm_dz(to_f(x[bc * S + j]), to_f(dy[bc * S + j]), mean, rstd, w[gi.c], b[gi.c], silu,
                    &dz, &xh);
      s1 += dz * xh;
      s2 += dz;
    }
    s1 = block_sum(s1, sh);
    s2 = block_sum(s2, sh);
    if (threadIdx.x == 0) {
      chan[2 * bc] = s1;
      chan[2 * bc + 1] = s2;
    }
  }
}

// From the per-(sample, channel) sums: params = [dw (C); db (C)] summed over
// the batch, and per (sample, group) row coef[2r] = mean(dxhat),
// coef[2r + 1] = mean(dxhat * xhat) (dxhat = dz * w) over its m elements.
extern "C" __global__ void dreambooth_group_norm_bwd_reduce(const float* __restrict__ chan,
                                                           const float* __restrict__ w,
                                                           float* __restrict__ params,
                                                           float* __restrict__ coef, size_t B,
                                                           size_t C, size_t G, size_t m) {
  const size_t total = C > B * G ? C : B * G;
  const size_t cpg = C / G;
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    if (i < C) {
      float dw = 0.0f, db = 0.0f;
      for (size_t bi = 0; bi < B; ++bi) {
        dw += chan[2 * (bi * C + i)];
        db += chan[2 * (bi * C + i) + 1];
      }
      params[i] = dw;
      params[C + i] = db;
    }
    if (i < B * G) {
      const size_t bi = i / G, c0 = (i % G) * cpg;
      float s1 = 0.0f, s2 = 0.0f;
      for (size_t k = 0; k < cpg; ++k) {
        const size_t ch = bi * C + c0 + k;
        s1 += w[c0 + k] * chan[2 * ch + 1];
        s2 += w[c0 + k] * chan[2 * ch];
      }
      coef[2 * i] = s1 / (float)m;
      coef[2 * i + 1] = s2 / (float)m;
    }
  }
}

// dx = rstd * (dz * w[c] - coef[2r] - xhat * coef[2r + 1]).
template <typename T>
__device__ void group_norm_bwd_dx(const T* __restrict__ x, const T* __restrict__ dy,
                                  const float* __restrict__ stats, const float* __restrict__ coef,
                                  const float* __restrict__ w, const float* __restrict__ b,
                                  T* __restrict__ dx, size_t B, size_t C, size_t S, size_t G,
                                  int silu) {
  const size_t n = B * C * S;
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += step) {
    const GroupIndex gi(idx, C, S, G);
    const float rstd = stats[2 * gi.row + 1];
    float dz, xh;
    group_norm_dz(to_f(x[idx]), to_f(dy[idx]), stats[2 * gi.row], rstd, w[gi.c], b[gi.c], silu,
                  &dz, &xh);
    dx[idx] = from_f<T>(rstd * (dz * w[gi.c] - coef[2 * gi.row] - xh * coef[2 * gi.row + 1]));
  }
}

// Exact (erf) GELU and its derivative.
__device__ __forceinline__ void gelu_and_grad(float x, float* y, float* dy) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  *y = x * cdf;
  *dy = cdf + x * 0.39894228040143268f * expf(-0.5f * x * x);
}

// GEGLU: h's rows of 2d split into (a, gate); y = a * gelu(gate).
template <typename T>
__device__ void geglu_fwd(const T* __restrict__ h, T* __restrict__ y, size_t rows, size_t d) {
  const size_t n = rows * d;
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += step) {
    const size_t r = idx / d, j = idx % d;
    float g, dg;
    gelu_and_grad(to_f(h[r * 2 * d + d + j]), &g, &dg);
    y[idx] = from_f<T>(to_f(h[r * 2 * d + j]) * g);
  }
}

// dh = [dy * gelu(gate); dy * a * gelu'(gate)].
template <typename T>
__device__ void geglu_bwd(const T* __restrict__ h, const T* __restrict__ dy, T* __restrict__ dh,
                          size_t rows, size_t d) {
  const size_t n = rows * d;
  const size_t step = (size_t)blockDim.x * gridDim.x;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += step) {
    const size_t r = idx / d, j = idx % d;
    float g, dg;
    gelu_and_grad(to_f(h[r * 2 * d + d + j]), &g, &dg);
    const float gv = to_f(dy[idx]);
    dh[r * 2 * d + j] = from_f<T>(gv * g);
    dh[r * 2 * d + d + j] = from_f<T>(gv * to_f(h[r * 2 * d + j]) * dg);
  }
}

#define FUSED_OPS(NAME, T)                                                                      \
  extern "C" __global__ void dreambooth_softmax_fwd_##NAME(const T* x, T* y, size_t rows,       \
                                                           size_t d, float scale) {             \
    softmax_fwd<T>(x, y, rows, d, scale);                                                       \
  }                                                                                             \
  extern "C" __global__ void dreambooth_softmax_bwd_##NAME(const T* y, const T* dy, T* dx,      \
                                                           size_t rows, size_t d, float scale) { \
    softmax_bwd<T>(y, dy, dx, rows, d, scale);                                                  \
  }                                                                                             \
  extern "C" __global__ void dreambooth_layer_norm_fwd_##NAME(                                  \
      const T* x, const float* w, const float* b, T* y, size_t rows, size_t d, float eps) {     \
    layer_norm_fwd<T>(x, w, b, y, rows, d, eps);                                                \
  }                                                                                             \
  extern "C" __global__ void dreambooth_layer_norm_stats_##NAME(const T* x, float* stats,       \
                                                                size_t rows, size_t d,          \
                                                                float eps) {                    \
    layer_norm_stats<T>(x, stats, rows, d, eps);                                                \
  }                                                                                             \
  extern "C" __global__ void dreambooth_layer_norm_bwd_dx_##NAME(                               \
      const T* x, const T* dy, const float* w, T* dx, size_t rows, size_t d, float eps) {       \
    layer_norm_bwd_dx<T>(x, dy, w, dx, rows, d, eps);                                           \
  }                                                                                             \
  extern "C" __global__ void dreambooth_layer_norm_bwd_params_##NAME(                           \
      const T* x, const T* dy, const float* stats, float* partial, size_t rows, size_t d,       \
      size_t chunk, size_t n_chunks) {                                                          \
    layer_norm_bwd_params<T>(x, dy, stats, partial, rows, d, chunk, n_chunks);                  \
  }                                                                                             \
  extern "C" __global__ void dreambooth_group_norm_stats_##NAME(const T* x, float* partial,     \
                                                                size_t rows, size_t m,          \
                                                                size_t parts) {                 \
    group_norm_stats<T>(x, partial, rows, m, parts);                                            \
  }                                                                                             \
  extern "C" __global__ void dreambooth_group_norm_apply_##NAME(                                \
      const T* x, const float* stats, const float* w, const float* b, T* y, size_t B, size_t C, \
      size_t S, size_t G, int silu) {                                                           \
    group_norm_apply<T>(x, stats, w, b, y, B, C, S, G, silu);                                   \
  }                                                                                             \
  extern "C" __global__ void dreambooth_group_norm_bwd_channel_##NAME(                          \
      const T* x, const T* dy, const float* stats, const float* w, const float* b, float* chan, \
      size_t B, size_t C, size_t S, size_t G, int silu) {                                       \
    group_norm_bwd_channel<T>(x, dy, stats, w, b, chan, B, C, S, G, silu);                      \
  }                                                                                             \
  extern "C" __global__ void dreambooth_group_norm_bwd_dx_##NAME(                               \
      const T* x, const T* dy, const float* stats, const float* coef, const float* w,           \
      const float* b, T* dx, size_t B, size_t C, size_t S, size_t G, int silu) {                \
    group_norm_bwd_dx<T>(x, dy, stats, coef, w, b, dx, B, C, S, G, silu);                       \
  }                                                                                             \
  extern "C" __global__ void dreambooth_geglu_fwd_##NAME(const T* h, T* y, size_t rows,         \
                                                         size_t d) {                            \
    geglu_fwd<T>(h, y, rows, d);                                                                \
  }                                                                                             \
  extern "C" __global__ void dreambooth_geglu_bwd_##NAME(const T* h, const T* dy, T* dh,        \
                                                         size_t rows, size_t d) {               \
    geglu_bwd<T>(h, dy, dh, rows, d);                                                           \
  }

FUSED_OPS(f32, float)
FUSED_OPS(bf16, __nv_bfloat16)
FUSED_OPS(f16, __half)

// ---------------------------------------------------------------------------
// Flash attention forward (src/nn/attention_flash.rs): o = softmax(q kᵀ ·
// scale) v per (batch, head) on token-major q (B, N, H·d), k and v (B, M, H·d)
// → o (B, N, H·d), without ever holding the (N, M) scores: each block takes
// 64 query rows of one head (a 16-row slice per warp), walks the keys in
// tiles of BC with an online softmax (running max and sum per row, the
// output rescaled as the max grows), and multiplies on the tensor cores
// (wmma 16×16×16, bf16 / f16 in, f32 accumulators). The head dimension d is
// padded with zeros to the kernel's D (a multiple of 16, d ≤ D); rows and
// keys past N and M are masked. Shared memory: the Q tile (then the K and V
// tiles in the same space), each warp's f32 score tile and its probabilities
// in T, and two 32-float exchanges per warp for the row reductions (two lanes
// per row). Grid-stride over the B·H·⌈N/64⌉ tiles; 128 threads per block.
// ---------------------------------------------------------------------------

#include <mma.h>

// A ROWS × D tile (row stride LD) of one head of a token-major (rows, ld)
// tensor into shared memory: tile[r][c] = src[r · ld + c] for r < rows and c < d,
// zeros elsewhere (the padding columns and the rows past the end); `src`
// points at the head's first column of the tile's first row. 16-byte loads
// and stores when d, ld and `src` allow (SD's heads of 40, 64, 80, 160 at
// an aligned base), else one element at a time. Every thread of the block
// takes part.
template <typename T, int ROWS, int D, int LD>
__device__ __forceinline__ void load_head_tile(T* __restrict__ tile, const T* __restrict__ src,
                                               size_t rows, size_t ld, size_t d) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector
  if (d % V == 0 && ld % V == 0 && reinterpret_cast<size_t>(src) % 16 == 0) {
    constexpr int PER_ROW = D / V;
    for (unsigned i = threadIdx.x; i < ROWS * PER_ROW; i += blockDim.x) {
      const size_t r = i / PER_ROW, c = (i % PER_ROW) * V;
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < rows && c < d) x = *reinterpret_cast<const uint4*>(src + r * ld + c);
      *reinterpret_cast<uint4*>(tile + r * LD + c) = x;
    }
  } else {
    const T zero = from_f<T>(0.0f);
    for (unsigned i = threadIdx.x; i < ROWS * D; i += blockDim.x) {
      const size_t r = i / D, c = i % D;
      tile[r * LD + c] = (r < rows && c < d) ? src[r * ld + c] : zero;
    }
  }
}

// Rows left from `first` of `len`, at most `rows`.
__device__ __forceinline__ size_t rows_left(size_t first, size_t len, size_t rows) {
  return first < len ? (len - first < rows ? len - first : rows) : 0;
}

template <typename T>
using RowFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// out (16 × W, row stride LDS) = A · Xᵀ for a warp: A its 16 rows of D as
// fragments, X a shared W × D tile (row stride LDT), e.g. the scores Q Kᵀ.
template <typename T, int D, int W, int LDT, int LDS>
__device__ __forceinline__ void product_t(float* out, const RowFrag<T> (&a)[D / 16], const T* x) {
  using namespace nvcuda;
  for (int cb = 0; cb < W / 16; ++cb) {
    AccFrag s;
    wmma::fill_fragment(s, 0.0f);
    for (int ks = 0; ks < D / 16; ++ks) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> xf;
      wmma::load_matrix_sync(xf, x + cb * 16 * LDT + ks * 16, LDT);
      wmma::mma_sync(s, a[ks], xf, s);
    }
    wmma::store_matrix_sync(out + cb * 16, s, LDS, wmma::mem_row_major);
  }
}

// acc (16 × D) += P · X for a warp: P a shared 16 × W tile (row stride
// LDP), X a shared W × D tile (row stride LDT), e.g. dq += dS K.
template <typename T, int D, int W, int LDP, int LDT>
__device__ __forceinline__ void accumulate(AccFrag (&acc)[D / 16], const T* p, const T* x) {
  using namespace nvcuda;
  for (int cb = 0; cb < D / 16; ++cb) {
    for (int kk = 0; kk < W / 16; ++kk) {
      RowFrag<T> pf;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> xf;
      wmma::load_matrix_sync(pf, p + kk * 16, LDP);
      wmma::load_matrix_sync(xf, x + kk * 16 * LDT + cb * 16, LDT);
      wmma::mma_sync(acc[cb], pf, xf, acc[cb]);
    }
  }
}

// A warp's 16 × D accumulators times `scale` into the row `dst` (the first
// d columns) of the lane's `row`, through the lane pair's scratch tile
// (16 × 16 floats, row stride LDS); `live`: the row exists.
template <typename T, int D, int LDS>
__device__ __forceinline__ void store_rows(const AccFrag (&acc)[D / 16], float* scratch, T* dst,
                                           bool live, unsigned row, unsigned half, size_t d,
                                           float scale) {
  for (int cb = 0; cb < D / 16; ++cb) {
    __syncwarp();
    nvcuda::wmma::store_matrix_sync(scratch, acc[cb], LDS, nvcuda::wmma::mem_row_major);
    __syncwarp();
    if (live) {
      for (int j = half; j < 16; j += 2) {
        const size_t c = cb * 16 + j;
        if (c < d) dst[c] = from_f<T>(scratch[row * LDS + j] * scale);
      }
    }
  }
}

// STATS: the backward's first pass instead (no output): each row's log-sum-
// exp in log2 units of the scaled scores (lse, (B·H, N)) and δ = Σ dO·O
// over the row (delta), from the forward's output `o` and its gradient `dout`.
template <typename T, int D, int BC, bool STATS>
__device__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, T* __restrict__ o,
                          const T* __restrict__ dout, float* __restrict__ lse,
                          float* __restrict__ delta, size_t B, size_t N, size_t M, size_t H,
                          size_t d, float scale) {
  using namespace nvcuda;
  constexpr int BR = 64, WARPS = 4;
  // Row strides of the score and probability tiles, padded so that the 16
  // rows a warp's lanes read at once fall in different shared memory banks
  // (a multiple of 4 floats / 8 halves, as wmma requires).
  constexpr int LDS = BC + 4, LDP = BC + 8;
  // Row stride of the Q, K, V tiles: D plus 8 halves, so that the 8 rows a
  // wmma load reads at once fall in different banks (D = 64 or 128 would
  // put them all in one).
  constexpr int LDT = D + 8;
  constexpr int A_ELEMS = (BR * LDT > 2 * BC * LDT) ? BR * LDT : 2 * BC * LDT;
  constexpr size_t BYTES = A_ELEMS * sizeof(T) + WARPS * 16 * (LDS * sizeof(float) + LDP * sizeof(T)) +
                           2 * WARPS * 32 * sizeof(float);
  __shared__ __align__(32) unsigned char smem[BYTES];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = sQ;
  T* const sV = sQ + BC * LDT;
  float* const sS = reinterpret_cast<float*>(smem + A_ELEMS * sizeof(T));
  T* const sP = reinterpret_cast<T*>(sS + WARPS * 16 * LDS);
  float* const sRed = reinterpret_cast<float*>(sP + WARPS * 16 * LDP);

  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // The warp's row this lane reduces and holds the output of, and which of
  // the row's columns it takes: those ≡ `half` (mod 2), of the scores and of
  // each 16-wide block of the output.
  const unsigned row = lane >> 1, half = lane & 1;
  float* const S = sS + warp * 16 * LDS;
  T* const P = sP + warp * 16 * LDP;
  float* const red_max = sRed + warp * 32;
  float* const red_sum = sRed + WARPS * 32 + warp * 32;
  const float scale_log2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x · log2 e)
  const size_t ld = H * d, qtiles = (N + BR - 1) / BR, tiles = B * H * qtiles;

  for (size_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const size_t qt = tile % qtiles, bh = tile / qtiles, h = bh % H, b = bh / H;
    const size_t n0 = qt * BR;
    __syncthreads();  // the previous tile is done with shared memory
    load_head_tile<T, BR, D, LDT>(sQ, q + (b * N + n0) * ld + h * d, rows_left(n0, N, BR), ld, d);
    __syncthreads();
    RowFrag<T> qf[D / 16];
    for (int ks = 0; ks < D / 16; ++ks) {
      wmma::load_matrix_sync(qf[ks], sQ + warp * 16 * LDT + ks * 16, LDT);
    }
    float acc[D / 16][8];  // output columns cb · 16 + 2j + half of the row
    for (int cb = 0; cb < D / 16; ++cb)
      for (int j = 0; j < 8; ++j) acc[cb][j] = 0.0f;
    float m_run = -INFINITY, l_run = 0.0f;  // the row's max (log2 units) and sum

    for (size_t m0 = 0; m0 < M; m0 += BC) {
      __syncthreads();  // every warp is done with sQ / the previous K and V
      const size_t keys = rows_left(m0, M, BC), at = (b * M + m0) * ld + h * d;
      load_head_tile<T, BC, D, LDT>(sK, k + at, keys, ld, d);
      if constexpr (!STATS) load_head_tile<T, BC, D, LDT>(sV, v + at, keys, ld, d);
      __syncthreads();
      product_t<T, D, BC, LDT, LDS>(S, qf, sK);  // S = Q Kᵀ for the warp's 16 rows
      __syncwarp();
      // Online softmax of the row: the new max, the old sum and output
      // rescaled by exp(old max − new max), this tile's probabilities.
      const float* Sr = S + row * LDS;
      float mx = -INFINITY;
      for (unsigned j = half; j < BC; j += 2) {
        if (m0 + j < M) mx = fmaxf(mx, Sr[j] * scale_log2);
      }
      red_max[lane] = mx;
      __syncwarp();
      mx = fmaxf(mx, red_max[lane ^ 1]);
      const float m_new = fmaxf(m_run, mx);  // finite: a tile has at least one key
      const float alpha = exp2f(m_run - m_new);
      float sum = 0.0f;
      for (unsigned j = half; j < BC; j += 2) {
        const float p = (m0 + j < M) ? exp2f(Sr[j] * scale_log2 - m_new) : 0.0f;
        P[row * LDP + j] = from_f<T>(p);
        sum += p;
      }
      red_sum[lane] = sum;
      __syncwarp();
      l_run = l_run * alpha + sum + red_sum[lane ^ 1];
      m_run = m_new;
      if constexpr (!STATS) {
        for (int cb = 0; cb < D / 16; ++cb)
          for (int j = 0; j < 8; ++j) acc[cb][j] *= alpha;
        // O += P V, one 16-column block at a time through the (now free)
        // score tile.
        for (int cb = 0; cb < D / 16; ++cb) {
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> pv;
          wmma::fill_fragment(pv, 0.0f);
          for (int kk = 0; kk < BC / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
            wmma::load_matrix_sync(pf, P + kk * 16, LDP);
            wmma::load_matrix_sync(vf, sV + kk * 16 * LDT + cb * 16, LDT);
            wmma::mma_sync(pv, pf, vf, pv);
          }
          wmma::store_matrix_sync(S, pv, LDS, wmma::mem_row_major);
          __syncwarp();
          for (int j = 0; j < 8; ++j) acc[cb][j] += S[row * LDS + 2 * j + half];
          __syncwarp();
        }
      }
    }

    const size_t n = n0 + warp * 16 + row;
    if constexpr (STATS) {
      float dd = 0.0f;
      if (n < N) {
        const size_t at = (b * N + n) * ld + h * d;
        for (size_t c = half; c < d; c += 2) dd += to_f(dout[at + c]) * to_f(o[at + c]);
      }
      red_max[lane] = dd;  // the partner read its max before the sum exchange
      __syncwarp();
      dd += red_max[lane ^ 1];
      if (n < N && half == 0) {
        lse[bh * N + n] = m_run + log2f(l_run);
        delta[bh * N + n] = dd;
      }
      continue;
    }
    if (n < N) {
      const float inv = l_run > 0.0f ? 1.0f / l_run : 0.0f;
      for (int cb = 0; cb < D / 16; ++cb)
        for (int j = 0; j < 8; ++j) {
          const size_t c = cb * 16 + 2 * j + half;
          if (c < d) o[(b * N + n) * ld + h * d + c] = from_f<T>(acc[cb][j] * inv);
        }
    }
  }
}

// The flash backward's second pass: dq = scale · Σ_keys dS k per query row,
// dS = P ∘ (dP − δ), P = exp2(s · scale · log2 e − lse) recomputed, dP = dO vᵀ;
// a block per 64 query rows of one head (16 per warp), keys in tiles of BC.
template <typename T, int D, int BC>
__device__ void flash_bwd_dq(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const T* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             T* __restrict__ dq, size_t B, size_t N, size_t M, size_t H, size_t d,
                             float scale) {
  using namespace nvcuda;
  constexpr int BR = 64, WARPS = 4, LDS = BC + 4, LDP = BC + 8, LDT = D + 8;
  constexpr int A_ELEMS = (2 * BR * LDT > 2 * BC * LDT) ? 2 * BR * LDT : 2 * BC * LDT;
  constexpr size_t BYTES = A_ELEMS * sizeof(T) + WARPS * 16 * (2 * LDS * sizeof(float) + LDP * sizeof(T));
  __shared__ __align__(32) unsigned char smem[BYTES];
  T* const sQ = reinterpret_cast<T*>(smem);  // then sK
  T* const sO = sQ + BR * LDT;                 // dO rows
  T* const sK = sQ;
  T* const sV = sQ + BC * LDT;
  float* const sS = reinterpret_cast<float*>(smem + A_ELEMS * sizeof(T));
  float* const sD = sS + WARPS * 16 * LDS;
  T* const sP = reinterpret_cast<T*>(sD + WARPS * 16 * LDS);

  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const unsigned row = lane >> 1, half = lane & 1;
  float* const S = sS + warp * 16 * LDS;
  float* const DP = sD + warp * 16 * LDS;
  T* const P = sP + warp * 16 * LDP;
  const float scale_log2 = scale * 1.4426950408889634f;
  const size_t ld = H * d, qtiles = (N + BR - 1) / BR, tiles = B * H * qtiles;

  for (size_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const size_t qt = tile % qtiles, bh = tile / qtiles, h = bh % H, b = bh / H;
    const size_t n0 = qt * BR, n = n0 + warp * 16 + row;
    __syncthreads();
    {
      const size_t rows = rows_left(n0, N, BR), at = (b * N + n0) * ld + h * d;
      load_head_tile<T, BR, D, LDT>(sQ, q + at, rows, ld, d);
      load_head_tile<T, BR, D, LDT>(sO, dout + at, rows, ld, d);
    }
    __syncthreads();
    RowFrag<T> qf[D / 16], of[D / 16];
    for (int ks = 0; ks < D / 16; ++ks) {
      wmma::load_matrix_sync(qf[ks], sQ + warp * 16 * LDT + ks * 16, LDT);
      wmma::load_matrix_sync(of[ks], sO + warp * 16 * LDT + ks * 16, LDT);
    }
    AccFrag acc[D / 16];
    for (int cb = 0; cb < D / 16; ++cb) wmma::fill_fragment(acc[cb], 0.0f);
    const float row_lse = n < N ? lse[bh * N + n] : 0.0f;
    const float row_delta = n < N ? delta[bh * N + n] : 0.0f;

    for (size_t m0 = 0; m0 < M; m0 += BC) {
      __syncthreads();
      const size_t keys = rows_left(m0, M, BC), at = (b * M + m0) * ld + h * d;
      load_head_tile<T, BC, D, LDT>(sK, k + at, keys, ld, d);
      load_head_tile<T, BC, D, LDT>(sV, v + at, keys, ld, d);
      __syncthreads();
      // S = Q Kᵀ and dP = dO Vᵀ for the warp's 16 rows.
      product_t<T, D, BC, LDT, LDS>(S, qf, sK);
      product_t<T, D, BC, LDT, LDS>(DP, of, sV);
      __syncwarp();
      for (unsigned j = half; j < BC; j += 2) {
        const bool in = n < N && m0 + j < M;
        const float p = in ? exp2f(S[row * LDS + j] * scale_log2 - row_lse) : 0.0f;
        P[row * LDP + j] = from_f<T>(p * (DP[row * LDS + j] - row_delta));
      }
      __syncwarp();
      accumulate<T, D, BC, LDP, LDT>(acc, P, sK);  // dq += dS K
    }
    // (Row 0 stands in for a row past the end, which writes nothing.)
    store_rows<T, D, LDS>(acc, S, dq + (b * N + (n < N ? n : 0)) * ld + h * d, n < N, row, half, d,
                          scale);
  }
}

// The flash backward's third pass: dv = Σ_queries Pᵀ dO and dk = scale ·
// Σ_queries dSᵀ q per key, from the transposed tiles Sᵀ = k qᵀ and dPᵀ = v dOᵀ;
// a block per 64 keys of one head (16 per warp), queries in tiles of BQ.
template <typename T, int D, int BQ>
__device__ void flash_bwd_dkv(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const T* __restrict__ dout,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              T* __restrict__ dk, T* __restrict__ dv, size_t B, size_t N,
                              size_t M, size_t H, size_t d, float scale) {
  using namespace nvcuda;
  constexpr int BK = 64, WARPS = 4, LDS = BQ + 4, LDP = BQ + 8, LDT = D + 8;
  constexpr int A_ELEMS = (2 * BK * LDT > 2 * BQ * LDT) ? 2 * BK * LDT : 2 * BQ * LDT;
  constexpr size_t BYTES = A_ELEMS * sizeof(T) +
                           WARPS * 16 * (2 * LDS * sizeof(float) + LDP * sizeof(T)) +
                           2 * BQ * sizeof(float);
  __shared__ __align__(32) unsigned char smem[BYTES];
  T* const sK = reinterpret_cast<T*>(smem);  // then sQ
  T* const sV = sK + BK * LDT;
  T* const sQ = sK;
  T* const sO = sK + BQ * LDT;  // dO rows
  float* const sS = reinterpret_cast<float*>(smem + A_ELEMS * sizeof(T));
  float* const sD = sS + WARPS * 16 * LDS;
  T* const sP = reinterpret_cast<T*>(sD + WARPS * 16 * LDS);
  float* const sL = reinterpret_cast<float*>(sP + WARPS * 16 * LDP);  // lse, then δ
  float* const sDelta = sL + BQ;

  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const unsigned row = lane >> 1, half = lane & 1;  // row: the warp's key
  float* const S = sS + warp * 16 * LDS;
  float* const DP = sD + warp * 16 * LDS;
  T* const P = sP + warp * 16 * LDP;
  const float scale_log2 = scale * 1.4426950408889634f;
  const size_t ld = H * d, ktiles = (M + BK - 1) / BK, tiles = B * H * ktiles;

  for (size_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const size_t kt = tile % ktiles, bh = tile / ktiles, h = bh % H, b = bh / H;
    const size_t m0 = kt * BK, key = m0 + warp * 16 + row;
    __syncthreads();
    {
      const size_t keys = rows_left(m0, M, BK), at = (b * M + m0) * ld + h * d;
      load_head_tile<T, BK, D, LDT>(sK, k + at, keys, ld, d);
      load_head_tile<T, BK, D, LDT>(sV, v + at, keys, ld, d);
    }
    __syncthreads();
    RowFrag<T> kf[D / 16], vf[D / 16];
    for (int ks = 0; ks < D / 16; ++ks) {
      wmma::load_matrix_sync(kf[ks], sK + warp * 16 * LDT + ks * 16, LDT);
      wmma::load_matrix_sync(vf[ks], sV + warp * 16 * LDT + ks * 16, LDT);
    }
    AccFrag dka[D / 16], dva[D / 16];
    for (int cb = 0; cb < D / 16; ++cb) {
      wmma::fill_fragment(dka[cb], 0.0f);
      wmma::fill_fragment(dva[cb], 0.0f);
    }

    for (size_t n0 = 0; n0 < N; n0 += BQ) {
      __syncthreads();
      const size_t rows = rows_left(n0, N, BQ), at = (b * N + n0) * ld + h * d;
      load_head_tile<T, BQ, D, LDT>(sQ, q + at, rows, ld, d);
      load_head_tile<T, BQ, D, LDT>(sO, dout + at, rows, ld, d);
      for (unsigned i = tid; i < BQ; i += blockDim.x) {
        const bool in = n0 + i < N;
        sL[i] = in ? lse[bh * N + n0 + i] : 0.0f;
        sDelta[i] = in ? delta[bh * N + n0 + i] : 0.0f;
      }
      __syncthreads();
      // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for the warp's 16 keys.
      product_t<T, D, BQ, LDT, LDS>(S, kf, sQ);
      product_t<T, D, BQ, LDT, LDS>(DP, vf, sO);
      __syncwarp();
      // Pᵀ (in T for dv) and dSᵀ (kept in f32 in the dPᵀ tile).
      for (unsigned j = half; j < BQ; j += 2) {
        const bool in = key < M && n0 + j < N;
        const float p = in ? exp2f(S[row * LDS + j] * scale_log2 - sL[j]) : 0.0f;
        P[row * LDP + j] = from_f<T>(p);
        DP[row * LDS + j] = p * (DP[row * LDS + j] - sDelta[j]);
      }
      __syncwarp();
      accumulate<T, D, BQ, LDP, LDT>(dva, P, sO);  // dv += Pᵀ dO
      __syncwarp();
      for (unsigned j = half; j < BQ; j += 2) P[row * LDP + j] = from_f<T>(DP[row * LDS + j]);
      __syncwarp();
      accumulate<T, D, BQ, LDP, LDT>(dka, P, sQ);  // dk += dSᵀ Q (· scale below)
    }
    const size_t at = (b * M + (key < M ? key : 0)) * ld + h * d;  // row 0 for none
    store_rows<T, D, LDS>(dka, S, dk + at, key < M, row, half, d, scale);
    store_rows<T, D, LDS>(dva, S, dv + at, key < M, row, half, d, 1.0f);
  }
}

// One kernel per padded head size D (and its key tile: 64 keys up to D = 64,
// 32 above, to stay within 48 KiB of static shared memory) and dtype.
#define FLASH_FWD(NAME, T, D, BC)                                                            \
  extern "C" __global__ void dreambooth_flash_fwd_d##D##_##NAME(                             \
      const T* q, const T* k, const T* v, T* o, size_t B, size_t N, size_t M, size_t H,      \
      size_t d, float scale) {                                                               \
    flash_fwd<T, D, BC, false>(q, k, v, o, nullptr, nullptr, nullptr, B, N, M, H, d, scale); \
  }
#define FLASH_FWD_ALL(NAME, T)  \
  FLASH_FWD(NAME, T, 32, 64)    \
  FLASH_FWD(NAME, T, 48, 64)    \
  FLASH_FWD(NAME, T, 64, 64)    \
  FLASH_FWD(NAME, T, 80, 32)    \
  FLASH_FWD(NAME, T, 96, 32)    \
  FLASH_FWD(NAME, T, 128, 32)   \
  FLASH_FWD(NAME, T, 160, 32)
FLASH_FWD_ALL(bf16, __nv_bfloat16)
FLASH_FWD_ALL(f16, __half)

// The backward's three passes for heads up to 80 channels (dkv keeps the
// 64 keys' dk and dv accumulators in registers; wider heads take the
// recomputing backward), keys and queries in tiles of 32.
#define FLASH_BWD(NAME, T, D)                                                                \
  extern "C" __global__ void dreambooth_flash_stats_d##D##_##NAME(                           \
      const T* q, const T* k, const T* o, const T* dout, float* lse, float* delta, size_t B, \
      size_t N, size_t M, size_t H, size_t d, float scale) {                                 \
    flash_fwd<T, D, (D <= 64 ? 64 : 32), true>(q, k, nullptr, const_cast<T*>(o), dout, lse,     \
                                               delta, B, N, M, H, d, scale);                     \
  }                                                                                          \
  extern "C" __global__ void dreambooth_flash_bwd_dq_d##D##_##NAME(                          \
      const T* q, const T* k, const T* v, const T* dout, const float* lse,                   \
      const float* delta, T* dq, size_t B, size_t N, size_t M, size_t H, size_t d,           \
      float scale) {                                                                         \
    flash_bwd_dq<T, D, 32>(q, k, v, dout, lse, delta, dq, B, N, M, H, d, scale);              \
  }                                                                                          \
  extern "C" __global__ void dreambooth_flash_bwd_dkv_d##D##_##NAME(                         \
      const T* q, const T* k, const T* v, const T* dout, const float* lse,                   \
      const float* delta, T* dk, T* dv, size_t B, size_t N, size_t M, size_t H, size_t d,    \
      float scale) {                                                                         \
    flash_bwd_dkv<T, D, 32>(q, k, v, dout, lse, delta, dk, dv, B, N, M, H, d, scale);         \
  }
#define FLASH_BWD_ALL(NAME, T) \
  FLASH_BWD(NAME, T, 32)       \
  FLASH_BWD(NAME, T, 48)       \
  FLASH_BWD(NAME, T, 64)       \
  FLASH_BWD(NAME, T, 80)
FLASH_BWD_ALL(bf16, __nv_bfloat16)
FLASH_BWD_ALL(f16, __half)
