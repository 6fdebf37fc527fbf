// Normalize + ReLU + route on the CPU: y = route ? relu(x * scale + shift) : 0, or with a residual
// (bn_add_relu_route) y = route ? relu(x * scale + shift + residual) : 0. The normalize_relu_route
// stage (given mean and invstd) and the fused forwards bn_relu_route and bn_add_relu_route
// (statistics, then the apply; in the planes layout each channel is reduced and normalised while
// it is in cache). kAdd (a residual) is a template parameter: bn_relu_route's loops are unchanged.
#include "kernels.h"

namespace taskrouting {
namespace cpu {
namespace {

// y = relu(x * scale + shift [+ residual]) over n values; lanes past n are neither read nor written.
template <bool kAdd, typename T>
C10_ALWAYS_INLINE void relu_affine_into(const T* x, const T* residual, T* y, int64_t n, ScaleShift<T> s) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> scale(s.scale), shift(s.shift), zero(T(0));
  auto apply = [&](int64_t i, int64_t len) {
    Vec<T> v = at::vec::fmadd(Vec<T>::loadu(x + i, len), scale, shift);
    if constexpr (kAdd) v = v + Vec<T>::loadu(residual + i, len);
    at::vec::clamp_min(v, zero).store(y + i, len);
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) apply(i, W);
  if (i < n) apply(i, n - i);
}

// y = keep ? relu(x * scale + shift [+ residual]) : 0 along a row of C channels (keep: 1 or 0).
// Selected, not multiplied: a masked lane's x or residual may be NaN.
template <bool kAdd, typename T>
C10_ALWAYS_INLINE void relu_affine_row(const T* x, const T* residual, T* y, const T* scale, const T* shift,
                                       const T* keep, int64_t C) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> zero(T(0));
  auto apply = [&](int64_t c, int64_t len) {
    Vec<T> v = at::vec::fmadd(Vec<T>::loadu(x + c, len), Vec<T>::loadu(scale + c, len), Vec<T>::loadu(shift + c, len));
    if constexpr (kAdd) v = v + Vec<T>::loadu(residual + c, len);
    Vec<T>::blendv(zero, at::vec::clamp_min(v, zero), Vec<T>::loadu(keep + c, len) > zero).store(y + c, len);
  };
  int64_t c = 0;
  for (; c + W <= C; c += W) apply(c, W);
  if (c < C) apply(c, C - c);
}

// ---------------------------------------------------------------------------- planes layout
// The residual (kAdd) is read only in the planes of the samples routed through the channel.
template <bool kAdd, typename in_t, typename out_t, typename acc_t>
void plane_apply(Channel<const in_t> x, Channel<const in_t> residual, Channel<out_t> y, Route rc, bool used,
                 ScaleShift<acc_t> s, const Writer<out_t>& out) {
  for (int64_t n = 0; n < x.samples; ++n) {
    out_t* yp = y.plane(n);
    if (!used || !rc.at(n, 0)) {
      out.zero(yp, x.size);
      continue;
    }
    for (int64_t i = 0; i < x.size; i += kBlock) {
      const int64_t len = std::min(kBlock, x.size - i);
      const acc_t* r = nullptr;
      if constexpr (kAdd) r = load_block(residual.plane(n) + i, len, out.scratch.b.data());
      relu_affine_into<kAdd>(load_block(x.plane(n) + i, len, out.scratch.a.data()), r, out.block(yp + i), len, s);
      out.store(yp + i, len);
    }
  }
}

// ---------------------------------------------------------------------------- rows layout
// y = route ? relu(x * scale + shift [+ residual]) : 0, along rows of C.
template <bool kAdd, typename scalar_t, typename acc_t>
void rows_apply(const scalar_t* x, const scalar_t* residual, scalar_t* y, Shape sh, Route r, const acc_t* scale,
                const acc_t* shift, bool stream) {
  const int64_t C = sh.c;
  const std::vector<acc_t> keep = route_values<acc_t>(r, sh.n, C);
  at::parallel_for(0, sh.n * sh.s, grain_for(C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(C);
    const Writer<scalar_t> out{stream, scratch};
    for (int64_t m = begin; m < end; ++m) {
      const acc_t* k = keep.data() + (r.per_sample ? (m / sh.s) * C : 0);
      const acc_t* res = nullptr;
      if constexpr (kAdd) res = load_block(residual + m * C, C, scratch.b.data());
      relu_affine_row<kAdd>(load_block(x + m * C, C, scratch.a.data()), res, out.block(y + m * C), scale, shift, k, C);
      out.store(y + m * C, C);
    }
    if (stream) stream_fence();
  });
}

// The residual's channel c (kAdd), or none.
template <bool kAdd, typename T>
Channel<const T> residual_channel(const T* residual, Shape sh, int64_t c) {
  if constexpr (kAdd) return channel_of(residual, sh, c);
  return {};
}

// Forward apply for all channels given mean/invstd: shared by the fused ops and the stage op;
// residual (kAdd) in x's processing layout.
template <typename scalar_t, bool kAdd>
void apply_forward(const Prepared& p, Tensor& y, const Tensor& mean, const Tensor& invstd, const Tensor& weight,
                   const Tensor& bias, const scalar_t* residual) {
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
    rows_apply<kAdd, scalar_t, acc_t>(x, residual, out, p.sh, p.r, scale.data(), shift.data(), streams(y));
    return;
  }
  for_each_plane<scalar_t>(p, streams(y), [&](int64_t c, const Writer<scalar_t>& writer) {
    plane_apply<kAdd>(channel_of(x, p.sh, c), residual_channel<kAdd>(residual, p.sh, c), channel_of(out, p.sh, c),
                      channel_route(p.r, c), p.used[c], ScaleShift<acc_t>{scale[c], shift[c]}, writer);
  });
}

template <typename scalar_t, bool kAdd>
void fused_forward(const Prepared& p, ForwardOutputs& out, const Tensor& w, const Tensor& b, bool training, double eps,
                   bool routed_stats, bool stats_all_channels, const scalar_t* residual) {
  using acc_t = at::opmath_type<scalar_t>;
  Tensor &y = out.y, &mean = out.mean, &invstd = out.invstd, &var = out.var, &count = out.count;
  acc_t* m = mean.data_ptr<acc_t>();
  acc_t* is = invstd.data_ptr<acc_t>();
  if (training && p.rows) {
    compute_stats<scalar_t>(p, routed_stats, stats_all_channels,
                            {m, var.data_ptr<acc_t>(), count.data_ptr<acc_t>(), is});
    for (int64_t c = 0; c < p.sh.c; ++c) is[c] = inv_std(var.data_ptr<acc_t>()[c], eps);
  }
  if (!training || p.rows) {
    apply_forward<scalar_t, kAdd>(p, y, mean, invstd, w, b, residual);
    return;
  }
  // planes, fused: each channel reduced and normalised while in cache
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  acc_t *v = var.data_ptr<acc_t>(), *cnt = count.data_ptr<acc_t>();
  const acc_t *wp = w.data_ptr<acc_t>(), *bp = b.data_ptr<acc_t>();
  for_each_plane<scalar_t>(p, streams(y), [&](int64_t c, const Writer<scalar_t>& writer) {
    const Channel<const scalar_t> xc = channel_of(x, p.sh, c);
    const Route rc = channel_route(p.r, c);
    Welford<acc_t> st;
    if (wants_stats(p.used[c], routed_stats, stats_all_channels))
      st = plane_stats(xc, rc, routed_stats, writer.scratch.a.data());
    m[c] = st.mean, v[c] = biased_var(st), cnt[c] = st.count, is[c] = inv_std(v[c], eps);
    plane_apply<kAdd>(xc, residual_channel<kAdd>(residual, p.sh, c), channel_of(yp, p.sh, c), rc, p.used[c],
                      scale_shift(m[c], is[c], wp[c], bp[c]), writer);
  });
}

}  // namespace

void normalize_relu_route(const Prepared& p, Tensor& y, const Tensor& mean, const Tensor& invstd, const Tensor& w,
                          const Tensor& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "normalize_relu_route_cpu",
                                  [&] { apply_forward<scalar_t, false>(p, y, mean, invstd, w, b, nullptr); });
}

void bn_relu_route(const Prepared& p, ForwardOutputs& out, const Tensor& w, const Tensor& b, bool training, double eps,
                   bool routed_stats, bool stats_all_channels, const Tensor& residual) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "bn_relu_route_cpu", [&] {
    if (residual.defined())
      fused_forward<scalar_t, true>(p, out, w, b, training, eps, routed_stats, stats_all_channels,
                                    residual.data_ptr<scalar_t>());
    else
      fused_forward<scalar_t, false>(p, out, w, b, training, eps, routed_stats, stats_all_channels, nullptr);
  });
}

}  // namespace cpu
}  // namespace taskrouting
