// Backward on the CPU: backward_reduce (per-channel sums of g and g * (x - mean), with
// g = dy * route * (pre-activation > 0)), backward_apply (grad_x from the sums), and the fused
// backward bn_relu_route_backward (planes layout: each channel's sums, then its grad_x while its
// planes are still in cache). bn_add_relu_route's backward is the same with the gate read from the
// forward's output y (g = dy * route * (y > 0); kOnY, a template parameter, so that bn_relu_route's
// loops are unchanged) and g itself written as grad_residual.
//
// bn_add_relu_route in the rows layout (E = the bytes of one tensor like x): the sums pass reads x,
// grad_y and y and, when grad_residual is asked for, writes g as grad_residual (4E); grad_x then
// reads x and that g back (Gate::kGiven: g is not recomputed) and writes grad_x (3E): 7E, where
// recomputing g (read x, grad_y, y; write grad_x, grad_residual) would make 3E + 5E. Without grad_x,
// grad_residual comes with the sums (4E, not sums then a gate pass over grad_y and y: 6E); rows_gate
// (read grad_y, y; write grad_residual) is left for a backward without the sums (eval, no weight
// gradients), and the apply recomputes g from y when there are no sums or no grad_residual.
#include "kernels.h"

namespace taskrouting {
namespace cpu {
namespace {

// The lanes where the ReLU let the gradient through: y[i:] > 0 given the saved output y (kOnY),
// else x * scale + shift > 0. Lanes past len load as 0, so they are closed.
template <bool kOnY, typename T>
C10_ALWAYS_INLINE Vec<T> relu_open(Vec<T> xv, const T* y, int64_t i, int64_t len, Vec<T> scale, Vec<T> shift) {
  if constexpr (kOnY) return Vec<T>::loadu(y + i, len) > Vec<T>(T(0));
  return at::vec::fmadd(xv, scale, shift) > Vec<T>(T(0));
}

// g = dy where the ReLU was open; acc.v0/v2 += g, acc.v1/v3 += g * (x - mean)
// (sum(g) = v0 + v2, sum(g * (x - mean)) = v1 + v3).
template <bool kOnY, typename T>
C10_ALWAYS_INLINE void add_grad_sums(const T* x, const T* dy, const T* y, int64_t n, ScaleShift<T> s, T mean,
                                     Partial<T>& acc) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> scale(s.scale), shift(s.shift), zero(T(0)), m(mean);
  // Lanes past n load as 0, so g is 0 there (selected, not multiplied: 0 * NaN is NaN).
  auto add = [&](int64_t i, int64_t len, Vec<T>& ag, Vec<T>& agx) {
    const Vec<T> xv = Vec<T>::loadu(x + i, len);
    const Vec<T> g = Vec<T>::blendv(zero, Vec<T>::loadu(dy + i, len), relu_open<kOnY>(xv, y, i, len, scale, shift));
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

// dx = g * k.dy_coef + x * k.x_coef + k.bias_coef, with g = 0 where the sample is not routed;
// dr = g where routed and dr is given (kOnY: bn_add_relu_route's grad_residual).
template <bool kOnY, typename T>
C10_ALWAYS_INLINE void grad_apply(const T* x, const T* dy, const T* y, T* dx, T* dr, int64_t n, ScaleShift<T> s,
                                  GradCoef<T> k, bool routed) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> scale(s.scale), shift(s.shift), zero(T(0)), kd(k.dy_coef), kx(k.x_coef), kb(k.bias_coef);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t len = std::min(W, n - i);
    const Vec<T> xv = Vec<T>::loadu(x + i, len);
    Vec<T> out = at::vec::fmadd(xv, kx, kb);
    if (routed) {
      const Vec<T> g = Vec<T>::blendv(zero, Vec<T>::loadu(dy + i, len), relu_open<kOnY>(xv, y, i, len, scale, shift));
      out = at::vec::fmadd(g, kd, out);
      if constexpr (kOnY) {
        if (dr != nullptr) g.store(dr + i, len);
      }
    }
    out.store(dx + i, len);
  }
}

// grad_residual alone (grad_x not asked for): g = dy where y > 0 and, when given (rows layout), the
// lane's channel is on.
template <typename T>
C10_ALWAYS_INLINE void gate_into(const T* dy, const T* y, const T* on, T* g, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> zero(T(0));
  for (int64_t i = 0; i < n; i += W) {
    const int64_t len = std::min(W, n - i);
    Vec<T> open = Vec<T>::loadu(y + i, len) > zero;
    if (on != nullptr) open = open & (Vec<T>::loadu(on + i, len) > zero);
    Vec<T>::blendv(zero, Vec<T>::loadu(dy + i, len), open).store(g + i, len);
  }
}

// ---------------------------------------------------------------------------- planes layout
// A channel's backward inputs: x, grad_y and (kOnY) the forward's output y.
template <typename T>
struct GradChannels {
  Channel<const T> x, dy, y;
};

template <bool kOnY, typename T>
GradChannels<T> grad_channels(const T* x, const T* dy, const T* y, Shape sh, int64_t c) {
  if constexpr (kOnY) return {channel_of(x, sh, c), channel_of(dy, sh, c), channel_of(y, sh, c)};
  return {channel_of(x, sh, c), channel_of(dy, sh, c), {}};
}

// y's block of plane n (kOnY) as acc_t, or none.
template <bool kOnY, typename in_t, typename acc_t>
const acc_t* y_block(const GradChannels<in_t>& in, int64_t n, int64_t i, int64_t len, acc_t* buf) {
  if constexpr (kOnY) return load_block(in.y.plane(n) + i, len, buf);
  return nullptr;
}

// sums[0] = sum(g), sums[1] = sum(g * (x - mean)) over a channel; g is zero where not routed.
template <bool kOnY, typename in_t, typename acc_t>
void plane_grad_sums(GradChannels<in_t> in, Route rc, ScaleShift<acc_t> s, acc_t mean, acc_t* sums,
                     Scratch<in_t>& buf) {
  double sg = 0, sgx = 0;  // across chunks in double: millions of terms per channel
  for_each_chunk(in.x, rc, true, [&](const Segment* seg, int count, int64_t) {
    Partial<acc_t> acc;
    for (int j = 0; j < count; ++j) {
      const int64_t n = seg[j].n, i = seg[j].start, len = seg[j].len;
      add_grad_sums<kOnY>(load_block(in.x.plane(n) + i, len, buf.a.data()),
                          load_block(in.dy.plane(n) + i, len, buf.b.data()), y_block<kOnY>(in, n, i, len, buf.c.data()),
                          len, s, mean, acc);
    }
    sg += reduce_sum(acc.v0 + acc.v2);
    sgx += reduce_sum(acc.v1 + acc.v3);
  });
  sums[0] = acc_t(sg);
  sums[1] = acc_t(sgx);
}

// grad_x of a channel and (kOnY, dr.base given) its grad_residual, written by out and out.second().
template <bool kOnY, typename in_t, typename out_t, typename acc_t>
void plane_grad_apply(GradChannels<in_t> in, Channel<out_t> dx, Channel<out_t> dr, Route rc, bool used, bool needs_x,
                      bool routed_stats, ScaleShift<acc_t> s, GradCoef<acc_t> k, const Writer<out_t>& out) {
  Scratch<out_t>& buf = out.scratch;
  const Writer<out_t> dr_out = out.second();
  for (int64_t n = 0; n < in.x.samples; ++n) {
    out_t* dp = dx.plane(n);
    out_t* rp = kOnY && dr.base != nullptr ? dr.plane(n) : nullptr;
    const bool through = used && rc.at(n, 0);
    if (rp != nullptr && !through) dr_out.zero(rp, in.x.size);
    if (!grad_reaches(used, through, needs_x, routed_stats)) {
      out.zero(dp, in.x.size);
      continue;
    }
    for (int64_t i = 0; i < in.x.size; i += kBlock) {
      const int64_t len = std::min(kBlock, in.x.size - i);
      acc_t* g = rp != nullptr && through ? dr_out.block(rp + i) : nullptr;
      grad_apply<kOnY>(load_block(in.x.plane(n) + i, len, buf.a.data()),
                       through ? load_block(in.dy.plane(n) + i, len, buf.b.data()) : nullptr,
                       through ? y_block<kOnY>(in, n, i, len, buf.c.data()) : nullptr, out.block(dp + i), g, len, s, k,
                       through);
      out.store(dp + i, len);
      if (g != nullptr) dr_out.store(rp + i, len);
    }
  }
}

// grad_residual of a channel alone: g, without the sums or grad_x.
template <typename in_t, typename out_t>
void plane_gate(GradChannels<in_t> in, Channel<out_t> dr, Route rc, bool used, const Writer<out_t>& out) {
  using acc_t = at::opmath_type<in_t>;
  for (int64_t n = 0; n < in.x.samples; ++n) {
    out_t* rp = dr.plane(n);
    if (!used || !rc.at(n, 0)) {
      out.zero(rp, in.x.size);
      continue;
    }
    for (int64_t i = 0; i < in.x.size; i += kBlock) {
      const int64_t len = std::min(kBlock, in.x.size - i);
      gate_into<acc_t>(load_block(in.dy.plane(n) + i, len, out.scratch.b.data()),
                       load_block(in.y.plane(n) + i, len, out.scratch.c.data()), nullptr, out.block(rp + i), len);
      out.store(rp + i, len);
    }
  }
}

// ---------------------------------------------------------------------------- rows layout
// Where a rows-layout kernel gets g from: recomputed from x (kPre: x * scale + shift > 0,
// bn_relu_route) or from the forward's output y (kOnY: y > 0, bn_add_relu_route), or given (kGiven:
// g itself, as rows_grad_sums wrote it into grad_residual; bn_add_relu_route's apply after the sums).
enum class Gate { kPre, kOnY, kGiven };
template <bool kOnY>
inline constexpr Gate kRecomputed = kOnY ? Gate::kOnY : Gate::kPre;

// Along one row of C channels: g = dy where routed and the ReLU was open (relu_open). kGiven: the
// row passed as dy is g itself (0 where not routed or closed: selected there, so no NaN), loaded as is.
template <Gate kGate, typename acc_t>
struct RowGrad {
  const acc_t *scale, *shift;
  // Also returns x and the lanes where g may be nonzero (select with it: 0 * NaN is NaN); kGiven:
  // the routed lanes.
  Vec<acc_t> operator()(const acc_t* x, const acc_t* dy, const acc_t* y, const acc_t* on, int64_t c, Vec<acc_t>& xv,
                        Vec<acc_t>& live) const {
    constexpr int64_t W = Vec<acc_t>::size();
    const Vec<acc_t> zero(acc_t(0));
    xv = Vec<acc_t>::loadu(x + c);
    if constexpr (kGate == Gate::kGiven) {
      live = Vec<acc_t>::loadu(on + c) > zero;
      return Vec<acc_t>::loadu(dy + c);
    } else {
      const Vec<acc_t> open =
          relu_open<kGate == Gate::kOnY>(xv, y, c, W, Vec<acc_t>::loadu(scale + c), Vec<acc_t>::loadu(shift + c));
      live = open & (Vec<acc_t>::loadu(on + c) > zero);
      return Vec<acc_t>::blendv(zero, Vec<acc_t>::loadu(dy + c), live);
    }
  }
  acc_t scalar(const acc_t* x, const acc_t* dy, const acc_t* y, const acc_t* on, int64_t c) const {
    if constexpr (kGate == Gate::kGiven) return dy[c];
    if (!(on[c] > 0)) return acc_t(0);
    if constexpr (kGate == Gate::kOnY) return gate_on_output(dy[c], y[c]);
    return x[c] * scale[c] + shift[c] > acc_t(0) ? dy[c] : acc_t(0);
  }
};

// Row m of y (kOnY) as acc_t, or none.
template <bool kOnY, typename scalar_t, typename acc_t>
const acc_t* y_row(const scalar_t* y, int64_t m, int64_t C, acc_t* buf) {
  if constexpr (kOnY) return load_block(y + m * C, C, buf);
  return nullptr;
}

// Per-channel sum(g) and sum(g * (x - mean)); dr (kOnY, when given): g written as grad_residual in
// the same pass (each work unit owns its rows, so the stores do not race), for the apply to read
// back (Gate::kGiven) or to be the only grad_residual pass.
template <bool kOnY, typename scalar_t, typename acc_t>
void rows_grad_sums(const scalar_t* x, const scalar_t* dy, const scalar_t* y, scalar_t* dr, Shape sh, Route r,
                    const acc_t* scale, const acc_t* shift, const acc_t* mean, acc_t* sum_dy, acc_t* sum_dy_xmu,
                    bool stream) {
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t C = sh.c;
  const std::vector<acc_t> through = route_values<acc_t>(r, sh.n, C);
  const RowGrad<kRecomputed<kOnY>, acc_t> grad{scale, shift};
  std::vector<std::vector<double>> partial(at::get_num_threads(), std::vector<double>(2 * C, 0.0));
  const RowBlocks rb(sh);
  at::parallel_for(0, sh.n * rb.blocks_per_sample, grain_for(rb.rows_per_block * C), [&](int64_t begin, int64_t end) {
    std::vector<double>& p = partial[at::get_thread_num()];
    Scratch<scalar_t> scratch(C);
    const Writer<scalar_t> g_writer{stream, scratch};
    std::vector<acc_t> sg(C), sgx(C);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / rb.blocks_per_sample;
      const int64_t row0 = (u % rb.blocks_per_sample) * rb.rows_per_block;
      const int64_t rows = std::min(rb.rows_per_block, sh.s - row0);
      const acc_t* on = through.data() + (r.per_sample ? n * C : 0);
      std::fill(sg.begin(), sg.end(), acc_t(0));
      std::fill(sgx.begin(), sgx.end(), acc_t(0));
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t m = n * sh.s + row0 + i;
        const acc_t* xr = load_block(x + m * C, C, scratch.a.data());
        const acc_t* dyr = load_block(dy + m * C, C, scratch.b.data());
        const acc_t* yr = y_row<kOnY>(y, m, C, scratch.c.data());
        acc_t* g_out = kOnY && dr != nullptr ? g_writer.block(dr + m * C) : nullptr;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          Vec<acc_t> xv, live;
          const Vec<acc_t> g = grad(xr, dyr, yr, on, c, xv, live);
          const Vec<acc_t> gx = Vec<acc_t>::blendv(Vec<acc_t>(acc_t(0)), g * (xv - Vec<acc_t>::loadu(mean + c)), live);
          (Vec<acc_t>::loadu(sg.data() + c) + g).store(sg.data() + c);
          (Vec<acc_t>::loadu(sgx.data() + c) + gx).store(sgx.data() + c);
          if constexpr (kOnY) {
            if (g_out != nullptr) g.store(g_out + c);
          }
        }
        for (; c < C; ++c) {
          const acc_t g = grad.scalar(xr, dyr, yr, on, c);
          sg[c] += g;
          if (g != acc_t(0)) sgx[c] += g * (xr[c] - mean[c]);
          if constexpr (kOnY) {
            if (g_out != nullptr) g_out[c] = g;
          }
        }
        if (g_out != nullptr) g_writer.store(dr + m * C, C);
      }
      for (int64_t c = 0; c < C; ++c) p[c] += sg[c], p[C + c] += sgx[c];
    }
    if (stream && kOnY && dr != nullptr) stream_fence();
  });
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (const auto& p : partial) a += p[c], b += p[C + c];
    sum_dy[c] = acc_t(a);
    sum_dy_xmu[c] = acc_t(b);
  }
}

// zero_unrouted: routed statistics or eval, where a sample not routed through c gets no gradient.
// dr (kOnY, when given): grad_residual = g, written in the same pass. kGiven: g is read from dr (as
// rows_grad_sums wrote it), dy and y are not read, and dr is not rewritten.
template <Gate kGate, typename scalar_t, typename acc_t>
void rows_grad_apply(const scalar_t* x, const scalar_t* dy, const scalar_t* y, scalar_t* dx, scalar_t* dr, Shape sh,
                     Route r, const std::vector<char>& used, bool zero_unrouted, const acc_t* scale, const acc_t* shift,
                     const std::vector<GradCoef<acc_t>>& k, bool stream) {
  constexpr int64_t W = Vec<acc_t>::size();
  constexpr bool kWritesDr = kGate == Gate::kOnY;
  const scalar_t* g_in = kGate == Gate::kGiven ? dr : dy;  // the row that RowGrad reads as dy
  const int64_t C = sh.c;
  const std::vector<acc_t> through = route_values<acc_t>(r, sh.n, C);
  std::vector<acc_t> kd(C), kx(C), kb(C), live(C);
  for (int64_t c = 0; c < C; ++c)
    kd[c] = k[c].dy_coef, kx[c] = k[c].x_coef, kb[c] = k[c].bias_coef, live[c] = used[c] ? acc_t(1) : acc_t(0);
  const RowGrad<kGate, acc_t> grad{scale, shift};
  at::parallel_for(0, sh.n * sh.s, grain_for(C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(C);
    const Writer<scalar_t> out{stream, scratch}, dr_out = out.second();
    const Vec<acc_t> zero(acc_t(0));
    for (int64_t m = begin; m < end; ++m) {
      const acc_t* on = through.data() + (r.per_sample ? (m / sh.s) * C : 0);
      const acc_t* keep = zero_unrouted ? on : live.data();
      const acc_t* xr = load_block(x + m * C, C, scratch.a.data());
      const acc_t* dyr = load_block(g_in + m * C, C, scratch.b.data());
      const acc_t* yr = y_row<kGate == Gate::kOnY>(y, m, C, scratch.c.data());
      acc_t* o = out.block(dx + m * C);
      acc_t* g_out = kWritesDr && dr != nullptr ? dr_out.block(dr + m * C) : nullptr;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        Vec<acc_t> xv, live_g;
        const Vec<acc_t> g = grad(xr, dyr, yr, on, c, xv, live_g);
        const Vec<acc_t> v =
            at::vec::fmadd(g, Vec<acc_t>::loadu(kd.data() + c),
                           at::vec::fmadd(xv, Vec<acc_t>::loadu(kx.data() + c), Vec<acc_t>::loadu(kb.data() + c)));
        const Vec<acc_t> mask = (Vec<acc_t>::loadu(keep + c) > zero) & (Vec<acc_t>::loadu(live.data() + c) > zero);
        Vec<acc_t>::blendv(zero, v, mask).store(o + c);
        if constexpr (kWritesDr) {
          if (g_out != nullptr) g.store(g_out + c);
        }
      }
      for (; c < C; ++c) {
        const acc_t g = grad.scalar(xr, dyr, yr, on, c);
        const acc_t v = g * kd[c] + xr[c] * kx[c] + kb[c];
        o[c] = keep[c] > 0 && live[c] > 0 ? v : acc_t(0);
        if constexpr (kWritesDr) {
          if (g_out != nullptr) g_out[c] = g;
        }
      }
      out.store(dx + m * C, C);
      if (g_out != nullptr) dr_out.store(dr + m * C, C);
    }
    if (stream) stream_fence();
  });
}

// grad_residual alone (grad_x not asked for): g along rows of C.
template <typename scalar_t, typename acc_t>
void rows_gate(const scalar_t* dy, const scalar_t* y, scalar_t* dr, Shape sh, Route r, bool stream) {
  const int64_t C = sh.c;
  const std::vector<acc_t> through = route_values<acc_t>(r, sh.n, C);
  at::parallel_for(0, sh.n * sh.s, grain_for(C), [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(C);
    const Writer<scalar_t> out{stream, scratch};
    for (int64_t m = begin; m < end; ++m) {
      const acc_t* on = through.data() + (r.per_sample ? (m / sh.s) * C : 0);
      gate_into(load_block(dy + m * C, C, scratch.b.data()), load_block(y + m * C, C, scratch.c.data()), on,
                out.block(dr + m * C), C);
      out.store(dr + m * C, C);
    }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------------------- stages
// The tensors of a backward pass as the kernels index them: x, grad_y, (kOnY) y and the outputs
// grad_x, grad_residual (null where not asked for).
template <typename scalar_t>
struct GradData {
  const scalar_t *x, *dy, *y;
  scalar_t *dx, *dr;
};

template <typename scalar_t>
const scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
GradData<scalar_t> grad_data(const BackwardInputs& in, Tensor& dx, Tensor& dr, bool want_dx, bool want_dr) {
  return {in.p.x.data_ptr<scalar_t>(), in.dy.data_ptr<scalar_t>(), data_or_null<scalar_t>(in.y),
          want_dx ? dx.data_ptr<scalar_t>() : nullptr, want_dr ? dr.data_ptr<scalar_t>() : nullptr};
}

// Per-channel sums of g and g * (x - mean); g = dy * route * (pre-activation > 0), or (kOnY) y > 0.
// Rows layout, kOnY, t.dr given: g is also written to t.dr (stream: with streaming stores).
template <typename scalar_t, bool kOnY>
void reduce_grads(const Prepared& p, GradData<scalar_t> t, const Tensor& mean, const Tensor& scale, const Tensor& shift,
                  Tensor& sum_dy, Tensor& sum_dy_xmu, bool stream = false) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t *m = mean.data_ptr<acc_t>(), *sc = scale.data_ptr<acc_t>(), *sh = shift.data_ptr<acc_t>();
  acc_t *sg = sum_dy.data_ptr<acc_t>(), *sgx = sum_dy_xmu.data_ptr<acc_t>();
  if (p.rows) {
    rows_grad_sums<kOnY, scalar_t, acc_t>(t.x, t.dy, t.y, t.dr, p.sh, p.r, sc, sh, m, sg, sgx, stream);
    return;
  }
  for_each_plane<scalar_t>(p, false, [&](int64_t c, const Writer<scalar_t>& writer) {
    acc_t sums[2] = {0, 0};
    if (p.used[c])
      plane_grad_sums<kOnY>(grad_channels<kOnY>(t.x, t.dy, t.y, p.sh, c), channel_route(p.r, c),
                            ScaleShift<acc_t>{sc[c], sh[c]}, m[c], sums, writer.scratch);
    sg[c] = sums[0], sgx[c] = sums[1];
  });
}

// grad_x (t.dx) and, kOnY, grad_residual (t.dr when given), rows layout or planes. g_given (rows,
// kOnY): t.dr already holds g (rows_grad_sums wrote it); grad_x is computed from it.
template <typename scalar_t, bool kOnY>
void apply_grads(const Prepared& p, GradData<scalar_t> t, const Tensor& scale, const Tensor& shift,
                 const std::vector<GradCoef<at::opmath_type<scalar_t>>>& k, bool training, bool routed_stats,
                 bool stream, bool g_given = false) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t *sc = scale.data_ptr<acc_t>(), *sh = shift.data_ptr<acc_t>();
  if (p.rows) {
    const bool zero_unrouted = routed_stats || !training;
    if constexpr (kOnY) {
      if (g_given) {
        rows_grad_apply<Gate::kGiven, scalar_t, acc_t>(t.x, t.dy, t.y, t.dx, t.dr, p.sh, p.r, p.used, zero_unrouted,
                                                       sc, sh, k, stream);
        return;
      }
    }
    rows_grad_apply<kRecomputed<kOnY>, scalar_t, acc_t>(t.x, t.dy, t.y, t.dx, t.dr, p.sh, p.r, p.used, zero_unrouted,
                                                        sc, sh, k, stream);
    return;
  }
  for_each_plane<scalar_t>(p, stream, [&](int64_t c, const Writer<scalar_t>& writer) {
    const Channel<scalar_t> dr = t.dr != nullptr ? channel_of(t.dr, p.sh, c) : Channel<scalar_t>{};
    plane_grad_apply<kOnY>(grad_channels<kOnY>(t.x, t.dy, t.y, p.sh, c), channel_of(t.dx, p.sh, c), dr,
                           channel_route(p.r, c), p.used[c], training, routed_stats, ScaleShift<acc_t>{sc[c], sh[c]},
                           k[c], writer);
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

// What a fused backward computes: the gradient sums (for grad_weight, grad_bias and grad_x in
// training), grad_x, grad_residual (bn_add_relu_route).
struct BackwardWants {
  bool sums, dx, dr;
};

// Planes layout, fused: each channel's sums, then its grad_x (and grad_residual) while its planes
// are still in cache; grad_residual alone (no sums, no grad_x) only reads grad_y and y.
template <typename scalar_t, bool kOnY>
void backward_planes(const BackwardInputs& in, GradData<scalar_t> t, const Tensor& count, bool training,
                     bool routed_stats, BackwardWants want, bool stream, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  const Prepared& p = in.p;
  const acc_t *m = in.mean.data_ptr<acc_t>(), *is = in.invstd.data_ptr<acc_t>(), *w = in.w.data_ptr<acc_t>();
  const acc_t *sc = in.scale.data_ptr<acc_t>(), *sh = in.shift.data_ptr<acc_t>();
  const acc_t* cnt = training ? count.data_ptr<acc_t>() : nullptr;
  acc_t *sg = sum_dy.data_ptr<acc_t>(), *sgx = sum_dy_xmu.data_ptr<acc_t>();
  for_each_plane<scalar_t>(p, stream, [&](int64_t c, const Writer<scalar_t>& writer) {
    const ScaleShift<acc_t> ss{sc[c], sh[c]};
    const GradChannels<scalar_t> gc = grad_channels<kOnY>(t.x, t.dy, t.y, p.sh, c);
    const Channel<scalar_t> dr = want.dr ? channel_of(t.dr, p.sh, c) : Channel<scalar_t>{};
    const Route rc = channel_route(p.r, c);
    acc_t sums[2] = {0, 0};
    if (want.sums && p.used[c]) plane_grad_sums<kOnY>(gc, rc, ss, m[c], sums, writer.scratch);
    sg[c] = sums[0], sgx[c] = sums[1];
    if (want.dx) {
      plane_grad_apply<kOnY>(gc, channel_of(t.dx, p.sh, c), dr, rc, p.used[c], training, routed_stats, ss,
                             grad_coef(m[c], is[c], w[c], sums[0], sums[1], training ? cnt[c] : acc_t(0), training),
                             writer);
    } else if constexpr (kOnY) {
      if (want.dr) plane_gate(gc, dr, rc, p.used[c], writer);
    }
  });
}

template <typename scalar_t, bool kOnY>
void fused_backward(const BackwardInputs& in, const Tensor& count, bool training, bool routed_stats, BackwardWants want,
                    Tensor& sum_dy, Tensor& sum_dy_xmu, Tensor& dx, Tensor& dr) {
  using acc_t = at::opmath_type<scalar_t>;
  const GradData<scalar_t> t = grad_data<scalar_t>(in, dx, dr, want.dx, want.dr);
  const bool stream = (want.dx && streams(dx)) || (want.dr && streams(dr));
  if (!in.p.rows) {
    backward_planes<scalar_t, kOnY>(in, t, count, training, routed_stats, want, stream, sum_dy, sum_dy_xmu);
    return;
  }
  // Rows layout: the sums pass writes grad_residual (g) when it is asked for (kOnY), and grad_x is then
  // computed from that g; without the sums, grad_x recomputes g (writing grad_residual), or rows_gate
  // writes grad_residual alone.
  const bool g_written = kOnY && want.sums && want.dr;
  if (want.sums) reduce_grads<scalar_t, kOnY>(in.p, t, in.mean, in.scale, in.shift, sum_dy, sum_dy_xmu, stream);
  if (want.dx) {
    apply_grads<scalar_t, kOnY>(in.p, t, in.scale, in.shift, grad_coefs<acc_t>(in, sum_dy, sum_dy_xmu, count, training),
                                training, routed_stats, stream, g_written);
  } else if constexpr (kOnY) {
    if (want.dr && !g_written) rows_gate<scalar_t, acc_t>(t.dy, t.y, t.dr, in.p.sh, in.p.r, stream);
  }
}

}  // namespace

void backward_reduce(const BackwardInputs& in, Tensor& sum_dy, Tensor& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.x.scalar_type(), "backward_reduce_cpu", [&] {
    const GradData<scalar_t> t{in.p.x.data_ptr<scalar_t>(), in.dy.data_ptr<scalar_t>(), nullptr, nullptr, nullptr};
    reduce_grads<scalar_t, false>(in.p, t, in.mean, in.scale, in.shift, sum_dy, sum_dy_xmu);
  });
}

void backward_apply(const BackwardInputs& in, const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& count,
                    bool training, bool routed_stats, Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.x.scalar_type(), "backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradData<scalar_t> t{in.p.x.data_ptr<scalar_t>(), in.dy.data_ptr<scalar_t>(), nullptr,
                               dx.data_ptr<scalar_t>(), nullptr};
    apply_grads<scalar_t, false>(in.p, t, in.scale, in.shift,
                                 grad_coefs<acc_t>(in, sum_dy, sum_dy_xmu, count, training), training, routed_stats,
                                 streams(dx));
  });
}

void bn_relu_route_backward(const BackwardInputs& in, const Tensor& count, bool training, bool routed_stats,
                            std::array<bool, 4> output_mask, Tensor& sum_dy, Tensor& sum_dy_xmu, Tensor& dx,
                            Tensor& dr) {
  TORCH_INTERNAL_ASSERT(!output_mask[1] || in.y.defined(), "grad_residual needs bn_add_relu_route's y");
  const BackwardWants want{(training && output_mask[0]) || output_mask[2] || output_mask[3], output_mask[0],
                           output_mask[1]};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.p.x.scalar_type(), "bn_relu_route_backward_cpu", [&] {
    if (in.y.defined())
      fused_backward<scalar_t, true>(in, count, training, routed_stats, want, sum_dy, sum_dy_xmu, dx, dr);
    else
      fused_backward<scalar_t, false>(in, count, training, routed_stats, want, sum_dy, sum_dy_xmu, dx, dr);
  });
}

}  // namespace cpu
}  // namespace taskrouting
