// CPU kernels of the fused BatchNorm + ReLU + route op, and of bn_add_relu_route (the same with a
// residual added before the ReLU; its backward gates on the output y): what the stage files share.
//
// Files: ops.cpp (the ops: argument checks, outputs, which stage runs; the CPU registration),
// stats.cpp (per-channel statistics, the running-stat update), normalize.cpp (normalize + ReLU +
// route, the fused forward), backward.cpp (gradient sums, grad_x, the fused backward). The same
// stage files are in csrc/cuda/. Schemas: taskrouting/ops/schemas.py.
//
// Two layouts:
//  * planes (NCHW-contiguous, rank 3-5): one channel at a time per thread; a channel's N planes
//    are reduced and then normalised (forward), or their gradient sums taken and grad_x written
//    (backward), while they are still in cache: one trip to memory. Used and unused channels are
//    spread evenly over the threads.
//  * rows (channels-last, and [N, C]): x is [N*S, C]; threads take blocks of rows, vectorised
//    along C, and merge their per-channel partial statistics in a fixed order.
// Statistics: two-pass (mean, then squared deviations) over blocks that fit in L1, merged with
// Chan's formula. Channels that no sample of the batch uses are not read in eval or backward.
// Outputs larger than stream_min_bytes() are written with streaming stores (stream_store.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "../bn_relu_route_checks.h"
#include "../bn_relu_route_math.h"
#include "stream_store.h"

namespace taskrouting {
namespace cpu {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

inline constexpr int64_t kBlock = 2048;  // elements per two-pass block (8 KiB of float)
inline constexpr int64_t kMinTaskWork = 32768;  // elements per thread below which waking threads costs more

// parallel_for grain: enough items that each thread gets kMinTaskWork elements.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(elements_per_item, 1));
}

// A block of x as acc_t: float32/float64 data is used in place, reduced types are converted.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE const acc_t* load_block(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// Per-thread buffers: two input blocks as acc_t, an output block before it is written, and a third
// input and second output block (bn_add_relu_route's backward reads x, grad_y and y, and writes
// grad_x and grad_residual).
template <typename scalar_t>
struct Scratch {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> a, b, out;
  std::vector<scalar_t> converted;
  std::vector<acc_t> c, out2;
  explicit Scratch(int64_t n = kBlock) : a(n), b(n), out(n), converted(n), c(n), out2(n) {}
};

// How blocks of output reach memory: computed in place (float32/float64), or in the scratch
// block and then converted (reduced types) and/or written with streaming stores (large outputs).
template <typename scalar_t>
struct Writer {
  using acc_t = at::opmath_type<scalar_t>;
  bool stream;
  Scratch<scalar_t>& scratch;
  std::vector<acc_t>& staging = scratch.out;  // the scratch block of this output

  // A writer of a second output in the same pass (its own scratch block).
  Writer second() const { return {stream, scratch, scratch.out2}; }
  // Where to compute up to a block of outputs destined for dst.
  acc_t* block(scalar_t* dst) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (!stream) return dst;
    }
    return staging.data();
  }
  // Writes the n outputs computed in block(dst) to dst.
  void store(scalar_t* dst, int64_t n) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (stream) stream_copy(dst, staging.data(), n * int64_t(sizeof(scalar_t)));
    } else if (stream) {
      at::vec::convert(staging.data(), scratch.converted.data(), n);
      stream_copy(dst, scratch.converted.data(), n * int64_t(sizeof(scalar_t)));
    } else {
      at::vec::convert(staging.data(), dst, n);
    }
  }
  void zero(scalar_t* dst, int64_t n) const {
    if (stream)
      stream_zero(dst, n * int64_t(sizeof(scalar_t)));
    else
      std::fill(dst, dst + n, scalar_t(0));
  }
};

inline bool streams(const Tensor& out) { return out.defined() && int64_t(out.nbytes()) >= stream_min_bytes(); }

// The loops below finish with one partial vector (masked load/store of the last n % W
// elements) rather than a scalar loop: 7x7 planes would otherwise spend most of their time there.
template <typename T>
C10_ALWAYS_INLINE T reduce_sum(Vec<T> v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// Lane-wise sums in four independent accumulators: one would serialise on the add latency.
template <typename T>
struct Partial {
  Vec<T> v0{T(0)}, v1{T(0)}, v2{T(0)}, v3{T(0)};
  T total() const { return reduce_sum((v0 + v1) + (v2 + v3)); }
};

// acc += x[0:n].
template <typename T>
C10_ALWAYS_INLINE void add_values(const T* x, int64_t n, Partial<T>& acc) {
  constexpr int64_t W = Vec<T>::size();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    acc.v0 += Vec<T>::loadu(x + i);
    acc.v1 += Vec<T>::loadu(x + i + W);
    acc.v2 += Vec<T>::loadu(x + i + 2 * W);
    acc.v3 += Vec<T>::loadu(x + i + 3 * W);
  }
  for (; i + W <= n; i += W) acc.v0 += Vec<T>::loadu(x + i);
  if (i < n) acc.v1 += Vec<T>::loadu(x + i, n - i);  // zero-filled past n
}

// acc += (x[0:n] - mean)^2.
template <typename T>
C10_ALWAYS_INLINE void add_centered_squares(const T* x, int64_t n, Vec<T> mean, Partial<T>& acc) {
  constexpr int64_t W = Vec<T>::size();
  auto square = [&](int64_t i, Vec<T>& a) {
    const Vec<T> d = Vec<T>::loadu(x + i) - mean;
    a = at::vec::fmadd(d, d, a);
  };
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    square(i, acc.v0);
    square(i + W, acc.v1);
    square(i + 2 * W, acc.v2);
    square(i + 3 * W, acc.v3);
  }
  for (; i + W <= n; i += W) square(i, acc.v0);
  if (i < n) {
    const Vec<T> d = Vec<T>::set(Vec<T>(T(0)), Vec<T>::loadu(x + i, n - i) - mean, n - i);
    acc.v1 = at::vec::fmadd(d, d, acc.v1);
  }
}

// ---------------------------------------------------------------------------- shared preparation
struct Shape {
  int64_t n, c, s;  // samples, channels, spatial size
};

// route as 0/1 in acc_t, [N or 1, C], for vectorised selects along C (rows layout).
template <typename acc_t>
std::vector<acc_t> route_values(Route r, int64_t n, int64_t c) {
  const int64_t rows = r.per_sample ? n : 1;
  std::vector<acc_t> v(rows * c);
  for (int64_t i = 0; i < rows * c; ++i) v[i] = r.mask[i] ? acc_t(1) : acc_t(0);
  return v;
}

template <typename acc_t>
struct StatsOut {
  acc_t* mean;
  acc_t* var;
  acc_t* count;
  acc_t* invstd;  // may be null (channel_stats)
};

// ---------------------------------------------------------------------------- planes layout
// One channel of a planes-layout tensor: sample n's plane of `size` (S) elements starts at
// base + n * stride (stride C * S).
template <typename T>
struct Channel {
  T* base;
  int64_t stride, samples, size;
  T* plane(int64_t n) const { return base + n * stride; }
};

template <typename T>
Channel<T> channel_of(T* t, Shape sh, int64_t c) {
  return {t + c * sh.s, sh.c * sh.s, sh.n, sh.s};
}

// Channel c's route alone: at(n, 0) is r.at(n, c).
inline Route channel_route(Route r, int64_t c) { return {r.mask + c, r.channels, r.per_sample}; }

// A run of consecutive elements of a channel: elements [start, start + len) of plane n.
struct Segment {
  int64_t n, start, len;
};

// f(segments, count, elements) over the channel's planes (those routed if only_routed) in
// chunks of about kBlock elements: pieces of one plane when planes are large, several whole
// planes when they are small, so that per-chunk costs (reductions, merges) stay amortised.
template <typename T, typename F>
void for_each_chunk(const Channel<T>& ch, Route rc, bool only_routed, const F& f) {
  constexpr int kMaxSegments = 64;
  Segment seg[kMaxSegments];
  int count = 0;
  int64_t elements = 0;
  for (int64_t n = 0; n < ch.samples; ++n) {
    if (only_routed && !rc.at(n, 0)) continue;
    for (int64_t i = 0; i < ch.size; i += kBlock) {
      seg[count++] = {n, i, std::min(kBlock, ch.size - i)};
      elements += seg[count - 1].len;
      if (elements >= kBlock || count == kMaxSegments) {
        f(seg, count, elements);
        count = 0, elements = 0;
      }
    }
  }
  if (count > 0) f(seg, count, elements);
}

// Statistics of a channel: two passes over each chunk (sum, then squared deviations from the
// chunk's mean, while it is in L1), chunks merged with Chan's formula.
template <typename in_t, typename acc_t>
Welford<acc_t> plane_stats(Channel<const in_t> x, Route rc, bool routed, acc_t* buf) {
  Welford<acc_t> w;
  for_each_chunk(x, rc, routed, [&](const Segment* seg, int count, int64_t elements) {
    Partial<acc_t> sum, squares;
    for (int j = 0; j < count; ++j)
      add_values(load_block(x.plane(seg[j].n) + seg[j].start, seg[j].len, buf), seg[j].len, sum);
    const acc_t mean = sum.total() / acc_t(elements);
    for (int j = 0; j < count; ++j)
      add_centered_squares(load_block(x.plane(seg[j].n) + seg[j].start, seg[j].len, buf), seg[j].len,
                           Vec<acc_t>(mean), squares);
    welford_merge(w, mean, squares.total(), acc_t(elements));
  });
  return w;
}

// ---------------------------------------------------------------------------- rows layout
// Rows of one sample per work unit, so that the route is one vector for the whole unit.
struct RowBlocks {
  int64_t rows_per_block, blocks_per_sample;
  RowBlocks(Shape sh)
      : rows_per_block(std::max<int64_t>(4, kBlock / std::max<int64_t>(sh.c, 1))),
        blocks_per_sample((sh.s + rows_per_block - 1) / rows_per_block) {}
};

// ---------------------------------------------------------------------------- preparation
struct Prepared {
  Tensor x, route;
  Shape sh;
  Route r;
  std::vector<char> used;
  std::vector<int64_t> order;  // planes layout: the channels in the order threads split them
  bool rows;
};

// x and route as the kernels read them, checked (ops.cpp).
Prepared prepare(const Tensor& x_in, const Tensor& route_in);

// body(c, writer) for every channel of a planes-layout input, channels split over threads. No software
// prefetch of the next channel: GCC drops calls of a function that only prefetches (it deems it const), so
// the one this loop had never ran, and forced inline it was not faster in an A/B here (2026-12).
template <typename scalar_t, typename F>
void for_each_plane(const Prepared& p, bool stream, const F& body) {
  at::parallel_for(0, p.sh.c, grain_for(p.sh.n * p.sh.s), [&](int64_t i0, int64_t i1) {
    Scratch<scalar_t> scratch;
    const Writer<scalar_t> writer{stream, scratch};
    for (int64_t i = i0; i < i1; ++i) body(p.order[i], writer);
    if (stream) stream_fence();
  });
}

// The backward's inputs, checked, with the forward's scale and shift (ops.cpp: prepare_backward);
// y: bn_add_relu_route's output, the gate of its backward (undefined for bn_relu_route).
struct BackwardInputs : BackwardTensors {
  Prepared p;
  Tensor scale, shift;
  Tensor y;
};

// ---- statistics (stats.cpp)
// Statistics for every channel that needs them (training) into out; instantiated for the
// dispatched types (float, double, Half, BFloat16) in stats.cpp.
template <typename scalar_t>
void compute_stats(const Prepared& p, bool routed, bool all_channels, StatsOut<at::opmath_type<scalar_t>> out);
// mean/var/count [C] (acc type) of the channels that need them.
void channel_stats(const Prepared& p, bool routed_stats, bool all_channels, Tensor& mean, Tensor& var,
                   Tensor& count);
void update_running_stats(Tensor& running_mean, Tensor& running_var, const Tensor& mean_in, const Tensor& var_in,
                          const Tensor& count_in, double momentum);

// ---- normalize (normalize.cpp)
void normalize_relu_route(const Prepared& p, Tensor& y, const Tensor& mean, const Tensor& invstd,
                          const Tensor& weight, const Tensor& bias);
// The fused forward: statistics (training), then the apply; fills out (from forward_outputs). With a
// residual (bn_add_relu_route: x's shape and dtype, in x's processing layout) it is added before the ReLU.
void bn_relu_route(const Prepared& p, ForwardOutputs& out, const Tensor& w, const Tensor& b, bool training,
                   double eps, bool routed_stats, bool stats_all_channels, const Tensor& residual = Tensor());

// ---- backward (backward.cpp)
void backward_reduce(const BackwardInputs& in, Tensor& sum_dy, Tensor& sum_dy_xmu);
void backward_apply(const BackwardInputs& in, const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& count,
                    bool training, bool routed_stats, Tensor& dx);
// The fused backward; output_mask = [grad_x, grad_residual, grad_weight, grad_bias] (grad_residual
// only for bn_add_relu_route, given in.y). sum_dy/sum_dy_xmu zero-filled [C]; dx allocated when
// output_mask[0], dr (grad_residual) when output_mask[1].
void bn_relu_route_backward(const BackwardInputs& in, const Tensor& count, bool training, bool routed_stats,
                            std::array<bool, 4> output_mask, Tensor& sum_dy, Tensor& sum_dy_xmu, Tensor& dx,
                            Tensor& dr);

}  // namespace cpu
}  // namespace taskrouting
