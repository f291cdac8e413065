// CUDA kernels of the MeanFlow target/loss op (schema, design notes and the CPU kernel: csrc/target.cpp).
//
// forward  = 1 launch (plus a 4-byte memset) on the current stream:
//   fwd_kernel, one block per (sample b, chunk c of kChunk elements): reads u, v_g (and du_dt for b < kt) with
//   16-byte loads (kUnroll loads of each in flight per thread), writes the residual d = u - u_tgt in u's dtype,
//   and reduces sum d^2 of its chunk into partials[b * chunks + c] (fp32; fp64 for fp64 inputs). Each block then
//   takes a ticket from a counter (zeroed by the memset); the block that takes the last one finalizes: per sample
//   L_b = sum_c partials (fixed order), w_b = (L_b + eps)^-p, and loss = mean_b w_b L_b (fixed tree). The atomic
//   only elects the finalizing block; every sum has a fixed order, so results are deterministic. (Before: a second
//   finalize launch, which at latent sizes cost as much as the main pass.)
//   finalize_kernel (a launch of its own) remains for the degenerate shapes with no main blocks (B = 0 or n = 0).
// backward = 1 launch: grad_u = (grad_loss / B) * w_b * 2 d, grad_loss read from device memory (no host sync).
//
// Includes are kept minimal (no ATen/cuda/*): this file also compiles against the CPU wheel's headers for the nvcc
// syntax check (tools/check_cuda_compile.sh).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "target.h"

namespace mfkernels {
namespace cuda_impl {
namespace {

constexpr int kThreads = 256;       // threads of a forward / backward block
constexpr int kUnroll = 4;          // 16-byte loads per tensor a thread has in flight
constexpr int kFinalThreads = 512;  // threads of the finalize block (16 warps)

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Elements per 16-byte vector: 4 fp32, 8 fp16/bf16, 2 fp64.
template <typename T>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Products in the target are rounded on their own (no FMA contraction), as the reference's separate torch ops do.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the block; the result is valid in thread 0. Its shared buffer is reused by a later call in the same
// kernel only after a __syncthreads() between the two.
template <typename A>
__device__ __forceinline__ A block_sum(A x) {
  __shared__ A warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) warp_totals[warp] = x;
  __syncthreads();
  A total = A(0);
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x >> 5) ? warp_totals[lane] : A(0);
    total = warp_sum(total);
  }
  return total;
}

// h_b = clip(t_b - r_b, 0, 1), with t - r rounded to the dtype of t and r (TR) as torch computes it.
template <typename TR, typename A>
__device__ __forceinline__ A step_as(const void* t, const void* r, int64_t b) {
  using M = acc_t<TR>;
  const M diff = static_cast<M>(static_cast<const TR*>(t)[b]) - static_cast<M>(static_cast<const TR*>(r)[b]);
  const A h = static_cast<A>(static_cast<TR>(diff));
  return h < A(0) ? A(0) : (h > A(1) ? A(1) : h);  // NaN stays NaN, as torch.clamp
}

enum TimeKind : int { kTimeFloat = 0, kTimeDouble = 1, kTimeHalf = 2, kTimeBFloat16 = 3 };

template <typename A>
__device__ __forceinline__ A step(const void* t, const void* r, int kind, int64_t b) {
  switch (kind) {
    case kTimeDouble:
      return step_as<double, A>(t, r, b);
    case kTimeHalf:
      return step_as<c10::Half, A>(t, r, b);
    case kTimeBFloat16:
      return step_as<c10::BFloat16, A>(t, r, b);
    default:
      return step_as<float, A>(t, r, b);
  }
}

// Elements of one sample per block: kUnroll 16-byte vectors per thread, whichever path (vector or scalar) runs.
template <typename T>
constexpr int64_t chunk_elems() {
  return static_cast<int64_t>(kThreads) * vec_size<T>() * kUnroll;
}

// One thread's share of one chunk: elements [begin, end) of one sample (pointers already at the sample's start).
// Vector path (VEC = vec_size<T>): thread i handles vectors i, i + kThreads, ... (coalesced), all loads issued
// before any arithmetic. Scalar path (VEC = 1: unaligned data or n % vec_size != 0): a plain strided loop.
template <typename T, int VEC, bool HAS_DU, bool WRITE>
__device__ __forceinline__ acc_t<T> chunk_sum(const T* __restrict__ u, const T* __restrict__ v,
                                              const T* __restrict__ du, T* __restrict__ res, acc_t<T> h,
                                              int64_t begin, int64_t end) {
  using A = acc_t<T>;
  A acc = A(0);
  if constexpr (VEC == 1) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      A tgt = static_cast<A>(v[i]);
      if constexpr (HAS_DU) tgt -= mul_rn(h, static_cast<A>(du[i]));
      const A d = static_cast<A>(u[i]) - tgt;
      acc += d * d;
      if constexpr (WRITE) res[i] = static_cast<T>(d);
    }
  } else {
    using P = Pack<T, VEC>;
    P pu[kUnroll], pv[kUnroll], pd[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = begin + (static_cast<int64_t>(k) * kThreads + threadIdx.x) * VEC;
      if (i < end) {
        pu[k] = *reinterpret_cast<const P*>(u + i);
        pv[k] = *reinterpret_cast<const P*>(v + i);
        if constexpr (HAS_DU) pd[k] = *reinterpret_cast<const P*>(du + i);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = begin + (static_cast<int64_t>(k) * kThreads + threadIdx.x) * VEC;
      if (i < end) {
        P out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          A tgt = static_cast<A>(pv[k].v[j]);
          if constexpr (HAS_DU) tgt -= mul_rn(h, static_cast<A>(pd[k].v[j]));
          const A d = static_cast<A>(pu[k].v[j]) - tgt;
          acc += d * d;
          if constexpr (WRITE) out.v[j] = static_cast<T>(d);
        }
        if constexpr (WRITE) *reinterpret_cast<P*>(res + i) = out;
      }
    }
  }
  return acc;
}

// One block, any size: thread i sums the chunks of samples i, i + blockDim, ... (fixed order), writes L_b and
// w_b = (L_b + eps)^-p, and the block sums w_b L_b (fixed tree): loss = mean_b w_b L_b. partials were written by
// other blocks of the same launch: read them from L2 (__ldcg) after the caller's fence.
template <typename A>
__device__ __forceinline__ void finalize(const A* partials, int64_t batch, int64_t chunks, double p, double eps,
                                         A* __restrict__ per_sample, A* __restrict__ weight, A* __restrict__ loss) {
  A local = A(0);
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    A L = A(0);
    for (int64_t c = 0; c < chunks; ++c) L += __ldcg(partials + b * chunks + c);  // L2, never a stale L1 line
    const A x = L + static_cast<A>(eps);
    const A w = p == 1.0 ? A(1) / x : pow(x, static_cast<A>(-p));
    per_sample[b] = L;
    weight[b] = w;
    local += w * L;
  }
  const A total = block_sum(local);
  if (threadIdx.x == 0) *loss = total / static_cast<A>(batch);  // B = 0: NaN, as torch's mean
}

// The finalize on its own, for shapes without main blocks (B = 0, or samples with no elements: L_b = 0).
template <typename A>
__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const A* __restrict__ partials, int64_t batch, int64_t chunks, double p, double eps,
                    A* __restrict__ per_sample, A* __restrict__ weight, A* __restrict__ loss) {
  finalize<A>(partials, batch, chunks, p, eps, per_sample, weight, loss);
}

// grid: B * chunks blocks of kThreads. VEC = 1 is the path for unaligned data or n % vec_size != 0. The block that
// finishes last (ticket gridDim.x - 1 from `counter`, zeroed before the launch) also runs the finalize.
template <typename T, int VEC, bool WRITE>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const T* __restrict__ u, const T* __restrict__ v, const T* __restrict__ du, T* __restrict__ res,
               const void* __restrict__ t, const void* __restrict__ r, int time_kind, int64_t n, int64_t kt,
               int64_t chunks, acc_t<T>* __restrict__ partials, unsigned int* __restrict__ counter, int64_t batch,
               double p, double eps, acc_t<T>* __restrict__ per_sample, acc_t<T>* __restrict__ weight,
               acc_t<T>* __restrict__ loss) {
  using A = acc_t<T>;
  constexpr int64_t kChunk = chunk_elems<T>();
  const int64_t block = blockIdx.x;
  const int64_t b = block / chunks, c = block - b * chunks;
  const int64_t begin = c * kChunk, end = n < begin + kChunk ? n : begin + kChunk;
  const int64_t base = b * n;
  T* res_b = WRITE ? res + base : nullptr;
  A acc;
  if (b < kt) {  // uniform over the block: no divergence
    const A h = step<A>(t, r, time_kind, b);
    acc = chunk_sum<T, VEC, true, WRITE>(u + base, v + base, du + base, res_b, h, begin, end);
  } else {
    acc = chunk_sum<T, VEC, false, WRITE>(u + base, v + base, nullptr, res_b, A(0), begin, end);
  }
  acc = block_sum(acc);
  __shared__ bool finalizer;
  if (threadIdx.x == 0) {
    partials[block] = acc;
    __threadfence();  // the partial is visible device-wide before this block's ticket is
    finalizer = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();  // also orders block_sum's shared buffer before finalize reuses it
  if (finalizer) {
    __threadfence();  // every other block's partial was fenced before its ticket: read them now
    finalize<A>(partials, batch, chunks, p, eps, per_sample, weight, loss);
  }
}

// grad_u = (grad_loss / B) * w_b * 2 d, one block per (sample, chunk) as the forward.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const T* __restrict__ res, const acc_t<T>* __restrict__ weight, const acc_t<T>* __restrict__ grad_loss,
               T* __restrict__ grad, int64_t batch, int64_t n, int64_t chunks) {
  using A = acc_t<T>;
  constexpr int64_t kChunk = chunk_elems<T>();
  const int64_t block = blockIdx.x;
  const int64_t b = block / chunks, c = block - b * chunks;
  const int64_t begin = c * kChunk, end = n < begin + kChunk ? n : begin + kChunk;
  const T* src = res + b * n;
  T* dst = grad + b * n;
  const A s = (*grad_loss / static_cast<A>(batch)) * weight[b];
  if constexpr (VEC == 1) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
      dst[i] = static_cast<T>(s * (A(2) * static_cast<A>(src[i])));
  } else {
    using P = Pack<T, VEC>;
    P in[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = begin + (static_cast<int64_t>(k) * kThreads + threadIdx.x) * VEC;
      if (i < end) in[k] = *reinterpret_cast<const P*>(src + i);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = begin + (static_cast<int64_t>(k) * kThreads + threadIdx.x) * VEC;
      if (i < end) {
        P out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<T>(s * (A(2) * static_cast<A>(in[k].v[j])));
        *reinterpret_cast<P*>(dst + i) = out;
      }
    }
  }
}

template <typename T>
int64_t chunks_for(int64_t n) {
  return (n + chunk_elems<T>() - 1) / chunk_elems<T>();
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// The vector path needs every sample to start on a 16-byte boundary in every tensor it touches.
template <typename T>
bool use_vectors(int64_t n, std::initializer_list<const void*> ptrs) {
  if (n % vec_size<T>() != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

unsigned int grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= static_cast<int64_t>(std::numeric_limits<int>::max()),
              "meanflow_loss (CUDA): too many blocks (", blocks, ")");
  return static_cast<unsigned int>(blocks);
}

int time_kind(at::ScalarType s) {
  switch (s) {
    case at::kDouble:
      return kTimeDouble;
    case at::kHalf:
      return kTimeHalf;
    case at::kBFloat16:
      return kTimeBFloat16;
    default:
      return kTimeFloat;
  }
}

template <typename T>
void launch_forward(const at::Tensor& u, const at::Tensor& v_g, const at::Tensor& du_dt, const at::Tensor& t,
                    const at::Tensor& r, double p, double eps, const at::Tensor& partials, const at::Tensor& loss,
                    const at::Tensor& per_sample, const at::Tensor& weight, const at::Tensor& residual,
                    cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t batch = u.size(0), kt = du_dt.size(0), n = batch ? u.numel() / batch : 0;
  const T* up = static_cast<const T*>(u.data_ptr());
  const T* vp = static_cast<const T*>(v_g.data_ptr());
  const T* dp = kt ? static_cast<const T*>(du_dt.data_ptr()) : nullptr;
  const bool write = residual.defined();
  T* rp = write ? static_cast<T*>(residual.data_ptr()) : nullptr;
  A* partial_p = static_cast<A*>(partials.data_ptr());
  const int kind = time_kind(t.scalar_type());
  const bool vec = use_vectors<T>(n, {up, vp, dp, rp});
  const int64_t chunks = chunks_for<T>(n);
  // partials: batch * chunks sums, then one slot whose first 4 bytes are the finalize ticket counter
  TORCH_CHECK(partials.numel() >= batch * chunks + 1, "meanflow_loss (CUDA): partials workspace too small");
  A* per_sample_p = static_cast<A*>(per_sample.data_ptr());
  A* weight_p = static_cast<A*>(weight.data_ptr());
  A* loss_p = static_cast<A*>(loss.data_ptr());
  const int64_t blocks = batch * chunks;
  if (blocks == 0) {  // nothing to stream: the finalize alone (L_b = 0 for every sample, or B = 0)
    finalize_kernel<A><<<1, kFinalThreads, 0, stream>>>(partial_p, batch, chunks, p, eps, per_sample_p, weight_p,
                                                        loss_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  unsigned int* counter = reinterpret_cast<unsigned int*>(partial_p + blocks);
  C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream));
  const unsigned int grid = grid_size(blocks);
  constexpr int V = vec_size<T>();
  const void* tp = t.data_ptr();
  const void* rp_time = r.data_ptr();
  if (vec && write) {
    fwd_kernel<T, V, true><<<grid, kThreads, 0, stream>>>(up, vp, dp, rp, tp, rp_time, kind, n, kt, chunks, partial_p,
                                                          counter, batch, p, eps, per_sample_p, weight_p, loss_p);
  } else if (vec) {
    fwd_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(up, vp, dp, rp, tp, rp_time, kind, n, kt, chunks,
                                                           partial_p, counter, batch, p, eps, per_sample_p, weight_p,
                                                           loss_p);
  } else if (write) {
    fwd_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(up, vp, dp, rp, tp, rp_time, kind, n, kt, chunks, partial_p,
                                                          counter, batch, p, eps, per_sample_p, weight_p, loss_p);
  } else {
    fwd_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(up, vp, dp, rp, tp, rp_time, kind, n, kt, chunks,
                                                           partial_p, counter, batch, p, eps, per_sample_p, weight_p,
                                                           loss_p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_backward(const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& weight,
                     const at::Tensor& grad_u, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t batch = residual.size(0), n = batch ? residual.numel() / batch : 0;
  const T* src = static_cast<const T*>(residual.data_ptr());
  T* dst = static_cast<T*>(grad_u.data_ptr());
  const A* wp = static_cast<const A*>(weight.data_ptr());
  const A* gp = static_cast<const A*>(grad_loss.data_ptr());
  constexpr int V = vec_size<T>();
  const bool vec = use_vectors<T>(n, {src, dst});
  const int64_t chunks = chunks_for<T>(n);
  const int64_t blocks = batch * chunks;
  if (blocks == 0) return;
  const unsigned int grid = grid_size(blocks);
  if (vec) {
    bwd_kernel<T, V><<<grid, kThreads, 0, stream>>>(src, wp, gp, dst, batch, n, chunks);
  } else {
    bwd_kernel<T, 1><<<grid, kThreads, 0, stream>>>(src, wp, gp, dst, batch, n, chunks);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A switch instead of AT_DISPATCH: keeps this file on ATen/core headers only.
template <typename F>
void dispatch_float(at::ScalarType s, const char* what, F&& f) {
  switch (s) {
    case at::kFloat:
      f(float{});
      break;
    case at::kDouble:
      f(double{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, what, ": unsupported dtype ", s);
  }
}

}  // namespace

}  // namespace cuda_impl
}  // namespace mfkernels

// The entry points declared in target.h, defined with qualified names: a signature that differs from the
// declaration is a compile error here (not a silent overload and a link error at load time).
int64_t mfkernels::cuda_impl::forward_chunks(int64_t n, at::ScalarType dtype) {
  int64_t chunks = 0;
  dispatch_float(dtype, "meanflow_loss (CUDA)", [&](auto zero) {
    using T = decltype(zero);
    chunks = chunks_for<T>(n);
  });
  return chunks;
}

void mfkernels::cuda_impl::meanflow_loss_forward(const at::Tensor& u, const at::Tensor& v_g, const at::Tensor& du_dt, const at::Tensor& t,
                           const at::Tensor& r, double p, double eps, const at::Tensor& partials,
                           const at::Tensor& loss, const at::Tensor& per_sample, const at::Tensor& weight,
                           const at::Tensor& residual) {
  const c10::cuda::CUDAGuard guard(u.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(u.device().index()).stream();
  dispatch_float(u.scalar_type(), "meanflow_loss (CUDA)", [&](auto zero) {
    using T = decltype(zero);
    launch_forward<T>(u, v_g, du_dt, t, r, p, eps, partials, loss, per_sample, weight, residual, stream);
  });
}

void mfkernels::cuda_impl::meanflow_loss_backward(const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& weight,
                            const at::Tensor& grad_u) {
  const c10::cuda::CUDAGuard guard(residual.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(residual.device().index()).stream();
  dispatch_float(residual.scalar_type(), "meanflow_loss_backward (CUDA)", [&](auto zero) {
    using T = decltype(zero);
    launch_backward<T>(grad_loss, residual, weight, grad_u, stream);
  });
}
