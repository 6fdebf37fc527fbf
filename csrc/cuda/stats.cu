// Per-channel batch statistics (mean, biased variance, count) of the fused op, and the
// running-stat update.
//
// Numerics: each thread loads kUnroll vectors (up to 32 values), takes their exact two-pass mean
// and squared deviations in registers, and merges them into its running Welford state with
// Chan's formula; threads merge by warp shuffles, warps through shared memory, chunks in
// stats_merge_kernel. All in fp32 (fp64 for fp64 x); never E[x^2] - E[x]^2. The planes layout's
// per-thread part (planes_thread_stats) is in kernels.cuh: the fused forward (normalize.cu)
// uses it too.
#include "kernels.cuh"

namespace taskrouting {
namespace cuda {
namespace {

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

// Channel c of running stats stored as scalar_t, updated in acc_t: both update kernels.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void update_running_at(int64_t c, scalar_t* running_mean, scalar_t* running_var,
                                                  const acc_t* mean, const acc_t* var, const acc_t* count,
                                                  acc_t momentum) {
  acc_t rm = static_cast<acc_t>(running_mean[c]), rv = static_cast<acc_t>(running_var[c]);
  update_running<acc_t>(rm, rv, mean[c], var[c], count[c], momentum);
  running_mean[c] = static_cast<scalar_t>(rm);
  running_var[c] = static_cast<scalar_t>(rv);
}

template <typename scalar_t, typename acc_t>
__global__ void update_running_kernel(int64_t C, scalar_t* __restrict__ running_mean, scalar_t* __restrict__ running_var,
                                      const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                      const acc_t* __restrict__ count, acc_t momentum) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x)
    update_running_at(c, running_mean, running_var, mean, var, count, momentum);
}

// One block: every thread reads the task's count and last batch before thread 0 advances them.
template <typename scalar_t, typename acc_t>
__global__ void update_task_running_kernel(int64_t C, scalar_t* __restrict__ row_mean, scalar_t* __restrict__ row_var,
                                           int64_t* __restrict__ task_count, int64_t* __restrict__ task_last,
                                           const int64_t* __restrict__ batches, const acc_t* __restrict__ mean,
                                           const acc_t* __restrict__ var, const acc_t* __restrict__ count,
                                           bool cumulative, double momentum) {
  const int64_t n = *task_count + 1, batch = *batches + 1;
  const acc_t factor = static_cast<acc_t>(task_factor(n, batch - *task_last, cumulative, momentum));
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    update_running_at(c, row_mean, row_var, mean, var, count, factor);
  __syncthreads();
  if (threadIdx.x == 0) *task_count = n, *task_last = batch;
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
    const RowsShape sh = rows_shape(p, VEC, resident_blocks_of(rows_stats_kernel<scalar_t, acc_t, VEC>));
    workspace(sh.chunks);
    rows_stats_kernel<scalar_t, acc_t, VEC><<<dim3(sh.tiles, sh.chunks), dim3(sh.bx, sh.by), 0, stream>>>(
        x, p.n * p.s, p.c, p.s, sh.rows_per_chunk, p.r, used, routed, all_channels, out);
  } else {
    const PlanesShape sh = planes_shape(p, VEC, resident_blocks_of(planes_stats_kernel<scalar_t, acc_t, VEC>));
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

// The batch statistics as the update kernels read them: contiguous, in the accumulation type of the
// running statistics' dtype.
struct AccStats {
  at::Tensor mean, var, count;
};
AccStats acc_stats(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count, at::TensorOptions acc) {
  return {mean.to(acc).contiguous(), var.to(acc).contiguous(), count.to(acc).contiguous()};
}

}  // namespace

int64_t planes_stats_resident(const Problem& p, int vec) {
  int64_t blocks = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "taskrouting_stats_resident", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vec<scalar_t>(vec, [&](auto vec_tag) {
      blocks = resident_blocks_of(planes_stats_kernel<scalar_t, acc_t, decltype(vec_tag)::value>);
    });
  });
  return blocks;
}

void launch_stats(const Problem& p, bool routed, bool all_channels, const at::Tensor& mean, const at::Tensor& var,
                  const at::Tensor& count, const at::Tensor& invstd, const at::Tensor& scale_shift,
                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  if (p.c == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "taskrouting_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StatsOut<acc_t> out = stats_out<acc_t>(p, mean, var, count, invstd, scale_shift, weight, bias, eps);
    with_vec<scalar_t>(vec_width<scalar_t>(p.rows ? p.c : p.s, {p.x.data_ptr()}), [&](auto vec_tag) {
      stats_impl<scalar_t, acc_t, decltype(vec_tag)::value>(p, routed, all_channels, out);
    });
  });
}

void launch_update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                                 double momentum) {
  const int64_t C = running_mean.numel();
  if (C == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "taskrouting_update_running_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = running_mean.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const AccStats st = acc_stats(mean, var, count, acc);
    update_running_kernel<scalar_t, acc_t><<<per_channel_blocks(C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        C, running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(), st.mean.data_ptr<acc_t>(),
        st.var.data_ptr<acc_t>(), st.count.data_ptr<acc_t>(), static_cast<acc_t>(momentum));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_update_task_running_stats(const at::Tensor& task_mean, const at::Tensor& task_var,
                                      const at::Tensor& task_count, const at::Tensor& task_last,
                                      const at::Tensor& batches, int64_t task, const at::Tensor& mean,
                                      const at::Tensor& var, const at::Tensor& count, std::optional<double> momentum) {
  const at::Tensor row_mean = task_mean.select(0, task), row_var = task_var.select(0, task);
  const int64_t C = row_mean.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, task_mean.scalar_type(),
                                  "taskrouting_update_task_running_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = task_mean.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const AccStats st = acc_stats(mean, var, count, acc);
    update_task_running_kernel<scalar_t, acc_t><<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        C, row_mean.data_ptr<scalar_t>(), row_var.data_ptr<scalar_t>(), task_count.data_ptr<int64_t>() + task,
        task_last.data_ptr<int64_t>() + task, batches.data_ptr<int64_t>(), st.mean.data_ptr<acc_t>(),
        st.var.data_ptr<acc_t>(), st.count.data_ptr<acc_t>(), !momentum.has_value(), momentum.value_or(0.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace taskrouting
