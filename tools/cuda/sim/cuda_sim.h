// Runs our CUDA kernels (src/cuda/kernels.cu) on the CPU, for the tests
// (tests/cuda_sim.rs): force-included before the kernel source, it maps
// CUDA's keywords to C++ and the thread model to coroutines. One block runs
// at a time, each of its threads a ucontext fiber on one OS thread; a
// barrier (__syncthreads for the block, __syncwarp for a warp of 32)
// switches back to the scheduler (sim.cpp), which lets no thread pass a
// barrier before all the threads it binds reach it, and runs each warp as
// far ahead of the others as the barriers allow, so a missing
// __syncthreads between warps shows. __shared__ memory is a function-static
// array (shared by the block's threads). Kernels must not use warp shuffles
// or votes. The warp matrix API (<mma.h>) is include/mma.h.
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

// Waits at a barrier of the block (__syncthreads) or of the thread's warp
// of 32 (__syncwarp): yields the running fiber to the scheduler (sim.cpp).
void sim_barrier(bool block);
inline void __syncthreads() { sim_barrier(true); }
inline void __syncwarp(unsigned = 0xffffffffu) { sim_barrier(false); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
