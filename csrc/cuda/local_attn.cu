// CUDA kernels of the spatially aligned local cross attention (ops local_attn_fwd / local_attn_bwd,
// schemas in csrc/ops.cpp).
//
// Tokens: q, k, v are (B, H, N, D) with N = P + gh * gw: P prefix tokens, then the grid row-major.
// A prefix query attends to all N keys; a grid query at (y, x) to the grid keys (y + dy, x + dx),
// |dy|, |dx| <= window / 2. Border "clip" skips out-of-grid neighbours; border "zero" counts each of
// them as score 0 with value 0, i.e. one extra softmax term exp(0) of multiplicity
// window^2 - (in-grid neighbours), which starts the softmax instead of being visited.
//
// Work split. A *group* of G lanes of one warp (G a power of two <= 32) owns one row of D features:
// lane l holds the 16-byte vectors v0 + i * G + l (i < VPL) of the row, so a group reads a row with
// coalesced 16-byte loads and reduces dot products with G-lane shuffles.
//
//   forward   grid query   -> one group, online softmax over its clipped window.
//             prefix query -> one block; its groups share out the N keys and their softmax states are
//                             merged in a fixed order. Prefix blocks come first in the same launch, so
//                             these long programs overlap with the grid queries.
//   backward  delta_i = dO_i . O_i                          one group per query
//             dq: grid query -> one group over its window; prefix query -> one block over all keys
//             dk, dv: one group per key gathering every query that sees it (a grid key: the grid
//             queries in the window around it and all prefix queries; a prefix key: the prefix
//             queries), so every sum runs in a fixed order without atomics: bitwise deterministic.
//
// A row wider than one group's registers (G * VPL vectors) is handled in slabs of G * VPL vectors;
// scores are then recomputed from full-row dot products for every slab (slower, very wide heads only).
// Head dims that are not a multiple of the vector width and misaligned views are first copied into
// zero-padded contiguous buffers: zero features change no score, and the padding is cut off again.
// Softmax and accumulation run in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>

#include "checks.h"

namespace sa2vp {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <class T>
struct Traits {
  using acc = float;
  static constexpr int vec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector
  // Vectors per lane kept in registers: 32 accumulator floats (16 doubles) per row and lane.
  static constexpr int max_vpl = sizeof(T) == 2 ? 4 : 8;
};
template <>
struct Traits<double> {
  using acc = double;
  static constexpr int vec = 2;
  static constexpr int max_vpl = 8;
};

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float fexp(float x) { return expf(x); }
__device__ __forceinline__ double fexp(double x) { return exp(x); }
__device__ __forceinline__ float flog(float x) { return logf(x); }
__device__ __forceinline__ double flog(double x) { return log(x); }

template <class A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// exp(m - mm) for merging a softmax state of running max m into one of max mm >= m; an empty state
// (m = -inf) gets weight 0, also when mm is -inf too.
template <class A>
__device__ __forceinline__ A merge_weight(A m, A mm) {
  return m == neg_inf<A>() ? A(0) : fexp(m - mm);
}

// ---------------------------------------------------------------------------------------------------
// Rows, groups and register fragments
// ---------------------------------------------------------------------------------------------------

// A (B, H, N, D) tensor read through its strides (in elements); the D features of a row are contiguous.
template <class T>
struct Rows {
  const T* ptr;
  int64_t sb, sh, sn;
  __device__ __forceinline__ const T* row(int b, int h, int n) const {
    return ptr + b * sb + h * sh + n * sn;
  }
};

struct Geometry {
  int B, H, N;     // batch, heads, tokens
  int P;           // prefix tokens
  int gh, gw;      // grid
  int radius;      // window / 2, clamped to the grid size (the clipped window is the same)
  int nv;          // 16-byte vectors per row
  int row_len;     // nv * vector width: the (padded) head dim of the contiguous outputs
  int log2g;       // lanes per group = 1 << log2g
  int nslabs;      // slabs of G * VPL vectors per row (1: the row lives in registers)
};

struct Group {
  int size;       // lanes in the group
  int lane;       // lane inside the group
  unsigned mask;  // the group's lanes within the warp
};

__device__ __forceinline__ Group make_group(int log2g) {
  Group g;
  g.size = 1 << log2g;
  g.lane = static_cast<int>(threadIdx.x) & (g.size - 1);
  const int first = (static_cast<int>(threadIdx.x) & 31) & ~(g.size - 1);
  g.mask = g.size == 32 ? kFullMask : ((1u << g.size) - 1u) << first;
  return g;
}

// Butterfly sum over the group's lanes; every lane gets the same (bitwise) total.
template <class A>
__device__ __forceinline__ A group_sum(A x, const Group& g) {
  for (int off = g.size >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(g.mask, x, off);
  return x;
}

template <class A>
__device__ __forceinline__ void group_sum2(A& x, A& y, const Group& g) {
  for (int off = g.size >> 1; off > 0; off >>= 1) {
    x += __shfl_xor_sync(g.mask, x, off);
    y += __shfl_xor_sync(g.mask, y, off);
  }
}

template <class T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <class T, int N>
__device__ __forceinline__ Pack<T, N> zero_pack() {
  Pack<T, N> z;
#pragma unroll
  for (int e = 0; e < N; ++e) z.v[e] = static_cast<T>(0.0f);
  return z;
}

// The lane's vectors v0 + i * G + lane (i < VPL) of a row; vectors past the row end read as zero.
template <int VPL, class T, int N>
__device__ __forceinline__ void load_row(Pack<T, N> (&r)[VPL], const T* row, int v0, int nv,
                                         const Group& g) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int vi = v0 + i * g.size + g.lane;
    if (vi < nv) {
      r[i] = load_pack<T, N>(row + static_cast<int64_t>(vi) * N);
    } else {
      r[i] = zero_pack<T, N>();
    }
  }
}

template <int VPL, class T, int N, class A>
__device__ __forceinline__ void load_row_acc(A (&f)[VPL][N], const T* row, int v0, int nv,
                                             const Group& g) {
  Pack<T, N> r[VPL];
  load_row(r, row, v0, nv, g);
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
#pragma unroll
    for (int e = 0; e < N; ++e) f[i][e] = static_cast<A>(r[i].v[e]);
  }
}

template <int VPL, int N, class A>
__device__ __forceinline__ void zero_frag(A (&f)[VPL][N]) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
#pragma unroll
    for (int e = 0; e < N; ++e) f[i][e] = A(0);
  }
}

template <int VPL, int N, class A>
__device__ __forceinline__ void scale_frag(A (&f)[VPL][N], A a) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
#pragma unroll
    for (int e = 0; e < N; ++e) f[i][e] *= a;
  }
}

// The lane's part of a . b (sum it over the group with group_sum).
template <int VPL, class A, class T, int N>
__device__ __forceinline__ A dot_frag(const A (&a)[VPL][N], const Pack<T, N> (&b)[VPL]) {
  A s = A(0);
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
#pragma unroll
    for (int e = 0; e < N; ++e) s += a[i][e] * static_cast<A>(b[i].v[e]);
  }
  return s;
}

// f += c * b
template <int VPL, class A, class T, int N>
__device__ __forceinline__ void axpy_frag(A (&f)[VPL][N], A c, const Pack<T, N> (&b)[VPL]) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
#pragma unroll
    for (int e = 0; e < N; ++e) f[i][e] += c * static_cast<A>(b[i].v[e]);
  }
}

// a = a_next, b = b_next (the prefetching loops' rows, once the current ones are processed).
template <int VPL, class T, int N>
__device__ __forceinline__ void shift_rows(Pack<T, N> (&a)[VPL], const Pack<T, N> (&a_next)[VPL],
                                           Pack<T, N> (&b)[VPL], const Pack<T, N> (&b_next)[VPL]) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    a[i] = a_next[i];
    b[i] = b_next[i];
  }
}

// One key of an online softmax: running max m, sum l and weighted value sum acc take score s and
// value row vr.
template <int VPL, class A, class T, int N>
__device__ __forceinline__ void online_softmax_step(A& m, A& l, A (&acc)[VPL][N], A s, const Pack<T, N> (&vr)[VPL]) {
  if (s > m) {
    const A a = fexp(m - s);
    l *= a;
    scale_frag(acc, a);
    m = s;
  }
  const A e = fexp(s - m);
  l += e;
  axpy_frag(acc, e, vr);
}

// Writes mul * f to the lane's vectors of a contiguous output row.
template <int VPL, class T, int N, class A>
__device__ __forceinline__ void store_row(T* row, const A (&f)[VPL][N], A mul, int v0, int nv,
                                          const Group& g) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int vi = v0 + i * g.size + g.lane;
    if (vi < nv) {
      Pack<T, N> o;
#pragma unroll
      for (int e = 0; e < N; ++e) o.v[e] = static_cast<T>(f[i][e] * mul);
      *reinterpret_cast<Pack<T, N>*>(row + static_cast<int64_t>(vi) * N) = o;
    }
  }
}

// Full-row dot products a . b (and c . d) read from memory, summed over the group (slab mode).
template <class A, class T, int N>
__device__ __forceinline__ A dot_rows(const T* a, const T* b, int nv, const Group& g) {
  A s = A(0);
  for (int vi = g.lane; vi < nv; vi += g.size) {
    const Pack<T, N> pa = load_pack<T, N>(a + static_cast<int64_t>(vi) * N);
    const Pack<T, N> pb = load_pack<T, N>(b + static_cast<int64_t>(vi) * N);
#pragma unroll
    for (int e = 0; e < N; ++e) s += static_cast<A>(pa.v[e]) * static_cast<A>(pb.v[e]);
  }
  return group_sum(s, g);
}

template <class A, class T, int N>
__device__ __forceinline__ void dot2_rows(A& s, A& t, const T* a, const T* b, const T* c,
                                          const T* d, int nv, const Group& g) {
  s = A(0);
  t = A(0);
  for (int vi = g.lane; vi < nv; vi += g.size) {
    const int64_t o = static_cast<int64_t>(vi) * N;
    const Pack<T, N> pa = load_pack<T, N>(a + o);
    const Pack<T, N> pb = load_pack<T, N>(b + o);
    const Pack<T, N> pc = load_pack<T, N>(c + o);
    const Pack<T, N> pd = load_pack<T, N>(d + o);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      s += static_cast<A>(pa.v[e]) * static_cast<A>(pb.v[e]);
      t += static_cast<A>(pc.v[e]) * static_cast<A>(pd.v[e]);
    }
  }
  group_sum2(s, t, g);
}

// ---------------------------------------------------------------------------------------------------
// Block-wide merges of per-group partial results (prefix queries). Every thread of the block calls
// them; the result lands in the first group of warp 0 (threads 0 .. G-1). Shared memory layout:
// [0] m, [1] l, [2] free for the caller, [3 + (i * N + e) * 32 + lane] fragments.
// ---------------------------------------------------------------------------------------------------

template <int VPL, int N>
__host__ __device__ constexpr int smem_size() {
  return 3 + VPL * N * 32;
}

template <class A>
__device__ __forceinline__ void merge_state(A& m, A& l, A m2, A l2, A& a, A& b) {
  const A mm = m2 > m ? m2 : m;
  a = merge_weight(m, mm);
  b = merge_weight(m2, mm);
  l = l * a + l2 * b;
  m = mm;
}

// Merges online-softmax states (running max m, sum l, weighted value sum f).
template <int VPL, int N, class A>
__device__ void block_merge_softmax(A& m, A& l, A (&f)[VPL][N], const Group& g, A* smem) {
  for (int off = g.size; off < 32; off <<= 1) {
    const A m2 = __shfl_xor_sync(kFullMask, m, off);
    const A l2 = __shfl_xor_sync(kFullMask, l, off);
    A a, b;
    merge_state(m, l, m2, l2, a, b);
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A f2 = __shfl_xor_sync(kFullMask, f[i][e], off);
        f[i][e] = f[i][e] * a + f2 * b;
      }
    }
  }
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  for (int w = 1; w < kWarps; ++w) {
    if (warp == w && lane < g.size) {
      if (lane == 0) {
        smem[0] = m;
        smem[1] = l;
      }
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
#pragma unroll
        for (int e = 0; e < N; ++e) smem[3 + (i * N + e) * 32 + lane] = f[i][e];
      }
    }
    __syncthreads();
    if (warp == 0 && lane < g.size) {
      A a, b;
      merge_state(m, l, smem[0], smem[1], a, b);
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
#pragma unroll
        for (int e = 0; e < N; ++e) f[i][e] = f[i][e] * a + smem[3 + (i * N + e) * 32 + lane] * b;
      }
    }
    __syncthreads();
  }
}

template <int VPL, int N, class A>
__device__ void block_sum(A (&f)[VPL][N], const Group& g, A* smem) {
  for (int off = g.size; off < 32; off <<= 1) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
#pragma unroll
      for (int e = 0; e < N; ++e) f[i][e] += __shfl_xor_sync(kFullMask, f[i][e], off);
    }
  }
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  for (int w = 1; w < kWarps; ++w) {
    if (warp == w && lane < g.size) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
#pragma unroll
        for (int e = 0; e < N; ++e) smem[3 + (i * N + e) * 32 + lane] = f[i][e];
      }
    }
    __syncthreads();
    if (warp == 0 && lane < g.size) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
#pragma unroll
        for (int e = 0; e < N; ++e) f[i][e] += smem[3 + (i * N + e) * 32 + lane];
      }
    }
    __syncthreads();
  }
}

// Position of grid query / key number `cell` and its clipped window [y0, y1] x [x0, x1].
struct Window {
  int y0, y1, x0, x1;
  __device__ __forceinline__ Window(const Geometry& geo, int cell) {
    const int y = cell / geo.gw;
    const int x = cell - y * geo.gw;
    y0 = max(y - geo.radius, 0);
    y1 = min(y + geo.radius, geo.gh - 1);
    x0 = max(x - geo.radius, 0);
    x1 = min(x + geo.radius, geo.gw - 1);
  }
  __device__ __forceinline__ int count() const { return (y1 - y0 + 1) * (x1 - x0 + 1); }
};

// Walks the keys of a window in row-major order (token index `key`), starting at its first key.
// (The window of a grid key is also the set of grid queries that see it: the window is symmetric.)
struct WindowKeys {
  int x, x0, x1, step, key;  // step: from the last key of a window row to the first of the next
  __device__ __forceinline__ WindowKeys(const Window& w, const Geometry& geo)
      : x(w.x0), x0(w.x0), x1(w.x1), step(geo.gw - (w.x1 - w.x0)), key(geo.P + w.y0 * geo.gw + w.x0) {}
  __device__ __forceinline__ void next() {
    if (x < x1) {
      ++x;
      ++key;
    } else {
      x = x0;
      key += step;
    }
  }
};

// The queries that see one key, in a fixed order: for a grid key the grid queries of its window
// (row-major), then the prefix queries 0 .. P-1; for a prefix key the prefix queries only.
struct QuerySeq {
  WindowKeys window;
  int in_window;  // window queries left, the current one included (<= 0: in the prefix part)
  int total;      // queries in all
  int query;      // token index of the current query
  __device__ __forceinline__ QuerySeq(const Window& w, const Geometry& geo, bool grid_key)
      : window(w, geo), in_window(grid_key ? w.count() : 0), total(in_window + geo.P),
        query(in_window > 0 ? window.key : 0) {}
  __device__ __forceinline__ void next() {
    if (--in_window > 0) {
      window.next();
      query = window.key;
    } else {
      query = in_window == 0 ? 0 : query + 1;
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------

template <class T>
struct FwdParams {
  Rows<T> q, k, v;
  T* out;                        // (B, H, N, row_len) contiguous
  typename Traits<T>::acc* lse;  // (B, H, N) contiguous
  Geometry geo;
  typename Traits<T>::acc scale;
  typename Traits<T>::acc window_area;  // window * window
  bool zero_border;
  int prefix_blocks;     // B * H * P: the first blocks of the launch
  int64_t grid_queries;  // B * H * gh * gw
  // Tiled forward only (local_attn_fwd_tiled_kernel): tiles of tile_h x tile_w grid queries,
  // tiles_x per grid row, tiles_per_image per (batch, head); halo_keys: keys of the largest halo.
  int tile_h, tile_w, tiles_x, tiles_per_image, halo_keys;
};

template <class T, int VPL, bool SINGLE, bool PF>
__device__ void fwd_grid_query(const FwdParams<T>& p, const Group& g) {
  using A = typename Traits<T>::acc;
  constexpr int N = Traits<T>::vec;
  const Geometry& geo = p.geo;
  const int64_t qi = static_cast<int64_t>(static_cast<int>(blockIdx.x) - p.prefix_blocks) *
                         (kThreads >> geo.log2g) +
                     (static_cast<int>(threadIdx.x) >> geo.log2g);
  if (qi >= p.grid_queries) return;
  const int cells = geo.gh * geo.gw;
  const int bh = static_cast<int>(qi / cells);
  const int cell = static_cast<int>(qi - static_cast<int64_t>(bh) * cells);
  const int b = bh / geo.H;
  const int h = bh - b * geo.H;
  const int n = geo.P + cell;
  const Window win(geo, cell);
  const A outside = p.zero_border ? p.window_area - static_cast<A>(win.count()) : A(0);
  const T* qrow = p.q.row(b, h, n);
  T* orow = p.out + (static_cast<int64_t>(bh) * geo.N + n) * geo.row_len;

  // Running max and sum of the softmax, seeded with the out-of-grid score-0 terms.
  A m = outside > A(0) ? A(0) : neg_inf<A>();
  A l = outside;
  A acc[VPL][N];
  zero_frag(acc);

  if constexpr (SINGLE) {
    A qf[VPL][N];
    load_row_acc(qf, qrow, 0, geo.nv, g);
    if constexpr (PF) {
      // The keys of the window in row-major order, each one's rows loaded while the previous key is
      // processed (the loads are the latency of this loop; the order of the sums is unchanged).
      WindowKeys keys(win, geo);
      Pack<T, N> kr[VPL], vr[VPL];
      load_row(kr, p.k.row(b, h, keys.key), 0, geo.nv, g);
      load_row(vr, p.v.row(b, h, keys.key), 0, geo.nv, g);
      for (int t = win.count(); t > 0; --t) {
        Pack<T, N> kn[VPL], vn[VPL];
        if (t > 1) {
          keys.next();
          load_row(kn, p.k.row(b, h, keys.key), 0, geo.nv, g);
          load_row(vn, p.v.row(b, h, keys.key), 0, geo.nv, g);
        }
        const A s = group_sum(dot_frag(qf, kr), g) * p.scale;
        online_softmax_step(m, l, acc, s, vr);
        shift_rows(kr, kn, vr, vn);
      }
    } else {
      for (int yy = win.y0; yy <= win.y1; ++yy) {
        for (int xx = win.x0; xx <= win.x1; ++xx) {
          const int nk = geo.P + yy * geo.gw + xx;
          Pack<T, N> kr[VPL], vr[VPL];
          load_row(kr, p.k.row(b, h, nk), 0, geo.nv, g);
          load_row(vr, p.v.row(b, h, nk), 0, geo.nv, g);
          const A s = group_sum(dot_frag(qf, kr), g) * p.scale;
          online_softmax_step(m, l, acc, s, vr);
        }
      }
    }
    store_row(orow, acc, A(1) / l, 0, geo.nv, g);
  } else {
    for (int yy = win.y0; yy <= win.y1; ++yy) {
      for (int xx = win.x0; xx <= win.x1; ++xx) {
        const int nk = geo.P + yy * geo.gw + xx;
        const A s = dot_rows<A, T, N>(qrow, p.k.row(b, h, nk), geo.nv, g) * p.scale;
        if (s > m) {
          l *= fexp(m - s);
          m = s;
        }
        l += fexp(s - m);
      }
    }
    const A lse = m + flog(l);
    for (int slab = 0; slab < geo.nslabs; ++slab) {
      const int v0 = slab * g.size * VPL;
      zero_frag(acc);
      for (int yy = win.y0; yy <= win.y1; ++yy) {
        for (int xx = win.x0; xx <= win.x1; ++xx) {
          const int nk = geo.P + yy * geo.gw + xx;
          const A s = dot_rows<A, T, N>(qrow, p.k.row(b, h, nk), geo.nv, g) * p.scale;
          Pack<T, N> vr[VPL];
          load_row(vr, p.v.row(b, h, nk), v0, geo.nv, g);
          axpy_frag(acc, fexp(s - lse), vr);
        }
      }
      store_row(orow, acc, A(1), v0, geo.nv, g);
    }
  }
  if (g.lane == 0) p.lse[static_cast<int64_t>(bh) * geo.N + n] = m + flog(l);
}

template <class T, int VPL, bool SINGLE>
__device__ void fwd_prefix_query(const FwdParams<T>& p, const Group& g,
                                 typename Traits<T>::acc* smem) {
  using A = typename Traits<T>::acc;
  constexpr int N = Traits<T>::vec;
  const Geometry& geo = p.geo;
  const int bh = static_cast<int>(blockIdx.x) / geo.P;
  const int t = static_cast<int>(blockIdx.x) - bh * geo.P;
  const int b = bh / geo.H;
  const int h = bh - b * geo.H;
  const int groups = kThreads >> geo.log2g;
  const int first = static_cast<int>(threadIdx.x) >> geo.log2g;
  const T* qrow = p.q.row(b, h, t);
  T* orow = p.out + (static_cast<int64_t>(bh) * geo.N + t) * geo.row_len;
  const bool writer = static_cast<int>(threadIdx.x) < g.size;  // first group of warp 0

  A m = neg_inf<A>();
  A l = A(0);
  A acc[VPL][N];
  zero_frag(acc);

  if constexpr (SINGLE) {
    A qf[VPL][N];
    load_row_acc(qf, qrow, 0, geo.nv, g);
    for (int j = first; j < geo.N; j += groups) {
      Pack<T, N> kr[VPL], vr[VPL];
      load_row(kr, p.k.row(b, h, j), 0, geo.nv, g);
      load_row(vr, p.v.row(b, h, j), 0, geo.nv, g);
      const A s = group_sum(dot_frag(qf, kr), g) * p.scale;
      online_softmax_step(m, l, acc, s, vr);
    }
    block_merge_softmax(m, l, acc, g, smem);
    if (writer) store_row(orow, acc, A(1) / l, 0, geo.nv, g);
  } else {
    for (int j = first; j < geo.N; j += groups) {
      const A s = dot_rows<A, T, N>(qrow, p.k.row(b, h, j), geo.nv, g) * p.scale;
      if (s > m) {
        l *= fexp(m - s);
        m = s;
      }
      l += fexp(s - m);
    }
    A none[1][1] = {{A(0)}};
    block_merge_softmax(m, l, none, g, smem);
    if (threadIdx.x == 0) smem[2] = m + flog(l);
    __syncthreads();
    const A lse = smem[2];
    for (int slab = 0; slab < geo.nslabs; ++slab) {
      const int v0 = slab * g.size * VPL;
      zero_frag(acc);
      for (int j = first; j < geo.N; j += groups) {
        const A s = dot_rows<A, T, N>(qrow, p.k.row(b, h, j), geo.nv, g) * p.scale;
        Pack<T, N> vr[VPL];
        load_row(vr, p.v.row(b, h, j), v0, geo.nv, g);
        axpy_frag(acc, fexp(s - lse), vr);
      }
      block_sum(acc, g, smem);
      if (writer) store_row(orow, acc, A(1), v0, geo.nv, g);
    }
  }
  if (threadIdx.x == 0) p.lse[static_cast<int64_t>(bh) * geo.N + t] = m + flog(l);
}

template <class T, int VPL, bool SINGLE, bool PF>
__global__ void __launch_bounds__(kThreads) local_attn_fwd_kernel(const FwdParams<T> p) {
  using A = typename Traits<T>::acc;
  __shared__ A smem[smem_size<VPL, Traits<T>::vec>()];
  const Group g = make_group(p.geo.log2g);
  if (static_cast<int>(blockIdx.x) < p.prefix_blocks) {
    fwd_prefix_query<T, VPL, SINGLE>(p, g, smem);
  } else {
    fwd_grid_query<T, VPL, SINGLE, PF>(p, g);
  }
}

// The forward with the keys and values of a tile of grid queries staged in shared memory
// (SA2VP_CUDA_ATTN_TILED=1, single-slab rows): a block owns tile_h x tile_w grid queries of one
// (batch, head), one group each; it first copies the k and v rows of the tile's halo (the union of its
// queries' windows, clipped to the grid) into shared memory with all its threads, then every group runs
// the default kernel's loop with its key and value rows read from there. Each k / v row is then read
// from L2 once per tile instead of once per query that sees it (9 times for a 3 x 3 window). The sums
// are those of local_attn_fwd_kernel, in the same order: the results are bitwise equal.
template <class T, int VPL>
__global__ void __launch_bounds__(kThreads) local_attn_fwd_tiled_kernel(const FwdParams<T> p) {
  using A = typename Traits<T>::acc;
  constexpr int N = Traits<T>::vec;
  __shared__ A smem[smem_size<VPL, N>()];
  extern __shared__ __align__(16) unsigned char halo_raw[];
  const Group g = make_group(p.geo.log2g);
  if (static_cast<int>(blockIdx.x) < p.prefix_blocks) {
    fwd_prefix_query<T, VPL, true>(p, g, smem);
    return;
  }
  const Geometry& geo = p.geo;
  const int tile = static_cast<int>(blockIdx.x) - p.prefix_blocks;
  const int bh = tile / p.tiles_per_image;
  const int t = tile - bh * p.tiles_per_image;
  const int ty = t / p.tiles_x;
  const int y0 = ty * p.tile_h, x0 = (t - ty * p.tiles_x) * p.tile_w;
  const int hy0 = max(y0 - geo.radius, 0), hy1 = min(y0 + p.tile_h - 1 + geo.radius, geo.gh - 1);
  const int hx0 = max(x0 - geo.radius, 0), hx1 = min(x0 + p.tile_w - 1 + geo.radius, geo.gw - 1);
  const int hw = hx1 - hx0 + 1;
  const int halo = (hy1 - hy0 + 1) * hw;
  const int b = bh / geo.H;
  const int h = bh - b * geo.H;
  T* ks = reinterpret_cast<T*>(halo_raw);
  T* vs = ks + static_cast<int64_t>(p.halo_keys) * geo.row_len;
  for (int idx = static_cast<int>(threadIdx.x); idx < halo * geo.nv; idx += kThreads) {
    const int key = idx / geo.nv;
    const int vi = idx - key * geo.nv;
    const int yy = hy0 + key / hw;
    const int nk = geo.P + yy * geo.gw + hx0 + (key - (yy - hy0) * hw);
    const int64_t o = static_cast<int64_t>(key) * geo.row_len + static_cast<int64_t>(vi) * N;
    *reinterpret_cast<Pack<T, N>*>(ks + o) = load_pack<T, N>(p.k.row(b, h, nk) + static_cast<int64_t>(vi) * N);
    *reinterpret_cast<Pack<T, N>*>(vs + o) = load_pack<T, N>(p.v.row(b, h, nk) + static_cast<int64_t>(vi) * N);
  }
  __syncthreads();

  const int gi = static_cast<int>(threadIdx.x) >> geo.log2g;
  const int cy = y0 + gi / p.tile_w, cx = x0 + gi % p.tile_w;
  if (cy >= geo.gh || cx >= geo.gw) return;
  const int cell = cy * geo.gw + cx;
  const int n = geo.P + cell;
  const Window win(geo, cell);
  const A outside = p.zero_border ? p.window_area - static_cast<A>(win.count()) : A(0);
  T* orow = p.out + (static_cast<int64_t>(bh) * geo.N + n) * geo.row_len;
  A m = outside > A(0) ? A(0) : neg_inf<A>();
  A l = outside;
  A acc[VPL][N];
  zero_frag(acc);
  A qf[VPL][N];
  load_row_acc(qf, p.q.row(b, h, n), 0, geo.nv, g);
  for (int yy = win.y0; yy <= win.y1; ++yy) {
    for (int xx = win.x0; xx <= win.x1; ++xx) {
      const int64_t o = static_cast<int64_t>((yy - hy0) * hw + (xx - hx0)) * geo.row_len;
      Pack<T, N> kr[VPL], vr[VPL];
      load_row(kr, ks + o, 0, geo.nv, g);
      load_row(vr, vs + o, 0, geo.nv, g);
      const A s = group_sum(dot_frag(qf, kr), g) * p.scale;
      online_softmax_step(m, l, acc, s, vr);
    }
  }
  store_row(orow, acc, A(1) / l, 0, geo.nv, g);
  if (g.lane == 0) p.lse[static_cast<int64_t>(bh) * geo.N + n] = m + flog(l);
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------

// delta_i = dO_i . O_i for every query.
template <class T>
__global__ void __launch_bounds__(kThreads)
    local_attn_delta_kernel(const Rows<T> dout, const Rows<T> out, typename Traits<T>::acc* delta,
                            const Geometry geo, const int64_t rows) {
  using A = typename Traits<T>::acc;
  constexpr int N = Traits<T>::vec;
  const Group g = make_group(geo.log2g);
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads >> geo.log2g) +
                    (static_cast<int>(threadIdx.x) >> geo.log2g);
  if (r >= rows) return;
  const int bh = static_cast<int>(r / geo.N);
  const int n = static_cast<int>(r - static_cast<int64_t>(bh) * geo.N);
  const int b = bh / geo.H;
  const int h = bh - b * geo.H;
  const A d = dot_rows<A, T, N>(dout.row(b, h, n), out.row(b, h, n), geo.nv, g);
  if (g.lane == 0) delta[r] = d;
}

template <class T>
struct BwdParams {
  Rows<T> q, k, v, dout;
  const typename Traits<T>::acc* lse;    // (B, H, N) contiguous
  const typename Traits<T>::acc* delta;  // (B, H, N) contiguous
  T* dq;                                 // (B, H, N, row_len) contiguous, as dk and dv
  T* dk;
  T* dv;
  Geometry geo;
  typename Traits<T>::acc scale;
  int prefix_blocks;     // dq launch: B * H * P blocks of prefix queries first
  int64_t grid_queries;  // dq launch: B * H * gh * gw
  int64_t keys;          // dk/dv launch: B * H * N
};

// dq_i = scale * sum_j p_ij (dO_i . v_j - delta_i) k_j over the window of grid query i.
template <class T, int VPL, bool SINGLE, bool PF>
__device__ void dq_grid_query(const BwdParams<T>& p, const Group& g) {
  using A = typename Traits<T>::acc;
  constexpr int N = Traits<T>::vec;
  const Geometry& geo = p.geo;
  const int64_t qi = static_cast<int64_t>(static_cast<int>(blockIdx.x) - p.prefix_blocks) *
                         (kThreads >> geo.log2g) +
                     (static_cast<int>(threadIdx.x) >> geo.log2g);
  if (qi >= p.grid_queries) return;
  const int cells = geo.gh * geo.gw;
  const int bh = static_cast<int>(qi / cells);
  const int cell = static_cast<int>(qi - static_cast<int64_t>(bh) * cells);
  const int b = bh / geo.H;
  const int h = bh - b * geo.H;
  const int n = geo.P + cell;
  const Window win(geo, cell);
  const int64_t stat = static_cast<int64_t>(bh) * geo.N + n;
  const A lse = p.lse[stat];
  const A delta = p.delta[stat];
  const T* qrow = p.q.row(b, h, n);
  const T* dorow = p.dout.row(b, h, n);
  T* dqrow = p.dq + stat * geo.row_len;
  A acc[VPL][N];

  if constexpr (SINGLE) {
    A qf[VPL][N], dof[VPL][N];
    load_row_acc(qf, qrow, 0, geo.nv, g);
    load_row_acc(dof, dorow, 0, geo.nv, g);
    zero_frag(acc);
    if constexpr (PF) {
      WindowKeys keys(win, geo);  // each key's rows loaded while the previous key is processed
      Pack<T, N> kr[VPL], vr[VPL];
      load_row(kr, p.k.row(b, h, keys.key), 0, geo.nv, g);
      load_row(vr, p.v.row(b, h, keys.key), 0, geo.nv, g);
      for (int t = win.count(); t > 0; --t) {
        Pack<T, N> kn[VPL], vn[VPL];
        if (t > 1) {
          keys.next();
          load_row(kn, p.k.row(b, h, keys.key), 0, geo.nv, g);
          load_row(vn, p.v.row(b, h, keys.key), 0, geo.nv, g);
        }
        A s = dot_frag(qf, kr);
        A dp = dot_frag(dof, vr);
        group_sum2(s, dp, g);
        const A pr = fexp(s * p.scale - lse);
        axpy_frag(acc, pr * (dp - delta), kr);
        shift_rows(kr, kn, vr, vn);
      }
    } else {
      for (int yy = win.y0; yy <= win.y1; ++yy) {
        for (int xx = win.x0; xx <= win.x1; ++xx) {
          const int nk = geo.P + yy * geo.gw + xx;
          Pack<T, N> kr[VPL], vr[VPL];
          load_row(kr, p.k.row(b, h, nk), 0, geo.nv, g);
          load_row(vr, p.v.row(b, h, nk), 0, geo.nv, g);
          A s = dot_frag(qf, kr);
          A dp = dot_frag(dof, vr);
          group_sum2(s, dp, g);
          const A pr = fexp(s * p.scale - lse);
          axpy_frag(acc, pr * (dp - delta), kr);
        }
      }
    }
    store_row(dqrow, acc, p.scale, 0, geo.nv, g);
  } else {
    for (int slab = 0; slab < geo.nslabs; ++slab) {
      const int v0 = slab * g.size * VPL;
      zero_frag(acc);
      for (int yy = win.y0; yy <= win.y1; ++yy) {
        for (int xx = win.x0; xx <= win.x1; ++xx) {
          const int nk = geo.P + yy * geo.gw + xx;
          const T* krow = p.k.row(b, h, nk);
          A s, dp;
          dot2_rows<A, T, N>(s, dp, qrow, krow, dorow, p.v.row(b, h, nk), geo.nv, g);
          const A pr = fexp(s * p.scale - lse);
          Pack<T, N> kr[VPL];
          load_row(kr, krow, v0, geo.nv, g);
          axpy_frag(acc, pr * (dp - delta), kr);
        }
      }
      store_row(dqrow, acc, p.scale, v0, geo.nv, g);
    }
  }
}

// dq of a prefix query: its block's groups share out all N keys, then their sums are added in order.
template <class T, int VPL, bool SINGLE>
__device__ void dq_prefix_query(const BwdParams<T>& p, const Group& g,
                                typename Traits<T>::acc* smem) {
  using A = typename Traits<T>::acc;
  constexpr int N = Traits<T>::vec;
  const Geometry& geo = p.geo;
  const int bh = static_cast<int>(blockIdx.x) / geo.P;
  const int t = static_cast<int>(blockIdx.x) - bh * geo.P;
  const int b = bh / geo.H;
  const int h = bh - b * geo.H;
  const int groups = kThreads >> geo.log2g;
  const int first = static_cast<int>(threadIdx.x) >> geo.log2g;
  const int64_t stat = static_cast<int64_t>(bh) * geo.N + t;
  const A lse = p.lse[stat];
  const A delta = p.delta[stat];
  const T* qrow = p.q.row(b, h, t);
  const T* dorow = p.dout.row(b, h, t);
  T* dqrow = p.dq + stat * geo.row_len;
  const bool writer = static_cast<int>(threadIdx.x) < g.size;
  A acc[VPL][N];

  if constexpr (SINGLE) {
    A qf[VPL][N], dof[VPL][N];
    load_row_acc(qf, qrow, 0, geo.nv, g);
    load_row_acc(dof, dorow, 0, geo.nv, g);
    zero_frag(acc);
    for (int j = first; j < geo.N; j += groups) {
      Pack<T, N> kr[VPL], vr[VPL];
      load_row(kr, p.k.row(b, h, j), 0, geo.nv, g);
      load_row(vr, p.v.row(b, h, j), 0, geo.nv, g);
      A s = dot_frag(qf, kr);
      A dp = dot_frag(dof, vr);
      group_sum2(s, dp, g);
      const A pr = fexp(s * p.scale - lse);
      axpy_frag(acc, pr * (dp - delta), kr);
    }
    block_sum(acc, g, smem);
    if (writer) store_row(dqrow, acc, p.scale, 0, geo.nv, g);
  } else {
    for (int slab = 0; slab < geo.nslabs; ++slab) {
      const int v0 = slab * g.size * VPL;
      zero_frag(acc);
      for (int j = first; j < geo.N; j += groups) {
        const T* krow = p.k.row(b, h, j);
        A s, dp;
        dot2_rows<A, T, N>(s, dp, qrow, krow, dorow, p.v.row(b, h, j), geo.nv, g);
        const A pr = fexp(s * p.scale - lse);
        Pack<T, N> kr[VPL];
        load_row(kr, krow, v0, geo.nv, g);
        axpy_frag(acc, pr * (dp - delta), kr);
      }
      block_sum(acc, g, smem);
      if (writer) store_row(dqrow, acc, p.scale, v0, geo.nv, g);
    }
  }
}

template <class T, int VPL, bool SINGLE, bool PF>
__global__ void __launch_bounds__(kThreads) local_attn_dq_kernel(const BwdParams<T> p) {
  using A = typename Traits<T>::acc;
  __shared__ A smem[smem_size<VPL, Traits<T>::vec>()];
  const Group g = make_group(p.geo.log2g);
  if (static_cast<int>(blockIdx.x) < p.prefix_blocks) {
    dq_prefix_query<T, VPL, SINGLE>(p, g, smem);
  } else {
    dq_grid_query<T, VPL, SINGLE, PF>(p, g);
  }
}

// dv_j = sum_i p_ij dO_i and dk_j = scale * sum_i p_ij (dO_i . v_j - delta_i) q_i over the queries i
// that see key j: the grid queries in the window around a grid key, then every prefix query.
template <class T, int VPL, bool SINGLE, bool PF>
__global__ void __launch_bounds__(kThreads) local_attn_dkdv_kernel(const BwdParams<T> p) {
  using A = typename Traits<T>::acc;
  constexpr int N = Traits<T>::vec;
  const Geometry& geo = p.geo;
  const Group g = make_group(geo.log2g);
  const int64_t kj = static_cast<int64_t>(blockIdx.x) * (kThreads >> geo.log2g) +
                     (static_cast<int>(threadIdx.x) >> geo.log2g);
  if (kj >= p.keys) return;
  const int bh = static_cast<int>(kj / geo.N);
  const int n = static_cast<int>(kj - static_cast<int64_t>(bh) * geo.N);
  const int b = bh / geo.H;
  const int h = bh - b * geo.H;
  const int64_t stat0 = static_cast<int64_t>(bh) * geo.N;
  const T* krow = p.k.row(b, h, n);
  const T* vrow = p.v.row(b, h, n);
  T* dkrow = p.dk + kj * geo.row_len;
  T* dvrow = p.dv + kj * geo.row_len;
  // Grid queries that see a grid key: the same clipped square around it (the window is symmetric).
  const bool grid_key = n >= geo.P;
  const Window win(geo, grid_key ? n - geo.P : 0);
  A dk[VPL][N], dv[VPL][N];

  if constexpr (SINGLE) {
    A kf[VPL][N], vf[VPL][N];
    load_row_acc(kf, krow, 0, geo.nv, g);
    load_row_acc(vf, vrow, 0, geo.nv, g);
    zero_frag(dk);
    zero_frag(dv);
    if constexpr (PF) {
      // The queries that see the key, each one's rows and statistics loaded while the previous one is
      // processed (same order as the slab path below: the window, then the prefix queries).
      QuerySeq seq(win, geo, grid_key);
      Pack<T, N> qr[VPL], dor[VPL];
      load_row(qr, p.q.row(b, h, seq.query), 0, geo.nv, g);
      load_row(dor, p.dout.row(b, h, seq.query), 0, geo.nv, g);
      A lse = p.lse[stat0 + seq.query], delta = p.delta[stat0 + seq.query];
      for (int t = seq.total; t > 0; --t) {
        Pack<T, N> qn[VPL], don[VPL];
        A lse_n = A(0), delta_n = A(0);
        if (t > 1) {
          seq.next();
          load_row(qn, p.q.row(b, h, seq.query), 0, geo.nv, g);
          load_row(don, p.dout.row(b, h, seq.query), 0, geo.nv, g);
          lse_n = p.lse[stat0 + seq.query];
          delta_n = p.delta[stat0 + seq.query];
        }
        A s = dot_frag(kf, qr);
        A dp = dot_frag(vf, dor);
        group_sum2(s, dp, g);
        const A pr = fexp(s * p.scale - lse);
        axpy_frag(dv, pr, dor);
        axpy_frag(dk, pr * (dp - delta), qr);
        shift_rows(qr, qn, dor, don);
        lse = lse_n;
        delta = delta_n;
      }
    } else {
      auto visit = [&](int nq) {
        Pack<T, N> qr[VPL], dor[VPL];
        load_row(qr, p.q.row(b, h, nq), 0, geo.nv, g);
        load_row(dor, p.dout.row(b, h, nq), 0, geo.nv, g);
        A s = dot_frag(kf, qr);
        A dp = dot_frag(vf, dor);
        group_sum2(s, dp, g);
        const A pr = fexp(s * p.scale - p.lse[stat0 + nq]);
        axpy_frag(dv, pr, dor);
        axpy_frag(dk, pr * (dp - p.delta[stat0 + nq]), qr);
      };
      if (grid_key) {
        for (int yy = win.y0; yy <= win.y1; ++yy) {
          for (int xx = win.x0; xx <= win.x1; ++xx) visit(geo.P + yy * geo.gw + xx);
        }
      }
      for (int t = 0; t < geo.P; ++t) visit(t);
    }
    store_row(dkrow, dk, p.scale, 0, geo.nv, g);
    store_row(dvrow, dv, A(1), 0, geo.nv, g);
  } else {
    for (int slab = 0; slab < geo.nslabs; ++slab) {
      const int v0 = slab * g.size * VPL;
      zero_frag(dk);
      zero_frag(dv);
      auto visit = [&](int nq) {
        const T* qrow = p.q.row(b, h, nq);
        const T* dorow = p.dout.row(b, h, nq);
        A s, dp;
        dot2_rows<A, T, N>(s, dp, krow, qrow, vrow, dorow, geo.nv, g);
        const A pr = fexp(s * p.scale - p.lse[stat0 + nq]);
        Pack<T, N> qr[VPL], dor[VPL];
        load_row(qr, qrow, v0, geo.nv, g);
        load_row(dor, dorow, v0, geo.nv, g);
        axpy_frag(dv, pr, dor);
        axpy_frag(dk, pr * (dp - p.delta[stat0 + nq]), qr);
      };
      if (grid_key) {
        for (int yy = win.y0; yy <= win.y1; ++yy) {
          for (int xx = win.x0; xx <= win.x1; ++xx) visit(geo.P + yy * geo.gw + xx);
        }
      }
      for (int t = 0; t < geo.P; ++t) visit(t);
      store_row(dkrow, dk, p.scale, v0, geo.nv, g);
      store_row(dvrow, dv, A(1), v0, geo.nv, g);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------

int ceil_log2(int64_t x) {
  int r = 0;
  while ((int64_t{1} << r) < x) ++r;
  return r;
}

// Vectors per lane, group size and slabs for rows of nv vectors.
struct Plan {
  int nv, log2g, vpl, nslabs;
  bool single() const { return nslabs == 1; }
};

Plan make_plan(int64_t nv, int max_vpl) {
  Plan plan;
  plan.nv = static_cast<int>(nv);
  if (nv <= 32) {
    plan.log2g = ceil_log2(nv);
    plan.vpl = 1;
  } else {
    plan.log2g = 5;
    const int64_t need = (nv + 31) / 32;
    plan.vpl = need <= 4 ? static_cast<int>(need) : 8;
    if (plan.vpl > max_vpl) plan.vpl = max_vpl;
  }
  const int64_t per_slab = (int64_t{1} << plan.log2g) * plan.vpl;
  plan.nslabs = static_cast<int>((nv + per_slab - 1) / per_slab);
  return plan;
}

// Widest rows (vectors per lane) with a prefetching variant: beyond it the doubled row registers spill.
constexpr int kMaxPrefetchVpl = 3;

// Calls f(std::integral_constant<int, VPL>, std::bool_constant<SINGLE>, std::bool_constant<PF>) for the
// plan; PF (the rows of the next key or query loaded while one is processed) only in single mode with
// at most kMaxPrefetchVpl vectors per lane.
template <class T, class F>
void with_plan(const Plan& plan, bool prefetch, F&& f) {
  constexpr int kMax = Traits<T>::max_vpl;
  if (!plan.single()) {
    TORCH_INTERNAL_ASSERT(plan.vpl == kMax, "local_attn: slab mode expects ", kMax, " vectors per lane");
    f(std::integral_constant<int, kMax>{}, std::false_type{}, std::false_type{});
    return;
  }
  auto single = [&](auto vpl) {
    if constexpr (decltype(vpl)::value <= kMaxPrefetchVpl) {
      if (prefetch) {
        f(vpl, std::true_type{}, std::true_type{});
        return;
      }
    }
    f(vpl, std::true_type{}, std::false_type{});
  };
  switch (plan.vpl) {
    case 1:
      single(std::integral_constant<int, 1>{});
      return;
    case 2:
      single(std::integral_constant<int, 2>{});
      return;
    case 3:
      single(std::integral_constant<int, 3>{});
      return;
    case 4:
      single(std::integral_constant<int, 4>{});
      return;
    case 8:
      if constexpr (kMax >= 8) {
        single(std::integral_constant<int, 8>{});
        return;
      }
      break;
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "local_attn: unsupported vectors per lane ", plan.vpl);
}

// True when the kernels can read t directly: unit feature stride, 16-byte aligned rows.
bool rows_vector_ready(const at::Tensor& t, int vec) {
  if (t.stride(3) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) != 1 && t.stride(d) % vec != 0) return false;
  }
  return true;
}

// t itself, or a contiguous copy zero-padded to row_len features when t cannot be read directly.
at::Tensor vector_rows(const at::Tensor& t, int64_t row_len, int vec) {
  if (t.size(3) == row_len && rows_vector_ready(t, vec)) return t;
  at::Tensor c = t.size(3) == row_len
                     ? at::empty({t.size(0), t.size(1), t.size(2), row_len}, t.options())
                     : at::zeros({t.size(0), t.size(1), t.size(2), row_len}, t.options());
  c.narrow(3, 0, t.size(3)).copy_(t);
  return c;
}

template <class T>
Rows<T> rows_of(const at::Tensor& t) {
  // A size-1 dim is never stepped through; its stride may be anything, so it is passed as 0.
  auto stride = [&](int d) { return t.size(d) == 1 ? int64_t{0} : t.stride(d); };
  return Rows<T>{t.data_ptr<T>(), stride(0), stride(1), stride(2)};
}

void check_cuda_inputs(const at::Tensor& q) {
  SA2VP_CHECK(q.is_cuda(), "local_attn (CUDA): q must be a CUDA tensor, got ", q.device());
  const auto st = q.scalar_type();
  SA2VP_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "local_attn (CUDA): q must be float16, bfloat16, float32 or float64, got ", st);
}

// Fills the shape part of the geometry and checks the index ranges the kernels use 32-bit ints for.
Geometry make_geometry(const at::Tensor& q, int64_t grid_h, int64_t grid_w, int64_t window,
                       int64_t num_prefix, const Plan& plan, int vec) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  SA2VP_CHECK(B * H <= kIntMax && N <= kIntMax,
              "local_attn (CUDA): batch * heads and N must fit 32-bit ints, got B=", B, ", heads=", H,
              ", N=", N);
  Geometry geo;
  geo.B = static_cast<int>(B);
  geo.H = static_cast<int>(H);
  geo.N = static_cast<int>(N);
  geo.P = static_cast<int>(num_prefix);
  geo.gh = static_cast<int>(grid_h);
  geo.gw = static_cast<int>(grid_w);
  geo.radius = static_cast<int>(std::min<int64_t>(window / 2, std::max(grid_h, grid_w)));
  geo.nv = plan.nv;
  geo.row_len = plan.nv * vec;
  geo.log2g = plan.log2g;
  geo.nslabs = plan.nslabs;
  return geo;
}

// SA2VP_CUDA_ATTN_PREFETCH=1 selects the kernels that load the next key's (query's) rows while one is
// processed: more loads in flight per thread, more registers per thread (fewer resident warps). Read
// at every launch, so that a benchmark can time both in one process. Off by default: on an H200
// (bench/run_gpu.py, tune section, B=64, 14x14 + CLS, bf16, CUDA-graph medians) it took 0.118 / 0.436 ms
// (12 x 64, fwd / fwd+bwd) and 0.118 / 0.401 ms (1 x 768) against 0.096 / 0.341 and 0.071 / 0.295 ms.
bool prefetch_rows() {
  const char* v = std::getenv("SA2VP_CUDA_ATTN_PREFETCH");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

// SA2VP_CUDA_ATTN_TILED=1 selects the tiled forward (local_attn_fwd_tiled_kernel) for single-slab
// rows of at most 4 vectors per lane whose tile halo fits in shared memory. Read at every launch, like SA2VP_CUDA_ATTN_PREFETCH. Off
// by default: on an H200 (bench/gpu_variants.py, B=64, 14x14 + CLS, bf16, CUDA-graph medians) it took
// 0.0999 ms (1 x 768) and 0.1164 ms (12 x 64) against 0.0701 and 0.0952 ms for the default forward,
// whose loads already hit L1 for 46 % and 60 % of their sectors (Nsight Compute); a block's copy of its
// halo and its computation do not overlap (two resident blocks per SM at 1 x 768).
bool tiled_forward() {
  const char* v = std::getenv("SA2VP_CUDA_ATTN_TILED");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

// The current device's opt-in shared memory per block (queried once per device).
int64_t optin_shared_per_block() {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices];
  const int device = c10::cuda::current_device();
  int value = device < kDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (device < kDevices) cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Tiles of the tiled forward: (kThreads >> log2g) grid queries per block as tile_h x tile_w, the shape
// (widths 1, 2, 4, ...) that copies the fewest halo keys per image; ties: the fewest idle groups.
struct TilePlan {
  int h = 0, w = 0, tiles_x = 0, tiles_y = 0, halo_keys = 0;
};

TilePlan make_tile_plan(const Geometry& geo) {
  const int q = kThreads >> geo.log2g;
  TilePlan best;
  int64_t best_cost = -1, best_idle = 0;
  for (int w = 1; w <= q; w <<= 1) {
    const int h = q / w;
    const int tx = (geo.gw + w - 1) / w, ty = (geo.gh + h - 1) / h;
    const int halo = std::min(h + 2 * geo.radius, geo.gh) * std::min(w + 2 * geo.radius, geo.gw);
    const int64_t cost = static_cast<int64_t>(tx) * ty * halo;
    const int64_t idle = static_cast<int64_t>(tx) * ty * q - static_cast<int64_t>(geo.gh) * geo.gw;
    if (best_cost < 0 || cost < best_cost || (cost == best_cost && idle < best_idle)) {
      best = TilePlan{h, w, tx, ty, halo};
      best_cost = cost;
      best_idle = idle;
    }
  }
  return best;
}

int launch_blocks(int64_t items, int log2g) {
  const int64_t per_block = kThreads >> log2g;
  const int64_t blocks = (items + per_block - 1) / per_block;
  SA2VP_CHECK(blocks <= std::numeric_limits<int>::max(), "local_attn (CUDA): too many rows (", items,
              ") for one launch");
  return static_cast<int>(blocks);
}

at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> local_attn_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, int64_t grid_h,
                                                       int64_t grid_w, int64_t window,
                                                       int64_t num_prefix, bool zero_border,
                                                       double scale) {
  check_local_attn_args(q_in, k_in, v_in, grid_h, grid_w, window, num_prefix);
  check_cuda_inputs(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  at::Tensor lse = at::empty({B, H, N}, q_in.options().dtype(acc_dtype(q_in.scalar_type())));
  if (B * H == 0) return {at::empty({B, H, N, D}, q_in.options()), lse};
  at::Tensor out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_in.scalar_type(), "local_attn_fwd_cuda",
                                  [&] {
    using T = scalar_t;
    using A = typename Traits<T>::acc;
    constexpr int vec = Traits<T>::vec;
    const int64_t row_len = (D + vec - 1) / vec * vec;
    const at::Tensor q = vector_rows(q_in, row_len, vec);
    const at::Tensor k = vector_rows(k_in, row_len, vec);
    const at::Tensor v = vector_rows(v_in, row_len, vec);
    const Plan plan = make_plan(row_len / vec, Traits<T>::max_vpl);
    out = at::empty({B, H, N, row_len}, q_in.options());

    FwdParams<T> p;
    p.q = rows_of<T>(q);
    p.k = rows_of<T>(k);
    p.v = rows_of<T>(v);
    p.out = out.data_ptr<T>();
    p.lse = lse.data_ptr<A>();
    p.geo = make_geometry(q, grid_h, grid_w, window, num_prefix, plan, vec);
    p.scale = static_cast<A>(scale);
    p.window_area = static_cast<A>(static_cast<double>(window) * static_cast<double>(window));
    p.zero_border = zero_border;
    p.grid_queries = B * H * grid_h * grid_w;
    const int64_t prefix_blocks = B * H * num_prefix;
    SA2VP_CHECK(prefix_blocks <= std::numeric_limits<int>::max(),
                "local_attn (CUDA): too many prefix queries (", prefix_blocks, ")");
    p.prefix_blocks = static_cast<int>(prefix_blocks);
    const int64_t blocks = prefix_blocks + launch_blocks(p.grid_queries, plan.log2g);
    SA2VP_CHECK(blocks <= std::numeric_limits<int>::max(), "local_attn (CUDA): too many queries");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool tiled = tiled_forward() && plan.single();
    with_plan<T>(plan, prefetch_rows() && !tiled, [&](auto vpl, auto single, auto pf) {
      // (not for 8 vectors per lane: the float32 / float64 kernels spill there, and the variant is
      // off by default anyway)
      if constexpr (decltype(single)::value && !decltype(pf)::value && decltype(vpl)::value <= 4) {
        if (tiled) {
          constexpr int kVpl = decltype(vpl)::value;
          const TilePlan tp = make_tile_plan(p.geo);
          const int64_t smem = 2 * static_cast<int64_t>(tp.halo_keys) * row_len * static_cast<int64_t>(sizeof(T));
          const int64_t static_smem = smem_size<kVpl, vec>() * static_cast<int64_t>(sizeof(A));
          const int64_t tile_blocks = B * H * static_cast<int64_t>(tp.tiles_x) * tp.tiles_y;
          if (smem + static_smem <= optin_shared_per_block() &&
              prefix_blocks + tile_blocks <= std::numeric_limits<int>::max()) {
            p.tile_h = tp.h;
            p.tile_w = tp.w;
            p.tiles_x = tp.tiles_x;
            p.tiles_per_image = tp.tiles_x * tp.tiles_y;
            p.halo_keys = tp.halo_keys;
            if (smem > 48 * 1024) {
              C10_CUDA_CHECK(cudaFuncSetAttribute(local_attn_fwd_tiled_kernel<T, kVpl>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(smem)));
            }
            local_attn_fwd_tiled_kernel<T, kVpl>
                <<<static_cast<unsigned>(prefix_blocks + tile_blocks), kThreads, smem, stream>>>(p);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
        }
      }
      local_attn_fwd_kernel<T, decltype(vpl)::value, decltype(single)::value, decltype(pf)::value>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });

  if (out.size(3) != D) out = out.narrow(3, 0, D).contiguous();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attn_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, int64_t grid_h,
    int64_t grid_w, int64_t window, int64_t num_prefix, bool zero_border, double scale) {
  (void)zero_border;  // the border only enters through lse, which already holds its terms
  check_local_attn_args(q_in, k_in, v_in, grid_h, grid_w, window, num_prefix);
  check_cuda_inputs(q_in);
  SA2VP_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "local_attn_bwd: grad_out and out must have q's shape ", q_in.sizes(), ", got ",
              grad_out_in.sizes(), " and ", out_in.sizes());
  SA2VP_CHECK(grad_out_in.scalar_type() == q_in.scalar_type() &&
                  out_in.scalar_type() == q_in.scalar_type(),
              "local_attn_bwd: grad_out and out must have q's dtype ", q_in.scalar_type(), ", got ",
              grad_out_in.scalar_type(), " and ", out_in.scalar_type());
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  const at::ScalarType acc = acc_dtype(q_in.scalar_type());
  SA2VP_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == N,
              "local_attn_bwd: lse must have shape (B, heads, N) = (", B, ", ", H, ", ", N, "), got ",
              lse_in.sizes());
  SA2VP_CHECK(lse_in.scalar_type() == acc, "local_attn_bwd: lse must have dtype ", acc, ", got ",
              lse_in.scalar_type());
  for (const at::Tensor* t : {&grad_out_in, &out_in, &lse_in}) {
    SA2VP_CHECK(t->device() == q_in.device(), "local_attn_bwd: grad_out, out and lse must be on ",
                q_in.device(), ", got ", t->device());
  }
  const c10::cuda::CUDAGuard guard(q_in.device());
  if (B * H == 0) {
    return {at::empty_like(q_in, at::MemoryFormat::Contiguous),
            at::empty_like(q_in, at::MemoryFormat::Contiguous),
            at::empty_like(q_in, at::MemoryFormat::Contiguous)};
  }
  at::Tensor dq, dk, dv;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_in.scalar_type(), "local_attn_bwd_cuda",
                                  [&] {
    using T = scalar_t;
    using A = typename Traits<T>::acc;
    constexpr int vec = Traits<T>::vec;
    const int64_t row_len = (D + vec - 1) / vec * vec;
    const at::Tensor q = vector_rows(q_in, row_len, vec);
    const at::Tensor k = vector_rows(k_in, row_len, vec);
    const at::Tensor v = vector_rows(v_in, row_len, vec);
    const at::Tensor dout = vector_rows(grad_out_in, row_len, vec);
    const at::Tensor out = vector_rows(out_in, row_len, vec);
    const at::Tensor lse = lse_in.contiguous();
    const Plan plan = make_plan(row_len / vec, Traits<T>::max_vpl);
    const at::Tensor delta = at::empty({B, H, N}, q_in.options().dtype(acc));
    dq = at::empty({B, H, N, row_len}, q_in.options());
    dk = at::empty({B, H, N, row_len}, q_in.options());
    dv = at::empty({B, H, N, row_len}, q_in.options());

    BwdParams<T> p;
    p.q = rows_of<T>(q);
    p.k = rows_of<T>(k);
    p.v = rows_of<T>(v);
    p.dout = rows_of<T>(dout);
    p.lse = lse.data_ptr<A>();
    p.delta = delta.data_ptr<A>();
    p.dq = dq.data_ptr<T>();
    p.dk = dk.data_ptr<T>();
    p.dv = dv.data_ptr<T>();
    p.geo = make_geometry(q, grid_h, grid_w, window, num_prefix, plan, vec);
    p.scale = static_cast<A>(scale);
    p.grid_queries = B * H * grid_h * grid_w;
    p.keys = B * H * N;
    const int64_t prefix_blocks = B * H * num_prefix;
    SA2VP_CHECK(prefix_blocks <= std::numeric_limits<int>::max(),
                "local_attn (CUDA): too many prefix queries (", prefix_blocks, ")");
    p.prefix_blocks = static_cast<int>(prefix_blocks);
    const int64_t dq_blocks = prefix_blocks + launch_blocks(p.grid_queries, plan.log2g);
    SA2VP_CHECK(dq_blocks <= std::numeric_limits<int>::max(), "local_attn (CUDA): too many queries");
    const int row_blocks = launch_blocks(p.keys, plan.log2g);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

    local_attn_delta_kernel<T><<<row_blocks, kThreads, 0, stream>>>(
        rows_of<T>(dout), rows_of<T>(out), delta.data_ptr<A>(), p.geo, p.keys);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    with_plan<T>(plan, prefetch_rows(), [&](auto vpl, auto single, auto pf) {
      constexpr int VPL = decltype(vpl)::value;
      constexpr bool SINGLE = decltype(single)::value;
      constexpr bool PF = decltype(pf)::value;
      local_attn_dq_kernel<T, VPL, SINGLE, PF><<<static_cast<unsigned>(dq_blocks), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      local_attn_dkdv_kernel<T, VPL, SINGLE, PF><<<row_blocks, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });

  if (dq.size(3) != D) {
    dq = dq.narrow(3, 0, D).contiguous();
    dk = dk.narrow(3, 0, D).contiguous();
    dv = dv.narrow(3, 0, D).contiguous();
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace sa2vp

TORCH_LIBRARY_IMPL(sa2vp_kernels, CUDA, m) {
  m.impl("local_attn_fwd", &sa2vp::local_attn_fwd_cuda);
  m.impl("local_attn_bwd", &sa2vp::local_attn_bwd_cuda);
}
