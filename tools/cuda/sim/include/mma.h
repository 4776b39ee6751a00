// CPU stand-in for CUDA's <mma.h> (tools/cuda/sim): the warp-level matrix
// multiply-accumulate API (nvcuda::wmma) for 16×16×16 tiles of bf16 / f16
// inputs and f32 accumulators. On the GPU a fragment is spread over a warp's
// 32 lanes in an unspecified layout and every lane must take part in each
// call; here every simulated thread holds the whole tile and computes it
// alone (the same values on every lane, 32 times the work), which gives the
// same results for kernels that, as they must, touch fragments only through
// these calls (load, store, fill, mma). Products are exact in f32 and summed
// in f32, as on the tensor cores.
#pragma once
#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float sim_to_float(float v) { return v; }
inline float sim_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float sim_to_float(__half v) { return __half2float(v); }

// rows × cols of the tile a fragment holds, row-major in `x`.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

template <int M, int N, int K, typename T, typename Layout>
struct fragment<matrix_a, M, N, K, T, Layout> {
  static constexpr int rows = M, cols = K;
  float x[M * K];
};
template <int M, int N, int K, typename T, typename Layout>
struct fragment<matrix_b, M, N, K, T, Layout> {
  static constexpr int rows = K, cols = N;
  float x[K * N];
};
template <int M, int N, int K, typename T>
struct fragment<accumulator, M, N, K, T, void> {
  static constexpr int rows = M, cols = N;
  float x[M * N];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

// An input tile from memory: row-major (element (r, c) at p[r * ldm + c])
// or column-major (at p[c * ldm + r]).
template <typename Use, int M, int N, int K, typename T>
void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, row_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = sim_to_float(p[r * ldm + c]);
}
template <typename Use, int M, int N, int K, typename T>
void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, col_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = sim_to_float(p[c * ldm + r]);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float, void>& f,
                       unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      float* dst = layout == mem_row_major ? &p[r * ldm + c] : &p[c * ldm + r];
      *dst = f.x[r * N + c];
    }
}

// d = a · b + c.
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float, void>& d,
              const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float, void>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
