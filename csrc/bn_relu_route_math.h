// Per-channel math of the fused BatchNorm + ReLU + route op, shared by the CPU and CUDA kernels.
// Everything here is plain arithmetic on the accumulation type (float, or double for float64).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TR_HOST_DEVICE inline
#endif

namespace taskrouting {

// Running (count, mean, M2) of a set of values; M2 = sum of squared deviations from the mean.
template <typename acc_t>
struct Welford {
  acc_t mean = 0;
  acc_t m2 = 0;
  acc_t count = 0;
};

// Chan et al.'s parallel merge: exact for any split of the values, stable in fp32.
template <typename acc_t>
TR_HOST_DEVICE void welford_merge(Welford<acc_t>& a, acc_t mean_b, acc_t m2_b, acc_t count_b) {
  if (count_b == 0) return;
  const acc_t count = a.count + count_b;
  const acc_t delta = mean_b - a.mean;
  const acc_t frac_b = count_b / count;
  a.mean += delta * frac_b;
  // delta * (delta * (a.count * frac_b)), not delta * delta * ...: a mean above ~1.8e19 squares to
  // inf in fp32, and inf * 0 (an empty a) would make M2 NaN where nn.BatchNorm stays finite.
  a.m2 += m2_b + delta * (delta * (a.count * frac_b));
  a.count = count;
}

template <typename acc_t>
TR_HOST_DEVICE acc_t biased_var(const Welford<acc_t>& w) {
  return w.count > 0 ? w.m2 / w.count : acc_t(0);
}

template <typename acc_t>
TR_HOST_DEVICE acc_t inv_std(acc_t var, double eps) {
  return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
}

// nn.BatchNorm's running-stat update, r = (1 - m) r + m stat, with the Bessel-corrected variance;
// a channel with a single value keeps its biased variance (0), one with none is left as it is.
template <typename acc_t>
TR_HOST_DEVICE void update_running(acc_t& running_mean, acc_t& running_var, acc_t mean, acc_t var,
                                   acc_t count, acc_t momentum) {
  if (count <= 0) return;
  const acc_t unbiased = count > 1 ? var * count / (count - 1) : var;
  running_mean = running_mean * (acc_t(1) - momentum) + mean * momentum;
  running_var = running_var * (acc_t(1) - momentum) + unbiased * momentum;
}

// The update factor of a task's running statistics (taskrouting/nn/task_stats.py): 1/n, the task's
// n-th batch, with momentum None (cumulative); else 1 - (1 - m)^gap for a task last updated gap
// batches of the layer ago. In double, as the host computes it.
TR_HOST_DEVICE double task_factor(int64_t n, int64_t gap, bool cumulative, double momentum) {
  return cumulative ? 1.0 / double(n) : 1.0 - ::pow(1.0 - momentum, double(gap));
}

// Normalisation and affine folded into y_pre = x * scale + shift.
template <typename acc_t>
struct ScaleShift {
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
TR_HOST_DEVICE ScaleShift<acc_t> scale_shift(acc_t mean, acc_t invstd, acc_t weight, acc_t bias) {
  const acc_t scale = invstd * weight;
  return {scale, bias - mean * scale};
}

template <typename acc_t>
TR_HOST_DEVICE acc_t relu_affine(acc_t x, ScaleShift<acc_t> s) {
  const acc_t v = x * s.scale + s.shift;
  return v > acc_t(0) ? v : acc_t(0);
}

// A ResNet block's tail (bn_add_relu_route): relu(x * scale + shift + residual), the residual added in
// the accumulation type before the ReLU.
template <typename acc_t>
TR_HOST_DEVICE acc_t relu_affine_add(acc_t x, ScaleShift<acc_t> s, acc_t residual) {
  const acc_t v = x * s.scale + s.shift + residual;
  return v > acc_t(0) ? v : acc_t(0);
}

// bn_add_relu_route's backward gates on its saved output y instead of recomputing the pre-activation
// (which needs the residual): g = dy where y > 0, and y is 0 wherever the sample is not routed.
template <typename acc_t>
TR_HOST_DEVICE acc_t gate_on_output(acc_t dy, acc_t y) {
  return y > acc_t(0) ? dy : acc_t(0);
}

// grad_x = g * dy_coef + x * x_coef + bias_coef, where g = dy * route * (y_pre > 0).
// Train: grad_x = w*invstd * (g - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu / M).
// Eval:  grad_x = w*invstd * g.
template <typename acc_t>
struct GradCoef {
  acc_t dy_coef;
  acc_t x_coef;
  acc_t bias_coef;
};

template <typename acc_t>
TR_HOST_DEVICE GradCoef<acc_t> grad_coef(acc_t mean, acc_t invstd, acc_t weight, acc_t sum_dy,
                                         acc_t sum_dy_xmu, acc_t count, bool training) {
  const acc_t k = weight * invstd;
  if (!training || count <= 0) return {k, acc_t(0), acc_t(0)};
  const acc_t inv_count = acc_t(1) / count;
  const acc_t x_coef = -k * invstd * invstd * sum_dy_xmu * inv_count;
  return {k, x_coef, -k * sum_dy * inv_count - x_coef * mean};
}

// Whether sample n goes through channel c: route is [C] (one task per batch) or [N, C].
struct Route {
  const bool* mask;
  int64_t channels;
  bool per_sample;

  TR_HOST_DEVICE bool at(int64_t n, int64_t c) const {
    return mask[per_sample ? n * channels + c : c];
  }
};

// Which channels get batch statistics in training: those some sample uses (`used`) and, with
// batch statistics, every channel when asked (to update all running stats as nn.BatchNorm does).
TR_HOST_DEVICE bool wants_stats(bool used, bool routed, bool all_channels) {
  return used || (!routed && all_channels);
}

// Whether grad_x at (sample n, channel c) may be nonzero (else it is 0 and x is not read):
// the channel is used and either n goes through it, or (training with batch statistics) x[n, c]
// entered the mean and variance of the samples that do.
TR_HOST_DEVICE bool grad_reaches(bool used, bool through, bool training, bool routed_stats) {
  return used && (through || (training && !routed_stats));
}

}  // namespace taskrouting
