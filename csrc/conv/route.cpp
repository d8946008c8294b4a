// conv, conv_transpose and the shared weight gradient, in 1, 2 and 3 spatial
// dimensions: each op checks its arguments and asks torch for the output's
// memory format (args.h), then route() (path.h) says which path computes it:
//   - columns: im2col/col2im + GEMMs (columns.h); a 1x1 layer (stride 1, no
//     padding) on a channels_last input reads its pixels' rows in place as
//     the GEMM operands;
//   - the view: a float32 CPU call, per-tap GEMMs on strided views of pixel
//     (channels-last) memory, no columns copied (view.h);
//   - depthwise: few channels per group, a direct sum over taps (depthwise.h).
// conv_transpose is conv's input gradient taken as an op of its own, so the
// two are adjoints. Every GEMM goes through the engine layer (../gemm.h),
// every geometry is lifted to three spatial dimensions (Note [N-d by
// lifting] in ../im2col.h), and this code is the same on every device.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>

#include <vector>

#include "../ops.h"
#include "../plan.h"
#include "args.h"
#include "columns.h"
#include "depthwise.h"
#include "view.h"

namespace convt_ext {

namespace {

// The output of a convolution over no input channels: C_out channels of the
// bias (or zeros), the sum over no channels, as the README documents. torch
// gives 0 channels here (F.conv2d((2, 0, 4, 3), (3, 0, 3, 1)) is
// (2, 0, 2, 3)), which drops the weight's out_channels, and refuses
// conv_transpose's empty weight.
at::Tensor bias_only(at::Tensor out, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return out.zero_();
  std::vector<int64_t> shape(out.dim(), 1);
  shape[1] = -1;
  return out.copy_(bias->view(shape).expand_as(out));
}

bool no_output_padding(at::IntArrayRef output_padding) {
  for (int64_t a : output_padding) {
    if (a != 0) return false;
  }
  return true;
}

// The routes of conv, chosen by the input's memory (Note [Memory format] in
// args.cpp); the output in the input's format, or planar.
at::Tensor conv_route(const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups,
                      const std::vector<int64_t>& shape, bool pointwise, const DevicePolicy& policy) {
  if (reads_pixel_rows(input, pointwise)) {
    return conv_pixel_rows(input, weight, bias, groups,
                           at::empty(shape, input.options().memory_format(channels_last_of(input.dim()))),
                           policy);
  }
  // With one group the GEMMs store a channels-last output (for a
  // channels-last input) through the transposed view of each sample's
  // (C_out, L) matrix; grouped (bmm) stores that way are slow, so those
  // convert at the end.
  const at::MemoryFormat stored = input.suggest_memory_format();
  at::Tensor out = at::empty(
      shape, input.options().memory_format(groups == 1 ? stored : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (input.size(1) == 0) return bias_only(out, bias);
  conv_columns(planar(input), weight, bias, call, groups,
               out.view({shape[0], shape[1], call.window_numel()}), pointwise, policy);
  return out;
}

// A call as the paths see it: which op, the channels of its image and window
// sides, which tensors are in pixel memory already (the output: whether
// torch's format for it is channels-last), and whether it is 1x1.
struct Sides {
  ConvOp op;
  int64_t c_image, c_windows;
  bool image_pixels, windows_pixels, output_pixels, pointwise;
};

// route()'s offer and key for a call: the view where the policy has it
// (never for a 1x1 layer whose pixel rows the column path reads in place),
// the depthwise path, and the columns, which run everything.
template <typename R, typename Run>
R route_call(const Sides& s, const at::Tensor& like, const Window3& call, int64_t groups, bool rows,
             const DevicePolicy& policy, const Run& run) {
  const auto offer = [&](Path p) -> Offer {
    switch (p) {
      case Path::View:
        if (!policy.view || rows) return {};
        return view_offer(s.op, like, call, s.c_image, s.c_windows, groups, s.image_pixels,
                          s.windows_pixels, s.output_pixels, s.pointwise);
      case Path::Depthwise:
        return depthwise_offer(s.op, like, call, s.c_image, s.c_windows, groups, policy.cpu_rules);
      default:
        return {true, true};
    }
  };
  const auto key = [&] {
    return path_key(s.op, call, s.c_image, s.c_windows, groups, s.image_pixels, s.windows_pixels,
                    s.output_pixels);
  };
  return route<R>(s.op, like, offer, key, run);
}

}  // namespace

at::Tensor conv(const char* op, int dims, const at::Tensor& input, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                const DevicePolicy& policy) {
  int64_t windows[kMaxDims];
  const Window3 call =
      check_conv(op, dims, input, weight, bias, stride, padding, dilation, groups, windows);
  c10::DeviceGuard guard(input.device());
  const at::MemoryFormat format =
      conv_format(input, weight, bias, stride, padding, dilation, groups);
  const bool one_to_one = pointwise(weight.sizes().slice(2), stride, padding);
  const bool cl = format != at::MemoryFormat::Contiguous;
  const Sides sides{ConvOp::Conv, input.size(1), weight.size(0), pixel_memory(input), false, cl, one_to_one};
  return route_call<at::Tensor>(sides, input, call, groups, reads_pixel_rows(input, one_to_one), policy,
                                [&](Path p) {
    switch (p) {
      case Path::View:
        return in_format(conv_view(input, weight, bias, call, groups, !cl), format);
      case Path::Depthwise:
        return in_format(conv_depthwise(input, weight, bias, call, groups), format);
      default:
        return in_format(conv_route(input, weight, bias, call, groups,
                                    shape_of(input.size(0), weight.size(0), windows, dims), one_to_one,
                                    policy),
                         format);
    }
  });
}

at::Tensor conv_transpose(const char* op, int dims, const at::Tensor& input,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef output_padding, int64_t groups,
                          at::IntArrayRef dilation, const DevicePolicy& policy) {
  int64_t image[kMaxDims];
  const Window3 call = check_conv_transpose(op, dims, input, weight, bias, stride, padding,
                                            output_padding, groups, dilation, image);
  const at::IntArrayRef kernel = weight.sizes().slice(2);
  checked_numel(op, "the output", {input.size(0), call.channels, call.image_numel()},
                Geometry{kernel, stride, padding, dilation});
  c10::DeviceGuard guard(input.device());
  const at::MemoryFormat format = output_format(input, weight, bias, stride, padding, dilation,
                                                true, output_padding, groups);
  const std::vector<int64_t> shape = shape_of(input.size(0), call.channels, image, dims);
  if (c10::multiply_integers(shape) == 0) return in_format(at::empty(shape, input.options()), format);
  if (input.size(1) == 0) return in_format(bias_only(at::empty(shape, input.options()), bias), format);
  const bool one_to_one = pointwise(kernel, stride, padding) && no_output_padding(output_padding);
  const bool rows = reads_pixel_rows(input, one_to_one);
  const bool cl = format != at::MemoryFormat::Contiguous;
  const Sides sides{ConvOp::ConvTranspose, call.channels, input.size(1), false, pixel_memory(input), cl,
                    one_to_one};
  return route_call<at::Tensor>(sides, input, call, groups, rows, policy, [&](Path p) {
    switch (p) {
      case Path::View:
        return in_format(conv_transpose_view(input, weight, bias, call, groups, !cl), format);
      case Path::Depthwise:
        return in_format(conv_transpose_depthwise(input, weight, bias, call, groups, call.channels), format);
      default:
        if (rows) {
          const at::MemoryFormat pixels = channels_last_of(input.dim());
          return in_format(conv_transpose_pixel_rows(input, weight, bias, groups,
                                                     at::empty(shape, input.options().memory_format(pixels)),
                                                     policy),
                           format);
        }
        at::Tensor out = at::empty(shape, input.options());
        conv_transpose_columns(input, weight, bias, call, groups, out, one_to_one, policy);
        return in_format(out, format);
    }
  });
}

// As torch.nn.grad.conv{1,2,3}d_weight, whose weight is contiguous: the
// format follows the input alone.
at::Tensor conv_weight(const char* op, int dims, const at::Tensor& input,
                       const at::Tensor& grad_output, at::IntArrayRef weight_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, const DevicePolicy& policy) {
  const Window3 call = check_conv_weight(op, dims, input, grad_output, weight_size, stride,
                                         padding, dilation, groups);
  c10::DeviceGuard guard(input.device());
  const at::MemoryFormat format =
      conv_weight_format(input, weight_size, stride, padding, dilation, groups);
  // The input is its own column matrix only if grad_output covers all its
  // windows (it may be short of them: conv_transpose's output_padding).
  bool one_to_one = pointwise(weight_size.slice(2), stride, padding);
  for (int i = 0; i < dims; ++i) one_to_one &= grad_output.size(2 + i) == input.size(2 + i);
  const bool rows = reads_pixel_rows(input, one_to_one);
  const Sides sides{ConvOp::ConvWeight, input.size(1), grad_output.size(1), pixel_memory(input),
                    pixel_memory(grad_output), true, one_to_one};
  return route_call<at::Tensor>(sides, input, call, groups, rows, policy, [&](Path p) {
    switch (p) {
      case Path::View:
        return in_format(conv_weight_view(input, grad_output, call, groups, weight_size), format);
      case Path::Depthwise:
        return in_format(conv_weight_depthwise(input, grad_output, call, groups, weight_size), format);
      default:
        return in_format(
            conv_weight_columns(input, grad_output, call, groups, one_to_one, rows, policy).view(weight_size),
            format);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> conv_transpose_backward(
    const char* op, int dims, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
    const DevicePolicy& policy) {
  // The columns of the input's windows over dy: conv(dy, W) cropped to the input.
  int64_t image[kMaxDims];
  const Window3 call = check_conv_transpose(op, dims, input, weight, std::nullopt, stride,
                                            padding, output_padding, groups, dilation, image);
  check_same(op, "grad_output", grad_output, "input", input);
  const std::vector<int64_t> expected = shape_of(input.size(0), call.channels, image, dims);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected), op,
                    ": grad_output must have the output's shape ", at::IntArrayRef(expected),
                    ", but got ", grad_output.sizes());
  c10::DeviceGuard guard(input.device());
  const bool one_to_one = pointwise(weight.sizes().slice(2), stride, padding) &&
                          no_output_padding(output_padding);
  using Grads = std::tuple<at::Tensor, at::Tensor>;
  // conv's ops on the same relation: the input gradient is conv(dy, W), the
  // weight gradient conv_weight(dy, x); planar, as the fake kernel gives them.
  const Sides sides{ConvOp::ConvTransposeBackward, call.channels, input.size(1),
                    pixel_memory(grad_output), pixel_memory(input), false, one_to_one};
  return route_call<Grads>(sides, input, call, groups, false, policy, [&](Path p) -> Grads {
    switch (p) {
      case Path::View:
        return {conv_view(grad_output, weight, std::nullopt, call, groups, true).contiguous(),
                conv_weight_view(grad_output, input, call, groups, weight.sizes())};
      case Path::Depthwise:
        return {conv_depthwise(grad_output, weight, std::nullopt, call, groups).contiguous(),
                conv_weight_depthwise(grad_output, input, call, groups, weight.sizes())};
      default: {
        auto [grad_input, grad_weight] =
            conv_transpose_backward_columns(grad_output, input, weight, call, groups, one_to_one, policy);
        return {grad_input, grad_weight.view(weight.sizes())};
      }
    }
  });
}

}  // namespace convt_ext
