// The depthwise path's CPU kernels (the private ops _depthwise_into and
// _depthwise_weight_into, ../kernels.h): vector loops for depthwise layers
// with one output channel per input channel, in pixel (channels-last) or
// planar memory; the element functions of ../depthwise_elements.h for the
// rest (channel multipliers, a few channels per group, mixed layouts).
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
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "../depthwise_elements.h"
#include "../dtypes.h"
#include "../gemm.h"
#include "../grid.h"

namespace convt_ext {
namespace {

// Along the last dimension, one tap's reads as a segment of the relation:
// output positions a0 + sa*t read input positions b0 + sb*t, t < count
// (conv: sa = 1, sb = s; conv_transpose: sa = s, sb = 1).
struct Segment {
  int64_t a0 = 0, b0 = 0, count = 0, sa = 1, sb = 1;
};

// The relation (*) of one call, precomputed once (as CUTLASS's iterators
// precompute their deltas): for each output position a and tap k of each
// dimension, the input position it reads, or -1 in the padding. conv reads
// it forward (tap), conv_transpose backward (window_at): one traversal
// serves both directions.
struct Relation {
  int64_t batch = 0, out[3] = {}, in[3] = {}, kernel[3] = {}, stride[3] = {}, padding[3] = {}, dilation[3] = {};
  std::vector<int64_t> tables[3];
  std::vector<Segment> segments;  // per k2
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
  r.segments.resize(w.kernel[2]);
  for (int64_t k = 0; k < w.kernel[2]; ++k) {
    Segment& g = r.segments[k];
    if (!transposed) {
      int64_t lo, hi;
      taps_inside(w.image[2], w.windows[2], k, s, p, dil, &lo, &hi);
      g = {lo, tap<int64_t>(lo, k, s, p, dil), hi - lo, 1, s};
      continue;
    }
    // The first image position whose window at tap k exists, then every s-th.
    const int64_t base = std::max<int64_t>(0, k * dil - p);
    const int64_t a = base + (((k * dil - p - base) % s) + s) % s;
    const int64_t o = a < w.image[2] ? window_at<int64_t>(a, k, s, p, dil, w.windows[2]) : -1;
    if (o >= 0) g = {a, o, std::min((w.image[2] - a + s - 1) / s, w.windows[2] - o), s, 1};
  }
  return r;
}

}  // namespace

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CONVT_DW_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
namespace {
namespace isa_avx512 {
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#include "depthwise_loops.inc"
}  // namespace isa_avx512
}  // namespace
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
namespace {
namespace isa_avx2 {
#pragma GCC target("avx2,fma")
#include "depthwise_loops.inc"
}  // namespace isa_avx2
}  // namespace
#pragma GCC pop_options
#endif
namespace {
namespace isa_default {
#include "depthwise_loops.inc"
}  // namespace isa_default
}  // namespace
#pragma GCC diagnostic pop

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

std::string depthwise_cpu_isa() {
  const Isa isa = cpu_isa();
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "default";
}

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
void gather_planar(const T* x, const T* w, const T* bias, T* y, const Relation& rel, int64_t C,
                   int64_t r0, int64_t r1) {
  CONVT_DW_CALL(gather_planar<T>, x, w, bias, y, rel, C, r0, r1)
}
template <typename T>
void conv_planar(const T* x, const T* w, const T* bias, T* y, const Relation& rel, int64_t C, int64_t p0,
                 int64_t p1) {
  CONVT_DW_CALL(conv_planar<T>, x, w, bias, y, rel, C, p0, p1)
}
template <typename T>
void weight_pixels(const T* x, const T* dy, T* dw, const Relation& rel, int64_t C, int64_t b0, int64_t b1) {
  CONVT_DW_CALL(weight_pixels<T>, x, dy, dw, rel, C, b0, b1)
}
template <typename T>
void weight_planar(const T* x, const T* dy, T* dw, const Relation& rel, int64_t C, int64_t c0, int64_t c1) {
  CONVT_DW_CALL(weight_planar<T>, x, dy, dw, rel, C, c0, c1)
}

// (N, C, S0, S1, S2) in pixel memory.
bool pixels5(const at::Tensor& t) { return t.permute({0, 2, 3, 4, 1}).is_contiguous(); }

// The layout both tensors share, if the vector loops take it: 1 pixel, 0
// planar, -1 neither.
int shared_layout(const at::Tensor& a, const at::Tensor& b) {
  if (pixels5(a) && pixels5(b)) return 1;
  if (a.is_contiguous() && b.is_contiguous()) return 0;
  return -1;
}

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

// The element functions over every output element, in parallel.
template <typename F>
void each_element(int64_t total, int64_t work, const F& element) {
  at::parallel_for(0, total, grain(work), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) element(i);
  });
}

void depthwise_generic(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& out, const Window3& w, int64_t groups, bool transposed) {
  const int64_t cw = weight.size(0) / groups, ci = weight.size(1);
  dispatch_sum(out.scalar_type(), "depthwise", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if constexpr (std::is_floating_point_v<scalar_t> || std::is_same_v<scalar_t, at::Half> ||
                  std::is_same_v<scalar_t, at::BFloat16>) {
      using acc_t = at::opmath_type<scalar_t>;
      const auto a = transposed ? depthwise_args<scalar_t, int64_t>(at::Tensor(), input, weight, bias, out, groups)
                                : depthwise_args<scalar_t, int64_t>(input, at::Tensor(), weight, bias, out, groups);
      each_element(out.numel(), (transposed ? cw : ci) * w.kernel_numel(), [&](int64_t i) {
        depthwise_element<scalar_t, acc_t, int64_t>(transposed ? 1 : 0, a, w, out.size(1), i);
      });
    } else {
      TORCH_CHECK_TYPE(false, "depthwise: no kernel for dtype ", out.scalar_type());
    }
  });
}

// _depthwise_into: conv (image -> windows) or conv_transpose (windows ->
// image, `transposed`), all tensors lifted to three spatial dimensions.
void depthwise_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias_arg,
                   const at::Tensor& out, at::IntArrayRef window, int64_t groups, bool transposed) {
  const Window3 w = unpack_window(window);
  if (out.numel() == 0) return;
  const at::Tensor bias = bias_arg.has_value() ? bias_arg->contiguous() : at::Tensor();
  const int layout = shared_layout(input, out);
  const bool diagonal = weight.size(1) == 1 && weight.size(0) == groups && input.size(1) == groups;
  if (!diagonal || layout < 0) return depthwise_generic(input, weight, bias, out, w, groups, transposed);
  const Relation rel = make_relation(w, transposed);
  const int64_t C = groups, K = w.kernel_numel();
  // Pixel memory reads the weight tap-major, (K, C); planar per channel, (C, K).
  const at::Tensor wt = layout == 1 ? weight.reshape({C, K}).t().contiguous() : weight.reshape({C, K}).contiguous();
  in_loop_type({input, wt, bias}, out, [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& y) {
    using T = typename decltype(tag)::type;
    const T *x = data_as<T>(t[0]), *wp = data_as<T>(t[1]), *b = ptr_or_null<T>(t[2]);
    T* yp = mutable_data_as<T>(y);
    if (layout == 1) {
      const int64_t rows = rel.batch * rel.out[0] * rel.out[1];
      at::parallel_for(0, rows, grain(rel.out[2] * C * K), [&](int64_t r0, int64_t r1) {
        gather_pixels<T>(x, wp, b, yp, rel, C, r0, r1);
      });
    } else if (!transposed) {
      // Note [Phase planes] in depthwise_loops.inc.
      at::parallel_for(0, rel.batch * C, grain(rel.out[0] * rel.out[1] * rel.out[2] * K), [&](int64_t p0, int64_t p1) {
        conv_planar<T>(x, wp, b, yp, rel, C, p0, p1);
      });
    } else {
      const int64_t rows = rel.batch * C * rel.out[0];
      at::parallel_for(0, rows, grain(rel.out[1] * rel.out[2] * K), [&](int64_t r0, int64_t r1) {
        gather_planar<T>(x, wp, b, yp, rel, C, r0, r1);
      });
    }
  });
}

// _depthwise_weight_into: the weight gradient (C_w, ci, k0, k1, k2) from the
// image and the windows' gradient, lifted.
void depthwise_weight_cpu(const at::Tensor& image, const at::Tensor& windows, const at::Tensor& grad_weight,
                          at::IntArrayRef window, int64_t groups) {
  const Window3 w = unpack_window(window);
  if (grad_weight.numel() == 0) return;
  const int layout = shared_layout(image, windows);
  const bool diagonal = grad_weight.size(1) == 1 && grad_weight.size(0) == groups && image.size(1) == groups;
  if (!diagonal || layout < 0 || !grad_weight.is_contiguous()) {
    dispatch_sum(grad_weight.scalar_type(), "depthwise_weight", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      if constexpr (std::is_floating_point_v<scalar_t> || std::is_same_v<scalar_t, at::Half> ||
                    std::is_same_v<scalar_t, at::BFloat16>) {
        const auto a = depthwise_args<scalar_t, int64_t>(image, windows, at::Tensor(), at::Tensor(), grad_weight, groups);
        each_element(grad_weight.numel(), w.batch * w.window_numel(), [&](int64_t i) {
          depthwise_element<scalar_t, at::opmath_type<scalar_t>, int64_t>(2, a, w, 0, i);
        });
      } else {
        TORCH_CHECK_TYPE(false, "depthwise_weight: no kernel for dtype ", grad_weight.scalar_type());
      }
    });
    return;
  }
  const Relation rel = make_relation(w, false);
  const int64_t C = groups, K = w.kernel_numel();
  const at::Tensor dw = layout == 1 ? at::empty({K, C}, grad_weight.options()) : grad_weight.view({C, K});
  in_loop_type({image, windows}, dw, [&](auto tag, const std::vector<at::Tensor>& t, const at::Tensor& out) {
    using T = typename decltype(tag)::type;
    const T *x = data_as<T>(t[0]), *dy = data_as<T>(t[1]);
    T* d = mutable_data_as<T>(out);
    const int64_t work = rel.batch * rel.out[0] * rel.out[1] * rel.out[2] * K;
    if (layout == 1) {
      const int64_t L = 64 / sizeof(T), blocks = (C + L - 1) / L;
      at::parallel_for(0, blocks, grain(work * L), [&](int64_t b0, int64_t b1) {
        weight_pixels<T>(x, dy, d, rel, C, b0, b1);
      });
    } else {
      at::parallel_for(0, C, grain(work), [&](int64_t c0, int64_t c1) {
        weight_planar<T>(x, dy, d, rel, C, c0, c1);
      });
    }
  });
  if (layout == 1) grad_weight.view({C, K}).copy_(dw.t());
}

}  // namespace
}  // namespace convt_ext

TORCH_LIBRARY_IMPL(convt_ext, CPU, m) {
  m.impl("_depthwise_into", &convt_ext::depthwise_cpu);
  m.impl("_depthwise_weight_into", &convt_ext::depthwise_weight_cpu);
}
