// Shared pieces of the prompt_map CPU and CUDA kernels: argument checks and the bilinear taps.
#pragma once

#include "checks.h"

#ifdef __CUDACC__
#define SA2VP_HOST_DEVICE __host__ __device__
#else
#define SA2VP_HOST_DEVICE
#endif

namespace sa2vp {
namespace prompt_map {

// The two source indices of one output index of a 1-D bilinear resampling with align_corners=False,
// computed exactly like ATen's upsample_bilinear2d: i0 gets weight 1 - l1, i1 gets weight l1.
template <typename acc_t>
struct Tap {
  int64_t i0, i1;
  acc_t l1;
};

template <typename acc_t>
SA2VP_HOST_DEVICE inline Tap<acc_t> bilinear_tap(int64_t dst, int64_t in_size, int64_t out_size) {
  if (in_size == out_size) return {dst, dst, acc_t(0)};
  const acc_t scale = acc_t(in_size) / acc_t(out_size);
  acc_t src = scale * (acc_t(dst) + acc_t(0.5)) - acc_t(0.5);
  if (src < acc_t(0)) src = acc_t(0);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  acc_t l1 = src - acc_t(i0);
  if (l1 < acc_t(0)) l1 = acc_t(0);
  if (l1 > acc_t(1)) l1 = acc_t(1);
  return {i0, i0 < in_size - 1 ? i0 + 1 : i0, l1};
}

// Weight of source index `src` in output index `dst` (the entry (dst, src) of the resampling matrix).
template <typename acc_t>
SA2VP_HOST_DEVICE inline acc_t tap_weight(int64_t dst, int64_t src, int64_t in_size, int64_t out_size) {
  const Tap<acc_t> t = bilinear_tap<acc_t>(dst, in_size, out_size);
  return (t.i0 == src ? acc_t(1) - t.l1 : acc_t(0)) + (t.i1 == src ? t.l1 : acc_t(0));
}

// A range [*lo, *hi] of output indices that contains every output whose taps reach source index `src`:
// those with a source coordinate in [src - 1, src + 1), widened by one on each side against rounding.
SA2VP_HOST_DEVICE inline void adjoint_range(int64_t src, int64_t in_size, int64_t out_size, int64_t* lo,
                                            int64_t* hi) {
  if (in_size == out_size) {
    *lo = *hi = src;
    return;
  }
  // source coordinate of output y: ((2y + 1) * in - out) / (2 * out)
  int64_t a = (2 * out_size * (src - 1) + out_size - in_size) / (2 * in_size) - 1;
  int64_t b = (2 * out_size * (src + 1) + out_size - in_size) / (2 * in_size) + 1;
  *lo = a < 0 ? 0 : a;
  *hi = b > out_size - 1 ? out_size - 1 : b;
}

// Sizes of one prompt_map call: rank r, channels C, tokens N = T + gh*gw, token grid (gh, gw),
// prompt grid (eh, ew), T prefix rows.
struct Shape {
  int64_t r, C, N, gh, gw, eh, ew, T;
};

inline Shape make_shape(const at::Tensor& embed, const at::Tensor& weight, int64_t grid_h, int64_t grid_w,
                        int64_t embed_h, int64_t embed_w, int64_t num_prefix) {
  return {embed.size(1), weight.size(0), num_prefix + grid_h * grid_w, grid_h, grid_w, embed_h, embed_w,
          num_prefix};
}

// The four source rows of output token n and the blend weights along y and x. A prefix row is its own
// four taps with weights (1, 0, 0, 0).
template <typename acc_t>
struct RowTaps {
  int64_t r00, r01, r10, r11;
  acc_t ly, lx;
};

template <typename acc_t>
SA2VP_HOST_DEVICE inline RowTaps<acc_t> row_taps(int64_t n, const Shape& s) {
  if (n < s.T) return {n, n, n, n, acc_t(0), acc_t(0)};
  const int64_t y = (n - s.T) / s.gw, x = (n - s.T) % s.gw;
  const Tap<acc_t> ty = bilinear_tap<acc_t>(y, s.eh, s.gh);
  const Tap<acc_t> tx = bilinear_tap<acc_t>(x, s.ew, s.gw);
  return {s.T + ty.i0 * s.ew + tx.i0, s.T + ty.i0 * s.ew + tx.i1, s.T + ty.i1 * s.ew + tx.i0,
          s.T + ty.i1 * s.ew + tx.i1, ty.l1, tx.l1};
}

// Column k of the resampled row described by t.
template <typename acc_t, typename scalar_t>
SA2VP_HOST_DEVICE inline acc_t blend(const RowTaps<acc_t>& t, const scalar_t* embed, int64_t r, int64_t k) {
  const acc_t e00 = static_cast<acc_t>(embed[t.r00 * r + k]), e01 = static_cast<acc_t>(embed[t.r01 * r + k]);
  const acc_t e10 = static_cast<acc_t>(embed[t.r10 * r + k]), e11 = static_cast<acc_t>(embed[t.r11 * r + k]);
  const acc_t ly0 = acc_t(1) - t.ly, lx0 = acc_t(1) - t.lx;
  return ly0 * (lx0 * e00 + t.lx * e01) + t.ly * (lx0 * e10 + t.lx * e11);
}

// Checks shared by every backend of prompt_map_fwd / prompt_map_bwd.
inline void check_args(const at::Tensor& embed, const at::Tensor& weight, int64_t grid_h, int64_t grid_w,
                       int64_t embed_h, int64_t embed_w, int64_t num_prefix) {
  SA2VP_CHECK_DIM(embed, 2);
  SA2VP_CHECK_DIM(weight, 2);
  SA2VP_CHECK(grid_h >= 1 && grid_w >= 1, "grid must be positive, got (", grid_h, ", ", grid_w, ")");
  SA2VP_CHECK(embed_h >= 1 && embed_w >= 1, "embed grid must be positive, got (", embed_h, ", ", embed_w,
              ")");
  SA2VP_CHECK(num_prefix >= 0, "num_prefix must be >= 0, got ", num_prefix);
  SA2VP_CHECK(embed.size(0) == num_prefix + embed_h * embed_w,
              "embed must have num_prefix + embed_h * embed_w = ", num_prefix + embed_h * embed_w,
              " rows, got ", embed.size(0));
  SA2VP_CHECK(embed.size(1) >= 1, "embed must have at least one column (the rank r)");
  SA2VP_CHECK(weight.size(0) >= 1 && weight.size(1) == embed.size(1),
              "weight must have shape (C, r) with r = embed.size(1) = ", embed.size(1), ", got ",
              weight.sizes());
  SA2VP_CHECK_DTYPE(weight, embed.scalar_type());
  SA2VP_CHECK_DEVICE(weight, embed.device());
}

inline void check_fwd_args(const at::Tensor& embed, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos_embed,
                           int64_t grid_h, int64_t grid_w, int64_t embed_h, int64_t embed_w,
                           int64_t num_prefix) {
  check_args(embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix);
  const int64_t C = weight.size(0), N = num_prefix + grid_h * grid_w;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    SA2VP_CHECK(b.dim() == 1 && b.size(0) == C, "bias must have shape (C,) = (", C, ",), got ", b.sizes());
    SA2VP_CHECK_DTYPE(b, embed.scalar_type());
    SA2VP_CHECK_DEVICE(b, embed.device());
  }
  if (pos_embed.has_value()) {
    const at::Tensor& p = *pos_embed;
    SA2VP_CHECK(p.dim() == 3 && p.size(0) == 1 && p.size(1) == N && p.size(2) == C,
                "pos_embed must have shape (1, N, C) = (1, ", N, ", ", C, "), got ", p.sizes());
    SA2VP_CHECK_DTYPE(p, embed.scalar_type());
    SA2VP_CHECK_DEVICE(p, embed.device());
  }
}

inline void check_bwd_args(const at::Tensor& grad_out, const at::Tensor& embed, const at::Tensor& weight,
                           int64_t grid_h, int64_t grid_w, int64_t embed_h, int64_t embed_w,
                           int64_t num_prefix) {
  check_args(embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix);
  const int64_t C = weight.size(0), N = num_prefix + grid_h * grid_w;
  SA2VP_CHECK(grad_out.dim() == 3 && grad_out.size(0) == 1 && grad_out.size(1) == N && grad_out.size(2) == C,
              "grad_out must have shape (1, N, C) = (1, ", N, ", ", C, "), got ", grad_out.sizes());
  SA2VP_CHECK_DTYPE(grad_out, embed.scalar_type());
  SA2VP_CHECK_DEVICE(grad_out, embed.device());
}

}  // namespace prompt_map
}  // namespace sa2vp
