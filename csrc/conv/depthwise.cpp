// The depthwise path's plan (depthwise.h): which calls it takes, the
// layouts it reads and writes, and the call of the device's kernel.
#include "depthwise.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "../kernels.h"
#include "../ops.h"
#include "../plan.h"
#include "args.h"

namespace convt_ext {

namespace {

void depthwise_into(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& out, const Window3& call, int64_t groups, bool transposed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("convt_ext::_depthwise_into", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, at::IntArrayRef, int64_t, bool)>();
  op.redispatch(backend_of(input), lift(input), lift(weight), bias, lift(out), pack_window(call), groups,
                transposed);
}

// The layout a call computes in: the input's pixel memory where it has it,
// planar otherwise (the kernels read every layout, fastest these two).
at::Tensor in_its_layout(const at::Tensor& t, bool pixels) {
  return pixels ? in_pixels(t) : t.contiguous();
}

// The floats of one task's padded input planes on the CPU (Note [Phase
// planes], Note [conv_transpose by output phases]), bounded from above: c
// channels of the image padded on both sides and rounded up to whole
// strides, plus the taps' reach, in each dimension.
double padded_floats(const Window3& w, int64_t c) {
  double floats = double(c);
  for (int d = 0; d < kMaxDims; ++d) {
    floats *= double(std::max(w.image[d], w.windows[d])) + 2.0 * double(w.padding[d]) + double(w.stride[d]) +
              double(w.kernel[d] - 1) * double(w.dilation[d]) + 1.0;
  }
  return floats;
}

}  // namespace

bool depthwise_rule(ConvOp op, bool cuda, bool avx512, bool pixels, int64_t ci, int64_t cw) {
  if (!cuda) {
    // With AVX-512 the vector loops (cpu/depthwise_cpu.cpp) beat the paths
    // "auto" took otherwise up to 16 channels per group on both sides in
    // planar memory, forward and forward+backward; in pixel memory up to 15,
    // and up to 16 on one side: at 16 on both the view path wins there
    // (benchmarks/NOTES.md items 29, 35 and 36). Their AVX2 and default
    // builds keep the 64-byte vectors, in two or four registers each (32 or
    // 16 bytes wide), and run 3-10x slower against torch (item 35): there
    // they win only on depthwise layers with one channel per group on both
    // sides.
    if (!avx512) return ci == 1 && cw == 1;
    return std::max(ci, cw) <= 16 && (!pixels || std::min(ci, cw) < 16);
  }
  // On a GPU the forward sums run one thread per output element; the weight
  // gradient's element sums over the whole batch in one thread, which
  // cuBLAS's batched GEMMs outrun. Unmeasured: no GPU was lent.
  switch (op) {
    case ConvOp::Conv:
      return ci == 1;
    case ConvOp::ConvTranspose:
      return cw == 1;
    default:
      return false;
  }
}

Offer depthwise_offer(ConvOp op, const at::Tensor& like, const Window3& call, int64_t c_image,
                      int64_t c_windows, int64_t groups, bool cpu_rules) {
  if (call.batch == 0 || c_image == 0 || c_windows == 0 || call.image_numel() == 0 ||
      call.window_numel() == 0 || !(like.is_cpu() || like.is_cuda())) {
    return {};
  }
  const int64_t ci = c_image / groups, cw = c_windows / groups;
  // The sum of an output element runs over ci (conv) or cw (conv_transpose)
  // channels; the weight gradient's elements are ci x cw per group.
  const bool small = op == ConvOp::Conv            ? ci <= kDepthwiseChannels
                     : op == ConvOp::ConvTranspose ? cw <= kDepthwiseChannels
                                                   : ci <= kDepthwiseChannels && cw <= kDepthwiseChannels;
  if (!small || padded_floats(call, std::max(ci, cw)) * tasks_at_once(like) * 4.0 > double(workspace_limit())) {
    return {};
  }
  // Dense layers (one group) are the other paths' to win.
  return {true, groups > 1 && depthwise_rule(op, !cpu_rules, depthwise_cpu_avx512(), pixel_memory(like), ci, cw)};
}

at::Tensor conv_depthwise(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups) {
  const bool pixels = pixel_memory(input);
  const int dims = static_cast<int>(input.dim()) - 2;
  at::Tensor out = empty_output(!pixels, call.batch, weight.size(0), call.windows, dims, input.options());
  depthwise_into(in_its_layout(input, pixels), weight, bias, out, call, groups, false);
  return out;
}

at::Tensor conv_transpose_depthwise(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const Window3& call,
                                    int64_t groups, int64_t c_out) {
  const bool pixels = pixel_memory(input);
  const int dims = static_cast<int>(input.dim()) - 2;
  at::Tensor out = empty_output(!pixels, call.batch, c_out, call.image, dims, input.options());
  depthwise_into(in_its_layout(input, pixels), weight, bias, out, call, groups, true);
  return out;
}

at::Tensor conv_weight_depthwise(const at::Tensor& input, const at::Tensor& grad_output,
                                 const Window3& call, int64_t groups, at::IntArrayRef weight_size) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("convt_ext::_depthwise_weight_into", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::IntArrayRef, int64_t)>();
  const bool pixels = pixel_memory(input);
  at::Tensor grad_weight = at::empty(weight_size, input.options());
  op.redispatch(backend_of(input), lift(in_its_layout(input, pixels)),
                lift(in_its_layout(grad_output, pixels)), lift(grad_weight), pack_window(call), groups);
  return grad_weight;
}

}  // namespace convt_ext
