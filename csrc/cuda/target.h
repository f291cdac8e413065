// Launchers of the CUDA MeanFlow target/loss kernels (defined in target.cu, called from target.cpp).
//
// Kept free of CUDA types so that target.cpp compiles with a plain C++ compiler. target.cu defines these with
// qualified names (mfkernels::cuda_impl::...), so a signature that drifts from this declaration fails to compile.
#pragma once

#include <ATen/core/Tensor.h>

namespace mfkernels {
namespace cuda_impl {

// Forward. Inputs are contiguous and checked by the caller; kt = du_dt.size(0).
// partials: (B * chunks) accumulator-dtype workspace, chunks = forward_chunks(n, dtype).
// Writes residual (u - u_tgt, u's dtype; skipped when residual is undefined), per_sample, weight and loss.
void meanflow_loss_forward(const at::Tensor& u, const at::Tensor& v_g, const at::Tensor& du_dt,
                           const at::Tensor& t, const at::Tensor& r, double p, double eps,
                           const at::Tensor& partials, const at::Tensor& loss, const at::Tensor& per_sample,
                           const at::Tensor& weight, const at::Tensor& residual);

// How many per-sample chunks (thread blocks) the forward splits a sample of n elements into.
int64_t forward_chunks(int64_t n, at::ScalarType dtype);

// Backward: grad_u = (grad_loss / B) * weight_b * 2 * residual, in residual's dtype.
void meanflow_loss_backward(const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& weight,
                            const at::Tensor& grad_u);

}  // namespace cuda_impl
}  // namespace mfkernels
