// The GEMM engine (Note [The GEMM engine] in gemm.h): the engines, the rule,
// benchmark mode and the report.
#include "gemm.h"

#include "cpu/blas.h"
#ifdef CONVT_EXT_CUDA
#include "cuda/gemm_cublas.h"
#endif

#include <ATen/Context.h>
#include <ATen/Version.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define CONVT_EXT_X86 1
#endif

namespace convt_ext {

namespace {

constexpr const char* kEngineNames[kEngines] = {"aten", "onednn", "brgemm"};
// The setting: an engine's index when forced, or one of these.
constexpr int kAuto = -1, kBenchmark = -2;

std::atomic<int> g_setting{kAuto};
std::array<std::atomic<int64_t>, kEngines> g_calls{};
// CPU GEMMs whose bits may depend on the thread setting, and float32 GEMMs
// run in bfloat16 (Note [CPU float32 precision]).
std::atomic<int64_t> g_thread_dependent{0}, g_bf16_calls{0};

std::string cpu_vendor() {
#ifdef CONVT_EXT_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return "";
  char v[13];
  std::memcpy(v, &ebx, 4);
  std::memcpy(v + 4, &edx, 4);
  std::memcpy(v + 8, &ecx, 4);
  v[12] = '\0';
  return v;
#else
  return "";
#endif
}

// AVX-512 as torch runs it: the CPU's, unless ATEN_CPU_CAPABILITY caps
// torch's kernels below it (as a user who caps oneDNN and MKL with it would;
// .ci/run caps all three to run the rules' AVX2 branches on an AVX-512 CPU).
bool cpu_avx512() {
#if defined(CONVT_EXT_X86) && defined(__GNUC__)
  static const bool on = __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return on;
#else
  return false;
#endif
}

// Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16): only
// there does oneDNN take a float32 convolution down to bfloat16 when
// torch.backends.mkldnn.conv.fp32_precision asks it to.
bool cpu_native_bf16() {
#ifdef CONVT_EXT_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1u;
  const unsigned max_sub = eax;
  bool avx512_bf16 = false;
  if (max_sub >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) avx512_bf16 = (eax >> 5) & 1u;
  return amx_bf16 || avx512_bf16;
#else
  return false;
#endif
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "float64";
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return "other";
  }
}

// oneDNN's matmul, found in the dispatcher: absent where torch was built
// without oneDNN.
const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      []() -> std::optional<c10::OperatorHandle> {
    if (!at::hasMKLDNN()) return std::nullopt;
    return c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  }();
  return op;
}

// y (N, M) = x (N, K) . w (M, K)^T (+ bias (M)), by oneDNN. Boxed, so that
// the op's exact C++ signature, which changes between torch versions, does
// not matter.
at::Tensor onednn_matmul(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_linear()->callBoxed(&stack);
  return stack.back().toTensor();
}

// Whether oneDNN runs this dtype here: oneDNN refuses bfloat16 and float16
// on CPUs without the instructions for them, so ask it once.
bool onednn_runs(at::ScalarType dtype) {
  static const std::array<bool, 3> ok = [] {
    std::array<bool, 3> r{};
    const at::ScalarType types[3] = {at::kFloat, at::kBFloat16, at::kHalf};
    for (int i = 0; i < 3; ++i) {
      if (!onednn_linear()) continue;
      try {
        const at::Tensor one = at::ones({1, 1}, at::TensorOptions().dtype(types[i]));
        r[i] = onednn_matmul(one, one, std::nullopt).item<double>() == 1.0;
      } catch (const std::exception&) {
        r[i] = false;
      }
    }
    return r;
  }();
  switch (dtype) {
    case at::kFloat: return ok[0];
    case at::kBFloat16: return ok[1];
    case at::kHalf: return ok[2];
    default: return false;
  }
}

// Whether the ukernel runs here (it needs a oneDNN with ukernels, on x86).
bool brgemm_runs() {
  static const bool ok = [] {
    try {
      const float a = 1.f, b = 2.f;
      float c = 0.f;
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c, false);
      at::native::cpublas::brgemm_release(false);
      return c == 2.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// torch's float32 precision setting for oneDNN's `op`, with the inheritance
// from the backend's and the global setting that torch applies.
at::Float32Precision mkldnn_precision(at::Float32Op op) {
  const at::Context& ctx = at::globalContext();
  at::Float32Precision p = ctx.float32Precision(at::Float32Backend::MKLDNN, op);
  if (p == at::Float32Precision::NONE) p = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::ALL);
  if (p == at::Float32Precision::NONE) p = ctx.float32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL);
  return p;
}

bool reduces(at::Float32Precision p) {
  return p == at::Float32Precision::BF16 || p == at::Float32Precision::TF32;
}

// Note [CPU float32 precision]: whether the CPU's float32 convolutions run
// in bfloat16 now.
bool cpu_fp32_in_bf16() {
  static const bool native = cpu_native_bf16();
  return native && mkldnn_precision(at::Float32Op::CONV) == at::Float32Precision::BF16;
}

// Whether an engine's bits on `out`'s device and dtype can depend on the
// thread setting (Note [Bits that do not depend on the thread setting]):
// oneDNN and its ukernel run single-threaded inside the plan's tasks; the
// BLAS does so only when pinned.
bool thread_independent(Engine e, const at::Tensor& out) {
  if (e != Engine::Aten || !out.is_cpu()) return true;
  const bool blas_dtype = out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble;
  return !blas_dtype || blas_pinned_available();
}

bool rows_contiguous(const at::Tensor& t) { return t.size(2) <= 1 || t.stride(2) == 1; }

bool supports(Engine e, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  switch (e) {
    case Engine::Aten:
      return true;
    case Engine::OneDNN:
      // Its float32 matmul follows the matmul precision flag, which a
      // convolution must not (Note [CPU float32 precision]).
      return out.is_cpu() && onednn_runs(out.scalar_type()) &&
             !(out.scalar_type() == at::kFloat && reduces(mkldnn_precision(at::Float32Op::MATMUL)));
    case Engine::Brgemm:
      // Row-major operands only: the ukernel takes no transposes.
      return out.is_cpu() && out.scalar_type() == at::kFloat && rows_contiguous(a) &&
             rows_contiguous(b) && rows_contiguous(out) && brgemm_runs();
  }
  return false;
}

// ---- The engines. Each computes, for every group g,
// out[g] = add[g] + a[g] . b[g], or out[g] += a[g] . b[g] with accumulate.

void run_aten(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& add, bool accumulate) {
#ifdef CONVT_EXT_CUDA
  // Note [TF32 as a convolution]
  if (out.is_cuda() && cuda_tf32_gemm(out, a, b, add, accumulate)) return;
#endif
  // Note [Bits that do not depend on the thread setting] (cpu/blas.cpp):
  // MKL, wherever at::mm or the BLAS reach it, sees one thread.
  std::optional<MklOneThread> pin;
  if (out.is_cpu()) {
    pin.emplace();
    if (!thread_independent(Engine::Aten, out)) g_thread_dependent.fetch_add(1, std::memory_order_relaxed);
    // The BLAS itself, not at::mm, which reads the matmul precision flag
    // (Note [CPU float32 precision]).
    if (blas_takes(out, a, b)) {
      if (add.defined() && !accumulate) out.copy_(add.expand_as(out));
      for (int64_t g = 0; g < out.size(0); ++g) blas_gemm(out, a, b, g, accumulate || add.defined());
      return;
    }
  }
  if (a.size(0) == 1) {
    at::Tensor o = out.select(0, 0);
    if (accumulate) {
      o.addmm_(a.select(0, 0), b.select(0, 0));
    } else if (add.defined()) {
      at::addmm_out(o, add.select(0, 0), a.select(0, 0), b.select(0, 0));
    } else {
      at::mm_out(o, a.select(0, 0), b.select(0, 0));
    }
  } else if (accumulate) {
    out.baddbmm_(a, b);
  } else if (add.defined()) {
    at::baddbmm_out(const_cast<at::Tensor&>(out), add, a, b);
  } else {
    at::bmm_out(const_cast<at::Tensor&>(out), a, b);
  }
}

void run_onednn(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& add, bool accumulate) {
  // A bias of one value per row of out is a bias of the linear op's output
  // features; any other addend is copied into out first.
  const bool fused = add.defined() && !accumulate && add.size(2) == 1 && add.size(1) == out.size(1);
  for (int64_t g = 0; g < out.size(0); ++g) {
    at::Tensor o = out.select(0, g);
    std::optional<at::Tensor> bias;
    if (fused) bias = add.select(0, g).reshape({-1}).contiguous();
    if (add.defined() && !fused && !accumulate) o.copy_(add.select(0, g).expand_as(o));
    // out[g]^T (N, M) = b[g]^T (N, K) . a[g] (M, K)^T. oneDNN's linear op
    // takes a strided weight a thousand times slower than a contiguous one
    // (a reorder per call; benchmarks/NOTES.md item 18): a[g], the smaller
    // operand here (a weight, or a block of the upstream gradient), is made
    // contiguous.
    const at::Tensor yt = onednn_matmul(b.select(0, g).t(), a.select(0, g).contiguous(), bias);
    if (accumulate || (add.defined() && !fused)) {
      o.add_(yt.t());
    } else {
      o.copy_(yt.t());
    }
  }
}

// The ukernel, on tiles of out that keep the operands in the L1/L2 caches:
// (kTileM x kTileK) of a, (kTileK x kTileN) of b (benchmarks/NOTES.md item 18).
constexpr int64_t kTileM = 64, kTileN = 64, kTileK = 256;

void run_brgemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& add, bool accumulate) {
  const int64_t M = out.size(1), N = out.size(2), K = a.size(2);
  // Each group's operands by pointer and stride: no ATen view per group.
  if (add.defined() && !accumulate) out.copy_(add.expand_as(out));
  const bool add_c = accumulate || add.defined();
  const int64_t lda = a.stride(1), ldb = b.stride(1), ldc = out.stride(1);
  for (int64_t g = 0; g < out.size(0); ++g) {
    float* c = out.data_ptr<float>() + g * out.stride(0);
    const float* pa = a.const_data_ptr<float>() + g * a.stride(0);
    const float* pb = b.const_data_ptr<float>() + g * b.stride(0);
    for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
      const int64_t n = std::min(kTileN, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int64_t m = std::min(kTileM, M - m0);
        for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
          at::native::cpublas::brgemm(m, n, std::min(kTileK, K - k0), lda, ldb, ldc,
                                      add_c || k0 > 0, pa + m0 * lda + k0, pb + k0 * ldb + n0,
                                      c + m0 * ldc + n0, false);
        }
      }
    }
  }
  at::native::cpublas::brgemm_release(false);
}

// Float32 in bfloat16 (Note [CPU float32 precision]), whatever the engine.
void run_bf16(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& add, bool accumulate) {
  for (int64_t g = 0; g < out.size(0); ++g) {
    at::Tensor o = out.select(0, g);
    if (add.defined() && !accumulate) o.copy_(add.select(0, g).expand_as(o));
    bf16_gemm(o, a.select(0, g), b.select(0, g), accumulate || add.defined());
  }
}

void run(Engine e, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
         const at::Tensor& add, bool accumulate) {
  switch (e) {
    case Engine::Aten: return run_aten(out, a, b, add, accumulate);
    case Engine::OneDNN: return run_onednn(out, a, b, add, accumulate);
    case Engine::Brgemm: return run_brgemm(out, a, b, add, accumulate);
  }
}

// ---- Choosing.

// The rule for out (G, M, N) = a (G, M, K) . b; for the report, a large
// single GEMM (mnk unbounded).
Engine rule_for(const at::Tensor& out) {
  static const bool avx512 = cpu_avx512();
  static const std::string vendor = cpu_vendor();
  const std::string name = rule_engine(out.is_cpu() ? "cpu" : "other", dtype_name(out.scalar_type()),
                                       avx512, vendor, out.is_cpu() && brgemm_runs());
  return name == "brgemm" ? Engine::Brgemm : Engine::Aten;
}

char layout(const at::Tensor& t) { return rows_contiguous(t) ? 'n' : 't'; }

using Key = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, char, char>;
struct Choice {
  Engine engine;
  std::array<double, kEngines> seconds;
};
std::mutex g_choices_mutex;
std::map<Key, Choice>& choices() {
  static auto* m = new std::map<Key, Choice>();
  return *m;
}

// Benchmark mode: every engine that supports the operands, timed on this
// GEMM shape (into a scratch output, so out and its accumulation are left
// alone) on its first use; the fastest is kept for the shape.
Engine timed(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
             const at::Tensor& add) {
  const Key key{static_cast<int>(out.device().type()), static_cast<int>(out.scalar_type()),
                out.size(0), out.size(1), out.size(2), a.size(2), layout(a), layout(b)};
  {
    std::lock_guard<std::mutex> lock(g_choices_mutex);
    const auto it = choices().find(key);
    if (it != choices().end()) return it->second.engine;
  }
  Choice c{Engine::Aten, {-1.0, -1.0, -1.0}};
  const at::Tensor scratch = at::empty(out.sizes(), out.options());
  for (int i = 0; i < kEngines; ++i) {
    const Engine e = static_cast<Engine>(i);
    if (!supports(e, out, a, b)) continue;
    double best = 1e300;
    for (int rep = 0; rep < 4; ++rep) {  // the first run warms up
      const auto t0 = std::chrono::steady_clock::now();
      run(e, scratch, a, b, add, false);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (rep > 0) best = std::min(best, s);
    }
    c.seconds[i] = best;
    if (best < c.seconds[static_cast<int>(c.engine)] || c.seconds[static_cast<int>(c.engine)] < 0) {
      c.engine = e;
    }
  }
  std::lock_guard<std::mutex> lock(g_choices_mutex);
  // Another thread may have timed the same shape meanwhile: the first entry
  // stays, so every later call of the process uses one engine for it.
  return choices().emplace(key, c).first->second.engine;
}

Engine choose(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& add) {
  if (a.size(2) == 0) return Engine::Aten;  // an empty sum: aten writes add or zeros
  const int setting = g_setting.load();
  if (setting >= 0) {
    const Engine forced = static_cast<Engine>(setting);
    return supports(forced, out, a, b) ? forced : Engine::Aten;
  }
  if (setting == kBenchmark && out.is_cpu() && !at::globalContext().deterministicAlgorithms()) {
    return timed(out, a, b, add);
  }
  const Engine e = rule_for(out);
  if (e == Engine::Aten && !thread_independent(e, out) &&
      at::globalContext().deterministicAlgorithms()) {
    // Note [Bits that do not depend on the thread setting]: an engine whose
    // bits cannot follow the thread setting, where one takes the operands.
    for (Engine other : {Engine::Brgemm, Engine::OneDNN}) {
      if (supports(other, out, a, b)) return other;
    }
  }
  return supports(e, out, a, b) ? e : Engine::Aten;
}

}  // namespace

const char* engine_name(Engine e) { return kEngineNames[static_cast<int>(e)]; }

bool tap_gemm_runs() { return brgemm_runs(); }

void tap_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, false);
}

void tap_gemms_done(int64_t calls) {
  g_calls[static_cast<int>(Engine::Brgemm)].fetch_add(calls, std::memory_order_relaxed);
  at::native::cpublas::brgemm_release(false);
}

bool fp32_convs_in_bf16() { return cpu_fp32_in_bf16(); }

bool cpu_avx512f() { return cpu_avx512(); }

void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& add,
          bool accumulate) {
  if (out.numel() == 0) return;
  if (out.is_cpu() && out.scalar_type() == at::kFloat && a.size(2) > 0 && cpu_fp32_in_bf16()) {
    g_bf16_calls.fetch_add(1, std::memory_order_relaxed);
    g_calls[static_cast<int>(Engine::Aten)].fetch_add(1, std::memory_order_relaxed);
    run_bf16(out, a, b, add, accumulate);
    return;
  }
  const Engine e = choose(out, a, b, add);
  g_calls[static_cast<int>(e)].fetch_add(1, std::memory_order_relaxed);
  run(e, out, a, b, add, accumulate);
}

std::string rule_engine(const std::string& device, const std::string& dtype, bool avx512,
                        const std::string& vendor, bool ukernel_available) {
  // MKL runs its AVX2 code on non-Intel CPUs (benchmarks/NOTES.md item 18):
  // half of the peak where the CPU runs 512 bits a cycle (Zen 5), the same
  // where it runs them in two halves (Zen 4). oneDNN's AVX-512 kernels reach
  // it, but its matmul costs a boxed dispatcher call per GEMM, some 60 us
  // (item 28); its ukernel (brgemm) is the same JIT code, called directly.
  // Measured on a Zen 4 (family 25, item 30), on the column path's GEMMs:
  // the ukernel the fastest engine on every layer from 56x56 px down to
  // 5x5 (3x3, 1x1 and the 7x7 stem), within 10% of aten on tiny ones; the
  // matmul the slowest on all but the two smallest images (up to 4x behind,
  // on 1x1 layers).
  // On a Zen 5 the ukernel is unmeasured: the matmul's lead over MKL there
  // came from the same kernels. Only float32: float64 has no other engine,
  // and at::mm already sends bfloat16 and float16 to oneDNN. Operands the
  // ukernel does not take (a transposed one) run on aten (supports()).
  if (device == "cpu" && dtype == "float32" && avx512 && vendor != "GenuineIntel" && ukernel_available) {
    return "brgemm";
  }
  return "aten";
}

void set_gemm_engine(const std::string& setting) {
  if (setting == "auto") {
    g_setting.store(kAuto);
    return;
  }
  if (setting == "benchmark") {
    g_setting.store(kBenchmark);
    return;
  }
  for (int i = 0; i < kEngines; ++i) {
    if (setting == kEngineNames[i]) {
      g_setting.store(i);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "set_gemm_engine: engine must be one of 'auto', 'benchmark', 'aten', "
                    "'onednn' or 'brgemm', but got '", setting, "'");
}

std::string gemm_engine() {
  const int s = g_setting.load();
  return s == kAuto ? "auto" : s == kBenchmark ? "benchmark" : kEngineNames[s];
}

EngineReport engine_report() {
  EngineReport r;
  r.setting = gemm_engine();
  r.available.push_back("aten");
  if (onednn_runs(at::kFloat)) r.available.push_back("onednn");
  if (brgemm_runs()) r.available.push_back("brgemm");
  r.cpu_avx512 = cpu_avx512();
  r.cpu_vendor = cpu_vendor();
  for (at::ScalarType t : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
    r.rule.emplace_back(dtype_name(t), engine_name(rule_for(at::empty({0}, at::TensorOptions().dtype(t)))));
  }
  {
    std::lock_guard<std::mutex> lock(g_choices_mutex);
    for (const auto& [key, c] : choices()) {
      EngineReport::Timed t;
      t.device = c10::DeviceTypeName(static_cast<c10::DeviceType>(std::get<0>(key)), true);
      t.dtype = dtype_name(static_cast<at::ScalarType>(std::get<1>(key)));
      t.groups = std::get<2>(key);
      t.m = std::get<3>(key);
      t.n = std::get<4>(key);
      t.k = std::get<5>(key);
      t.layout = std::string{std::get<6>(key), std::get<7>(key)};
      t.engine = engine_name(c.engine);
      t.seconds = c.seconds;
      r.benchmarked.push_back(t);
    }
  }
  for (int i = 0; i < kEngines; ++i) {
    r.calls[i] = g_calls[i].load();
    r.thread_independent[i] =
        thread_independent(static_cast<Engine>(i), at::empty({0}, at::TensorOptions().dtype(at::kFloat)));
  }
  r.thread_dependent_calls = g_thread_dependent.load();
  r.pinned_calls = blas_pinned_calls();
  r.bf16_calls = g_bf16_calls.load();
  r.cpu_native_bf16 = cpu_native_bf16();
  r.cpu_packs_bf16 = at::native::cpublas::could_pack(at::kBFloat16);
  r.fp32_in_bf16 = cpu_fp32_in_bf16();
  return r;
}

}  // namespace convt_ext
