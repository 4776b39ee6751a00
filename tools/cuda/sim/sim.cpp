// The CPU simulation of our CUDA kernels as a shared library for the tests
// (tests/cuda_sim.rs builds it with g++ and loads it):
//
//   int dreambooth_sim_launch(const char* kernel, unsigned grid,
//                             unsigned block, void** args)
//
// runs `kernel` over a 1-D grid, `args` as for cuLaunchKernel (a pointer to
// each argument's value). Returns 0, 1 for an unknown kernel, 2 for a block
// size that is not a power of two in 1..=1024. Launches are serialized.
#include "cuda_sim.h"

#include "../../../src/cuda/kernels.cu"

#include <ucontext.h>

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
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  bool done = false;
};
ucontext_t scheduler;
std::vector<Fiber>* fibers = nullptr;
unsigned current = 0;
const std::function<void(void**)>* body = nullptr;
void** body_args = nullptr;

void fiber_main() {
  body->operator()(body_args);
  (*fibers)[current].done = true;
  // Returning resumes uc_link (the scheduler).
}

}  // namespace

void sim_sync() { swapcontext(&(*fibers)[current].ctx, &scheduler); }

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
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = STACK;
      f.ctx.uc_link = &scheduler;
      makecontext(&f.ctx, fiber_main, 0);
    }
    // Rounds: resume every unfinished thread once; each runs to its next
    // __syncthreads or to its end.
    bool running = true;
    while (running) {
      running = false;
      for (unsigned tx = 0; tx < block; ++tx) {
        if (threads[tx].done) continue;
        current = tx;
        threadIdx = dim3{tx, 0, 0};
        swapcontext(&scheduler, &threads[tx].ctx);
        running = running || !threads[tx].done;
      }
    }
  }
  fibers = nullptr;
  return 0;
}
