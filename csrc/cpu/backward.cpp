// Backward on the CPU: backward_reduce (per-channel sums of g and g * (x - mean), with
// g = dy * route * (pre-activation > 0)), backward_apply (grad_x from the sums), and the fused
// backward bn_relu_route_backward (planes layout: each channel's sums, then its grad_x while its
// planes are still in cache).
#include "kernels.h"

namespace taskrouting {
namespace cpu {
namespace {

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

// ---------------------------------------------------------------------------- planes layout
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

// ---------------------------------------------------------------------------- stages
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

}  // namespace

void backward_reduce(const BackwardInputs& in, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.x.scalar_type(), "backward_reduce_cpu", [&] {
    reduce_grads<scalar_t>(in.p, in.dy, in.mean, in.scale, in.shift, sum_dy, sum_dy_xmu);
  });
}

void backward_apply(const BackwardInputs& in, const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& count,
                    bool training, bool routed_stats, Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.x.scalar_type(), "backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_grads<scalar_t>(in.p, in.dy, dx, in.scale, in.shift,
                          grad_coefs<acc_t>(in, sum_dy, sum_dy_xmu, count, training), training, routed_stats);
  });
}

void bn_relu_route_backward(const BackwardInputs& in, const Tensor& count, bool training, bool routed_stats,
                            std::array<bool, 3> output_mask, Tensor& sum_dy, Tensor& sum_dy_xmu, Tensor& dx) {
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
}

}  // namespace cpu
}  // namespace taskrouting
