// Backward: per-channel sums of g and g * (x - mean), with g = dy where the sample goes through
// the channel and the pre-activation x * scale + shift is positive (the ReLU mask is recomputed
// from x, never stored), then grad_x = g * dy_coef + x * x_coef + bias_coef.
// bn_add_relu_route's backward (Gate::kOutput) gates on its output instead (y > 0: the
// pre-activation includes the residual, which is not kept) and also writes grad_residual = g;
// it reads x only where grad_x depends on it (training), not for the gate.
// A channel no sample uses gets zero gradient and neither x nor dy of it is read; an unrouted
// (sample, channel) pair reads no dy (nor y), and no x either unless batch statistics carry a
// gradient to it (grad_reaches).
#include "kernels.cuh"

namespace taskrouting {
namespace cuda {
namespace {

using PreActivationGate = std::integral_constant<Gate, Gate::kPreActivation>;
using OutputGate = std::integral_constant<Gate, Gate::kOutput>;
using StoredGate = std::integral_constant<Gate, Gate::kStored>;

// bn_add_relu_route's gate at an element the route lets through: y > 0 (gate_on_output's test),
// or none (kStored: the value loaded is g itself). bn_relu_route's, x * scale + shift > 0, is
// written out where it is used: through a function it compiles to other (equivalent) code.
template <Gate G, typename acc_t>
__device__ __forceinline__ bool output_gate_open(acc_t y) {
  if constexpr (G == Gate::kOutput)
    return y > acc_t(0);
  else
    return true;
}

// grid (chunks, min(C, 65535)), block (bx, by), as planes_stats_kernel. y (Gate::kOutput) and
// g_out (kStoreG: g of the planes the route lets through) have x's indexing.
template <typename scalar_t, typename acc_t, int VEC, Gate G, bool kStoreG>
__global__ void __launch_bounds__(kThreads)
planes_grad_reduce_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                          const scalar_t* __restrict__ y, scalar_t* __restrict__ g_out, int64_t N, int64_t C,
                          int64_t S, PlanesShape sh, Route r, const bool* __restrict__ used, GradOut<acc_t> out) {
  static_assert(!kStoreG || G == Gate::kOutput, "g is stored by bn_add_relu_route's reduce only");
  __shared__ SharedArray<GradSums<acc_t>, kWarps> sm;
  const int64_t chunk = blockIdx.x;
  const int64_t jn = chunk / sh.chunks_s, js = chunk - jn * sh.chunks_s;
  const int64_t n0 = jn * sh.n_per, n1 = dmin(N, n0 + sh.n_per);
  const int64_t s0 = js * sh.s_per, s1 = dmin(S, s0 + sh.s_per);
  const int64_t step = int64_t(blockDim.x) * VEC;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    GradSums<acc_t> t = SumsOp<acc_t>::zero();
    if (used[c]) {
      const acc_t mean = out.mean[c];
      const ScaleShift<acc_t> ss = scale_shift(mean, out.invstd[c], out.weight[c], out.bias[c]);
      for (int64_t n = n0 + threadIdx.y; n < n1; n += blockDim.y) {
        if (!r.at(n, c)) continue;  // g is 0 there
        const int64_t base = (n * C + c) * S;
        for (int64_t s = s0 + int64_t(threadIdx.x) * VEC; s < s1; s += step * kUnroll) {
          Pack<scalar_t, VEC> xv[kUnroll], dv[kUnroll], yv[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t su = s + u * step;
            if (su < s1) {
              xv[u] = load_pack<VEC>(x + base + su);
              dv[u] = load_pack<VEC>(dy + base + su);
              if constexpr (G == Gate::kOutput) yv[u] = load_pack<VEC>(y + base + su);
            }
          }
          acc_t g = 0, gx = 0;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t su = s + u * step;
            if (su < s1) {
              Pack<scalar_t, VEC> gv;
#pragma unroll
              for (int k = 0; k < VEC; ++k) {
                const acc_t xa = static_cast<acc_t>(xv[u].v[k]), d = static_cast<acc_t>(dv[u].v[k]);
                const acc_t ya = G == Gate::kOutput ? static_cast<acc_t>(yv[u].v[k]) : acc_t(0);
                const bool pos = G == Gate::kPreActivation ? xa * ss.scale + ss.shift > acc_t(0)
                                                           : output_gate_open<G>(ya);
                g += pos ? d : acc_t(0);
                gx += pos ? d * (xa - mean) : acc_t(0);
                if constexpr (kStoreG) gv.v[k] = pos ? dv[u].v[k] : scalar_t(0);
              }
              if constexpr (kStoreG) store_pack<VEC>(g_out + base + su, gv);
            }
          }
          t.g += g;
          t.gx += gx;
        }
      }
    }
    t = block_reduce<SumsOp<acc_t>>(t, sm.get());
    if (linear_tid() == 0) write_grad(out, c, chunk, t);
  }
}

// grid (channel tiles, chunks), block (bx, by), as rows_stats_kernel. y and g_out as in
// planes_grad_reduce_kernel; g is stored in whole packs where one of their channels is routed
// (0 in the others), which the apply relies on.
template <typename scalar_t, typename acc_t, int VEC, Gate G, bool kStoreG>
__global__ void __launch_bounds__(kThreads)
rows_grad_reduce_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                        const scalar_t* __restrict__ y, scalar_t* __restrict__ g_out, int64_t M, int64_t C,
                        int64_t S, int64_t rows_per_chunk, Route r, const bool* __restrict__ used, GradOut<acc_t> out) {
  static_assert(!kStoreG || G == Gate::kOutput, "g is stored by bn_add_relu_route's reduce only");
  constexpr int U = kRowUnroll<VEC>();
  __shared__ SharedArray<GradSums<acc_t>, kWarps * 32 * VEC> sm;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  bool live[VEC];
  bool any_live = false;
  acc_t mean[VEC];
  ScaleShift<acc_t> ss[VEC];
  GradSums<acc_t> t[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    live[k] = c0 + k < C && used[c0 + k];
    any_live |= live[k];
    mean[k] = live[k] ? out.mean[c0 + k] : acc_t(0);
    ss[k] = live[k] ? scale_shift(mean[k], out.invstd[c0 + k], out.weight[c0 + k], out.bias[c0 + k])
                    : ScaleShift<acc_t>{0, 0};
    t[k] = SumsOp<acc_t>::zero();
  }
  const int64_t m0 = int64_t(blockIdx.y) * rows_per_chunk, m1 = dmin(M, m0 + rows_per_chunk);
  const int64_t step = blockDim.y;
  if (any_live) {
    for (int64_t m = m0 + threadIdx.y; m < m1; m += step * U) {
      Pack<scalar_t, VEC> xv[U], dv[U], yv[U];
      bool on[U][VEC], any[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t mu = m + u * step;
        const bool row = mu < m1;
        const int64_t n = r.per_sample && row ? mu / S : 0;
        any[u] = false;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          on[u][k] = row && live[k] && (!r.per_sample || r.at(n, c0 + k));
          any[u] |= on[u][k];
        }
        if (any[u]) {
          xv[u] = load_pack<VEC>(x + mu * C + c0);
          dv[u] = load_pack<VEC>(dy + mu * C + c0);
          if constexpr (G == Gate::kOutput) yv[u] = load_pack<VEC>(y + mu * C + c0);
        } else {
          xv[u] = zero_pack<VEC, scalar_t>();
          dv[u] = zero_pack<VEC, scalar_t>();
          if constexpr (G == Gate::kOutput) yv[u] = zero_pack<VEC, scalar_t>();
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t g = 0, gx = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const acc_t xa = static_cast<acc_t>(xv[u].v[k]), d = static_cast<acc_t>(dv[u].v[k]);
          const acc_t ya = G == Gate::kOutput ? static_cast<acc_t>(yv[u].v[k]) : acc_t(0);
          const bool pos = on[u][k] && (G == Gate::kPreActivation ? xa * ss[k].scale + ss[k].shift > acc_t(0)
                                                                  : output_gate_open<G>(ya));
          g += pos ? d : acc_t(0);
          gx += pos ? d * (xa - mean[k]) : acc_t(0);
        }
        t[k].g += g;
        t[k].gx += gx;
      }
      if constexpr (kStoreG) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!any[u]) continue;
          Pack<scalar_t, VEC> gv;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const bool pos = on[u][k] && output_gate_open<G>(static_cast<acc_t>(yv[u].v[k]));
            gv.v[k] = pos ? dv[u].v[k] : scalar_t(0);
          }
          store_pack<VEC>(g_out + (m + u * step) * C + c0, gv);
        }
      }
    }
  }
  const GradSums<acc_t> total = rows_block_reduce<SumsOp<acc_t>, VEC>(t, sm.get());
  const int64_t c = int64_t(blockIdx.x) * blockDim.x * VEC + linear_tid();
  if (linear_tid() < int(blockDim.x) * VEC && c < C) write_grad(out, c, blockIdx.y, total);
}

// grid ceil(C / 8), block (32, 8): warp y sums the chunks of channel blockIdx.x * 8 + y.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) grad_merge_kernel(GradOut<acc_t> out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= out.channels) return;  // the whole warp
  const int64_t plane = out.channels * out.chunks;
  GradSums<acc_t> s = SumsOp<acc_t>::zero();
  for (int64_t k = threadIdx.x; k < out.chunks; k += 32) {
    const int64_t i = c * out.chunks + k;
    s.g += out.partial[i];
    s.gx += out.partial[plane + i];
  }
  s = warp_reduce<SumsOp<acc_t>>(s);
  if (threadIdx.x == 0) finalize_grad(out, c, s);
}

template <typename acc_t>
__global__ void grad_params_kernel(int64_t C, const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                   const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                   const acc_t* __restrict__ sum_dy, const acc_t* __restrict__ sum_dy_xmu,
                                   const acc_t* __restrict__ count, bool training, acc_t* __restrict__ params) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x)
    write_grad_params(params, C, c, mean[c], invstd[c], weight[c], bias[c], sum_dy[c], sum_dy_xmu[c],
                      training ? count[c] : acc_t(0), training);
}

// grad_residual at an element the route lets through: g = dy where y > 0, in x's dtype (exact).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ scalar_t residual_grad(scalar_t dy, scalar_t y) {
  return static_cast<scalar_t>(gate_on_output(static_cast<acc_t>(dy), static_cast<acc_t>(y)));
}

// grid (s tiles, plane groups), block (bx, by), as planes_apply_kernel. kDx: grad_x. kDr:
// grad_residual dr, g (Gate::kOutput) or, with Gate::kStored, only the zeros of the planes the
// route stops (the reduce wrote the others, and g is read back from there instead of dy).
template <typename scalar_t, typename acc_t, int VEC, Gate G, bool kDx, bool kDr>
__global__ void __launch_bounds__(kThreads)
planes_grad_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                         const scalar_t* __restrict__ y, scalar_t* __restrict__ dx, scalar_t* __restrict__ dr,
                         int64_t P, int64_t C, int64_t S, Route r, const bool* __restrict__ used,
                         const acc_t* __restrict__ params, bool training, bool routed_stats) {
  const bool narrow = P <= int64_t(UINT32_MAX) && C <= int64_t(UINT32_MAX);
  const int64_t step = int64_t(blockDim.x) * VEC, span = step * kUnroll;
  const scalar_t* g_src = G == Gate::kStored ? dr : dy;
  for (int64_t p = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; p < P; p += int64_t(gridDim.y) * blockDim.y) {
    const int64_t n = plane_sample(p, C, narrow), c = p - n * C;
    const bool through = r.at(n, c);
    const bool reach = kDx && grad_reaches(used[c], through, training, routed_stats);
    acc_t scale = 0, shift = 0, kd = 0, kx = 0, kb = 0;
    if (reach) {
      scale = params[c], shift = params[C + c];
      kd = params[2 * C + c], kx = params[3 * C + c], kb = params[4 * C + c];
    }
    const int64_t base = p * S;
    for (int64_t s = int64_t(blockIdx.x) * span + int64_t(threadIdx.x) * VEC; s < S; s += int64_t(gridDim.x) * span) {
      Pack<scalar_t, VEC> xv[kUnroll], dv[kUnroll], yv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t su = s + u * step;
        // Conditions inline (not hoisted per plane), so that bn_relu_route's kernel compiles as before.
        // Gating on y, x enters grad_x only through the batch statistics (x_coef is 0 in eval).
        const bool read_x = reach && (G == Gate::kPreActivation || training) && su < S;
        xv[u] = read_x ? load_pack<VEC>(x + base + su) : zero_pack<VEC, scalar_t>();
        const bool read_g = through && (G != Gate::kPreActivation || reach) && (kDx || G == Gate::kOutput) && su < S;
        dv[u] = read_g ? load_pack<VEC>(g_src + base + su) : zero_pack<VEC, scalar_t>();
        if constexpr (G == Gate::kOutput) yv[u] = read_g ? load_pack<VEC>(y + base + su) : zero_pack<VEC, scalar_t>();
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t su = s + u * step;
        if (su < S) {
          if constexpr (kDx) {
            Pack<scalar_t, VEC> o = zero_pack<VEC, scalar_t>();
            if (reach) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) {
                const acc_t xa = static_cast<acc_t>(xv[u].v[k]);
                acc_t v = xa * kx + kb;
                if (through) {
                  const acc_t ya = G == Gate::kOutput ? static_cast<acc_t>(yv[u].v[k]) : acc_t(0);
                  const bool open =
                      G == Gate::kPreActivation ? xa * scale + shift > acc_t(0) : output_gate_open<G>(ya);
                  const acc_t g = open ? static_cast<acc_t>(dv[u].v[k]) : acc_t(0);
                  v = g * kd + v;
                }
                o.v[k] = static_cast<scalar_t>(v);
              }
            }
            store_pack<VEC>(dx + base + su, o);
          }
          if constexpr (kDr && G == Gate::kOutput) {
            Pack<scalar_t, VEC> o = zero_pack<VEC, scalar_t>();
            if (through) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) o.v[k] = residual_grad<acc_t>(dv[u].v[k], yv[u].v[k]);
            }
            store_pack<VEC>(dr + base + su, o);
          }
          if constexpr (kDr && G == Gate::kStored) {
            if (!through) store_pack<VEC>(dr + base + su, zero_pack<VEC, scalar_t>());
          }
        }
      }
    }
  }
}

// grid (channel tiles, row groups), block (bx, by), as rows_apply_kernel; kDx, kDr as in
// planes_grad_apply_kernel (kStored: the reduce wrote the packs with a routed channel).
template <typename scalar_t, typename acc_t, int VEC, Gate G, bool kDx, bool kDr>
__global__ void __launch_bounds__(kThreads)
rows_grad_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                       const scalar_t* __restrict__ y, scalar_t* __restrict__ dx, scalar_t* __restrict__ dr, int64_t M,
                       int64_t C, int64_t S, Route r, const bool* __restrict__ used,
                       const acc_t* __restrict__ params, bool training, bool routed_stats) {
  constexpr int U = kRowUnroll<VEC>();
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;  // no barrier below; C % VEC == 0 (vec_width)
  const scalar_t* g_src = G == Gate::kStored ? dr : dy;
  bool live[VEC], on_batch[VEC];
  acc_t scale[VEC], shift[VEC], kd[VEC], kx[VEC], kb[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int64_t c = c0 + k;
    live[k] = used[c];
    on_batch[k] = !r.per_sample && r.mask[c];
    if constexpr (kDx) {
      scale[k] = params[c], shift[k] = params[C + c];
      kd[k] = params[2 * C + c], kx[k] = params[3 * C + c], kb[k] = params[4 * C + c];
    }
  }
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t m = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; m < M; m += stride * U) {
    Pack<scalar_t, VEC> xv[U], dv[U], yv[U];
    bool on[U][VEC], reach[U][VEC], any_on[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t mu = m + u * stride;
      const bool row = mu < M;
      const int64_t n = r.per_sample && row ? mu / S : 0;
      bool any_reach = false;
      any_on[u] = false;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        on[u][k] = row && (r.per_sample ? r.at(n, c0 + k) : on_batch[k]);
        reach[u][k] = kDx && row && grad_reaches(live[k], on[u][k], training, routed_stats);
        any_on[u] |= on[u][k];
        any_reach |= reach[u][k];
      }
      const bool read_x = any_reach && (G == Gate::kPreActivation || training);  // as in the planes kernel
      xv[u] = read_x ? load_pack<VEC>(x + mu * C + c0) : zero_pack<VEC, scalar_t>();
      dv[u] = any_on[u] && (kDx || G == Gate::kOutput) ? load_pack<VEC>(g_src + mu * C + c0)
                                                       : zero_pack<VEC, scalar_t>();
      if constexpr (G == Gate::kOutput)
        yv[u] = any_on[u] ? load_pack<VEC>(y + mu * C + c0) : zero_pack<VEC, scalar_t>();
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t mu = m + u * stride;
      if (mu < M) {
        if constexpr (kDx) {
          Pack<scalar_t, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t xa = static_cast<acc_t>(xv[u].v[k]);
            acc_t v = xa * kx[k] + kb[k];
            if (on[u][k]) {
              const acc_t ya = G == Gate::kOutput ? static_cast<acc_t>(yv[u].v[k]) : acc_t(0);
              const bool open =
                  G == Gate::kPreActivation ? xa * scale[k] + shift[k] > acc_t(0) : output_gate_open<G>(ya);
              const acc_t g = open ? static_cast<acc_t>(dv[u].v[k]) : acc_t(0);
              v = g * kd[k] + v;
            }
            o.v[k] = reach[u][k] ? static_cast<scalar_t>(v) : scalar_t(0);
          }
          store_pack<VEC>(dx + mu * C + c0, o);
        }
        if constexpr (kDr && G == Gate::kOutput) {
          Pack<scalar_t, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            o.v[k] = on[u][k] ? residual_grad<acc_t>(dv[u].v[k], yv[u].v[k]) : scalar_t(0);
          store_pack<VEC>(dr + mu * C + c0, o);
        }
        if constexpr (kDr && G == Gate::kStored) {
          if (!any_on[u]) store_pack<VEC>(dr + mu * C + c0, zero_pack<VEC, scalar_t>());
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC, Gate G, bool kStoreG>
void grad_reduce_impl(const Problem& p, const at::Tensor& dy, GradOut<acc_t> out, const ResidualGrad& res) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const scalar_t *x = p.x.data_ptr<scalar_t>(), *d = dy.data_ptr<scalar_t>();
  const scalar_t* y = G == Gate::kOutput ? res.y.data_ptr<scalar_t>() : nullptr;
  scalar_t* g_out = kStoreG ? res.grad_residual.data_ptr<scalar_t>() : nullptr;
  const bool* used = p.used.data_ptr<bool>();
  at::Tensor partial;
  auto workspace = [&](int64_t chunks) {
    out.chunks = chunks;
    if (chunks > 1) {
      partial = at::empty({2 * p.c * chunks}, p.x.options().dtype(acc_type_of(p.x)));
      out.partial = partial.data_ptr<acc_t>();
    }
  };
  if (p.rows) {
    auto* kernel = rows_grad_reduce_kernel<scalar_t, acc_t, VEC, G, kStoreG>;
    const RowsShape sh = rows_shape(p, VEC, resident_blocks_of(kernel));
    workspace(sh.chunks);
    kernel<<<dim3(sh.tiles, sh.chunks), dim3(sh.bx, sh.by), 0, stream>>>(x, d, y, g_out, p.n * p.s, p.c, p.s,
                                                                         sh.rows_per_chunk, p.r, used, out);
  } else {
    auto* kernel = planes_grad_reduce_kernel<scalar_t, acc_t, VEC, G, kStoreG>;
    const PlanesShape sh = planes_shape(p, VEC, resident_blocks_of(kernel));
    workspace(sh.chunks);
    const unsigned grid_y = unsigned(std::min<int64_t>(p.c, kMaxGridY));
    kernel<<<dim3(sh.chunks, grid_y), dim3(sh.bx, sh.by), 0, stream>>>(x, d, y, g_out, p.n, p.c, p.s, sh, p.r, used,
                                                                       out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (out.chunks > 1) {
    grad_merge_kernel<acc_t><<<unsigned(ceil_div(p.c, kWarps)), dim3(32, kWarps), 0, stream>>>(out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t, int VEC, Gate G, bool kDx, bool kDr>
void grad_apply_impl(const Problem& p, const at::Tensor& dy, const at::Tensor& dx, const acc_t* params, bool training,
                     bool routed_stats, const ResidualGrad& res) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const scalar_t *x = p.x.data_ptr<scalar_t>(), *d = dy.data_ptr<scalar_t>();
  const scalar_t* y = G == Gate::kOutput ? res.y.data_ptr<scalar_t>() : nullptr;
  scalar_t* out = kDx ? dx.data_ptr<scalar_t>() : nullptr;
  scalar_t* dr = kDr ? res.grad_residual.data_ptr<scalar_t>() : nullptr;
  const bool* used = p.used.data_ptr<bool>();
  if (p.rows) {
    const RowsShape sh = rows_shape(p, VEC, /*resident=*/0);
    const int64_t M = p.n * p.s;
    const unsigned grid_y = unsigned(std::clamp<int64_t>(ceil_div(M, int64_t(sh.by) * kUnroll), 1, kMaxGridY));
    auto* kernel = rows_grad_apply_kernel<scalar_t, acc_t, VEC, G, kDx, kDr>;
    kernel<<<dim3(sh.tiles, grid_y), dim3(sh.bx, sh.by), 0, stream>>>(x, d, y, out, dr, M, p.c, p.s, p.r, used, params,
                                                                     training, routed_stats);
  } else {
    const PlanesShape sh = planes_shape(p, VEC, /*resident=*/0);
    const int64_t P = p.n * p.c;
    const unsigned grid_x = unsigned(std::clamp<int64_t>(ceil_div(p.s, int64_t(sh.bx) * VEC * kUnroll), 1, kMaxGridX));
    const unsigned grid_y = unsigned(std::clamp<int64_t>(ceil_div(P, sh.by), 1, kMaxGridY));
    auto* kernel = planes_grad_apply_kernel<scalar_t, acc_t, VEC, G, kDx, kDr>;
    kernel<<<dim3(grid_x, grid_y), dim3(sh.bx, sh.by), 0, stream>>>(x, d, y, out, dr, P, p.c, p.s, p.r, used, params,
                                                                   training, routed_stats);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The vector width of a backward pass (vec_width over its operands; dx: the apply's grad_x). The
// apply adds only grad_x to the reduce's operands, so it never takes wider packs than the reduce
// that stored g in whole packs (rows layout): each of its packs lies in one pack of the reduce, and
// it reads back what the reduce wrote (and zeroes the packs with no routed channel).
template <typename T>
int grad_vec(const Problem& p, const at::Tensor& dy, const ResidualGrad& res, const at::Tensor& dx = at::Tensor()) {
  return vec_width<T>(p.rows ? p.c : p.s, {p.x.data_ptr(), dy.data_ptr(), ptr_or_absent(res.y),
                                           ptr_or_absent(res.grad_residual), ptr_or_absent(dx)});
}

}  // namespace

void launch_grad_reduce(const Problem& p, const at::Tensor& dy, const at::Tensor& mean, const at::Tensor& invstd,
                        const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& sum_dy,
                        const at::Tensor& sum_dy_xmu, const at::Tensor& params, const at::Tensor& count,
                        bool training, const at::Tensor& grad_weight, const ResidualGrad& res) {
  if (p.c == 0) return;
  TORCH_INTERNAL_ASSERT(!res.stored_g || (res.y.defined() && res.grad_residual.defined()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "taskrouting_grad_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GradOut<acc_t> out{};
    out.sum_dy = sum_dy.data_ptr<acc_t>();
    out.sum_dy_xmu = sum_dy_xmu.data_ptr<acc_t>();
    out.params = params.defined() ? params.data_ptr<acc_t>() : nullptr;
    out.mean = mean.data_ptr<acc_t>();
    out.invstd = invstd.data_ptr<acc_t>();
    out.weight = weight.data_ptr<acc_t>();
    out.bias = bias.data_ptr<acc_t>();
    out.count = training && out.params != nullptr ? count.data_ptr<acc_t>() : nullptr;
    out.used = p.used.data_ptr<bool>();
    out.grad_weight = grad_weight.defined() ? grad_weight.data_ptr<acc_t>() : nullptr;
    out.training = training;
    out.partial = nullptr;
    out.channels = p.c;
    out.chunks = 1;
    with_vec<scalar_t>(grad_vec<scalar_t>(p, dy, res), [&](auto vec_tag) {
      constexpr int W = decltype(vec_tag)::value;
      if (!res.y.defined()) {
        grad_reduce_impl<scalar_t, acc_t, W, Gate::kPreActivation, false>(p, dy, out, res);
        return;
      }
      with_flag(res.stored_g, [&](auto store_g) {
        grad_reduce_impl<scalar_t, acc_t, W, Gate::kOutput, decltype(store_g)::value>(p, dy, out, res);
      });
    });
  });
}

void launch_grad_params(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                        const at::Tensor& bias, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                        const at::Tensor& count, bool training, const at::Tensor& params) {
  const int64_t C = mean.numel();
  if (C == 0) return;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "taskrouting_grad_params_cuda", [&] {
    grad_params_kernel<scalar_t><<<per_channel_blocks(C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        C, mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        bias.data_ptr<scalar_t>(), sum_dy.data_ptr<scalar_t>(), sum_dy_xmu.data_ptr<scalar_t>(),
        training ? count.data_ptr<scalar_t>() : nullptr, training, params.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_grad_apply(const Problem& p, const at::Tensor& dy, const at::Tensor& dx, const at::Tensor& params,
                       bool training, bool routed_stats, const ResidualGrad& res) {
  if (p.numel() == 0) return;
  const bool dr = res.grad_residual.defined();
  TORCH_INTERNAL_ASSERT(dx.defined() ? params.defined() : (res.y.defined() && dr));
  TORCH_INTERNAL_ASSERT(!res.stored_g || (res.y.defined() && dr));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "taskrouting_grad_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* prm = dx.defined() ? params.data_ptr<acc_t>() : nullptr;
    with_vec<scalar_t>(grad_vec<scalar_t>(p, dy, res, dx), [&](auto vec_tag) {
      constexpr int W = decltype(vec_tag)::value;
      auto launch = [&](auto gate, auto with_dx, auto with_dr) {
        grad_apply_impl<scalar_t, acc_t, W, decltype(gate)::value, decltype(with_dx)::value,
                        decltype(with_dr)::value>(p, dy, dx, prm, training, routed_stats, res);
      };
      if (!res.y.defined())
        launch(PreActivationGate(), std::true_type(), std::false_type());
      else if (res.stored_g)  // without grad_x: only the zeros of what the reduce did not store
        with_flag(dx.defined(), [&](auto with_dx) { launch(StoredGate(), with_dx, std::true_type()); });
      else if (!dx.defined())
        launch(OutputGate(), std::false_type(), std::true_type());
      else
        with_flag(dr, [&](auto with_dr) { launch(OutputGate(), std::true_type(), with_dr); });
    });
  });
}

}  // namespace cuda
}  // namespace taskrouting
