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
