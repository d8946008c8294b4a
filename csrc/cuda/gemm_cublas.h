// The CUDA side of the GEMM engine, in CUDA builds only (CONVT_EXT_CUDA).
#pragma once

#include <ATen/core/Tensor.h>

namespace convt_ext {

// Note [TF32 as a convolution] (gemm.h): for every group g, out[g] = add[g] +
// a[g] . b[g] (out[g] += a[g] . b[g] with accumulate) by cuBLAS, with TF32
// exactly when the convolution flag allows it, where the two flags disagree.
// Returns false, having done nothing, where at::mm already does what the
// convolution flag says (or the GEMM is not float32, or past int32 sizes).
bool cuda_tf32_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& add, bool accumulate);

}  // namespace convt_ext
