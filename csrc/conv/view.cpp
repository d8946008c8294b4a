// The view path (Note [im2col as a view] in view.h): conv, conv_transpose and
// the weight gradient as per-tap GEMMs on strided views of pixel memory.
// Here: the entry points, which prepare the weights and take one of the
// forms of view_forms.h (rows, plane, phases), the path's offer and rule.
#include "view.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // Note [Panels by 16 x 16 transposes]
#define CONVT_EXT_PANEL_TRANSPOSE 1
#endif

#include "../gemm.h"
#include "../plan.h"
#include "args.h"
#include "view_forms.h"

namespace convt_ext {

using namespace view_forms;

namespace {

// ATen's grain for elementwise work: below it a copy runs on one thread.
constexpr int64_t kSerialFloats = 32768;

// Note [Panels by 16 x 16 transposes]
// The panels are a transpose of the weight: tap t's panel b holds, for each
// of its K rows k, kBlockN consecutive columns n, where the weight holds
// each n's taps (and, in a conv's contiguous weight, its k's as well) as
// one run. With AVX-512 the panels are made of 16 x 16 tiles transposed in
// registers, each source row one n: 16 loads and 16 full-line stores per
// 256 floats, where the scalar tile below makes one load and two stores of
// each float. The 512 x 512 3x3 weight (2.4 M floats), whose panels are
// built on every call, took 2 ms of a 4 ms forward at 5x5 px, batch 1, one
// thread, on an Intel Xeon (benchmarks/NOTES.md item 38). Rows past the
// last column n load as zeros: the padding of the last panel. The weight
// gradient's partials (G, T, Og, Cg) become the weight (O, Cg, T) by the
// same tiles (finish_weight).
#ifdef CONVT_EXT_PANEL_TRANSPOSE
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // the intrinsics' undefined vectors
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// Tasks [begin, end) of transposed_panels: (g, b, kk, a run of
// kTilesPerTask tiles of 16 columns q of the rows).
constexpr int64_t kTilesPerTask = 8;  // 128 floats of each source row: 8 lines
__attribute__((target("avx512f"))) void transposed_tasks(int64_t begin, int64_t end, const float* src,
                                                         int64_t sg, int64_t sk, int64_t sn, int64_t N,
                                                         int64_t kcount, int64_t Q, const Panels& p,
                                                         float* dst) {
  const int64_t T = p.T, K = p.K, blocks = p.blocks, tiles = (Q + 15) / 16;
  const int64_t runs = (tiles + kTilesPerTask - 1) / kTilesPerTask;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t run = task % runs, kk = task / runs % kcount, b = task / runs / kcount % blocks;
    const int64_t g = task / runs / kcount / blocks;
    const int64_t n = std::min(kBlockN, N - b * kBlockN);
    const float* rows = src + g * sg + kk * sk + b * kBlockN * sn;
    float* panel = dst + (g * T * blocks + b) * K * kBlockN;
    for (int64_t tile = run * kTilesPerTask; tile < std::min(tiles, (run + 1) * kTilesPerTask); ++tile) {
      const int64_t q0 = tile * 16, qn = std::min<int64_t>(16, Q - q0);
      const __mmask16 mask = static_cast<__mmask16>((1u << qn) - 1u);
      for (int64_t j0 = 0; j0 < kBlockN; j0 += 16) {
        __m512 r[16];
        for (int64_t i = 0; i < 16; ++i) {
          r[i] = j0 + i < n ? _mm512_maskz_loadu_ps(mask, rows + (j0 + i) * sn + q0) : _mm512_setzero_ps();
        }
        transpose16(r);
        // Column q is tap t = q % T of input channel k = kk + q / T.
        for (int64_t i = 0, k = kk + q0 / T, t = q0 % T; i < qn; ++i) {
          _mm512_storeu_ps(panel + (t * blocks * K + k) * kBlockN + j0, r[i]);
          if (++t == T) {
            t = 0;
            ++k;
          }
        }
      }
    }
  }
}

// The panels of p from a weight whose element (g, k, n, t) lies at src + g
// * sg + k * sk + n * sn + t, N columns n a group. A source row is one n:
// with sk == T (a conv's contiguous weight) its K * T floats are one run
// and a task takes all k; otherwise (conv_transpose's, k_first) a task takes
// one k, whose row holds the T taps.
void transposed_panels(const float* src, int64_t sg, int64_t sk, int64_t sn, int64_t groups,
                       int64_t N, const Panels& p, float* dst) {
  const bool one_run = sk == p.T;
  const int64_t kcount = one_run ? 1 : p.K, Q = one_run ? p.K * p.T : p.T;
  const int64_t runs = ((Q + 15) / 16 + kTilesPerTask - 1) / kTilesPerTask;
  const int64_t grain = std::max<int64_t>(1, kSerialFloats / (std::min<int64_t>(kTilesPerTask * 16, Q) * kBlockN));
  at::parallel_for(0, groups * p.blocks * kcount * runs, grain, [&](int64_t begin, int64_t end) {
    transposed_tasks(begin, end, src, sg, sk, sn, N, kcount, Q, p, dst);
  });
}
// The weight gradient's rows [begin, end) (g, o) of finish_weight, by the
// same tiles: 16 taps t (rows, each summed over the ranges in range order
// as it is loaded, as the scalar loop sums) by 16 input channels c,
// transposed, and stored as 16 runs of the taps of one c.
__attribute__((target("avx512f"))) void transposed_weight_rows(int64_t begin, int64_t end, const float* src,
                                                               int64_t ranges, int64_t range_stride,
                                                               int64_t T, int64_t Og, int64_t Cg,
                                                               float* dst) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t g = row / Og, o = row % Og;
    float* d = dst + row * Cg * T;
    for (int64_t c0 = 0; c0 < Cg; c0 += 16) {
      const int64_t cn = std::min<int64_t>(16, Cg - c0);
      const __mmask16 cmask = static_cast<__mmask16>((1u << cn) - 1u);
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const int64_t tn = std::min<int64_t>(16, T - t0);
        __m512 r[16];
        for (int64_t i = 0; i < 16; ++i) {
          if (i >= tn) {
            r[i] = _mm512_setzero_ps();
            continue;
          }
          const float* s = src + ((g * T + t0 + i) * Og + o) * Cg + c0;
          r[i] = _mm512_maskz_loadu_ps(cmask, s);
          for (int64_t k = 1; k < ranges; ++k) r[i] = _mm512_add_ps(r[i], _mm512_maskz_loadu_ps(cmask, s + k * range_stride));
        }
        transpose16(r);
        const __mmask16 tmask = static_cast<__mmask16>((1u << tn) - 1u);
        for (int64_t j = 0; j < cn; ++j) _mm512_mask_storeu_ps(d + (c0 + j) * T + t0, tmask, r[j]);
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

// The weight gradient from its partials (ranges, G, T, Og, Cg): summed in
// range order, then laid out as the weight (G*Og, Cg, *kernel). One pass, a
// row (g, o) of the weight per step: its T x Cg block of each partial is read
// in rows and written transposed while it is in L1. (A permute and
// contiguous() gathered the elements T-innermost at a stride of Og*Cg: 16 us
// of a 99 us weight gradient at 64 channels and 8x8 pixels.) Each element
// is summed by one thread in range order, so the bits do not depend on the
// thread count.
at::Tensor finish_weight(const at::Tensor& partials, int64_t ranges, at::IntArrayRef weight_size) {
  TORCH_INTERNAL_ASSERT(partials.scalar_type() == at::kFloat && partials.is_contiguous());
  const int64_t G = partials.size(1), T = partials.size(2), Og = partials.size(3), Cg = partials.size(4);
  const int64_t range_stride = partials.stride(0);
  at::Tensor out = at::empty(weight_size, partials.options());
  const float* src = partials.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kSerialFloats / std::max<int64_t>(T * Cg, 1));
#ifdef CONVT_EXT_PANEL_TRANSPOSE
  static const bool avx512 = cpu_avx512f();
  if (avx512) {  // Note [Panels by 16 x 16 transposes]: 2.3 ms of a 6.4 ms gradient (item 38)
    at::parallel_for(0, G * Og, grain, [&](int64_t begin, int64_t end) {
      transposed_weight_rows(begin, end, src, ranges, range_stride, T, Og, Cg, dst);
    });
    return out;
  }
#endif
  at::parallel_for(0, G * Og, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> block(T * Cg);  // the row's (T, Cg) block, summed over ranges
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / Og, o = row % Og;
      for (int64_t t = 0; t < T; ++t) {
        const float* s = src + ((g * T + t) * Og + o) * Cg;
        float* b = block.data() + t * Cg;
        std::memcpy(b, s, Cg * sizeof(float));
        for (int64_t r = 1; r < ranges; ++r) {
          for (int64_t c = 0; c < Cg; ++c) b[c] += s[r * range_stride + c];
        }
      }
      float* d = dst + row * Cg * T;
      for (int64_t t = 0; t < T; ++t) {  // long inner loops: T is often 9
        const float* b = block.data() + t * Cg;
        for (int64_t c = 0; c < Cg; ++c) d[c * T + t] = b[c];
      }
    }
  });
  return out;
}

// The panels of a weight viewed as (G, a, b, *kernel): `k_first` when its
// K (input channels of the GEMM) come before its N. Built on every call, so
// it is one pass in the weight's own strides (any memory format), not a
// zero fill and a strided copy_ per panel: for 512 x 512 3x3 weights those
// cost more than the layer's GEMMs on small images (benchmarks/NOTES.md
// item 32). Only the padding columns of each last panel are zeroed.
Panels tap_panels(const at::Tensor& weight, int64_t groups, bool k_first) {
  Panels p;
  const int64_t kdims = weight.dim() - 2;
  p.T = c10::multiply_integers(weight.sizes().slice(2));
  const int64_t ab = weight.size(0) / groups;  // the first dimension's share of a group
  p.K = k_first ? ab : weight.size(1);
  const int64_t N = k_first ? weight.size(1) : ab;
  p.blocks = (N + kBlockN - 1) / kBlockN;
  p.data = at::empty({groups, p.T, p.blocks, p.K, kBlockN}, weight.options());
  // The source's strides along g, k, n, and each tap's offset.
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  const int64_t sg = ab * s0, sk = k_first ? s0 : s1, sn = k_first ? s1 : s0;
  std::vector<int64_t> toff(p.T, 0);
  for (int64_t t = 0; t < p.T; ++t) {
    for (int64_t d = kdims - 1, rest = t; d >= 0; --d) {
      toff[t] += rest % weight.size(2 + d) * weight.stride(2 + d);
      rest /= weight.size(2 + d);
    }
  }
  bool taps_contiguous = true;  // as in a contiguous weight: the taps are one run
  for (int64_t t = 0; t < p.T; ++t) taps_contiguous &= toff[t] == t;
  const float* src = weight.const_data_ptr<float>();
  float* dst = p.data.mutable_data_ptr<float>();
#ifdef CONVT_EXT_PANEL_TRANSPOSE
  // A source row of fewer than 4 taps (conv_transpose's 1x1 weight) would
  // fill a quarter of each tile: 16 loads and 64 shuffles for 4 stores.
  static const bool avx512 = cpu_avx512f();
  if (avx512 && taps_contiguous && (sk == p.T || p.T >= 4)) {  // Note [Panels by 16 x 16 transposes]
    transposed_panels(src, sg, sk, sn, groups, N, p, dst);
    return p;
  }
#endif
  const int64_t T = p.T, K = p.K, blocks = p.blocks, tap_step = blocks * K * kBlockN;
  // A task: kChunk rows of one (group, panel), for every tap. It reads its
  // kBlockN columns of kChunk x T values (one run each, for a contiguous
  // weight) into a tile laid out as its T x kChunk rows of kBlockN, then
  // copies each row whole into its panel. The rows of the taps' panels lie
  // a multiple of 4 KiB apart: written in place, element by element, they
  // fall into one L1 set. While it works it fetches the next task's columns,
  // kBlockN runs too far apart for the hardware to foresee.
  constexpr int64_t kChunk = 8;
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, kSerialFloats / (kChunk * kBlockN * T));
  // A task's first column: (g, b, c) = (task / chunks / blocks, task / chunks % blocks, task % chunks).
  const auto first_column = [&](int64_t task) {
    return src + task / chunks / blocks * sg + task / chunks % blocks * kBlockN * sn + task % chunks * kChunk * sk;
  };
  at::parallel_for(0, groups * blocks * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(T * kChunk * kBlockN, 0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, b = task / chunks % blocks, g = task / chunks / blocks;
      const int64_t k0 = c * kChunk, kc = std::min(kChunk, K - k0);
      const int64_t n = std::min(kBlockN, N - b * kBlockN);
      const float* columns = first_column(task);
      const char* next = task + 1 < end && taps_contiguous ? reinterpret_cast<const char*>(first_column(task + 1)) : nullptr;
      for (int64_t j = 0; j < n; ++j) {
        const float* from = columns + j * sn;
        if (next != nullptr) {
          for (int64_t byte = 0; byte < kChunk * T * int64_t(sizeof(float)); byte += 64) {
            __builtin_prefetch(next + j * sn * int64_t(sizeof(float)) + byte);
          }
        }
        for (int64_t kk = 0; kk < kc; ++kk) {
          float* to = tile.data() + kk * kBlockN + j;
          const float* at = from + kk * sk;
          if (taps_contiguous) {
            for (int64_t t = 0; t < T; ++t) to[t * kChunk * kBlockN] = at[t];
          } else {
            for (int64_t t = 0; t < T; ++t) to[t * kChunk * kBlockN] = at[toff[t]];
          }
        }
      }
      float* d = dst + ((g * T * blocks + b) * K + k0) * kBlockN;
      for (int64_t t = 0; t < T; ++t) {
        // kc whole rows; columns past n stay zero in the tile.
        std::memcpy(d + t * tap_step, tile.data() + t * kChunk * kBlockN, kc * kBlockN * sizeof(float));
      }
    }
  });
  return p;
}

// The floats of tap_panels' panels.
double panel_floats(int64_t groups, int64_t T, int64_t K, int64_t N) {
  return double(groups) * T * K * ((N + kBlockN - 1) / kBlockN) * kBlockN;
}

// Whether the ukernel can address every operand of the call's tap GEMMs.
// oneDNN's brgemm descriptor holds leading dimensions, and the byte offsets
// of an operand's rows, as int: a leading dimension of 2^29 floats already
// fails (std::bad_alloc), and one row of a huge stride can reach it (a
// conv_transpose at stride 2^25 over 16 channels). The largest leading
// dimension of any form is s2 * c_image (conv's and the weight gradient's
// gather, conv_transpose's strided accumulation) or c_windows, over at most
// kSpan rows (kPlaneRows in the plane forms).
bool ukernel_reaches(const Window3& call, int64_t c_image, int64_t c_windows) {
  const double ld = std::max(double(call.stride[2]) * double(c_image), double(c_windows));
  return double(kSpan) * ld * sizeof(float) <= double(std::numeric_limits<int32_t>::max());
}

}  // namespace

Offer view_offer(ConvOp op, const at::Tensor& like, const Window3& call, int64_t c_image,
                 int64_t c_windows, int64_t groups, bool image_pixels, bool windows_pixels,
                 bool output_pixels, bool pointwise) {
  if (!like.is_cpu() || like.scalar_type() != at::kFloat ||
      call.batch == 0 || c_image == 0 || c_windows == 0 || call.image_numel() == 0 ||
      call.window_numel() == 0 || !tap_gemm_runs() || fp32_convs_in_bf16() ||
      !ukernel_reaches(call, c_image, c_windows)) {
    return {};
  }
  const int64_t cg_image = c_image / groups, cg_windows = c_windows / groups;
  // Every buffer of the call: the weights; the image's plane, or the copies
  // into pixel memory and back; per task its block of products or of
  // grad_output turned; the weight gradient's partials.
  const double image = double(call.batch) * c_image * call.image_numel();
  const double windows = double(call.batch) * c_windows * call.window_numel();
  const double weights = double(groups) * cg_image * cg_windows * call.kernel_numel();
  const double tasks = double(tasks_at_once(like));
  const bool plane = !image_pixels || call.windows[2] < kWideRows;
  const double gather = plane ? plane_floats(call, c_image) + tasks * kPlaneRows * c_windows
                               : (image_pixels ? 0 : image);
  // The weights' panels (for the weight gradient: its sum, no larger)
  double floats = op == ConvOp::ConvTranspose ? panel_floats(groups, call.kernel_numel(), cg_windows, cg_image)
                                              : panel_floats(groups, call.kernel_numel(), cg_image, cg_windows);
  Window3 direct;
  if (op == ConvOp::ConvTranspose && folded_transpose(call, &direct)) {
    floats += folded_floats(direct, c_windows, int64_t(tasks));
  } else if (op == ConvOp::ConvTranspose) {
    floats += transpose_plane_form(windows_pixels, call)
                  ? transpose_plane_floats(call, c_windows) + tasks * kPlaneRows * c_image
                  : (windows_pixels ? 0 : windows) + (output_pixels ? 0 : image);
  } else {
    // conv, the weight gradient, or both (conv_transpose's backward)
    if (op != ConvOp::ConvWeight) {
      floats += folded_form(call) ? folded_floats(call, c_image, int64_t(tasks))
                                  : gather + (plane || output_pixels ? 0 : windows);
    }
    if (op != ConvOp::Conv) {
      floats += folded_weight(call, groups, c_image, int64_t(tasks))
                    ? folded_floats(call, c_image, 0) + windows + weights
                    : gather + (windows_pixels ? 0 : windows) + tasks * (weights + kRows * kSpan * c_windows);
    }
  }
  if (floats * sizeof(float) > double(workspace_limit())) return {};
  bool overlap = false;  // windows that share pixels: col2im sums, where the view path gathers
  for (int i = 0; i < kMaxDims; ++i) overlap |= call.kernel[i] > call.stride[i];
  static const bool avx512 = cpu_avx512f();
  return {true, view_rule(op, avx512, image_pixels, windows_pixels, like.dim() - 2, overlap, cg_image,
                         cg_windows, pointwise)};
}

at::Tensor conv_view(const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups,
                     bool planar_out) {
  const int dims = static_cast<int>(input.dim()) - 2;
  const int64_t O = weight.size(0);
  const Panels wt = tap_panels(weight, groups, false);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (folded_form(call)) {
    at::Tensor out = empty_output(planar_out, call.batch, O, call.windows, dims, input.options());
    conv_folded(input, wt, b, call, groups, O, out);
    return out;
  }
  if (plane_form(input, call)) {
    at::Tensor out = empty_output(planar_out, call.batch, O, call.windows, dims, input.options());
    conv_plane(input, wt, b, call, groups, O, out);
    return out;
  }
  at::Tensor out = empty_output(false, call.batch, O, call.windows, dims, input.options());
  conv_rows(input, wt, b, call, groups, O, out);
  return out;
}

at::Tensor conv_transpose_view(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const Window3& call,
                               int64_t groups, bool planar_out) {
  const int dims = static_cast<int>(input.dim()) - 2;
  const int64_t O = call.channels;
  const Panels wt = tap_panels(weight, groups, true);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (Window3 direct; folded_transpose(call, &direct)) {
    at::Tensor out = empty_output(planar_out, call.batch, O, call.image, dims, input.options());
    conv_folded(input, wt, b, direct, groups, O, out, true);
    return out;
  }
  if (transpose_plane_form(pixel_memory(input), call)) {
    at::Tensor out = empty_output(planar_out, call.batch, O, call.image, dims, input.options());
    conv_transpose_plane(input, wt, b, call, groups, out);
    return out;
  }
  at::Tensor out = empty_output(false, call.batch, O, call.image, dims, input.options());
  conv_transpose_rows(input, wt, b, call, groups, out);
  return out;
}

at::Tensor conv_weight_view(const at::Tensor& input, const at::Tensor& grad_output,
                            const Window3& call, int64_t groups, at::IntArrayRef weight_size) {
  const int64_t C = input.size(1), O = grad_output.size(1), Cg = C / groups, Og = O / groups;
  const int64_t T = call.kernel_numel();
  if (folded_weight(call, groups, C, tasks_at_once(input))) {
    const at::Tensor dw = at::empty({1, groups, T, Og, Cg}, input.options());
    weight_folded(input, grad_output, call, groups, dw.select(0, 0));
    return finish_weight(dw, 1, weight_size);
  }
  const bool plane = plane_form(input, call);
  const int64_t count = plane ? plane_form_tasks(call) : row_form_tasks(call);
  const int64_t ranges = std::min(count, tasks_at_once(input));
  // One partial (G, T, Og, Cg) per fixed range of tasks, summed in range order.
  const at::Tensor partials = at::zeros({std::max<int64_t>(ranges, 1), groups, T, Og, Cg}, input.options());
  if (plane) {
    weight_plane(input, grad_output, call, groups, partials);
  } else {
    weight_rows(input, grad_output, call, groups, partials);
  }
  return finish_weight(partials, ranges, weight_size);
}

bool view_rule(ConvOp op, bool avx512, bool image_pixels, bool windows_pixels, int64_t dims,
               bool overlap, int64_t cg_image, int64_t cg_windows, bool pointwise) {
  // A tap's GEMM needs enough channels on both sides, and a 1x1 layer has no
  // columns to copy.
  if (pointwise || cg_image < 16 || cg_windows < 16) return false;
  // With AVX-512 the ukernel runs the per-tap GEMMs near the FMA peak
  // (87-92% on an Intel Xeon in the prototype), above the BLAS on im2col's
  // columns (73-85%).
  if (avx512) return true;
  // With AVX2 the BLAS is as fast a GEMM, so the view path wins where it
  // saves a copy (benchmarks/NOTES.md items 25 and 27): an image already in
  // pixel memory, read in place; conv_transpose with overlapping windows in
  // 2-d or 3-d, whose strided accumulation replaces col2im's sums; and conv
  // and its weight gradient on a planar image with overlapping windows,
  // whose columns repeat each pixel, in 3-d, or in 2-d while a tap's K x N
  // block is at most 128 x 256 (beyond, the per-tap GEMMs slow down as B
  // leaves the cache). In 1-d the columns win.
  switch (op) {
    case ConvOp::Conv:
    case ConvOp::ConvWeight:
    case ConvOp::ConvTransposeBackward:
      return image_pixels ||
             (overlap && (dims == 3 || (dims == 2 && cg_image * cg_windows <= 128 * 256)));
    case ConvOp::ConvTranspose:
      return windows_pixels || (dims >= 2 && overlap);
  }
  return false;
}

}  // namespace convt_ext
