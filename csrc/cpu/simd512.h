// AVX-512 building blocks of the float32 CPU kernels (prompt_add, prompt_map): the small products of a
// token chunk with a low-rank weight, vectorised GELU and the dropout hash.
//
// Everything here is compiled for AVX-512 (F, DQ, BW, VL) + FMA through a target pragma and has
// internal linkage, so including it never changes code outside it; callers run it only when
// cpu_isa() (isa.h) says the processor supports it. Vectors are 16 floats; a row of C floats is
// ceil(C / 16) vectors, the last one masked when C % 16 != 0 (masked loads read zeros there and
// masked stores leave memory alone).
//
//   rowdot_rows   out[i][j]  = sum_c (x_i[c] - mu_i) w[j][c]      (rows x C times C x r)
//   expand_rows   epi(i, c, init[c] + sum_j h[i][j] w[j][c])      (rows x r times r x C, fused epilogue)
//   outer_rows    acc[j][c] += sum_i h[i][j] load(i, c)           (r x C sums of outer products)
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SA2VP_HAVE_SIMD512 1

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../prompt_add.h"

// Opens and closes a region compiled for the instruction sets of this file. Code that calls into it
// must be in such a region too: GCC does not inline a function compiled for more instruction sets than
// its caller, and the small helpers below are always_inline, so a mismatch fails to compile instead of
// silently turning every vector load into a call.
#define SA2VP_SIMD512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,prfchw\")")
#define SA2VP_SIMD512_END _Pragma("GCC pop_options")

SA2VP_SIMD512_BEGIN

// Fully unrolled loops over the register blocks keep the accumulators in registers.
#define SA2VP_UNROLL _Pragma("GCC unroll 16")

namespace sa2vp {
namespace simd512 {
namespace {

using V = __m512;

#define SA2VP_SIMD512_INLINE inline __attribute__((always_inline))

SA2VP_SIMD512_INLINE V set1(float x) { return _mm512_set1_ps(x); }

// Lanes [0, n) of a vector; all 16 when n >= 16.
SA2VP_SIMD512_INLINE __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

SA2VP_SIMD512_INLINE V load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
SA2VP_SIMD512_INLINE void store(float* p, __mmask16 m, V v) { _mm512_mask_storeu_ps(p, m, v); }

// Mask of the vector starting at column c of a row of C floats.
SA2VP_SIMD512_INLINE __mmask16 col_mask(int64_t c, int64_t C) { return lanes(C - c); }

// ---- element-wise math ------------------------------------------------------------------------

// exp(x) for x <= 0 (Cephes' expf: Cody-Waite reduction and a degree-5 polynomial, ~1 ulp).
inline V exp_nonpos(V x) {
  x = _mm512_max_ps(x, set1(-87.0f));
  const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V f = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), f);
  V p = set1(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, set1(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, set1(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, set1(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, set1(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, set1(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, set1(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Exact (erf) GELU and its derivative, with the float32 erf of Abramowitz & Stegun 7.1.26 that the
// portable kernels use: gelu(z) = z Phi(z), gelu'(z) = Phi(z) + z phi(z).
inline void gelu_and_grad(V z, V& g, V& dg) {
  const V one = set1(1.f);
  const V x = _mm512_mul_ps(_mm512_abs_ps(z), set1(0.70710678118654752f));
  const V t = _mm512_div_ps(one, _mm512_fmadd_ps(set1(0.3275911f), x, one));
  const V e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(x, x)));
  V poly = _mm512_fmadd_ps(set1(1.061405429f), t, set1(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, set1(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, set1(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, set1(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const V erf_abs = _mm512_fnmadd_ps(poly, e, one);
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const V erf = _mm512_mask_sub_ps(erf_abs, neg, _mm512_setzero_ps(), erf_abs);
  const V cdf = _mm512_mul_ps(set1(0.5f), _mm512_add_ps(one, erf));
  g = _mm512_mul_ps(z, cdf);
  dg = _mm512_fmadd_ps(_mm512_mul_ps(z, e), set1(0.39894228040143268f), cdf);
}

// ---- the dropout hash (prompt_add.h) ------------------------------------------------------------

inline __m512i fmix32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// Lanes of columns c .. c + 15 of a row (row_state) that survive dropout with this threshold.
inline __mmask16 keep_mask(uint32_t row_state, int64_t c, uint32_t threshold) {
  // (c + lane) * golden mod 2**32 = c * golden + lane * golden: one add instead of a vector multiply.
  constexpr uint32_t g = prompt_add_hash::kGolden;
  const __m512i lane_g = _mm512_setr_epi32(0, static_cast<int>(g), static_cast<int>(2 * g), static_cast<int>(3 * g),
                                           static_cast<int>(4 * g), static_cast<int>(5 * g), static_cast<int>(6 * g),
                                           static_cast<int>(7 * g), static_cast<int>(8 * g), static_cast<int>(9 * g),
                                           static_cast<int>(10 * g), static_cast<int>(11 * g),
                                           static_cast<int>(12 * g), static_cast<int>(13 * g),
                                           static_cast<int>(14 * g), static_cast<int>(15 * g));
  const __m512i mixed =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c) * g)), lane_g);
  const __m512i u = _mm512_srli_epi32(fmix32(_mm512_xor_si512(_mm512_set1_epi32(static_cast<int>(row_state)), mixed)), 1);
  return _mm512_cmp_epu32_mask(u, _mm512_set1_epi32(static_cast<int>(threshold)), _MM_CMPINT_NLT);
}

// ---- prefetching the next chunk while this one computes -----------------------------------------

// The kernels stream big (B, N, C) tensors chunk by chunk: a memory-bound pass over a chunk's rows,
// then compute-bound low-rank products on them. A Prefetch queue holds rows (of the next chunk) to be
// brought into L2; the products' inner loops call step() about every 16 FMAs, which issues the next
// 64-byte lines at the rate spread_over() set. The memory traffic then overlaps the arithmetic instead
// of stalling the next chunk's memory-bound pass (about 10 % of prompt_add's fwd+bwd time at ViT-B
// sizes, bench/cpu_targets.py). Prefetching never changes a result.
struct Prefetch {
  static constexpr int kMaxRows = 96;
  const char* rows[kMaxRows];
  int count = 0;               // rows queued
  int first_write = kMaxRows;  // rows from this one on are fetched for writing
  int row = 0;                 // next row to fetch
  int64_t line = 0;            // next line of that row
  int64_t lines = 0;           // lines per row
  int64_t rate = 16;           // lines per step, in 1/16
  int64_t credit = 0;

  explicit Prefetch(int64_t row_floats) : lines((row_floats * 4 + 63) / 64) {}
  // Queues a row that will be read.
  void add(const float* p) {
    if (count < kMaxRows && count < first_write) rows[count++] = reinterpret_cast<const char*>(p);
  }
  // Queues a row that will be written (fetched in the exclusive state, so the stores do not wait).
  void add_write(const float* p) {
    if (count < kMaxRows) {
      if (first_write > count) first_write = count;
      rows[count++] = reinterpret_cast<const char*>(p);
    }
  }
  // Spreads the queued lines evenly over about `steps` calls of step().
  void spread_over(int64_t steps) {
    steps = std::max<int64_t>(steps, 1);
    rate = std::max<int64_t>(1, (16 * count * lines + steps - 1) / steps);
  }
  inline void issue() {
    const char* p = rows[row] + 64 * line;
    if (row < first_write) {
      _mm_prefetch(p, _MM_HINT_T1);
    } else {
      __builtin_prefetch(p, 1, 2);  // PREFETCHW (a no-op on processors without it)
    }
    if (++line == lines) {
      line = 0;
      ++row;
    }
  }
  inline void step() {
    for (credit += rate; credit >= 16 && row < count; credit -= 16) issue();
  }
  // Whatever is still queued (when the products were too short to issue it all).
  void drain() {
    while (row < count) issue();
  }
};

SA2VP_SIMD512_INLINE void pf_step(Prefetch* pf) {
  if (pf != nullptr) pf->step();
}

// ---- reductions of one row ----------------------------------------------------------------------

inline float row_sum(const float* x, int64_t C) {
  V a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(x + c));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(x + c + 16));
  }
  for (; c < C; c += 16) a0 = _mm512_add_ps(a0, load(x + c, col_mask(c, C)));
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// Mean and 1 / sqrt(variance + eps) of a row (two passes over it; the row stays in L1).
inline void row_stats(const float* x, int64_t C, float eps, float& mean, float& rstd) {
  mean = row_sum(x, C) / static_cast<float>(C);
  const V mu = set1(mean);
  V a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    const V d0 = _mm512_sub_ps(_mm512_loadu_ps(x + c), mu);
    const V d1 = _mm512_sub_ps(_mm512_loadu_ps(x + c + 16), mu);
    a0 = _mm512_fmadd_ps(d0, d0, a0);
    a1 = _mm512_fmadd_ps(d1, d1, a1);
  }
  for (; c < C; c += 16) {
    const __mmask16 m = col_mask(c, C);
    const V d = _mm512_maskz_sub_ps(m, load(x + c, m), mu);
    a0 = _mm512_fmadd_ps(d, d, a0);
  }
  const float var = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / static_cast<float>(C);
  rstd = 1.f / std::sqrt(var + eps);
}

// ---- rowdot: out[i * ldo + j] = sum_c (x[i][c] - mu[i]) * w[j * C + c] --------------------------

template <int RB, int JB, bool CENTER>
inline void rowdot_tile(const float* const* x, const float* mu, const float* w, int64_t C, float* out,
                        int64_t ldo, Prefetch* pf) {
  V acc[RB][JB];
  V muv[RB];
  SA2VP_UNROLL
  for (int i = 0; i < RB; ++i) {
    muv[i] = CENTER ? set1(mu[i]) : _mm512_setzero_ps();
    SA2VP_UNROLL
    for (int j = 0; j < JB; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < C; c += 16) {
    if (RB * JB >= 8) pf_step(pf);
    const __mmask16 m = col_mask(c, C);
    V xv[RB];
    SA2VP_UNROLL
    for (int i = 0; i < RB; ++i) {
      xv[i] = load(x[i] + c, m);
      if (CENTER) xv[i] = _mm512_maskz_sub_ps(m, xv[i], muv[i]);
    }
    SA2VP_UNROLL
    for (int j = 0; j < JB; ++j) {
      const V wv = load(w + j * C + c, m);
      SA2VP_UNROLL
      for (int i = 0; i < RB; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  SA2VP_UNROLL
  for (int i = 0; i < RB; ++i) {
    SA2VP_UNROLL
    for (int j = 0; j < JB; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

template <int RB, bool CENTER>
inline void rowdot_block(const float* const* x, const float* mu, const float* w, int64_t r, int64_t C, float* out,
                         int64_t ldo, Prefetch* pf) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) rowdot_tile<RB, 4, CENTER>(x, mu, w + j * C, C, out + j, ldo, pf);
  if (j + 2 <= r) {
    rowdot_tile<RB, 2, CENTER>(x, mu, w + j * C, C, out + j, ldo, pf);
    j += 2;
  }
  if (j < r) rowdot_tile<RB, 1, CENTER>(x, mu, w + j * C, C, out + j, ldo, pf);
}

// out (rows x r, leading dimension ldo) = (x - mu) @ w^T for rows x[0 .. rows); mu ignored unless CENTER.
// pf (optional) is stepped along the way.
template <bool CENTER>
inline void rowdot_rows(const float* const* x, const float* mu, int64_t rows, const float* w, int64_t r, int64_t C,
                        float* out, int64_t ldo, Prefetch* pf = nullptr) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    rowdot_block<4, CENTER>(x + i, CENTER ? mu + i : nullptr, w, r, C, out + i * ldo, ldo, pf);
  }
  for (; i < rows; ++i) rowdot_block<1, CENTER>(x + i, CENTER ? mu + i : nullptr, w, r, C, out + i * ldo, ldo, pf);
}

// ---- expand: epi(i, c, mask, init[c .. c+15] + sum_j h[i * ldh + j] w[j * C + c .. c+15]) ---------

// The products of a tile, written to buf (RB x CB vectors). Not inlined, so that the epilogue's
// constants never compete with the accumulators for registers.
template <int RB, int CB>
__attribute__((noinline)) void expand_tile_acc(const float* h, int64_t ldh, int64_t r, const float* w, int64_t C,
                                               const float* init, const __mmask16* m, int64_t c0, float* buf,
                                               Prefetch* pf) {
  V acc[RB][CB];
  SA2VP_UNROLL
  for (int k = 0; k < CB; ++k) {
    const V b = init != nullptr ? load(init + c0 + 16 * k, m[k]) : _mm512_setzero_ps();
    SA2VP_UNROLL
    for (int i = 0; i < RB; ++i) acc[i][k] = b;
  }
  for (int64_t j = 0; j < r; ++j) {
    if (RB * CB >= 8) pf_step(pf);
    V wv[CB];
    SA2VP_UNROLL
    for (int k = 0; k < CB; ++k) wv[k] = load(w + j * C + c0 + 16 * k, m[k]);
    SA2VP_UNROLL
    for (int i = 0; i < RB; ++i) {
      const V a = set1(h[i * ldh + j]);
      SA2VP_UNROLL
      for (int k = 0; k < CB; ++k) acc[i][k] = _mm512_fmadd_ps(a, wv[k], acc[i][k]);
    }
  }
  SA2VP_UNROLL
  for (int i = 0; i < RB; ++i) {
    SA2VP_UNROLL
    for (int k = 0; k < CB; ++k) _mm512_store_ps(buf + (i * CB + k) * 16, acc[i][k]);
  }
}

template <int RB, int CB, class Epi>
inline void expand_tile(const float* h, int64_t ldh, int64_t r, const float* w, int64_t C, const float* init,
                        int64_t i0, int64_t c0, Epi& epi, Prefetch* pf) {
  __mmask16 m[CB];
  for (int k = 0; k < CB; ++k) m[k] = col_mask(c0 + 16 * k, C);
  alignas(64) float buf[RB * CB * 16];
  expand_tile_acc<RB, CB>(h + i0 * ldh, ldh, r, w, C, init, m, c0, buf, pf);
  for (int i = 0; i < RB; ++i) {
    for (int k = 0; k < CB; ++k) epi(i0 + i, c0 + 16 * k, m[k], _mm512_load_ps(buf + (i * CB + k) * 16));
  }
}

template <int RB, class Epi>
inline void expand_block(const float* h, int64_t ldh, int64_t r, const float* w, int64_t C, const float* init,
                         int64_t i0, Epi& epi, Prefetch* pf) {
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) expand_tile<RB, 4>(h, ldh, r, w, C, init, i0, c, epi, pf);
  for (; c < C; c += 16) expand_tile<RB, 1>(h, ldh, r, w, C, init, i0, c, epi, pf);
}

// Calls epi(i, c, mask, value) for every row i < rows and every vector of columns c of
// init + h @ w (h: rows x r with leading dimension ldh; w: r x C; init: C floats or null); pf (optional)
// is stepped along the way.
template <class Epi>
inline void expand_rows(const float* h, int64_t ldh, int64_t rows, int64_t r, const float* w, int64_t C,
                        const float* init, Epi& epi, Prefetch* pf = nullptr) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) expand_block<4>(h, ldh, r, w, C, init, i, epi, pf);
  for (; i < rows; ++i) expand_block<1>(h, ldh, r, w, C, init, i, epi, pf);
}

// ---- outer: acc[j * C + c] += sum_i h[i * ldh + j] * ld(i, c, mask) ------------------------------

template <int JB, int CB, class Load>
inline void outer_tile(const float* h, int64_t ldh, int64_t rows, float* acc, int64_t C, int64_t c0,
                       const Load& ld, Prefetch* pf) {
  __mmask16 m[CB];
  V a[JB][CB];
  SA2VP_UNROLL
  for (int k = 0; k < CB; ++k) {
    m[k] = col_mask(c0 + 16 * k, C);
    SA2VP_UNROLL
    for (int j = 0; j < JB; ++j) a[j][k] = load(acc + j * C + c0 + 16 * k, m[k]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    if (JB * CB >= 8) pf_step(pf);
    V xv[CB];
    SA2VP_UNROLL
    for (int k = 0; k < CB; ++k) xv[k] = ld(i, c0 + 16 * k, m[k]);
    SA2VP_UNROLL
    for (int j = 0; j < JB; ++j) {
      const V hv = set1(h[i * ldh + j]);
      SA2VP_UNROLL
      for (int k = 0; k < CB; ++k) a[j][k] = _mm512_fmadd_ps(hv, xv[k], a[j][k]);
    }
  }
  SA2VP_UNROLL
  for (int k = 0; k < CB; ++k) {
    SA2VP_UNROLL
    for (int j = 0; j < JB; ++j) store(acc + j * C + c0 + 16 * k, m[k], a[j][k]);
  }
}

template <int JB, class Load>
inline void outer_cols(const float* h, int64_t ldh, int64_t rows, float* acc, int64_t C, const Load& ld,
                       Prefetch* pf) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) outer_tile<JB, 2>(h, ldh, rows, acc, C, c, ld, pf);
  for (; c < C; c += 16) outer_tile<JB, 1>(h, ldh, rows, acc, C, c, ld, pf);
}

// acc (r x C) += h^T @ X for rows i < rows, X's vectors given by ld(i, c, mask) (zero where masked);
// pf (optional) is stepped along the way.
template <class Load>
inline void outer_rows(const float* h, int64_t ldh, int64_t rows, int64_t r, float* acc, int64_t C,
                       const Load& ld, Prefetch* pf = nullptr) {
  int64_t j = 0;
  for (; j + 8 <= r; j += 8) outer_cols<8>(h + j, ldh, rows, acc + j * C, C, ld, pf);
  if (j + 4 <= r) {
    outer_cols<4>(h + j, ldh, rows, acc + j * C, C, ld, pf);
    j += 4;
  }
  if (j + 2 <= r) {
    outer_cols<2>(h + j, ldh, rows, acc + j * C, C, ld, pf);
    j += 2;
  }
  if (j < r) outer_cols<1>(h + j, ldh, rows, acc + j * C, C, ld, pf);
}

// Loads the rows of a row-major matrix.
struct PlainRows {
  const float* data;
  int64_t ld;
  V operator()(int64_t i, int64_t c, __mmask16 m) const { return load(data + i * ld + c, m); }
};

}  // namespace
}  // namespace simd512
}  // namespace sa2vp

#undef SA2VP_UNROLL
SA2VP_SIMD512_END

#endif
