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

#include <optional>

#include "path.h"

namespace convt_ext {

// What the view path makes of this call (path.h): it runs float32 on a CPU
// where the ukernel runs, float32 convolutions in IEEE float32, within the
// workspace limit; it wins where view_rule says so. `image` is the tensor on
// the image side of `call` (conv's input, conv_transpose's output, the weight
// gradient's input), `windows` the one on the window side; `c_image` and
// `c_windows` their channel counts.
// `*_pixels`: whether that tensor is in pixel memory already (the output:
// whether torch's format for it is channels-last); `pointwise`: a 1x1
// kernel, stride 1, no padding.
Offer view_offer(ConvOp op, const at::Tensor& like, const Window3& call, int64_t c_image,
                int64_t c_windows, int64_t groups, bool image_pixels, bool windows_pixels,
                bool output_pixels, bool pointwise);

// The "auto" rule, as a function of its inputs, for tests on any machine:
// `dims` spatial dimensions, `overlap` a kernel larger than its stride.
bool view_rule(ConvOp op, bool avx512, bool image_pixels, bool windows_pixels, int64_t dims,
               bool overlap, int64_t cg_image, int64_t cg_windows, bool pointwise);

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

}  // namespace convt_ext
