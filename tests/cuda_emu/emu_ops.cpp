// Control of the CUDA emulator (cuda_emu.h) from Python.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"

namespace {

// 0: threads resume in thread order between barriers; 1: in reverse order.
void set_schedule(int64_t order) {
  TORCH_CHECK(order == 0 || order == 1, "set_schedule: order must be 0 or 1, got ", order);
  cuda_emu::state().order = static_cast<int>(order);
}

// Counters since the library was loaded: launches, blocks, threads, block barriers, warp syncs.
at::Tensor stats() {
  const cuda_emu::Stats& s = cuda_emu::state().stats;
  return at::tensor(std::vector<int64_t>{s.launches, s.blocks, s.threads, s.block_barriers, s.warp_syncs});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sa2vp_cuda_emu, m) {
  m.def("set_schedule", &set_schedule);
  m.def("stats", &stats);
}
