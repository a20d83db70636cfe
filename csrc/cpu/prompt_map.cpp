// CPU kernels of prompt_map: out = resample(embed) @ weight.T + bias + pos_embed (float32 / float64).
//
// The three small products (forward res @ weight.T, backward grad @ weight and grad^T @ res) are all
// sums of rank-1 updates of a kTok x kLanes register tile, accumulated in a fixed order: the inner
// loops vectorize without reassociating sums, and every result is bitwise reproducible.
//
// Forward: per block of kTok tokens, gather and blend each token's (up to 4) source rows, then one
//   tile per kLanes channels, plus bias and pos_embed.
// Backward:
//   d_res    = grad @ weight       (N, r)  tiles of kTok tokens x kLanes columns
//   d_weight = grad^T @ res        (C, r)  tiles of kTok channels x kLanes columns (res recomputed)
//   d_bias   = column sums of grad
//   d_embed  = adjoint resampling of d_res, gathered per source row over the outputs it reaches.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "prompt_map.h"

namespace sa2vp {
namespace prompt_map {
namespace {

constexpr int64_t kTok = 4;
constexpr int64_t kLanes = 8;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// acc[t][j] += sum_i v[t][i * v_step] * w[i * w_step + j] for i < count, in increasing i. The operands
// of each step are copied to locals first and the function is not inlined: then the compiler keeps
// acc in vector registers and vectorizes over j, instead of turning the loop over i into slow in-order
// vector reductions.
template <typename scalar_t>
C10_NOINLINE void rank1_tile(scalar_t (&acc)[kTok][kLanes], const scalar_t* const (&v)[kTok], int64_t v_step,
                       const scalar_t* w, int64_t w_step, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    scalar_t vi[kTok], wi[kLanes];
    for (int64_t t = 0; t < kTok; ++t) vi[t] = v[t][i * v_step];
    for (int64_t j = 0; j < kLanes; ++j) wi[j] = w[i * w_step + j];
    for (int64_t t = 0; t < kTok; ++t)
      for (int64_t j = 0; j < kLanes; ++j) acc[t][j] += vi[t] * wi[j];
  }
}

// Writes row n of resample(embed) (r values) to `row`.
template <typename scalar_t>
inline void resampled_row(const scalar_t* embed, const Shape& s, int64_t n, scalar_t* row) {
  const RowTaps<scalar_t> t = row_taps<scalar_t>(n, s);
  for (int64_t k = 0; k < s.r; ++k) row[k] = blend(t, embed, s.r, k);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* embed, const scalar_t* weight, const scalar_t* bias, const scalar_t* pos,
                    scalar_t* out, const Shape& s) {
  // weight transposed to (r, Cp), channels zero-padded to whole tiles.
  const int64_t Cp = round_up(s.C, kLanes);
  std::vector<scalar_t> wt(s.r * Cp, scalar_t(0));
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t k = 0; k < s.r; ++k) wt[k * Cp + c] = weight[c * s.r + k];
  const int64_t blocks = (s.N + kTok - 1) / kTok;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> rows(kTok * s.r);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kTok, nt = std::min(kTok, s.N - n0);
      const scalar_t* v[kTok];
      for (int64_t t = 0; t < kTok; ++t) {
        resampled_row(embed, s, n0 + std::min(t, nt - 1), rows.data() + t * s.r);
        v[t] = rows.data() + t * s.r;
      }
      for (int64_t c0 = 0; c0 < s.C; c0 += kLanes) {
        scalar_t acc[kTok][kLanes] = {};
        rank1_tile(acc, v, 1, wt.data() + c0, Cp, s.r);
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t n = n0 + t;
          for (int64_t j = 0; j < std::min(kLanes, s.C - c0); ++j) {
            const int64_t c = c0 + j;
            scalar_t o = acc[t][j];
            if (bias) o += bias[c];
            if (pos) o += pos[n * s.C + c];
            out[n * s.C + c] = o;
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* embed, const scalar_t* weight, scalar_t* d_embed,
                     scalar_t* d_weight, scalar_t* d_bias, const Shape& s) {
  // res and weight with their columns zero-padded to whole tiles (row stride rp).
  const int64_t rp = round_up(s.r, kLanes);
  std::vector<scalar_t> res(s.N * rp, scalar_t(0)), d_res(s.N * s.r), wp(s.C * rp, scalar_t(0));
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t k = 0; k < s.r; ++k) wp[c * rp + k] = weight[c * s.r + k];
  const int64_t token_blocks = (s.N + kTok - 1) / kTok;
  at::parallel_for(0, token_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kTok, nt = std::min(kTok, s.N - n0);
      const scalar_t* g[kTok];
      for (int64_t t = 0; t < kTok; ++t) g[t] = grad + (n0 + std::min(t, nt - 1)) * s.C;
      for (int64_t t = 0; t < nt; ++t) resampled_row(embed, s, n0 + t, res.data() + (n0 + t) * rp);
      for (int64_t k0 = 0; k0 < s.r; k0 += kLanes) {
        scalar_t acc[kTok][kLanes] = {};
        rank1_tile(acc, g, 1, wp.data() + k0, rp, s.C);
        for (int64_t t = 0; t < nt; ++t)
          for (int64_t j = 0; j < std::min(kLanes, s.r - k0); ++j) d_res[(n0 + t) * s.r + k0 + j] = acc[t][j];
      }
    }
  });
  const int64_t channel_blocks = (s.C + kTok - 1) / kTok;
  at::parallel_for(0, channel_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * kTok, ct = std::min(kTok, s.C - c0);
      const scalar_t* g[kTok];
      for (int64_t t = 0; t < kTok; ++t) g[t] = grad + c0 + std::min(t, ct - 1);
      for (int64_t k0 = 0; k0 < s.r; k0 += kLanes) {
        scalar_t acc[kTok][kLanes] = {};
        rank1_tile(acc, g, s.C, res.data() + k0, rp, s.N);
        for (int64_t t = 0; t < ct; ++t)
          for (int64_t j = 0; j < std::min(kLanes, s.r - k0); ++j) d_weight[(c0 + t) * s.r + k0 + j] = acc[t][j];
      }
      for (int64_t t = 0; t < ct; ++t) {
        scalar_t sum = scalar_t(0);
        for (int64_t n = 0; n < s.N; ++n) sum += grad[n * s.C + c0 + t];
        d_bias[c0 + t] = sum;
      }
    }
  });
  // d_embed: each source row gathers the outputs its taps reach.
  at::parallel_for(0, s.T + s.eh * s.ew, 8, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      scalar_t* de = d_embed + j * s.r;
      if (j < s.T) {
        for (int64_t k = 0; k < s.r; ++k) de[k] = d_res[j * s.r + k];
        continue;
      }
      for (int64_t k = 0; k < s.r; ++k) de[k] = scalar_t(0);
      const int64_t sy = (j - s.T) / s.ew, sx = (j - s.T) % s.ew;
      int64_t y_lo, y_hi, x_lo, x_hi;
      adjoint_range(sy, s.eh, s.gh, &y_lo, &y_hi);
      adjoint_range(sx, s.ew, s.gw, &x_lo, &x_hi);
      for (int64_t y = y_lo; y <= y_hi; ++y) {
        const scalar_t wy = tap_weight<scalar_t>(y, sy, s.eh, s.gh);
        if (wy == scalar_t(0)) continue;
        for (int64_t x = x_lo; x <= x_hi; ++x) {
          const scalar_t wx = tap_weight<scalar_t>(x, sx, s.ew, s.gw);
          if (wx == scalar_t(0)) continue;
          const scalar_t w = wy * wx;
          const scalar_t* d = d_res.data() + (s.T + y * s.gw + x) * s.r;
          for (int64_t k = 0; k < s.r; ++k) de[k] += w * d[k];
        }
      }
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64 on CPU, got ", t.scalar_type());
}

at::Tensor prompt_map_fwd_cpu(const at::Tensor& embed, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos_embed,
                              int64_t grid_h, int64_t grid_w, int64_t embed_h, int64_t embed_w,
                              int64_t num_prefix) {
  check_fwd_args(embed, weight, bias, pos_embed, grid_h, grid_w, embed_h, embed_w, num_prefix);
  check_cpu(embed, "embed");
  const Shape s = make_shape(embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix);
  const at::Tensor e = embed.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor p = pos_embed.has_value() ? pos_embed->contiguous() : at::Tensor();
  at::Tensor out = at::empty({1, s.N, s.C}, embed.options());
  AT_DISPATCH_FLOATING_TYPES(embed.scalar_type(), "prompt_map_fwd_cpu", [&] {
    forward_kernel<scalar_t>(e.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                             b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                             p.defined() ? p.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), s);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_map_bwd_cpu(const at::Tensor& grad_out,
                                                                  const at::Tensor& embed,
                                                                  const at::Tensor& weight, int64_t grid_h,
                                                                  int64_t grid_w, int64_t embed_h,
                                                                  int64_t embed_w, int64_t num_prefix) {
  check_bwd_args(grad_out, embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix);
  check_cpu(embed, "embed");
  const Shape s = make_shape(embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix);
  const at::Tensor g = grad_out.contiguous(), e = embed.contiguous(), w = weight.contiguous();
  at::Tensor d_embed = at::empty_like(e), d_weight = at::empty_like(w);
  at::Tensor d_bias = at::empty({s.C}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(embed.scalar_type(), "prompt_map_bwd_cpu", [&] {
    backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                              d_embed.data_ptr<scalar_t>(), d_weight.data_ptr<scalar_t>(),
                              d_bias.data_ptr<scalar_t>(), s);
  });
  return {d_embed, d_weight, d_bias};
}

}  // namespace
}  // namespace prompt_map
}  // namespace sa2vp

TORCH_LIBRARY_IMPL(sa2vp_kernels, CPU, m) {
  m.impl("prompt_map_fwd", &sa2vp::prompt_map::prompt_map_fwd_cpu);
  m.impl("prompt_map_bwd", &sa2vp::prompt_map::prompt_map_bwd_cpu);
}
