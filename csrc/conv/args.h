// The convolutions' argument rules, output sizes and memory format: what a
// call means, before any path computes it (route.cpp asks here first).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "../checks.h"

namespace convt_ext {

// conv's arguments checked; its windows per dimension go to `windows`, and
// the result is the relation of the whole call (Window3).
Window3 check_conv(const char* op, int dims, const at::Tensor& input, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   int64_t* windows);

// conv_transpose's arguments checked (for the op and for its backward): the
// output's spatial sizes go to `image`, and the result is the relation of
// the output image whose windows are the input's pixels.
Window3 check_conv_transpose(const char* op, int dims, const at::Tensor& input,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef output_padding, int64_t groups,
                             at::IntArrayRef dilation, int64_t* image);

// The weight gradient's arguments checked: the relation of the input image
// whose windows are grad_output's positions (which may be fewer than the
// input has: conv_transpose with output_padding >= stride).
Window3 check_conv_weight(const char* op, int dims, const at::Tensor& input,
                          const at::Tensor& grad_output, at::IntArrayRef weight_size,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups);

// Note [Memory format] (args.cpp): torch's own choice of the output's memory
// format for the same convolution; `transposed` with conv_transpose's
// arguments.
at::MemoryFormat output_format(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                               at::IntArrayRef output_padding, int64_t groups);
at::MemoryFormat conv_format(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
// torch.nn.grad's: that of the convolution with a new, contiguous weight.
at::MemoryFormat conv_weight_format(const at::Tensor& input, at::IntArrayRef weight_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups);

// The channels-last format of a 4-d (2 spatial dimensions) or 5-d tensor.
at::MemoryFormat channels_last_of(int64_t dim);

// Whether a 1x1 layer (`pointwise`) reads its input's pixels in place as the
// rows of its GEMMs: a 2-d or 3-d image with channels in channels-last
// memory. The routes ask this of the operand, never torch's format choice
// (Note [Memory format]).
bool reads_pixel_rows(const at::Tensor& input, bool pointwise);

// Whether t (N, C, *spatial) is in pixel memory, (N, *spatial, C) contiguous.
bool pixel_memory(const at::Tensor& t);

// A new (N, C, *spatial[3 - dims:]) tensor, planar or in pixel memory.
at::Tensor empty_output(bool planar, int64_t n, int64_t c, const int64_t* spatial, int dims,
                        const at::TensorOptions& options);

// t in pixel memory, with its own shape: a view where it is already.
at::Tensor in_pixels(const at::Tensor& t);

// The input in planar (NCHW) memory.
at::Tensor planar(const at::Tensor& input);

// t with the strides torch gives a new tensor of format `fmt`.
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt);

// (n, c, *spatial[0:dims]).
std::vector<int64_t> shape_of(int64_t n, int64_t c, const int64_t* spatial, int dims);

// A 1x1 kernel with stride 1 and no padding: im2col is the identity, so the
// image (its window positions laid out as its pixels) is its own column matrix.
bool pointwise(at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding);

}  // namespace convt_ext
