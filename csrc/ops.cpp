// Operator schemas of sa2vp_kernels (declared once here; CPU implementations live in csrc/cpu,
// CUDA implementations in csrc/cuda, fake/meta implementations and autograd in Python).
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/isa.h"

// Importing sa2vp_kernels._C registers the operators below (no Python bindings needed).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace {
// (instruction set the CPU kernels use now, best one this processor supports): generic, avx2, avx512.
std::tuple<std::string, std::string> cpu_isa_op() {
  return {sa2vp::cpu_isa_name(sa2vp::cpu_isa()), sa2vp::cpu_isa_name(sa2vp::detected_cpu_isa())};
}

// How many threads at::parallel_for, which every CPU kernel uses, runs its work on now: one task per
// thread torch would use, and the distinct thread numbers that ran them counted. 1 when the extension
// was built without OpenMP (the loops then run serially on the caller).
int64_t cpu_threads_op() {
  const int64_t wanted = at::get_num_threads();
  std::vector<char> ran(static_cast<size_t>(wanted), 0);  // ran[t]: written by thread t only
  at::parallel_for(0, wanted, 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num();
    if (t >= 0 && t < wanted) ran[static_cast<size_t>(t)] = 1;
  });
  return std::count(ran.begin(), ran.end(), 1);
}
}  // namespace

TORCH_LIBRARY(sa2vp_kernels, m) {
  // ---- CPU instruction set ---------------------------------------------------------------------
  // (in use, detected): the float32 CPU kernels have AVX-512, AVX2 + FMA and portable versions;
  // SA2VP_CPU_ISA=generic|avx2|avx512 caps the one in use.
  m.def("cpu_isa() -> (str, str)", &cpu_isa_op);
  // Threads the CPU kernels' parallel loops run on now (torch.get_num_threads() when built with OpenMP).
  m.def("cpu_threads() -> int", &cpu_threads_op);
  // ---- local cross attention -------------------------------------------------------------
  // q, k, v: (B, H, N, D), any strides with stride(-1) == 1 preferred; N = num_prefix + grid_h*grid_w.
  // Returns out (B, H, N, D) contiguous, same dtype as q, and lse (B, H, N): the log-sum-exp of the
  // scaled scores of every query, float32 (float64 for float64 inputs).
  m.def(
      "local_attn_fwd(Tensor q, Tensor k, Tensor v, int grid_h, int grid_w, int window, "
      "int num_prefix, bool zero_border, float scale) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v), contiguous, dtype of q.
  m.def(
      "local_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int grid_h, int grid_w, int window, int num_prefix, bool zero_border, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  // ---- prompt ops (schemas added below) ------------------------------------------------------
  // prompt add: out = target + scale * dropout(up(dropout(gelu(down(layer_norm(message))))))
  //                   [+ deep_scale * deep], per token. target, message (B, N, C) with stride(-1) == 1;
  // norm_weight, norm_bias (C,); down_weight (r, C), down_bias (r,); up_weight (C, r), up_bias (C,);
  // deep (1, N, C) and deep_scale (C,) both or neither. Dropout masks come from a counter-based hash
  // of (seed, stream, row, column) (see csrc/prompt_add.h); dropout_p == 0 disables them.
  // Returns out (B, N, C) contiguous, and the per-token mean, rstd (B*N,) and pre-GELU z (B*N, r),
  // float32 (float64 for float64 inputs), saved for the backward.
  m.def(
      "prompt_add_fwd(Tensor target, Tensor message, Tensor norm_weight, Tensor norm_bias, "
      "Tensor down_weight, Tensor down_bias, Tensor up_weight, Tensor up_bias, Tensor? deep, "
      "Tensor? deep_scale, float scale, float dropout_p, float eps, int seed) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_message, grad_norm_weight, grad_norm_bias, grad_down_weight, grad_down_bias,
  // grad_up_weight, grad_up_bias) in the dtype of message; weight grads are deterministic reductions.
  // The grads of target, deep and deep_scale are plain reductions of grad_out, done by the caller.
  m.def(
      "prompt_add_bwd(Tensor grad_out, Tensor message, Tensor mean, Tensor rstd, Tensor z, "
      "Tensor norm_weight, Tensor norm_bias, Tensor down_weight, Tensor up_weight, float scale, "
      "float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // prompt map: out (1, N, C) = resample(embed) @ weight.T + bias + pos_embed, N = num_prefix +
  // grid_h*grid_w. embed (num_prefix + embed_h*embed_w, r) with its grid rows resampled bilinearly
  // (align_corners=False) from (embed_h, embed_w) to (grid_h, grid_w); prefix rows pass through.
  // weight (C, r), bias (C,) or None, pos_embed (1, N, C) or None; all one dtype, contiguous.
  m.def(
      "prompt_map_fwd(Tensor embed, Tensor weight, Tensor? bias, Tensor? pos_embed, int grid_h, "
      "int grid_w, int embed_h, int embed_w, int num_prefix) -> Tensor");
  // Returns (grad_embed, grad_weight, grad_bias (C,)) in the dtype of embed; the grad of pos_embed is
  // grad_out itself. Deterministic.
  m.def(
      "prompt_map_bwd(Tensor grad_out, Tensor embed, Tensor weight, int grid_h, int grid_w, "
      "int embed_h, int embed_w, int num_prefix) -> (Tensor, Tensor, Tensor)");
}
