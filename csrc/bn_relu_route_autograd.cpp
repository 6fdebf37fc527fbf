// Autograd of taskrouting::bn_relu_route and taskrouting::bn_add_relu_route for the compiled kernels,
// on every device: the forward op below autograd, then its backward op with what it saved.
//
// In C++ rather than with torch.library.register_autograd (which the Triton family uses, same
// wiring: taskrouting/ops/schemas.py) because the Python wrapper costs ~30 us a call on torch
// 2.13, most of it re-reading the op's schema: more than the kernels take on a 16x512x7x7 layer.
//
// The kernels' backward is not differentiable, so under create_graph (grad mode on during
// backward) the first backward is the op's *_backward_differentiable instead: the reference
// formula in PyTorch ops (taskrouting/ops/reference.py), exact to second order.
//
// bn_add_relu_route saves its output y instead of the residual (the next convolution keeps y
// anyway): its backward gates on y > 0.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace taskrouting {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, bool, double, bool, bool);
using Backward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, const Tensor&, bool, bool, std::array<bool, 3>);

using DifferentiableBackward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, bool, double, bool, std::array<bool, 3>);

// The typed handle of an op, looked up once per call site (a static there).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::optional<Tensor> optional_of(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

class BNReLURoute : public torch::autograd::Function<BNReLURoute> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& route,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                               bool training, double eps, bool routed_stats, bool stats_all_channels) {
    static const auto op = op_handle<Forward>("taskrouting::bn_relu_route");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, invstd, var, count] =
        op.call(x, route, weight, bias, running_mean, running_var, training, eps, routed_stats, stats_all_channels);
    ctx->save_for_backward({x, route, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd, count});
    ctx->saved_data["training"] = training;
    ctx->saved_data["routed_stats"] = routed_stats;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, invstd, var, count});
    // The statistics get no gradient: without this, autograd would fill four zero tensors for them
    // on every backward.
    ctx->set_materialize_grads(false);
    return {y, mean, invstd, var, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op_handle<Backward>("taskrouting::bn_relu_route_backward");
    static const auto differentiable_op =
        op_handle<DifferentiableBackward>("taskrouting::bn_relu_route_backward_differentiable");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &route = saved[1], &weight = saved[2], &bias = saved[3];
    // needs_input_grad counts the tensor arguments that were given: x, route, then weight and
    // bias when present.
    int64_t edge = 2;
    const bool need_w = weight.defined() && ctx->needs_input_grad(edge++);
    const bool need_b = bias.defined() && ctx->needs_input_grad(edge++);
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), need_w, need_b};
    variable_list out(10);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return out;
    const bool training = ctx->saved_data["training"].toBool();
    const bool routed_stats = ctx->saved_data["routed_stats"].toBool();
    auto [gx, gw, gb] =
        at::GradMode::is_enabled()
            ? differentiable_op.call(grads[0], x, route, optional_of(weight), optional_of(bias), saved[4], saved[5],
                                     training, ctx->saved_data["eps"].toDouble(), routed_stats, mask)
            : backward_op.call(grads[0], x, route, optional_of(weight), optional_of(bias), saved[4], saved[5],
                               saved[6], training, routed_stats, mask);
    if (mask[0]) out[0] = gx;
    if (mask[1]) out[2] = gw;
    if (mask[2]) out[3] = gb;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_relu_route_autograd(
    const Tensor& x, const Tensor& route, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
    double eps, bool routed_stats, bool stats_all_channels) {
  const variable_list out = BNReLURoute::apply(x, route, weight, bias, running_mean, running_var, training, eps,
                                               routed_stats, stats_all_channels);
  return {out[0], out[1], out[2], out[3], out[4]};
}

using AddForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, bool, double, bool, bool);
using AddBackward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&, bool, bool, std::array<bool, 4>);
using AddDifferentiableBackward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const Tensor&, const Tensor&, bool, double, bool, std::array<bool, 4>);

class BNAddReLURoute : public torch::autograd::Function<BNAddReLURoute> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual, const Tensor& route,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                               bool training, double eps, bool routed_stats, bool stats_all_channels) {
    static const auto op = op_handle<AddForward>("taskrouting::bn_add_relu_route");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, invstd, var, count] = op.call(x, residual, route, weight, bias, running_mean, running_var,
                                                 training, eps, routed_stats, stats_all_channels);
    ctx->save_for_backward(
        {y, x, route, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd, count});
    ctx->saved_data["training"] = training;
    ctx->saved_data["routed_stats"] = routed_stats;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, invstd, var, count});
    ctx->set_materialize_grads(false);
    return {y, mean, invstd, var, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op_handle<AddBackward>("taskrouting::bn_add_relu_route_backward");
    static const auto differentiable_op =
        op_handle<AddDifferentiableBackward>("taskrouting::bn_add_relu_route_backward_differentiable");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &y = saved[0], &x = saved[1], &route = saved[2], &weight = saved[3], &bias = saved[4];
    // needs_input_grad counts the tensor arguments that were given: x, residual, route, then weight
    // and bias when present.
    int64_t edge = 3;
    const bool need_w = weight.defined() && ctx->needs_input_grad(edge++);
    const bool need_b = bias.defined() && ctx->needs_input_grad(edge++);
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), need_w, need_b};
    variable_list out(11);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return out;
    const bool training = ctx->saved_data["training"].toBool();
    const bool routed_stats = ctx->saved_data["routed_stats"].toBool();
    auto [gx, gr, gw, gb] =
        at::GradMode::is_enabled()
            ? differentiable_op.call(grads[0], y, x, route, optional_of(weight), optional_of(bias), saved[5],
                                     saved[6], training, ctx->saved_data["eps"].toDouble(), routed_stats, mask)
            : backward_op.call(grads[0], y, x, route, optional_of(weight), optional_of(bias), saved[5], saved[6],
                               saved[7], training, routed_stats, mask);
    if (mask[0]) out[0] = gx;
    if (mask[1]) out[1] = gr;
    if (mask[2]) out[3] = gw;
    if (mask[3]) out[4] = gb;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_route_autograd(
    const Tensor& x, const Tensor& residual, const Tensor& route, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, bool training, double eps, bool routed_stats, bool stats_all_channels) {
  const variable_list out = BNAddReLURoute::apply(x, residual, route, weight, bias, running_mean, running_var,
                                                  training, eps, routed_stats, stats_all_channels);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(taskrouting, Autograd, m) {
  m.impl("bn_relu_route", &bn_relu_route_autograd);
  m.impl("bn_add_relu_route", &bn_add_relu_route_autograd);
}

}  // namespace taskrouting
