// The view path (Note [im2col as a view] in view.h): conv, conv_transpose and
// the weight gradient as per-tap GEMMs on strided views of pixel memory.
#include "view.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "../gemm.h"
#include "../plan.h"

namespace convt_ext {

namespace {

// Output channels per GEMM: the width at which the ukernel runs fastest
// (benchmarks/NOTES.md item 25: 94 GFLOP/s a core at 64, 56-70 at 96-128 on
// an AVX2 EPYC); a block of rows x span pixels of one task.
constexpr int64_t kBlockN = 64, kRows = 4, kSpan = 256;

constexpr int kAuto = 0, kView = 1, kColumns = 2;
std::atomic<int> g_path{kAuto};
std::atomic<int64_t> g_view_calls{0}, g_column_calls{0};

// t (N, C, *spatial) as the 5-d pixel tensor (N, S0, S1, S2, C), contiguous:
// a view where t is channels-last already, one copy otherwise.
at::Tensor pixels(const at::Tensor& t) {
  at::Tensor v = t;
  while (v.dim() < 2 + kMaxDims) v = v.unsqueeze(2);
  return v.permute({0, 2, 3, 4, 1}).contiguous();
}

// A new (N, C, *spatial) tensor whose memory is (N, *spatial, C).
at::Tensor empty_pixels(int64_t n, int64_t c, const int64_t* spatial, int dims,
                        const at::TensorOptions& options) {
  std::vector<int64_t> shape{n, c}, strides(2 + dims);
  shape.insert(shape.end(), spatial + kMaxDims - dims, spatial + kMaxDims);
  int64_t s = c;
  strides[1] = 1;
  for (int i = dims - 1; i >= 0; --i) {
    strides[2 + i] = s;
    s *= shape[2 + i];
  }
  strides[0] = s;
  return at::empty_strided(shape, strides, options);
}

// Whether image position tap(o, k) along dimension i lies inside the image.
bool tap_inside(const Window3& w, int i, int64_t o, int64_t k, int64_t* at) {
  *at = tap(o, k, w.stride[i], w.padding[i], w.dilation[i]);
  return *at >= 0 && *at < w.image[i];
}

// The tasks of one call: (n, p0, a block of kRows positions along dim 1, a
// span of kSpan positions along dim 2) of the side whose rows a task owns.
struct Tasks {
  int64_t extent[kMaxDims];
  int64_t row_blocks, spans;
  Tasks(int64_t batch, const int64_t* e) {
    std::copy(e, e + kMaxDims, extent);
    row_blocks = (e[1] + kRows - 1) / kRows;
    spans = (e[2] + kSpan - 1) / kSpan;
    count = batch * e[0] * row_blocks * spans;
  }
  int64_t count;
  struct Box {
    int64_t n, p0, r0, r1, m0, m1;
  };
  Box at(int64_t t) const {
    Box b;
    const int64_t s = t % spans;
    t /= spans;
    const int64_t r = t % row_blocks;
    t /= row_blocks;
    b.p0 = t % extent[0];
    b.n = t / extent[0];
    b.r0 = r * kRows;
    b.r1 = std::min(b.r0 + kRows, extent[1]);
    b.m0 = s * kSpan;
    b.m1 = std::min(b.m0 + kSpan, extent[2]);
    return b;
  }
  // The first element of pixel (n, p0, p1, p2) of a pixel tensor of `c` channels.
  int64_t pixel(const Box& b, int64_t p1, int64_t p2, int64_t c) const {
    return (((b.n * extent[0] + b.p0) * extent[1] + p1) * extent[2] + p2) * c;
  }
};

// The rows a task owns, set to the bias (or zero) before the taps add up.
void start_rows(float* out, const Tasks& t, const Tasks::Box& b, int64_t c, const float* bias) {
  for (int64_t r = b.r0; r < b.r1; ++r) {
    float* row = out + t.pixel(b, r, b.m0, c);
    if (bias == nullptr) {
      std::fill(row, row + (b.m1 - b.m0) * c, 0.f);
      continue;
    }
    for (int64_t m = 0; m < b.m1 - b.m0; ++m) std::memcpy(row + m * c, bias, c * sizeof(float));
  }
}

// The tap-major weight blocks (G, T, K, N) of a weight viewed as (G, a, b, T):
// `k_first` when its K (input channels of the GEMM) come before its N.
at::Tensor tap_major(const at::Tensor& weight, int64_t groups, bool k_first) {
  const int64_t T = c10::multiply_integers(weight.sizes().slice(2));
  const at::Tensor w = weight.reshape({groups, -1, weight.size(1), T});
  return (k_first ? w.permute({0, 3, 1, 2}) : w.permute({0, 3, 2, 1})).contiguous();
}

// Runs task_fn(box, calls) over the call's tasks in for_each_task's fixed
// ranges, and counts the GEMMs.
template <typename F>
void run_tasks(const at::Tensor& like, const Tasks& tasks, const F& task_fn) {
  std::atomic<int64_t> calls{0};
  for_each_task(like, tasks.count, [&](int64_t range, int64_t begin, int64_t end) {
    int64_t local = 0;
    for (int64_t i = begin; i < end; ++i) task_fn(range, tasks.at(i), local);
    calls.fetch_add(local, std::memory_order_relaxed);
    tap_gemms_done(0);
  });
  tap_gemms_done(calls.load());
  g_view_calls.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

bool pixel_memory(const at::Tensor& t) {
  at::Tensor v = t;
  while (v.dim() < 2 + kMaxDims) v = v.unsqueeze(2);
  return v.permute({0, 2, 3, 4, 1}).is_contiguous();
}

bool view_takes(ViewOp op, const at::Tensor& like, const Window3& call, int64_t c_image,
                int64_t c_windows, int64_t groups, bool image_pixels, bool windows_pixels,
                bool output_pixels, bool pointwise) {
  const int setting = g_path.load();
  if (setting == kColumns || !like.is_cpu() || like.scalar_type() != at::kFloat ||
      call.batch == 0 || c_image == 0 || c_windows == 0 || call.image_numel() == 0 ||
      call.window_numel() == 0 || !tap_gemm_runs() || fp32_convs_in_bf16()) {
    return false;
  }
  const int64_t cg_image = c_image / groups, cg_windows = c_windows / groups;
  // Every buffer of the call: the copies into pixel memory, the weights, the
  // output's conversion back, and per task its rows of grad_output turned.
  const int64_t image = call.batch * c_image * call.image_numel();
  const int64_t windows = call.batch * c_windows * call.window_numel();
  const int64_t weights = groups * cg_image * cg_windows * call.kernel_numel();
  int64_t floats = weights;
  if (op == ViewOp::Conv) floats += (image_pixels ? 0 : image) + (output_pixels ? 0 : windows);
  if (op == ViewOp::ConvTranspose) floats += (windows_pixels ? 0 : windows) + (output_pixels ? 0 : image);
  if (op == ViewOp::ConvWeight) {
    floats += (image_pixels ? 0 : image) + (windows_pixels ? 0 : windows);
    floats += tasks_at_once(like) * (weights + kRows * kSpan * c_windows);
  }
  if (floats > workspace_limit() / static_cast<int64_t>(sizeof(float))) return false;
  if (setting == kView) return true;
  // The rule: a tap's GEMM needs enough channels on both sides to beat
  // copying its columns, and a 1x1 layer has no columns to copy
  // (benchmarks/NOTES.md item 25).
  return !pointwise && cg_image >= 16 && cg_windows >= 16;
}

at::Tensor conv_view(const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups) {
  const int dims = static_cast<int>(input.dim()) - 2;
  const int64_t C = input.size(1), O = weight.size(0), Cg = C / groups, Og = O / groups;
  const int64_t T = call.kernel_numel();
  const at::Tensor x = pixels(input), wt = tap_major(weight, groups, false);
  at::Tensor out = empty_pixels(call.batch, O, call.windows, dims, input.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* px = x.const_data_ptr<float>();
  const float* pw = wt.const_data_ptr<float>();
  const float* pb = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  const Tasks tasks(call.batch, call.windows), image(call.batch, call.image);
  const int64_t s2 = call.stride[2];
  run_tasks(input, tasks, [&](int64_t, const Tasks::Box& box, int64_t& calls) {
    start_rows(py, tasks, box, O, pb);
    Tasks::Box in = box;  // the same sample, on the image side
    for (int64_t k0 = 0, t = 0; k0 < call.kernel[0]; ++k0) {
      if (!tap_inside(call, 0, box.p0, k0, &in.p0)) {
        t += call.kernel[1] * call.kernel[2];
        continue;
      }
      for (int64_t k1 = 0; k1 < call.kernel[1]; ++k1) {
        for (int64_t k2 = 0; k2 < call.kernel[2]; ++k2, ++t) {
          int64_t lo, hi;
          taps_inside(call.image[2], call.windows[2], k2, s2, call.padding[2], call.dilation[2], &lo, &hi);
          lo = std::max(lo, box.m0);
          hi = std::min(hi, box.m1);
          if (lo >= hi) continue;
          const int64_t i2 = tap(lo, k2, s2, call.padding[2], call.dilation[2]);
          for (int64_t g = 0; g < groups; ++g) {
            const float* w_t = pw + (g * T + t) * Cg * Og;
            for (int64_t r = box.r0; r < box.r1; ++r) {
              int64_t i1;
              if (!tap_inside(call, 1, r, k1, &i1)) continue;
              const float* a = px + image.pixel(in, i1, i2, C) + g * Cg;
              float* c = py + tasks.pixel(box, r, lo, O) + g * Og;
              for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
                tap_gemm(hi - lo, std::min(kBlockN, Og - n0), Cg, a, s2 * C, w_t + n0, Og, c + n0, O);
              }
            }
          }
        }
      }
    }
  });
  return out;
}

at::Tensor conv_transpose_view(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const Window3& call,
                               int64_t groups) {
  const int dims = static_cast<int>(input.dim()) - 2;
  const int64_t C = input.size(1), O = call.channels, Cg = C / groups, Og = O / groups;
  const int64_t T = call.kernel_numel();
  const at::Tensor x = pixels(input), wt = tap_major(weight, groups, true);
  at::Tensor out = empty_pixels(call.batch, O, call.image, dims, input.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* px = x.const_data_ptr<float>();
  const float* pw = wt.const_data_ptr<float>();
  const float* pb = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  // A task owns rows of the output image and gathers the window positions
  // (input pixels) whose taps land on them, as col2im does.
  const Tasks tasks(call.batch, call.image), windows(call.batch, call.windows);
  const int64_t s2 = call.stride[2];
  run_tasks(input, tasks, [&](int64_t, const Tasks::Box& box, int64_t& calls) {
    start_rows(py, tasks, box, O, pb);
    Tasks::Box in = box;
    for (int64_t k0 = 0, t = 0; k0 < call.kernel[0]; ++k0) {
      in.p0 = window_at(box.p0, k0, call.stride[0], call.padding[0], call.dilation[0], call.windows[0]);
      if (in.p0 < 0) {
        t += call.kernel[1] * call.kernel[2];
        continue;
      }
      for (int64_t k1 = 0; k1 < call.kernel[1]; ++k1) {
        for (int64_t k2 = 0; k2 < call.kernel[2]; ++k2, ++t) {
          // The window positions whose tap k2 lands in the span [m0, m1).
          int64_t lo, hi;
          taps_inside(box.m1 - box.m0, call.windows[2], k2, s2, call.padding[2] + box.m0,
                      call.dilation[2], &lo, &hi);
          if (lo >= hi) continue;
          const int64_t i2 = tap(lo, k2, s2, call.padding[2], call.dilation[2]);
          for (int64_t g = 0; g < groups; ++g) {
            const float* w_t = pw + (g * T + t) * Cg * Og;
            for (int64_t r = box.r0; r < box.r1; ++r) {
              const int64_t o1 = window_at(r, k1, call.stride[1], call.padding[1], call.dilation[1], call.windows[1]);
              if (o1 < 0) continue;
              const float* a = px + windows.pixel(in, o1, lo, C) + g * Cg;
              float* c = py + tasks.pixel(box, r, i2, O) + g * Og;
              for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
                tap_gemm(hi - lo, std::min(kBlockN, Og - n0), Cg, a, C, w_t + n0, Og, c + n0, s2 * O);
              }
            }
          }
        }
      }
    }
  });
  return out;
}

at::Tensor conv_weight_view(const at::Tensor& input, const at::Tensor& grad_output,
                            const Window3& call, int64_t groups, at::IntArrayRef weight_size) {
  const int64_t C = input.size(1), O = grad_output.size(1), Cg = C / groups, Og = O / groups;
  const int64_t T = call.kernel_numel();
  const at::Tensor x = pixels(input), dy = pixels(grad_output);
  const Tasks tasks(call.batch, call.windows), image(call.batch, call.image);
  const int64_t ranges = std::min(tasks.count, tasks_at_once(input));
  // One partial (G, T, Og, Cg) per fixed range of tasks, summed in range order.
  const at::Tensor partials = at::zeros({std::max<int64_t>(ranges, 1), groups, T, Og, Cg}, input.options());
  const float* px = x.const_data_ptr<float>();
  const float* pdy = dy.const_data_ptr<float>();
  float* pp = partials.mutable_data_ptr<float>();
  const int64_t s2 = call.stride[2], span = std::min(kSpan, call.windows[2]);
  run_tasks(input, tasks, [&](int64_t range, const Tasks::Box& box, int64_t& calls) {
    // The task's rows of grad_output, turned (row, O, span): the A operand
    // of every tap, turned once and read from the cache.
    const at::Tensor turned = scratch(Slot::Operand, {kRows, O, span}, input.options());
    float* pt = turned.mutable_data_ptr<float>();
    const int64_t width = box.m1 - box.m0;
    for (int64_t r = box.r0; r < box.r1; ++r) {
      const float* src = pdy + tasks.pixel(box, r, box.m0, O);
      float* dst = pt + (r - box.r0) * O * span;
      for (int64_t m = 0; m < width; ++m) {
        for (int64_t o = 0; o < O; ++o) dst[o * span + m] = src[m * O + o];
      }
    }
    float* part = pp + range * groups * T * Og * Cg;
    Tasks::Box in = box;
    for (int64_t k0 = 0, t = 0; k0 < call.kernel[0]; ++k0) {
      if (!tap_inside(call, 0, box.p0, k0, &in.p0)) {
        t += call.kernel[1] * call.kernel[2];
        continue;
      }
      for (int64_t k1 = 0; k1 < call.kernel[1]; ++k1) {
        for (int64_t k2 = 0; k2 < call.kernel[2]; ++k2, ++t) {
          int64_t lo, hi;
          taps_inside(call.image[2], call.windows[2], k2, s2, call.padding[2], call.dilation[2], &lo, &hi);
          lo = std::max(lo, box.m0);
          hi = std::min(hi, box.m1);
          if (lo >= hi) continue;
          const int64_t i2 = tap(lo, k2, s2, call.padding[2], call.dilation[2]);
          for (int64_t g = 0; g < groups; ++g) {
            float* dw_t = part + (g * T + t) * Og * Cg;
            for (int64_t r = box.r0; r < box.r1; ++r) {
              int64_t i1;
              if (!tap_inside(call, 1, r, k1, &i1)) continue;
              const float* a = pt + ((r - box.r0) * O + g * Og) * span + (lo - box.m0);
              const float* b = px + image.pixel(in, i1, i2, C) + g * Cg;
              for (int64_t n0 = 0; n0 < Cg; n0 += kBlockN, ++calls) {
                tap_gemm(Og, std::min(kBlockN, Cg - n0), hi - lo, a, span, b + n0, s2 * C, dw_t + n0, Cg);
              }
            }
          }
        }
      }
    }
  });
  at::Tensor sum = partials.select(0, 0);
  for (int64_t r = 1; r < ranges; ++r) sum.add_(partials.select(0, r));
  // (G, T, Og, Cg) -> (G*Og, Cg, *kernel)
  return sum.permute({0, 2, 3, 1}).reshape(weight_size).contiguous();
}

void set_conv_path(const std::string& setting) {
  const int v = setting == "auto" ? kAuto : setting == "view" ? kView : setting == "columns" ? kColumns : -1;
  TORCH_CHECK_VALUE(v >= 0, "set_conv_path: path must be one of 'auto', 'view' or 'columns', but got '",
                    setting, "'");
  g_path.store(v);
}

std::string conv_path() {
  const int v = g_path.load();
  return v == kAuto ? "auto" : v == kView ? "view" : "columns";
}

PathReport path_report() {
  PathReport r;
  r.setting = conv_path();
  r.view_available = tap_gemm_runs();
  r.view_calls = g_view_calls.load();
  r.column_calls = g_column_calls.load();
  return r;
}

void count_column_call(const at::Tensor& like) {
  if (like.is_cpu()) g_column_calls.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace convt_ext
