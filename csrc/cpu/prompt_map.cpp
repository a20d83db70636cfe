// CPU kernels of prompt_map: out = resample(embed) @ weight.T + bias + pos_embed (float32 / float64).
//
// Forward: one pass over the output tokens; each gathers its (up to 4) source rows, blends them and
// adds the small matvec with the weight to bias + pos_embed.
// Backward (deterministic, every sum in a fixed order):
//   d_res   = grad @ weight                  (N, r)
//   d_embed = adjoint resampling of d_res    gathered per source row over the outputs it reaches
//   d_weight = grad^T @ res, d_bias = column sums of grad   (res recomputed, it is tiny)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "prompt_map.h"

namespace sa2vp {
namespace prompt_map {
namespace {

// Writes row n of resample(embed) (r values) to `row`.
template <typename scalar_t>
inline void resampled_row(const scalar_t* embed, const Shape& s, int64_t n, scalar_t* row) {
  const RowTaps<scalar_t> t = row_taps<scalar_t>(n, s);
  for (int64_t k = 0; k < s.r; ++k) row[k] = blend(t, embed, s.r, k);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* embed, const scalar_t* weight, const scalar_t* bias, const scalar_t* pos,
                    scalar_t* out, const Shape& s) {
  // weight transposed to (r, C) so that the inner loop runs over contiguous channels.
  std::vector<scalar_t> wt(s.r * s.C);
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t k = 0; k < s.r; ++k) wt[k * s.C + c] = weight[c * s.r + k];
  at::parallel_for(0, s.N, 8, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> row(s.r);
    for (int64_t n = begin; n < end; ++n) {
      resampled_row(embed, s, n, row.data());
      scalar_t* o = out + n * s.C;
      for (int64_t c = 0; c < s.C; ++c) {
        o[c] = (bias ? bias[c] : scalar_t(0)) + (pos ? pos[n * s.C + c] : scalar_t(0));
      }
      for (int64_t k = 0; k < s.r; ++k) {
        const scalar_t v = row[k];
        const scalar_t* w = wt.data() + k * s.C;
        for (int64_t c = 0; c < s.C; ++c) o[c] += v * w[c];
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* embed, const scalar_t* weight, scalar_t* d_embed,
                     scalar_t* d_weight, scalar_t* d_bias, const Shape& s) {
  std::vector<scalar_t> res(s.N * s.r), d_res(s.N * s.r);
  at::parallel_for(0, s.N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      resampled_row(embed, s, n, res.data() + n * s.r);
      scalar_t* d = d_res.data() + n * s.r;
      for (int64_t k = 0; k < s.r; ++k) d[k] = scalar_t(0);
      for (int64_t c = 0; c < s.C; ++c) {
        const scalar_t g = grad[n * s.C + c];
        const scalar_t* w = weight + c * s.r;
        for (int64_t k = 0; k < s.r; ++k) d[k] += g * w[k];
      }
    }
  });
  // d_weight and d_bias: blocks of channels, tokens summed in order.
  constexpr int64_t kBlockC = 64;
  at::parallel_for(0, (s.C + kBlockC - 1) / kBlockC, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kBlockC, c1 = std::min(s.C, c0 + kBlockC);
      for (int64_t c = c0; c < c1; ++c) {
        d_bias[c] = scalar_t(0);
        for (int64_t k = 0; k < s.r; ++k) d_weight[c * s.r + k] = scalar_t(0);
      }
      for (int64_t n = 0; n < s.N; ++n) {
        const scalar_t* rn = res.data() + n * s.r;
        for (int64_t c = c0; c < c1; ++c) {
          const scalar_t g = grad[n * s.C + c];
          scalar_t* dw = d_weight + c * s.r;
          for (int64_t k = 0; k < s.r; ++k) dw[k] += g * rn[k];
          d_bias[c] += g;
        }
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
