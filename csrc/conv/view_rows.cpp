// The view path's row form (Note [im2col as a view] in view.h): per-tap
// GEMMs on strided views of pixel memory, each task owning kRows rows of a
// span of kSpan pixels of its output (Tasks).
#include "view_forms.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace convt_ext::view_forms {

namespace {

// t (N, C, *spatial) as the 5-d pixel tensor (N, S0, S1, S2, C), contiguous:
// a view where t is channels-last already, one copy otherwise.
at::Tensor pixels(const at::Tensor& t) {
  at::Tensor v = t;
  while (v.dim() < 2 + kMaxDims) v = v.unsqueeze(2);
  return v.permute({0, 2, 3, 4, 1}).contiguous();
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

// The window positions [*lo, *hi) of the span [m0, m1) whose tap k2 lies
// inside the image (taps_inside), and the image position *i2 of the first;
// false when there is none.
bool span_taps(const Window3& w, int64_t k2, int64_t m0, int64_t m1, int64_t* lo, int64_t* hi,
               int64_t* i2) {
  taps_inside(w.image[2], w.windows[2], k2, w.stride[2], w.padding[2], w.dilation[2], lo, hi);
  *lo = std::max(*lo, m0);
  *hi = std::min(*hi, m1);
  *i2 = tap(*lo, k2, w.stride[2], w.padding[2], w.dilation[2]);
  return *lo < *hi;
}

}  // namespace

// The tasks weight_rows runs.
int64_t row_form_tasks(const Window3& call) { return Tasks(call.batch, call.windows).count; }

// The row form of conv: a task owns kRows output rows of a span of kSpan
// pixels and adds each tap's GEMM on the image's pixels into them.
void conv_rows(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
               const Window3& call, int64_t groups, int64_t O, const at::Tensor& out) {
  const int64_t C = input.size(1), Cg = C / groups, Og = O / groups;
  const at::Tensor x = pixels(input);
  const float* px = x.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  const Tasks tasks(call.batch, call.windows), image(call.batch, call.image);
  const int64_t s2 = call.stride[2];
  run_tasks(input, tasks.count, [&](int64_t, int64_t task, int64_t& calls) {
    const Tasks::Box box = tasks.at(task);
    start_rows(py, tasks, box, O, pb);
    Tasks::Box in = box;  // the same sample, on the image side
    for_each_tap(call, box.p0, [&](int64_t t, int64_t i0, int64_t k1, int64_t k2) {
      int64_t lo, hi, i2;
      if (!span_taps(call, k2, box.m0, box.m1, &lo, &hi, &i2)) return;
      in.p0 = i0;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t r = box.r0; r < box.r1; ++r) {
          int64_t i1;
          if (!tap_inside(call, 1, r, k1, &i1)) continue;
          const float* a = px + image.pixel(in, i1, i2, C) + g * Cg;
          float* c = py + tasks.pixel(box, r, lo, O) + g * Og;
          for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
            tap_gemm(hi - lo, std::min(kBlockN, Og - n0), Cg, a, s2 * C, wt.at(g, t, n0), wt.ld, c + n0, O);
          }
        }
      }
    });
  });
}

// The row form of conv_transpose, into `out` in pixel memory.
void conv_transpose_rows(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                         const Window3& call, int64_t groups, const at::Tensor& out) {
  const int64_t C = input.size(1), O = call.channels, Cg = C / groups, Og = O / groups;
  const at::Tensor x = pixels(input);
  const float* px = x.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  // A task owns rows of the output image and gathers the window positions
  // (input pixels) whose taps land on them, as col2im does.
  const Tasks tasks(call.batch, call.image), windows(call.batch, call.windows);
  const int64_t s2 = call.stride[2];
  run_tasks(input, tasks.count, [&](int64_t, int64_t task, int64_t& calls) {
    const Tasks::Box box = tasks.at(task);
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
            for (int64_t r = box.r0; r < box.r1; ++r) {
              const int64_t o1 = window_at(r, k1, call.stride[1], call.padding[1], call.dilation[1], call.windows[1]);
              if (o1 < 0) continue;
              const float* a = px + windows.pixel(in, o1, lo, C) + g * Cg;
              float* c = py + tasks.pixel(box, r, i2, O) + g * Og;
              for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
                tap_gemm(hi - lo, std::min(kBlockN, Og - n0), Cg, a, C, wt.at(g, t, n0), wt.ld, c + n0, s2 * O);
              }
            }
          }
        }
      }
    }
  });
}

// The row form of the weight gradient: a task's rows of grad_output
// against the image's pixels, into its range's partial.
void weight_rows(const at::Tensor& input, const at::Tensor& grad_output, const Window3& call,
                 int64_t groups, const at::Tensor& partials) {
  const int64_t C = input.size(1), O = grad_output.size(1), Cg = C / groups, Og = O / groups;
  const int64_t T = call.kernel_numel();
  const Tasks tasks(call.batch, call.windows), image(call.batch, call.image);
  const at::Tensor x = pixels(input), dy = pixels(grad_output);
  const float* px = x.const_data_ptr<float>();
  const float* pdy = dy.const_data_ptr<float>();
  float* pp = partials.mutable_data_ptr<float>();
  const int64_t s2 = call.stride[2], span = std::min(kSpan, call.windows[2]);
  run_tasks(input, tasks.count, [&](int64_t range, int64_t task, int64_t& calls) {
    const Tasks::Box box = tasks.at(task);
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
    for_each_tap(call, box.p0, [&](int64_t t, int64_t i0, int64_t k1, int64_t k2) {
      int64_t lo, hi, i2;
      if (!span_taps(call, k2, box.m0, box.m1, &lo, &hi, &i2)) return;
      in.p0 = i0;
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
    });
  });
}

}  // namespace convt_ext::view_forms
