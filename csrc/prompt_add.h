// Shared pieces of the prompt_add CPU and CUDA kernels: the dropout hash (identical to the Python
// reference in sa2vp_kernels/reference/prompt_add.py and the Triton kernels) and the argument checks.
#pragma once

#include <cstdint>

#include "checks.h"

#ifdef __CUDACC__
#define SA2VP_HD __host__ __device__ __forceinline__
#else
#define SA2VP_HD inline
#endif

namespace sa2vp {
namespace prompt_add_hash {

constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kHiddenStream = 1;
constexpr uint32_t kOutputStream = 2;

// murmur3's 32-bit finaliser.
SA2VP_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// 32-bit key of one dropout stream of a seed in [0, 2**63).
SA2VP_HD uint32_t stream_key(int64_t seed, uint32_t stream) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t lo = static_cast<uint32_t>(s & 0xFFFFFFFFull);
  const uint32_t hi = static_cast<uint32_t>(s >> 32);
  return fmix32(fmix32(hi ^ (stream * kGolden)) ^ lo);
}

SA2VP_HD uint32_t row_state(uint32_t key, uint32_t row) { return fmix32(fmix32(row) ^ key); }

// True when element (row, col) survives: (u >> 1) >= threshold, u = fmix32(row_state ^ col * golden).
SA2VP_HD bool keep(uint32_t row_state_value, uint32_t col, uint32_t threshold) {
  return (fmix32(row_state_value ^ (col * kGolden)) >> 1) >= threshold;
}

// Integer threshold on the 31-bit hash for drop probability p in [0, 1).
inline uint32_t drop_threshold(double p) {
  // floor(p * 2**31 + 0.5), capped at 2**31 - 1, as in the Python reference.
  const uint64_t v = static_cast<uint64_t>(p * 2147483648.0 + 0.5);
  const uint64_t cap = 2147483647ull;
  return static_cast<uint32_t>(v > cap ? cap : v);
}

}  // namespace prompt_add_hash

// The dropout of one prompt_add call: whether it is on, the integer threshold, the keys of the hidden
// and output streams, and the 1 / (1 - p) that scales what is kept.
struct DropoutParams {
  bool active;
  uint32_t threshold, key_hidden, key_out;
  double inv_keep;
  DropoutParams(double p, int64_t seed)
      : active(p > 0.0),
        threshold(prompt_add_hash::drop_threshold(p)),
        key_hidden(prompt_add_hash::stream_key(seed, prompt_add_hash::kHiddenStream)),
        key_out(prompt_add_hash::stream_key(seed, prompt_add_hash::kOutputStream)),
        inv_keep(p > 0.0 ? 1.0 / (1.0 - p) : 1.0) {}
};

}  // namespace sa2vp

#ifndef __CUDACC_RTC__
#include <ATen/ATen.h>
#include <torch/library.h>

namespace sa2vp {

// Validates the arguments of prompt_add_fwd on every backend; returns r.
inline int64_t check_prompt_add_fwd_args(const at::Tensor& target, const at::Tensor& message,
                                         const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                         const at::Tensor& down_weight, const at::Tensor& down_bias,
                                         const at::Tensor& up_weight, const at::Tensor& up_bias,
                                         const c10::optional<at::Tensor>& deep,
                                         const c10::optional<at::Tensor>& deep_scale, double dropout_p,
                                         double eps, int64_t seed) {
  SA2VP_CHECK(message.dim() == 3, "message must be a 3-D (B, N, C) tensor, got ", message.dim(), "-D");
  SA2VP_CHECK(target.sizes() == message.sizes(), "target and message must have the same shape, got ",
              target.sizes(), " and ", message.sizes());
  const int64_t C = message.size(2);
  SA2VP_CHECK(message.numel() > 0, "message must be non-empty, got shape ", message.sizes());
  SA2VP_CHECK(down_weight.dim() == 2 && down_weight.size(1) == C && down_weight.size(0) >= 1,
              "down_weight must be (r, C) with C = ", C, ", got ", down_weight.sizes());
  const int64_t r = down_weight.size(0);
  SA2VP_CHECK(up_weight.dim() == 2 && up_weight.size(0) == C && up_weight.size(1) == r,
              "up_weight must be (C, r) = (", C, ", ", r, "), got ", up_weight.sizes());
  SA2VP_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == C, "norm_weight must be (C,), got ",
              norm_weight.sizes());
  SA2VP_CHECK(norm_bias.dim() == 1 && norm_bias.size(0) == C, "norm_bias must be (C,), got ", norm_bias.sizes());
  SA2VP_CHECK(down_bias.dim() == 1 && down_bias.size(0) == r, "down_bias must be (r,), got ", down_bias.sizes());
  SA2VP_CHECK(up_bias.dim() == 1 && up_bias.size(0) == C, "up_bias must be (C,), got ", up_bias.sizes());
  SA2VP_CHECK(deep.has_value() == deep_scale.has_value(), "deep and deep_scale must be given together");
  const auto dtype = message.scalar_type();
  const auto device = message.device();
  auto same = [&](const at::Tensor& t, const char* name) {
    SA2VP_CHECK(t.scalar_type() == dtype, name, " must have the dtype of message (", dtype, "), got ",
                t.scalar_type());
    SA2VP_CHECK(t.device() == device, name, " must be on the device of message (", device, "), got ", t.device());
  };
  same(target, "target");
  same(norm_weight, "norm_weight");
  same(norm_bias, "norm_bias");
  same(down_weight, "down_weight");
  same(down_bias, "down_bias");
  same(up_weight, "up_weight");
  same(up_bias, "up_bias");
  if (deep.has_value()) {
    SA2VP_CHECK(deep->dim() == 3 && deep->size(0) == 1 && deep->size(1) == message.size(1) && deep->size(2) == C,
                "deep must be (1, N, C) = (1, ", message.size(1), ", ", C, "), got ", deep->sizes());
    SA2VP_CHECK(deep_scale->dim() == 1 && deep_scale->size(0) == C, "deep_scale must be (C,), got ",
                deep_scale->sizes());
    same(*deep, "deep");
    same(*deep_scale, "deep_scale");
  }
  SA2VP_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  SA2VP_CHECK(eps >= 0.0, "eps must be >= 0, got ", eps);
  SA2VP_CHECK(seed >= 0, "seed must be in [0, 2**63), got ", seed);
  SA2VP_CHECK(message.size(0) * message.size(1) < (int64_t(1) << 31), "at most 2**31 - 1 tokens are supported");
  return r;
}

inline void check_prompt_add_bwd_args(const at::Tensor& grad_out, const at::Tensor& message,
                                      const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& z,
                                      const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                      const at::Tensor& down_weight, const at::Tensor& up_weight,
                                      double dropout_p, int64_t seed) {
  SA2VP_CHECK(message.dim() == 3 && message.numel() > 0, "message must be a non-empty 3-D tensor");
  SA2VP_CHECK(grad_out.sizes() == message.sizes(), "grad_out must have the shape of message ", message.sizes(),
              ", got ", grad_out.sizes());
  const int64_t M = message.size(0) * message.size(1);
  const int64_t C = message.size(2);
  SA2VP_CHECK(down_weight.dim() == 2 && down_weight.size(1) == C, "down_weight must be (r, C)");
  const int64_t r = down_weight.size(0);
  SA2VP_CHECK(up_weight.dim() == 2 && up_weight.size(0) == C && up_weight.size(1) == r, "up_weight must be (C, r)");
  SA2VP_CHECK(norm_weight.numel() == C && norm_bias.numel() == C, "norm_weight and norm_bias must be (C,)");
  const auto stat = message.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  SA2VP_CHECK(mean.numel() == M && rstd.numel() == M && z.dim() == 2 && z.size(0) == M && z.size(1) == r,
              "mean, rstd must be (B*N,) and z (B*N, r)");
  SA2VP_CHECK(mean.scalar_type() == stat && rstd.scalar_type() == stat && z.scalar_type() == stat,
              "mean, rstd and z must have dtype ", stat);
  for (const at::Tensor* t : {&grad_out, &norm_weight, &norm_bias, &down_weight, &up_weight}) {
    SA2VP_CHECK(t->scalar_type() == message.scalar_type(), "grad_out and the weights must have the dtype of message");
  }
  for (const at::Tensor* t : {&grad_out, &mean, &rstd, &z, &norm_weight, &norm_bias, &down_weight, &up_weight}) {
    SA2VP_CHECK(t->device() == message.device(), "all tensors must be on the device of message");
  }
  SA2VP_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  SA2VP_CHECK(seed >= 0, "seed must be in [0, 2**63), got ", seed);
}

}  // namespace sa2vp
#endif
