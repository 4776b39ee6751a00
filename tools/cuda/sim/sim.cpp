// The CPU simulation of our CUDA kernels as a shared library for the tests
// (tests/cuda_sim.rs builds it with g++ and loads it):
//
//   int dreambooth_sim_launch(const char* kernel, unsigned grid,
//                             unsigned block, void** args)
//
// runs `kernel` over a 1-D grid, `args` as for cuLaunchKernel (a pointer to
// each argument's value). Returns 0, 1 for an unknown kernel, 2 for a block
// size that is not a power of two in 1..=1024, 3 for a deadlock at the
// barriers (a block's threads waiting at barriers the others never reach;
// the block is abandoned). Launches are serialized.
#include "cuda_sim.h"

#include "../../../src/cuda/kernels.cu"

#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

template <typename... A, size_t... I>
void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<A*>(args[I])...);
}

template <typename... A>
std::function<void(void**)> wrap(void (*f)(A...)) {
  return [f](void** args) { call(f, args, std::index_sequence_for<A...>{}); };
}

#define REG(n) {#n, wrap(&n)}
#define REG_FLASH(d) REG(dreambooth_flash_fwd_d##d##_bf16), REG(dreambooth_flash_fwd_d##d##_f16)
#define REG_FLASH_BWD_T(d, t)                                                    \
  REG(dreambooth_flash_stats_d##d##_##t), REG(dreambooth_flash_bwd_dq_d##d##_##t), \
      REG(dreambooth_flash_bwd_dkv_d##d##_##t)
#define REG_FLASH_BWD(d) REG_FLASH_BWD_T(d, bf16), REG_FLASH_BWD_T(d, f16)
#define REG_T(base) REG(dreambooth_##base##_f32), REG(dreambooth_##base##_bf16), REG(dreambooth_##base##_f16)

const std::map<std::string, std::function<void(void**)>>& registry() {
  static const std::map<std::string, std::function<void(void**)>> r = {
      REG(dreambooth_adamw_f32),
      REG_T(im2col),
      REG_T(col2im),
      REG_T(softmax_fwd),
      REG_T(softmax_bwd),
      REG_T(layer_norm_fwd),
      REG_T(layer_norm_stats),
      REG_T(layer_norm_bwd_dx),
      REG_T(layer_norm_bwd_params),
      REG(dreambooth_sum_partials),
      REG_T(group_norm_stats),
      REG(dreambooth_group_norm_finalize),
      REG_T(group_norm_apply),
      REG_T(group_norm_bwd_channel),
      REG(dreambooth_group_norm_bwd_reduce),
      REG_T(group_norm_bwd_dx),
      REG_T(geglu_fwd),
      REG_T(geglu_bwd),
      REG_FLASH(32), REG_FLASH(48), REG_FLASH(64), REG_FLASH(80),
      REG_FLASH(96), REG_FLASH(128), REG_FLASH(160),
      REG_FLASH_BWD(32), REG_FLASH_BWD(48), REG_FLASH_BWD(64), REG_FLASH_BWD(80),
  };
  return r;
}

}  // namespace

namespace {

// The fibers of the running block and the scheduler's context.
enum class At { Running, WarpBarrier, BlockBarrier, Done };
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  At at = At::Running;
};
ucontext_t scheduler;
std::vector<Fiber>* fibers = nullptr;
unsigned current = 0;
const std::function<void(void**)>* body = nullptr;
void** body_args = nullptr;

void fiber_main() {
  body->operator()(body_args);
  (*fibers)[current].at = At::Done;
  // Returning resumes uc_link (the scheduler).
}

}  // namespace

void sim_barrier(bool block) {
  (*fibers)[current].at = block ? At::BlockBarrier : At::WarpBarrier;
  swapcontext(&(*fibers)[current].ctx, &scheduler);
}

namespace {

// Resumes thread `tx` until it reaches a barrier or its end.
void resume(std::vector<Fiber>& threads, unsigned tx) {
  current = tx;
  threadIdx = dim3{tx, 0, 0};
  threads[tx].at = At::Running;
  swapcontext(&scheduler, &threads[tx].ctx);
}

// Runs one block to its end: each warp in turn as far as it can go (through
// its __syncwarp barriers, up to a __syncthreads or its end) before the
// next, so that warps drift as far apart as the barriers allow (a missing
// __syncthreads between two warps' uses of shared memory shows); then the
// block barrier releases every thread. Returns false on a deadlock (threads
// waiting at barriers the others never reach).
bool run_block(std::vector<Fiber>& threads, unsigned block) {
  for (;;) {
    for (unsigned w0 = 0; w0 < block; w0 += 32) {
      const unsigned w1 = std::min(block, w0 + 32);
      for (;;) {
        for (unsigned tx = w0; tx < w1; ++tx) {
          if (threads[tx].at == At::Running) resume(threads, tx);
        }
        bool all = true, any = false;
        for (unsigned tx = w0; tx < w1; ++tx) {
          all = all && (threads[tx].at == At::WarpBarrier || threads[tx].at == At::Done);
          any = any || threads[tx].at == At::WarpBarrier;
        }
        if (!(all && any)) break;
        for (unsigned tx = w0; tx < w1; ++tx) {
          if (threads[tx].at == At::WarpBarrier) threads[tx].at = At::Running;
        }
      }
    }
    bool done = true, at_block = true;
    for (unsigned tx = 0; tx < block; ++tx) {
      done = done && threads[tx].at == At::Done;
      at_block = at_block && (threads[tx].at == At::BlockBarrier || threads[tx].at == At::Done);
    }
    if (done) return true;
    if (!at_block) return false;
    for (unsigned tx = 0; tx < block; ++tx) {
      if (threads[tx].at == At::BlockBarrier) threads[tx].at = At::Running;
    }
  }
}

}  // namespace

extern "C" int dreambooth_sim_launch(const char* kernel, unsigned grid, unsigned block,
                                     void** args) {
  const auto& r = registry();
  const auto it = r.find(kernel);
  if (it == r.end()) return 1;
  if (block == 0 || block > 1024 || (block & (block - 1)) != 0) return 2;
  // One launch at a time (the simulation's state and __shared__ arrays are
  // process-wide; the tests launch from several threads).
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{block, 1, 1};
  body = &it->second;
  body_args = args;
  constexpr size_t STACK = 64 * 1024;
  std::vector<Fiber> threads(block);
  for (auto& f : threads) f.stack.reset(new char[STACK]);
  fibers = &threads;
  for (unsigned bx = 0; bx < grid; ++bx) {
    blockIdx = dim3{bx, 0, 0};
    for (unsigned tx = 0; tx < block; ++tx) {
      Fiber& f = threads[tx];
      f.at = At::Running;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = STACK;
      f.ctx.uc_link = &scheduler;
      makecontext(&f.ctx, fiber_main, 0);
    }
    if (!run_block(threads, block)) {
      fibers = nullptr;
      return 3;
    }
  }
  fibers = nullptr;
  return 0;
}
