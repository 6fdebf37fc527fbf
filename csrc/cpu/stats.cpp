// Per-channel batch statistics (mean, biased variance, count) on the CPU: the channel_stats
// stage and the running-stat update. The planes-layout reduction (plane_stats) is in kernels.h,
// since the fused forward (normalize.cpp) uses it too.
#include "kernels.h"

namespace taskrouting {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------- rows layout
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

}  // namespace

// Statistics for every channel that needs them (training) into out.
template <typename scalar_t>
void compute_stats(const Prepared& p, bool routed, bool all_channels, StatsOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  if (p.rows) {
    rows_stats<scalar_t, acc_t>(x, p.sh, p.r, routed, p.used, all_channels, out);
    return;
  }
  for_each_plane<scalar_t>(p, false, [&](int64_t c, const Writer<scalar_t>& writer) {
    Welford<acc_t> w;
    if (wants_stats(p.used[c], routed, all_channels))
      w = plane_stats(channel_of(x, p.sh, c), channel_route(p.r, c), routed, writer.scratch.a.data());
    out.mean[c] = w.mean, out.var[c] = biased_var(w), out.count[c] = w.count;
  });
}

template void compute_stats<double>(const Prepared&, bool, bool, StatsOut<double>);
template void compute_stats<float>(const Prepared&, bool, bool, StatsOut<float>);
template void compute_stats<at::Half>(const Prepared&, bool, bool, StatsOut<float>);
template void compute_stats<at::BFloat16>(const Prepared&, bool, bool, StatsOut<float>);

void channel_stats(const Prepared& p, bool routed_stats, bool all_channels, Tensor& mean, Tensor& var,
                   Tensor& count) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "channel_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    compute_stats<scalar_t>(p, routed_stats, all_channels,
                            {mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), count.data_ptr<acc_t>(), nullptr});
  });
}

void update_running_stats(Tensor& running_mean, Tensor& running_var, const Tensor& mean_in, const Tensor& var_in,
                          const Tensor& count_in, double momentum) {
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

}  // namespace cpu
}  // namespace taskrouting
