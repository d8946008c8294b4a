// The GEMM engine: the one layer through which every convolution multiplies
// (conv, conv_transpose and the weight gradient, on every path).
//
// Note [The GEMM engine]
// A convolution here is im2col + GEMM, so it is as fast as its GEMM. Torch
// offers more than one CPU GEMM, and which is fastest depends on the machine:
//   aten:    at::mm/bmm (MKL on the CPU, cuBLAS on CUDA), any dtype. MKL
//            checks the CPU's vendor, not its instructions: on AMD CPUs with
//            AVX-512 it runs its AVX2 code, at about 40% of the FMA peak;
//   onednn:  oneDNN's matmul, through the dispatcher
//            (mkldnn::_linear_pointwise), float32/bfloat16/float16 on the
//            CPU, where torch was built with oneDNN; 85-93% of the peak on
//            those AMD CPUs (issue 10), but below MKL on AVX2 CPUs;
//   brgemm:  oneDNN's ukernel (at::native::cpublas::brgemm), float32 on the
//            CPU, blocked here into cache-sized tiles; operands whose rows
//            are contiguous (conv's forward GEMM), aten for the others.
// The setting (set_gemm_engine, CONVT_EXT_GEMM_ENGINE) is one of:
//   "auto"       the rule below, proved by benchmarks/NOTES.md item 18;
//   "benchmark"  time every engine that can run a GEMM shape once, on its
//                first use, and keep the fastest for that shape, as
//                torch.backends.cudnn.benchmark does. Timings are noisy, so
//                two processes may choose differently and their results
//                differ in the last bits; under
//                torch.use_deterministic_algorithms(True) it acts as "auto";
//   an engine    forced, where it supports the operands (aten otherwise).
// The rule: onednn for float32 on a non-Intel CPU with AVX-512, for one
// GEMM (no groups) of at least 2^20 multiply-adds; aten everywhere else.
// Every engine computes the same products, each with its own summation
// order, so the results agree to rounding (the float64 parity tests hold
// for all, since float64 always runs on aten), and for a fixed setting
// they are bitwise the same for any thread count: every engine runs
// single-threaded inside for_each_task's fixed ranges (Note [Determinism
// across thread counts] in plan.h). engine_info() reports the setting, the
// rule's inputs and choices, what benchmark mode chose, and how many GEMMs
// each engine ran.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <vector>

namespace convt_ext {

enum class Engine : int { Aten = 0, OneDNN = 1, Brgemm = 2 };
constexpr int kEngines = 3;
const char* engine_name(Engine e);

// For every group g: out[g] = add[g] + a[g] . b[g], where add broadcasts (a
// bias of shape (G, M, 1)) or is undefined; with accumulate, out[g] +=
// a[g] . b[g]. All operands are (G, ., .) views, strided as they come.
void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
          const at::Tensor& add = at::Tensor(), bool accumulate = false);

// Note [CPU float32 precision]
// torch's CPU convolutions follow torch.backends.mkldnn.conv.fp32_precision,
// and at::mm follows torch.backends.mkldnn.matmul.fp32_precision. A
// convolution here is a GEMM, so it follows the convolution flag, never the
// matmul flag, on every engine:
//   - "bf16" on a CPU that computes bfloat16 natively (AVX512-BF16 or
//     AMX-BF16, where oneDNN takes torch's float32 convolutions down to
//     bfloat16): every float32 GEMM rounds its operands to bfloat16 and sums
//     in float32, oneDNN's numbers (not yet its speed);
//   - otherwise IEEE float32: the aten engine calls the BLAS itself (not
//     at::mm, which reads the matmul flag), oneDNN's matmul is not used for
//     float32 while the matmul flag asks for less, and the ukernel reads no
//     flag. No flag is changed, even briefly.
// "tf32" keeps float32 on the CPU, as oneDNN does on the CPUs torch runs it on.
//
// Note [TF32 as a convolution]
// On CUDA, F.conv2d runs float32 with TF32 when torch.backends.cudnn.allow_tf32
// says so (the default), while at::mm follows the matmul flag
// (torch.backends.cuda.matmul, off by default). A convolution here is a GEMM,
// so the aten engine's float32 GEMMs on CUDA follow the convolution flag:
// where the two flags disagree, the CUDA translation unit runs them by cuBLAS
// with the compute type chosen per call (FAST_TF32, or PEDANTIC for full
// float32), changing no flag and no handle state, even briefly, so
// concurrent callers cannot see each other's settings.
// Note [The view path's GEMMs]
// The view path (conv/view.h) multiplies raw float32 operands whose rows are
// strided views of a tensor, one small GEMM per kernel tap, too many for a
// tensor per call. They go to the ukernel, the one engine that takes a
// leading dimension per operand without a copy and runs single-threaded
// inside the plan's tasks: c (m x n, ld ldc) += a (m x k, ld lda) . b (k x
// n, ld ldb). tap_gemms_done() counts a task's GEMMs (as the brgemm engine's
// calls) and releases the ukernel's state on the calling thread. Without
// `accumulate`, c = a . b.
bool tap_gemm_runs();
void tap_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate = true);
void tap_gemms_done(int64_t calls);

// Whether the CPU has AVX-512, and torch's kernels use it (ATEN_CPU_CAPABILITY
// may cap them): the GEMM engine's and the view path's rules.
bool cpu_avx512f();

// Note [CPU float32 precision]: whether float32 convolutions on the CPU run
// in bfloat16 now.
bool fp32_convs_in_bf16();

// The setting: "auto", "benchmark", "aten", "onednn" or "brgemm".
void set_gemm_engine(const std::string& setting);
std::string gemm_engine();

// What engine_info() reports.
struct EngineReport {
  std::string setting;
  std::vector<std::string> available;  // the engines this build and CPU can run
  bool cpu_avx512 = false;
  std::string cpu_vendor;
  // The rule's choice for each CPU dtype (float64, float32, bfloat16, float16).
  std::vector<std::pair<std::string, std::string>> rule;
  // Benchmark mode's choices: one row per GEMM shape timed.
  struct Timed {
    std::string device, dtype, layout;  // layout: a's and b's orientation, 'n' or 't'
    int64_t groups, m, n, k;
    std::string engine;
    std::array<double, kEngines> seconds;  // -1 where an engine cannot run it
  };
  std::vector<Timed> benchmarked;
  std::array<int64_t, kEngines> calls;  // GEMM calls each engine ran
  // Note [Bits that do not depend on the thread setting] (cpu/blas.cpp):
  // per engine, whether its CPU bits are independent of the thread setting;
  // the CPU GEMMs that ran where they may not be; the BLAS calls that ran
  // with MKL pinned to one thread.
  std::array<bool, kEngines> thread_independent;
  int64_t thread_dependent_calls = 0, pinned_calls = 0;
  // Note [CPU float32 precision]: whether the CPU computes bfloat16
  // natively, whether float32 convolutions run in it now, and how many
  // GEMMs did.
  bool cpu_native_bf16 = false, fp32_in_bf16 = false;
  // cpublas::could_pack(bfloat16): oneDNN's ukernel has a VNNI pack for bf16 (AMX only).
  bool cpu_packs_bf16 = false;
  int64_t bf16_calls = 0;
};
EngineReport engine_report();

// The rule, as a function of its inputs, for tests on any machine.
std::string rule_engine(const std::string& device, const std::string& dtype, bool avx512,
                        const std::string& vendor, bool ukernel_available);

}  // namespace convt_ext
