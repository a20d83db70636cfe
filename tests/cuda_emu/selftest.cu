// Kernels that check the CUDA emulator itself (tests/test_cuda_emulated.py), written as ordinary CUDA
// and rewritten by tests/cuda_emu/build.py like the package's kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

// Per thread t of each block, in out[3t .. 3t + 2]: the sum of x over t's warp (butterfly), the
// __shfl_down_sync tree's value (lane 0: the warp's total) and the block's total, through dynamic
// shared memory and __syncthreads.
__global__ void sums_kernel(const float* x, float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* warp_totals = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, warps = blockDim.x >> 5;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + t;
  const float v = x[i];
  float all = v;
  for (int o = 16; o > 0; o >>= 1) all += __shfl_xor_sync(0xffffffffu, all, o);
  float down = v;
  for (int o = 16; o > 0; o >>= 1) down += __shfl_down_sync(0xffffffffu, down, o);
  if (lane == 0) warp_totals[warp] = down;
  __syncthreads();
  float block = 0.f;
  for (int w = 0; w < warps; ++w) block += warp_totals[w];
  out[3 * i] = all;
  out[3 * i + 1] = down;
  out[3 * i + 2] = block;
}

// Thread t writes its value to shared memory and reads its neighbour's without a barrier between.
__global__ void racy_kernel(const float* x, float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = x[t];
  out[t] = s[(t + 1) % n];
}

// Lanes 0..15 of the warp wait at __syncthreads, lanes 16..31 at __syncwarp for the whole warp.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1.f;
}

// Lanes 16..31 exit; lanes 0..15 shuffle with the full mask.
__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

at::Tensor sums(const at::Tensor& x, int64_t threads) {
  at::Tensor out = at::empty({x.numel(), 3}, x.options());
  const int blocks = static_cast<int>(x.numel() / threads);
  sums_kernel<<<blocks, static_cast<int>(threads), (threads / 32) * sizeof(float), c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor racy(const at::Tensor& x) {
  at::Tensor out = at::empty_like(x);
  racy_kernel<<<1, static_cast<int>(x.numel()), x.numel() * sizeof(float)>>>(x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor divergent_barrier() {
  at::Tensor out = at::zeros({32});
  divergent_barrier_kernel<<<1, 32>>>(out.data_ptr<float>());
  return out;
}

at::Tensor shuffle_after_exit() {
  at::Tensor out = at::zeros({32});
  shuffle_after_exit_kernel<<<1, 32>>>(out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sa2vp_kernels, CUDA, m) {
  m.impl("selftest_sums", &sums);
  m.impl("selftest_racy", &racy);
  m.impl("selftest_divergent_barrier", &divergent_barrier);
  m.impl("selftest_shuffle_after_exit", &shuffle_after_exit);
}
