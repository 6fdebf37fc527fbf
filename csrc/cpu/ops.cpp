// CPU ops of the fused BatchNorm + ReLU + route op and of bn_add_relu_route, the same with a residual
// added before the ReLU (schemas: taskrouting/ops/schemas.py): argument checks, outputs, which stage
// runs, and the one CPU registration. The stages are in stats.cpp, normalize.cpp and backward.cpp;
// kernels.h holds what they share.
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace taskrouting {
namespace cpu {
namespace {

Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), spatial_size(x)}; }

Route route_of(const Tensor& route, int64_t channels) {
  return {route.data_ptr<bool>(), channels, route.dim() == 2};
}

// used[c]: some sample of the batch goes through channel c.
std::vector<char> channels_used(Route r, int64_t n, int64_t c) {
  std::vector<char> used(c, 0);
  const int64_t rows = r.per_sample ? n : 1;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < c; ++j) used[j] |= r.mask[i * c + j];
  return used;
}

// Used and unused channels interleaved in proportion, so that any contiguous share of the list
// holds its share of each: their costs differ (an unused channel is only zero-filled), and one
// task's channels may cluster, which would load one thread with most of the work.
std::vector<int64_t> balanced_order(const std::vector<char>& used) {
  std::vector<int64_t> heavy, light;
  for (int64_t c = 0; c < static_cast<int64_t>(used.size()); ++c) (used[c] ? heavy : light).push_back(c);
  std::vector<int64_t> order;
  order.reserve(used.size());
  size_t h = 0, l = 0;
  // Take from the list whose next item sits earlier in its own list: (h + 0.5) / |H| vs (l + 0.5) / |L|.
  while (h < heavy.size() || l < light.size()) {
    const bool take_heavy = l == light.size() ||
        (h < heavy.size() && (2 * h + 1) * light.size() <= (2 * l + 1) * heavy.size());
    order.push_back(take_heavy ? heavy[h++] : light[l++]);
  }
  return order;
}

}  // namespace

Prepared prepare(const Tensor& x_in, const Tensor& route_in) {
  check_input(x_in);
  check_route(route_in, x_in);
  TORCH_CHECK(x_in.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  Prepared p;
  p.x = x_in.contiguous(layout_of(x_in));
  p.route = route_in.contiguous();
  p.sh = shape_of(p.x);
  p.r = route_of(p.route, p.sh.c);
  p.used = channels_used(p.r, p.sh.n, p.sh.c);
  p.rows = is_rows_layout(p.x) || p.sh.s == 1;  // one position per sample: planes are rows
  if (!p.rows) p.order = balanced_order(p.used);
  return p;
}

namespace {

// y: bn_add_relu_route's output, the gate of its backward (undefined for bn_relu_route).
BackwardInputs prepare_backward(const Tensor& grad_y, const Tensor& x_in, const Tensor& route_in,
                                const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                const Tensor& mean_in, const Tensor& invstd_in, const Tensor& y = Tensor()) {
  BackwardInputs in;
  in.p = prepare(x_in, route_in);
  static_cast<BackwardTensors&>(in) = backward_tensors(grad_y, in.p.x, weight, bias, mean_in, invstd_in);
  if (y.defined()) in.y = in_layout_of(y, "y", in.p.x);
  in.scale = in.invstd * in.w;
  in.shift = in.b - in.mean * in.scale;
  return in;
}

std::tuple<Tensor, Tensor, Tensor> channel_stats_cpu(const Tensor& x_in, const Tensor& route_in,
                                                     bool routed_stats, bool all_channels) {
  const Prepared p = prepare(x_in, route_in);
  Tensor mean = per_channel_empty(p.x), var = per_channel_empty(p.x), count = per_channel_empty(p.x);
  channel_stats(p, routed_stats, all_channels, mean, var, count);
  return {mean, var, count};
}

Tensor normalize_relu_route_cpu(const Tensor& x_in, const Tensor& route_in, const Tensor& mean_in,
                                const Tensor& invstd_in, const std::optional<Tensor>& weight,
                                const std::optional<Tensor>& bias) {
  const Prepared p = prepare(x_in, route_in);
  const Tensor mean = per_channel(mean_in, "mean", p.x), invstd = per_channel(invstd_in, "invstd", p.x);
  const Tensor w = per_channel_or(weight, "weight", p.x, 1.0), b = per_channel_or(bias, "bias", p.x, 0.0);
  Tensor y = at::empty_like(p.x);
  normalize_relu_route(p, y, mean, invstd, w, b);
  return y;
}

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The fused forward of both ops: residual_in undefined for bn_relu_route.
ForwardResult fused_forward(const Tensor& x_in, const Tensor& residual_in, const Tensor& route_in,
                            const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                            const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                            bool training, double eps, bool routed_stats, bool stats_all_channels) {
  const Prepared p = prepare(x_in, route_in);
  const Tensor residual = residual_in.defined() ? in_layout_of(residual_in, "residual", p.x) : Tensor();
  const Tensor w = per_channel_or(weight, "weight", p.x, 1.0), b = per_channel_or(bias, "bias", p.x, 0.0);
  ForwardOutputs out = forward_outputs(p.x, training, running_mean, running_var, eps);
  bn_relu_route(p, out, w, b, training, eps, routed_stats, stats_all_channels, residual);
  return {out.y, out.mean, out.invstd, out.var, out.count};
}

ForwardResult bn_relu_route_cpu(const Tensor& x, const Tensor& route, const std::optional<Tensor>& weight,
                                const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                                const std::optional<Tensor>& running_var, bool training, double eps, bool routed_stats,
                                bool stats_all_channels) {
  return fused_forward(x, Tensor(), route, weight, bias, running_mean, running_var, training, eps, routed_stats,
                       stats_all_channels);
}

ForwardResult bn_add_relu_route_cpu(const Tensor& x, const Tensor& residual, const Tensor& route,
                                    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                                    bool training, double eps, bool routed_stats, bool stats_all_channels) {
  return fused_forward(x, residual, route, weight, bias, running_mean, running_var, training, eps, routed_stats,
                       stats_all_channels);
}

std::tuple<Tensor, Tensor> backward_reduce_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& route,
                                               const Tensor& mean, const Tensor& invstd,
                                               const std::optional<Tensor>& weight,
                                               const std::optional<Tensor>& bias) {
  BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  Tensor sum_dy = per_channel_empty(in.p.x), sum_dy_xmu = per_channel_empty(in.p.x);
  backward_reduce(in, sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

Tensor backward_apply_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& route, const Tensor& mean,
                          const Tensor& invstd, const std::optional<Tensor>& weight,
                          const std::optional<Tensor>& bias, const Tensor& sum_dy_in,
                          const Tensor& sum_dy_xmu_in, const Tensor& count_in, bool training,
                          bool routed_stats) {
  BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  const Tensor sum_dy = per_channel(sum_dy_in, "sum_dy", in.p.x);
  const Tensor sum_dy_xmu = per_channel(sum_dy_xmu_in, "sum_dy_xmu", in.p.x);
  const Tensor count = checked_count(count_in, in.p.x, training);
  Tensor dx = at::empty_like(in.p.x);
  backward_apply(in, sum_dy, sum_dy_xmu, count, training, routed_stats, dx);
  return dx;
}

// sum(g * (x - mean)) * invstd on the channels some sample uses, exactly 0 on the others (also where
// their statistics are not finite): one loop over the channels instead of a handful of tensor ops.
Tensor grad_weight_of(const Prepared& p, const Tensor& sum_dy_xmu, const Tensor& invstd) {
  Tensor gw = at::empty_like(sum_dy_xmu);
  AT_DISPATCH_FLOATING_TYPES(gw.scalar_type(), "grad_weight_cpu", [&] {
    const scalar_t *s = sum_dy_xmu.data_ptr<scalar_t>(), *is = invstd.data_ptr<scalar_t>();
    scalar_t* out = gw.data_ptr<scalar_t>();
    for (int64_t c = 0; c < p.sh.c; ++c) out[c] = p.used[c] ? s[c] * is[c] : scalar_t(0);
  });
  return gw;
}

// The fused backward of both ops: [grad_x, grad_residual, grad_weight, grad_bias] as output_mask asks
// (grad_residual only given in.y, bn_add_relu_route's).
std::tuple<Tensor, Tensor, Tensor, Tensor> fused_backward(const BackwardInputs& in, const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, const Tensor& count_in,
                                                          bool training, bool routed_stats,
                                                          std::array<bool, 4> output_mask) {
  const Tensor count = checked_count(count_in, in.p.x, training);
  Tensor sum_dy = at::zeros({in.p.sh.c}, in.mean.options()), sum_dy_xmu = at::zeros_like(sum_dy);
  Tensor dx = output_mask[0] ? at::empty_like(in.p.x) : empty_grad(in.p.x);
  Tensor dr = output_mask[1] ? at::empty_like(in.p.x) : empty_grad(in.p.x);
  bn_relu_route_backward(in, count, training, routed_stats, output_mask, sum_dy, sum_dy_xmu, dx, dr);
  auto param_grad = [&](const std::optional<Tensor>& param, const Tensor& value, bool needed) {
    if (!needed || !param.has_value() || !param->defined()) return empty_grad(in.p.x);
    return value.to(param->scalar_type());
  };
  return {dx, dr, param_grad(weight, grad_weight_of(in.p, sum_dy_xmu, in.invstd), output_mask[2]),
          param_grad(bias, sum_dy, output_mask[3])};
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_route_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                              const Tensor& route, const std::optional<Tensor>& weight,
                                                              const std::optional<Tensor>& bias, const Tensor& mean,
                                                              const Tensor& invstd, const Tensor& count, bool training,
                                                              bool routed_stats, std::array<bool, 3> output_mask) {
  const BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  auto [dx, dr, dw, db] = fused_backward(in, weight, bias, count, training, routed_stats,
                                         {output_mask[0], false, output_mask[1], output_mask[2]});
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_add_relu_route_backward_cpu(
    const Tensor& grad_y, const Tensor& y, const Tensor& x, const Tensor& route, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, const Tensor& count, bool training,
    bool routed_stats, std::array<bool, 4> output_mask) {
  const BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd, y);
  return fused_backward(in, weight, bias, count, training, routed_stats, output_mask);
}

void update_running_stats_cpu(Tensor& running_mean, Tensor& running_var, const Tensor& mean_in,
                              const Tensor& var_in, const Tensor& count_in, double momentum) {
  check_running_update(running_mean, running_var, mean_in, var_in, count_in);
  update_running_stats(running_mean, running_var, mean_in, var_in, count_in, momentum);
}

void update_task_running_stats_cpu(Tensor& task_mean, Tensor& task_var, Tensor& task_count, Tensor& task_last,
                                   const Tensor& batches, int64_t task, const Tensor& mean, const Tensor& var,
                                   const Tensor& count, std::optional<double> momentum) {
  check_task_update(task_mean, task_var, task_count, task_last, batches, task);
  Tensor row_mean = task_mean.select(0, task), row_var = task_var.select(0, task);
  check_running_update(row_mean, row_var, mean, var, count);
  int64_t *n = task_count.data_ptr<int64_t>() + task, *last = task_last.data_ptr<int64_t>() + task;
  const int64_t batch = batches.data_ptr<int64_t>()[0] + 1;  // this batch: the layer counts it after the op
  update_running_stats(row_mean, row_var, mean, var, count,
                       task_factor(*n + 1, batch - *last, !momentum.has_value(), momentum.value_or(0.0)));
  *n += 1, *last = batch;  // after the update: a rejected call changes nothing
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(taskrouting, CPU, m) {
  m.impl("update_running_stats", &cpu::update_running_stats_cpu);
  m.impl("update_task_running_stats", &cpu::update_task_running_stats_cpu);
  m.impl("bn_relu_route", &cpu::bn_relu_route_cpu);
  m.impl("bn_relu_route_backward", &cpu::bn_relu_route_backward_cpu);
  m.impl("bn_add_relu_route", &cpu::bn_add_relu_route_cpu);
  m.impl("bn_add_relu_route_backward", &cpu::bn_add_relu_route_backward_cpu);
  m.impl("channel_stats", &cpu::channel_stats_cpu);
  m.impl("normalize_relu_route", &cpu::normalize_relu_route_cpu);
  m.impl("backward_reduce", &cpu::backward_reduce_cpu);
  m.impl("backward_apply", &cpu::backward_apply_cpu);
}

}  // namespace taskrouting
