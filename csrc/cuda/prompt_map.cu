// CUDA kernels of prompt_map: out = resample(embed) @ weight.T + bias + pos_embed.
// float16 / bfloat16 / float32 accumulate in float32, float64 in float64.
//
// Forward: one block per output token; the block blends the token's (up to 4) source rows into shared
// memory, then each thread computes channels c = tid, tid + blockDim, ... (dot over r).
// Backward, three launches, no atomics, every sum in a fixed order:
//   1. one block per token: res[n] (recomputed) and d_res[n] = grad[n] @ weight (one warp per column
//      k, shuffle reduction);
//   2. d_weight[c, k] = sum_n grad[n, c] res[n, k] and d_bias[c] = sum_n grad[n, c]: blocks of 32
//      channels x 8 columns, 16 token slices per block added in a fixed tree;
//   3. one thread per (source row j, k): d_embed[j, k] gathers d_res over the outputs j's taps reach.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "prompt_map.h"

namespace sa2vp {
namespace prompt_map {
namespace {

constexpr int kFwdThreads = 128;
constexpr int kRowThreads = 256;  // 8 warps
constexpr int kThreads = 128;

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ embed, const scalar_t* __restrict__ weight,
                               const scalar_t* __restrict__ bias, const scalar_t* __restrict__ pos,
                               scalar_t* __restrict__ out, const Shape s) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* row = reinterpret_cast<acc_t*>(smem);
  const int64_t n = blockIdx.x;
  const RowTaps<acc_t> taps = row_taps<acc_t>(n, s);
  for (int64_t k = threadIdx.x; k < s.r; k += blockDim.x) row[k] = blend(taps, embed, s.r, k);
  __syncthreads();
  for (int64_t c = threadIdx.x; c < s.C; c += blockDim.x) {
    const scalar_t* w = weight + c * s.r;
    acc_t acc = acc_t(0);
    for (int64_t k = 0; k < s.r; ++k) acc += row[k] * static_cast<acc_t>(w[k]);
    if (bias != nullptr) acc += static_cast<acc_t>(bias[c]);
    if (pos != nullptr) acc += static_cast<acc_t>(pos[n * s.C + c]);
    out[n * s.C + c] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void backward_rows_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ embed,
                                     const scalar_t* __restrict__ weight, acc_t* __restrict__ res,
                                     acc_t* __restrict__ d_res, const Shape s) {
  const int64_t n = blockIdx.x;
  const RowTaps<acc_t> taps = row_taps<acc_t>(n, s);
  for (int64_t k = threadIdx.x; k < s.r; k += blockDim.x) res[n * s.r + k] = blend(taps, embed, s.r, k);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const scalar_t* g = grad + n * s.C;
  for (int64_t k = warp; k < s.r; k += warps) {
    acc_t acc = acc_t(0);
    for (int64_t c = lane; c < s.C; c += 32) {
      acc += static_cast<acc_t>(g[c]) * static_cast<acc_t>(weight[c * s.r + k]);
    }
    acc = warp_sum(acc);
    if (lane == 0) d_res[n * s.r + k] = acc;
  }
}

// d_weight and d_bias as one (C, r + 1) product grad^T @ [res | 1]. A block takes kWCols channels
// (threadIdx.x, coalesced reads of grad) and kWRanks columns; its kWSlices rows of threads
// (threadIdx.y) each sum every kWSlices-th token, and the slices are added in a fixed tree. Summing
// all N tokens in one accumulator per thread instead loses float32 accuracy on large grids (the
// error grows with N; 56 x 56 tokens already exceed twice PyTorch's error) and runs only C * (r + 1)
// threads.
constexpr int kWCols = 32, kWSlices = 16, kWRanks = 8;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWCols * kWSlices)
backward_weight_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ res,
                       scalar_t* __restrict__ d_weight, scalar_t* __restrict__ d_bias, const Shape s) {
  __shared__ acc_t part[kWSlices][kWRanks][kWCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWCols + tx;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kWRanks;  // columns k0 .. of [res | 1]
  acc_t acc[kWRanks];
#pragma unroll
  for (int i = 0; i < kWRanks; ++i) acc[i] = acc_t(0);
  if (c < s.C) {
    for (int64_t n = ty; n < s.N; n += kWSlices) {
      const acc_t g = static_cast<acc_t>(grad[n * s.C + c]);
      const acc_t* rn = res + n * s.r;
#pragma unroll
      for (int i = 0; i < kWRanks; ++i) {
        const int64_t k = k0 + i;
        const acc_t v = k < s.r ? rn[k] : (k == s.r ? acc_t(1) : acc_t(0));
        acc[i] += g * v;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kWRanks; ++i) part[ty][i][tx] = acc[i];
  __syncthreads();
#pragma unroll
  for (int half = kWSlices / 2; half > 0; half >>= 1) {
    if (ty < half) {
#pragma unroll
      for (int i = 0; i < kWRanks; ++i) part[ty][i][tx] += part[ty + half][i][tx];
    }
    __syncthreads();
  }
  if (ty < kWRanks && c < s.C) {
    const int64_t k = k0 + ty;
    const acc_t v = part[0][ty][tx];
    if (k < s.r) {
      d_weight[c * s.r + k] = static_cast<scalar_t>(v);
    } else if (k == s.r) {
      d_bias[c] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_embed_kernel(const acc_t* __restrict__ d_res, scalar_t* __restrict__ d_embed,
                                      const Shape s) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= (s.T + s.eh * s.ew) * s.r) return;
  const int64_t j = idx / s.r, k = idx % s.r;
  if (j < s.T) {
    d_embed[idx] = static_cast<scalar_t>(d_res[idx]);
    return;
  }
  const int64_t sy = (j - s.T) / s.ew, sx = (j - s.T) % s.ew;
  int64_t y_lo, y_hi, x_lo, x_hi;
  adjoint_range(sy, s.eh, s.gh, &y_lo, &y_hi);
  adjoint_range(sx, s.ew, s.gw, &x_lo, &x_hi);
  acc_t acc = acc_t(0);
  for (int64_t y = y_lo; y <= y_hi; ++y) {
    const acc_t wy = tap_weight<acc_t>(y, sy, s.eh, s.gh);
    if (wy == acc_t(0)) continue;
    for (int64_t x = x_lo; x <= x_hi; ++x) {
      const acc_t wx = tap_weight<acc_t>(x, sx, s.ew, s.gw);
      if (wx == acc_t(0)) continue;
      acc += (wy * wx) * d_res[(s.T + y * s.gw + x) * s.r + k];
    }
  }
  d_embed[idx] = static_cast<scalar_t>(acc);
}

unsigned int blocks_for(int64_t work, int threads) {
  return static_cast<unsigned int>((work + threads - 1) / threads);
}

void check_cuda(const at::Tensor& embed) {
  SA2VP_CHECK(embed.is_cuda(), "embed must be a CUDA tensor, got ", embed.device());
  const auto dt = embed.scalar_type();
  SA2VP_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
              "embed must be float16, bfloat16, float32 or float64 on CUDA, got ", dt);
}

at::ScalarType acc_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor prompt_map_fwd_cuda(const at::Tensor& embed, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos_embed,
                               int64_t grid_h, int64_t grid_w, int64_t embed_h, int64_t embed_w,
                               int64_t num_prefix) {
  check_fwd_args(embed, weight, bias, pos_embed, grid_h, grid_w, embed_h, embed_w, num_prefix);
  check_cuda(embed);
  const c10::cuda::CUDAGuard device_guard(embed.device());
  const Shape s = make_shape(embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix);
  const at::Tensor e = embed.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor p = pos_embed.has_value() ? pos_embed->contiguous() : at::Tensor();
  at::Tensor out = at::empty({1, s.N, s.C}, embed.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embed.scalar_type(), "prompt_map_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = static_cast<size_t>(s.r) * sizeof(acc_t);
    SA2VP_CHECK(smem <= 48 * 1024, "prompt_map: rank r = ", s.r, " is too large for the CUDA kernel");
    forward_kernel<scalar_t, acc_t><<<blocks_for(s.N, 1), kFwdThreads, smem, stream>>>(
        e.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
        p.defined() ? p.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_map_bwd_cuda(const at::Tensor& grad_out,
                                                                   const at::Tensor& embed,
                                                                   const at::Tensor& weight, int64_t grid_h,
                                                                   int64_t grid_w, int64_t embed_h,
                                                                   int64_t embed_w, int64_t num_prefix) {
  check_bwd_args(grad_out, embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix);
  check_cuda(embed);
  const c10::cuda::CUDAGuard device_guard(embed.device());
  const Shape s = make_shape(embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix);
  const at::Tensor g = grad_out.contiguous(), e = embed.contiguous(), w = weight.contiguous();
  const auto acc_opts = embed.options().dtype(acc_type(embed.scalar_type()));
  at::Tensor res = at::empty({s.N, s.r}, acc_opts), d_res = at::empty({s.N, s.r}, acc_opts);
  at::Tensor d_embed = at::empty_like(e), d_weight = at::empty_like(w);
  at::Tensor d_bias = at::empty({s.C}, weight.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, embed.scalar_type(), "prompt_map_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_rows_kernel<scalar_t, acc_t><<<blocks_for(s.N, 1), kRowThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), res.data_ptr<acc_t>(),
        d_res.data_ptr<acc_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 weight_blocks(blocks_for(s.C, kWCols), blocks_for(s.r + 1, kWRanks));
    backward_weight_kernel<scalar_t, acc_t><<<weight_blocks, dim3(kWCols, kWSlices), 0, stream>>>(
        g.data_ptr<scalar_t>(), res.data_ptr<acc_t>(), d_weight.data_ptr<scalar_t>(), d_bias.data_ptr<scalar_t>(),
        s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t rows = s.T + s.eh * s.ew;
    backward_embed_kernel<scalar_t, acc_t><<<blocks_for(rows * s.r, kThreads), kThreads, 0, stream>>>(
        d_res.data_ptr<acc_t>(), d_embed.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d_embed, d_weight, d_bias};
}

}  // namespace
}  // namespace prompt_map
}  // namespace sa2vp

TORCH_LIBRARY_IMPL(sa2vp_kernels, CUDA, m) {
  m.impl("prompt_map_fwd", &sa2vp::prompt_map::prompt_map_fwd_cuda);
  m.impl("prompt_map_bwd", &sa2vp::prompt_map::prompt_map_bwd_cuda);
}
