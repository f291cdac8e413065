// MeanFlow stop-gradient target + adaptively weighted loss: op schema and the CPU kernel.
//
//   u_tgt_i = v_g_i - clip(t_i - r_i, 0, 1) du_dt_i   (i < kt = du_dt.size(0));   u_tgt_i = v_g_i   (i >= kt)
//   L_i = sum over non-batch dims (u_i - u_tgt_i)^2;   w_i = (L_i + eps)^(-p);   loss = mean_i w_i L_i
//   d loss / d u_i = (2 / B) w_i (u_i - u_tgt_i)
//
// Design ("scaled after"): the forward reads u, v_g, du_dt once and writes the UNSCALED residual d = u - u_tgt (in u's
// dtype) while it reduces L_i. The weight w_i is only known once L_i is complete, so instead of a second pass that
// scales d by 2 w_i / B, the scale is folded into the backward, which has to read the saved tensor and write grad_u
// anyway: grad_u = (grad_loss / B) * w_i * 2 d. Traffic is the minimum of any design (forward: read 3, write 1;
// backward: read 1, write 1), for every sample size, with no per-sample size limit (no sample has to fit in one
// block's registers). Saving the unscaled residual also keeps fp16 safe: (2 / B) w_i d is often below fp16's normal
// range (w ~ 1 / L), d itself is not, and the scale is applied in fp32 (so GradScaler's scale never underflows).
// The alternative, a two-phase variant (each task rescales its sample in place right after the reduction, while it is
// still in L1/L2, and backward is grad_out * grad_u), measured slower on CPU in fp32 and bf16 alike: the second pass
// is not free even from cache (it converts every element twice more), and on a GPU it would be a second full pass.
// The op's own timings: bench/results/target_cpu.md (CPU) and the target.json files of the GPU result folders.
//
// Accumulation is in fp32 (fp64 for fp64 inputs); outputs loss, per_sample, weight are fp32 (fp64 for fp64 inputs).
// Reductions are deterministic: fixed chunking of each sample, independent of the number of threads.
//
// Schema:
//   meanflow_loss(u, v_g, du_dt, t, r, p, eps, save_residual=True) -> (loss, per_sample, weight, residual)
//     residual = u - u_tgt (contiguous, u's dtype), or an empty tensor when save_residual is false.
//   meanflow_loss_backward(grad_loss, residual, weight) -> grad_u
#ifdef MFKERNELS_PYTHON_MODULE
#include <Python.h>  // first, as Python asks; only for the module init function at the end
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef WITH_CUDA
#include "cuda/target.h"
#endif

namespace mfkernels {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::string describe(const at::Tensor& x) {
  std::ostringstream os;
  os << "shape " << x.sizes() << ", dtype " << x.scalar_type() << ", device " << x.device();
  return os.str();
}

bool is_float(const at::Tensor& x) {
  const auto s = x.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Every check names the argument and what it got. The Python wrapper makes the same checks first (with the same
// wording); these guard direct calls of torch.ops.mfkernels.meanflow_loss.
void check_inputs(const at::Tensor& u, const at::Tensor& v_g, const at::Tensor& du_dt, const at::Tensor& t,
                  const at::Tensor& r) {
  const std::pair<const char*, const at::Tensor*> all[] = {{"u", &u}, {"v_g", &v_g}, {"du_dt", &du_dt},
                                                           {"t", &t}, {"r", &r}};
  for (const auto& [name, x] : all) {
    TORCH_CHECK(x->defined(), "meanflow_loss: ", name, " is undefined");
    TORCH_CHECK(is_float(*x), "meanflow_loss: ", name,
                " must be a floating tensor (float16, bfloat16, float32 or float64); got ", describe(*x));
    TORCH_CHECK(x->device() == u.device(), "meanflow_loss: ", name, " is on ", x->device(), " but u is on ",
                u.device(), "; they must be on the same device");
  }
  TORCH_CHECK(u.dim() >= 1, "meanflow_loss: u must have a batch dim (B, ...); got ", describe(u));
  TORCH_CHECK(v_g.scalar_type() == u.scalar_type(), "meanflow_loss: v_g has dtype ", v_g.scalar_type(),
              " but u has dtype ", u.scalar_type(), "; they must match");
  TORCH_CHECK(du_dt.scalar_type() == u.scalar_type(), "meanflow_loss: du_dt has dtype ", du_dt.scalar_type(),
              " but u has dtype ", u.scalar_type(), "; they must match");
  TORCH_CHECK(v_g.sizes() == u.sizes(), "meanflow_loss: v_g has shape ", v_g.sizes(), " but u has shape ",
              u.sizes(), "; they must be equal");
  TORCH_CHECK(du_dt.dim() == u.dim() && du_dt.sizes().slice(1) == u.sizes().slice(1), "meanflow_loss: du_dt has shape ",
              du_dt.sizes(), "; expected (kt, ", u.sizes().slice(1), ") (the shape of u ", u.sizes(),
              " in every dim but the first)");
  const int64_t batch = u.size(0);
  TORCH_CHECK(du_dt.size(0) <= batch, "meanflow_loss: du_dt has tangent batch ", du_dt.size(0),
              " > batch ", batch, " of u; kt must be in [0, ", batch, "]");
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor*>{"t", &t}, {"r", &r}}) {
    TORCH_CHECK(x->dim() == 1 && x->size(0) == batch, "meanflow_loss: ", name, " must have shape (B,) = (", batch,
                ",); got ", describe(*x));
  }
  TORCH_CHECK(t.scalar_type() == r.scalar_type(), "meanflow_loss: r has dtype ", r.scalar_type(),
              " but t has dtype ", t.scalar_type(), "; they must match");
}

// ------------------------------------------------------------------------------------------------------ CPU kernel
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Element conversions. static_cast suffices for float, double and bfloat16 (gcc vectorizes those loops); c10::Half's
// portable float <-> half conversion has selects that gcc turns into branches here (the loop is not vectorized), so
// Half gets the same algorithm (bit-exact, round to nearest even) written with bit masks.
// (__builtin_bit_cast where the compiler has it, gcc >= 11 / clang: gcc does not vectorize the memcpy form.)
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define MFKERNELS_BIT_CAST 1
#endif
#endif
#ifdef MFKERNELS_BIT_CAST
inline float bits_to_float(uint32_t b) { return __builtin_bit_cast(float, b); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }
#else
inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}
#endif

template <typename T>
struct Cvt {
  static acc_t<T> load(T x) { return static_cast<acc_t<T>>(x); }
  static T store(acc_t<T> x) { return static_cast<T>(x); }
};

template <>
struct Cvt<c10::Half> {
  static float load(c10::Half x) {
    const uint32_t w = static_cast<uint32_t>(x.x) << 16;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * bits_to_float(15u << 23);
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t is_denormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // all ones or zero
    const uint32_t mag = (float_to_bits(denormalized) & is_denormal) | (float_to_bits(normalized) & ~is_denormal);
    return bits_to_float((w & 0x80000000u) | mag);
  }
  static c10::Half store(float f) {
    float base = (std::fabs(f) * bits_to_float(239u << 23)) * bits_to_float(17u << 23);
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t bias = std::max<uint32_t>(shl1_w & 0xFF000000u, 0x71000000u);
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);  // all ones or zero
    const uint32_t out = ((w & 0x80000000u) >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan);
    return c10::Half(static_cast<uint16_t>(out), c10::Half::from_bits());
  }
};

constexpr int64_t kCpuChunk = 16384;  // elements of one sample per task: fixed, so sums do not depend on threads
constexpr int kLanes = 16;            // independent accumulators: a vectorizable, deterministic reduction
constexpr int64_t kCpuGrainElems = 32768;  // below this much work per thread, parallelism costs more than it gives

int64_t cpu_chunks(int64_t n) { return (n + kCpuChunk - 1) / kCpuChunk; }

int64_t cpu_grain(int64_t n) { return std::max<int64_t>(1, kCpuGrainElems / std::max<int64_t>(1, std::min(n, kCpuChunk))); }

// x86-64: the two loops below are compiled twice, for the baseline ISA (SSE2) and for AVX2 (function attribute,
// no -march flag: the binary runs anywhere), and the AVX2 copy is chosen at run time when the CPU has it.
// MFKERNELS_CPU_ISA=baseline forces the baseline copy (tests compare the two: same lanes, same order, so the
// results are bitwise equal; no FMA in either, so the target is rounded as the reference rounds it).
// The AVX2 copy pays off most for the 16-bit dtypes (their conversions vectorize); fp32 is memory-bound either way.
// fp16 would want F16C conversions: not done. Timings: bench/results/target_cpu.md (run with the AVX2 copy).
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define MFKERNELS_AVX2_COPY 1
#define MFKERNELS_INLINE __attribute__((always_inline)) inline
#else
#define MFKERNELS_INLINE inline
#endif

// Sum of squared residuals over len elements; writes the residual when WRITE. h multiplies du only when HAS_DU.
// The target is formed exactly as the reference does it (t = v - h * du, then u - t, each rounded to A).
template <typename T, bool HAS_DU, bool WRITE>
MFKERNELS_INLINE acc_t<T> cpu_chunk(const T* __restrict__ u, const T* __restrict__ v, const T* __restrict__ du,
                   T* __restrict__ res, acc_t<T> h, int64_t len) {
  using A = acc_t<T>;
  A lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      A tgt = Cvt<T>::load(v[i + j]);
      if constexpr (HAS_DU) tgt -= h * Cvt<T>::load(du[i + j]);
      const A d = Cvt<T>::load(u[i + j]) - tgt;
      if constexpr (WRITE) res[i + j] = Cvt<T>::store(d);
      lanes[j] += d * d;
    }
  }
  A tail = 0;
  for (; i < len; ++i) {
    A tgt = Cvt<T>::load(v[i]);
    if constexpr (HAS_DU) tgt -= h * Cvt<T>::load(du[i]);
    const A d = Cvt<T>::load(u[i]) - tgt;
    if constexpr (WRITE) res[i] = Cvt<T>::store(d);
    tail += d * d;
  }
  A s = 0;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  return s + tail;
}

// dst = s * 2 * src over len elements (the backward), in the same vectorizable shape as cpu_chunk.
template <typename T>
MFKERNELS_INLINE void cpu_scale(const T* __restrict__ src, T* __restrict__ dst, acc_t<T> s, int64_t len) {
  using A = acc_t<T>;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) dst[i + j] = Cvt<T>::store(s * (A(2) * Cvt<T>::load(src[i + j])));
  }
  for (; i < len; ++i) dst[i] = Cvt<T>::store(s * (A(2) * Cvt<T>::load(src[i])));
}

// One forward task: du == nullptr for rows without tangent, res == nullptr when no residual is saved.
template <typename T>
MFKERNELS_INLINE acc_t<T> cpu_chunk_any(const T* u, const T* v, const T* du, T* res, acc_t<T> h, int64_t len) {
  if (du != nullptr) {
    return res != nullptr ? cpu_chunk<T, true, true>(u, v, du, res, h, len)
                          : cpu_chunk<T, true, false>(u, v, du, res, h, len);
  }
  return res != nullptr ? cpu_chunk<T, false, true>(u, v, du, res, h, len)
                        : cpu_chunk<T, false, false>(u, v, du, res, h, len);
}

template <typename T>
using ChunkFn = acc_t<T> (*)(const T*, const T*, const T*, T*, acc_t<T>, int64_t);
template <typename T>
using ScaleFn = void (*)(const T*, T*, acc_t<T>, int64_t);

template <typename T>
acc_t<T> chunk_baseline(const T* u, const T* v, const T* du, T* res, acc_t<T> h, int64_t len) {
  return cpu_chunk_any<T>(u, v, du, res, h, len);
}
template <typename T>
void scale_baseline(const T* src, T* dst, acc_t<T> s, int64_t len) {
  cpu_scale<T>(src, dst, s, len);
}

#ifdef MFKERNELS_AVX2_COPY
template <typename T>
__attribute__((target("avx2"))) acc_t<T> chunk_avx2(const T* u, const T* v, const T* du, T* res, acc_t<T> h,
                                                    int64_t len) {
  return cpu_chunk_any<T>(u, v, du, res, h, len);
}
template <typename T>
__attribute__((target("avx2"))) void scale_avx2(const T* src, T* dst, acc_t<T> s, int64_t len) {
  cpu_scale<T>(src, dst, s, len);
}

bool use_avx2() {
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  const char* isa = std::getenv("MFKERNELS_CPU_ISA");
  return has_avx2 && !(isa != nullptr && std::string(isa) == "baseline");
}
#endif

template <typename T>
ChunkFn<T> pick_chunk() {
#ifdef MFKERNELS_AVX2_COPY
  if (use_avx2()) return &chunk_avx2<T>;
#endif
  return &chunk_baseline<T>;
}

template <typename T>
ScaleFn<T> pick_scale() {
#ifdef MFKERNELS_AVX2_COPY
  if (use_avx2()) return &scale_avx2<T>;
#endif
  return &scale_baseline<T>;
}

// h_i = clip(t_i - r_i, 0, 1) for the first kt rows, with t - r rounded to t's dtype as torch computes it; also
// refuses t < r in any row (free on CPU; on CUDA the Python wrapper checks on request, see mfkernels/target.py).
template <typename A>
std::vector<A> cpu_steps(const at::Tensor& t, const at::Tensor& r, int64_t kt) {
  const int64_t batch = t.size(0);
  std::vector<A> h(static_cast<size_t>(kt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "meanflow_loss_steps", [&] {
    using M = acc_t<scalar_t>;
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {
      const M tb = static_cast<M>(tp[b]), rb = static_cast<M>(rp[b]);
      TORCH_CHECK(!(tb < rb), "meanflow_loss: t < r in row ", b, " (t[", b, "] = ", tb, ", r[", b, "] = ", rb,
                  "); every row needs r <= t");
      if (b < kt) {
        const A d = static_cast<A>(static_cast<scalar_t>(tb - rb));
        h[static_cast<size_t>(b)] = d < A(0) ? A(0) : (d > A(1) ? A(1) : d);  // NaN stays NaN, as torch.clamp
      }
    }
  });
  return h;
}

template <typename A>
A weight_of(A L, double p, double eps) {
  const A x = L + static_cast<A>(eps);
  return p == 1.0 ? A(1) / x : std::pow(x, static_cast<A>(-p));
}

Outputs meanflow_loss_cpu(const at::Tensor& u_in, const at::Tensor& v_in, const at::Tensor& du_in,
                          const at::Tensor& t_in, const at::Tensor& r_in, double p, double eps, bool save_residual) {
  check_inputs(u_in, v_in, du_in, t_in, r_in);
  TORCH_CHECK(u_in.device().is_cpu(), "meanflow_loss (CPU kernel): u is on ", u_in.device());
  const at::Tensor u = u_in.contiguous(), v = v_in.contiguous(), du = du_in.contiguous();
  const at::Tensor t = t_in.contiguous(), r = r_in.contiguous();
  const int64_t batch = u.size(0), kt = du.size(0), n = batch ? u.numel() / batch : 0;
  const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
  at::Tensor loss = at::empty({}, acc_opts), per_sample = at::empty({batch}, acc_opts),
             weight = at::empty({batch}, acc_opts);
  at::Tensor residual = save_residual ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "meanflow_loss_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const std::vector<A> h = cpu_steps<A>(t, r, kt);
    const T* up = u.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    const T* dp = kt ? du.data_ptr<T>() : nullptr;
    T* rp = save_residual ? residual.data_ptr<T>() : nullptr;
    const int64_t chunks = cpu_chunks(n);
    std::vector<A> partials(static_cast<size_t>(batch * chunks));
    const ChunkFn<T> chunk = pick_chunk<T>();
    at::parallel_for(0, batch * chunks, cpu_grain(n), [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / chunks, c = task % chunks;
        const int64_t begin = c * kCpuChunk, len = std::min(kCpuChunk, n - begin), off = b * n + begin;
        const bool tangent = b < kt;
        partials[static_cast<size_t>(task)] =
            chunk(up + off, vp + off, tangent ? dp + off : nullptr, rp ? rp + off : nullptr,
                  tangent ? h[static_cast<size_t>(b)] : A(0), len);
      }
    });
    A* Lp = per_sample.data_ptr<A>();
    A* wp = weight.data_ptr<A>();
    double total = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      A L = 0;
      for (int64_t c = 0; c < chunks; ++c) L += partials[static_cast<size_t>(b * chunks + c)];
      const A w = weight_of<A>(L, p, eps);
      Lp[b] = L;
      wp[b] = w;
      total += static_cast<double>(w * L);
    }
    *loss.data_ptr<A>() = static_cast<A>(total / static_cast<double>(batch));  // B = 0: NaN, as torch's mean
  });
  return {loss, per_sample, weight, residual};
}

void check_backward(const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& weight) {
  TORCH_CHECK(residual.defined() && residual.dim() >= 1,
              "meanflow_loss_backward: no saved residual (was the forward called with save_residual=False?)");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == residual.size(0), "meanflow_loss_backward: weight must have "
              "shape (B,) = (", residual.size(0), ",); got ", describe(weight));
  TORCH_CHECK(weight.scalar_type() == acc_dtype(residual.scalar_type()), "meanflow_loss_backward: weight has dtype ",
              weight.scalar_type(), "; expected ", acc_dtype(residual.scalar_type()));
  TORCH_CHECK(grad_loss.numel() == 1, "meanflow_loss_backward: grad_loss must be a scalar; got ", describe(grad_loss));
  TORCH_CHECK(weight.device() == residual.device() && grad_loss.device() == residual.device(),
              "meanflow_loss_backward: grad_loss (", grad_loss.device(), "), residual (", residual.device(),
              ") and weight (", weight.device(), ") must be on one device");
}

at::Tensor meanflow_loss_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& res_in,
                                      const at::Tensor& weight_in) {
  check_backward(grad_loss_in, res_in, weight_in);
  const at::Tensor res = res_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.to(weight.scalar_type()).contiguous();
  const int64_t batch = res.size(0), n = batch ? res.numel() / batch : 0;
  at::Tensor grad_u = at::empty(res.sizes(), res.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), "meanflow_loss_backward_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const A g = *grad_loss.data_ptr<A>() / static_cast<A>(batch);  // the mean's backward, then w, then d(d^2) = 2d
    const A* wp = weight.data_ptr<A>();
    const T* rp = res.data_ptr<T>();
    T* gp = grad_u.data_ptr<T>();
    const int64_t chunks = cpu_chunks(n);
    const ScaleFn<T> scale = pick_scale<T>();
    at::parallel_for(0, batch * chunks, cpu_grain(n), [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / chunks, c = task % chunks;
        const int64_t begin = c * kCpuChunk, len = std::min(kCpuChunk, n - begin), off = b * n + begin;
        scale(rp + off, gp + off, g * wp[b], len);
      }
    });
  });
  return grad_u;
}

// ----------------------------------------------------------------------------------------------------- CUDA entry
#ifdef WITH_CUDA
Outputs meanflow_loss_cuda(const at::Tensor& u_in, const at::Tensor& v_in, const at::Tensor& du_in,
                           const at::Tensor& t_in, const at::Tensor& r_in, double p, double eps, bool save_residual) {
  check_inputs(u_in, v_in, du_in, t_in, r_in);
  TORCH_CHECK(u_in.is_cuda(), "meanflow_loss (CUDA kernel): u is on ", u_in.device());
  const at::Tensor u = u_in.contiguous(), v = v_in.contiguous(), du = du_in.contiguous();
  const at::Tensor t = t_in.contiguous(), r = r_in.contiguous();
  const int64_t batch = u.size(0), n = batch ? u.numel() / batch : 0;
  const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
  at::Tensor loss = at::empty({}, acc_opts), per_sample = at::empty({batch}, acc_opts),
             weight = at::empty({batch}, acc_opts);
  at::Tensor residual = save_residual ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());
  // + 1 slot: the CUDA forward's ticket counter (see csrc/cuda/target.cu)
  at::Tensor partials = at::empty({batch * cuda_impl::forward_chunks(n, u.scalar_type()) + 1}, acc_opts);
  cuda_impl::meanflow_loss_forward(u, v, du, t, r, p, eps, partials, loss, per_sample, weight,
                                   save_residual ? residual : at::Tensor());
  return {loss, per_sample, weight, residual};
}

at::Tensor meanflow_loss_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& res_in,
                                       const at::Tensor& weight_in) {
  check_backward(grad_loss_in, res_in, weight_in);
  TORCH_CHECK(res_in.is_cuda(), "meanflow_loss_backward (CUDA kernel): residual is on ", res_in.device());
  const at::Tensor res = res_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.to(weight.scalar_type()).contiguous();
  at::Tensor grad_u = at::empty(res.sizes(), res.options());
  cuda_impl::meanflow_loss_backward(grad_loss, res, weight, grad_u);
  return grad_u;
}
#endif

}  // namespace
}  // namespace mfkernels

// The one TORCH_LIBRARY block of the mfkernels namespace (other C++ files must use TORCH_LIBRARY_FRAGMENT; Python
// ops may use torch.library.custom_op("mfkernels::...")). Fake (meta) kernels and autograd are registered from
// Python (mfkernels/target.py), which set_python_module points torch to.
TORCH_LIBRARY(mfkernels, m) {
  m.set_python_module("mfkernels.target");
  m.def("meanflow_loss(Tensor u, Tensor v_g, Tensor du_dt, Tensor t, Tensor r, float p, float eps, "
        "bool save_residual=True) -> (Tensor loss, Tensor per_sample, Tensor weight, Tensor residual)");
  m.def("meanflow_loss_backward(Tensor grad_loss, Tensor residual, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(mfkernels, CPU, m) {
  m.impl("meanflow_loss", &mfkernels::meanflow_loss_cpu);
  m.impl("meanflow_loss_backward", &mfkernels::meanflow_loss_backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(mfkernels, CUDA, m) {
  m.impl("meanflow_loss", &mfkernels::meanflow_loss_cuda);
  m.impl("meanflow_loss_backward", &mfkernels::meanflow_loss_backward_cuda);
}
#endif

// setup.py builds this file as the Python extension module mfkernels._C: importing it loads the library (and so
// registers the ops above). The JIT build loads the same file with torch.ops.load_library and needs no module.
#ifdef MFKERNELS_PYTHON_MODULE
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mfkernels native ops; importing registers torch.ops.mfkernels.*", -1, nullptr,
      nullptr, nullptr, nullptr, nullptr,
  };
  return PyModule_Create(&module_def);
}
#endif
