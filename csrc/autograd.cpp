// Autograd of the compiled ops (local_attn_fwd, prompt_add_fwd, prompt_map_fwd), for every device.
//
// The formulas are those of the pure-PyTorch references; the forward and backward kernels are reached
// through the dispatcher (so CPU, CUDA and fake/meta tensors all work, and torch.compile traces them).
// Written in C++ rather than with torch.library.register_autograd: a call then costs a few
// microseconds of host time instead of tens, which matters on a GPU, where these kernels take tens of
// microseconds. (The Triton ops keep their Python autograd in sa2vp_kernels/<op>.py.)
//
// The backward ops have no derivative: their Autograd kernel is PyTorch's "not implemented" one, so a
// second derivative (create_graph=True, then a backward through the first) raises an error naming the
// op instead of treating the backward as constant (which PyTorch does, with a warning, for ops with
// no Autograd kernel at all: a silently wrong zero).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"

namespace sa2vp {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// (sym_stride: under torch.compile with dynamic shapes, stride() would turn every symbolic stride into
// a fixed number, e.g. stride(0) = N * C, and each new token count would recompile)
Tensor last_dim_contiguous(const Tensor& t) { return t.sym_stride(-1) == 1 ? t : t.contiguous(); }

// ---- local cross attention ------------------------------------------------------------------------

using AttnFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t,
                                           int64_t, bool, double);
using AttnBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, const Tensor&, int64_t, int64_t, int64_t, int64_t,
                                                   bool, double);

struct LocalAttnFunction : public torch::autograd::Function<LocalAttnFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               int64_t grid_h, int64_t grid_w, int64_t window, int64_t num_prefix, bool zero_border,
                               double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto fwd = op_handle<AttnFwd>("sa2vp_kernels::local_attn_fwd");
    auto [out, lse] = fwd.call(q, k, v, grid_h, grid_w, window, num_prefix, zero_border, scale);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["geometry"] = std::vector<int64_t>{grid_h, grid_w, window, num_prefix};
    ctx->saved_data["zero_border"] = zero_border;
    ctx->saved_data["scale"] = scale;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<AttnBwd>("sa2vp_kernels::local_attn_bwd");
    const variable_list s = ctx->get_saved_variables();
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    const auto g = ctx->saved_data["geometry"].toIntVector();
    auto [dq, dk, dv] = bwd.call(grad_out, s[0], s[1], s[2], s[3], s[4], g[0], g[1], g[2], g[3],
                                 ctx->saved_data["zero_border"].toBool(), ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> local_attn_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t grid_h,
                                                   int64_t grid_w, int64_t window, int64_t num_prefix,
                                                   bool zero_border, double scale) {
  // The arguments are checked here, before any backend runs, on concrete shapes (symbolic ones, while
  // torch.compile traces, are left to the kernels' fake implementations). On a GPU the CUDA kernel's own
  // check of a wrong N took the process down with a segmentation fault instead of raising (seen on an
  // H100 and an H200, 2026-11-27); raising from here keeps bad arguments away from that path.
  if (!q.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
      !k.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
      !v.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    check_local_attn_args(q, k, v, grid_h, grid_w, window, num_prefix);
  }
  auto r = LocalAttnFunction::apply(q, k, v, grid_h, grid_w, window, num_prefix, zero_border, scale);
  return {r[0], r[1]};
}

// ---- prompt add -------------------------------------------------------------------------------------

using AddFwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const OptTensor&, const OptTensor&, double, double, double,
                                                          int64_t);
using AddBwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, double, double, int64_t);

struct PromptAddFunction : public torch::autograd::Function<PromptAddFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& target, const Tensor& message,
                               const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& down_weight,
                               const Tensor& down_bias, const Tensor& up_weight, const Tensor& up_bias,
                               const OptTensor& deep, const OptTensor& deep_scale, double scale, double dropout_p,
                               double eps, int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto fwd = op_handle<AddFwd>("sa2vp_kernels::prompt_add_fwd");
    auto [out, mean, rstd, z] = fwd.call(target, message, norm_weight, norm_bias, down_weight, down_bias, up_weight,
                                         up_bias, deep, deep_scale, scale, dropout_p, eps, seed);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({mean, rstd, z});
    ctx->save_for_backward(
        {message, mean, rstd, z, norm_weight, norm_bias, down_weight, up_weight, opt(deep), opt(deep_scale)});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    return {out, mean, rstd, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<AddBwd>("sa2vp_kernels::prompt_add_bwd");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &message = s[0], &deep = s[8], &deep_scale = s[9];
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(message);
    variable_list out(14);
    if (ctx->needs_input_grad(0)) out[0] = grad_out;
    bool weights = false;
    for (size_t i = 1; i < 8; ++i) weights = weights || ctx->needs_input_grad(i);
    if (weights) {
      auto r = bwd.call(last_dim_contiguous(grad_out), message, s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                        ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                        ctx->saved_data["seed"].toInt());
      out[1] = std::get<0>(r);
      out[2] = std::get<1>(r);
      out[3] = std::get<2>(r);
      out[4] = std::get<3>(r);
      out[5] = std::get<4>(r);
      out[6] = std::get<5>(r);
      out[7] = std::get<6>(r);
    }
    // deep and deep_scale are edges 8 and 9 when given (always together).
    if (deep.defined() && (ctx->needs_input_grad(8) || ctx->needs_input_grad(9))) {
      const auto stat = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const Tensor summed = grad_out.sum(0, /*keepdim=*/false, stat);
      if (ctx->needs_input_grad(8)) out[8] = (summed * deep_scale.to(stat)).to(deep.scalar_type()).unsqueeze(0);
      if (ctx->needs_input_grad(9)) out[9] = (summed * deep[0].to(stat)).sum(0).to(deep_scale.scalar_type());
    }
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> prompt_add_fwd_autograd(
    const Tensor& target, const Tensor& message, const Tensor& norm_weight, const Tensor& norm_bias,
    const Tensor& down_weight, const Tensor& down_bias, const Tensor& up_weight, const Tensor& up_bias,
    const OptTensor& deep, const OptTensor& deep_scale, double scale, double dropout_p, double eps, int64_t seed) {
  auto r = PromptAddFunction::apply(target, message, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias,
                                    deep, deep_scale, scale, dropout_p, eps, seed);
  return {r[0], r[1], r[2], r[3]};
}

// ---- prompt map -------------------------------------------------------------------------------------

using MapFwd = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t,
                      int64_t, int64_t);
using MapBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                                  int64_t, int64_t, int64_t);

struct PromptMapFunction : public torch::autograd::Function<PromptMapFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& embed, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& pos_embed, int64_t grid_h, int64_t grid_w, int64_t embed_h,
                               int64_t embed_w, int64_t num_prefix) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto fwd = op_handle<MapFwd>("sa2vp_kernels::prompt_map_fwd");
    Tensor out = fwd.call(embed, weight, bias, pos_embed, grid_h, grid_w, embed_h, embed_w, num_prefix);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({embed, weight});
    ctx->saved_data["geometry"] = std::vector<int64_t>{grid_h, grid_w, embed_h, embed_w, num_prefix};
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["has_pos"] = pos_embed.has_value() && pos_embed->defined();
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<MapBwd>("sa2vp_kernels::prompt_map_bwd");
    const variable_list s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool(), has_pos = ctx->saved_data["has_pos"].toBool();
    variable_list out(9);
    if (!grads[0].defined()) return out;  // no gradient flows back: all zero
    const Tensor grad_out = grads[0].contiguous();
    // Edges: embed 0, weight 1, then bias and pos_embed when given.
    const size_t bias_edge = 2, pos_edge = has_bias ? 3 : 2;
    const bool need_bias = has_bias && ctx->needs_input_grad(bias_edge);
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || need_bias) {
      const auto g = ctx->saved_data["geometry"].toIntVector();
      auto [d_embed, d_weight, d_bias] = bwd.call(grad_out, s[0], s[1], g[0], g[1], g[2], g[3], g[4]);
      out[0] = d_embed;
      out[1] = d_weight;
      if (has_bias) out[2] = d_bias;
    }
    if (has_pos && ctx->needs_input_grad(pos_edge)) out[3] = grads[0];
    return out;
  }
};

Tensor prompt_map_fwd_autograd(const Tensor& embed, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& pos_embed, int64_t grid_h, int64_t grid_w, int64_t embed_h,
                               int64_t embed_w, int64_t num_prefix) {
  return PromptMapFunction::apply(embed, weight, bias, pos_embed, grid_h, grid_w, embed_h, embed_w, num_prefix)[0];
}

}  // namespace
}  // namespace sa2vp

TORCH_LIBRARY_IMPL(sa2vp_kernels, Autograd, m) {
  m.impl("local_attn_fwd", &sa2vp::local_attn_fwd_autograd);
  m.impl("prompt_add_fwd", &sa2vp::prompt_add_fwd_autograd);
  m.impl("prompt_map_fwd", &sa2vp::prompt_map_fwd_autograd);
  m.impl("local_attn_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("prompt_add_bwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("prompt_map_bwd", torch::autograd::autogradNotImplementedFallback());
}
