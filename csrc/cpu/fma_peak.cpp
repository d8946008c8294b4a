// The FMA peak, measured: a compiled loop of independent fused multiply-adds
// on every core, the ceiling the benchmark divides a convolution's rate by
// (a GEMM's best rate is a second, lower ceiling: what a library reaches).
#include "fma_peak.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CONVT_EXT_FMA_LOOPS 1
#endif

namespace convt_ext {

namespace {

#ifdef CONVT_EXT_FMA_LOOPS
// Twelve independent accumulators: more than the FMA units' latency times
// their count (4 cycles x 2 units on current x86), so the units never wait.
// Returns a value that depends on every FMA, so none is optimized away.
__attribute__((target("avx2,fma"))) float fma_avx2(int64_t iters) {
  __m256 acc[12];
  for (int j = 0; j < 12; ++j) acc[j] = _mm256_set1_ps(0.001f * j);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    for (int j = 0; j < 12; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
  }
  __m256 s = acc[0];
  for (int j = 1; j < 12; ++j) s = _mm256_add_ps(s, acc[j]);
  return _mm256_cvtss_f32(s);
}

__attribute__((target("avx512f"))) float fma_avx512(int64_t iters) {
  __m512 acc[12];
  for (int j = 0; j < 12; ++j) acc[j] = _mm512_set1_ps(0.001f * j);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    for (int j = 0; j < 12; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  }
  __m512 s = acc[0];
  for (int j = 1; j < 12; ++j) s = _mm512_add_ps(s, acc[j]);
  alignas(64) float out[16];
  _mm512_store_ps(out, s);
  return out[0];
}
#endif

}  // namespace

FmaPeak fma_peak(double seconds) {
  FmaPeak r;
#ifdef CONVT_EXT_FMA_LOOPS
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return r;
  r.isa = avx512 ? "avx512f" : "avx2+fma";
  const int64_t lanes = avx512 ? 16 : 8, threads = at::get_num_threads();
  const double flops_per_iter = 12.0 * lanes * 2;
  int64_t iters = 1 << 16;
  double best = 0, sink = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  do {
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float v = avx512 ? fma_avx512(iters) : fma_avx2(iters);
        if (v == 12345.f) sink += v;  // never: keeps the loops
      }
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, flops_per_iter * iters * threads / s / 1e9);
    if (s < 0.02) iters *= 2;  // blocks of at least 20 ms
  } while (std::chrono::steady_clock::now() < until);
  r.gflops = best + 0 * sink;
  r.threads = threads;
#else
  (void)seconds;
#endif
  return r;
}

}  // namespace convt_ext
