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
