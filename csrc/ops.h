// The ops convt_ext registers with the dispatcher (see ops.cpp for schemas).
// Every op serves 1, 2 and 3 spatial dimensions with one piece of code: the
// number comes from the length of the geometry lists (or the weight's dim).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "im2col.h"

namespace convt_ext {

struct DevicePolicy;  // plan.h

// F.unfold in D dimensions: (N, C, *spatial) or (C, *spatial) ->
// (N, C*prod(k), L) or (C*prod(k), L); D = kernel_size.size().
at::Tensor im2col(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                  at::IntArrayRef padding, at::IntArrayRef stride);

// F.fold in D dimensions, the adjoint of im2col; D = output_size.size().
at::Tensor col2im(const at::Tensor& input, at::IntArrayRef output_size,
                  at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef padding,
                  at::IntArrayRef stride);

// Their out= variants (im2col.out, col2im.out): the result written into the
// caller's tensor of the exact shape, any strides, so a loop can reuse it.
void im2col_out(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                at::IntArrayRef padding, at::IntArrayRef stride, const at::Tensor& out);
void col2im_out(const at::Tensor& input, at::IntArrayRef output_size,
                at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef padding,
                at::IntArrayRef stride, const at::Tensor& out);

// F.convNd, batched (N, C, *spatial) only, D = dims; the Python layer handles
// unbatched input and string padding. `op` names the op in messages. The
// convolutions plan with `policy`: the registered ops pass their input's
// device_policy(), and only a test-only build another (Note [Device policy]).
at::Tensor conv(const char* op, int dims, const at::Tensor& input, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                const DevicePolicy& policy);

// F.conv_transposeNd (note: groups before dilation, as in torch).
at::Tensor conv_transpose(const char* op, int dims, const at::Tensor& input,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef output_padding, int64_t groups,
                          at::IntArrayRef dilation, const DevicePolicy& policy);

// The weight gradient of convNd, sum_n grad_output[n] . im2col(input[n])^T per
// group; also the weight gradient of conv_transposeNd with the roles of the
// two tensors swapped. grad_output may cover fewer windows than input has
// (conv_transpose with output_padding >= stride); those are left out.
at::Tensor conv_weight(const char* op, int dims, const at::Tensor& input,
                       const at::Tensor& grad_output, at::IntArrayRef weight_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, const DevicePolicy& policy);

// Both gradients of conv_transposeNd, input and weight, from one im2col of
// grad_output (Note [One column buffer for conv_transpose's backward]), planar.
std::tuple<at::Tensor, at::Tensor> conv_transpose_backward(
    const char* op, int dims, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
    const DevicePolicy& policy);

// The (row, column) indices of the nonzeros of the im2col selection matrix U
// of one channel, an int64 (2, nnz) tensor (see matrix.cpp).
at::Tensor im2col_indices(at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                          at::IntArrayRef dilation, at::IntArrayRef padding,
                          at::IntArrayRef stride);

// (N, C, *spatial) with its spatial dimensions lifted to three, a view
// (Note [N-d by lifting] in im2col.h).
at::Tensor lift(const at::Tensor& t);

// t.narrow(dim, start, length), or t itself where that is all of it: every
// view costs a dispatcher call and a TensorImpl, and a tiny call makes dozens.
inline at::Tensor part(const at::Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == t.size(dim) ? t : t.narrow(dim, start, length);
}

// The device kernels behind the ops (kernels.h), for the convolutions'
// orchestration: they skip argument checks and write into caller-provided
// tensors. `image` is (N, C, *spatial) for any D <= 3 (lifted here).
void im2col_into(const at::Tensor& image, const at::Tensor& cols, const Window3& w);
void col2im_into(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window3& w);
// The dispatch key set of t's backend, at which the private ops redispatch.
c10::DispatchKeySet backend_of(const at::Tensor& t);


}  // namespace convt_ext
