// The ops convt_ext registers with the dispatcher (see ops.cpp for schemas).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "im2col.h"

namespace convt_ext {

// F.unfold: (N, C, H, W) or (C, H, W) -> (N, C*kh*kw, L) or (C*kh*kw, L).
at::Tensor im2col(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                  at::IntArrayRef padding, at::IntArrayRef stride);

// F.fold, the adjoint of im2col.
at::Tensor col2im(const at::Tensor& input, at::IntArrayRef output_size,
                  at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef padding,
                  at::IntArrayRef stride);

// F.conv2d, batched (N, C, H, W) only; the Python layer handles unbatched
// input and string padding.
at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// F.conv_transpose2d (note: groups before dilation, as in torch).
at::Tensor conv_transpose2d(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef output_padding,
                            int64_t groups, at::IntArrayRef dilation);

// The weight gradient of conv2d, sum_n grad_output[n] . im2col(input[n])^T per
// group; also the weight gradient of conv_transpose2d with the roles of the
// two tensors swapped. grad_output may cover fewer windows than input has
// (conv_transpose2d with output_padding >= stride); those are left out.
at::Tensor conv2d_weight(const at::Tensor& input, const at::Tensor& grad_output,
                         at::IntArrayRef weight_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The (row, column) indices of the nonzeros of the im2col selection matrix U
// of one channel, an int64 (2, nnz) tensor (see matrix.cpp).
at::Tensor im2col_indices(at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                          at::IntArrayRef dilation, at::IntArrayRef padding,
                          at::IntArrayRef stride);

// The raw kernels behind the ops, for the convolutions' orchestration: they
// skip argument checks and write into caller-provided tensors.
void im2col_into(const at::Tensor& image, const at::Tensor& cols, const Window<2>& w);
void col2im_into(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window<2>& w);

// Bytes the convolutions may spend on one column buffer.
void set_workspace_limit(int64_t bytes);
int64_t workspace_limit();

}  // namespace convt_ext
