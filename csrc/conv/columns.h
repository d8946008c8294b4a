// The column path: each convolution as im2col/col2im + GEMMs, planned under
// the workspace limit (Note [Column plans and the workspace limit] in
// ../plan.h), the same code on every device and in every dimension. Every
// argument here is checked already (args.h); route.cpp chooses the path.
//
// Per group g (docs/relationships.md):
//   conv            y_g  = W_g   . im2col(x)_g  + b_g
//   conv_transpose  y    = col2im(W_g^T . x_g)  + b        (bias fused into col2im)
//   conv_weight     dW_g = sum_n dy_g . im2col(x)_g^T
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "../im2col.h"

namespace convt_ext {

// Every path plans with the `policy` it is given (Note [Device policy] in
// ../plan.h): the policy of the op's device.
struct DevicePolicy;

// conv into y, (N, C_out, L): a planar output's view, or (with one group)
// the transposed view of a channels_last output's. `call` is the relation of
// the whole call; `image` planar (NCHW).
void conv_columns(const at::Tensor& image, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups,
                  const at::Tensor& y, bool pointwise, const DevicePolicy& policy);

// conv_transpose into the planar output `out` (N, C_out, *image).
void conv_transpose_columns(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const Window3& call,
                            int64_t groups, const at::Tensor& out, bool pointwise,
                            const DevicePolicy& policy);

// The weight gradient, (G, C_out/G, C_in/G*prod(k)), planar: by the pixel
// rows of a 1x1 layer's channels-last input (`pixel_rows_in`, args.h's
// reads_pixel_rows), or the wide path, or blocks of columns.
at::Tensor conv_weight_columns(const at::Tensor& input, const at::Tensor& grad_output,
                               const Window3& call, int64_t groups, bool pointwise,
                               bool pixel_rows_in, const DevicePolicy& policy);

// Both gradients of conv_transpose from one im2col of grad_output (Note [One
// column buffer for conv_transpose's backward]), planar.
std::tuple<at::Tensor, at::Tensor> conv_transpose_backward_columns(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const Window3& call, int64_t groups, bool pointwise, const DevicePolicy& policy);

// A 1x1 layer (stride 1, no padding) on a channels_last input: the image is
// the (N*L, C) matrix of its pixels' rows, and each op is one GEMM, batched
// over the groups, on such matrices, channels_last by construction (Note
// [Memory format]).
at::Tensor conv_pixel_rows(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t groups,
                           at::Tensor out, const DevicePolicy& policy);
at::Tensor conv_transpose_pixel_rows(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t groups,
                                     at::Tensor out, const DevicePolicy& policy);
}  // namespace convt_ext
