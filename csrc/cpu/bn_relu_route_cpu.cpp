// CPU kernels of the fused BatchNorm + ReLU + route op (schemas: taskrouting/ops.py).
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
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../bn_relu_route_checks.h"
#include "../bn_relu_route_math.h"
#include "stream_store.h"

namespace taskrouting {
namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kBlock = 2048;  // elements per two-pass block (8 KiB of float)
constexpr int64_t kMinTaskWork = 32768;  // elements per thread below which waking threads costs more

// parallel_for grain: enough items that each thread gets kMinTaskWork elements.
int64_t grain_for(int64_t elements_per_item) {
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

// Per-thread buffers: two input blocks as acc_t, and an output block before it is written.
template <typename scalar_t>
struct Scratch {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> a, b, out;
  std::vector<scalar_t> converted;
  explicit Scratch(int64_t n = kBlock) : a(n), b(n), out(n), converted(n) {}
};

// How blocks of output reach memory: computed in place (float32/float64), or in the scratch
// block and then converted (reduced types) and/or written with streaming stores (large outputs).
template <typename scalar_t>
struct Writer {
  using acc_t = at::opmath_type<scalar_t>;
  bool stream;
  Scratch<scalar_t>& scratch;

  // Where to compute up to a block of outputs destined for dst.
  acc_t* block(scalar_t* dst) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (!stream) return dst;
    }
    return scratch.out.data();
  }
  // Writes the n outputs computed in block(dst) to dst.
  void store(scalar_t* dst, int64_t n) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (stream) stream_copy(dst, scratch.out.data(), n * int64_t(sizeof(scalar_t)));
    } else if (stream) {
      at::vec::convert(scratch.out.data(), scratch.converted.data(), n);
      stream_copy(dst, scratch.converted.data(), n * int64_t(sizeof(scalar_t)));
    } else {
      at::vec::convert(scratch.out.data(), dst, n);
    }
  }
  void zero(scalar_t* dst, int64_t n) const {
    if (stream)
      stream_zero(dst, n * int64_t(sizeof(scalar_t)));
    else
      std::fill(dst, dst + n, scalar_t(0));
  }
};

bool streams(const Tensor& out) { return out.defined() && int64_t(out.nbytes()) >= stream_min_bytes(); }

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

template <typename T>
C10_ALWAYS_INLINE void relu_affine_into(const T* x, T* y, int64_t n, ScaleShift<T> s) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> scale(s.scale), shift(s.shift), zero(T(0));
  int64_t i = 0;
  for (; i + W <= n; i += W)
    at::vec::clamp_min(at::vec::fmadd(Vec<T>::loadu(x + i), scale, shift), zero).store(y + i);
  if (i < n) at::vec::clamp_min(at::vec::fmadd(Vec<T>::loadu(x + i, n - i), scale, shift), zero).store(y + i, n - i);
}

// g = dy where the pre-activation is positive; acc.v0/v2 += g, acc.v1/v3 += g * (x - mean)
// (sum(g) = v0 + v2, sum(g * (x - mean)) = v1 + v3).
template <typename T>
C10_ALWAYS_INLINE void add_grad_sums(const T* x, const T* dy, int64_t n, ScaleShift<T> s, T mean,
                                     Partial<T>& acc) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> scale(s.scale), shift(s.shift), zero(T(0)), m(mean);
  // Lanes past n load as 0, so g is 0 there (selected, not multiplied: 0 * NaN is NaN).
  auto add = [&](int64_t i, int64_t len, Vec<T>& ag, Vec<T>& agx) {
    const Vec<T> xv = Vec<T>::loadu(x + i, len);
    const Vec<T> g = Vec<T>::blendv(zero, Vec<T>::loadu(dy + i, len), at::vec::fmadd(xv, scale, shift) > zero);
    ag += g;
    agx = at::vec::fmadd(g, xv - m, agx);
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    add(i, W, acc.v0, acc.v1);
    add(i + W, W, acc.v2, acc.v3);
  }
  if (i < n) add(i, std::min(W, n - i), acc.v0, acc.v1);
  if (i + W < n) add(i + W, n - i - W, acc.v2, acc.v3);
}

// dx = g * k.dy_coef + x * k.x_coef + k.bias_coef, with g = 0 where the sample is not routed.
template <typename T>
C10_ALWAYS_INLINE void grad_apply(const T* x, const T* dy, T* dx, int64_t n, ScaleShift<T> s, GradCoef<T> k,
                                  bool routed) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> scale(s.scale), shift(s.shift), zero(T(0)), kd(k.dy_coef), kx(k.x_coef), kb(k.bias_coef);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t len = std::min(W, n - i);
    const Vec<T> xv = Vec<T>::loadu(x + i, len);
    Vec<T> out = at::vec::fmadd(xv, kx, kb);
    if (routed) {
      const Vec<T> g = Vec<T>::blendv(zero, Vec<T>::loadu(dy + i, len), at::vec::fmadd(xv, scale, shift) > zero);
      out = at::vec::fmadd(g, kd, out);
    }
    out.store(dx + i, len);
  }
}

// ---------------------------------------------------------------------------- shared preparation
struct Shape {
  int64_t n, c, s;  // samples, channels, spatial size
};

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
Route channel_route(Route r, int64_t c) { return {r.mask + c, r.channels, r.per_sample}; }

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

template <typename in_t, typename out_t, typename acc_t>
void plane_apply(Channel<const in_t> x, Channel<out_t> y, Route rc, bool used, ScaleShift<acc_t> s,
                 const Writer<out_t>& out) {
  for (int64_t n = 0; n < x.samples; ++n) {
    out_t* yp = y.plane(n);
    if (!used || !rc.at(n, 0)) {
      out.zero(yp, x.size);
      continue;
    }
    for (int64_t i = 0; i < x.size; i += kBlock) {
      const int64_t len = std::min(kBlock, x.size - i);
      relu_affine_into(load_block(x.plane(n) + i, len, out.scratch.a.data()), out.block(yp + i), len, s);
      out.store(yp + i, len);
    }
  }
}

// sums[0] = sum(g), sums[1] = sum(g * (x - mean)) over a channel; g is zero where not routed.
template <typename in_t, typename acc_t>
void plane_grad_sums(Channel<const in_t> x, Channel<const in_t> dy, Route rc, ScaleShift<acc_t> s, acc_t mean,
                     acc_t* sums, acc_t* buf, acc_t* dbuf) {
  double sg = 0, sgx = 0;  // across chunks in double: millions of terms per channel
  for_each_chunk(x, rc, true, [&](const Segment* seg, int count, int64_t) {
    Partial<acc_t> acc;
    for (int j = 0; j < count; ++j) {
      const int64_t n = seg[j].n, i = seg[j].start, len = seg[j].len;
      add_grad_sums(load_block(x.plane(n) + i, len, buf), load_block(dy.plane(n) + i, len, dbuf), len, s, mean, acc);
    }
    sg += reduce_sum(acc.v0 + acc.v2);
    sgx += reduce_sum(acc.v1 + acc.v3);
  });
  sums[0] = acc_t(sg);
  sums[1] = acc_t(sgx);
}

template <typename in_t, typename out_t, typename acc_t>
void plane_grad_apply(Channel<const in_t> x, Channel<const in_t> dy, Channel<out_t> dx, Route rc, bool used,
                      bool needs_x, bool routed_stats, ScaleShift<acc_t> s, GradCoef<acc_t> k,
                      const Writer<out_t>& out) {
  Scratch<out_t>& buf = out.scratch;
  for (int64_t n = 0; n < x.samples; ++n) {
    out_t* dp = dx.plane(n);
    const bool through = used && rc.at(n, 0);
    if (!grad_reaches(used, through, needs_x, routed_stats)) {
      out.zero(dp, x.size);
      continue;
    }
    for (int64_t i = 0; i < x.size; i += kBlock) {
      const int64_t len = std::min(kBlock, x.size - i);
      grad_apply(load_block(x.plane(n) + i, len, buf.a.data()),
                 through ? load_block(dy.plane(n) + i, len, buf.b.data()) : nullptr, out.block(dp + i), len, s, k,
                 through);
      out.store(dp + i, len);
    }
  }
}

// ---------------------------------------------------------------------------- rows layout
// Rows of one sample per work unit, so that the route is one vector for the whole unit.
struct RowBlocks {
  int64_t rows_per_block, blocks_per_sample;
  RowBlocks(Shape sh)
      : rows_per_block(std::max<int64_t>(4, kBlock / std::max<int64_t>(sh.c, 1))),
        blocks_per_sample((sh.s + rows_per_block - 1) / rows_per_block) {}
};

template <typename acc_t>
struct ChannelPartials {
  std::vector<acc_t> mean, m2, count;
  explicit ChannelPartials(int64_t c) : mean(c, 0), m2(c, 0), count(c, 0) {}
};

template <typename scalar_t, typename acc_t>
void rows_stats(const scalar_t* x, Shape sh, Route r, bool routed, const std::vector<char>& used,
                bool all_channels, StatsOut<acc_t> out) {
  const RowBlocks rb(sh);
  const int64_t C = sh.c;
  std::vector<ChannelPartials<acc_t>> partials(at::get_num_threads(), ChannelPartials<acc_t>(C));
  at::parallel_for(0, sh.n * rb.blocks_per_sample, grain_for(rb.rows_per_block * C), [&](int64_t begin, int64_t end) {
    ChannelPartials<acc_t>& p = partials[at::get_thread_num()];
    std::vector<acc_t> buf(rb.rows_per_block * C), sum(C), sq(C);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / rb.blocks_per_sample;
      const int64_t row0 = (u % rb.blocks_per_sample) * rb.rows_per_block;
      const int64_t rows = std::min(rb.rows_per_block, sh.s - row0);
      const acc_t* b = load_block(x + (n * sh.s + row0) * C, rows * C, buf.data());
      std::fill(sum.begin(), sum.end(), acc_t(0));
      std::fill(sq.begin(), sq.end(), acc_t(0));
      for (int64_t i = 0; i < rows; ++i)
        at::vec::map2([](Vec<acc_t> a, Vec<acc_t> v) { return a + v; }, sum.data(), sum.data(), b + i * C, C);
      for (int64_t c = 0; c < C; ++c) sum[c] /= acc_t(rows);
      for (int64_t i = 0; i < rows; ++i)
        at::vec::map3([](Vec<acc_t> a, Vec<acc_t> v, Vec<acc_t> m) { return at::vec::fmadd(v - m, v - m, a); },
                      sq.data(), sq.data(), b + i * C, sum.data(), C);
      for (int64_t c = 0; c < C; ++c) {
        if (!wants_stats(used[c], routed, all_channels) || (routed && !r.at(n, c))) continue;
        Welford<acc_t> w{p.mean[c], p.m2[c], p.count[c]};
        welford_merge(w, sum[c], sq[c], acc_t(rows));
        p.mean[c] = w.mean, p.m2[c] = w.m2, p.count[c] = w.count;
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Welford<acc_t> w;
    for (const auto& p : partials) welford_merge(w, p.mean[c], p.m2[c], p.count[c]);
    out.mean[c] = w.mean;
    out.var[c] = biased_var(w);
    out.count[c] = w.count;
  }
}

// y = route ? relu(x * scale + shift) : 0, along rows of C.
template <typename scalar_t, typename acc_t>
void rows_apply(const scalar_t* x, scalar_t* y, Shape sh, Route r, const acc_t* scale, const acc_t* shift,
                bool stream) {
  const int64_t C = sh.c;
  const std::vector<acc_t> keep = route_values<acc_t>(r, sh.n, C);
  at::parallel_for(0, sh.n * sh.s, grain_for(C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(C);
    const Writer<scalar_t> out{stream, scratch};
    for (int64_t m = begin; m < end; ++m) {
      const acc_t* k = keep.data() + (r.per_sample ? (m / sh.s) * C : 0);
      const acc_t* b = load_block(x + m * C, C, scratch.a.data());
      acc_t* o = out.block(y + m * C);
      at::vec::map4(
          [](Vec<acc_t> v, Vec<acc_t> sc, Vec<acc_t> sh_, Vec<acc_t> kv) {
            const Vec<acc_t> zero(acc_t(0));
            return Vec<acc_t>::blendv(zero, at::vec::clamp_min(at::vec::fmadd(v, sc, sh_), zero), kv > zero);
          },
          o, b, scale, shift, k, C);
      out.store(y + m * C, C);
    }
    if (stream) stream_fence();
  });
}

// Along one row of C channels: g = dy where routed and the pre-activation is positive.
template <typename acc_t>
struct RowGrad {
  const acc_t *scale, *shift;
  // Also returns x and the lanes where g may be nonzero (select with it: 0 * NaN is NaN).
  Vec<acc_t> operator()(const acc_t* x, const acc_t* dy, const acc_t* on, int64_t c, Vec<acc_t>& xv,
                        Vec<acc_t>& live) const {
    const Vec<acc_t> zero(acc_t(0));
    xv = Vec<acc_t>::loadu(x + c);
    const Vec<acc_t> pos = at::vec::fmadd(xv, Vec<acc_t>::loadu(scale + c), Vec<acc_t>::loadu(shift + c)) > zero;
    live = pos & (Vec<acc_t>::loadu(on + c) > zero);
    return Vec<acc_t>::blendv(zero, Vec<acc_t>::loadu(dy + c), live);
  }
  acc_t scalar(const acc_t* x, const acc_t* dy, const acc_t* on, int64_t c) const {
    return on[c] > 0 && x[c] * scale[c] + shift[c] > acc_t(0) ? dy[c] : acc_t(0);
  }
};

template <typename scalar_t, typename acc_t>
void rows_grad_sums(const scalar_t* x, const scalar_t* dy, Shape sh, Route r, const acc_t* scale,
                    const acc_t* shift, const acc_t* mean, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t C = sh.c;
  const std::vector<acc_t> through = route_values<acc_t>(r, sh.n, C);
  const RowGrad<acc_t> grad{scale, shift};
  std::vector<std::vector<double>> partial(at::get_num_threads(), std::vector<double>(2 * C, 0.0));
  const RowBlocks rb(sh);
  at::parallel_for(0, sh.n * rb.blocks_per_sample, grain_for(rb.rows_per_block * C), [&](int64_t begin, int64_t end) {
    std::vector<double>& p = partial[at::get_thread_num()];
    std::vector<acc_t> buf(C), dbuf(C), sg(C), sgx(C);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / rb.blocks_per_sample;
      const int64_t row0 = (u % rb.blocks_per_sample) * rb.rows_per_block;
      const int64_t rows = std::min(rb.rows_per_block, sh.s - row0);
      const acc_t* on = through.data() + (r.per_sample ? n * C : 0);
      std::fill(sg.begin(), sg.end(), acc_t(0));
      std::fill(sgx.begin(), sgx.end(), acc_t(0));
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t m = n * sh.s + row0 + i;
        const acc_t* xr = load_block(x + m * C, C, buf.data());
        const acc_t* dr = load_block(dy + m * C, C, dbuf.data());
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          Vec<acc_t> xv, live;
          const Vec<acc_t> g = grad(xr, dr, on, c, xv, live);
          const Vec<acc_t> gx = Vec<acc_t>::blendv(Vec<acc_t>(acc_t(0)), g * (xv - Vec<acc_t>::loadu(mean + c)), live);
          (Vec<acc_t>::loadu(sg.data() + c) + g).store(sg.data() + c);
          (Vec<acc_t>::loadu(sgx.data() + c) + gx).store(sgx.data() + c);
        }
        for (; c < C; ++c) {
          const acc_t g = grad.scalar(xr, dr, on, c);
          sg[c] += g;
          if (g != acc_t(0)) sgx[c] += g * (xr[c] - mean[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) p[c] += sg[c], p[C + c] += sgx[c];
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (const auto& p : partial) a += p[c], b += p[C + c];
    sum_dy[c] = acc_t(a);
    sum_dy_xmu[c] = acc_t(b);
  }
}

// zero_unrouted: routed statistics or eval, where a sample not routed through c gets no gradient.
template <typename scalar_t, typename acc_t>
void rows_grad_apply(const scalar_t* x, const scalar_t* dy, scalar_t* dx, Shape sh, Route r,
                     const std::vector<char>& used, bool zero_unrouted, const acc_t* scale,
                     const acc_t* shift, const std::vector<GradCoef<acc_t>>& k, bool stream) {
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t C = sh.c;
  const std::vector<acc_t> through = route_values<acc_t>(r, sh.n, C);
  std::vector<acc_t> kd(C), kx(C), kb(C), live(C);
  for (int64_t c = 0; c < C; ++c)
    kd[c] = k[c].dy_coef, kx[c] = k[c].x_coef, kb[c] = k[c].bias_coef, live[c] = used[c] ? acc_t(1) : acc_t(0);
  const RowGrad<acc_t> grad{scale, shift};
  at::parallel_for(0, sh.n * sh.s, grain_for(C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(C);
    const Writer<scalar_t> out{stream, scratch};
    const Vec<acc_t> zero(acc_t(0));
    for (int64_t m = begin; m < end; ++m) {
      const acc_t* on = through.data() + (r.per_sample ? (m / sh.s) * C : 0);
      const acc_t* keep = zero_unrouted ? on : live.data();
      const acc_t* xr = load_block(x + m * C, C, scratch.a.data());
      const acc_t* dr = load_block(dy + m * C, C, scratch.b.data());
      acc_t* o = out.block(dx + m * C);
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        Vec<acc_t> xv, live_g;
        const Vec<acc_t> g = grad(xr, dr, on, c, xv, live_g);
        const Vec<acc_t> v = at::vec::fmadd(g, Vec<acc_t>::loadu(kd.data() + c),
                                            at::vec::fmadd(xv, Vec<acc_t>::loadu(kx.data() + c), Vec<acc_t>::loadu(kb.data() + c)));
        const Vec<acc_t> mask = (Vec<acc_t>::loadu(keep + c) > zero) & (Vec<acc_t>::loadu(live.data() + c) > zero);
        Vec<acc_t>::blendv(zero, v, mask).store(o + c);
      }
      for (; c < C; ++c) {
        const acc_t v = grad.scalar(xr, dr, on, c) * kd[c] + xr[c] * kx[c] + kb[c];
        o[c] = keep[c] > 0 && live[c] > 0 ? v : acc_t(0);
      }
      out.store(dx + m * C, C);
    }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------------------- ops
struct Prepared {
  Tensor x, route;
  Shape sh;
  Route r;
  std::vector<char> used;
  std::vector<int64_t> order;  // planes layout: the channels in the order threads split them
  bool rows;
};

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

// The inputs a pass over the planes reads (for prefetching).
template <typename scalar_t>
struct PlaneReads {
  const scalar_t* first;
  const scalar_t* second;
  bool unused_too;  // unused channels are read as well (for their statistics)
};

// Loads channel c's planes towards L1 when a channel is small. The hardware prefetcher follows
// runs within a page, not the C * S stride between a channel's planes, so small planes
// (e.g. 7x7: 196 bytes each) would otherwise be fetched one miss at a time.
template <typename scalar_t>
void prefetch_channel(const scalar_t* t, Shape sh, int64_t c) {
  constexpr int64_t kMaxBytes = 64 * 1024, kLine = 64;
  const int64_t plane_bytes = sh.s * int64_t(sizeof(scalar_t));
  if (t == nullptr || sh.n * plane_bytes > kMaxBytes) return;
  for (int64_t n = 0; n < sh.n; ++n) {
    const char* plane = reinterpret_cast<const char*>(t + (n * sh.c + c) * sh.s);
    for (int64_t b = 0; b < plane_bytes; b += kLine) __builtin_prefetch(plane + b, 0, 3);
  }
}

// body(c, writer) for every channel of a planes-layout input, channels split over threads;
// the next channel's planes are prefetched while one is processed.
template <typename scalar_t, typename F>
void for_each_plane(const Prepared& p, bool stream, PlaneReads<scalar_t> reads, const F& body) {
  at::parallel_for(0, p.sh.c, grain_for(p.sh.n * p.sh.s), [&](int64_t i0, int64_t i1) {
    Scratch<scalar_t> scratch;
    const Writer<scalar_t> writer{stream, scratch};
    for (int64_t i = i0; i < i1; ++i) {
      if (i + 1 < i1 && (reads.unused_too || p.used[p.order[i + 1]])) {
        prefetch_channel(reads.first, p.sh, p.order[i + 1]);
        prefetch_channel(reads.second, p.sh, p.order[i + 1]);
      }
      body(p.order[i], writer);
    }
    if (stream) stream_fence();
  });
}

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

// Statistics for every channel that needs them (training) into out.
template <typename scalar_t>
void compute_stats(const Prepared& p, bool routed, bool all_channels, StatsOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  if (p.rows) {
    rows_stats<scalar_t, acc_t>(x, p.sh, p.r, routed, p.used, all_channels, out);
    return;
  }
  const PlaneReads<scalar_t> reads{x, nullptr, !routed && all_channels};
  for_each_plane<scalar_t>(p, false, reads, [&](int64_t c, const Writer<scalar_t>& writer) {
    Welford<acc_t> w;
    if (wants_stats(p.used[c], routed, all_channels))
      w = plane_stats(channel_of(x, p.sh, c), channel_route(p.r, c), routed, writer.scratch.a.data());
    out.mean[c] = w.mean, out.var[c] = biased_var(w), out.count[c] = w.count;
  });
}

std::tuple<Tensor, Tensor, Tensor> channel_stats_cpu(const Tensor& x_in, const Tensor& route_in,
                                                     bool routed_stats, bool all_channels) {
  const Prepared p = prepare(x_in, route_in);
  Tensor mean = per_channel_empty(p.x), var = per_channel_empty(p.x), count = per_channel_empty(p.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "channel_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    compute_stats<scalar_t>(p, routed_stats, all_channels,
                            {mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), count.data_ptr<acc_t>(), nullptr});
  });
  return {mean, var, count};
}

// Forward apply for all channels given mean/invstd: shared by the fused op and the stage op.
template <typename scalar_t>
void apply_forward(const Prepared& p, Tensor& y, const Tensor& mean, const Tensor& invstd,
                   const Tensor& weight, const Tensor& bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.sh.c;
  std::vector<acc_t> scale(C), shift(C);
  const acc_t *m = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
  const acc_t *w = weight.data_ptr<acc_t>(), *b = bias.data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    const ScaleShift<acc_t> s = scale_shift(m[c], is[c], w[c], b[c]);
    scale[c] = s.scale, shift[c] = s.shift;
  }
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  if (p.rows) {
    rows_apply<scalar_t, acc_t>(x, out, p.sh, p.r, scale.data(), shift.data(), streams(y));
    return;
  }
  for_each_plane<scalar_t>(p, streams(y), {x, nullptr, false}, [&](int64_t c, const Writer<scalar_t>& writer) {
    plane_apply(channel_of(x, p.sh, c), channel_of(out, p.sh, c), channel_route(p.r, c), p.used[c],
                ScaleShift<acc_t>{scale[c], shift[c]}, writer);
  });
}

Tensor normalize_relu_route_cpu(const Tensor& x_in, const Tensor& route_in, const Tensor& mean_in,
                                const Tensor& invstd_in, const std::optional<Tensor>& weight,
                                const std::optional<Tensor>& bias) {
  const Prepared p = prepare(x_in, route_in);
  const Tensor mean = per_channel(mean_in, "mean", p.x), invstd = per_channel(invstd_in, "invstd", p.x);
  const Tensor w = per_channel_or(weight, "weight", p.x, 1.0), b = per_channel_or(bias, "bias", p.x, 0.0);
  Tensor y = at::empty_like(p.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "normalize_relu_route_cpu",
                                  [&] { apply_forward<scalar_t>(p, y, mean, invstd, w, b); });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_relu_route_cpu(
    const Tensor& x_in, const Tensor& route_in, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, bool training, double eps, bool routed_stats,
    bool stats_all_channels) {
  const Prepared p = prepare(x_in, route_in);
  const Tensor w = per_channel_or(weight, "weight", p.x, 1.0), b = per_channel_or(bias, "bias", p.x, 0.0);
  ForwardOutputs out = forward_outputs(p.x, training, running_mean, running_var, eps);
  Tensor &y = out.y, &mean = out.mean, &invstd = out.invstd, &var = out.var, &count = out.count;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "bn_relu_route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* is = invstd.data_ptr<acc_t>();
    if (training && p.rows) {
      compute_stats<scalar_t>(p, routed_stats, stats_all_channels,
                              {m, var.data_ptr<acc_t>(), count.data_ptr<acc_t>(), is});
      for (int64_t c = 0; c < p.sh.c; ++c) is[c] = inv_std(var.data_ptr<acc_t>()[c], eps);
    }
    if (training && !p.rows) {  // fused: each channel reduced and normalised while in cache
      const scalar_t* x = p.x.data_ptr<scalar_t>();
      scalar_t* out = y.data_ptr<scalar_t>();
      acc_t *v = var.data_ptr<acc_t>(), *cnt = count.data_ptr<acc_t>();
      const acc_t *wp = w.data_ptr<acc_t>(), *bp = b.data_ptr<acc_t>();
      const PlaneReads<scalar_t> reads{x, nullptr, !routed_stats && stats_all_channels};
      for_each_plane<scalar_t>(p, streams(y), reads, [&](int64_t c, const Writer<scalar_t>& writer) {
        const Channel<const scalar_t> xc = channel_of(x, p.sh, c);
        const Route rc = channel_route(p.r, c);
        Welford<acc_t> st;
        if (wants_stats(p.used[c], routed_stats, stats_all_channels))
          st = plane_stats(xc, rc, routed_stats, writer.scratch.a.data());
        m[c] = st.mean, v[c] = biased_var(st), cnt[c] = st.count, is[c] = inv_std(v[c], eps);
        plane_apply(xc, channel_of(out, p.sh, c), rc, p.used[c], scale_shift(m[c], is[c], wp[c], bp[c]), writer);
      });
    } else {
      apply_forward<scalar_t>(p, y, mean, invstd, w, b);
    }
  });
  return {y, mean, invstd, var, count};
}

// Per-channel sums of g and g * (x - mean); g = dy * route * (pre-activation > 0).
template <typename scalar_t>
void reduce_grads(const Prepared& p, const Tensor& dy, const Tensor& mean, const Tensor& scale,
                  const Tensor& shift, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *x = p.x.data_ptr<scalar_t>(), *d = dy.data_ptr<scalar_t>();
  const acc_t *m = mean.data_ptr<acc_t>(), *sc = scale.data_ptr<acc_t>(), *sh = shift.data_ptr<acc_t>();
  acc_t *sg = sum_dy.data_ptr<acc_t>(), *sgx = sum_dy_xmu.data_ptr<acc_t>();
  if (p.rows) {
    rows_grad_sums<scalar_t, acc_t>(x, d, p.sh, p.r, sc, sh, m, sg, sgx);
    return;
  }
  for_each_plane<scalar_t>(p, false, {x, d, false}, [&](int64_t c, const Writer<scalar_t>& writer) {
    acc_t sums[2] = {0, 0};
    if (p.used[c])
      plane_grad_sums(channel_of(x, p.sh, c), channel_of(d, p.sh, c), channel_route(p.r, c),
                      ScaleShift<acc_t>{sc[c], sh[c]}, m[c], sums, writer.scratch.a.data(), writer.scratch.b.data());
    sg[c] = sums[0], sgx[c] = sums[1];
  });
}

template <typename scalar_t>
void apply_grads(const Prepared& p, const Tensor& dy, Tensor& dx, const Tensor& scale, const Tensor& shift,
                 const std::vector<GradCoef<at::opmath_type<scalar_t>>>& k, bool training, bool routed_stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *x = p.x.data_ptr<scalar_t>(), *d = dy.data_ptr<scalar_t>();
  scalar_t* out = dx.data_ptr<scalar_t>();
  const acc_t *sc = scale.data_ptr<acc_t>(), *sh = shift.data_ptr<acc_t>();
  if (p.rows) {
    rows_grad_apply<scalar_t, acc_t>(x, d, out, p.sh, p.r, p.used, routed_stats || !training, sc, sh, k, streams(dx));
    return;
  }
  for_each_plane<scalar_t>(p, streams(dx), {x, d, false}, [&](int64_t c, const Writer<scalar_t>& writer) {
    plane_grad_apply(channel_of(x, p.sh, c), channel_of(d, p.sh, c), channel_of(out, p.sh, c),
                     channel_route(p.r, c), p.used[c], training, routed_stats, ScaleShift<acc_t>{sc[c], sh[c]}, k[c],
                     writer);
  });
}

struct BackwardInputs : BackwardTensors {
  Prepared p;
  Tensor scale, shift;
};

BackwardInputs prepare_backward(const Tensor& grad_y, const Tensor& x_in, const Tensor& route_in,
                                const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                const Tensor& mean_in, const Tensor& invstd_in) {
  BackwardInputs in;
  in.p = prepare(x_in, route_in);
  static_cast<BackwardTensors&>(in) = backward_tensors(grad_y, in.p.x, weight, bias, mean_in, invstd_in);
  in.scale = in.invstd * in.w;
  in.shift = in.b - in.mean * in.scale;
  return in;
}

template <typename acc_t>
std::vector<GradCoef<acc_t>> grad_coefs(const BackwardInputs& in, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                        const Tensor& count, bool training) {
  const int64_t C = in.p.sh.c;
  std::vector<GradCoef<acc_t>> k(C);
  const acc_t *m = in.mean.data_ptr<acc_t>(), *is = in.invstd.data_ptr<acc_t>(), *w = in.w.data_ptr<acc_t>();
  const acc_t *sg = sum_dy.data_ptr<acc_t>(), *sgx = sum_dy_xmu.data_ptr<acc_t>();
  const acc_t* cnt = training ? count.data_ptr<acc_t>() : nullptr;
  for (int64_t c = 0; c < C; ++c)
    k[c] = grad_coef(m[c], is[c], w[c], sg[c], sgx[c], training ? cnt[c] : acc_t(0), training);
  return k;
}

// Planes layout, fused: each channel's sums, then its grad_x while its planes are still in cache.
template <typename scalar_t>
void backward_planes(const BackwardInputs& in, const Tensor& count, bool training, bool routed_stats,
                     bool reduce, bool apply, Tensor& sum_dy, Tensor& sum_dy_xmu, Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const Prepared& p = in.p;
  const scalar_t *x = p.x.data_ptr<scalar_t>(), *d = in.dy.data_ptr<scalar_t>();
  scalar_t* out = apply ? dx.data_ptr<scalar_t>() : nullptr;
  const acc_t *m = in.mean.data_ptr<acc_t>(), *is = in.invstd.data_ptr<acc_t>(), *w = in.w.data_ptr<acc_t>();
  const acc_t *sc = in.scale.data_ptr<acc_t>(), *sh = in.shift.data_ptr<acc_t>();
  const acc_t* cnt = training ? count.data_ptr<acc_t>() : nullptr;
  acc_t *sg = sum_dy.data_ptr<acc_t>(), *sgx = sum_dy_xmu.data_ptr<acc_t>();
  for_each_plane<scalar_t>(p, apply && streams(dx), {x, d, false}, [&](int64_t c, const Writer<scalar_t>& writer) {
    const ScaleShift<acc_t> ss{sc[c], sh[c]};
    const Channel<const scalar_t> xc = channel_of(x, p.sh, c), dc = channel_of(d, p.sh, c);
    const Route rc = channel_route(p.r, c);
    acc_t sums[2] = {0, 0};
    if (reduce && p.used[c])
      plane_grad_sums(xc, dc, rc, ss, m[c], sums, writer.scratch.a.data(), writer.scratch.b.data());
    sg[c] = sums[0], sgx[c] = sums[1];
    if (apply)
      plane_grad_apply(xc, dc, channel_of(out, p.sh, c), rc, p.used[c], training, routed_stats, ss,
                       grad_coef(m[c], is[c], w[c], sums[0], sums[1], training ? cnt[c] : acc_t(0), training),
                       writer);
  });
}

std::tuple<Tensor, Tensor> backward_reduce_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& route,
                                               const Tensor& mean, const Tensor& invstd,
                                               const std::optional<Tensor>& weight,
                                               const std::optional<Tensor>& bias) {
  BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  Tensor sum_dy = per_channel_empty(in.p.x), sum_dy_xmu = per_channel_empty(in.p.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.x.scalar_type(), "backward_reduce_cpu", [&] {
    reduce_grads<scalar_t>(in.p, in.dy, in.mean, in.scale, in.shift, sum_dy, sum_dy_xmu);
  });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.x.scalar_type(), "backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_grads<scalar_t>(in.p, in.dy, dx, in.scale, in.shift,
                          grad_coefs<acc_t>(in, sum_dy, sum_dy_xmu, count, training), training, routed_stats);
  });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_route_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& route, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, const Tensor& count_in,
    bool training, bool routed_stats, std::array<bool, 3> output_mask) {
  BackwardInputs in = prepare_backward(grad_y, x, route, weight, bias, mean, invstd);
  const Tensor count = checked_count(count_in, in.p.x, training);
  Tensor sum_dy = at::zeros({in.p.sh.c}, in.mean.options()), sum_dy_xmu = at::zeros_like(sum_dy);
  Tensor dx = output_mask[0] ? at::empty_like(in.p.x) : empty_grad(in.p.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.x.scalar_type(), "bn_relu_route_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool reduce = training || output_mask[1] || output_mask[2];
    if (!in.p.rows) {
      backward_planes<scalar_t>(in, count, training, routed_stats, reduce, output_mask[0], sum_dy, sum_dy_xmu, dx);
      return;
    }
    if (reduce) reduce_grads<scalar_t>(in.p, in.dy, in.mean, in.scale, in.shift, sum_dy, sum_dy_xmu);
    if (output_mask[0])
      apply_grads<scalar_t>(in.p, in.dy, dx, in.scale, in.shift,
                            grad_coefs<acc_t>(in, sum_dy, sum_dy_xmu, count, training), training, routed_stats);
  });
  auto param_grad = [&](const std::optional<Tensor>& param, const Tensor& value, bool needed) {
    if (!needed || !param.has_value() || !param->defined()) return empty_grad(in.p.x);
    return value.to(param->scalar_type());
  };
  return {dx, param_grad(weight, sum_dy_xmu * in.invstd, output_mask[1]), param_grad(bias, sum_dy, output_mask[2])};
}

void update_running_stats_cpu(Tensor& running_mean, Tensor& running_var, const Tensor& mean_in,
                              const Tensor& var_in, const Tensor& count_in, double momentum) {
  check_running_update(running_mean, running_var, mean_in, var_in, count_in);
  const Tensor mean = mean_in.to(at::kDouble), var = var_in.to(at::kDouble), count = count_in.to(at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "update_running_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t *rm = running_mean.data_ptr<scalar_t>(), *rv = running_var.data_ptr<scalar_t>();
    const double *m = mean.data_ptr<double>(), *v = var.data_ptr<double>(), *n = count.data_ptr<double>();
    for (int64_t c = 0; c < running_mean.numel(); ++c) {
      acc_t r_mean = rm[c], r_var = rv[c];
      update_running<acc_t>(r_mean, r_var, acc_t(m[c]), acc_t(v[c]), acc_t(n[c]), acc_t(momentum));
      rm[c] = scalar_t(r_mean), rv[c] = scalar_t(r_var);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(taskrouting, CPU, m) {
  m.impl("update_running_stats", &update_running_stats_cpu);
  m.impl("bn_relu_route", &bn_relu_route_cpu);
  m.impl("bn_relu_route_backward", &bn_relu_route_backward_cpu);
  m.impl("channel_stats", &channel_stats_cpu);
  m.impl("normalize_relu_route", &normalize_relu_route_cpu);
  m.impl("backward_reduce", &backward_reduce_cpu);
  m.impl("backward_apply", &backward_apply_cpu);
}

}  // namespace taskrouting
