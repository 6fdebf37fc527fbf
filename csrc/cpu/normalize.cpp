// Normalize + ReLU + route on the CPU: y = route ? relu(x * scale + shift) : 0. The
// normalize_relu_route stage (given mean and invstd) and the fused forward bn_relu_route
// (statistics, then the apply; in the planes layout each channel is reduced and normalised while
// it is in cache).
#include "kernels.h"

namespace taskrouting {
namespace cpu {
namespace {

template <typename T>
C10_ALWAYS_INLINE void relu_affine_into(const T* x, T* y, int64_t n, ScaleShift<T> s) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> scale(s.scale), shift(s.shift), zero(T(0));
  int64_t i = 0;
  for (; i + W <= n; i += W)
    at::vec::clamp_min(at::vec::fmadd(Vec<T>::loadu(x + i), scale, shift), zero).store(y + i);
  if (i < n) at::vec::clamp_min(at::vec::fmadd(Vec<T>::loadu(x + i, n - i), scale, shift), zero).store(y + i, n - i);
}

// ---------------------------------------------------------------------------- planes layout
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

// ---------------------------------------------------------------------------- rows layout
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

}  // namespace

void normalize_relu_route(const Prepared& p, Tensor& y, const Tensor& mean, const Tensor& invstd,
                          const Tensor& w, const Tensor& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "normalize_relu_route_cpu",
                                  [&] { apply_forward<scalar_t>(p, y, mean, invstd, w, b); });
}

void bn_relu_route(const Prepared& p, ForwardOutputs& out, const Tensor& w, const Tensor& b, bool training,
                   double eps, bool routed_stats, bool stats_all_channels) {
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
}

}  // namespace cpu
}  // namespace taskrouting
