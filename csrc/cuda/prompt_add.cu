// CUDA kernels of prompt_add (ops prompt_add_fwd, prompt_add_bwd): float16, bfloat16, float32, float64.
//
//   out = target + scale * drop(up(drop(gelu(down(layer_norm(message)))))) [+ deep_scale * deep]
//
// Forward (one kernel): each warp owns kRowsPerWarp tokens. A lane owns the channel groups
// g = lane, lane + 32, ... of V consecutive channels (16-byte vector loads when aligned), so every
// big tensor is read once with coalesced loads and `out` is written once. Per warp:
//   1. LayerNorm statistics in fp32 (fp64 for fp64); the normalised rows stay in shared memory, in a
//      lane-private layout (no bank conflicts, no block synchronisation);
//   2. z = y @ down_weight^T: every lane accumulates kRowsPerWarp x kJChunk partial dot products, one
//      down_weight load serving all rows of the warp; a butterfly "transpose reduction" leaves the
//      total of value k in lane k (31 shuffles for 32 values); z is saved (fp32) for the backward;
//   3. h = drop(gelu(z)) in shared memory, then u = h @ up_weight^T per channel group (up_weight is
//      passed transposed, (r, C), so those loads are coalesced too), and the epilogue.
// Where both weights fit kMaxStagedWeights the forward (the "staged" one; SA2VP_CUDA_PROMPT_ADD_STAGED=0
// turns it off) first copies the two weights into shared memory, then its warps loop over groups of
// rows (grid: the resident blocks), with the target/deep loads of a channel group issued before the up
// projection.
// Backward:
//   * rows kernel, same layout: gu = scale * drop'(grad_out); gh = gu @ up_weight (as the forward's
//     z); gz = drop'(gh) * gelu'(z) (saved, fp32); gy = gz @ down_weight (as the forward's u); the
//     LayerNorm backward gives grad_message;
//   * columns kernel: one thread per channel, token splits in blockIdx.y, sums over tokens of
//     gu^T @ h, gu, A = gz^T @ xhat (and gz) in registers, one partial per split;
//   * finalize kernel: the split partials added in split order (deterministic, no atomics), and the
//     parameter gradients from them: grad_down_weight = A * norm_weight + sum(gz) (x) norm_bias,
//     grad_norm_weight = sum_j down_weight * A, grad_norm_bias = sum(gz) @ down_weight (with
//     SA2VP_CUDA_PROMPT_ADD_FINALIZE=0, ATen ops on the partials instead).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <tuple>

#include "prompt_add.h"

namespace sa2vp {
namespace {

namespace hash = prompt_add_hash;

constexpr int kRowsPerWarp = 4;
constexpr int kJChunk = 8;  // kRowsPerWarp * kJChunk = 32 values per transpose reduction
constexpr int kJLoads = 4;   // rows of a (r, C) weight loaded together in the per-channel products
constexpr int kOutRows = 2;  // forward: rows whose target/deep vectors are loaded together
constexpr int kMaxWarps = 4;
// Forward with the weights staged in shared memory (see fwd_kernel): at most this many warps per block
// and this many bytes of staged weights (both (r, C) weights, e.g. 48 KiB for C = 768, r = 16 in 16 bits).
constexpr int kMaxWarpsStaged = 12;
constexpr int64_t kMaxStagedWeights = 64 * 1024;
constexpr int kColsThreads = 128;  // columns kernel: threads (= channels) per block
constexpr int kColsTile = 32;      // columns kernel: tokens staged in shared memory at a time
constexpr int kColsUnroll = 8;     // columns kernel: tokens whose loads a thread issues together
constexpr int64_t kColsSplits = 128;    // columns kernel: most token splits (blockIdx.y)
constexpr int64_t kColsMinRows = 64;    // columns kernel: fewest tokens per split
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
using acc_t = at::opmath_type<T>;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = static_cast<A>(pk.v[e]);
}

template <typename T, int V, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int e = 0; e < V; ++e) pk.v[e] = static_cast<T>(in[e]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// One halving step of warp_transpose_sum: lanes with bit O set keep values O..2O-1, the others
// values 0..O-1, each adding its partner's copy. O is a template argument so that every index into
// v is a compile-time constant before NVVM's unroller runs: with a run-time loop bound (16 >> s)
// the inner loop stayed rolled, v was indexed dynamically and lived in local memory.
template <int O, typename A>
__device__ __forceinline__ void transpose_sum_step(A (&v)[32], int lane) {
  const bool upper = (lane & O) != 0;
#pragma unroll
  for (int k = 0; k < O; ++k) {
    const A lo = v[k], hi = v[k + O];
    const A send = upper ? lo : hi;
    const A keep = upper ? hi : lo;
    v[k] = keep + __shfl_xor_sync(kFull, send, O);
  }
  if constexpr (O > 1) transpose_sum_step<O / 2>(v, lane);
}

// Sums each of 32 values over the warp; lane k returns the total of value k.
template <typename A>
__device__ __forceinline__ A warp_transpose_sum(A (&v)[32], int lane) {
  transpose_sum_step<16>(v, lane);
  return v[0];
}

template <typename A>
__device__ __forceinline__ A gelu(A z) {
  return A(0.5) * z * (A(1) + erf(z * A(0.70710678118654752440)));
}

template <typename A>
__device__ __forceinline__ A gelu_grad(A z) {
  const A cdf = A(0.5) * (A(1) + erf(z * A(0.70710678118654752440)));
  return cdf + z * exp(A(-0.5) * z * z) * A(0.39894228040143267794);
}

// acc[i][e] += sum_j lo[i * r + j] * w[j * C + c0 + e] for the warp's rows i (lo: R x r in shared
// memory, w: an (r, C) weight): the loads of kJLoads weight rows are issued together (past r: row
// r - 1, not used), the sums run over j in order.
template <int JL = kJLoads, typename T, int V, int R, typename A>
__device__ __forceinline__ void add_low_rank(A (&acc)[R][V], const A* lo, int r, const T* w, int C, int c0) {
  for (int j0 = 0; j0 < r; j0 += JL) {
    A wv[JL][V];
#pragma unroll
    for (int jj = 0; jj < JL; ++jj) {
      load_vec<T, V>(w + static_cast<int64_t>(min(j0 + jj, r - 1)) * C + c0, wv[jj]);
    }
#pragma unroll
    for (int jj = 0; jj < JL; ++jj) {
      if (j0 + jj < r) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const A lij = lo[i * r + j0 + jj];
#pragma unroll
          for (int e = 0; e < V; ++e) acc[i][e] += lij * wv[jj][e];
        }
      }
    }
  }
}

template <typename T>
struct FwdParams {
  const T* message;
  const T* target;
  const T* gamma;
  const T* beta;
  const T* wd;    // (r, C)
  const T* bd;    // (r,)
  const T* wu_t;  // (r, C): up_weight transposed
  const T* bu;    // (C,)
  const T* deep;  // (N, C) or null
  const T* deep_scale;
  T* out;  // (M, C)
  acc_t<T>* mean;
  acc_t<T>* rstd;
  acc_t<T>* z;  // (M, r)
  int64_t M, msg_sb, msg_sn, tgt_sb, tgt_sn;
  int N, C, r;
  acc_t<T> scale, eps, inv_keep;
  uint32_t threshold, key_h, key_o;
  bool dropout;
};

// Bytes of shared memory that the staged forward keeps both (r, C) weights in (16-byte multiple).
template <typename T>
__host__ __device__ constexpr int64_t staged_weight_bytes(int64_t r, int64_t C) {
  return (2 * r * C * static_cast<int64_t>(sizeof(T)) + 15) / 16 * 16;
}

// Copies n elements (a multiple of V; 16-byte aligned when V > 1) with the block's threads.
template <typename T, int V>
__device__ __forceinline__ void copy_to_shared(T* dst, const T* src, int64_t n) {
  for (int64_t i = threadIdx.x; i < n / V; i += blockDim.x) {
    reinterpret_cast<Pack<T, V>*>(dst)[i] = reinterpret_cast<const Pack<T, V>*>(src)[i];
  }
}

// Shared memory of one warp: kRowsPerWarp rows of C (lane-private layout: channel e of group g of
// row i at i * C + e * groups + g), then kRowsPerWarp x r low-rank values (shared by the warp).
// STAGED: the block first copies down_weight and up_weight^T into shared memory (in front of the
// warps' areas) and its warps then loop over groups of rows, the grid sized to the resident blocks.
// Without it every weight vector of the two projections is a load from L1/L2 whose latency the warp
// waits for (the loads of one rank's row cannot all be hoisted without spills); with it they are
// shared-memory loads, and the sums are the same, in the same order (bitwise equal results).
template <typename T, int V, bool STAGED>
__global__ void __launch_bounds__((STAGED ? kMaxWarpsStaged : kMaxWarps) * 32) fwd_kernel(const FwdParams<T> p) {
  using A = acc_t<T>;
  constexpr int R = kRowsPerWarp;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int C = p.C, r = p.r, groups = C / V;
  const T* wd = p.wd;
  const T* wu_t = p.wu_t;
  unsigned char* rows_smem = smem_raw;
  if constexpr (STAGED) {
    T* ws = reinterpret_cast<T*>(smem_raw);
    const int64_t n = static_cast<int64_t>(r) * C;
    copy_to_shared<T, V>(ws, p.wd, n);
    copy_to_shared<T, V>(ws + n, p.wu_t, n);
    __syncthreads();
    wd = ws;
    wu_t = ws + n;
    rows_smem += staged_weight_bytes<T>(r, C);
  }
  A* ys = reinterpret_cast<A*>(rows_smem) + static_cast<int64_t>(warp) * R * (C + r);
  A* hs = ys + R * C;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5) * R;
  for (int64_t row0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp) * R; row0 < p.M;
       row0 += row_step) {
    // 1. LayerNorm. The warp's R rows are read together, one 16-byte vector of each per group, so that
    // a lane has R loads in flight instead of one.
    bool valid[R];
    const T* xrow[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t m = row0 + i;
      valid[i] = m < p.M;
      xrow[i] = valid[i] ? p.message + (m / p.N) * p.msg_sb + (m % p.N) * p.msg_sn : p.message;
    }
    A mean[R], rstd[R], s[R];
#pragma unroll
    for (int i = 0; i < R; ++i) s[i] = 0;
    for (int g = lane; g < groups; g += 32) {
      A v[R][V];
#pragma unroll
      for (int i = 0; i < R; ++i) load_vec<T, V>(xrow[i] + g * V, v[i]);  // (row 0 for the rows past M)
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A x = valid[i] ? v[i][e] : A(0);
          ys[i * C + e * groups + g] = x;
          s[i] += x;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t m = row0 + i;
      const A* yi = ys + i * C;
      mean[i] = warp_sum(s[i]) / A(C);
      A q = 0;
      if (valid[i]) {
        for (int g = lane; g < groups; g += 32) {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const A d = yi[e * groups + g] - mean[i];
            q += d * d;
          }
        }
      }
      q = warp_sum(q);
      rstd[i] = valid[i] ? A(1) / sqrt(q / A(C) + p.eps) : A(0);
      if (valid[i] && lane == 0) {
        p.mean[m] = mean[i];
        p.rstd[m] = rstd[i];
      }
    }
    for (int g = lane; g < groups; g += 32) {
      A ga[V], be[V];
      load_vec<T, V>(p.gamma + g * V, ga);
      load_vec<T, V>(p.beta + g * V, be);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        A* yi = ys + i * C;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A y = (yi[e * groups + g] - mean[i]) * rstd[i] * ga[e] + be[e];
          yi[e * groups + g] = valid[i] ? y : A(0);
        }
      }
    }
    __syncwarp();

    // 2. z = y @ down_weight^T + down_bias; h = drop(gelu(z)).
    for (int j0 = 0; j0 < r; j0 += kJChunk) {
      A v[32];
#pragma unroll
      for (int k = 0; k < 32; ++k) v[k] = 0;
      for (int g = lane; g < groups; g += 32) {
        A y[R][V];
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
          for (int e = 0; e < V; ++e) y[i][e] = ys[i * C + e * groups + g];
        }
#pragma unroll
        for (int jj = 0; jj < kJChunk; ++jj) {
          // (guarded: with the loads of all kJChunk ranks hoisted, the float16/bfloat16 kernels spill)
          A w[V];
          if (j0 + jj >= r) continue;
          load_vec<T, V>(wd + static_cast<int64_t>(j0 + jj) * C + g * V, w);
#pragma unroll
          for (int i = 0; i < R; ++i) {
#pragma unroll
            for (int e = 0; e < V; ++e) v[i * kJChunk + jj] += y[i][e] * w[e];
          }
        }
      }
      const A total = warp_transpose_sum(v, lane);
      const int i = lane / kJChunk, j = j0 + lane % kJChunk;
      const int64_t m = row0 + i;
      if (j < r) {
        A h = 0;
        if (m < p.M) {
          const A zz = total + static_cast<A>(p.bd[j]);
          p.z[m * r + j] = zz;
          const bool kept = !p.dropout || hash::keep(hash::row_state(p.key_h, static_cast<uint32_t>(m)),
                                                     static_cast<uint32_t>(j), p.threshold);
          h = kept ? gelu(zz) * p.inv_keep : A(0);
        }
        hs[i * r + j] = h;
      }
    }
    __syncwarp();

    // 3. u = h @ up_weight^T + up_bias, then out = target + scale * drop(u) [+ deep_scale * deep]. The
    // target (and deep) vectors of kOutRows rows are loaded before their outputs are stored (a store to
    // out could alias them for the compiler, which would then wait for each row's loads in turn).
    uint32_t rs_out[R];
    const T* trow[R];
    const T* drow[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t m = row0 + i;
      rs_out[i] = hash::row_state(p.key_o, static_cast<uint32_t>(m));
      const int64_t b = valid[i] ? m / p.N : 0, n = valid[i] ? m % p.N : 0;
      trow[i] = p.target + b * p.tgt_sb + n * p.tgt_sn;
      drow[i] = p.deep != nullptr ? p.deep + n * C : nullptr;
    }
    const A s_keep = p.scale * p.inv_keep;
    for (int g = lane; g < groups; g += 32) {
      const int c0 = g * V;
      // (STAGED: the target and deep vectors of all R rows are loaded first, their latency hidden
      // behind the up projection)
      Pack<T, V> t_raw[STAGED ? R : 1], d_raw[STAGED ? R : 1];
      if constexpr (STAGED) {
#pragma unroll
        for (int i = 0; i < R; ++i) t_raw[i] = *reinterpret_cast<const Pack<T, V>*>(trow[i] + c0);
        if (p.deep != nullptr) {
#pragma unroll
          for (int i = 0; i < R; ++i) d_raw[i] = *reinterpret_cast<const Pack<T, V>*>(drow[i] + c0);
        }
      }
      A u[R][V], bu[V];
      load_vec<T, V>(p.bu + c0, bu);
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int e = 0; e < V; ++e) u[i][e] = bu[e];
      }
      // (staged weights: shared-memory loads, so fewer need to be in flight, which frees registers)
      add_low_rank<STAGED ? 1 : kJLoads>(u, hs, r, wu_t, C, c0);
      A ds[V];
      if (p.deep != nullptr) load_vec<T, V>(p.deep_scale + c0, ds);
#pragma unroll
      for (int i0 = 0; i0 < R; i0 += kOutRows) {
        A t[kOutRows][V];
#pragma unroll
        for (int i = 0; i < kOutRows; ++i) {
          if constexpr (STAGED) {
#pragma unroll
            for (int e = 0; e < V; ++e) t[i][e] = static_cast<A>(t_raw[i0 + i].v[e]);
          } else {
            load_vec<T, V>(trow[i0 + i] + c0, t[i]);  // (row 0 past M)
          }
        }
#pragma unroll
        for (int i = 0; i < kOutRows; ++i) {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const bool kept = !p.dropout || hash::keep(rs_out[i0 + i], static_cast<uint32_t>(c0 + e), p.threshold);
            u[i0 + i][e] = t[i][e] + (kept ? s_keep * u[i0 + i][e] : A(0));
          }
        }
        if (p.deep != nullptr) {
          A d[kOutRows][V];
#pragma unroll
          for (int i = 0; i < kOutRows; ++i) {
            if constexpr (STAGED) {
#pragma unroll
              for (int e = 0; e < V; ++e) d[i][e] = static_cast<A>(d_raw[i0 + i].v[e]);
            } else {
              load_vec<T, V>(drow[i0 + i] + c0, d[i]);
            }
          }
#pragma unroll
          for (int i = 0; i < kOutRows; ++i) {
#pragma unroll
            for (int e = 0; e < V; ++e) u[i0 + i][e] += ds[e] * d[i][e];
          }
        }
#pragma unroll
        for (int i = 0; i < kOutRows; ++i) {
          if (valid[i0 + i]) store_vec<T, V>(p.out + (row0 + i0 + i) * C + c0, u[i0 + i]);
        }
      }
    }
    // (the next group's step 2 rewrites hs, which other lanes may still be reading in step 3)
    __syncwarp();
  }
}

template <typename T>
struct BwdParams {
  const T* grad;  // (B, N, C) rows with strides
  const T* message;
  const acc_t<T>* mean;
  const acc_t<T>* rstd;
  const acc_t<T>* z;
  const T* gamma;
  const T* wd;    // (r, C)
  const T* wu_t;  // (r, C)
  T* dx;          // (M, C)
  acc_t<T>* gz;   // (M, r)
  acc_t<T>* part_w;  // (splits, C, r)
  acc_t<T>* part_a;  // (splits, C, r) with the finalize kernel, else (splits, r, C)
  acc_t<T>* part_b;  // (splits, C)
  acc_t<T>* part_gz;  // (splits, r): sums of gz over each split (written by the blocks of channel tile 0)
  bool part_a_cr;     // part_a in (C, r) order (the finalize kernel's)
  int64_t M, grad_sb, grad_sn, msg_sb, msg_sn, rows_per_split;
  int N, C, r;
  acc_t<T> scale, inv_keep;
  uint32_t threshold, key_h, key_o;
  bool dropout;
};

// Shared memory of one warp: gu then gy * gamma (R x C, lane-private), xhat (R x C, lane-private),
// gz (R x r, shared by the warp).
template <typename T, int V>
__global__ void __launch_bounds__(kMaxWarps * 32) bwd_rows_kernel(const BwdParams<T> p) {
  using A = acc_t<T>;
  constexpr int R = kRowsPerWarp;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int C = p.C, r = p.r, groups = C / V;
  A* gs = reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(warp) * R * (2 * C + r);
  A* xs = gs + R * C;
  A* gzs = xs + R * C;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp) * R;
  if (row0 >= p.M) return;

  // gu = scale * drop'(grad_out). The warp's R rows are read together (as in the forward).
  const A s_keep = p.scale * p.inv_keep;
  bool valid[R];
  const T* grow[R];
  const T* xrow[R];
  uint32_t rs[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t m = row0 + i;
    valid[i] = m < p.M;
    const int64_t b = valid[i] ? m / p.N : 0, n = valid[i] ? m % p.N : 0;
    grow[i] = p.grad + b * p.grad_sb + n * p.grad_sn;
    xrow[i] = p.message + b * p.msg_sb + n * p.msg_sn;
    rs[i] = hash::row_state(p.key_o, static_cast<uint32_t>(m));
  }
  for (int g = lane; g < groups; g += 32) {
    A v[R][V];
#pragma unroll
    for (int i = 0; i < R; ++i) load_vec<T, V>(grow[i] + g * V, v[i]);  // (row 0 for the rows past M)
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool kept = !p.dropout || hash::keep(rs[i], static_cast<uint32_t>(g * V + e), p.threshold);
        gs[i * C + e * groups + g] = valid[i] && kept ? s_keep * v[i][e] : A(0);
      }
    }
  }
  __syncwarp();

  // gh = gu @ up_weight; gz = drop'(gh) * gelu'(z)
  for (int j0 = 0; j0 < r; j0 += kJChunk) {
    A v[32];
#pragma unroll
    for (int k = 0; k < 32; ++k) v[k] = 0;
    for (int g = lane; g < groups; g += 32) {
      A gu[R][V];
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int e = 0; e < V; ++e) gu[i][e] = gs[i * C + e * groups + g];
      }
#pragma unroll
      for (int jj = 0; jj < kJChunk; ++jj) {
        // Ranks past r read row r - 1 and fill sums nobody reads: the kJChunk loads go out together.
        A w[V];
        load_vec<T, V>(p.wu_t + static_cast<int64_t>(min(j0 + jj, r - 1)) * C + g * V, w);
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
          for (int e = 0; e < V; ++e) v[i * kJChunk + jj] += gu[i][e] * w[e];
        }
      }
    }
    const A gh = warp_transpose_sum(v, lane);
    const int i = lane / kJChunk, j = j0 + lane % kJChunk;
    const int64_t m = row0 + i;
    if (j < r) {
      A gzv = 0;
      if (m < p.M) {
        const bool kept = !p.dropout || hash::keep(hash::row_state(p.key_h, static_cast<uint32_t>(m)),
                                                   static_cast<uint32_t>(j), p.threshold);
        gzv = kept ? gh * p.inv_keep * gelu_grad(p.z[m * r + j]) : A(0);
        p.gz[m * r + j] = gzv;
      }
      gzs[i * r + j] = gzv;
    }
  }
  __syncwarp();

  // gy = gz @ down_weight; LayerNorm backward.
  A mean[R], rstd[R], c1[R], c2[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t m = row0 + i;
    mean[i] = m < p.M ? p.mean[m] : A(0);
    rstd[i] = m < p.M ? p.rstd[m] : A(0);
    c1[i] = 0;
    c2[i] = 0;
  }
  for (int g = lane; g < groups; g += 32) {
    const int c0 = g * V;
    A gy[R][V];
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int e = 0; e < V; ++e) gy[i][e] = 0;
    }
    add_low_rank(gy, gzs, r, p.wd, C, c0);
    A ga[V];
    load_vec<T, V>(p.gamma + c0, ga);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      A xh[V];
      load_vec<T, V>(xrow[i] + c0, xh);  // (row 0 for the rows past M)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A xhat = valid[i] ? (xh[e] - mean[i]) * rstd[i] : A(0);
        const A gyg = gy[i][e] * ga[e];
        c1[i] += gyg;
        c2[i] += gyg * xhat;
        gs[i * C + e * groups + g] = gyg;
        xs[i * C + e * groups + g] = xhat;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    c1[i] = warp_sum(c1[i]) / A(C);
    c2[i] = warp_sum(c2[i]) / A(C);
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t m = row0 + i;
    if (m >= p.M) break;
    for (int g = lane; g < groups; g += 32) {
      A dx[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        dx[e] = rstd[i] * (gs[i * C + e * groups + g] - c1[i] - xs[i * C + e * groups + g] * c2[i]);
      }
      store_vec<T, V>(p.dx + m * C + g * V, dx);
    }
  }
}

// One thread per channel c; blockIdx.y selects a contiguous split of tokens; one pass per chunk of JT
// ranks. Accumulates gu^T @ h (C x r), A = gz^T @ xhat (r x C) and sum(gu) (C) for its split.
// Per tile of kColsTile tokens the block stages in shared memory what every channel needs (h, gz,
// mean, rstd, the dropout row state and each token's offsets into grad_out and message, so that the
// token -> (batch, position) divisions run once per token, not once per token and channel); then each
// thread issues the loads of kColsUnroll tokens before it accumulates them, in token order (the sums
// are the same, bitwise, as one token at a time).
template <typename T, int JT>
__global__ void __launch_bounds__(kColsThreads) bwd_cols_kernel(const BwdParams<T> p) {
  using A = acc_t<T>;
  constexpr int U = kColsUnroll;
  static_assert(kColsTile % U == 0, "kColsTile must be a multiple of kColsUnroll");
  __shared__ A hs[kColsTile][JT];
  __shared__ A gzs[kColsTile][JT];
  __shared__ A mean_s[kColsTile];
  __shared__ A rstd_s[kColsTile];
  __shared__ uint32_t rs_s[kColsTile];
  __shared__ int64_t goff_s[kColsTile];
  __shared__ int64_t xoff_s[kColsTile];
  const int tid = threadIdx.x;
  const int c = blockIdx.x * kColsThreads + tid;
  const int split = blockIdx.y;
  const int r = p.r;
  const int64_t start = split * p.rows_per_split;
  const int64_t end = std::min(start + p.rows_per_split, p.M);
  const A s_keep = p.scale * p.inv_keep;
  for (int j0 = 0; j0 < r; j0 += JT) {
    A acc_w[JT], acc_a[JT], acc_b = 0, acc_gz = 0;
#pragma unroll
    for (int jj = 0; jj < JT; ++jj) {
      acc_w[jj] = 0;
      acc_a[jj] = 0;
    }
    for (int64_t m0 = start; m0 < end; m0 += kColsTile) {
      __syncthreads();
      for (int idx = tid; idx < kColsTile * JT; idx += kColsThreads) {
        const int row = idx / JT, jj = idx % JT;
        const int64_t m = m0 + row;
        const int j = j0 + jj;
        A h = 0, gzv = 0;
        if (m < end && j < r) {
          const bool kept = !p.dropout || hash::keep(hash::row_state(p.key_h, static_cast<uint32_t>(m)),
                                                     static_cast<uint32_t>(j), p.threshold);
          h = kept ? gelu(p.z[m * r + j]) * p.inv_keep : A(0);
          gzv = p.gz[m * r + j];
        }
        hs[row][jj] = h;
        gzs[row][jj] = gzv;
      }
      for (int row = tid; row < kColsTile; row += kColsThreads) {
        const int64_t m = m0 + row;
        const bool valid = m < end;
        const int64_t b = valid ? m / p.N : 0, n = valid ? m % p.N : 0;
        mean_s[row] = valid ? p.mean[m] : A(0);
        rstd_s[row] = valid ? p.rstd[m] : A(0);
        rs_s[row] = hash::row_state(p.key_o, static_cast<uint32_t>(m));
        goff_s[row] = b * p.grad_sb + n * p.grad_sn;
        xoff_s[row] = b * p.msg_sb + n * p.msg_sn;
      }
      __syncthreads();
      if (blockIdx.x == 0 && tid < JT) {  // the split's sum of gz, in token order (rows past the end hold 0)
        for (int row = 0; row < kColsTile; ++row) acc_gz += gzs[row][tid];
      }
      if (c < p.C) {
        const int rows = static_cast<int>(std::min<int64_t>(kColsTile, end - m0));
        for (int row0 = 0; row0 < rows; row0 += U) {
          A go[U], x[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {  // the loads of U tokens first (rows past the end read row 0)
            const int row = row0 + u < rows ? row0 + u : 0;
            go[u] = static_cast<A>(p.grad[goff_s[row] + c]);
            x[u] = static_cast<A>(p.message[xoff_s[row] + c]);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int row = row0 + u;
            if (row < rows) {
              const bool kept = !p.dropout || hash::keep(rs_s[row], static_cast<uint32_t>(c), p.threshold);
              const A gu = kept ? s_keep * go[u] : A(0);
              const A xhat = (x[u] - mean_s[row]) * rstd_s[row];
              acc_b += gu;
#pragma unroll
              for (int jj = 0; jj < JT; ++jj) {
                acc_w[jj] += gu * hs[row][jj];
                acc_a[jj] += gzs[row][jj] * xhat;
              }
            }
          }
        }
      }
    }
    if (c < p.C) {
      const int64_t base = static_cast<int64_t>(split) * p.C * r;
#pragma unroll
      for (int jj = 0; jj < JT; ++jj) {
        const int j = j0 + jj;
        if (j < r) {
          p.part_w[base + static_cast<int64_t>(c) * r + j] = acc_w[jj];
          p.part_a[base + (p.part_a_cr ? static_cast<int64_t>(c) * r + j : static_cast<int64_t>(j) * p.C + c)] =
              acc_a[jj];
        }
      }
      if (j0 == 0) p.part_b[static_cast<int64_t>(split) * p.C + c] = acc_b;
    }
    if (blockIdx.x == 0 && tid < JT && j0 + tid < r) p.part_gz[static_cast<int64_t>(split) * r + j0 + tid] = acc_gz;
  }
}

template <typename T>
struct FinParams {
  const acc_t<T>* part_w;   // (splits, C, r)
  const acc_t<T>* part_a;   // (splits, C, r)
  const acc_t<T>* part_b;   // (splits, C)
  const acc_t<T>* part_gz;  // (splits, r)
  const T* gamma;
  const T* beta;
  const T* wd;  // (r, C)
  T* g_nw;      // (C,)
  T* g_nb;      // (C,)
  T* g_dw;      // (r, C)
  T* g_db;      // (r,)
  T* g_uw;      // (C, r)
  T* g_ub;      // (C,)
  int splits, C, r, r_pad;
};

// The parameter gradients from the token splits' partials, in one kernel instead of about twenty ATen
// ops. Thread (channel c, rank j) of a block of kColsThreads / r_pad channels sums W and A over the
// splits in split order (coalesced: both partials are (C, r) per split), writes grad_up_weight[c, j] and
// grad_down_weight[j, c] = A * gamma[c] + gdb[j] * beta[c] (gdb = grad_down_bias, summed over the splits
// by the block first), and its terms of grad_norm_weight[c] = sum_j down_weight[j, c] * A[j, c] and
// grad_norm_bias[c] = sum_j gdb[j] * down_weight[j, c], which the block adds in rank order.
template <typename T>
__global__ void __launch_bounds__(kColsThreads) bwd_finalize_kernel(const FinParams<T> p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* gdb = reinterpret_cast<A*>(smem_raw);  // (r,)
  A* t_nw = gdb + p.r;                      // (channels per block, r_pad)
  A* t_nb = t_nw + kColsThreads;
  const int tid = threadIdx.x, r = p.r, C = p.C;
  const int64_t cr = static_cast<int64_t>(C) * r;
  for (int j = tid; j < r; j += blockDim.x) {
    A s = 0;
    for (int sp = 0; sp < p.splits; ++sp) s += p.part_gz[static_cast<int64_t>(sp) * r + j];
    gdb[j] = s;
    if (blockIdx.x == 0) p.g_db[j] = static_cast<T>(s);
  }
  __syncthreads();
  const int per_block = kColsThreads / p.r_pad;
  const int cl = tid / p.r_pad, j = tid % p.r_pad;
  const int c = blockIdx.x * per_block + cl;
  A tn = 0, tb = 0;
  if (c < C && j < r) {
    const int64_t e = static_cast<int64_t>(c) * r + j;
    A w = 0, a = 0;
    for (int sp = 0; sp < p.splits; ++sp) {
      w += p.part_w[sp * cr + e];
      a += p.part_a[sp * cr + e];
    }
    p.g_uw[e] = static_cast<T>(w);
    const A wdj = static_cast<A>(p.wd[static_cast<int64_t>(j) * C + c]);
    p.g_dw[static_cast<int64_t>(j) * C + c] =
        static_cast<T>(a * static_cast<A>(p.gamma[c]) + gdb[j] * static_cast<A>(p.beta[c]));
    tn = wdj * a;
    tb = gdb[j] * wdj;
  }
  t_nw[tid] = tn;
  t_nb[tid] = tb;
  __syncthreads();
  if (c < C && j == 0) {
    A nw = 0, nb = 0, ub = 0;
    for (int jj = 0; jj < r; ++jj) {
      nw += t_nw[cl * p.r_pad + jj];
      nb += t_nb[cl * p.r_pad + jj];
    }
    for (int sp = 0; sp < p.splits; ++sp) ub += p.part_b[static_cast<int64_t>(sp) * C + c];
    p.g_nw[c] = static_cast<T>(nw);
    p.g_nb[c] = static_cast<T>(nb);
    p.g_ub[c] = static_cast<T>(ub);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The current device's opt-in shared memory per block: 227 KiB on H100/H200, 163 KiB on A100, 99 KiB
// on sm_86/89. Queried once per device (the launches are on the host's critical path).
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

// Warps per block for a kernel whose warps each need `per_warp` bytes of shared memory.
int warps_for(int64_t per_warp, const char* what) {
  constexpr int64_t kBudget = 96 * 1024;
  const int64_t max_per_block = optin_shared_per_block();
  SA2VP_CHECK(per_warp <= max_per_block, what, ": the number of channels is too large for the CUDA kernels on this "
              "device (", per_warp, " bytes of shared memory per warp, the device allows ", max_per_block,
              " per block)");
  const int64_t budget = std::min(kBudget, max_per_block);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, budget / per_warp)));
}

template <typename Kernel>
void set_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

using Dropout = DropoutParams;

// The forward that stages the weights in shared memory (fwd_kernel<..., true>) runs wherever they fit,
// unless SA2VP_CUDA_PROMPT_ADD_STAGED=0. On an H200 (bench/gpu_variants.py, B=64, N=197, C=768, r=16,
// p=0.1, bf16, CUDA-graph medians) it took 0.0703 ms against 0.0959 ms for the other forward. Read at
// every launch, so that a benchmark can time both in one process.
bool staged_forward() {
  const char* v = std::getenv("SA2VP_CUDA_PROMPT_ADD_STAGED");
  return v == nullptr || !(v[0] == '0' && v[1] == '\0');
}

// The backward's parameter gradients come from bwd_finalize_kernel (one launch) unless
// SA2VP_CUDA_PROMPT_ADD_FINALIZE=0 (then from ATen ops on the partials). Read at every launch.
bool finalize_kernel() {
  const char* v = std::getenv("SA2VP_CUDA_PROMPT_ADD_FINALIZE");
  return v == nullptr || !(v[0] == '0' && v[1] == '\0');
}

int sm_count() {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices];
  const int device = c10::cuda::current_device();
  int value = device < kDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
    if (device < kDevices) cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

template <typename T, int V>
void launch_fwd(const FwdParams<T>& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t per_warp = static_cast<int64_t>(kRowsPerWarp) * (p.C + p.r) * sizeof(A);
  const int64_t weights = staged_weight_bytes<T>(p.r, p.C);
  if (staged_forward() && weights <= kMaxStagedWeights) {
    const int64_t room = optin_shared_per_block() - weights;
    const int warps = static_cast<int>(std::min<int64_t>(kMaxWarpsStaged, room / per_warp));
    if (warps >= 1) {
      const int64_t smem = weights + warps * per_warp;
      set_smem(fwd_kernel<T, V, true>, smem);
      int resident = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, fwd_kernel<T, V, true>, warps * 32,
                                                                   static_cast<size_t>(smem)));
      const int64_t rows_per_block = static_cast<int64_t>(warps) * kRowsPerWarp;
      const int64_t needed = (p.M + rows_per_block - 1) / rows_per_block;
      const int64_t blocks = std::min<int64_t>(needed, static_cast<int64_t>(std::max(resident, 1)) * sm_count());
      fwd_kernel<T, V, true><<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const int warps = warps_for(per_warp, "prompt_add_fwd");
  const int64_t smem = warps * per_warp;
  set_smem(fwd_kernel<T, V, false>, smem);
  const int64_t rows_per_block = static_cast<int64_t>(warps) * kRowsPerWarp;
  const int64_t blocks = (p.M + rows_per_block - 1) / rows_per_block;
  fwd_kernel<T, V, false><<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V>
void launch_bwd_rows(const BwdParams<T>& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t per_warp = static_cast<int64_t>(kRowsPerWarp) * (2 * p.C + p.r) * sizeof(A);
  const int warps = warps_for(per_warp, "prompt_add_bwd");
  const int64_t smem = warps * per_warp;
  set_smem(bwd_rows_kernel<T, V>, smem);
  const int64_t rows_per_block = static_cast<int64_t>(warps) * kRowsPerWarp;
  const int64_t blocks = (p.M + rows_per_block - 1) / rows_per_block;
  bwd_rows_kernel<T, V><<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int JT>
void launch_bwd_cols(const BwdParams<T>& p, int splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.C + kColsThreads - 1) / kColsThreads), static_cast<unsigned>(splits));
  bwd_cols_kernel<T, JT><<<grid, kColsThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_add_fwd_cuda(
    const at::Tensor& target_in, const at::Tensor& message_in, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const c10::optional<at::Tensor>& deep_in,
    const c10::optional<at::Tensor>& deep_scale_in, double scale, double dropout_p, double eps, int64_t seed) {
  const int64_t r = check_prompt_add_fwd_args(target_in, message_in, norm_weight, norm_bias, down_weight,
                                              down_bias, up_weight, up_bias, deep_in, deep_scale_in, dropout_p,
                                              eps, seed);
  SA2VP_CHECK(message_in.is_cuda(), "prompt_add_fwd (CUDA): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(message_in.device());
  const at::Tensor target = last_dim_contiguous(target_in), message = last_dim_contiguous(message_in);
  const at::Tensor nw = norm_weight.contiguous(), nb = norm_bias.contiguous();
  const at::Tensor dw = down_weight.contiguous(), db = down_bias.contiguous();
  const at::Tensor wu_t = up_weight.t().contiguous(), ub = up_bias.contiguous();
  at::Tensor deep, deep_scale;
  if (deep_in.has_value()) {
    deep = deep_in->contiguous();
    deep_scale = deep_scale_in->contiguous();
  }
  const int64_t B = message.size(0), N = message.size(1), C = message.size(2), M = B * N;
  const auto stat = message.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, N, C}, message.options());
  at::Tensor mean = at::empty({M}, message.options().dtype(stat));
  at::Tensor rstd = at::empty({M}, message.options().dtype(stat));
  at::Tensor z = at::empty({M, r}, message.options().dtype(stat));
  const Dropout drop(dropout_p, seed);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, message.scalar_type(), "prompt_add_fwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    FwdParams<scalar_t> p;
    p.message = message.data_ptr<scalar_t>();
    p.target = target.data_ptr<scalar_t>();
    p.gamma = nw.data_ptr<scalar_t>();
    p.beta = nb.data_ptr<scalar_t>();
    p.wd = dw.data_ptr<scalar_t>();
    p.bd = db.data_ptr<scalar_t>();
    p.wu_t = wu_t.data_ptr<scalar_t>();
    p.bu = ub.data_ptr<scalar_t>();
    p.deep = deep.defined() ? deep.data_ptr<scalar_t>() : nullptr;
    p.deep_scale = deep.defined() ? deep_scale.data_ptr<scalar_t>() : nullptr;
    p.out = out.data_ptr<scalar_t>();
    p.mean = mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.z = z.data_ptr<A>();
    p.M = M;
    p.N = static_cast<int>(N);
    p.C = static_cast<int>(C);
    p.r = static_cast<int>(r);
    p.msg_sb = message.stride(0);
    p.msg_sn = message.stride(1);
    p.tgt_sb = target.stride(0);
    p.tgt_sn = target.stride(1);
    p.scale = static_cast<A>(scale);
    p.eps = static_cast<A>(eps);
    p.inv_keep = static_cast<A>(drop.inv_keep);
    p.threshold = drop.threshold;
    p.key_h = drop.key_hidden;
    p.key_o = drop.key_out;
    p.dropout = drop.active;
    constexpr int V = 16 / sizeof(scalar_t);
    bool vec = C % V == 0 && p.msg_sb % V == 0 && p.msg_sn % V == 0 && p.tgt_sb % V == 0 && p.tgt_sn % V == 0;
    for (const void* ptr : {static_cast<const void*>(p.message), static_cast<const void*>(p.target),
                            static_cast<const void*>(p.gamma), static_cast<const void*>(p.beta),
                            static_cast<const void*>(p.wd), static_cast<const void*>(p.wu_t),
                            static_cast<const void*>(p.bu), static_cast<const void*>(p.out),
                            static_cast<const void*>(p.deep), static_cast<const void*>(p.deep_scale)}) {
      vec = vec && aligned16(ptr);
    }
    if (vec) {
      launch_fwd<scalar_t, V>(p, stream);
    } else {
      launch_fwd<scalar_t, 1>(p, stream);
    }
  });
  return {out, mean, rstd, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_add_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& message_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, const at::Tensor& z_in, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, const at::Tensor& down_weight, const at::Tensor& up_weight, double scale,
    double dropout_p, int64_t seed) {
  check_prompt_add_bwd_args(grad_out_in, message_in, mean_in, rstd_in, z_in, norm_weight, norm_bias, down_weight,
                            up_weight, dropout_p, seed);
  SA2VP_CHECK(message_in.is_cuda(), "prompt_add_bwd (CUDA): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(message_in.device());
  const at::Tensor grad_out = last_dim_contiguous(grad_out_in), message = last_dim_contiguous(message_in);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous(), z = z_in.contiguous();
  const at::Tensor nw = norm_weight.contiguous(), nb = norm_bias.contiguous();
  const at::Tensor dw = down_weight.contiguous(), wu_t = up_weight.t().contiguous();
  const int64_t B = message.size(0), N = message.size(1), C = message.size(2), M = B * N, r = dw.size(0);
  const auto stat = z.scalar_type();
  const auto sopts = message.options().dtype(stat);
  at::Tensor grad_message = at::empty({B, N, C}, message.options());
  at::Tensor gz = at::empty({M, r}, sopts);
  // Token splits of the columns kernel: enough blocks to fill the GPU (each thread's sum over its
  // split is a chain of dependent loads), at most kColsSplits partials, whole staging tiles per split.
  const int64_t splits0 = std::max<int64_t>(1, std::min<int64_t>(kColsSplits, (M + kColsMinRows - 1) / kColsMinRows));
  const int64_t rows_per_split = ((M + splits0 - 1) / splits0 + kColsTile - 1) / kColsTile * kColsTile;
  const int64_t splits = (M + rows_per_split - 1) / rows_per_split;
  // (the finalize kernel holds a block's channels times the rank padded to a power of two)
  int64_t r_pad = 1;
  while (r_pad < r) r_pad *= 2;
  const bool fin = finalize_kernel() && r_pad <= kColsThreads;
  at::Tensor part_w = at::empty({splits, C, r}, sopts);
  at::Tensor part_a = fin ? at::empty({splits, C, r}, sopts) : at::empty({splits, r, C}, sopts);
  at::Tensor part_b = at::empty({splits, C}, sopts);
  at::Tensor part_gz = at::empty({splits, r}, sopts);
  const auto dt = message.scalar_type();
  at::Tensor g_nw, g_nb, g_dw, g_db, g_uw, g_ub;
  if (fin) {
    const auto opts = message.options();
    g_nw = at::empty({C}, opts);
    g_nb = at::empty({C}, opts);
    g_dw = at::empty({r, C}, opts);
    g_db = at::empty({r}, opts);
    g_uw = at::empty({C, r}, opts);
    g_ub = at::empty({C}, opts);
  }
  const Dropout drop(dropout_p, seed);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, message.scalar_type(), "prompt_add_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    BwdParams<scalar_t> p;
    p.grad = grad_out.data_ptr<scalar_t>();
    p.message = message.data_ptr<scalar_t>();
    p.mean = mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.z = z.data_ptr<A>();
    p.gamma = nw.data_ptr<scalar_t>();
    p.wd = dw.data_ptr<scalar_t>();
    p.wu_t = wu_t.data_ptr<scalar_t>();
    p.dx = grad_message.data_ptr<scalar_t>();
    p.gz = gz.data_ptr<A>();
    p.part_w = part_w.data_ptr<A>();
    p.part_a = part_a.data_ptr<A>();
    p.part_b = part_b.data_ptr<A>();
    p.part_gz = part_gz.data_ptr<A>();
    p.part_a_cr = fin;
    p.M = M;
    p.grad_sb = grad_out.stride(0);
    p.grad_sn = grad_out.stride(1);
    p.msg_sb = message.stride(0);
    p.msg_sn = message.stride(1);
    p.rows_per_split = rows_per_split;
    p.N = static_cast<int>(N);
    p.C = static_cast<int>(C);
    p.r = static_cast<int>(r);
    p.scale = static_cast<A>(scale);
    p.inv_keep = static_cast<A>(drop.inv_keep);
    p.threshold = drop.threshold;
    p.key_h = drop.key_hidden;
    p.key_o = drop.key_out;
    p.dropout = drop.active;
    constexpr int V = 16 / sizeof(scalar_t);
    bool vec = C % V == 0 && p.grad_sb % V == 0 && p.grad_sn % V == 0 && p.msg_sb % V == 0 && p.msg_sn % V == 0;
    for (const void* ptr : {static_cast<const void*>(p.grad), static_cast<const void*>(p.message),
                            static_cast<const void*>(p.gamma), static_cast<const void*>(p.wd),
                            static_cast<const void*>(p.wu_t), static_cast<const void*>(p.dx)}) {
      vec = vec && aligned16(ptr);
    }
    if (vec) {
      launch_bwd_rows<scalar_t, V>(p, stream);
    } else {
      launch_bwd_rows<scalar_t, 1>(p, stream);
    }
    if (r <= 8) {
      launch_bwd_cols<scalar_t, 8>(p, static_cast<int>(splits), stream);
    } else if (r <= 16) {
      launch_bwd_cols<scalar_t, 16>(p, static_cast<int>(splits), stream);
    } else {
      launch_bwd_cols<scalar_t, 32>(p, static_cast<int>(splits), stream);
    }
    if (fin) {
      FinParams<scalar_t> f;
      f.part_w = part_w.data_ptr<A>();
      f.part_a = part_a.data_ptr<A>();
      f.part_b = part_b.data_ptr<A>();
      f.part_gz = part_gz.data_ptr<A>();
      f.gamma = nw.data_ptr<scalar_t>();
      f.beta = nb.data_ptr<scalar_t>();
      f.wd = dw.data_ptr<scalar_t>();
      f.g_nw = g_nw.data_ptr<scalar_t>();
      f.g_nb = g_nb.data_ptr<scalar_t>();
      f.g_dw = g_dw.data_ptr<scalar_t>();
      f.g_db = g_db.data_ptr<scalar_t>();
      f.g_uw = g_uw.data_ptr<scalar_t>();
      f.g_ub = g_ub.data_ptr<scalar_t>();
      f.splits = static_cast<int>(splits);
      f.C = static_cast<int>(C);
      f.r = static_cast<int>(r);
      f.r_pad = static_cast<int>(r_pad);
      const int64_t per_block = kColsThreads / r_pad;
      const int64_t blocks = (C + per_block - 1) / per_block;
      const size_t smem = static_cast<size_t>(r + 2 * kColsThreads) * sizeof(A);
      bwd_finalize_kernel<scalar_t><<<static_cast<unsigned>(blocks), kColsThreads, smem, stream>>>(f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (fin) return {grad_message, g_nw, g_nb, g_dw, g_db, g_uw, g_ub};
  // Parameter gradients from the split partials (ATen sums: fixed order, deterministic).
  const at::Tensor up_w = part_w.sum(0), up_b = part_b.sum(0), a = part_a.sum(0), down_b = gz.sum(0);
  const at::Tensor gamma = nw.to(stat), beta = nb.to(stat), wd = dw.to(stat);
  const at::Tensor down_w = a * gamma.unsqueeze(0) + down_b.unsqueeze(1) * beta.unsqueeze(0);
  const at::Tensor g_nw_a = (wd * a).sum(0), g_nb_a = at::matmul(down_b, wd);
  return {grad_message, g_nw_a.to(dt), g_nb_a.to(dt), down_w.to(dt), down_b.to(dt), up_w.to(dt), up_b.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(sa2vp_kernels, CUDA, m) {
  m.impl("prompt_add_fwd", &prompt_add_fwd_cuda);
  m.impl("prompt_add_bwd", &prompt_add_bwd_cuda);
}

}  // namespace sa2vp
