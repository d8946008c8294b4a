// The CUDA side of the GEMM engine (Note [TF32 as a convolution] in gemm.h):
// float32 GEMMs whose TF32 setting must follow the convolution flag
// (torch.backends.cudnn.allow_tf32) rather than the matmul flag that at::mm
// follows, by cuBLAS with the compute type chosen per call. No flag, and no
// handle's math mode, is changed.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <cublas_v2.h>

#include <climits>

#include "gemm_cublas.h"

namespace convt_ext {
namespace {

// A (G, rows, cols) operand as cuBLAS sees it: column-major matrices, so a
// row-major one (unit stride along cols) is its own transpose.
struct Blas {
  at::Tensor t;
  bool row_major;
  int64_t ld;
};

Blas as_blas(const at::Tensor& t) {
  const int64_t rows = t.size(1), cols = t.size(2);
  if ((cols == 1 || t.stride(2) == 1) && t.stride(1) >= std::max<int64_t>(1, cols)) {
    return {t, true, std::max<int64_t>(1, t.stride(1))};
  }
  if ((rows == 1 || t.stride(1) == 1) && t.stride(2) >= std::max<int64_t>(1, rows)) {
    return {t, false, std::max<int64_t>(1, t.stride(2))};
  }
  const at::Tensor c = t.contiguous();
  return {c, true, std::max<int64_t>(1, cols)};
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

void check(cublasStatus_t status) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "convt_ext: cuBLAS GEMM failed: ",
              cublasGetStatusString(status));
}

Blas transposed(const Blas& x) { return {x.t.transpose(1, 2), !x.row_major, x.ld}; }

// out[g] (+)= a[g] . b[g] for every group, on the current stream, with TF32
// exactly when `tf32`. out's rows or columns are contiguous (see below).
void strided_batched(const at::Tensor& out, const Blas& A, const Blas& B, float beta, bool tf32) {
  const int64_t G = out.size(0), M = out.size(1), N = out.size(2), K = A.t.size(2);
  if (N > 1 && out.stride(2) != 1) {
    // Column-major out (a transposed view, as a channels_last output's) is
    // row-major out^T = b^T . a^T.
    return strided_batched(out.transpose(1, 2), transposed(B), transposed(A), beta, tf32);
  }
  // Row-major out is, to cuBLAS, column-major out^T = b^T . a^T, and a
  // row-major operand is its own transpose.
  const float alpha = 1.f;
  const int64_t ldc = M == 1 ? std::max<int64_t>(1, N) : out.stride(1);
  check(cublasGemmStridedBatchedEx(
      at::cuda::getCurrentCUDABlasHandle(), B.row_major ? CUBLAS_OP_N : CUBLAS_OP_T,
      A.row_major ? CUBLAS_OP_N : CUBLAS_OP_T, static_cast<int>(N), static_cast<int>(M),
      static_cast<int>(K), &alpha, B.t.const_data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(B.ld), B.t.stride(0), A.t.const_data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(A.ld), A.t.stride(0), &beta, out.data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(ldc), out.stride(0), static_cast<int>(G),
      tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
}

// Note [The flags, read as ATen reads them]
// Each flag is read through the per-backend, per-op API that torch's own
// kernels read (torch 2.10 on: at::Float32Backend/Float32Op, the same
// declarations in 2.11, 2.13 and 2.14), never through
// float32MatmulPrecision(), which throws once a user has set
// torch.backends.cuda.matmul.fp32_precision (the legacy value can no longer
// describe the state), nor allowTF32CuDNN() without an op, which throws when
// the conv and rnn settings differ.
//  - A convolution's TF32: allowTF32CuDNN(CONV), what cuDNN's convolutions
//    read; it inherits from torch.backends.cudnn.fp32_precision and
//    torch.backends.fp32_precision as torch resolves them.
//  - at::mm's TF32: what getCurrentCUDABlasHandle sets the handle's math mode
//    from (CublasHandlePool.cpp) and cuBLASLt's float32 compute type follows:
//    the cuda/matmul precision (with the same inheritance) is "tf32", and no
//    at::NoTF32Guard is active on this thread.
bool matmul_tf32() {
  return !at::NoTF32Guard::should_disable_tf32() &&
         at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
             at::Float32Precision::TF32;
}

}  // namespace

// Note [Deterministic cuBLAS calls]
// Under torch.use_deterministic_algorithms(True), ATen's cuBLAS GEMMs in torch
// 2.10-2.14 make no check of their own: Context lost
// alertCuBLASConfigNotDeterministic (the CUBLAS_WORKSPACE_CONFIG check) when
// torch began to give every (handle, stream) pair its own workspace, which is
// what cuBLAS's reproducibility needs. getCurrentCUDABlasHandle() does that
// (and binds the current stream), so this call, which takes its handle from
// it, is as deterministic as at::mm: the same bits for the same inputs on the
// same GPU and toolkit. Nothing here changes with the flag.
bool cuda_tf32_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& add, bool accumulate) {
  if (out.scalar_type() != at::kFloat || a.size(2) == 0) return false;
  // Note [The flags, read as ATen reads them]
  const bool tf32 = at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
  // at::mm already does what F.conv2d would: TF32 exactly when allowed.
  if (tf32 == matmul_tf32()) return false;
  const Blas A = as_blas(a), B = as_blas(b);
  for (int64_t v : {out.size(0), out.size(1), out.size(2), a.size(2), A.ld, B.ld,
                    out.stride(1), out.stride(2)}) {
    if (!fits_int(v)) return false;  // cuBLAS takes int sizes: at::mm (64-bit) then
  }
  // out's rows (or columns) must be contiguous, with room for a row (column)
  // between them; otherwise the GEMM goes to a scratch copy.
  const int64_t M = out.size(1), N = out.size(2);
  const bool usable = ((N == 1 || out.stride(2) == 1) && (M == 1 || out.stride(1) >= N)) ||
                      ((M == 1 || out.stride(1) == 1) && (N == 1 || out.stride(2) >= M));
  at::Tensor target = usable ? out : at::empty(out.sizes(), out.options());
  float beta = 0.f;
  if (accumulate) {
    if (!usable) target.copy_(out);
    beta = 1.f;
  } else if (add.defined()) {
    target.copy_(add.expand_as(target));
    beta = 1.f;
  }
  strided_batched(target, A, B, beta, tf32);
  if (!usable) const_cast<at::Tensor&>(out).copy_(target);
  return true;
}

}  // namespace convt_ext
