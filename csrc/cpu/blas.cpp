// The CPU BLAS, called directly (blas.h).
//
// Note [Bits that do not depend on the thread setting]
// The README promises outputs and gradients bitwise identical for any
// torch.set_num_threads(). The plan makes every CPU GEMM run single-threaded
// on a fixed range of the work (Note [Determinism across thread counts] in
// plan.h), but that is not enough for MKL: its sgemm picks its blocking from
// its own thread setting, which torch.set_num_threads() changes, even when
// the call runs inside a parallel region on one thread. On Intel CPUs with
// AVX-512 the weight gradients then differed between 1, 2 and 3 threads
// (MKL_CBWR=COMPATIBLE, MKL's generic code path, made them agree). So the
// engine calls the BLAS itself, inside a thread-local pin of MKL's thread
// count to one (mkl_set_num_threads_local, which changes nothing for other
// threads and is undone after the call): MKL then sees the same setting
// whatever torch's is. engine_info()["thread_independent"] reports per engine
// whether its bits can depend on the thread setting, and
// ["thread_dependent_calls"] counts the GEMMs that ran where they could.
//
// Calling sgemm_ directly also keeps float32 convolutions off
// torch.backends.mkldnn.matmul.fp32_precision, which at::mm reads: a
// convolution follows the convolution flag (Note [CPU float32 precision] in
// gemm.h).
#include "blas.h"

#include <ATen/ops/mm.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <utility>

// Exported by torch's MKL builds; null where the symbols are absent. The
// mixed-case names are MKL's C interface (mkl_service.h maps the lower-case
// names to them; the exported lower-case symbols are the Fortran ones).
extern "C" {
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
int MKL_Get_Max_Threads() __attribute__((weak));
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

#include <atomic>

namespace convt_ext {

namespace {

std::atomic<int64_t> g_pinned{0};

// One group's matrix of a (G, r, c) tensor, read off its sizes and strides:
// a GEMM per group then makes no ATen view (some 0.4 us each on the host).
struct Mat {
  const char* data;
  int64_t r, c, rs, cs;  // sizes and element strides
  Mat t() const { return {data, c, r, cs, rs}; }
};

Mat group_of(const at::Tensor& t3, int64_t g) {
  const int64_t base = t3.dim() == 3 ? 1 : 0;
  const char* data = static_cast<const char*>(t3.const_data_ptr()) +
                     (base ? g * t3.stride(0) * t3.element_size() : 0);
  return {data, t3.size(base), t3.size(base + 1), t3.stride(base), t3.stride(base + 1)};
}

// A row-major (r x c) matrix as the column-major BLAS operand t^T (c x r):
// 'N' when its rows are contiguous, 'T' when its columns are, with the
// leading dimension; false when neither (or past int32).
bool as_blas_operand(const Mat& t, char* trans, int* ld) {
  int64_t l;
  if (t.cs == 1 || t.c == 1) {
    *trans = 'N';
    l = t.r == 1 ? std::max<int64_t>(t.c, 1) : t.rs;
    if (l < std::max<int64_t>(t.c, 1)) return false;
  } else if (t.rs == 1 || t.r == 1) {
    *trans = 'T';
    l = t.c == 1 ? std::max<int64_t>(t.r, 1) : t.cs;
    if (l < std::max<int64_t>(t.r, 1)) return false;
  } else {
    return false;
  }
  if (l > INT_MAX) return false;
  *ld = static_cast<int>(l);
  return true;
}

// One sgemm_/dgemm_ call's arguments for out = a . b.
struct Call {
  char ta, tb;
  int m, n, k, lda, ldb, ldc;
  const char *out, *a, *b;  // as the BLAS sees them
};

// The BLAS writes column-major: out^T = b^T . a^T with out's rows
// contiguous; an out with contiguous columns is the transposed problem.
std::optional<Call> plan_call(Mat out, Mat a, Mat b) {
  if (!(out.cs == 1 || out.c == 1)) {
    if (!(out.rs == 1 || out.r == 1)) return std::nullopt;
    std::swap(a, b);
    a = a.t();
    b = b.t();
    out = out.t();
  }
  const int64_t M = out.r, N = out.c, K = a.c;
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX || K == 0) return std::nullopt;
  Call c;
  if (!as_blas_operand(a, &c.ta, &c.lda) || !as_blas_operand(b, &c.tb, &c.ldb)) return std::nullopt;
  const int64_t l = M == 1 ? std::max<int64_t>(N, 1) : out.rs;
  if (l < std::max<int64_t>(N, 1) || l > INT_MAX) return std::nullopt;
  c.ldc = static_cast<int>(l);
  c.m = static_cast<int>(N);
  c.n = static_cast<int>(M);
  c.k = static_cast<int>(K);
  c.out = out.data;
  c.a = a.data;
  c.b = b.data;
  return c;
}

template <typename T, typename Gemm>
void call(Gemm* gemm, const Call& c, bool accumulate) {
  const T alpha = 1, beta = accumulate ? 1 : 0;
  gemm(&c.tb, &c.ta, &c.m, &c.n, &c.k, &alpha, reinterpret_cast<const T*>(c.b), &c.ldb,
       reinterpret_cast<const T*>(c.a), &c.lda, &beta, reinterpret_cast<T*>(const_cast<char*>(c.out)), &c.ldc);
}

}  // namespace

MklOneThread::MklOneThread() {
  if (!blas_pinned_available()) return;
  previous_ = MKL_Set_Num_Threads_Local(1);
  if (MKL_Get_Max_Threads != nullptr && MKL_Get_Max_Threads() == 1) {
    g_pinned.fetch_add(1, std::memory_order_relaxed);
  }
}

MklOneThread::~MklOneThread() {
  if (blas_pinned_available()) MKL_Set_Num_Threads_Local(previous_);
}

bool blas_pinned_available() {
  return MKL_Set_Num_Threads_Local != nullptr && sgemm_ != nullptr && dgemm_ != nullptr;
}

bool blas_takes(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return blas_pinned_available() && out.is_cpu() &&
         (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble) &&
         plan_call(group_of(out, 0), group_of(a, 0), group_of(b, 0)).has_value();
}

void blas_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t g, bool accumulate) {
  const std::optional<Call> c = plan_call(group_of(out, g), group_of(a, g), group_of(b, g));
  TORCH_INTERNAL_ASSERT(c.has_value() && blas_pinned_available());
  if (out.scalar_type() == at::kFloat) {
    call<float>(sgemm_, *c, accumulate);
  } else {
    call<double>(dgemm_, *c, accumulate);
  }
}

void bf16_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  // Products of bfloat16 values are exact in float32, so rounding the
  // operands and multiplying in float32 is oneDNN's bf16 mode to the order
  // of summation (its speed needs the packed bfloat16 kernels).
  const at::Tensor a16 = a.to(at::kBFloat16).to(at::kFloat), b16 = b.to(at::kBFloat16).to(at::kFloat);
  if (blas_takes(out, a16, b16)) {
    blas_gemm(out, a16, b16, 0, accumulate);
    return;
  }
  if (accumulate) {
    out.addmm_(a16, b16);
  } else {
    at::mm_out(const_cast<at::Tensor&>(out), a16, b16);
  }
}

int64_t blas_pinned_calls() { return g_pinned.load(); }

}  // namespace convt_ext
