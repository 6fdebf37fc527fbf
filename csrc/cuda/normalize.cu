// Normalize + ReLU + route: y = route ? relu(x * scale + shift) : 0, and bn_add_relu_route's
// y = route ? relu(x * scale + shift + residual) : 0 (kResidual). The apply kernels (scale and shift
// from given statistics), which write a (sample, channel) pair that is not routed as 0 without
// reading x or the residual, and the fused one-block-per-channel forward, which reduces a small
// channel into shared memory and normalises it from there.
#include "kernels.cuh"

namespace taskrouting {
namespace cuda {
namespace {

template <typename acc_t>
__global__ void forward_params_kernel(int64_t C, const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                      const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                      acc_t* __restrict__ params) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    const ScaleShift<acc_t> s = scale_shift(mean[c], invstd[c], weight[c], bias[c]);
    params[c] = s.scale;
    params[C + c] = s.shift;
  }
}

// One output element, rounded once to x's dtype (residual: ignored without kResidual).
template <typename acc_t, bool kResidual, typename scalar_t>
__device__ __forceinline__ scalar_t activate(scalar_t x, const ScaleShift<acc_t>& ss, scalar_t residual) {
  if constexpr (kResidual)
    return static_cast<scalar_t>(relu_affine_add(static_cast<acc_t>(x), ss, static_cast<acc_t>(residual)));
  else
    return static_cast<scalar_t>(relu_affine(static_cast<acc_t>(x), ss));
}

// grid (s tiles, plane groups), block (bx, by): thread (tx, ty) takes plane p (grid-strided over
// N*C by ty) and kUnroll vectors of it per iteration, tx-strided. res: x's indexing (kResidual).
template <typename scalar_t, typename acc_t, int VEC, bool kResidual>
__global__ void __launch_bounds__(kThreads)
planes_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res, scalar_t* __restrict__ y,
                    int64_t P, int64_t C, int64_t S, Route r, const acc_t* __restrict__ params) {
  const bool narrow = P <= int64_t(UINT32_MAX) && C <= int64_t(UINT32_MAX);
  const int64_t step = int64_t(blockDim.x) * VEC, span = step * kUnroll;
  for (int64_t p = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; p < P; p += int64_t(gridDim.y) * blockDim.y) {
    const int64_t n = plane_sample(p, C, narrow), c = p - n * C;
    const bool on = r.at(n, c);
    const ScaleShift<acc_t> ss = on ? ScaleShift<acc_t>{params[c], params[C + c]} : ScaleShift<acc_t>{0, 0};
    const scalar_t* src = x + p * S;
    const scalar_t* src_res = kResidual ? res + p * S : nullptr;
    scalar_t* dst = y + p * S;
    for (int64_t s = int64_t(blockIdx.x) * span + int64_t(threadIdx.x) * VEC; s < S; s += int64_t(gridDim.x) * span) {
      Pack<scalar_t, VEC> v[kUnroll], rv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t su = s + u * step;
        v[u] = on && su < S ? load_pack<VEC>(src + su) : zero_pack<VEC, scalar_t>();
        if constexpr (kResidual) rv[u] = on && su < S ? load_pack<VEC>(src_res + su) : zero_pack<VEC, scalar_t>();
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t su = s + u * step;
        if (su < S) {
          if (on) {
#pragma unroll
            for (int k = 0; k < VEC; ++k)
              v[u].v[k] = activate<acc_t, kResidual>(v[u].v[k], ss, kResidual ? rv[u].v[k] : scalar_t(0));
          }
          store_pack<VEC>(dst + su, v[u]);
        }
      }
    }
  }
}

// grid (channel tiles, row groups), block (bx, by): thread (tx, ty) takes VEC channels and rows
// ty, ty + stride, ... (stride = gridDim.y * by), kUnroll rows per iteration. res: x's indexing
// (kResidual), loaded with x (a pack of channels some of which are routed).
template <typename scalar_t, typename acc_t, int VEC, bool kResidual>
__global__ void __launch_bounds__(kThreads)
rows_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res, scalar_t* __restrict__ y,
                  int64_t M, int64_t C, int64_t S, Route r, const acc_t* __restrict__ params) {
  constexpr int U = kRowUnroll<VEC>();
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;  // no barrier below; C % VEC == 0 (vec_width)
  ScaleShift<acc_t> ss[VEC];
  bool on_batch[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    ss[k] = ScaleShift<acc_t>{params[c0 + k], params[C + c0 + k]};
    on_batch[k] = !r.per_sample && r.mask[c0 + k];
  }
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t m = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; m < M; m += stride * U) {
    Pack<scalar_t, VEC> v[U], rv[U];
    bool on[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t mu = m + u * stride;
      const int64_t n = r.per_sample && mu < M ? mu / S : 0;
      bool any = false;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        on[u][k] = mu < M && (r.per_sample ? r.at(n, c0 + k) : on_batch[k]);
        any |= on[u][k];
      }
      v[u] = any ? load_pack<VEC>(x + mu * C + c0) : zero_pack<VEC, scalar_t>();
      if constexpr (kResidual) rv[u] = any ? load_pack<VEC>(res + mu * C + c0) : zero_pack<VEC, scalar_t>();
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t mu = m + u * stride;
      if (mu < M) {
        Pack<scalar_t, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          o.v[k] = on[u][k] ? activate<acc_t, kResidual>(v[u].v[k], ss[k], kResidual ? rv[u].v[k] : scalar_t(0))
                            : scalar_t(0);
        store_pack<VEC>(y + mu * C + c0, o);
      }
    }
  }
}

// grid C, block (bx, by), dynamic shared memory N * S * sizeof(scalar_t): one block reads its
// channel once (into shared memory while reducing it), then normalises it from there. The
// residual (kResidual) is read from global memory while normalising, kUnroll vectors at once (one
// dependent load per iteration would leave the memory system idle).
template <typename scalar_t, typename acc_t, int VEC, bool kResidual>
__global__ void __launch_bounds__(kThreads)
planes_fused_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                            scalar_t* __restrict__ y, int64_t N, int64_t C, int64_t S, Route r,
                            const bool* __restrict__ used, bool routed, bool all_channels, StatsOut<acc_t> out) {
  constexpr int U = kResidual ? kUnroll : 1;
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
    const scalar_t* src_res = kResidual ? res + (n * C + c) * S : nullptr;
    for (int64_t s = int64_t(threadIdx.x) * VEC; s < S; s += step * U) {
      Pack<scalar_t, VEC> rv[U];
      if constexpr (kResidual) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t su = s + u * step;
          rv[u] = on && su < S ? load_pack<VEC>(src_res + su) : zero_pack<VEC, scalar_t>();
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t su = s + u * step;
        if (u > 0 && su >= S) break;  // u = 0 is in range: the loop's condition
        Pack<scalar_t, VEC> o = zero_pack<VEC, scalar_t>();
        if (on) {
          const Pack<scalar_t, VEC> in = load_pack<VEC>(src + su);
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            o.v[k] = activate<acc_t, kResidual>(in.v[k], ss, kResidual ? rv[u].v[k] : scalar_t(0));
        }
        store_pack<VEC>(dst + su, o);
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC, bool kResidual>
void apply_impl(const Problem& p, const at::Tensor& y, const acc_t* params, const at::Tensor& residual) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? residual.data_ptr<scalar_t>() : nullptr;
  scalar_t* out = y.data_ptr<scalar_t>();
  if (p.rows) {
    const RowsShape sh = rows_shape(p, VEC, /*resident=*/0);
    const int64_t M = p.n * p.s;
    const unsigned grid_y = unsigned(std::clamp<int64_t>(ceil_div(M, int64_t(sh.by) * kUnroll), 1, kMaxGridY));
    rows_apply_kernel<scalar_t, acc_t, VEC, kResidual><<<dim3(sh.tiles, grid_y), dim3(sh.bx, sh.by), 0, stream>>>(
        x, res, out, M, p.c, p.s, p.r, params);
  } else {
    const PlanesShape sh = planes_shape(p, VEC, /*resident=*/0);
    const int64_t P = p.n * p.c;
    const unsigned grid_x = unsigned(std::clamp<int64_t>(ceil_div(p.s, int64_t(sh.bx) * VEC * kUnroll), 1, kMaxGridX));
    const unsigned grid_y = unsigned(std::clamp<int64_t>(ceil_div(P, sh.by), 1, kMaxGridY));
    planes_apply_kernel<scalar_t, acc_t, VEC, kResidual><<<dim3(grid_x, grid_y), dim3(sh.bx, sh.by), 0, stream>>>(
        x, res, out, P, p.c, p.s, p.r, params);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_forward_params(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& scale_shift) {
  const int64_t C = mean.numel();
  if (C == 0) return;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "taskrouting_forward_params_cuda", [&] {
    forward_params_kernel<scalar_t><<<per_channel_blocks(C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        C, mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        bias.data_ptr<scalar_t>(), scale_shift.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_forward_apply(const Problem& p, const at::Tensor& y, const at::Tensor& scale_shift,
                          const at::Tensor& residual) {
  if (p.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "taskrouting_forward_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* params = scale_shift.data_ptr<acc_t>();
    const int vec =
        vec_width<scalar_t>(p.rows ? p.c : p.s, {p.x.data_ptr(), y.data_ptr(), ptr_or_absent(residual)});
    with_flag(residual.defined(), [&](auto has_residual) {
      with_vec<scalar_t>(vec, [&](auto vec_tag) {
        apply_impl<scalar_t, acc_t, decltype(vec_tag)::value, decltype(has_residual)::value>(p, y, params, residual);
      });
    });
  });
}

bool try_fused_forward(const Problem& p, const at::Tensor& y, bool routed, bool all_channels, const at::Tensor& mean,
                       const at::Tensor& var, const at::Tensor& count, const at::Tensor& invstd,
                       const at::Tensor& weight, const at::Tensor& bias, double eps, const at::Tensor& residual) {
  if (p.rows || p.numel() == 0 || p.c > kMaxGridX || !weight.defined() || !bias.defined()) return false;
  const int64_t bytes = p.n * p.s * int64_t(p.x.element_size());
  if (bytes > kFusedStashBytes) return false;
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "taskrouting_fused_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The stash (16-byte aligned, plane n at n * S elements) needs no more than x's alignment.
    const int vec = vec_width<scalar_t>(p.s, {p.x.data_ptr(), y.data_ptr(), ptr_or_absent(residual)});
    // Only where one block per channel already fills the GPU (else the split reduction wins).
    if (planes_shape(p, vec, planes_stats_resident(p, vec)).chunks != 1) return;
    const StatsOut<acc_t> out = stats_out<acc_t>(p, mean, var, count, invstd, at::Tensor(), weight, bias, eps);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const size_t smem = size_t(ceil_div(bytes, 16) * 16);
    with_flag(residual.defined(), [&](auto has_residual) {
      with_vec<scalar_t>(vec, [&](auto vec_tag) {
        constexpr int W = decltype(vec_tag)::value;
        constexpr bool kResidual = decltype(has_residual)::value;
        const PlanesShape sh = planes_shape(p, W, /*resident=*/0);
        const scalar_t* res = kResidual ? residual.data_ptr<scalar_t>() : nullptr;
        planes_fused_forward_kernel<scalar_t, acc_t, W, kResidual><<<unsigned(p.c), dim3(sh.bx, sh.by), smem, stream>>>(
            p.x.data_ptr<scalar_t>(), res, y.data_ptr<scalar_t>(), p.n, p.c, p.s, p.r, p.used.data_ptr<bool>(),
            routed, all_channels, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    launched = true;
  });
  return launched;
}

}  // namespace cuda
}  // namespace taskrouting
