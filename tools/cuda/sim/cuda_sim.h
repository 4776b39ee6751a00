// Runs our CUDA kernels (src/cuda/kernels.cu) on the CPU, for the tests
// (tests/cuda_sim.rs): force-included before the kernel source, it maps
// CUDA's keywords to C++ and the thread model to coroutines. One block runs
// at a time, each of its threads a ucontext fiber on one OS thread;
// __syncthreads switches back to the scheduler (sim.cpp), which resumes the
// block's threads round by round, so every thread reaches the barrier
// before any passes it. __shared__ memory is a function-static array
// (shared by the block's threads). Kernels must not use warp shuffles or
// votes; __syncwarp is a block-wide barrier here (a stronger one), so every
// thread of the block must reach it as often as the others (no divergent
// __syncwarp). The warp matrix API (<mma.h>) is include/mma.h.
#pragma once
#include <cmath>
#include <cstddef>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

// CUDA's 16-byte vector type (vector_types.h).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Yields the running fiber to the scheduler (sim.cpp).
void sim_sync();
inline void __syncthreads() { sim_sync(); }
inline void __syncwarp(unsigned = 0xffffffffu) { sim_sync(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
