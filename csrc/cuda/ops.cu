// CUDA ops of the fused BatchNorm + ReLU + route op (schemas: taskrouting/ops/schemas.py):
// argument checks, outputs, which kernels run, and the one CUDA registration.
//
// Same semantics as csrc/cpu/ops.cpp (argument checks, outputs in eval mode, empty tensors for
// unrequested grads, channels that are never read). The kernels are in stats.cu, normalize.cu
// and backward.cu; kernels.cuh says how they split the work.
//
// Forward, training: statistics (planes_stats_kernel or rows_stats_kernel, plus
// stats_merge_kernel when the reduction is split into chunks), which also write scale/shift;
// then planes_apply_kernel or rows_apply_kernel. A channel of at most kFusedStashBytes whose
// tensor has enough channels to fill the GPU takes planes_fused_forward_kernel instead: one
// block per channel, x read once. Eval: forward_params_kernel, then the apply kernel.
// Backward: the gradient sums (which also write the grad_x coefficients), then grad_x.
// bn_add_relu_route runs the same kernels with the residual (forward), and with the gate on y
// and grad_residual (backward; ResidualGrad in kernels.cuh).
#include <torch/library.h>

#include <array>
#include <map>
#include <tuple>

#include "kernels.cuh"

namespace taskrouting {
namespace cuda {

using at::Tensor;

int64_t resident_blocks(const void* kernel, size_t smem) {
  // Cached per kernel and device: the occupancy query reads the kernel's attributes.
  static thread_local std::map<std::tuple<const void*, size_t, int>, int64_t> cache;
  const auto key = std::make_tuple(kernel, smem, int(at::cuda::current_device()));
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return cache[key] = int64_t(std::max(per_sm, 1)) * sms;
}

PlanesShape planes_shape(const Problem& p, int vec, int64_t resident) {
  PlanesShape sh;
  const int64_t N = p.n, C = p.c, S = p.s;
  sh.bx = std::min(kThreads, next_pow2(std::max<int64_t>(1, ceil_div(S, int64_t(vec) * kUnroll))));
  sh.by = kThreads / sh.bx;
  int64_t chunks = 1;
  if (C < resident) {  // one block per channel would leave SMs idle: split each channel
    // Rounded down, so that C * chunks blocks run in one wave (no partial last wave).
    const int64_t min_per_block = int64_t(kThreads) * vec * kUnroll * 2;
    chunks = std::max<int64_t>(1, std::min(resident / C, ceil_div(N * S, min_per_block)));
  }
  // Samples first (whole planes), then positions within a plane (multiples of vec).
  int64_t chunks_n = std::max<int64_t>(1, std::min(chunks, ceil_div(N, sh.by)));
  sh.n_per = std::max<int64_t>(1, ceil_div(N, chunks_n));
  chunks_n = std::max<int64_t>(1, ceil_div(N, sh.n_per));
  int64_t chunks_s = std::max<int64_t>(1, std::min(chunks / chunks_n, ceil_div(S, int64_t(sh.bx) * vec * kUnroll)));
  sh.s_per = std::max<int64_t>(vec, ceil_div(ceil_div(S, chunks_s), vec) * vec);
  chunks_s = std::max<int64_t>(1, ceil_div(S, sh.s_per));
  sh.chunks_s = chunks_s;
  sh.chunks = chunks_n * chunks_s;
  return sh;
}

RowsShape rows_shape(const Problem& p, int vec, int64_t resident) {
  RowsShape sh;
  sh.bx = std::min(32, next_pow2(std::max<int64_t>(1, ceil_div(p.c, vec))));
  sh.by = kThreads / sh.bx;
  sh.tiles = std::max<int64_t>(1, ceil_div(p.c, int64_t(sh.bx) * vec));
  TORCH_CHECK(sh.tiles <= kMaxGridX, "taskrouting: too many channels for the CUDA kernels: ", p.c);
  const int64_t M = p.n * p.s;
  int64_t chunks = 1;
  if (sh.tiles < resident) {  // rounded down as in planes_shape
    chunks = std::max<int64_t>(1, std::min(resident / sh.tiles, ceil_div(M, int64_t(sh.by) * kUnroll * 2)));
    chunks = std::min<int64_t>(chunks, kMaxGridY);
  }
  sh.rows_per_chunk = std::max<int64_t>(1, ceil_div(M, chunks));
  sh.chunks = std::max<int64_t>(1, ceil_div(M, sh.rows_per_chunk));
  return sh;
}

namespace {

c10::Device cuda_device(const Tensor& x) {
  check_input(x);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got one on ", x.device());
  return x.device();
}

}  // namespace

Problem prepare(const Tensor& x_in, const Tensor& route_in) {
  check_input(x_in);
  check_route(route_in, x_in);
  Problem p;
  p.x = x_in.contiguous(layout_of(x_in));
  p.route = route_in.contiguous();
  p.n = p.x.size(0);
  p.c = p.x.size(1);
  p.s = spatial_size(p.x);
  // With one position per sample (rank 2, or spatial dims of size 1) planes and rows coincide.
  p.rows = is_rows_layout(p.x) || p.s == 1;
  p.used = p.route.dim() == 2 ? p.route.any(0) : p.route;
  p.r = Route{p.route.data_ptr<bool>(), p.c, p.route.dim() == 2};
  return p;
}

namespace {

std::tuple<Tensor, Tensor, Tensor> channel_stats_cuda(const Tensor& x, const Tensor& route, bool routed_stats,
                                                      bool all_channels) {
  const c10::cuda::CUDAGuard guard(cuda_device(x));
  const Problem p = prepare(x, route);
  Tensor mean = per_channel_empty(p.x), var = per_channel_empty(p.x), count = per_channel_empty(p.x);
  launch_stats(p, routed_stats, all_channels, mean, var, count, Tensor(), Tensor(), Tensor(), Tensor(), 1.0);
  return {mean, var, count};
}

Tensor normalize_relu_route_cuda(const Tensor& x, const Tensor& route, const Tensor& mean_in, const Tensor& invstd_in,
                                 const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(cuda_device(x));
  const Problem p = prepare(x, route);
  const Tensor mean = per_channel(mean_in, "mean", p.x), invstd = per_channel(invstd_in, "invstd", p.x);
  const Tensor w = per_channel_or(weight, "weight", p.x, 1.0), b = per_channel_or(bias, "bias", p.x, 0.0);
  Tensor y = at::empty_like(p.x);
  const Tensor params = at::empty({2, p.c}, mean.options());
  launch_forward_params(mean, invstd, w, b, params);
  launch_forward_apply(p, y, params);
  return y;
}

// Both forward ops; residual: undefined for bn_relu_route, else in p.x's layout.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward(const Problem& p, const Tensor& residual,
                                                           const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias,
                                                           const std::optional<Tensor>& running_mean,
                                                           const std::optional<Tensor>& running_var, bool training,
                                                           double eps, bool routed_stats, bool stats_all_channels) {
  const Tensor w = per_channel_or(weight, "weight", p.x, 1.0), b = per_channel_or(bias, "bias", p.x, 0.0);
  ForwardOutputs out = forward_outputs(p.x, training, running_mean, running_var, eps);
  Tensor &y = out.y, &mean = out.mean, &invstd = out.invstd, &var = out.var, &count = out.count;
  if (!training) {
    const Tensor params = at::empty({2, p.c}, mean.options());
    launch_forward_params(mean, invstd, w, b, params);
    launch_forward_apply(p, y, params, residual);
    return {y, mean, invstd, var, count};
  }
  if (!try_fused_forward(p, y, routed_stats, stats_all_channels, mean, var, count, invstd, w, b, eps, residual)) {
    const Tensor params = at::empty({2, p.c}, mean.options());
    launch_stats(p, routed_stats, stats_all_channels, mean, var, count, invstd, params, w, b, eps);
    launch_forward_apply(p, y, params, residual);
  }
  return {y, mean, invstd, var, count};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_relu_route_cuda(
    const Tensor& x, const Tensor& route, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training, double eps,
    bool routed_stats, bool stats_all_channels) {
  const c10::cuda::CUDAGuard guard(cuda_device(x));
  const Problem p = prepare(x, route);
  return forward(p, Tensor(), weight, bias, running_mean, running_var, training, eps, routed_stats,
                 stats_all_channels);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_route_cuda(
    const Tensor& x, const Tensor& residual, const Tensor& route, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, bool training, double eps, bool routed_stats, bool stats_all_channels) {
  const c10::cuda::CUDAGuard guard(cuda_device(x));
  const Problem p = prepare(x, route);
  const Tensor res = in_layout_of(residual, "residual", p.x);
  return forward(p, res, weight, bias, running_mean, running_var, training, eps, routed_stats, stats_all_channels);
}

struct BackwardInputs : BackwardTensors {
  Problem p;
};

BackwardInputs prepare_backward(const Tensor& grad_y, const Tensor& x, const Tensor& route,
                                const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                const Tensor& mean_in, const Tensor& invstd_in) {
  BackwardInputs in;
  in.p = prepare(x, route);
  static_cast<BackwardTensors&>(in) = backward_tensors(grad_y, in.p.x, weight, bias, mean_in, invstd_in);
  return in;
}

std::tuple<Tensor, Tensor> backward_reduce_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& route,
                                                const Tensor& mean, const Tensor& invstd,
                                                const std::optional<Tensor>& weight,
                                                const std::optional<Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(cuda_device(x));
  const BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  Tensor sum_dy = per_channel_empty(in.p.x), sum_dy_xmu = per_channel_empty(in.p.x);
  launch_grad_reduce(in.p, in.dy, in.mean, in.invstd, in.w, in.b, sum_dy, sum_dy_xmu, Tensor(), Tensor(), false);
  return {sum_dy, sum_dy_xmu};
}

Tensor backward_apply_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& route, const Tensor& mean,
                           const Tensor& invstd, const std::optional<Tensor>& weight,
                           const std::optional<Tensor>& bias, const Tensor& sum_dy_in, const Tensor& sum_dy_xmu_in,
                           const Tensor& count_in, bool training, bool routed_stats) {
  const c10::cuda::CUDAGuard guard(cuda_device(x));
  const BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  const Tensor sum_dy = per_channel(sum_dy_in, "sum_dy", in.p.x);
  const Tensor sum_dy_xmu = per_channel(sum_dy_xmu_in, "sum_dy_xmu", in.p.x);
  const Tensor count = checked_count(count_in, in.p.x, training);
  Tensor dx = at::empty_like(in.p.x);
  const Tensor params = at::empty({5, in.p.c}, in.mean.options());
  launch_grad_params(in.mean, in.invstd, in.w, in.b, sum_dy, sum_dy_xmu, count, training, params);
  launch_grad_apply(in.p, in.dy, dx, params, training, routed_stats);
  return dx;
}

// Both backward ops: output_mask [grad_x, grad_residual, grad_weight, grad_bias]; y: undefined for
// bn_relu_route's (the gate recomputed from x, no grad_residual), else in p.x's layout.
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const BackwardInputs& in, const Tensor& y,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias, const Tensor& count_in,
                                                    bool training, bool routed_stats, std::array<bool, 4> output_mask) {
  const auto [want_dx, want_dr, want_dw, want_db] = output_mask;
  const Tensor count = checked_count(count_in, in.p.x, training);
  // The reduce writes every channel's sums (and grad_weight): no zero-fill unless it does not run.
  const bool reduce = (training && want_dx) || want_dw || want_db;
  const auto sums_options = in.mean.options();
  Tensor sum_dy = reduce ? at::empty({in.p.c}, sums_options) : at::zeros({in.p.c}, sums_options);
  Tensor sum_dy_xmu = reduce ? at::empty_like(sum_dy) : at::zeros_like(sum_dy);
  const bool has_weight = weight.has_value() && weight->defined();
  const Tensor grad_weight = want_dw && has_weight ? at::empty_like(sum_dy) : Tensor();
  Tensor dx = want_dx ? at::empty_like(in.p.x) : empty_grad(in.p.x);
  Tensor dr = want_dr ? at::empty_like(in.p.x) : empty_grad(in.p.x);
  const Tensor params = want_dx ? at::empty({5, in.p.c}, in.mean.options()) : Tensor();
  ResidualGrad res;
  res.y = y;
  if (want_dr) res.grad_residual = dr;
  // The reduce also writes g (to grad_residual) where routed and the apply reads it back instead
  // of y and dy: one routed x-sized read less (training: 3 + 4r x-sized accesses instead of 3 + 5r,
  // r the routed fraction); without grad_x the apply only zeroes the unrouted rest (3r + 1, not 6r).
  res.stored_g = reduce && want_dr;
  if (reduce) {
    launch_grad_reduce(in.p, in.dy, in.mean, in.invstd, in.w, in.b, sum_dy, sum_dy_xmu, params, count, training,
                       grad_weight, res);
  } else if (want_dx) {
    launch_grad_params(in.mean, in.invstd, in.w, in.b, sum_dy, sum_dy_xmu, count, training, params);
  }
  // grad_residual alone is an element-wise pass (no reduction).
  if (want_dx || want_dr)
    launch_grad_apply(in.p, in.dy, want_dx ? dx : Tensor(), params, training, routed_stats, res);
  auto param_grad = [&](const std::optional<Tensor>& param, const Tensor& value, bool needed) {
    if (!needed || !param.has_value() || !param->defined()) return empty_grad(in.p.x);
    return value.to(param->scalar_type());  // no copy for float32 parameters of float32/half x
  };
  return {dx, dr, param_grad(weight, grad_weight, want_dw), param_grad(bias, sum_dy, want_db)};
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_route_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& route, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, const Tensor& count,
    bool training, bool routed_stats, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(cuda_device(x));
  const BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  const auto grads = backward(in, Tensor(), weight, bias, count, training, routed_stats,
                              {output_mask[0], false, output_mask[1], output_mask[2]});
  return {std::get<0>(grads), std::get<2>(grads), std::get<3>(grads)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_add_relu_route_backward_cuda(
    const Tensor& grad_y, const Tensor& y, const Tensor& x, const Tensor& route, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, const Tensor& count,
    bool training, bool routed_stats, std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(cuda_device(x));
  const BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  const Tensor gate = in_layout_of(y, "y", in.p.x);
  return backward(in, gate, weight, bias, count, training, routed_stats, output_mask);
}

void update_running_stats_cuda(Tensor& running_mean, Tensor& running_var, const Tensor& mean, const Tensor& var,
                               const Tensor& count, double momentum) {
  check_running_update(running_mean, running_var, mean, var, count);
  TORCH_CHECK_VALUE(running_mean.is_cuda(), "running_mean must be a CUDA tensor for the CUDA kernel, got one on ",
                    running_mean.device());
  const c10::cuda::CUDAGuard guard(running_mean.device());
  launch_update_running_stats(running_mean, running_var, mean, var, count, momentum);
}

void update_task_running_stats_cuda(Tensor& task_mean, Tensor& task_var, Tensor& task_count, Tensor& task_last,
                                    const Tensor& batches, int64_t task, const Tensor& mean, const Tensor& var,
                                    const Tensor& count, std::optional<double> momentum) {
  check_task_update(task_mean, task_var, task_count, task_last, batches, task);
  check_running_update(task_mean.select(0, task), task_var.select(0, task), mean, var, count);
  TORCH_CHECK_VALUE(task_mean.is_cuda(), "task_mean must be a CUDA tensor for the CUDA kernel, got one on ",
                    task_mean.device());
  const c10::cuda::CUDAGuard guard(task_mean.device());
  launch_update_task_running_stats(task_mean, task_var, task_count, task_last, batches, task, mean, var, count,
                                   momentum);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(taskrouting, CUDA, m) {
  m.impl("update_running_stats", &cuda::update_running_stats_cuda);
  m.impl("update_task_running_stats", &cuda::update_task_running_stats_cuda);
  m.impl("bn_relu_route", &cuda::bn_relu_route_cuda);
  m.impl("bn_relu_route_backward", &cuda::bn_relu_route_backward_cuda);
  m.impl("bn_add_relu_route", &cuda::bn_add_relu_route_cuda);
  m.impl("bn_add_relu_route_backward", &cuda::bn_add_relu_route_backward_cuda);
  m.impl("channel_stats", &cuda::channel_stats_cuda);
  m.impl("normalize_relu_route", &cuda::normalize_relu_route_cuda);
  m.impl("backward_reduce", &cuda::backward_reduce_cuda);
  m.impl("backward_apply", &cuda::backward_apply_cuda);
}

}  // namespace taskrouting
