// The view path: each CPU convolution in channels-last (pixel) memory as a
// sum over kernel taps of GEMMs whose image operand is a strided view of the
// tensor itself, so that no column matrix is ever copied.
//
// Note [im2col as a view]
// In pixel memory (N, *spatial, C) the rows of im2col's column matrix that
// belong to one kernel tap t = (k0, k1, k2) are pixels of the image: for the
// window positions o2 = m0 .. m0+M-1 of one row (n, o0, o1), row m of tap t's
// block is the pixel
//     x[n, tap(o0, k0), tap(o1, k1), tap(m0 + m, k2), :]        (im2col.h (*))
// a matrix of M rows and C columns whose leading dimension is s2*C: one
// tap's slice of im2col_view's window view, with channels last. Only the
// positions taps_inside() finds read the image; the rest read the zero
// padding and are left out of the product. So, per group g (channels
// c in g's K slice) and tap t, with W_t the tap's (C/G x O/G) weight block:
//   conv            y[o]      += x[tap_t(o)] . W_t    A: view, ld s2*C_in;  C: rows, ld C_out
//   conv_transpose  y[tap(o)] += x[o] . W_t           A: rows, ld C_in;     C: view, ld s2*C_out
//   weight grad     dW_t      += dy^T . x[tap_t(o)]   B: view, ld s2*C_in
// conv_transpose is conv's adjoint (the guide's relationship 14): the view
// moves from the A operand (ld_a = s*C, a gather) to the C operand (ld_c =
// s*C, a strided accumulation), in the same GEMM call. Each task owns whole
// rows of its output, and every output element sums its taps in one fixed
// order, so results are bitwise the same for any thread count; the weight
// gradient keeps one partial per fixed range of tasks, added in range order
// (Note [Determinism across thread counts] in ../plan.h).
//
// The weights are prepared once per call, tap-major, each tap's block in
// contiguous panels of 64 output channels (view.cpp, Panels). A planar
// (NCHW) input is copied once, into a padded plane (Note [The padded plane];
// conv_transpose: Note [conv_transpose by output phases]) or, for the row
// form, into pixel memory; each block writes straight into a planar output,
// or route.cpp converts it (benchmarks/NOTES.md items 25 and 27). Every
// buffer, those copies included, counts against the workspace limit; a call
// that would exceed it takes the column path.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "../im2col.h"

namespace convt_ext {

// conv, conv_transpose, the weight gradient, and conv_transpose's backward
// (conv and the weight gradient on the same image).
enum class ViewOp : int { Conv = 0, ConvTranspose = 1, ConvWeight = 2, ConvTransposeBackward = 3 };

// Whether the view path computes this call. `image` is the tensor on the
// image side of `call` (conv's input, conv_transpose's output, the weight
// gradient's input), `windows` the one on the window side; `c_image` and
// `c_windows` their channel counts. The path setting (set_conv_path) decides:
// "columns" never, "view" wherever the path can run (float32 on a CPU where
// the ukernel runs, float32 convolutions in IEEE float32, within the
// workspace limit), "auto" where it also wins (view_rule).
// `*_pixels`: whether that tensor is in pixel memory already (the output:
// whether torch's format for it is channels-last); `pointwise`: a 1x1
// kernel, stride 1, no padding.
bool view_takes(ViewOp op, const at::Tensor& like, const Window3& call, int64_t c_image,
                int64_t c_windows, int64_t groups, bool image_pixels, bool windows_pixels,
                bool output_pixels, bool pointwise);

// The "auto" rule, as a function of its inputs, for tests on any machine:
// `dims` spatial dimensions, `overlap` a kernel larger than its stride.
bool view_rule(ViewOp op, bool avx512, bool image_pixels, bool windows_pixels, int64_t dims,
               bool overlap, int64_t cg_image, int64_t cg_windows, bool pointwise);

// Whether t (N, C, *spatial) is in pixel memory, (N, *spatial, C) contiguous.
bool pixel_memory(const at::Tensor& t);

// conv: (N, C_out, *windows), in pixel memory, or planar with `planar_out`
// where the path writes it so (route.cpp converts what is left).
at::Tensor conv_view(const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups,
                     bool planar_out);

// conv_transpose: (N, C_out, *image), in pixel memory, or planar with
// `planar_out` where the path writes it so (route.cpp converts what is left).
at::Tensor conv_transpose_view(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const Window3& call,
                               int64_t groups, bool planar_out);

// The weight gradient: a contiguous tensor of weight_size.
at::Tensor conv_weight_view(const at::Tensor& input, const at::Tensor& grad_output,
                            const Window3& call, int64_t groups, at::IntArrayRef weight_size);

// The path setting: "auto", "benchmark", "view" or "columns"
// (CONVT_EXT_CONV_PATH). "benchmark" times both paths on a call's first use
// of its geometry and keeps the faster for the process, as
// torch.backends.cudnn.benchmark does; two processes may then choose
// differently, so under torch.use_deterministic_algorithms(True) it acts as
// "auto".
void set_conv_path(const std::string& setting);
std::string conv_path();

// Whether this call's path is chosen by timing (route.cpp asks after
// view_takes said the view path can run), and the call's key for it.
bool path_benchmark();
std::vector<int64_t> path_key(ViewOp op, const Window3& call, int64_t c_image, int64_t c_windows,
                              int64_t groups, bool image_pixels, bool windows_pixels,
                              bool output_pixels);
// The choice kept for a key, if any; and keeping one (the first kept for a
// key stays, whatever another thread timed meanwhile): whether it is the view.
std::optional<bool> kept_path(const std::vector<int64_t>& key);
bool keep_path(const std::vector<int64_t>& key, double view_s, double columns_s);

// Benchmark mode's choice for one call: the kept one, or both timed (twice
// each, the faster time of each) and the faster kept; returns its result.
template <typename R, typename View, typename Columns>
R by_timing(const std::vector<int64_t>& key, const View& view, const Columns& columns) {
  if (const std::optional<bool> known = kept_path(key)) return *known ? view() : columns();
  R result[2];
  double best[2] = {1e300, 1e300};
  for (int round = 0; round < 2; ++round) {
    for (int p = 0; p < 2; ++p) {
      const auto t0 = std::chrono::steady_clock::now();
      result[p] = p == 0 ? view() : columns();
      best[p] = std::min(best[p], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  return keep_path(key, best[0], best[1]) ? result[0] : result[1];
}

// What engine_info()["path"] reports.
struct PathReport {
  std::string setting;
  bool view_available = false;  // the ukernel runs float32 here
  int64_t view_calls = 0, column_calls = 0;  // CPU convolutions each path ran
  struct Timed {
    std::string op;
    std::vector<int64_t> key;
    double view_s, columns_s;
    bool view;
  };
  std::vector<Timed> benchmarked;  // benchmark mode's choices
};
PathReport path_report();
// Counts one CPU convolution call on the column path.
void count_column_call(const at::Tensor& like);

}  // namespace convt_ext
