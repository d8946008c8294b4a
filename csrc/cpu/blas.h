// The CPU BLAS, called directly by the GEMM engine's aten engine for float32
// and float64 (Note [Bits that do not depend on the thread setting]).
#pragma once

#include <ATen/core/Tensor.h>

namespace convt_ext {

// Whether this torch build exports the BLAS and MKL's thread-local thread
// count (MKL builds do): then MklOneThread pins and blas_gemm runs.
bool blas_pinned_available();

// MKL at one thread on the calling thread for the guard's lifetime, where
// MKL's thread-local control exists; nothing changes for other threads.
class MklOneThread {
 public:
  MklOneThread();
  ~MklOneThread();
  MklOneThread(const MklOneThread&) = delete;
  MklOneThread& operator=(const MklOneThread&) = delete;

 private:
  int previous_ = 0;
};

// Whether blas_gemm takes every group g of out[g] = a[g] . b[g], (G, ., .)
// views sharing their strides: the BLAS is there, float32 or float64 on the
// CPU, each operand with a unit stride, sizes within int32, a non-empty sum.
bool blas_takes(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out[g] (+)= a[g] . b[g] for group g of (G, ., .) tensors that blas_takes
// accepted (or the 2-d tensors themselves), by sgemm_/dgemm_, reading no
// torch flag (call it inside an MklOneThread). No ATen view is made.
void blas_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t g, bool accumulate);

// out (+)= a . b with a and b rounded to bfloat16 and the products summed
// in float32 (oneDNN's fpmath mode bf16), for 2-d float32 views on the CPU.
void bf16_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// How many MklOneThread guards found MKL at one thread inside the pin.
int64_t blas_pinned_calls();

}  // namespace convt_ext
