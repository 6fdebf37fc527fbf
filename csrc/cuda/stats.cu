// Per-channel batch statistics (mean, biased variance, count) of the fused op, and the fused
// one-block-per-channel forward that keeps a small channel in shared memory.
//
// Numerics: each thread loads kUnroll vectors (up to 32 values), takes their exact two-pass mean
// and squared deviations in registers, and merges them into its running Welford state with
// Chan's formula; threads merge by warp shuffles, warps through shared memory, chunks in
// stats_merge_kernel. All in fp32 (fp64 for fp64 x); never E[x^2] - E[x]^2.
#include "bn_relu_route_cuda.cuh"

namespace taskrouting {
namespace cuda {
namespace {

// One thread's statistics of channel c over samples [n0, n1) (threadIdx.y strided) and
// positions [s0, s1) of each plane (threadIdx.x strided, VEC per load). kStash also copies
// what it loads to stash[n * S + s] (shared memory of the fused kernel).
template <typename scalar_t, typename acc_t, int VEC, bool kStash>
__device__ __forceinline__ Welford<acc_t> planes_thread_stats(const scalar_t* __restrict__ x, int64_t C, int64_t S,
                                                              int64_t c, int64_t n0, int64_t n1, int64_t s0,
                                                              int64_t s1, Route r, bool routed, scalar_t* stash) {
  Welford<acc_t> w;
  const int64_t step = int64_t(blockDim.x) * VEC;
  for (int64_t n = n0 + threadIdx.y; n < n1; n += blockDim.y) {
    if (routed && !r.at(n, c)) continue;
    const scalar_t* plane = x + (n * C + c) * S;
    for (int64_t s = s0 + int64_t(threadIdx.x) * VEC; s < s1; s += step * kUnroll) {
      acc_t v[kUnroll][VEC];
      int valid = 0;  // the valid vectors are a prefix; the first always is
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t su = s + u * step;
        if (su < s1) {
          const Pack<scalar_t, VEC> pk = load_pack<VEC>(plane + su);
          if constexpr (kStash) store_pack<VEC>(stash + n * S + su, pk);
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[u][k] = static_cast<acc_t>(pk.v[k]);
          valid = u + 1;
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[u][k] = acc_t(0);
        }
      }
      acc_t sum = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += v[u][k];
      const acc_t cnt = acc_t(valid * VEC);
      const acc_t mean = sum / cnt;
      acc_t m2 = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (u < valid) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t d = v[u][k] - mean;
            m2 += d * d;
          }
        }
      }
      welford_merge(w, mean, m2, cnt);
    }
  }
  return w;
}

// grid (chunks, min(C, 65535)), block (bx, by): block (j, c) reduces chunk j of channel c.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
planes_stats_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t S, PlanesShape sh, Route r,
                    const bool* __restrict__ used, bool routed, bool all_channels, StatsOut<acc_t> out) {
  __shared__ SharedArray<Welford<acc_t>, kWarps> sm;
  const int64_t chunk = blockIdx.x;
  const int64_t jn = chunk / sh.chunks_s, js = chunk - jn * sh.chunks_s;
  const int64_t n0 = jn * sh.n_per, n1 = dmin(N, n0 + sh.n_per);
  const int64_t s0 = js * sh.s_per, s1 = dmin(S, s0 + sh.s_per);
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    Welford<acc_t> w;
    if (wants_stats(used[c], routed, all_channels))
      w = planes_thread_stats<scalar_t, acc_t, VEC, false>(x, C, S, c, n0, n1, s0, s1, r, routed, nullptr);
    w = block_reduce<WelfordOp<acc_t>>(w, sm.get());
    if (linear_tid() == 0) write_stats(out, c, chunk, w);
  }
}

// grid (channel tiles, chunks), block (bx, by): thread (tx, ty) of block (t, j) takes channels
// (t * bx + tx) * VEC .. + VEC - 1 of rows ty, ty + by, ... of chunk j.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
rows_stats_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C, int64_t S, int64_t rows_per_chunk, Route r,
                  const bool* __restrict__ used, bool routed, bool all_channels, StatsOut<acc_t> out) {
  constexpr int U = kRowUnroll<VEC>();
  __shared__ SharedArray<Welford<acc_t>, kWarps * 32 * VEC> sm;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  bool want[VEC];
  bool any_want = false;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    want[k] = c0 + k < C && wants_stats(used[c0 + k], routed, all_channels);
    any_want |= want[k];
  }
  // Routed statistics with a task per sample: a row counts for the channels its sample uses.
  const bool per_row = routed && r.per_sample;
  Welford<acc_t> w[VEC];
  const int64_t m0 = int64_t(blockIdx.y) * rows_per_chunk, m1 = dmin(M, m0 + rows_per_chunk);
  const int64_t step = blockDim.y;
  if (any_want) {
    for (int64_t m = m0 + threadIdx.y; m < m1; m += step * U) {
      acc_t v[U][VEC];
      bool take[U][VEC];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t mu = m + u * step;
        const bool row = mu < m1;
        const int64_t n = per_row && row ? mu / S : 0;
        bool any_take = false;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          take[u][k] = row && want[k] && (!per_row || r.at(n, c0 + k));
          any_take |= take[u][k];
        }
        if (any_take) {
          const Pack<scalar_t, VEC> pk = load_pack<VEC>(x + mu * C + c0);
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[u][k] = static_cast<acc_t>(pk.v[k]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[u][k] = acc_t(0);
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t cnt = 0, sum = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          cnt += take[u][k] ? acc_t(1) : acc_t(0);
          sum += take[u][k] ? v[u][k] : acc_t(0);
        }
        if (cnt > 0) {
          const acc_t mean = sum / cnt;
          acc_t m2 = 0;
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const acc_t d = v[u][k] - mean;
            m2 += take[u][k] ? d * d : acc_t(0);
          }
          welford_merge(w[k], mean, m2, cnt);
        }
      }
    }
  }
  const Welford<acc_t> total = rows_block_reduce<WelfordOp<acc_t>, VEC>(w, sm.get());
  const int64_t c = int64_t(blockIdx.x) * blockDim.x * VEC + linear_tid();
  if (linear_tid() < int(blockDim.x) * VEC && c < C) write_stats(out, c, blockIdx.y, total);
}

// grid ceil(C / 8), block (32, 8): warp y merges the chunks of channel blockIdx.x * 8 + y.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) stats_merge_kernel(StatsOut<acc_t> out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= out.channels) return;  // the whole warp
  const int64_t plane = out.channels * out.chunks;
  Welford<acc_t> w;
  for (int64_t k = threadIdx.x; k < out.chunks; k += 32) {
    const int64_t i = c * out.chunks + k;
    welford_merge(w, out.partial[i], out.partial[plane + i], out.partial[2 * plane + i]);
  }
  w = warp_reduce<WelfordOp<acc_t>>(w);
  if (threadIdx.x == 0) finalize_stats(out, c, w);
}

// grid C, block (bx, by), dynamic shared memory N * S * sizeof(scalar_t): one block reads its
// channel once (into shared memory while reducing it), then normalises it from there.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
planes_fused_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t N, int64_t C, int64_t S,
                            Route r, const bool* __restrict__ used, bool routed, bool all_channels,
                            StatsOut<acc_t> out) {
  extern __shared__ __align__(16) unsigned char stash_bytes[];
  scalar_t* stash = reinterpret_cast<scalar_t*>(stash_bytes);
  __shared__ SharedArray<Welford<acc_t>, kWarps> sm;
  __shared__ SharedArray<Welford<acc_t>, 1> total;
  const int64_t c = blockIdx.x;
  const bool live = used[c];
  Welford<acc_t> w;
  if (wants_stats(live, routed, all_channels))
    w = planes_thread_stats<scalar_t, acc_t, VEC, true>(x, C, S, c, 0, N, 0, S, r, routed, stash);
  w = block_reduce<WelfordOp<acc_t>>(w, sm.get());  // its barriers also publish the stash
  if (linear_tid() == 0) {
    finalize_stats(out, c, w);
    total.get()[0] = w;
  }
  __syncthreads();
  w = total.get()[0];
  const ScaleShift<acc_t> ss = scale_shift(w.mean, inv_std(biased_var(w), out.eps), out.weight[c], out.bias[c]);
  const int64_t step = int64_t(blockDim.x) * VEC;
  for (int64_t n = threadIdx.y; n < N; n += blockDim.y) {
    // Loaded above iff the sample goes through the channel (then the channel wants stats).
    const bool on = live && r.at(n, c);
    scalar_t* dst = y + (n * C + c) * S;
    const scalar_t* src = stash + n * S;
    for (int64_t s = int64_t(threadIdx.x) * VEC; s < S; s += step) {
      Pack<scalar_t, VEC> o = zero_pack<VEC, scalar_t>();
      if (on) {
        const Pack<scalar_t, VEC> in = load_pack<VEC>(src + s);
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(relu_affine(static_cast<acc_t>(in.v[k]), ss));
      }
      store_pack<VEC>(dst + s, o);
    }
  }
}

template <typename acc_t>
acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<acc_t>() : nullptr;
}

template <typename acc_t>
StatsOut<acc_t> stats_out(const Problem& p, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                          const at::Tensor& invstd, const at::Tensor& scale_shift, const at::Tensor& weight,
                          const at::Tensor& bias, double eps) {
  StatsOut<acc_t> o{};
  o.mean = mean.data_ptr<acc_t>();
  o.var = var.data_ptr<acc_t>();
  o.count = count.data_ptr<acc_t>();
  o.invstd = ptr_or_null<acc_t>(invstd);
  o.scale = ptr_or_null<acc_t>(scale_shift);
  o.shift = o.scale == nullptr ? nullptr : o.scale + p.c;
  o.weight = weight.defined() ? weight.data_ptr<acc_t>() : nullptr;  // needed for scale/shift only
  o.bias = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  o.eps = eps;
  o.partial = nullptr;
  o.channels = p.c;
  o.chunks = 1;
  return o;
}

template <typename scalar_t, typename acc_t, int VEC>
void stats_impl(const Problem& p, bool routed, bool all_channels, StatsOut<acc_t> out) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  const bool* used = p.used.data_ptr<bool>();
  at::Tensor partial;
  auto workspace = [&](int64_t chunks) {
    out.chunks = chunks;
    if (chunks > 1) {
      partial = at::empty({3 * p.c * chunks}, p.x.options().dtype(acc_type_of(p.x)));
      out.partial = partial.data_ptr<acc_t>();
    }
  };
  if (p.rows) {
    const RowsShape sh = rows_shape(p, VEC, /*split=*/true);
    workspace(sh.chunks);
    rows_stats_kernel<scalar_t, acc_t, VEC><<<dim3(sh.tiles, sh.chunks), dim3(sh.bx, sh.by), 0, stream>>>(
        x, p.n * p.s, p.c, p.s, sh.rows_per_chunk, p.r, used, routed, all_channels, out);
  } else {
    const PlanesShape sh = planes_shape(p, VEC, /*split=*/true);
    workspace(sh.chunks);
    const unsigned grid_y = unsigned(std::min<int64_t>(p.c, kMaxGridY));
    planes_stats_kernel<scalar_t, acc_t, VEC><<<dim3(sh.chunks, grid_y), dim3(sh.bx, sh.by), 0, stream>>>(
        x, p.n, p.c, p.s, sh, p.r, used, routed, all_channels, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (out.chunks > 1) {
    stats_merge_kernel<acc_t><<<unsigned(ceil_div(p.c, kWarps)), dim3(32, kWarps), 0, stream>>>(out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_stats(const Problem& p, bool routed, bool all_channels, const at::Tensor& mean, const at::Tensor& var,
                  const at::Tensor& count, const at::Tensor& invstd, const at::Tensor& scale_shift,
                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  if (p.c == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "taskrouting_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = vec_size<scalar_t>();
    const StatsOut<acc_t> out = stats_out<acc_t>(p, mean, var, count, invstd, scale_shift, weight, bias, eps);
    const bool vec = aligned16(p.x.data_ptr()) && (p.rows ? p.c : p.s) % V == 0;
    if (vec)
      stats_impl<scalar_t, acc_t, V>(p, routed, all_channels, out);
    else
      stats_impl<scalar_t, acc_t, 1>(p, routed, all_channels, out);
  });
}

bool try_fused_forward(const Problem& p, const at::Tensor& y, bool routed, bool all_channels, const at::Tensor& mean,
                       const at::Tensor& var, const at::Tensor& count, const at::Tensor& invstd,
                       const at::Tensor& weight, const at::Tensor& bias, double eps) {
  if (p.rows || p.numel() == 0 || p.c > kMaxGridX || !weight.defined() || !bias.defined()) return false;
  const int64_t bytes = p.n * p.s * int64_t(p.x.element_size());
  if (bytes > kFusedStashBytes) return false;
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "taskrouting_fused_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = vec_size<scalar_t>();
    const bool vec = aligned16(p.x.data_ptr()) && aligned16(y.data_ptr()) && p.s % V == 0;
    // Only where one block per channel already fills the GPU (else the split reduction wins).
    if (planes_shape(p, vec ? V : 1, /*split=*/true).chunks != 1) return;
    const StatsOut<acc_t> out = stats_out<acc_t>(p, mean, var, count, invstd, at::Tensor(), weight, bias, eps);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const size_t smem = size_t(ceil_div(bytes, 16) * 16);
    auto launch = [&](auto vec_tag) {
      constexpr int W = decltype(vec_tag)::value;
      const PlanesShape sh = planes_shape(p, W, /*split=*/false);
      planes_fused_forward_kernel<scalar_t, acc_t, W><<<unsigned(p.c), dim3(sh.bx, sh.by), smem, stream>>>(
          p.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p.n, p.c, p.s, p.r, p.used.data_ptr<bool>(), routed,
          all_channels, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec)
      launch(std::integral_constant<int, V>());
    else
      launch(std::integral_constant<int, 1>());
    launched = true;
  });
  return launched;
}

}  // namespace cuda
}  // namespace taskrouting
