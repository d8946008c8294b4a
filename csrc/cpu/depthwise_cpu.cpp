// The depthwise path's CPU kernels (the private ops _depthwise_into and
// _depthwise_weight_into, ../kernels.h): vector loops over the relation of
// ../im2col.h, for depthwise layers with one output channel per input
// channel in pixel (channels-last) memory (vectors across channels), for
// planar depthwise convs by blocks of channels in the cache (vectors across
// channels again: Note [Blocked planes]), and for every grouped layer in
// planar memory (vectors along the plane: Note [Phase planes], Note
// [conv_transpose by output phases]). The element functions of
// ../depthwise_elements.h are the GPU's; the CPU runs them in the tests'
// emulation.
//
// Note [One loop, three instruction sets]
// torch's extensions are compiled for the baseline x86-64 ISA, so a plain
// loop vectorises to SSE2 only, a quarter of an AVX-512 core. The loops of
// depthwise_loops.inc are compiled three times, for AVX-512, AVX2 + FMA and
// the baseline, each in a namespace of its own under `#pragma GCC target`,
// and cpu_isa() picks one per process: AVX-512 where torch's own kernels
// run it (gemm.h's cpu_avx512f: ATEN_CPU_CAPABILITY caps it), AVX2 where the
// CPU and torch's capability have it. Their headers are included before the
// pragmas, so no inline function of a header is compiled for a wider ISA
// than the process may run. Clang and other targets get the baseline only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>  // plane rows' masked lanes (Note [Plane rows])
#endif
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../dtypes.h"
#include "../gemm.h"
#include "../im2col.h"
#include "../kernels.h"

namespace convt_ext {
namespace {

// Along the last dimension, one tap's reads in conv's direction: window
// positions a0 + t read image positions b0 + sb*t, t < count.
struct Segment {
  int64_t a0 = 0, b0 = 0, count = 0, sb = 1;
};

// Along the last dimension, the output positions [lo, hi) whose every tap
// reads inside the input, at pixel a*A + B + k*D (conv: A = s, B = -p, D =
// d; conv_transpose at stride 1: A = 1, B = p, D = -d); lo = hi where there
// are none, or the relation is no line (conv_transpose at a larger stride).
struct Line {
  int64_t lo = 0, hi = 0, A = 1, B = 0, D = 0;
};

// The relation (*) of one call, precomputed once (as CUTLASS's iterators
// precompute their deltas): for each output position a and tap k of each
// dimension, the input position it reads, or -1 in the padding. conv reads
// it forward (tap), conv_transpose backward (window_at): one traversal
// serves both directions.
struct Relation {
  int64_t batch = 0, out[3] = {}, in[3] = {}, kernel[3] = {}, stride[3] = {}, padding[3] = {}, dilation[3] = {};
  std::vector<int64_t> tables[3];
  std::vector<Segment> segments;  // per k2, conv's direction only
  Line line;
  int64_t at(int d, int64_t a, int64_t k) const { return tables[d][a * kernel[d] + k]; }
  const int64_t* table(int d) const { return tables[d].data(); }
};

Relation make_relation(const Window3& w, bool transposed) {
  Relation r;
  r.batch = w.batch;
  for (int d = 0; d < 3; ++d) {
    const int64_t s = w.stride[d], p = w.padding[d], dil = w.dilation[d], K = w.kernel[d];
    r.kernel[d] = K;
    r.stride[d] = s;
    r.padding[d] = p;
    r.dilation[d] = dil;
    r.out[d] = transposed ? w.image[d] : w.windows[d];
    r.in[d] = transposed ? w.windows[d] : w.image[d];
    r.tables[d].resize(r.out[d] * K);
    for (int64_t a = 0; a < r.out[d]; ++a) {
      for (int64_t k = 0; k < K; ++k) {
        int64_t b;
        if (transposed) {
          b = window_at<int64_t>(a, k, s, p, dil, w.windows[d]);
        } else {
          b = tap<int64_t>(a, k, s, p, dil);
          if (b >= w.image[d]) b = -1;
        }
        r.tables[d][a * K + k] = b < 0 ? -1 : b;
      }
    }
  }
  const int64_t s = w.stride[2], p = w.padding[2], dil = w.dilation[2];
  if (!transposed || s == 1) {
    r.line = transposed ? Line{0, 0, 1, p, -dil} : Line{0, 0, s, -p, dil};
    int64_t lo = -1, hi = -1;
    for (int64_t a = 0; a < r.out[2]; ++a) {
      bool inside = true;
      for (int64_t k = 0; k < w.kernel[2]; ++k) inside &= r.tables[2][a * w.kernel[2] + k] >= 0;
      if (inside && lo < 0) lo = a;
      if (inside) hi = a + 1;
    }
    if (lo >= 0) {
      r.line.lo = lo;
      r.line.hi = hi;
    }
  }
  if (transposed) return r;
  r.segments.resize(w.kernel[2]);
  for (int64_t k = 0; k < w.kernel[2]; ++k) {
    int64_t lo, hi;
    taps_inside(w.image[2], w.windows[2], k, s, p, dil, &lo, &hi);
    r.segments[k] = {lo, tap<int64_t>(lo, k, s, p, dil), hi - lo, s};
  }
  return r;
}

// A call's groups, and the channels per group of its image (ci) and window (cw) sides.
struct Groups {
  int64_t groups, ci, cw;
};

// Note [conv_transpose by output phases]
// The guide's recipe, per output phase: conv_transpose at stride s is, for
// the output pixels i = s*t + r of one phase r, a stride-1 sum over the taps
// k with (r + p - k*d) divisible by s of the input at t + e, e = (r + p -
// k*d) / s (window_at read along a whole phase). So each phase is a direct
// convolution of the zero-padded input plane with the phase's taps (the
// kernel's s-th taps, read in reverse: the rotated kernel), whose output goes
// to every s-th pixel. In planar memory the padded input, in rows of Wp,
// makes each tap one contiguous multiply-add over the phase (as Note [Phase
// planes] does for conv); the columns past the phase's T2 are dropped.
struct OutputPhase {
  int64_t r1, r2, T1, T2;
  // Its taps (k1 * K2 + k2), their input offsets per dimension, and their
  // offsets in a padded slice.
  std::vector<int64_t> k, e1, e2, off;
};
struct OutputPhases {
  int64_t s1 = 1, s2 = 1, lo1 = 0, lo2 = 0, Wp = 0, slab = 0, slack = 0, span = 0;
  std::vector<OutputPhase> phases;
};

OutputPhases output_phases(const Window3& w) {
  OutputPhases plan;
  plan.s1 = w.stride[1];
  plan.s2 = w.stride[2];
  // The input offset e of tap k at phase r, when the tap reaches the phase.
  const auto offset = [&](int d, int64_t r, int64_t k, int64_t* e) {
    const int64_t t = r + w.padding[d] - k * w.dilation[d];
    if (((t % w.stride[d]) + w.stride[d]) % w.stride[d] != 0) return false;
    *e = t / w.stride[d];
    return true;
  };
  int64_t hi1 = w.windows[1], hi2 = w.windows[2];  // rows and columns the padded slice needs
  for (int64_t r1 = 0; r1 < std::min(plan.s1, w.image[1]); ++r1) {
    for (int64_t r2 = 0; r2 < std::min(plan.s2, w.image[2]); ++r2) {
      OutputPhase ph{r1, r2, (w.image[1] - r1 + plan.s1 - 1) / plan.s1, (w.image[2] - r2 + plan.s2 - 1) / plan.s2,
                     {}, {}};
      for (int64_t k1 = 0; k1 < w.kernel[1]; ++k1) {
        int64_t e1, e2;
        if (!offset(1, r1, k1, &e1)) continue;
        for (int64_t k2 = 0; k2 < w.kernel[2]; ++k2) {
          if (!offset(2, r2, k2, &e2)) continue;
          ph.k.push_back(k1 * w.kernel[2] + k2);
          ph.e1.push_back(e1);
          ph.e2.push_back(e2);
          plan.lo1 = std::max(plan.lo1, -e1);
          plan.lo2 = std::max(plan.lo2, -e2);
          hi1 = std::max(hi1, ph.T1 + e1);
          hi2 = std::max(hi2, ph.T2 + e2);
        }
      }
      plan.phases.push_back(std::move(ph));
    }
  }
  plan.Wp = plan.lo2 + hi2;
  plan.slab = (plan.lo1 + hi1) * plan.Wp;
  int64_t reach = 0;
  for (OutputPhase& ph : plan.phases) {
    for (size_t i = 0; i < ph.k.size(); ++i) {
      ph.off.push_back((ph.e1[i] + plan.lo1) * plan.Wp + ph.e2[i] + plan.lo2);
      reach = std::max(reach, ph.e2[i] + plan.lo2);
    }
    plan.span = std::max(plan.span, ph.T1 * plan.Wp);
  }
  plan.slack = plan.Wp + reach + 1;
  return plan;
}

// Note [Blocked planes] (depthwise_planes.inc): the kernel widths and strides
// it has blocks for, along a row of dilation 1.
bool planes_supported(const Relation& rel) {
  const int64_t K2 = rel.kernel[2], S = rel.stride[2];
  return rel.dilation[2] == 1 && (K2 == 3 || K2 == 5 || K2 == 7) && (S == 1 || S == 2);
}

// A padded row's pixels: the reads of a row of at least 10 output pixels (a
// row shorter than a block is one block of up to 10, whose reads run past the
// row: row_sweep).
int64_t padded_width(const Relation& rel) {
  return (std::max<int64_t>(rel.out[2], 10) - 1) * rel.stride[2] + rel.kernel[2];
}

// One planar call of Note [Blocked planes]: x and y planar, C channels; w in
// blocks of CB channels, (blocks, K, CB), and bias, both zero-padded to whole
// blocks.
template <typename T>
struct PlanesCall {
  const T* x;
  const T* w;
  const T* bias;
  T* y;
  int64_t C;
  int64_t inserted[3];  // s where x has s - 1 zeros inserted between its pixels (relation 14), else 1
};

}  // namespace

// The loops pass 64-byte vectors between inline functions of one ISA; GCC
// warns of their ABI where a template is instantiated, at the end of the file.
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CONVT_DW_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
namespace {
namespace isa_avx512 {
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
constexpr bool kTransposeInRegisters = true;  // two-source shuffles (Note [Blocked planes])
constexpr int kVectorRegisters = 32;
constexpr int kMaskedLanes = 512;  // Note [Plane rows]
#include "depthwise_loops.inc"
#include "depthwise_planes.inc"
#include "depthwise_rows.inc"
}  // namespace isa_avx512
}  // namespace
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
namespace {
namespace isa_avx2 {
#pragma GCC target("avx2,fma")
constexpr bool kTransposeInRegisters = false;  // no two-source 64-byte shuffle: scalar moves
constexpr int kVectorRegisters = 16;
constexpr int kMaskedLanes = 256;
#include "depthwise_loops.inc"
#include "depthwise_planes.inc"
#include "depthwise_rows.inc"
}  // namespace isa_avx2
}  // namespace
#pragma GCC pop_options
#endif
namespace {
namespace isa_default {
constexpr bool kTransposeInRegisters = false;
constexpr int kVectorRegisters = 16;
constexpr int kMaskedLanes = 0;  // lane by lane: the rule never takes plane rows here
#include "depthwise_loops.inc"
#include "depthwise_planes.inc"
#include "depthwise_rows.inc"
}  // namespace isa_default
}  // namespace

namespace {

enum class Isa { Default, Avx2, Avx512 };

Isa cpu_isa() {
#ifdef CONVT_DW_MULTI_ISA
  static const Isa isa = [] {
    if (cpu_avx512f() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq")) {
      return Isa::Avx512;
    }
    const std::string cap = at::get_cpu_capability();
    if ((cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return Isa::Avx2;
    }
    return Isa::Default;
  }();
  return isa;
#else
  return Isa::Default;
#endif
}

}  // namespace

namespace {

// The loops' calls, by name, for engine_info()["path"]["depthwise_loops"].
enum Loop {
  kPixels,
  kPhasePlanes,
  kBlockedPlanes,
  kPlaneRows,
  kOutputPhases,
  kWeightPixels,
  kWeightPlanes,
  kWeightBlockedPlanes,
  kLoops
};
std::array<std::atomic<int64_t>, kLoops> g_loops{};
void count_loop(Loop l) { g_loops[l].fetch_add(1, std::memory_order_relaxed); }

}  // namespace

std::vector<std::pair<std::string, int64_t>> depthwise_cpu_loops() {
  static const char* names[kLoops] = {"pixels",        "phase_planes",  "blocked_planes",       "plane_rows",
                                      "output_phases", "weight_pixels", "weight_planes",        "weight_blocked_planes"};
  std::vector<std::pair<std::string, int64_t>> r;
  for (int l = 0; l < kLoops; ++l) r.emplace_back(names[l], g_loops[l].load());
  return r;
}

std::string depthwise_cpu_isa() {
  const Isa isa = cpu_isa();
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "default";
}

bool depthwise_cpu_avx512() { return cpu_isa() == Isa::Avx512; }

namespace {
std::atomic<bool> g_plane_rows{true};
constexpr int64_t kPlaneRowsMinRow = 12;
}  // namespace

bool set_plane_rows(bool on) { return g_plane_rows.exchange(on); }

namespace {

#ifdef CONVT_DW_MULTI_ISA
#define CONVT_DW_CALL(fn, ...)                                     \
  switch (cpu_isa()) {                                            \
    case Isa::Avx512:                                             \
      return isa_avx512::fn(__VA_ARGS__);                         \
    case Isa::Avx2:                                               \
      return isa_avx2::fn(__VA_ARGS__);                           \
    default:                                                      \
      return isa_default::fn(__VA_ARGS__);                        \
  }
#else
#define CONVT_DW_CALL(fn, ...) return isa_default::fn(__VA_ARGS__);
#endif

template <typename T>
void gather_pixels(const T* x, const T* w, const T* bias, T* y, const Relation& rel, int64_t C,
                   int64_t r0, int64_t r1) {
  CONVT_DW_CALL(gather_pixels<T>, x, w, bias, y, rel, C, r0, r1)
}
template <typename T>
void conv_planes(const PlanesCall<T>& call, const Relation& rel, int64_t t0, int64_t t1) {
  CONVT_DW_CALL(conv_planes<T>, call, rel, t0, t1)
}
template <typename T>
void weight_planes(const T* image, const T* dy, int64_t C, const Relation& rel, int64_t t0, int64_t t1, T* partial) {
  CONVT_DW_CALL(weight_planes<T>, image, dy, C, rel, t0, t1, partial)
}
template <typename T>
void conv_planar(const T* x, const T* w, const T* bias, T* y, const Relation& rel, const Groups& gr, int64_t t0,
                 int64_t t1) {
  CONVT_DW_CALL(conv_planar<T>, x, w, bias, y, rel, gr, t0, t1)
}
template <typename T>
void plane_rows(const T* x, const T* w, const T* bias, T* y, const Relation& rel, int64_t c_out, int64_t ci,
                int64_t cw, int64_t t0, int64_t t1) {
  CONVT_DW_CALL(plane_rows<T>, x, w, bias, y, rel, c_out, ci, cw, t0, t1)
}
template <typename T>
void transpose_planar(const T* x, const T* w, const T* bias, T* y, const Relation& rel, const OutputPhases& plan,
                      const Groups& gr, int64_t t0, int64_t t1) {
  CONVT_DW_CALL(transpose_planar<T>, x, w, bias, y, rel, plan, gr, t0, t1)
}
template <typename T>
void weight_pixels(const T* x, const T* dy, T* partial, const Relation& rel, int64_t C, int64_t r0, int64_t r1) {
  CONVT_DW_CALL(weight_pixels<T>, x, dy, partial, rel, C, r0, r1)
}
template <typename T>
void weight_planar(const T* x, const T* dy, T* dw, const Relation& rel, const Groups& gr, int64_t g0, int64_t g1) {
  CONVT_DW_CALL(weight_planar<T>, x, dy, dw, rel, gr, g0, g1)
}

template <typename T>
void transpose_tiles(const T* src, T* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
  CONVT_DW_CALL(transpose_tiles<T>, src, dst, rows, cols, r0, r1)
}

// (N, C, S0, S1, S2) in pixel memory.
bool pixels5(const at::Tensor& t) { return t.permute({0, 2, 3, 4, 1}).is_contiguous(); }

// dst = src, one of them in pixel memory and the other planar (contiguous),
// float or double: per sample a (pixels x C) transpose, by transpose_tiles.
void copy_across_layouts(const at::Tensor& src, const at::Tensor& dst, bool to_planar) {
  const int64_t N = src.size(0), C = src.size(1), P = N == 0 || C == 0 ? 0 : src.numel() / (N * C);
  const int64_t rows = to_planar ? P : C, cols = to_planar ? C : P, stripes = (rows + 15) / 16;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "copy_across_layouts", [&] {
    const scalar_t* s = data_as<scalar_t>(src);
    scalar_t* d = mutable_data_as<scalar_t>(dst);
    at::parallel_for(0, N * stripes, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, 16 * cols)),
                     [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / stripes, r0 = (t % stripes) * 16;
        transpose_tiles<scalar_t>(s + n * P * C, d + n * P * C, rows, cols, r0, std::min(rows, r0 + 16));
      }
    });
  });
}

// t as a planar tensor: itself where it is, a copy by tiles from pixel memory.
at::Tensor planar(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
  if (!pixels5(t) || !(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) return t.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options());
  copy_across_layouts(t, out, true);
  return out;
}

// out = y, y planar: by tiles where out is in pixel memory.
void copy_from_planar(const at::Tensor& out, const at::Tensor& y) {
  if (pixels5(out) && !out.is_contiguous() && y.scalar_type() == out.scalar_type() &&
      (y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble)) {
    return copy_across_layouts(y, out, false);
  }
  out.copy_(y);
}

// The layout both tensors share, if the vector loops take it: 1 pixel, 0
// planar, -1 neither.
int shared_layout(const at::Tensor& a, const at::Tensor& b) {
  if (pixels5(a) && pixels5(b)) return 1;
  if (a.is_contiguous() && b.is_contiguous()) return 0;
  return -1;
}

// The multiply-adds of one stretch of rows of the pixel loops' weight
// gradient, at the least: below it a stretch's partial costs more to sum
// than its rows to compute.
constexpr int64_t kWeightStretchWork = int64_t(1) << 19;

// Tasks of about 64K multiply-adds each: fewer, larger chunks on tiny calls.
int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_item)); }

// f(TypeTag<T>{}) for the float types the vector loops run: float and
// double, and float16/bfloat16 through float32 copies (the sums in float32).
template <typename F>
void in_loop_type(const std::vector<at::Tensor>& in, const at::Tensor& out, const F& f) {
  const at::ScalarType type = out.scalar_type();
  if (type == at::kFloat || type == at::kDouble) {
    if (type == at::kFloat) return f(TypeTag<float>{}, in, out);
    return f(TypeTag<double>{}, in, out);
  }
  std::vector<at::Tensor> wide;
  for (const at::Tensor& t : in) wide.push_back(t.defined() ? t.to(at::kFloat) : t);
  const at::Tensor result = at::empty_like(out, out.options().dtype(at::kFloat));
  f(TypeTag<float>{}, wide, result);
  out.copy_(result);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? data_as<T>(t) : nullptr;
}

// Whether a planar depthwise conv (one channel per group on both sides)
// runs by blocked planes (Note [Blocked planes]), measured on a Zen 4 against
// phase planes (benchmarks/NOTES.md): 1.0-7x faster wherever its two
// buffers stay within the L2 (up to 80x80 pixels at stride 2), slower
// beyond (1.6x at 112x112, batch 1). It also needs 4 tasks (samples x
// blocks), since phase planes split by channel; the rule reads no thread
// count, so that a call sums in one order however many threads run it.
bool by_blocked_planes(const Relation& rel, const Groups& gr, bool transposed, int layout) {
  if (transposed || gr.ci != 1 || gr.cw != 1 || layout != 0 || !planes_supported(rel)) return false;
  const double pixels = double(rel.in[0]) * double(rel.in[1]) * double(padded_width(rel)) +
                        double(rel.out[0]) * double(rel.out[1]) * double(rel.out[2]);
  return pixels * 128.0 <= 1.5 * double(1 << 20) && rel.batch * ((gr.groups + 31) / 32) >= 4;
}

// Whether a planar grouped conv runs by plane rows (Note [Plane rows]):
// where the ISA has masked lanes, for the shapes it has instantiations for
// (plane_rows_shape: 2-d and 3-d, kernel width 3 or 5), and output rows of at least
// kPlaneRowsMinRow pixels (a vector of a shorter row is mostly idle lanes;
// blocked planes fill theirs with channels). Measured on a Zen 4
// (benchmarks/NOTES.md item 37), against the loops they replace: with
// AVX-512, 1.3-2.4x from 14 pixels on and 0.75-0.9x at 10 and below; at
// stride 2 with more than one input channel per group, 0.8x phase planes
// (those split each input plane once for all the group's outputs); 7x7
// kernels 0.9x blocked planes. Capped to AVX2, better at stride 1 and width
// 3 only (its 64-byte vectors are register pairs, and the stride-2 shuffles
// several instructions). set_plane_rows(false) turns it off, for the tests
// of the other loops.
bool by_plane_rows(const Relation& rel, const Groups& gr, bool transposed, int layout) {
  const Isa isa = cpu_isa();
  if (!g_plane_rows.load() || isa == Isa::Default || transposed || layout != 0) return false;
  if (!isa_default::plane_rows_shape(rel) || rel.out[2] < kPlaneRowsMinRow) return false;
  if (isa == Isa::Avx2) return rel.stride[2] == 1 && rel.kernel[2] == 3;
  return rel.stride[2] == 1 || gr.ci == 1;
}

// Note [Plane rows]: every output plane a task; x, w and y planar.
void conv_plane_rows(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& out, const Relation& rel, const Groups& gr) {
  const int64_t c_out = gr.groups * gr.cw, K = gr.ci * rel.kernel[0] * rel.kernel[1] * rel.kernel[2];
  in_loop_type({input, weight.contiguous(), bias}, out, [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& y) {
    using T = typename decltype(tag)::type;
    const int64_t work = rel.out[0] * rel.out[1] * rel.out[2] * K;
    at::parallel_for(0, rel.batch * c_out, grain(work), [&](int64_t t0, int64_t t1) {
      plane_rows<T>(data_as<T>(t[0]), data_as<T>(t[1]), ptr_or_null<T>(t[2]), mutable_data_as<T>(y), rel, c_out,
                    gr.ci, gr.cw, t0, t1);
    });
  });
}

// Note [Blocked planes]: the weight in blocks of cb channels, tap-major in
// each, (blocks, K, cb), and the bias, zero-padded to whole blocks; cb is the
// loop type's, 32 floats or 16 doubles (kRowVectors vectors of 64 bytes).
void conv_blocked_planes(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& out, const Relation& rel, int64_t C,
                         const int64_t* inserted = nullptr) {
  const int64_t K = rel.kernel[0] * rel.kernel[1] * rel.kernel[2];
  in_loop_type({input, weight, bias}, out, [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& y) {
    using T = typename decltype(tag)::type;
    constexpr int64_t cb = 2 * 64 / sizeof(T);
    const int64_t blocks = (C + cb - 1) / cb, tasks = rel.batch * blocks;
    const at::Tensor padded = at::zeros({blocks * cb, K}, t[1].options());
    padded.narrow(0, 0, C).copy_(t[1].reshape({C, K}));
    const at::Tensor wt = padded.view({blocks, cb, K}).permute({0, 2, 1}).contiguous();
    at::Tensor bp;
    if (t[2].defined()) {
      bp = at::zeros({blocks * cb}, t[2].options());
      bp.narrow(0, 0, C).copy_(t[2]);
    }
    const PlanesCall<T> call{data_as<T>(t[0]),      data_as<T>(wt),
                             ptr_or_null<T>(bp),    mutable_data_as<T>(y),
                             C,                     {inserted ? inserted[0] : 1, inserted ? inserted[1] : 1,
                                                     inserted ? inserted[2] : 1}};
    const int64_t work = rel.out[0] * rel.out[1] * rel.out[2] * cb * K;
    at::parallel_for(0, tasks, grain(work), [&](int64_t t0, int64_t t1) { conv_planes<T>(call, rel, t0, t1); });
  });
}

// _depthwise_into: conv (image -> windows) or conv_transpose (windows ->
// image, `transposed`), all tensors lifted to three spatial dimensions.
// Depthwise layers with multiplier 1 in pixel memory run the pixel loops,
// planar ones blocked planes where by_blocked_planes says; everything else
// the planar loops, on planar copies where it is not planar.
void depthwise_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias_arg,
                   const at::Tensor& out, at::IntArrayRef window, int64_t groups, bool transposed) {
  const Window3 w = unpack_window(window);
  if (out.numel() == 0) return;
  const at::Tensor bias = bias_arg.has_value() ? bias_arg->contiguous() : at::Tensor();
  const Groups gr{groups, weight.size(1), weight.size(0) / groups};
  const Relation rel = make_relation(w, transposed);
  const int64_t K = w.kernel_numel();
  const int layout = shared_layout(input, out);
  if (by_plane_rows(rel, gr, transposed, layout)) {
    count_loop(kPlaneRows);
    return conv_plane_rows(input, weight, bias, out, rel, gr);  // Note [Plane rows]
  }
  if (by_blocked_planes(rel, gr, transposed, layout)) {
    count_loop(kBlockedPlanes);
    return conv_blocked_planes(input, weight, bias, out, rel, groups);  // Note [Blocked planes]
  }
  Window3 direct;
  int64_t inserted[kMaxDims];
  if (transposed && as_direct_conv(w, &direct, inserted)) {
    const Relation conv = make_relation(direct, false);
    // Plane rows have no inserted zeros: conv_transpose at stride 1, one
    // channel per group both ways (the rotated kernel is the flipped one).
    const bool none_inserted = inserted[0] == 1 && inserted[1] == 1 && inserted[2] == 1;
    if (none_inserted && gr.ci == 1 && gr.cw == 1 && by_plane_rows(conv, gr, false, layout)) {
      count_loop(kPlaneRows);
      return conv_plane_rows(input, weight.flip({2, 3, 4}), bias, out, conv, gr);
    }
    if (by_blocked_planes(conv, gr, false, layout)) {
      count_loop(kBlockedPlanes);
      return conv_blocked_planes(input, weight.flip({2, 3, 4}), bias, out, conv, groups, inserted);
    }
  }
  if (gr.ci == 1 && gr.cw == 1 && layout == 1) {
    count_loop(kPixels);
    // Pixel memory reads the weight tap-major, (K, C).
    const at::Tensor wt = weight.reshape({groups, K}).t().contiguous();
    in_loop_type({input, wt, bias}, out, [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& y) {
      using T = typename decltype(tag)::type;
      const int64_t rows = rel.batch * rel.out[0] * rel.out[1];
      at::parallel_for(0, rows, grain(rel.out[2] * groups * K), [&](int64_t r0, int64_t r1) {
        gather_pixels<T>(data_as<T>(t[0]), data_as<T>(t[1]), ptr_or_null<T>(t[2]), mutable_data_as<T>(y), rel,
                         groups, r0, r1);
      });
    });
    return;
  }
  const at::Tensor y = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
  const int64_t work = rel.out[0] * rel.out[1] * rel.out[2] * K * (transposed ? gr.cw * gr.ci : gr.ci * gr.cw);
  const OutputPhases plan = transposed ? output_phases(w) : OutputPhases{};
  count_loop(transposed ? kOutputPhases : kPhasePlanes);
  in_loop_type({planar(input), weight.contiguous(), bias}, y,
               [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& yt) {
    using T = typename decltype(tag)::type;
    const T *x = data_as<T>(t[0]), *wp = data_as<T>(t[1]), *b = ptr_or_null<T>(t[2]);
    T* yp = mutable_data_as<T>(yt);
    at::parallel_for(0, rel.batch * groups, grain(work), [&](int64_t t0, int64_t t1) {
      if (transposed) {
        transpose_planar<T>(x, wp, b, yp, rel, plan, gr, t0, t1);  // Note [conv_transpose by output phases]
      } else {
        conv_planar<T>(x, wp, b, yp, rel, gr, t0, t1);  // Note [Phase planes]
      }
    });
  });
  if (!y.is_same(out)) copy_from_planar(out, y);
}

// The weight gradient by blocked planes: per (sample, block) task a partial
// sum (K, CB), then the samples' partials summed in order into grad_weight
// (C, K), contiguous.
void weight_blocked_planes(const at::Tensor& image, const at::Tensor& windows, const at::Tensor& grad_weight,
                           const Relation& rel, int64_t C) {
  const int64_t K = rel.kernel[0] * rel.kernel[1] * rel.kernel[2];
  in_loop_type({image, windows}, grad_weight, [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& out) {
    using T = typename decltype(tag)::type;
    constexpr int64_t cb = 2 * 64 / sizeof(T);
    const int64_t blocks = (C + cb - 1) / cb, tasks = rel.batch * blocks;
    std::vector<T> partial(tasks * K * cb);
    const int64_t work = rel.out[0] * rel.out[1] * rel.out[2] * cb * K;
    at::parallel_for(0, tasks, grain(work), [&](int64_t t0, int64_t t1) {
      weight_planes<T>(data_as<T>(t[0]), data_as<T>(t[1]), C, rel, t0, t1, partial.data());
    });
    T* dw = mutable_data_as<T>(out);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t blk = c / cb, lane = c % cb;
      for (int64_t k = 0; k < K; ++k) {
        T sum(0);
        for (int64_t n = 0; n < rel.batch; ++n) sum += partial[((n * blocks + blk) * K + k) * cb + lane];
        dw[c * K + k] = sum;
      }
    }
  });
}

// _depthwise_weight_into: the weight gradient (C_w, ci, k0, k1, k2) from the
// image and the windows' gradient, lifted; pixel or planar loops as above.
void depthwise_weight_cpu(const at::Tensor& image, const at::Tensor& windows, const at::Tensor& grad_weight,
                          at::IntArrayRef window, int64_t groups) {
  const Window3 w = unpack_window(window);
  if (grad_weight.numel() == 0) return;
  const Groups gr{groups, grad_weight.size(1), grad_weight.size(0) / groups};
  const Relation rel = make_relation(w, false);
  const int64_t K = w.kernel_numel(), work = rel.batch * rel.out[0] * rel.out[1] * rel.out[2] * K;
  const int layout = shared_layout(image, windows);
  if (gr.ci == 1 && gr.cw == 1 && layout == 1) {
    count_loop(kWeightPixels);
    // Stretches of output rows, fixed by the shape alone, each summed into a
    // partial of its own, the partials then summed in order: the bits do not
    // depend on the thread count.
    const int64_t R = rel.batch * rel.out[0] * rel.out[1];
    // (A multiple of 4 from 4 on: even shares for 1, 2 and 4 threads.)
    int64_t stretches = std::clamp<int64_t>(work * groups / kWeightStretchWork, 1, 32);
    if (stretches > 2) stretches = (stretches + 3) / 4 * 4;
    const int64_t per = std::max<int64_t>(1, (R + stretches - 1) / stretches);
    const int64_t count = std::max<int64_t>(1, (R + per - 1) / per), KC = K * groups;
    const at::Tensor dw = at::empty({K, groups}, grad_weight.options());  // tap-major
    in_loop_type({image, windows}, dw, [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& out) {
      using T = typename decltype(tag)::type;
      std::vector<T> partials(count * KC, T(0));
      at::parallel_for(0, count, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) {
          weight_pixels<T>(data_as<T>(t[0]), data_as<T>(t[1]), partials.data() + s * KC, rel, groups, s * per,
                           std::min(R, (s + 1) * per));
        }
      });
      T* sum = mutable_data_as<T>(out);
      at::parallel_for(0, KC, grain(count), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          T v = partials[i];
          for (int64_t s = 1; s < count; ++s) v += partials[s * KC + i];
          sum[i] = v;
        }
      });
    });
    grad_weight.view({groups, K}).copy_(dw.t());
    return;
  }
  if (by_blocked_planes(rel, gr, false, layout) && grad_weight.is_contiguous()) {
    count_loop(kWeightBlockedPlanes);
    return weight_blocked_planes(image, windows, grad_weight, rel, groups);  // Note [Blocked planes]
  }
  count_loop(kWeightPlanes);
  const at::Tensor dw = grad_weight.is_contiguous() ? grad_weight : at::empty(grad_weight.sizes(), grad_weight.options());
  in_loop_type({planar(image), planar(windows)}, dw,
               [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& out) {
    using T = typename decltype(tag)::type;
    at::parallel_for(0, groups, grain(work * gr.ci * gr.cw), [&](int64_t g0, int64_t g1) {
      weight_planar<T>(data_as<T>(t[0]), data_as<T>(t[1]), mutable_data_as<T>(out), rel, gr, g0, g1);
    });
  });
  if (!dw.is_same(grad_weight)) grad_weight.copy_(dw);
}

}  // namespace
}  // namespace convt_ext

TORCH_LIBRARY_IMPL(convt_ext, CPU, m) {
  m.impl("_depthwise_into", &convt_ext::depthwise_cpu);
  m.impl("_depthwise_weight_into", &convt_ext::depthwise_weight_cpu);
}
