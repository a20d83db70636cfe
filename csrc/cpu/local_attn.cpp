// CPU kernels of the spatially aligned local cross attention (ops local_attn_fwd, local_attn_bwd).
//
// Tokens are (B, H, N, D) with N = P + gh * gw: P prefix tokens, then the grid in row-major order.
// A prefix query attends to all N keys; a grid query at (y, x) to the grid keys (y + dy, x + dx),
// |dy|, |dx| <= window / 2. Out-of-grid neighbours are dropped ("clip") or count as score 0 and
// value 0 ("zero" border).
//
// Work is split over tasks (batch, head, item), an item being one prefix token or one grid row: the
// gw queries of a grid row share the `window` rows of keys around them, which stay in cache.
//
// The backward pass works from the saved log-sum-exp, like flash attention, in two passes:
//  1. query-centric: every query stores, per neighbour, its softmax weight p_ij and its scaled score
//     gradient scale * p_ij * (dO_i . v_j - dO_i . O_i), and accumulates dq_i;
//  2. key-centric: every key gathers dk_j and dv_j from the stored values of the queries that see it
//     (the prefix queries and, for a grid key, the window of grid queries around it).
// Every output row is written by exactly one task in a fixed order: the results are deterministic
// and do not depend on the number of threads.
//
// The loops are written once over a small SIMD wrapper (GCC/Clang vector extensions) and compiled
// for the baseline ISA and, on x86-64, also for AVX2 + FMA, chosen at run time (cpu/isa.h;
// SA2VP_CPU_ISA=generic forces the baseline version).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/isa.h"

#if defined(__GNUC__) || defined(__clang__)
#define SA2VP_ALWAYS_INLINE inline __attribute__((always_inline))
#define SA2VP_VECTOR_EXT 1
#if defined(__x86_64__) || defined(__i386__)
#define SA2VP_X86_AVX2 1
#endif
#else
#define SA2VP_ALWAYS_INLINE inline
#endif

namespace sa2vp {
namespace {

// ---- SIMD wrapper -------------------------------------------------------------------------------

#if defined(SA2VP_VECTOR_EXT)
template <typename T, int kBytes>
struct Simd {
  typedef T Vec __attribute__((vector_size(kBytes)));
  static constexpr int64_t kLanes = kBytes / static_cast<int>(sizeof(T));
  static SA2VP_ALWAYS_INLINE Vec zero() { return Vec{}; }
  static SA2VP_ALWAYS_INLINE Vec splat(T x) { return Vec{} + x; }
  static SA2VP_ALWAYS_INLINE Vec load(const T* p) {
    Vec v;
    __builtin_memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static SA2VP_ALWAYS_INLINE void store(T* p, const Vec& v) { __builtin_memcpy(p, &v, sizeof(Vec)); }
  static SA2VP_ALWAYS_INLINE T sum(const Vec& v) {
    T s = v[0];
    for (int64_t i = 1; i < kLanes; ++i) s += v[i];
    return s;
  }
};
#else
template <typename T, int kBytes>
struct Simd {  // scalar fallback for compilers without vector extensions
  using Vec = T;
  static constexpr int64_t kLanes = 1;
  static SA2VP_ALWAYS_INLINE Vec zero() { return T(0); }
  static SA2VP_ALWAYS_INLINE Vec splat(T x) { return x; }
  static SA2VP_ALWAYS_INLINE Vec load(const T* p) { return *p; }
  static SA2VP_ALWAYS_INLINE void store(T* p, Vec v) { *p = v; }
  static SA2VP_ALWAYS_INLINE T sum(Vec v) { return v; }
};
#endif

// a . b over n elements.
template <class S, typename T>
SA2VP_ALWAYS_INLINE T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t L = S::kLanes;
  auto acc0 = S::zero(), acc1 = S::zero(), acc2 = S::zero(), acc3 = S::zero();
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    acc0 += S::load(a + i) * S::load(b + i);
    acc1 += S::load(a + i + L) * S::load(b + i + L);
    acc2 += S::load(a + i + 2 * L) * S::load(b + i + 2 * L);
    acc3 += S::load(a + i + 3 * L) * S::load(b + i + 3 * L);
  }
  for (; i + L <= n; i += L) acc0 += S::load(a + i) * S::load(b + i);
  T s = S::sum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// o[0..D) = post * sum_c w[c] * rows[c][0..D), the sum over c in order for every element. The sums
// stay in registers block by block of columns, so o is written once instead of once per row.
template <class S, typename T>
SA2VP_ALWAYS_INLINE void weighted_rows(T* o, const T* w, const T* const* rows, int64_t n, int64_t D, T post) {
  constexpr int64_t L = S::kLanes;
  constexpr int kBlock = 8;  // vectors per column block
  const auto vpost = S::splat(post);
  int64_t d = 0;
  for (; d + kBlock * L <= D; d += kBlock * L) {
    typename S::Vec acc[kBlock];
    for (int k = 0; k < kBlock; ++k) acc[k] = S::zero();
    for (int64_t c = 0; c < n; ++c) {
      const auto wc = S::splat(w[c]);
      const T* r = rows[c] + d;
      for (int k = 0; k < kBlock; ++k) acc[k] += wc * S::load(r + k * L);
    }
    for (int k = 0; k < kBlock; ++k) S::store(o + d + k * L, acc[k] * vpost);
  }
  for (; d + L <= D; d += L) {
    auto acc = S::zero();
    for (int64_t c = 0; c < n; ++c) acc += S::splat(w[c]) * S::load(rows[c] + d);
    S::store(o + d, acc * vpost);
  }
  for (; d < D; ++d) {
    T acc = T(0);
    for (int64_t c = 0; c < n; ++c) acc += w[c] * rows[c][d];
    o[d] = acc * post;
  }
}

// ---- problem description ------------------------------------------------------------------------

// Read-only view of a (B, H, N, D) tensor whose last dimension is contiguous.
template <typename T>
struct Tokens {
  const T* data;
  int64_t sb, sh, sn;
  SA2VP_ALWAYS_INLINE const T* row(int64_t b, int64_t h, int64_t n) const {
    return data + b * sb + h * sh + n * sn;
  }
};

template <typename T>
Tokens<T> tokens(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// A tensor whose last dimension is contiguous (copied only when it is not).
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(3) == 1 || t.stride(3) == 1) ? t : t.contiguous();
}

struct Geometry {
  int64_t B, H, N, D;
  int64_t gh, gw, rad, prefix;
  bool zero_border;
  double pads_full;  // window * window: neighbours of a grid query, pads included
  // Window radii clamped to the grid (farther neighbours are always outside it) and the number of
  // stored neighbour slots of a grid query in the backward pass.
  int64_t ry, rx, slots;

  Geometry(const at::Tensor& q, int64_t grid_h, int64_t grid_w, int64_t window, int64_t num_prefix,
           bool zero)
      : B(q.size(0)), H(q.size(1)), N(q.size(2)), D(q.size(3)), gh(grid_h), gw(grid_w),
        rad(window / 2), prefix(num_prefix), zero_border(zero),
        pads_full(static_cast<double>(window) * static_cast<double>(window)),
        ry(std::min(window / 2, grid_h - 1)), rx(std::min(window / 2, grid_w - 1)),
        slots((2 * ry + 1) * (2 * rx + 1)) {}

  int64_t items_per_head() const { return prefix + gh; }
  int64_t tasks() const { return B * H * items_per_head(); }
  // Stored (p, ds) values per (batch, head): P x N for prefix queries, G x slots for grid queries.
  int64_t pair_values() const { return prefix * N + gh * gw * slots; }
  // Number of zero-border pads of a query that sees `valid` in-grid neighbours.
  double pads(int64_t valid) const { return zero_border ? pads_full - static_cast<double>(valid) : 0.0; }
};

// Grain of at::parallel_for: tasks per chunk so that a chunk does at least ~64k multiply-adds.
int64_t grain(const Geometry& g) {
  const int64_t per_task = std::max<int64_t>(1, g.gw * (2 * g.ry + 1) * (2 * g.rx + 1) * g.D);
  return std::max<int64_t>(1, (int64_t{1} << 16) / per_task);
}


// In-grid window neighbours of the grid query (y, x): their token indices and, when `slot` is not
// null, their slots (dy + ry) * (2 rx + 1) + (dx + rx) in the stored backward values. Returns the count.
SA2VP_ALWAYS_INLINE int64_t grid_neighbours(const Geometry& g, int64_t y, int64_t x, int64_t* key,
                                            int64_t* slot) {
  const int64_t y0 = std::max<int64_t>(0, y - g.rad), y1 = std::min(g.gh - 1, y + g.rad);
  const int64_t x0 = std::max<int64_t>(0, x - g.rad), x1 = std::min(g.gw - 1, x + g.rad);
  int64_t n = 0;
  for (int64_t yy = y0; yy <= y1; ++yy) {
    for (int64_t xx = x0; xx <= x1; ++xx, ++n) {
      key[n] = g.prefix + yy * g.gw + xx;
      if (slot != nullptr) slot[n] = (yy - y + g.ry) * (2 * g.rx + 1) + (xx - x + g.rx);
    }
  }
  return n;
}

// ---- forward ------------------------------------------------------------------------------------

template <typename T>
struct FwdArgs {
  Geometry g;
  T scale;
  Tokens<T> q, k, v;
  T* out;  // contiguous (B, H, N, D)
  T* lse;  // contiguous (B, H, N)
};

// Attention of query i over the n keys key[0..n): writes out row i and returns its log-sum-exp.
// `pads` zero-border neighbours count as score 0 with value 0. `s` and `rows` are scratch of n entries.
template <class S, typename T>
SA2VP_ALWAYS_INLINE T fwd_query(const FwdArgs<T>& a, int64_t b, int64_t h, int64_t i,
                                const int64_t* key, int64_t n, double pads, T* s, const T** rows) {
  const int64_t D = a.g.D;
  const T* qi = a.q.row(b, h, i);
  T m = pads > 0 ? T(0) : -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    s[c] = a.scale * dot<S>(qi, a.k.row(b, h, key[c]), D);
    m = std::max(m, s[c]);
  }
  T l = pads > 0 ? static_cast<T>(pads) * std::exp(-m) : T(0);
  for (int64_t c = 0; c < n; ++c) {
    s[c] = std::exp(s[c] - m);
    l += s[c];
  }
  T* o = a.out + ((b * a.g.H + h) * a.g.N + i) * D;
  for (int64_t c = 0; c < n; ++c) rows[c] = a.v.row(b, h, key[c]);
  weighted_rows<S>(o, s, rows, n, D, T(1) / l);
  return m + std::log(l);
}

template <class S, typename T>
SA2VP_ALWAYS_INLINE void fwd_tasks(const FwdArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  std::vector<T> s(static_cast<size_t>(std::max(g.N, g.slots)));
  std::vector<int64_t> key(static_cast<size_t>(std::max(g.N, g.slots)));
  std::vector<const T*> rows(static_cast<size_t>(std::max(g.N, g.slots)));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / g.items_per_head(), item = task % g.items_per_head();
    const int64_t b = bh / g.H, h = bh % g.H;
    T* lse = a.lse + bh * g.N;
    if (item < g.prefix) {  // a prefix query attends to every key
      for (int64_t j = 0; j < g.N; ++j) key[j] = j;
      lse[item] = fwd_query<S>(a, b, h, item, key.data(), g.N, 0.0, s.data(), rows.data());
      continue;
    }
    const int64_t y = item - g.prefix;
    for (int64_t x = 0; x < g.gw; ++x) {
      const int64_t n = grid_neighbours(g, y, x, key.data(), nullptr);
      const int64_t i = g.prefix + y * g.gw + x;
      lse[i] = fwd_query<S>(a, b, h, i, key.data(), n, g.pads(n), s.data(), rows.data());
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------

template <typename T>
struct BwdArgs {
  Geometry g;
  T scale;
  Tokens<T> q, k, v, out, dout;
  const T* lse;  // contiguous (B, H, N)
  T* dq;         // contiguous (B, H, N, D), likewise dk and dv
  T* dk;
  T* dv;
  // Per (batch, head) g.pair_values() entries each: the softmax weight p and the scaled score
  // gradient ds of every (query, visible key) pair. Prefix query i and key j at i * N + j; grid
  // query t (0-based within the grid) and its neighbour slot at P * N + t * slots + slot.
  T* p;
  T* ds;
};

// Pass 1 for query i over the n keys key[0..n): stores p_ij and ds_ij = scale * p_ij *
// (dO_i . v_j - dO_i . O_i) at p[at[c]], ds[at[c]] (at == null: at c) and writes dq_i = sum_j ds_ij k_j.
// w and rows are scratch of n entries.
template <class S, typename T>
SA2VP_ALWAYS_INLINE void bwd_query(const BwdArgs<T>& a, int64_t b, int64_t h, int64_t i,
                                   const int64_t* key, const int64_t* at, int64_t n, T* p, T* ds, T* w,
                                   const T** rows) {
  const int64_t D = a.g.D;
  const int64_t row = (b * a.g.H + h) * a.g.N + i;
  const T* qi = a.q.row(b, h, i);
  const T* doi = a.dout.row(b, h, i);
  const T delta = dot<S>(doi, a.out.row(b, h, i), D);
  const T lse = a.lse[row];
  T* dqi = a.dq + row * D;
  for (int64_t c = 0; c < n; ++c) {
    const T* kj = a.k.row(b, h, key[c]);
    const T pij = std::exp(a.scale * dot<S>(qi, kj, D) - lse);
    const T dsij = a.scale * pij * (dot<S>(doi, a.v.row(b, h, key[c]), D) - delta);
    const int64_t o = at != nullptr ? at[c] : c;
    p[o] = pij;
    ds[o] = dsij;
    w[c] = dsij;
    rows[c] = kj;
  }
  weighted_rows<S>(dqi, w, rows, n, D, T(1));
}

template <class S, typename T>
SA2VP_ALWAYS_INLINE void bwd_query_tasks(const BwdArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  std::vector<int64_t> key(static_cast<size_t>(std::max(g.N, g.slots)));
  std::vector<int64_t> slot(static_cast<size_t>(g.slots));
  std::vector<T> w(static_cast<size_t>(std::max(g.N, g.slots)));
  std::vector<const T*> rows(static_cast<size_t>(std::max(g.N, g.slots)));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / g.items_per_head(), item = task % g.items_per_head();
    const int64_t b = bh / g.H, h = bh % g.H;
    T* p = a.p + bh * g.pair_values();
    T* ds = a.ds + bh * g.pair_values();
    if (item < g.prefix) {
      for (int64_t j = 0; j < g.N; ++j) key[j] = j;
      bwd_query<S>(a, b, h, item, key.data(), nullptr, g.N, p + item * g.N, ds + item * g.N, w.data(),
                   rows.data());
      continue;
    }
    const int64_t y = item - g.prefix;
    for (int64_t x = 0; x < g.gw; ++x) {
      const int64_t n = grid_neighbours(g, y, x, key.data(), slot.data());
      const int64_t t = y * g.gw + x;
      const int64_t at = g.prefix * g.N + t * g.slots;
      bwd_query<S>(a, b, h, g.prefix + t, key.data(), slot.data(), n, p + at, ds + at, w.data(), rows.data());
    }
  }
}

// Pass 2 for key j: dk_j = sum_i ds_ij q_i and dv_j = sum_i p_ij dO_i over the prefix queries and,
// for a grid key, the grid queries whose window holds it (in that order). `scratch` holds the weights
// and rows of up to P + slots queries.
template <typename T>
struct KeyScratch {
  std::vector<T> wp, wds;
  std::vector<const T*> rdo, rq;
  explicit KeyScratch(size_t n) : wp(n), wds(n), rdo(n), rq(n) {}
};

template <class S, typename T>
SA2VP_ALWAYS_INLINE void bwd_key(const BwdArgs<T>& a, int64_t b, int64_t h, int64_t j, KeyScratch<T>& sc) {
  const Geometry& g = a.g;
  const int64_t D = g.D, bh = b * g.H + h;
  const T* p = a.p + bh * g.pair_values();
  const T* ds = a.ds + bh * g.pair_values();
  T* dkj = a.dk + (bh * g.N + j) * D;
  T* dvj = a.dv + (bh * g.N + j) * D;
  int64_t n = 0;
  auto add = [&](int64_t i, int64_t at) {
    sc.wp[n] = p[at];
    sc.wds[n] = ds[at];
    sc.rdo[n] = a.dout.row(b, h, i);
    sc.rq[n] = a.q.row(b, h, i);
    ++n;
  };
  for (int64_t i = 0; i < g.prefix; ++i) add(i, i * g.N + j);
  if (j >= g.prefix) {
    const int64_t ky = (j - g.prefix) / g.gw, kx = (j - g.prefix) % g.gw;
    const int64_t y0 = std::max<int64_t>(0, ky - g.rad), y1 = std::min(g.gh - 1, ky + g.rad);
    const int64_t x0 = std::max<int64_t>(0, kx - g.rad), x1 = std::min(g.gw - 1, kx + g.rad);
    for (int64_t qy = y0; qy <= y1; ++qy) {
      for (int64_t qx = x0; qx <= x1; ++qx) {
        // Query (qy, qx) sees this key at offset (ky - qy, kx - qx).
        const int64_t t = qy * g.gw + qx;
        add(g.prefix + t, g.prefix * g.N + t * g.slots + (ky - qy + g.ry) * (2 * g.rx + 1) + (kx - qx + g.rx));
      }
    }
  }
  weighted_rows<S>(dvj, sc.wp.data(), sc.rdo.data(), n, D, T(1));
  weighted_rows<S>(dkj, sc.wds.data(), sc.rq.data(), n, D, T(1));
}

template <class S, typename T>
SA2VP_ALWAYS_INLINE void bwd_key_tasks(const BwdArgs<T>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  KeyScratch<T> sc(static_cast<size_t>(g.prefix + g.slots));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / g.items_per_head(), item = task % g.items_per_head();
    const int64_t b = bh / g.H, h = bh % g.H;
    if (item < g.prefix) {
      bwd_key<S>(a, b, h, item, sc);
      continue;
    }
    const int64_t first = g.prefix + (item - g.prefix) * g.gw;
    for (int64_t j = first; j < first + g.gw; ++j) bwd_key<S>(a, b, h, j, sc);
  }
}

// ---- instruction-set variants -------------------------------------------------------------------

template <typename T>
using TaskFn = void (*)(const T&, int64_t, int64_t);

#define SA2VP_BASELINE_VARIANT(name, Args)                                          \
  template <typename T>                                                             \
  void name##_baseline(const Args<T>& a, int64_t begin, int64_t end) {              \
    name<Simd<T, 16>>(a, begin, end);                                               \
  }
SA2VP_BASELINE_VARIANT(fwd_tasks, FwdArgs)
SA2VP_BASELINE_VARIANT(bwd_query_tasks, BwdArgs)
SA2VP_BASELINE_VARIANT(bwd_key_tasks, BwdArgs)
#undef SA2VP_BASELINE_VARIANT

#if defined(SA2VP_X86_AVX2)
#define SA2VP_AVX2_VARIANT(name, Args)                                                            \
  template <typename T>                                                                           \
  __attribute__((target("avx2,fma"))) void name##_avx2(const Args<T>& a, int64_t begin, int64_t end) { \
    name<Simd<T, 32>>(a, begin, end);                                                             \
  }
SA2VP_AVX2_VARIANT(fwd_tasks, FwdArgs)
SA2VP_AVX2_VARIANT(bwd_query_tasks, BwdArgs)
SA2VP_AVX2_VARIANT(bwd_key_tasks, BwdArgs)
#undef SA2VP_AVX2_VARIANT
#endif

// Runs fn over all tasks of the geometry with at::parallel_for.
template <class Args>
void run_tasks(const Args& a, TaskFn<Args> baseline, TaskFn<Args> avx2) {
  const bool use_avx2 = avx2 != nullptr && static_cast<int>(cpu_isa()) >= static_cast<int>(CpuIsa::kAvx2);
  const TaskFn<Args> fn = use_avx2 ? avx2 : baseline;
  at::parallel_for(0, a.g.tasks(), grain(a.g), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

#if defined(SA2VP_X86_AVX2)
#define SA2VP_VARIANTS(name, T) name##_baseline<T>, name##_avx2<T>
#else
#define SA2VP_VARIANTS(name, T) name##_baseline<T>, nullptr
#endif

// ---- operators ----------------------------------------------------------------------------------

void check_cpu_dtype(const at::Tensor& q, const char* op) {
  SA2VP_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              " (CPU): q, k and v must be float32 or float64, got ", q.scalar_type());
}

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> local_attn_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, int64_t grid_h,
                                                      int64_t grid_w, int64_t window, int64_t num_prefix,
                                                      bool zero_border, double scale) {
  check_local_attn_args(q_in, k_in, v_in, grid_h, grid_w, window, num_prefix);
  check_cpu_dtype(q_in, "local_attn_fwd");
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const Geometry g(q, grid_h, grid_w, window, num_prefix, zero_border);
  at::Tensor out = at::empty({g.B, g.H, g.N, g.D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({g.B, g.H, g.N}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attn_fwd_cpu", [&] {
    const FwdArgs<scalar_t> a{g, static_cast<scalar_t>(scale), tokens<scalar_t>(q), tokens<scalar_t>(k),
                              tokens<scalar_t>(v), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>()};
    run_tasks(a, SA2VP_VARIANTS(fwd_tasks, scalar_t));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attn_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t grid_h, int64_t grid_w, int64_t window,
    int64_t num_prefix, bool zero_border, double scale) {
  check_local_attn_args(q_in, k_in, v_in, grid_h, grid_w, window, num_prefix);
  check_cpu_dtype(q_in, "local_attn_bwd");
  SA2VP_CHECK(grad_out_in.sizes() == q_in.sizes(), "local_attn_bwd: grad_out must have the shape of q ",
              q_in.sizes(), ", got ", grad_out_in.sizes());
  SA2VP_CHECK(out_in.sizes() == q_in.sizes(), "local_attn_bwd: out must have the shape of q ", q_in.sizes(),
              ", got ", out_in.sizes());
  SA2VP_CHECK(grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "local_attn_bwd: grad_out and out must have the dtype of q (", q_in.scalar_type(), "), got ",
              grad_out_in.scalar_type(), " and ", out_in.scalar_type());
  SA2VP_CHECK(grad_out_in.device() == q_in.device() && out_in.device() == q_in.device() &&
                  lse_in.device() == q_in.device(),
              "local_attn_bwd: grad_out, out and lse must be on the device of q");
  SA2VP_CHECK(lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) && lse_in.size(1) == q_in.size(1) &&
                  lse_in.size(2) == q_in.size(2),
              "local_attn_bwd: lse must have shape (B, heads, N) = ", q_in.sizes().slice(0, 3), ", got ",
              lse_in.sizes());
  SA2VP_CHECK(lse_in.scalar_type() == lse_dtype(q_in), "local_attn_bwd: lse must have dtype ",
              lse_dtype(q_in), " for ", q_in.scalar_type(), " inputs, got ", lse_in.scalar_type());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in), out = last_dim_contiguous(out_in),
                   dout = last_dim_contiguous(grad_out_in), lse = lse_in.contiguous();
  const Geometry g(q, grid_h, grid_w, window, num_prefix, zero_border);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty({g.B, g.H, g.N, g.D}, opts);
  at::Tensor dk = at::empty({g.B, g.H, g.N, g.D}, opts);
  at::Tensor dv = at::empty({g.B, g.H, g.N, g.D}, opts);
  if (dq.numel() == 0) return {dq, dk, dv};
  at::Tensor pairs = at::empty({2, g.B * g.H * g.pair_values()}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attn_bwd_cpu", [&] {
    const BwdArgs<scalar_t> a{g,
                              static_cast<scalar_t>(scale),
                              tokens<scalar_t>(q),
                              tokens<scalar_t>(k),
                              tokens<scalar_t>(v),
                              tokens<scalar_t>(out),
                              tokens<scalar_t>(dout),
                              lse.data_ptr<scalar_t>(),
                              dq.data_ptr<scalar_t>(),
                              dk.data_ptr<scalar_t>(),
                              dv.data_ptr<scalar_t>(),
                              pairs[0].data_ptr<scalar_t>(),
                              pairs[1].data_ptr<scalar_t>()};
    run_tasks(a, SA2VP_VARIANTS(bwd_query_tasks, scalar_t));
    run_tasks(a, SA2VP_VARIANTS(bwd_key_tasks, scalar_t));
  });
  return {dq, dk, dv};
}

#undef SA2VP_VARIANTS

}  // namespace
}  // namespace sa2vp

TORCH_LIBRARY_IMPL(sa2vp_kernels, CPU, m) {
  m.impl("local_attn_fwd", &sa2vp::local_attn_fwd_cpu);
  m.impl("local_attn_bwd", &sa2vp::local_attn_bwd_cpu);
}
