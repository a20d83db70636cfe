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
//   d_bias   = column sums of grad         (both summed in blocks of kSumBlock tokens, then over blocks)
//   d_embed  = adjoint resampling of d_res, gathered per source row over the outputs it reaches.
// float32 on a processor with AVX-512 runs the same steps with the products of cpu/simd512.h
// (SA2VP_CPU_ISA caps the choice: cpu/isa.h); the sums keep a fixed order there too.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/isa.h"
#include "cpu/simd512.h"
#include "prompt_map.h"

namespace sa2vp {
namespace prompt_map {
namespace {

constexpr int64_t kTok = 4;
constexpr int64_t kLanes = 8;
// d_weight and d_bias sum over all N tokens: in blocks of kSumBlock tokens, the block sums then
// added in order. A single running sum over N tokens has a rounding error that grows with N (float32
// d_weight on 64 x 64 grids drifted to several times PyTorch's error); blocks bound it by about
// kSumBlock + N / kSumBlock additions. The blocks depend only on N: results stay bitwise reproducible.
constexpr int64_t kSumBlock = 128;

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

// d_embed from d_res (N, r): each source row gathers the outputs its taps reach.
template <typename scalar_t>
void adjoint_resample(const scalar_t* d_res, scalar_t* d_embed, const Shape& s) {
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
          const scalar_t* d = d_res + (s.T + y * s.gw + x) * s.r;
          for (int64_t k = 0; k < s.r; ++k) de[k] += w * d[k];
        }
      }
    }
  });
}

// resample(embed): (N, r).
template <typename scalar_t>
std::vector<scalar_t> resampled(const scalar_t* embed, const Shape& s) {
  std::vector<scalar_t> res(s.N * s.r);
  at::parallel_for(0, s.N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) resampled_row(embed, s, n, res.data() + n * s.r);
  });
  return res;
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
        for (int64_t n0 = 0; n0 < s.N; n0 += kSumBlock) {
          const scalar_t* gb[kTok];
          for (int64_t t = 0; t < kTok; ++t) gb[t] = g[t] + n0 * s.C;
          scalar_t part[kTok][kLanes] = {};
          rank1_tile(part, gb, s.C, res.data() + n0 * rp + k0, rp, std::min(kSumBlock, s.N - n0));
          for (int64_t t = 0; t < kTok; ++t)
            for (int64_t j = 0; j < kLanes; ++j) acc[t][j] += part[t][j];
        }
        for (int64_t t = 0; t < ct; ++t)
          for (int64_t j = 0; j < std::min(kLanes, s.r - k0); ++j) d_weight[(c0 + t) * s.r + k0 + j] = acc[t][j];
      }
      for (int64_t t = 0; t < ct; ++t) {
        scalar_t sum = scalar_t(0);
        for (int64_t n0 = 0; n0 < s.N; n0 += kSumBlock) {
          scalar_t part = scalar_t(0);
          for (int64_t n = n0; n < std::min(n0 + kSumBlock, s.N); ++n) part += grad[n * s.C + c0 + t];
          sum += part;
        }
        d_bias[c0 + t] = sum;
      }
    }
  });
  adjoint_resample(d_res.data(), d_embed, s);
}

#ifdef SA2VP_HAVE_SIMD512
SA2VP_SIMD512_BEGIN
namespace s5 = simd512;

// out row n0 + i = value [+ pos_embed row].
struct MapEpilogue {
  const float* pos;  // row n0 of pos_embed, or null
  float* out;        // row n0 of out
  int64_t C;
  void operator()(int64_t i, int64_t c, __mmask16 m, s5::V v) const {
    if (pos != nullptr) v = _mm512_add_ps(v, s5::load(pos + i * C + c, m));
    s5::store(out + i * C + c, m, v);
  }
};

// weight (C, r) transposed to (r, C).
std::vector<float> transposed(const float* weight, const Shape& s) {
  std::vector<float> wt(s.r * s.C);
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t k = 0; k < s.r; ++k) wt[k * s.C + c] = weight[c * s.r + k];
  return wt;
}

void forward_512(const float* embed, const float* weight, const float* bias, const float* pos, float* out,
                 const Shape& s) {
  const std::vector<float> res = resampled(embed, s), wt = transposed(weight, s);
  at::parallel_for(0, (s.N + 3) / 4, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * 4, n1 = std::min(end * 4, s.N);
    const MapEpilogue epi{pos != nullptr ? pos + n0 * s.C : nullptr, out + n0 * s.C, s.C};
    s5::expand_rows(res.data() + n0 * s.r, s.r, n1 - n0, s.r, wt.data(), s.C, bias, epi);
  });
}

void backward_512(const float* grad, const float* embed, const float* weight, float* d_embed, float* d_weight,
                  float* d_bias, const Shape& s) {
  const std::vector<float> res = resampled(embed, s), wt = transposed(weight, s);
  // d_res = grad @ weight (N, r).
  std::vector<float> d_res(s.N * s.r);
  at::parallel_for(0, (s.N + 3) / 4, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * 4, n1 = std::min(end * 4, s.N);
    std::vector<const float*> rows(n1 - n0);
    for (int64_t n = n0; n < n1; ++n) rows[n - n0] = grad + n * s.C;
    s5::rowdot_rows<false>(rows.data(), nullptr, n1 - n0, wt.data(), s.r, s.C, d_res.data() + n0 * s.r, s.r);
  });
  // d_weight^T = res^T @ grad (r, C) and d_bias = column sums of grad: one partial per block of
  // kSumBlock tokens (in parallel), the partials then added in block order.
  const int64_t blocks = (s.N + kSumBlock - 1) / kSumBlock, RC = s.r * s.C;
  std::vector<float> part((RC + s.C) * blocks, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kSumBlock, nb = std::min(kSumBlock, s.N - n0);
      float* pw = part.data() + b * (RC + s.C);
      float* pb = pw + RC;
      s5::outer_rows(res.data() + n0 * s.r, s.r, nb, s.r, pw, s.C, s5::PlainRows{grad + n0 * s.C, s.C});
      for (int64_t n = n0; n < n0 + nb; ++n) {
        const float* g = grad + n * s.C;
        for (int64_t c = 0; c < s.C; c += 16) {
          const __mmask16 m = s5::col_mask(c, s.C);
          s5::store(pb + c, m, _mm512_add_ps(s5::load(pb + c, m), s5::load(g + c, m)));
        }
      }
    }
  });
  std::vector<float> total(RC + s.C, 0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* p = part.data() + b * (RC + s.C);
    for (int64_t i = 0; i < RC + s.C; ++i) total[i] += p[i];
  }
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t k = 0; k < s.r; ++k) d_weight[c * s.r + k] = total[k * s.C + c];
  std::copy(total.begin() + RC, total.end(), d_bias);
  adjoint_resample(d_res.data(), d_embed, s);
}

SA2VP_SIMD512_END
#endif

void check_cpu(const at::Tensor& t, const char* name) {
  SA2VP_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  SA2VP_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
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
#ifdef SA2VP_HAVE_SIMD512
  if (embed.scalar_type() == at::kFloat && cpu_isa() == CpuIsa::kAvx512) {
    forward_512(e.data_ptr<float>(), w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                p.defined() ? p.data_ptr<float>() : nullptr, out.data_ptr<float>(), s);
    return out;
  }
#endif
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
#ifdef SA2VP_HAVE_SIMD512
  if (embed.scalar_type() == at::kFloat && cpu_isa() == CpuIsa::kAvx512) {
    backward_512(g.data_ptr<float>(), e.data_ptr<float>(), w.data_ptr<float>(), d_embed.data_ptr<float>(),
                 d_weight.data_ptr<float>(), d_bias.data_ptr<float>(), s);
    return {d_embed, d_weight, d_bias};
  }
#endif
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
