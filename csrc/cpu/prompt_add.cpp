// CPU kernels of prompt_add (ops prompt_add_fwd, prompt_add_bwd), float32 / float64.
//
//   out = target + scale * drop(up(drop(gelu(down(layer_norm(message)))))) [+ deep_scale * deep]
//
// Tokens are processed in chunks of kRows rows whose intermediates (LayerNorm output, hidden
// activations, up projection) stay in cache: the big tensors are read once and written once.
// float32 runs AVX-512 kernels (cpu/simd512.h, below) when the processor has AVX-512, else AVX2 + FMA
// versions of the portable code (SA2VP_CPU_ISA caps the choice: cpu/isa.h). In the portable and AVX2
// versions the low-rank products of a chunk use three small kernels:
//   rowdot     out[i][j]  = sum_c X[i][c] * W[j][c]       (tokens x C times C x r)
//   expand     out[i][c]  = init[c] + sum_j H[i][j] W[j][c] (tokens x r times r x C)
//   outer_acc  acc[j][c] += sum_i H[i][j] X[i][c]       (sums over tokens of r x C outer products)
//
// Backward, per chunk (recomputing LayerNorm and the hidden activations from the saved mean, rstd, z):
//   gu = scale * drop'(grad_out)            (rows, C)
//   gh = gu @ up_weight;  gz = drop'(gh) * gelu'(z)
//   gy = gz @ down_weight;  grad_message = LayerNorm backward of gy * norm_weight
// and the weight gradients as sums over all tokens:
//   grad_up_weight = gu^T @ h,  grad_up_bias = sum gu,  grad_down_bias = sum gz,  A = gz^T @ xhat,
//   grad_down_weight = A * norm_weight + grad_down_bias (x) norm_bias,
//   grad_norm_weight = sum_j down_weight * A,  grad_norm_bias = grad_down_bias @ down_weight.
// The sums are accumulated per group of consecutive chunks and the group partials are added in a
// fixed order; groups depend only on the number of tokens, so the results are deterministic and do
// not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu/isa.h"
#include "cpu/simd512.h"
#include "prompt_add.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SA2VP_PROMPT_ADD_AVX2 1
#include <immintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SA2VP_INLINE inline __attribute__((always_inline))
#else
#define SA2VP_INLINE inline
#endif

namespace sa2vp {
namespace {

namespace hash = prompt_add_hash;

constexpr int64_t kRows = 32;       // tokens per chunk
constexpr int64_t kMaxGroups = 16;  // partial sums of the backward (a fixed number: deterministic)

// GELU and its derivative: gelu(z) = z * Phi(z), gelu'(z) = Phi(z) + z * phi(z).
inline void gelu_and_grad(double z, double& g, double& dg) {
  const double cdf = 0.5 * (1.0 + std::erf(z * M_SQRT1_2));
  g = z * cdf;
  dg = cdf + z * std::exp(-0.5 * z * z) * 0.3989422804014327;  // 1 / sqrt(2 pi)
}

// float32: erf from Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, the approximation PyTorch's
// own vectorised CPU erf uses); its exp(-x^2) is also phi's exp(-z^2 / 2).
inline void gelu_and_grad(float z, float& g, float& dg) {
  const float x = std::fabs(z) * 0.70710678118654752f;
  const float t = 1.f / (1.f + 0.3275911f * x);
  const float e = std::exp(-x * x);
  const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  const float erf_abs = 1.f - poly * e;
  const float cdf = 0.5f * (1.f + (z < 0.f ? -erf_abs : erf_abs));
  g = z * cdf;
  dg = cdf + z * e * 0.39894228040143268f;
}

// Sums with 8 independent accumulators (vectorisable, and fixed order for a given n).
template <typename T>
SA2VP_INLINE T row_sum(const T* x, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k];
  }
  for (; i < n; ++i) acc[0] += x[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
SA2VP_INLINE T row_centered_sq_sum(const T* x, T mean, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const T d = x[i + k] - mean;
      acc[k] += d * d;
    }
  }
  for (; i < n; ++i) acc[0] += (x[i] - mean) * (x[i] - mean);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
SA2VP_INLINE T row_dot(const T* x, const T* y, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k] * y[i + k];
  }
  for (; i < n; ++i) acc[0] += x[i] * y[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// ---- the small products and the dropout scale: portable versions ---------------------------------

template <typename T>
void rowdot_ref(const T* x, int64_t rows, const T* w, int64_t r, int64_t C, T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < r; ++j) out[i * r + j] = row_dot(x + i * C, w + j * C, C);
  }
}

template <typename T>
void expand_ref(const T* h, int64_t rows, int64_t r, const T* w, int64_t C, const T* init, T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    T* o = out + i * C;
    for (int64_t c = 0; c < C; ++c) o[c] = init != nullptr ? init[c] : T(0);
    for (int64_t j = 0; j < r; ++j) {
      const T a = h[i * r + j];
      const T* wj = w + j * C;
      for (int64_t c = 0; c < C; ++c) o[c] += a * wj[c];
    }
  }
}

template <typename T>
void outer_acc_ref(const T* h, int64_t rows, int64_t r, const T* x, int64_t C, T* acc) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      const T a = h[i * r + j];
      const T* xi = x + i * C;
      T* aj = acc + j * C;
      for (int64_t c = 0; c < C; ++c) aj[c] += a * xi[c];
    }
  }
}

// out[c] = s if element (row, c) of the stream survives, else 0.
template <typename T>
void keep_scale_ref(uint32_t row_state, int64_t C, uint32_t threshold, T s, T* out) {
  for (int64_t c = 0; c < C; ++c) {
    out[c] = hash::keep(row_state, static_cast<uint32_t>(c), threshold) ? s : T(0);
  }
}

// ---- AVX2 + FMA versions (float32) -----------------------------------------------------------------

#ifdef SA2VP_PROMPT_ADD_AVX2
#define SA2VP_AVX2 __attribute__((target("avx2,fma")))

SA2VP_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// RB rows x JB ranks of rowdot.
template <int RB, int JB>
SA2VP_AVX2 void rowdot_block(const float* x, const float* w, int64_t r, int64_t C, float* out) {
  __m256 acc[RB][JB];
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < JB; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    __m256 wv[JB];
    for (int j = 0; j < JB; ++j) wv[j] = _mm256_loadu_ps(w + j * C + c);
    for (int i = 0; i < RB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * C + c);
      for (int j = 0; j < JB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    for (int j = 0; j < JB; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = c; t < C; ++t) s += x[i * C + t] * w[j * C + t];
      out[i * r + j] = s;
    }
  }
}

SA2VP_AVX2 void rowdot_avx2(const float* x, int64_t rows, const float* w, int64_t r, int64_t C, float* out) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    int64_t j = 0;
    for (; j + 2 <= r; j += 2) rowdot_block<4, 2>(x + i * C, w + j * C, r, C, out + i * r + j);
    for (; j < r; ++j) rowdot_block<4, 1>(x + i * C, w + j * C, r, C, out + i * r + j);
  }
  for (; i < rows; ++i) {
    int64_t j = 0;
    for (; j + 4 <= r; j += 4) rowdot_block<1, 4>(x + i * C, w + j * C, r, C, out + i * r + j);
    for (; j < r; ++j) rowdot_block<1, 1>(x + i * C, w + j * C, r, C, out + i * r + j);
  }
}

// RB rows x 16 channels of expand.
template <int RB>
SA2VP_AVX2 void expand_block16(const float* h, int64_t r, const float* w, int64_t C, const float* init, float* out) {
  __m256 acc[RB][2];
  const __m256 i0 = init != nullptr ? _mm256_loadu_ps(init) : _mm256_setzero_ps();
  const __m256 i1 = init != nullptr ? _mm256_loadu_ps(init + 8) : _mm256_setzero_ps();
  for (int i = 0; i < RB; ++i) {
    acc[i][0] = i0;
    acc[i][1] = i1;
  }
  for (int64_t j = 0; j < r; ++j) {
    const __m256 w0 = _mm256_loadu_ps(w + j * C), w1 = _mm256_loadu_ps(w + j * C + 8);
    for (int i = 0; i < RB; ++i) {
      const __m256 a = _mm256_broadcast_ss(h + i * r + j);
      acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    _mm256_storeu_ps(out + i * C, acc[i][0]);
    _mm256_storeu_ps(out + i * C + 8, acc[i][1]);
  }
}

SA2VP_AVX2 void expand_avx2(const float* h, int64_t rows, int64_t r, const float* w, int64_t C, const float* init,
                            float* out) {
  const int64_t c16 = C - C % 16;
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    for (int64_t c = 0; c < c16; c += 16) {
      expand_block16<4>(h + i * r, r, w + c, C, init != nullptr ? init + c : nullptr, out + i * C + c);
    }
  }
  for (; i < rows; ++i) {
    for (int64_t c = 0; c < c16; c += 16) {
      expand_block16<1>(h + i * r, r, w + c, C, init != nullptr ? init + c : nullptr, out + i * C + c);
    }
  }
  if (c16 < C) {
    for (int64_t ii = 0; ii < rows; ++ii) {
      for (int64_t c = c16; c < C; ++c) {
        float s = init != nullptr ? init[c] : 0.f;
        for (int64_t j = 0; j < r; ++j) s += h[ii * r + j] * w[j * C + c];
        out[ii * C + c] = s;
      }
    }
  }
}

// JB ranks x 16 channels of outer_acc, summed over all rows.
template <int JB>
SA2VP_AVX2 void outer_acc_block16(const float* h, int64_t rows, int64_t r, const float* x, int64_t C, float* acc) {
  __m256 a[JB][2];
  for (int j = 0; j < JB; ++j) {
    a[j][0] = _mm256_loadu_ps(acc + j * C);
    a[j][1] = _mm256_loadu_ps(acc + j * C + 8);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const __m256 x0 = _mm256_loadu_ps(x + i * C), x1 = _mm256_loadu_ps(x + i * C + 8);
    for (int j = 0; j < JB; ++j) {
      const __m256 hv = _mm256_broadcast_ss(h + i * r + j);
      a[j][0] = _mm256_fmadd_ps(hv, x0, a[j][0]);
      a[j][1] = _mm256_fmadd_ps(hv, x1, a[j][1]);
    }
  }
  for (int j = 0; j < JB; ++j) {
    _mm256_storeu_ps(acc + j * C, a[j][0]);
    _mm256_storeu_ps(acc + j * C + 8, a[j][1]);
  }
}

SA2VP_AVX2 void outer_acc_avx2(const float* h, int64_t rows, int64_t r, const float* x, int64_t C, float* acc) {
  const int64_t c16 = C - C % 16;
  for (int64_t c = 0; c < c16; c += 16) {
    int64_t j = 0;
    for (; j + 4 <= r; j += 4) outer_acc_block16<4>(h + j, rows, r, x + c, C, acc + j * C + c);
    for (; j < r; ++j) outer_acc_block16<1>(h + j, rows, r, x + c, C, acc + j * C + c);
  }
  if (c16 < C) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < r; ++j) {
        const float hv = h[i * r + j];
        for (int64_t c = c16; c < C; ++c) acc[j * C + c] += hv * x[i * C + c];
      }
    }
  }
}

SA2VP_AVX2 inline __m256i fmix32_avx2(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

SA2VP_AVX2 void keep_scale_avx2(uint32_t row_state, int64_t C, uint32_t threshold, float s, float* out) {
  const __m256i rs = _mm256_set1_epi32(static_cast<int>(row_state));
  const __m256i golden = _mm256_set1_epi32(static_cast<int>(hash::kGolden));
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold));  // < 2**31
  const __m256 sv = _mm256_set1_ps(s);
  __m256i col = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256i u = _mm256_srli_epi32(fmix32_avx2(_mm256_xor_si256(rs, _mm256_mullo_epi32(col, golden))), 1);
    const __m256 drop = _mm256_castsi256_ps(_mm256_cmpgt_epi32(thr, u));  // both below 2**31
    _mm256_storeu_ps(out + c, _mm256_andnot_ps(drop, sv));
    col = _mm256_add_epi32(col, step);
  }
  for (; c < C; ++c) out[c] = hash::keep(row_state, static_cast<uint32_t>(c), threshold) ? s : 0.f;
}
#endif

// The small products, portable.
template <typename T>
struct OpsRef {
  static void rowdot(const T* x, int64_t rows, const T* w, int64_t r, int64_t C, T* out) {
    rowdot_ref(x, rows, w, r, C, out);
  }
  static void expand(const T* h, int64_t rows, int64_t r, const T* w, int64_t C, const T* init, T* out) {
    expand_ref(h, rows, r, w, C, init, out);
  }
  static void outer_acc(const T* h, int64_t rows, int64_t r, const T* x, int64_t C, T* acc) {
    outer_acc_ref(h, rows, r, x, C, acc);
  }
  static void keep_scale(uint32_t rs, int64_t C, uint32_t threshold, T s, T* out) {
    keep_scale_ref(rs, C, threshold, s, out);
  }
};

#ifdef SA2VP_PROMPT_ADD_AVX2
// The small products with AVX2 + FMA (float32; only called when the processor has them).
struct OpsAvx2 {
  static void rowdot(const float* x, int64_t rows, const float* w, int64_t r, int64_t C, float* out) {
    rowdot_avx2(x, rows, w, r, C, out);
  }
  static void expand(const float* h, int64_t rows, int64_t r, const float* w, int64_t C, const float* init,
                     float* out) {
    expand_avx2(h, rows, r, w, C, init, out);
  }
  static void outer_acc(const float* h, int64_t rows, int64_t r, const float* x, int64_t C, float* acc) {
    outer_acc_avx2(h, rows, r, x, C, acc);
  }
  static void keep_scale(uint32_t rs, int64_t C, uint32_t threshold, float s, float* out) {
    keep_scale_avx2(rs, C, threshold, s, out);
  }
};
#endif

// ---- the op ---------------------------------------------------------------------------------------

// Rows of a (B, N, C) tensor with stride(2) == 1, addressed by the flat token index m = b * N + n.
template <typename T>
struct Rows {
  const T* data;
  int64_t N, stride_b, stride_n;
  explicit Rows(const at::Tensor& t)
      : data(static_cast<const T*>(t.data_ptr())), N(t.size(1)), stride_b(t.stride(0)), stride_n(t.stride(1)) {}
  const T* operator()(int64_t m) const { return data + (m / N) * stride_b + (m % N) * stride_n; }
};

struct Dropout : DropoutParams {
  using DropoutParams::DropoutParams;

  // h = drop(gelu(z)) for the hidden values of token m, and (when dh is not null) dh = drop'(gelu'(z)).
  template <typename T>
  void hidden(int64_t m, const T* z, int64_t r, T* h, T* dh) const {
    const uint32_t rs = hash::row_state(key_hidden, static_cast<uint32_t>(m));
    for (int64_t j = 0; j < r; ++j) {
      const bool kept = !active || hash::keep(rs, static_cast<uint32_t>(j), threshold);
      T g, dg;
      gelu_and_grad(z[j], g, dg);
      h[j] = kept ? g * T(inv_keep) : T(0);
      if (dh != nullptr) dh[j] = kept ? dg * T(inv_keep) : T(0);
    }
  }
};

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename T>
T* ptr(at::Tensor& t) {
  return t.data_ptr<T>();
}

// Everything the per-chunk work of the forward needs.
template <typename T>
struct FwdArgs {
  Rows<T> msg, tgt;
  const T *gamma, *beta, *wd, *bd, *wu_t, *bu, *deep, *deep_scale;
  T scale, eps;
  const Dropout* drop;
  int64_t M, N, C, r;
  T *out, *mean, *rstd, *z;
  CpuIsa isa;
  // Only for the AVX-512 kernels: wg = down_weight * norm_weight (r, C), beff = down_bias +
  // down_weight @ norm_bias (r,).
  const T *wg, *beff;
};

// Forward of the tokens [m0, m0 + rows); y (kRows x C), h (kRows x r), ks (C) are scratch.
template <typename T, class Ops>
SA2VP_INLINE void fwd_chunk_body(const FwdArgs<T>& a, int64_t m0, int64_t rows, T* y, T* h, T* ks) {
  const int64_t C = a.C, r = a.r;
  const Dropout& drop = *a.drop;
  // LayerNorm of every row of the chunk.
  for (int64_t i = 0; i < rows; ++i) {
    const T* x = a.msg(m0 + i);
    const T mu = row_sum(x, C) / T(C);
    const T rs = T(1) / std::sqrt(row_centered_sq_sum(x, mu, C) / T(C) + a.eps);
    a.mean[m0 + i] = mu;
    a.rstd[m0 + i] = rs;
    T* yi = y + i * C;
    const T* gamma = a.gamma;
    const T* beta = a.beta;
    for (int64_t c = 0; c < C; ++c) yi[c] = (x[c] - mu) * rs * gamma[c] + beta[c];
  }
  // z = y @ down_weight^T + down_bias, straight into the saved z; h = drop(gelu(z)).
  T* zc = a.z + m0 * r;
  Ops::rowdot(y, rows, a.wd, r, C, zc);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < r; ++j) zc[i * r + j] += a.bd[j];
    drop.hidden(m0 + i, zc + i * r, r, h + i * r, static_cast<T*>(nullptr));
  }
  // u = h @ up_weight^T + up_bias (into the LayerNorm buffer), then the residual epilogue.
  Ops::expand(h, rows, r, a.wu_t, C, a.bu, y);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    const T* ui = y + i * C;
    const T* ti = a.tgt(m);
    T* oi = a.out + m * C;
    if (drop.active) {
      Ops::keep_scale(hash::row_state(drop.key_out, static_cast<uint32_t>(m)), C, drop.threshold,
                         a.scale * T(drop.inv_keep), ks);
      for (int64_t c = 0; c < C; ++c) oi[c] = ti[c] + ks[c] * ui[c];
    } else {
      const T s = a.scale;
      for (int64_t c = 0; c < C; ++c) oi[c] = ti[c] + s * ui[c];
    }
    if (a.deep != nullptr) {
      const T* di = a.deep + (m % a.N) * C;
      const T* ds = a.deep_scale;
      for (int64_t c = 0; c < C; ++c) oi[c] += ds[c] * di[c];
    }
  }
}

// Everything the per-chunk work of the backward needs, and the partial sums of one group.
template <typename T>
struct BwdArgs {
  Rows<T> msg, gout;
  const T *mean, *rstd, *z, *gamma, *wd, *wu_t;
  T scale;
  const Dropout* drop;
  int64_t M, C, r;
  T* gmsg;
  CpuIsa isa;
  // Only for the AVX-512 kernels: wg as in FwdArgs, wg_sum[j] = sum_c wg[j][c].
  const T *wg, *wg_sum;
};

template <typename T>
struct GroupAcc {
  T* up_w_t;  // (r, C): h^T @ gu
  T* a;       // (r, C): gz^T @ xhat
  T* up_b;    // (C,)
  T* down_b;  // (r,)
};

// Backward of the tokens [m0, m0 + rows); g, xh (kRows x C), h, dh, gz (kRows x r), ks (C) are scratch.
template <typename T, class Ops>
SA2VP_INLINE void bwd_chunk_body(const BwdArgs<T>& a, const GroupAcc<T>& acc, int64_t m0, int64_t rows, T* g,
                                 T* xh, T* h, T* dh, T* gz, T* ks) {
  const int64_t C = a.C, r = a.r;
  const Dropout& drop = *a.drop;
  // gu = scale * drop'(grad_out); h = drop(gelu(z)).
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    const T* go = a.gout(m);
    T* gi = g + i * C;
    if (drop.active) {
      Ops::keep_scale(hash::row_state(drop.key_out, static_cast<uint32_t>(m)), C, drop.threshold,
                         a.scale * T(drop.inv_keep), ks);
      for (int64_t c = 0; c < C; ++c) gi[c] = ks[c] * go[c];
    } else {
      const T s = a.scale;
      for (int64_t c = 0; c < C; ++c) gi[c] = s * go[c];
    }
    T* up_b = acc.up_b;
    for (int64_t c = 0; c < C; ++c) up_b[c] += gi[c];
    drop.hidden(m, a.z + m * r, r, h + i * r, dh + i * r);
  }
  Ops::outer_acc(h, rows, r, g, C, acc.up_w_t);
  Ops::rowdot(g, rows, a.wu_t, r, C, gz);  // gh = gu @ up_weight
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    for (int64_t j = 0; j < r; ++j) {
      const T v = gz[i * r + j] * dh[i * r + j];
      gz[i * r + j] = v;
      acc.down_b[j] += v;
    }
    const T* x = a.msg(m);
    const T mu = a.mean[m], rs_ = a.rstd[m];
    T* xi = xh + i * C;
    for (int64_t c = 0; c < C; ++c) xi[c] = (x[c] - mu) * rs_;
  }
  Ops::outer_acc(gz, rows, r, xh, C, acc.a);
  Ops::expand(gz, rows, r, a.wd, C, nullptr, g);  // gy = gz @ down_weight
  // LayerNorm backward: dx = rstd * (gy*gamma - mean(gy*gamma) - xhat * mean(gy*gamma*xhat)).
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    T* gi = g + i * C;
    const T* xi = xh + i * C;
    const T* gamma = a.gamma;
    for (int64_t c = 0; c < C; ++c) gi[c] *= gamma[c];
    const T c1 = row_sum(gi, C) / T(C);
    const T c2 = row_dot(gi, xi, C) / T(C);
    const T rs_ = a.rstd[m];
    T* dx = a.gmsg + m * C;
    for (int64_t c = 0; c < C; ++c) dx[c] = rs_ * (gi[c] - c1 - xi[c] * c2);
  }
}

template <typename T>
void fwd_chunk(const FwdArgs<T>& a, int64_t m0, int64_t rows, T* y, T* h, T* ks) {
  fwd_chunk_body<T, OpsRef<T>>(a, m0, rows, y, h, ks);
}

template <typename T>
void bwd_chunk(const BwdArgs<T>& a, const GroupAcc<T>& acc, int64_t m0, int64_t rows, T* g, T* xh, T* h, T* dh,
               T* gz, T* ks) {
  bwd_chunk_body<T, OpsRef<T>>(a, acc, m0, rows, g, xh, h, dh, gz, ks);
}

#ifdef SA2VP_PROMPT_ADD_AVX2
// The same chunk bodies compiled for AVX2 (their element-wise loops vectorise 8 wide).
SA2VP_AVX2 void fwd_chunk_avx2(const FwdArgs<float>& a, int64_t m0, int64_t rows, float* y, float* h, float* ks) {
  fwd_chunk_body<float, OpsAvx2>(a, m0, rows, y, h, ks);
}

SA2VP_AVX2 void bwd_chunk_avx2(const BwdArgs<float>& a, const GroupAcc<float>& acc, int64_t m0, int64_t rows,
                               float* g, float* xh, float* h, float* dh, float* gz, float* ks) {
  bwd_chunk_body<float, OpsAvx2>(a, acc, m0, rows, g, xh, h, dh, gz, ks);
}
#endif

#ifdef SA2VP_HAVE_SIMD512
SA2VP_SIMD512_BEGIN
namespace s5 = simd512;

// AVX-512 chunks (float32). The LayerNorm's affine is folded into the down projection,
//   z = rstd * ((x - mean) @ wg^T) + beff,
// the up projection is fused with the residual epilogue (no (rows x C) intermediate in the forward),
// and in the backward gy = gz @ down_weight is fused with the LayerNorm backward, using
// mean_c(gy * gamma) = gz . wg_sum / C.

// h = drop(gelu(z)) * inv_keep for the r values of token m, and dh = drop(gelu'(z)) * inv_keep.
inline void hidden512(const Dropout& drop, int64_t m, const float* z, int64_t r, float* h, float* dh) {
  const uint32_t rs = hash::row_state(drop.key_hidden, static_cast<uint32_t>(m));
  const s5::V k = s5::set1(static_cast<float>(drop.inv_keep));
  for (int64_t j = 0; j < r; j += 16) {
    const __mmask16 m16 = s5::col_mask(j, r);
    const __mmask16 kept = drop.active ? (s5::keep_mask(rs, j, drop.threshold) & m16) : m16;
    s5::V g, dg;
    s5::gelu_and_grad(s5::load(z + j, m16), g, dg);
    s5::store(h + j, m16, _mm512_maskz_mul_ps(kept, g, k));
    if (dh != nullptr) s5::store(dh + j, m16, _mm512_maskz_mul_ps(kept, dg, k));
  }
}

// out = target + scale * drop(u) [+ deep_scale * deep] for the value u of columns c.. of row i.
struct FwdEpilogue {
  const float* const* target;
  float* out;  // row m0 of the output
  const float* deep;  // (N, C), or null
  const float* deep_scale;
  const uint32_t* row_state;
  int64_t C, N, n0;
  float scale;
  uint32_t threshold;
  bool active;
  void operator()(int64_t i, int64_t c, __mmask16 m, s5::V u) const {
    s5::V s = s5::set1(scale);
    if (active) s = _mm512_maskz_mov_ps(s5::keep_mask(row_state[i], c, threshold), s);
    s5::V o = _mm512_fmadd_ps(s, u, s5::load(target[i] + c, m));
    if (deep != nullptr) {
      const int64_t n = (n0 + i) % N;
      o = _mm512_fmadd_ps(s5::load(deep_scale + c, m), s5::load(deep + n * C + c, m), o);
    }
    s5::store(out + i * C + c, m, o);
  }
};

// A prefetch queue for the rows of the chunk after the one at m0: rows of two inputs to read, then rows
// of the contiguous (M, C) output to write, spread over about `steps` steps of the products.
s5::Prefetch next_chunk_queue(int64_t m0, int64_t M, int64_t C, const Rows<float>& in0, const Rows<float>& in1,
                              const float* out, int64_t steps) {
  s5::Prefetch pf(C);
  const int64_t begin = m0 + kRows, end = std::min(m0 + 2 * kRows, M);
  for (int64_t i = begin; i < end; ++i) pf.add(in0(i));
  for (int64_t i = begin; i < end; ++i) pf.add(in1(i));
  for (int64_t i = begin; i < end; ++i) pf.add_write(out + i * C);
  pf.spread_over(steps);
  return pf;
}

void fwd_chunk_512(const FwdArgs<float>& a, int64_t m0, int64_t rows, float* h) {
  const int64_t C = a.C, r = a.r;
  const float* x[kRows];
  const float* t[kRows];
  float mu[kRows], rs[kRows];
  uint32_t out_state[kRows];
  for (int64_t i = 0; i < rows; ++i) {
    x[i] = a.msg(m0 + i);
    t[i] = a.tgt(m0 + i);
    s5::row_stats(x[i], C, a.eps, mu[i], rs[i]);
    a.mean[m0 + i] = mu[i];
    a.rstd[m0 + i] = rs[i];
    out_state[i] = hash::row_state(a.drop->key_out, static_cast<uint32_t>(m0 + i));
  }
  // The next chunk's message and target (to read) and out rows (to write) are fetched during this
  // chunk's products, spread evenly over all of them (rowdot_rows and expand_rows step the queue
  // rows * r * C / 256 times each). Spread over the first half only (the earlier setting), the
  // forward was 2-8 % and the backward 2-4 % slower side by side (Intel Xeon, AVX-512, 1 and 2 threads).
  s5::Prefetch pf = next_chunk_queue(m0, a.M, C, a.msg, a.tgt, a.out, rows * r * C / 128);
  float* z = a.z + m0 * r;
  s5::rowdot_rows<true>(x, mu, rows, a.wg, r, C, z, r, &pf);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < r; ++j) z[i * r + j] = rs[i] * z[i * r + j] + a.beff[j];
    hidden512(*a.drop, m0 + i, z + i * r, r, h + i * r, nullptr);
  }
  const FwdEpilogue epi{t, a.out + m0 * C, a.deep, a.deep_scale, out_state, C, a.N, m0,
                        a.scale * static_cast<float>(a.drop->inv_keep), a.drop->threshold, a.drop->active};
  s5::expand_rows(h, r, rows, r, a.wu_t, C, a.bu, epi, &pf);
  pf.drain();
}

// xhat = (x - mean) * rstd of row i.
struct XhatRows {
  const float* const* x;
  const float* mu;
  const float* rs;
  s5::V operator()(int64_t i, int64_t c, __mmask16 m) const {
    return _mm512_maskz_mul_ps(m, _mm512_sub_ps(s5::load(x[i] + c, m), s5::set1(mu[i])), s5::set1(rs[i]));
  }
};

// First half of the LayerNorm backward, grad_message = rstd * (gy*gamma - c1 - xhat * c2): stores
// rstd * (gy*gamma - c1) and accumulates gy*gamma*xhat for c2; gy*gamma = gz @ wg is the value.
struct LayerNormBwdEpilogue {
  const float* const* x;
  const float* mu;
  const float* rs;
  const float* c1;
  s5::V* dot;  // per row: lanes of sum_c gy*gamma*xhat
  float* gmsg;  // row m0
  int64_t C;
  void operator()(int64_t i, int64_t c, __mmask16 m, s5::V gyg) const {
    const s5::V r_ = s5::set1(rs[i]);
    const s5::V xhat = _mm512_maskz_mul_ps(m, _mm512_sub_ps(s5::load(x[i] + c, m), s5::set1(mu[i])), r_);
    dot[i] = _mm512_fmadd_ps(gyg, xhat, dot[i]);
    s5::store(gmsg + i * C + c, m, _mm512_mul_ps(r_, _mm512_sub_ps(gyg, s5::set1(c1[i]))));
  }
};

void bwd_chunk_512(const BwdArgs<float>& a, const GroupAcc<float>& acc, int64_t m0, int64_t rows, float* g,
                   float* h, float* dh, float* gz) {
  const int64_t C = a.C, r = a.r;
  const Dropout& drop = *a.drop;
  const float* x[kRows];
  const float* gp[kRows];
  float mu[kRows], rs[kRows], c1[kRows];
  s5::V dot[kRows];
  const s5::V s = s5::set1(a.scale * static_cast<float>(drop.inv_keep));
  // gu = scale * drop'(grad_out) (into g) and its column sums; h, dh from the saved z.
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    x[i] = a.msg(m);
    mu[i] = a.mean[m];
    rs[i] = a.rstd[m];
    gp[i] = g + i * C;
    dot[i] = _mm512_setzero_ps();
    const float* go = a.gout(m);
    float* gi = g + i * C;
    const uint32_t state = hash::row_state(drop.key_out, static_cast<uint32_t>(m));
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 mk = s5::col_mask(c, C);
      const __mmask16 kept = drop.active ? (s5::keep_mask(state, c, drop.threshold) & mk) : mk;
      const s5::V gu = _mm512_maskz_mul_ps(kept, s5::load(go + c, mk), s);
      s5::store(gi + c, mk, gu);
      s5::store(acc.up_b + c, mk, _mm512_add_ps(s5::load(acc.up_b + c, mk), gu));
    }
    hidden512(drop, m, a.z + m * r, r, h + i * r, dh + i * r);
  }
  // The next chunk's grad_out and message (to read) and grad_message rows (to write) are fetched
  // during this chunk's four products (rows * r * C / 256 steps each), spread evenly over all of them.
  s5::Prefetch pf = next_chunk_queue(m0, a.M, C, a.gout, a.msg, a.gmsg, rows * r * C / 64);
  // grad_up_weight^T += h^T @ gu;  gh = gu @ up_weight.
  s5::outer_rows(h, r, rows, r, acc.up_w_t, C, s5::PlainRows{g, C}, &pf);
  s5::rowdot_rows<false>(gp, nullptr, rows, a.wu_t, r, C, gz, r, &pf);
  // gz = gh * drop'(gelu'(z)); c1 = mean_c(gy * gamma).
  for (int64_t i = 0; i < rows; ++i) {
    float s1 = 0.f;
    for (int64_t j = 0; j < r; ++j) {
      const float v = gz[i * r + j] * dh[i * r + j];
      gz[i * r + j] = v;
      acc.down_b[j] += v;
      s1 += v * a.wg_sum[j];
    }
    c1[i] = s1 / static_cast<float>(C);
  }
  // A += gz^T @ xhat.
  s5::outer_rows(gz, r, rows, r, acc.a, C, XhatRows{x, mu, rs}, &pf);
  // grad_message in two passes: rstd * (gy*gamma - c1), then - rstd * c2 * xhat.
  float* gmsg = a.gmsg + m0 * C;
  const LayerNormBwdEpilogue epi{x, mu, rs, c1, dot, gmsg, C};
  s5::expand_rows(gz, r, rows, r, a.wg, C, static_cast<const float*>(nullptr), epi, &pf);
  pf.drain();
  for (int64_t i = 0; i < rows; ++i) {
    const s5::V k = s5::set1(rs[i] * _mm512_reduce_add_ps(dot[i]) / static_cast<float>(C));
    const XhatRows xhat{x, mu, rs};
    float* gi = gmsg + i * C;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 mk = s5::col_mask(c, C);
      s5::store(gi + c, mk, _mm512_fnmadd_ps(k, xhat(i, c, mk), s5::load(gi + c, mk)));
    }
  }
}

SA2VP_SIMD512_END
#endif

template <>
void fwd_chunk<float>(const FwdArgs<float>& a, int64_t m0, int64_t rows, float* y, float* h, float* ks) {
  switch (a.isa) {
#ifdef SA2VP_HAVE_SIMD512
    case CpuIsa::kAvx512:
      return fwd_chunk_512(a, m0, rows, h);
#endif
#ifdef SA2VP_PROMPT_ADD_AVX2
    case CpuIsa::kAvx2:
      return fwd_chunk_avx2(a, m0, rows, y, h, ks);
#endif
    default:
      return fwd_chunk_body<float, OpsRef<float>>(a, m0, rows, y, h, ks);
  }
}

template <>
void bwd_chunk<float>(const BwdArgs<float>& a, const GroupAcc<float>& acc, int64_t m0, int64_t rows, float* g,
                      float* xh, float* h, float* dh, float* gz, float* ks) {
  switch (a.isa) {
#ifdef SA2VP_HAVE_SIMD512
    case CpuIsa::kAvx512:
      return bwd_chunk_512(a, acc, m0, rows, g, h, dh, gz);
#endif
#ifdef SA2VP_PROMPT_ADD_AVX2
    case CpuIsa::kAvx2:
      return bwd_chunk_avx2(a, acc, m0, rows, g, xh, h, dh, gz, ks);
#endif
    default:
      return bwd_chunk_body<float, OpsRef<float>>(a, acc, m0, rows, g, xh, h, dh, gz, ks);
  }
}

template <typename T>
void fwd_impl(const FwdArgs<T>& a) {
  const int64_t num_chunks = (a.M + kRows - 1) / kRows;
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<T> y(kRows * a.C), h(kRows * a.r), ks(a.C);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t m0 = chunk * kRows;
      fwd_chunk(a, m0, std::min(kRows, a.M - m0), y.data(), h.data(), ks.data());
    }
  });
}

// Runs the backward over `groups` groups of consecutive chunks; part_* hold one partial per group.
template <typename T>
void bwd_impl(const BwdArgs<T>& a, int64_t groups, T* part_up_w_t, T* part_a, T* part_up_b, T* part_down_b) {
  const int64_t C = a.C, r = a.r;
  const int64_t num_chunks = (a.M + kRows - 1) / kRows;
  at::parallel_for(0, groups, 1, [&](int64_t group_begin, int64_t group_end) {
    std::vector<T> g(kRows * C), xh(kRows * C), h(kRows * r), dh(kRows * r), gz(kRows * r), ks(C);
    for (int64_t grp = group_begin; grp < group_end; ++grp) {
      const GroupAcc<T> acc{part_up_w_t + grp * r * C, part_a + grp * r * C, part_up_b + grp * C,
                            part_down_b + grp * r};
      const int64_t c_begin = grp * num_chunks / groups, c_end = (grp + 1) * num_chunks / groups;
      for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
        const int64_t m0 = chunk * kRows;
        bwd_chunk(a, acc, m0, std::min(kRows, a.M - m0), g.data(), xh.data(), h.data(), dh.data(), gz.data(),
                  ks.data());
      }
    }
  });
}

// The LayerNorm's affine folded into the down projection, for the AVX-512 kernels (float32 only;
// undefined tensors otherwise): wg = down_weight * norm_weight, beff = down_bias + down_weight @
// norm_bias, wg_sum = wg.sum(1); sums in float64.
struct FoldedDown {
  at::Tensor wg, beff, wg_sum;
  bool defined() const { return wg.defined(); }
};

FoldedDown fold_down(CpuIsa isa, const at::Tensor& nw, const at::Tensor& nb, const at::Tensor& dw,
                     const c10::optional<at::Tensor>& db) {
  FoldedDown f;
  if (isa != CpuIsa::kAvx512 || dw.scalar_type() != at::kFloat) return f;
  // Plain loops (r x C values): a handful of ATen calls here cost more than the arithmetic.
  const int64_t r = dw.size(0), C = dw.size(1);
  f.wg = at::empty({r, C}, dw.options());
  f.beff = at::empty({r}, dw.options());
  f.wg_sum = at::empty({r}, dw.options());
  const float* w = dw.data_ptr<float>();
  const float* gamma = nw.data_ptr<float>();
  const float* beta = nb.data_ptr<float>();
  const float* bias = db.has_value() ? db->data_ptr<float>() : nullptr;
  float* wg = f.wg.data_ptr<float>();
  for (int64_t j = 0; j < r; ++j) {
    double sum = 0.0, shift = bias != nullptr ? static_cast<double>(bias[j]) : 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double wjc = static_cast<double>(w[j * C + c]);
      const double v = wjc * static_cast<double>(gamma[c]);
      wg[j * C + c] = static_cast<float>(v);
      sum += v;
      shift += wjc * static_cast<double>(beta[c]);
    }
    f.beff.data_ptr<float>()[j] = static_cast<float>(shift);
    f.wg_sum.data_ptr<float>()[j] = static_cast<float>(sum);
  }
  return f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_add_fwd_cpu(
    const at::Tensor& target_in, const at::Tensor& message_in, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const c10::optional<at::Tensor>& deep_in,
    const c10::optional<at::Tensor>& deep_scale_in, double scale, double dropout_p, double eps, int64_t seed) {
  const int64_t r = check_prompt_add_fwd_args(target_in, message_in, norm_weight, norm_bias, down_weight,
                                              down_bias, up_weight, up_bias, deep_in, deep_scale_in, dropout_p,
                                              eps, seed);
  SA2VP_CHECK(message_in.device().is_cpu(), "prompt_add_fwd (CPU): tensors must be on the CPU");
  const auto dtype = message_in.scalar_type();
  SA2VP_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "prompt_add_fwd (CPU) supports float32 and float64, got ", dtype);
  const at::Tensor target = last_dim_contiguous(target_in), message = last_dim_contiguous(message_in);
  at::Tensor nw = norm_weight.contiguous(), nb = norm_bias.contiguous();
  at::Tensor dw = down_weight.contiguous(), db = down_bias.contiguous();
  at::Tensor wu_t = up_weight.t().contiguous(), ub = up_bias.contiguous();
  at::Tensor deep, deep_scale;
  if (deep_in.has_value()) {
    deep = deep_in->contiguous();
    deep_scale = deep_scale_in->contiguous();
  }
  const int64_t M = message.size(0) * message.size(1);
  at::Tensor out = at::empty(message.sizes(), message.options());
  at::Tensor mean = at::empty({M}, message.options());
  at::Tensor rstd = at::empty({M}, message.options());
  at::Tensor z = at::empty({M, r}, message.options());
  const Dropout drop(dropout_p, seed);
  const CpuIsa isa = cpu_isa();
  FoldedDown fold = fold_down(isa, nw, nb, dw, db);
  AT_DISPATCH_FLOATING_TYPES(dtype, "prompt_add_fwd_cpu", [&] {
    using T = scalar_t;
    FwdArgs<T> args{Rows<T>(message), Rows<T>(target), ptr<T>(nw), ptr<T>(nb), ptr<T>(dw), ptr<T>(db),
                          ptr<T>(wu_t), ptr<T>(ub), deep.defined() ? ptr<T>(deep) : nullptr,
                          deep.defined() ? ptr<T>(deep_scale) : nullptr, static_cast<T>(scale), static_cast<T>(eps),
                          &drop, M, message.size(1), message.size(2), r, ptr<T>(out), ptr<T>(mean), ptr<T>(rstd),
                          ptr<T>(z), isa, nullptr, nullptr};
    if (fold.defined()) {
      args.wg = ptr<T>(fold.wg);
      args.beff = ptr<T>(fold.beff);
    }
    fwd_impl(args);
  });
  return {out, mean, rstd, z};
}

// n zeroed values of T, in a buffer kept by the calling thread from call to call: the backward's
// partial sums (about 1.5 MB at ViT-B sizes) then cost neither an allocation nor fresh pages per call.
template <typename T>
T* zeroed_workspace(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  std::fill(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(n), T(0));
  return buffer.data();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_add_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& message_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, const at::Tensor& z_in, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, const at::Tensor& down_weight, const at::Tensor& up_weight, double scale,
    double dropout_p, int64_t seed) {
  check_prompt_add_bwd_args(grad_out_in, message_in, mean_in, rstd_in, z_in, norm_weight, norm_bias, down_weight,
                            up_weight, dropout_p, seed);
  SA2VP_CHECK(message_in.device().is_cpu(), "prompt_add_bwd (CPU): tensors must be on the CPU");
  const auto dtype = message_in.scalar_type();
  SA2VP_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "prompt_add_bwd (CPU) supports float32 and float64, got ", dtype);
  const at::Tensor grad_out = last_dim_contiguous(grad_out_in), message = last_dim_contiguous(message_in);
  at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous(), z = z_in.contiguous();
  at::Tensor nw = norm_weight.contiguous(), nb = norm_bias.contiguous();
  at::Tensor dw = down_weight.contiguous(), wu_t = up_weight.t().contiguous();
  const int64_t C = message.size(2), r = dw.size(0), M = message.size(0) * message.size(1);
  const int64_t groups = std::min((M + kRows - 1) / kRows, kMaxGroups);
  at::Tensor grad_message = at::empty(message.sizes(), message.options());
  at::Tensor g_nw = at::empty({C}, nw.options()), g_nb = at::empty({C}, nw.options());
  at::Tensor g_dw = at::empty({r, C}, nw.options()), g_db = at::empty({r}, nw.options());
  at::Tensor g_uw = at::empty({C, r}, nw.options()), g_ub = at::empty({C}, nw.options());
  const Dropout drop(dropout_p, seed);
  const CpuIsa isa = cpu_isa();
  FoldedDown fold = fold_down(isa, nw, nb, dw, c10::nullopt);
  AT_DISPATCH_FLOATING_TYPES(dtype, "prompt_add_bwd_cpu", [&] {
    using T = scalar_t;
    // Group partials: (r, C) sums of h^T @ gu and gz^T @ xhat, (C,) sums of gu, (r,) sums of gz.
    T* const work = zeroed_workspace<T>(groups * (2 * r * C + C + r));
    T* const part_up_w_t = work;
    T* const part_a = part_up_w_t + groups * r * C;
    T* const part_up_b = part_a + groups * r * C;
    T* const part_down_b = part_up_b + groups * C;
    BwdArgs<T> args{Rows<T>(message), Rows<T>(grad_out), ptr<T>(mean), ptr<T>(rstd), ptr<T>(z), ptr<T>(nw),
                    ptr<T>(dw), ptr<T>(wu_t), static_cast<T>(scale), &drop, M, C, r, ptr<T>(grad_message),
                    isa, nullptr, nullptr};
    if (fold.defined()) {
      args.wg = ptr<T>(fold.wg);
      args.wg_sum = ptr<T>(fold.wg_sum);
    }
    bwd_impl(args, groups, part_up_w_t, part_a, part_up_b, part_down_b);
    // Add the group partials in order.
    const int64_t RC = r * C;
    std::vector<T> up_w_t(RC, T(0)), a(RC, T(0)), up_b(C, T(0)), down_b(r, T(0));
    at::parallel_for(0, RC, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t grp = 0; grp < groups; ++grp) {
        const T* pw = part_up_w_t + grp * RC;
        const T* pa = part_a + grp * RC;
        for (int64_t k = begin; k < end; ++k) {
          up_w_t[k] += pw[k];
          a[k] += pa[k];
        }
      }
    });
    for (int64_t grp = 0; grp < groups; ++grp) {
      for (int64_t c = 0; c < C; ++c) up_b[c] += part_up_b[grp * C + c];
      for (int64_t j = 0; j < r; ++j) down_b[j] += part_down_b[grp * r + j];
    }
    // Parameter gradients.
    const T* gamma = ptr<T>(nw);
    const T* beta = ptr<T>(nb);
    const T* wd = ptr<T>(dw);
    T* gdw = ptr<T>(g_dw);
    T* gnw = ptr<T>(g_nw);
    T* gnb = ptr<T>(g_nb);
    T* guw = ptr<T>(g_uw);
    std::fill(gnw, gnw + C, T(0));
    std::fill(gnb, gnb + C, T(0));
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t c = 0; c < C; ++c) {
        const T aj = a[j * C + c];
        gdw[j * C + c] = aj * gamma[c] + down_b[j] * beta[c];
        gnw[c] += wd[j * C + c] * aj;
        gnb[c] += wd[j * C + c] * down_b[j];
        guw[c * r + j] = up_w_t[j * C + c];
      }
    }
    std::copy(down_b.begin(), down_b.end(), ptr<T>(g_db));
    std::copy(up_b.begin(), up_b.end(), ptr<T>(g_ub));
  });
  return {grad_message, g_nw, g_nb, g_dw, g_db, g_uw, g_ub};
}

}  // namespace

TORCH_LIBRARY_IMPL(sa2vp_kernels, CPU, m) {
  m.impl("prompt_add_fwd", &prompt_add_fwd_cpu);
  m.impl("prompt_add_bwd", &prompt_add_bwd_cpu);
}

}  // namespace sa2vp
