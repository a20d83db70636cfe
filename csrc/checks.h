// Shared argument checks and small helpers for the sa2vp_kernels C++/CUDA ops.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#define SA2VP_CHECK_DEVICE(x, dev)                                                        \
  TORCH_CHECK((x).device() == (dev), #x " must be on device ", (dev), ", got ", (x).device())
#define SA2VP_CHECK_DTYPE(x, dt)                                                          \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define SA2VP_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be a ", (d), "-D tensor, got ", (x).dim(), "-D")

namespace sa2vp {

// Validates the arguments shared by every backend of local_attn_{fwd,bwd} (internal linkage: the CPU
// and CUDA translation units are built by different compilers and must not share one definition):
// q, k, v are (B, H, N, D) with N = num_prefix + grid_h * grid_w, same dtype/device.
static inline void check_local_attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  int64_t grid_h, int64_t grid_w, int64_t window,
                                  int64_t num_prefix) {
  SA2VP_CHECK_DIM(q, 4);
  SA2VP_CHECK_DIM(k, 4);
  SA2VP_CHECK_DIM(v, 4);
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "q, k and v must have the same shape (B, heads, N, head_dim); got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must have the same dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "q, k and v must be on the same device");
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, "grid must be positive, got (", grid_h, ", ", grid_w, ")");
  TORCH_CHECK(window >= 1 && window % 2 == 1, "window must be a positive odd integer, got ", window);
  TORCH_CHECK(num_prefix >= 0, "num_prefix must be >= 0, got ", num_prefix);
  TORCH_CHECK(q.size(2) == num_prefix + grid_h * grid_w, "q.shape[2] (N) must equal num_prefix + grid_h * grid_w = ",
              num_prefix + grid_h * grid_w, ", got ", q.size(2));
  TORCH_CHECK(q.size(3) >= 1, "head_dim must be >= 1");
}

}  // namespace sa2vp
