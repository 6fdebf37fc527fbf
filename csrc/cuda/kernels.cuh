// CUDA kernels of the fused BatchNorm + ReLU + route op: what the stage files share.
//
// Files: ops.cu (the ops: argument checks, outputs, which kernels run; the CUDA registration),
// stats.cu (per-channel statistics, the running-stat update), normalize.cu (normalize + ReLU +
// route, the fused one-block-per-channel forward), backward.cu (gradient sums, grad_x). The same
// stage files are in csrc/cpu/ (kernels.h there).
//
// Two layouts, as in the CPU kernels:
//  * planes (NCHW-contiguous, rank 3-5): x[n, c, s] at (n*C + c)*S + s. Blocks are 2-D,
//    threadIdx.x along s (coalesced, VEC elements per load: vec_width), threadIdx.y along samples.
//  * rows (channels-last, [N, C], and any layout with S == 1): x[m, c] at m*C + c, m = n*S + s.
//    Blocks are 2-D, threadIdx.x along C (VEC channels per thread, coalesced across C),
//    threadIdx.y along rows.
// Reductions over (channel, chunk): a block reduces one chunk of one channel (planes) or of a
// tile of channels (rows); with more than one chunk the partials go to a workspace and a second
// kernel merges them per channel, in a fixed order (results are deterministic).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../bn_relu_route_checks.h"
#include "../bn_relu_route_math.h"

namespace taskrouting {
namespace cuda {

constexpr int kThreads = 256;            // threads per block of the main kernels
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;               // independent vector loads in flight per thread
constexpr int kMaxGridY = 65535;
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kFusedStashBytes = 40 * 1024;  // a channel this small is kept in shared memory

// Rows in flight per thread in the rows kernels: fewer where a thread already holds 8 channels
// (half/bfloat16), to stay within ~128 registers.
template <int VEC>
constexpr int kRowUnroll() {
  return VEC >= 8 ? 2 : kUnroll;
}

// Elements per 128-bit access.
template <typename T>
constexpr int vec_size() {
  return 16 / int(sizeof(T)) > 0 ? 16 / int(sizeof(T)) : 1;
}

// The narrower vector width the kernels are also compiled for: 64-bit accesses of half/bfloat16
// (4 elements: a 14x14 plane, or C % 8 == 4 channels-last), 1 (none) for float and double. Every
// width is another instantiation of every kernel; 2-element widths are left out: square planes
// (S = n * n) are never 2 mod 4, so they would serve only odd shapes.
template <typename T>
constexpr int vec_size_narrow() {
  return vec_size<T>() >= 8 ? vec_size<T>() / 2 : 1;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> zero_pack() {
  Pack<T, N> z;
#pragma unroll
  for (int k = 0; k < N; ++k) z.v[k] = T(0);
  return z;
}

// ---------------------------------------------------------------------------------- reductions
// A reduced quantity: Welford (mean, m2, count) merged with Chan's formula, or plain sums.
template <typename acc_t>
struct WelfordOp {
  using T = Welford<acc_t>;
  static __device__ __forceinline__ T zero() { return T{}; }
  static __device__ __forceinline__ T shfl_down(const T& v, int offset) {
    T r;
    r.mean = __shfl_down_sync(0xffffffffu, v.mean, offset);
    r.m2 = __shfl_down_sync(0xffffffffu, v.m2, offset);
    r.count = __shfl_down_sync(0xffffffffu, v.count, offset);
    return r;
  }
  static __device__ __forceinline__ void merge(T& a, const T& b) { welford_merge(a, b.mean, b.m2, b.count); }
};

// Sums of g and g * (x - mean) for the backward pass.
template <typename acc_t>
struct GradSums {
  acc_t g;
  acc_t gx;
};

template <typename acc_t>
struct SumsOp {
  using T = GradSums<acc_t>;
  static __device__ __forceinline__ T zero() { return T{acc_t(0), acc_t(0)}; }
  static __device__ __forceinline__ T shfl_down(const T& v, int offset) {
    return T{__shfl_down_sync(0xffffffffu, v.g, offset), __shfl_down_sync(0xffffffffu, v.gx, offset)};
  }
  static __device__ __forceinline__ void merge(T& a, const T& b) {
    a.g += b.g;
    a.gx += b.gx;
  }
};

template <typename T>
__device__ __forceinline__ T dmin(T a, T b) {
  return a < b ? a : b;
}

// Sample of plane p = n * C + c (a 32-bit division where the sizes allow).
__device__ __forceinline__ int64_t plane_sample(int64_t p, int64_t C, bool narrow) {
  return narrow ? int64_t(uint32_t(p) / uint32_t(C)) : p / C;
}

__device__ __forceinline__ int linear_tid() { return threadIdx.y * blockDim.x + threadIdx.x; }

// Tree over the lanes of a warp (shuffle down, offsets 16 .. min_offset): lane l < min_offset
// ends with the merge of lanes l, l + min_offset, l + 2*min_offset, ...
template <typename Op>
__device__ __forceinline__ typename Op::T warp_reduce(typename Op::T v, int min_offset = 1) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    if (offset < min_offset) break;
    Op::merge(v, Op::shfl_down(v, offset));
  }
  return v;
}

// Every thread of the block (kThreads, any 2-D shape) holds one value of the same quantity;
// the merge of all of them ends in thread 0. `sm` holds kWarps values. Safe to call in a loop.
template <typename Op>
__device__ typename Op::T block_reduce(typename Op::T v, typename Op::T* sm) {
  const int tid = linear_tid(), lane = tid & 31, warp = tid >> 5;
  v = warp_reduce<Op>(v);
  __syncthreads();  // sm may still be read by a previous call
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sm[lane] : Op::zero();
    v = warp_reduce<Op>(v);
  }
  return v;
}

// Rows layout: threads with the same threadIdx.x hold VEC values each of the same VEC channels.
// Returns, in thread t < blockDim.x * VEC, the merge over threadIdx.y of channel slot t
// (slot t = threadIdx.x * VEC + k of the block's channel tile). blockDim.x is a power of 2 <= 32.
// `sm` holds kWarps * 32 * VEC values.
template <typename Op, int VEC>
__device__ typename Op::T rows_block_reduce(typename Op::T (&v)[VEC], typename Op::T* sm) {
  const int bx = blockDim.x, tid = linear_tid(), lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = warp_reduce<Op>(v[k], bx);  // lanes < bx: one per channel group
  if (lane < bx) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) sm[(warp * 32 + lane) * VEC + k] = v[k];
  }
  __syncthreads();
  typename Op::T out = Op::zero();
  if (tid < bx * VEC) {
    const int tx = tid / VEC, k = tid % VEC;
    for (int w = 0; w < kWarps; ++w) Op::merge(out, sm[(w * 32 + tx) * VEC + k]);
  }
  return out;
}

// Raw shared storage for reductions (no constructors may run on __shared__ variables).
template <typename T, int N>
struct SharedArray {
  alignas(16) unsigned char bytes[sizeof(T) * N];
  __device__ __forceinline__ T* get() { return reinterpret_cast<T*>(bytes); }
};

// ---------------------------------------------------------------------------------- outputs
// Where a statistics reduction writes: the final per-channel values, or per-chunk partials
// [3][C][chunks] (mean, m2, count) that stats_merge_kernel combines.
template <typename acc_t>
struct StatsOut {
  acc_t* mean;
  acc_t* var;
  acc_t* count;
  acc_t* invstd;       // optional
  acc_t* scale;        // optional: scale/shift of the forward apply, from weight and bias
  acc_t* shift;
  const acc_t* weight;
  const acc_t* bias;
  double eps;
  acc_t* partial;      // used when chunks > 1
  int64_t channels;
  int64_t chunks;
};

template <typename acc_t>
__device__ __forceinline__ void finalize_stats(const StatsOut<acc_t>& o, int64_t c, const Welford<acc_t>& w) {
  const acc_t var = biased_var(w);
  o.mean[c] = w.mean;
  o.var[c] = var;
  o.count[c] = w.count;
  if (o.invstd != nullptr || o.scale != nullptr) {
    const acc_t is = inv_std(var, o.eps);
    if (o.invstd != nullptr) o.invstd[c] = is;
    if (o.scale != nullptr) {
      const ScaleShift<acc_t> s = scale_shift(w.mean, is, o.weight[c], o.bias[c]);
      o.scale[c] = s.scale;
      o.shift[c] = s.shift;
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ void write_stats(const StatsOut<acc_t>& o, int64_t c, int64_t chunk,
                                            const Welford<acc_t>& w) {
  if (o.chunks == 1) {
    finalize_stats(o, c, w);
    return;
  }
  const int64_t plane = o.channels * o.chunks, i = c * o.chunks + chunk;
  o.partial[i] = w.mean;
  o.partial[plane + i] = w.m2;
  o.partial[2 * plane + i] = w.count;
}

// ---------------------------------------------------------------------------------- statistics
// The per-thread reduction of the planes layout: planes_stats_kernel (stats.cu) and
// planes_fused_forward_kernel (normalize.cu).
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

// Per-channel parameters of the element-wise kernels: forward [2][C] (scale, shift), backward
// [5][C] (scale, shift, dy_coef, x_coef, bias_coef), all in the accumulation type.
template <typename acc_t>
struct GradOut {
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  acc_t* params;        // optional [5][C]: grad_x coefficients for backward_apply
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* count;   // training only
  const bool* used;     // channels some sample is routed through
  acc_t* grad_weight;   // optional [C]: sum_dy_xmu * invstd on used channels, 0 elsewhere
  bool training;
  acc_t* partial;       // [2][C][chunks] when chunks > 1
  int64_t channels;
  int64_t chunks;
};

template <typename acc_t>
__device__ __forceinline__ void write_grad_params(acc_t* params, int64_t C, int64_t c, acc_t mean, acc_t invstd,
                                                  acc_t weight, acc_t bias, acc_t sum_dy, acc_t sum_dy_xmu,
                                                  acc_t count, bool training) {
  const ScaleShift<acc_t> s = scale_shift(mean, invstd, weight, bias);
  const GradCoef<acc_t> k = grad_coef(mean, invstd, weight, sum_dy, sum_dy_xmu, count, training);
  params[c] = s.scale;
  params[C + c] = s.shift;
  params[2 * C + c] = k.dy_coef;
  params[3 * C + c] = k.x_coef;
  params[4 * C + c] = k.bias_coef;
}

template <typename acc_t>
__device__ __forceinline__ void finalize_grad(const GradOut<acc_t>& o, int64_t c, const GradSums<acc_t>& s) {
  o.sum_dy[c] = s.g;
  o.sum_dy_xmu[c] = s.gx;
  if (o.grad_weight != nullptr) o.grad_weight[c] = o.used[c] ? s.gx * o.invstd[c] : acc_t(0);
  if (o.params != nullptr)
    write_grad_params(o.params, o.channels, c, o.mean[c], o.invstd[c], o.weight[c], o.bias[c], s.g, s.gx,
                      o.training ? o.count[c] : acc_t(0), o.training);
}

template <typename acc_t>
__device__ __forceinline__ void write_grad(const GradOut<acc_t>& o, int64_t c, int64_t chunk, const GradSums<acc_t>& s) {
  if (o.chunks == 1) {
    finalize_grad(o, c, s);
    return;
  }
  const int64_t plane = o.channels * o.chunks, i = c * o.chunks + chunk;
  o.partial[i] = s.g;
  o.partial[plane + i] = s.gx;
}

// ---------------------------------------------------------------------------------- host side
// x and route as the kernels read them, checked, on x's device (callers hold a CUDAGuard).
struct Problem {
  at::Tensor x;      // contiguous in its own layout
  at::Tensor route;  // contiguous bool [C] or [N, C]
  at::Tensor used;   // bool [C]: some sample of the batch goes through the channel
  int64_t n = 0, c = 0, s = 0;
  bool rows = false;
  Route r{nullptr, 0, false};
  int64_t numel() const { return n * c * s; }
};

Problem prepare(const at::Tensor& x, const at::Tensor& route);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An optional operand's address for vec_width: nullptr (constrains nothing) when it is absent.
inline const void* ptr_or_absent(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The one rule for the vector width of a launch: the widest W of those compiled for T
// (vec_size<T>(), vec_size_narrow<T>(), 1) such that `extent` (S in the planes layout, C in rows)
// is a multiple of W and every operand the kernels access in packs (ptrs; nullptr: absent) is
// aligned to W * sizeof(T) bytes. A launch whose operands are a superset of another's, with the
// same extent, never gets a wider W (backward.cu relies on it).
template <typename T>
int vec_width(int64_t extent, std::initializer_list<const void*> ptrs) {
  auto fits = [&](int w) {
    if (extent % w != 0) return false;
    const uintptr_t bytes = uintptr_t(w) * sizeof(T);
    for (const void* q : ptrs)
      if (reinterpret_cast<uintptr_t>(q) % bytes != 0) return false;
    return true;
  };
  if (fits(vec_size<T>())) return vec_size<T>();
  if (vec_size_narrow<T>() > 1 && fits(vec_size_narrow<T>())) return vec_size_narrow<T>();
  return 1;
}

// Run-time choices as compile-time constants for a generic lambda f (read with decltype(arg)::value):
// the vector width (one vec_width<T> returned), and a flag.
template <typename T, typename F>
void with_vec(int w, F&& f) {
  constexpr int V = vec_size<T>(), H = vec_size_narrow<T>();
  if (w == V) {
    f(std::integral_constant<int, V>());
    return;
  }
  if constexpr (H > 1) {
    if (w == H) {
      f(std::integral_constant<int, H>());
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(w == 1, "taskrouting: no kernels of vector width ", w);
  f(std::integral_constant<int, 1>());
}

template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag)
    f(std::true_type());
  else
    f(std::false_type());
}

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

// Grid of the one-thread-per-channel kernels (grid-strided).
inline unsigned per_channel_blocks(int64_t C) {
  return unsigned(std::min<int64_t>(ceil_div(C, kThreads), 4096));
}

// Blocks of `kernel` (kThreads threads, `smem` bytes of dynamic shared memory) that fit on the GPU
// at once (the CUDA occupancy API): a split reduction sized to it fills every SM in one wave.
int64_t resident_blocks(const void* kernel, size_t smem = 0);
template <typename Kernel>
int64_t resident_blocks_of(Kernel* kernel) {
  return resident_blocks(reinterpret_cast<const void*>(kernel));
}

// Launch shapes (see the .cu files for the kernels that use them).
struct PlanesShape {  // reductions over planes: grid (chunks, channels), block (bx, by)
  int bx = 1, by = kThreads;
  int64_t n_per = 1, s_per = 1, chunks_s = 1, chunks = 1;
};
// resident: resident_blocks of the reduction kernel it launches (it splits channels to fill them),
// 0 for the element-wise kernels (never split).
PlanesShape planes_shape(const Problem& p, int vec, int64_t resident);

struct RowsShape {  // reductions over rows: grid (channel tiles, chunks), block (bx, by)
  int bx = 1, by = kThreads;
  int64_t tiles = 1, rows_per_chunk = 1, chunks = 1;
};
RowsShape rows_shape(const Problem& p, int vec, int64_t resident);

// Where a statistics kernel writes the final values (chunks 1; stats_impl adds the workspace):
// used by launch_stats (stats.cu) and try_fused_forward (normalize.cu).
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

// ---- statistics (stats.cu)
// mean/var/count [C] (acc type); invstd, scale_shift ([2][C]) optional (undefined tensors).
void launch_stats(const Problem& p, bool routed, bool all_channels, const at::Tensor& mean, const at::Tensor& var,
                  const at::Tensor& count, const at::Tensor& invstd, const at::Tensor& scale_shift,
                  const at::Tensor& weight, const at::Tensor& bias, double eps);
// resident_blocks of the planes statistics kernel launch_stats would launch for p at vector width vec
// (a vec_width of p.x's dtype).
int64_t planes_stats_resident(const Problem& p, int vec);
void launch_update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                                 double momentum);

// One launch: the task's update factor computed on the device, its row updated, its counts advanced.
void launch_update_task_running_stats(const at::Tensor& task_mean, const at::Tensor& task_var,
                                      const at::Tensor& task_count, const at::Tensor& task_last,
                                      const at::Tensor& batches, int64_t task, const at::Tensor& mean,
                                      const at::Tensor& var, const at::Tensor& count, std::optional<double> momentum);

// ---- normalize (normalize.cu)
// residual (optional; bn_add_relu_route): in x's processing layout, added before the ReLU and read
// only where the sample goes through the channel.
void launch_forward_params(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& scale_shift);
void launch_forward_apply(const Problem& p, const at::Tensor& y, const at::Tensor& scale_shift,
                          const at::Tensor& residual = at::Tensor());
// The fused forward: one block per channel with the channel kept in shared memory; false when it
// does not apply.
bool try_fused_forward(const Problem& p, const at::Tensor& y, bool routed, bool all_channels, const at::Tensor& mean,
                       const at::Tensor& var, const at::Tensor& count, const at::Tensor& invstd,
                       const at::Tensor& weight, const at::Tensor& bias, double eps,
                       const at::Tensor& residual = at::Tensor());

// ---- backward (backward.cu)
// Where the backward's gate g comes from (compile-time: bn_relu_route's kernels are the
// kPreActivation ones and stay as they were).
enum class Gate {
  kPreActivation,  // bn_relu_route: dy where x * scale + shift > 0, recomputed from x
  kOutput,         // bn_add_relu_route: dy where its output y > 0 (the residual is not kept)
  kStored,         // bn_add_relu_route after a reduce that stored g in grad_residual: grad_x from it
};

// bn_add_relu_route's backward (empty for bn_relu_route's): gate on y, and write g to
// grad_residual (optional). With stored_g, the reduce writes g where the sample goes through the
// channel (in whole packs of the reduce's width in the rows layout, zeros for the other channels of the pack)
// and the apply reads it back from there instead of y and dy (for grad_x, when asked for), and writes the
// rest of grad_residual.
struct ResidualGrad {
  at::Tensor y;
  at::Tensor grad_residual;
  bool stored_g = false;
};

// sum_dy/sum_dy_xmu [C]; params ([5][C], optional) from count (training) for launch_grad_apply.
// grad_weight ([C], acc type, optional): written by the same kernels (no separate op).
void launch_grad_reduce(const Problem& p, const at::Tensor& dy, const at::Tensor& mean, const at::Tensor& invstd,
                        const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& sum_dy,
                        const at::Tensor& sum_dy_xmu, const at::Tensor& params, const at::Tensor& count,
                        bool training, const at::Tensor& grad_weight = at::Tensor(),
                        const ResidualGrad& res = ResidualGrad());
void launch_grad_params(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                        const at::Tensor& bias, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                        const at::Tensor& count, bool training, const at::Tensor& params);
// dx and params undefined: grad_residual only (res.y and res.grad_residual defined, no stored_g).
void launch_grad_apply(const Problem& p, const at::Tensor& dy, const at::Tensor& dx, const at::Tensor& params,
                       bool training, bool routed_stats, const ResidualGrad& res = ResidualGrad());

}  // namespace cuda
}  // namespace taskrouting
