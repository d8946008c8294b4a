// What the view path's files share (private to them): its constants, the
// weights' panels, the task and tap loops, and each form's entry. The forms:
// the row form (view_rows.cpp; Note [im2col as a view] in view.h), the plane
// form (view_plane.cpp; Note [The padded plane]), the folded form
// (view_folded.cpp; Note [The folded batch]) and the phase form
// (view_phases.cpp; Note [conv_transpose by output phases]). view.cpp holds
// the path's entry points, which choose among them.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>

#include "../gemm.h"
#include "../im2col.h"
#include "../plan.h"

// A namespace of its own: these names serve the view path's files alone and
// must not meet another file's helpers of the same name.
namespace convt_ext::view_forms {

// Output channels per GEMM: the width at which the ukernel runs fastest
// (benchmarks/NOTES.md item 25: 94 GFLOP/s a core at 64, 56-70 at 96-128 on
// an AVX2 EPYC); a block of rows x span pixels of one task.
constexpr int64_t kBlockN = 64, kRows = 4, kSpan = 256;
// Virtual rows a task of the plane form computes (Note [The padded plane]),
// and the output row width from which a channels-last image is read in
// place by the row form instead.
constexpr int64_t kPlaneRows = 128, kWideRows = 32;
// The folded form (Note [The folded batch]) takes output rows of at most
// kFoldedWidth pixels while the batch's pixels of a row are at most
// kFoldedMaxRows GEMM rows (benchmarks/NOTES.md item 32).
constexpr int64_t kFoldedWidth = 28, kFoldedMaxRows = 256;
// A folded task's product rows of kBlockN floats: 256 KiB, within the L2 of
// every CPU measured (512 KiB on an EPYC Milan).
constexpr int64_t kFoldedProductRows = 1024;

// Whether image position tap(o, k) along dimension i lies inside the image.
inline bool tap_inside(const Window3& w, int i, int64_t o, int64_t k, int64_t* at) {
  *at = tap(o, k, w.stride[i], w.padding[i], w.dilation[i]);
  return *at >= 0 && *at < w.image[i];
}

// The weights as the GEMMs' B operands, prepared once per call: for each
// group g and tap t, the tap's (K x N) block in panels of kBlockN columns,
// each panel contiguous (K x kBlockN, the last one padded with zeros), so
// that a GEMM reads its B as one run of memory (benchmarks/NOTES.md item 27).
struct Panels {
  at::Tensor data;  // (G, T, ceil(N / kBlockN), K, kBlockN)
  int64_t T, blocks, K;
  // The panel of columns n0 .. n0 + kBlockN - 1 of group g's tap t; its ld is kBlockN.
  static constexpr int64_t ld = kBlockN;
  const float* at(int64_t g, int64_t t, int64_t n0) const {
    return data.const_data_ptr<float>() + ((g * T + t) * blocks + n0 / kBlockN) * K * kBlockN;
  }
};

// Runs task_fn(range, task, calls) over `count` tasks in for_each_task's fixed
// ranges, and counts the GEMMs.
template <typename F>
void run_tasks(const at::Tensor& like, int64_t count, const F& task_fn) {
  std::atomic<int64_t> calls{0};
  for_each_task(like, count, [&](int64_t range, int64_t begin, int64_t end) {
    int64_t local = 0;
    for (int64_t i = begin; i < end; ++i) task_fn(range, i, local);
    calls.fetch_add(local, std::memory_order_relaxed);
    tap_gemms_done(0);
  });
  tap_gemms_done(calls.load());
}

// Runs fn(t, i0, k1, k2) for every kernel tap t = (k0, k1, k2), in order,
// whose offset k0 takes window plane o0 inside the image, at image plane i0:
// the taps a gather reads (conv and the weight gradient).
template <typename F>
void for_each_tap(const Window3& w, int64_t o0, const F& fn) {
  for (int64_t k0 = 0, t = 0; k0 < w.kernel[0]; ++k0) {
    int64_t i0;
    if (!tap_inside(w, 0, o0, k0, &i0)) {
      t += w.kernel[1] * w.kernel[2];
      continue;
    }
    for (int64_t k1 = 0; k1 < w.kernel[1]; ++k1) {
      for (int64_t k2 = 0; k2 < w.kernel[2]; ++k2, ++t) fn(t, i0, k1, k2);
    }
  }
}

// The row form (view_rows.cpp): conv and conv_transpose into `out` in pixel
// memory; the weight gradient into `partials`, one per fixed range of its
// row_form_tasks() tasks.
void conv_rows(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
               const Window3& call, int64_t groups, int64_t O, const at::Tensor& out);
void conv_transpose_rows(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                         const Window3& call, int64_t groups, const at::Tensor& out);
void weight_rows(const at::Tensor& input, const at::Tensor& grad_output, const Window3& call,
                 int64_t groups, const at::Tensor& partials);
int64_t row_form_tasks(const Window3& call);

// The plane form (view_plane.cpp): whether it computes the call, its
// buffer's floats, conv and the weight gradient (as the row form's), and
// its task count.
bool plane_form(const at::Tensor& image, const Window3& call);
double plane_floats(const Window3& w, int64_t c);
void conv_plane(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                const Window3& call, int64_t groups, int64_t O, const at::Tensor& out);
void weight_plane(const at::Tensor& input, const at::Tensor& grad_output, const Window3& call,
                  int64_t groups, const at::Tensor& partials);
int64_t plane_form_tasks(const Window3& call);
// Its blocks of kPlaneRows virtual rows, which the phase form computes too.
void virtual_places(int64_t m0, int64_t m1, int64_t wv, int64_t O2, int64_t row, int64_t col,
                    int64_t* at);
void write_block(const float* block, int64_t rows, const int64_t* at, float* out, bool pixels_out,
                 int64_t n, int64_t O, int64_t plane, int64_t offset);
float* start_block(const at::Tensor& like, int64_t rows, int64_t O, const float* bias);
// Copies `count` pixels of C channels from an image (pixel stride sp,
// channel stride sc) into pixel memory, `step` floats from pixel to pixel:
// the plane's and the folded image's one copy.
void copy_pixels(const float* from, int64_t sp, int64_t sc, int64_t C, int64_t count, float* to,
                 int64_t step);

// The folded form (view_folded.cpp): whether it computes conv (or a
// conv_transpose, as the direct conv of relationship 14), its buffers'
// floats, and conv (with the kernel rotated, for a conv_transpose).
bool folded_form(const Window3& call);
double folded_floats(const Window3& w, int64_t c_image, int64_t tasks);
bool folded_transpose(const Window3& call, Window3* direct);
void conv_folded(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                 const Window3& call, int64_t groups, int64_t O, const at::Tensor& out,
                 bool rotated = false);
// The weight gradient on the folded form: whether it computes it, and the
// gradient into dw (G, T, Og, Cg).
bool folded_weight(const Window3& call, int64_t groups, int64_t c_image, int64_t tasks);
void weight_folded(const at::Tensor& input, const at::Tensor& grad_output, const Window3& call,
                   int64_t groups, const at::Tensor& dw);

// The phase form (view_phases.cpp): whether it computes conv_transpose, its
// plane's floats, and conv_transpose.
bool transpose_plane_form(bool input_pixels, const Window3& call);
double transpose_plane_floats(const Window3& w, int64_t c);
void conv_transpose_plane(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                          const Window3& call, int64_t groups, const at::Tensor& out);

}  // namespace convt_ext::view_forms
