// Host-side argument checks and preparation shared by the CPU and CUDA kernels, so that a direct
// call of torch.ops.taskrouting.* with bad arguments raises a clear error instead of reading out
// of bounds.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace taskrouting {

inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.dim() <= 5, name, " must have 2 to 5 dims [N, C, *], got ",
                    x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", t);
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
                    x.device());
}

inline void check_route(const at::Tensor& route, const at::Tensor& x) {
  check_same_device(route, "route", x);
  TORCH_CHECK_TYPE(route.scalar_type() == at::kBool, "route must be a bool tensor, got ",
                   route.scalar_type());
  const bool per_batch = route.dim() == 1 && route.size(0) == x.size(1);
  const bool per_sample = route.dim() == 2 && route.size(0) == x.size(0) && route.size(1) == x.size(1);
  TORCH_CHECK_VALUE(per_batch || per_sample, "route must have shape [C] or [N, C] = [", x.size(0),
                    ", ", x.size(1), "], got ", route.sizes());
}

// A per-channel vector ([C]) as a contiguous tensor of x's accumulation type.
inline at::Tensor per_channel(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_same_device(t, name, x);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(1), name, " must have shape [", x.size(1),
                    "], got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ",
                   t.scalar_type());
  return t.to(acc_type_of(x)).contiguous();
}

// weight/bias may be absent (affine=False): then 1 and 0.
inline at::Tensor per_channel_or(const c10::optional<at::Tensor>& t, const char* name,
                                 const at::Tensor& x, double fill) {
  if (t.has_value() && t->defined()) return per_channel(*t, name, x);
  return at::full({x.size(1)}, fill, x.options().dtype(acc_type_of(x)));
}

// x's memory format: channels-last tensors are processed as rows of C contiguous values.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous())
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !x.is_contiguous())
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

inline bool is_rows_layout(const at::Tensor& x) {
  return x.dim() == 2 || layout_of(x) != at::MemoryFormat::Contiguous;
}

// Product of the spatial dims (H*W, L, D*H*W; 1 for [N, C]).
inline int64_t spatial_size(const at::Tensor& x) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return s;
}

// running_mean/var are updated in place from per-channel mean, var and count of the same length.
inline void check_running_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count) {
  const int64_t c = running_mean.numel();
  TORCH_CHECK_VALUE(running_mean.dim() == 1 && running_var.sizes() == running_mean.sizes(),
                    "running_mean and running_var must be [C] tensors of one size, got ", running_mean.sizes(),
                    " and ", running_var.sizes());
  TORCH_CHECK_VALUE(running_mean.is_contiguous() && running_var.is_contiguous(),
                    "running_mean and running_var must be contiguous");
  TORCH_CHECK_TYPE(running_mean.scalar_type() == running_var.scalar_type() &&
                       at::isFloatingType(running_mean.scalar_type()),
                   "running_mean and running_var must be floating tensors of one dtype");
  const std::pair<const at::Tensor*, const char*> stats[] = {{&mean, "mean"}, {&var, "var"}, {&count, "count"}};
  for (const auto& [t, name] : stats) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->numel() == c, name, " must have shape [", c, "], got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == running_mean.device(), name, " is on ", t->device(),
                      " but running_mean is on ", running_mean.device());
  }
  TORCH_CHECK_VALUE(running_var.device() == running_mean.device(), "running_var is on ", running_var.device(),
                    " but running_mean is on ", running_mean.device());
}

inline at::Tensor empty_grad(const at::Tensor& x) { return at::empty({0}, x.options()); }

inline at::Tensor per_channel_empty(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(acc_type_of(x)));
}

// count is only used (and only required) in training.
inline at::Tensor checked_count(const at::Tensor& count, const at::Tensor& x, bool training) {
  return training ? per_channel(count, "count", x) : count;
}

// The forward's outputs, allocated; in eval, mean and invstd already hold the running statistics
// (var and count are then empty).
struct ForwardOutputs {
  at::Tensor y, mean, invstd, var, count;
};

inline ForwardOutputs forward_outputs(const at::Tensor& x, bool training,
                                      const c10::optional<at::Tensor>& running_mean,
                                      const c10::optional<at::Tensor>& running_var, double eps) {
  TORCH_CHECK_VALUE(eps > 0, "eps must be positive, got ", eps);
  ForwardOutputs out{at::empty_like(x), per_channel_empty(x), per_channel_empty(x), at::Tensor(), at::Tensor()};
  out.var = training ? per_channel_empty(x) : at::empty({0}, out.mean.options());
  out.count = training ? per_channel_empty(x) : at::empty({0}, out.mean.options());
  if (!training) {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value() && running_mean->defined() &&
                          running_var->defined(),
                      "training=False needs running_mean and running_var");
    out.mean.copy_(per_channel(*running_mean, "running_mean", x));
    out.invstd.copy_(per_channel(*running_var, "running_var", x).add(eps).rsqrt());
  }
  return out;
}

// update_task_running_stats: task rows [T, C], counts [T] (int64), batches 0-dim (int64), task in range.
inline void check_task_update(const at::Tensor& task_mean, const at::Tensor& task_var, const at::Tensor& task_count,
                              const at::Tensor& task_last, const at::Tensor& batches, int64_t task) {
  TORCH_CHECK_VALUE(task_mean.dim() == 2 && task_var.sizes() == task_mean.sizes(),
                    "task_mean and task_var must be [T, C] tensors of one size, got ", task_mean.sizes(), " and ",
                    task_var.sizes());
  const int64_t T = task_mean.size(0);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&task_count, "task_count"},
                                {&task_last, "task_last"}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->numel() == T && t->scalar_type() == at::kLong && t->is_contiguous(),
                      name, " must be a contiguous int64 [", T, "] tensor, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == task_mean.device(), name, " is on ", t->device(), " but task_mean is on ",
                      task_mean.device());
  }
  const bool batches_ok = batches.numel() == 1 && batches.scalar_type() == at::kLong;
  TORCH_CHECK_VALUE(batches_ok && batches.device() == task_mean.device(),
                    "batches must be a one-element int64 tensor on ", task_mean.device(), ", got ",
                    batches.scalar_type(), " ", batches.sizes(), " on ", batches.device());
  TORCH_CHECK_VALUE(task >= 0 && task < T, "task must be in [0, ", T, "), got ", task);
}

// bn_add_relu_route's residual (and its backward's y): x's shape, dtype and device, in x's processing
// layout (x already in it), so that the kernels index it exactly as x.
inline at::Tensor in_layout_of(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_same_device(t, name, x);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
                   t.scalar_type());
  return t.contiguous(layout_of(x));
}

// The backward's per-channel inputs, checked against x (already in its processing layout).
struct BackwardTensors {
  at::Tensor dy, mean, invstd, w, b;
};

inline BackwardTensors backward_tensors(const at::Tensor& grad_y, const at::Tensor& x,
                                        const c10::optional<at::Tensor>& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                        const at::Tensor& invstd) {
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "grad_y must have the shape of x ", x.sizes(), ", got ",
                    grad_y.sizes());
  check_same_device(grad_y, "grad_y", x);
  return {grad_y.to(x.scalar_type()).contiguous(layout_of(x)), per_channel(mean, "mean", x),
          per_channel(invstd, "invstd", x), per_channel_or(weight, "weight", x, 1.0),
          per_channel_or(bias, "bias", x, 0.0)};
}

}  // namespace taskrouting
