// Shared argument checks and small helpers for the sa2vp_kernels C++/CUDA ops.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace sa2vp {
namespace detail {

// The messages of SA2VP_CHECK are built by appending to a std::string (integers with std::to_string,
// floating-point values with snprintf's %g), never with a std::ostream as c10::str does: on a GPU
// machine (torch 2.11, extension built by that machine's own g++) every TORCH_CHECK of this extension
// whose message streamed a number killed the process with a segmentation fault instead of raising,
// while messages without numbers raised normally. The text is the same as c10::str would write.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? '1' : '0'; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }

}  // namespace detail

template <typename... Args>
std::string check_message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace sa2vp

// TORCH_CHECK with the message built by sa2vp::check_message (see above); a message is required.
#define SA2VP_CHECK(cond, ...) TORCH_CHECK(cond, ::sa2vp::check_message(__VA_ARGS__))

#define SA2VP_CHECK_DEVICE(x, dev)                                                        \
  SA2VP_CHECK((x).device() == (dev), #x " must be on device ", (dev), ", got ", (x).device())
#define SA2VP_CHECK_DTYPE(x, dt)                                                          \
  SA2VP_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define SA2VP_CHECK_DIM(x, d) \
  SA2VP_CHECK((x).dim() == (d), #x " must be a ", (d), "-D tensor, got ", (x).dim(), "-D")

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
  SA2VP_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "q, k and v must have the same shape (B, heads, N, head_dim); got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  SA2VP_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must have the same dtype");
  SA2VP_CHECK(k.device() == q.device() && v.device() == q.device(),
              "q, k and v must be on the same device");
  SA2VP_CHECK(grid_h >= 1 && grid_w >= 1, "grid must be positive, got (", grid_h, ", ", grid_w, ")");
  SA2VP_CHECK(window >= 1 && window % 2 == 1, "window must be a positive odd integer, got ", window);
  SA2VP_CHECK(num_prefix >= 0, "num_prefix must be >= 0, got ", num_prefix);
  SA2VP_CHECK(q.size(2) == num_prefix + grid_h * grid_w, "q.shape[2] (N) must equal num_prefix + grid_h * grid_w = ",
              num_prefix + grid_h * grid_w, ", got ", q.size(2));
  SA2VP_CHECK(q.size(3) >= 1, "head_dim must be >= 1");
}

}  // namespace sa2vp
