// The im2col and col2im ops: argument checks, allocation, then the device's
// kernel through the dispatcher (kernels.h). The same code serves every device and
// every number of spatial dimensions (Note [N-d by lifting] in im2col.h), and
// every dtype of dtypes.h (Note [Window dtypes]).
#include "ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/TensorOptions.h>

#include <array>
#include <vector>

#include "checks.h"
#include "dtypes.h"
#include "kernels.h"

namespace convt_ext {

at::Tensor lift(const at::Tensor& t) {
  if (t.dim() >= 2 + kMaxDims) return t;
  // One view (size-1 dimensions after the channels), not an unsqueeze each.
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.insert(sizes.begin() + 2, 2 + kMaxDims - t.dim(), 1);
  return t.view(sizes);
}

// The private ops of kernels.h, called at the tensors' backend key: the
// argument checks and autograd are the public ops' business.
c10::DispatchKeySet backend_of(const at::Tensor& t) {
  return c10::DispatchKeySet(c10::computeDispatchKey(t.scalar_type(), t.layout(), t.device()));
}

void im2col_into(const at::Tensor& image, const at::Tensor& cols, const Window3& w) {
  // An empty image still has columns to fill (with padding) when the windows
  // lie in the padding entirely, as blocks of the column path can.
  if (cols.numel() == 0) return;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convt_ext::_im2col_into", "")
          .typed<void(const at::Tensor&, const at::Tensor&, at::IntArrayRef)>();
  op.redispatch(backend_of(image), lift(image), cols, pack_window(w));
}

void col2im_into(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window3& w) {
  if (image.numel() == 0) return;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("convt_ext::_col2im_into", "")
                             .typed<void(const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, at::IntArrayRef)>();
  op.redispatch(backend_of(image), cols, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                lift(image), pack_window(w));
}

namespace {

// The caller's `out` for a result of `shape`, checked before anything is
// written: dtype and device as `input`'s, the exact shape, and memory that
// neither overlaps itself (an expanded tensor) nor `input`. Any strides.
at::Tensor checked_out(const char* op, const at::Tensor& out, at::IntArrayRef shape,
                       const at::Tensor& input) {
  check_same(op, "out", out, "input", input);
  TORCH_CHECK_VALUE(out.sizes() == shape, op, ": out must have shape ", shape, ", but got ",
                    out.sizes());
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": out must not overlap itself (an expanded tensor), but got strides ",
                    out.strides());
  TORCH_CHECK_VALUE(at::get_overlap_status(out, input) == at::MemOverlapStatus::No, op,
                    ": out must not share memory with input");
  // The write, for autograd's checks on tensors saved for a backward.
  out.unsafeGetTensorImpl()->bump_version();
  return out;
}

}  // namespace

namespace {

// im2col, into `out` when given.
at::Tensor im2col_impl(const at::Tensor& input, at::IntArrayRef kernel_size,
                       at::IntArrayRef dilation, at::IntArrayRef padding, at::IntArrayRef stride,
                       const std::optional<at::Tensor>& out) {
  constexpr const char* op = "im2col";
  const int dims = spatial_dims(op, "kernel_size", kernel_size);
  TORCH_CHECK_VALUE(input.dim() == dims + 1 || input.dim() == dims + 2, op, ": input must be ",
                    dims + 1, "-d (C, *spatial) or ", dims + 2, "-d (N, C, *spatial) for ", dims,
                    " spatial dimensions (the length of kernel_size=", fmt(kernel_size),
                    "), but got a ", input.dim(), "-d tensor");
  check_window_dtype(op, "input", input, /*sums=*/false);
  check_window_args(op, dims, kernel_size, stride, padding, dilation);
  const bool batched = input.dim() == dims + 2;
  const at::Tensor x = batched ? input : input.unsqueeze(0);
  for (int64_t d = 1; d < x.dim(); ++d) {
    TORCH_CHECK_VALUE(x.size(d) > 0, op,
                      ": input must have non-zero channels and spatial sizes (only the batch may "
                      "be empty), but got shape ",
                      input.sizes());
  }
  int64_t windows[kMaxDims];
  window_counts(op, "input", x.sizes().slice(2), kernel_size, stride, padding, dilation, windows);
  const Window3 w = make_window(op, x.size(0), x.size(1), x.sizes().slice(2), windows,
                                kernel_size, stride, padding, dilation);
  const std::vector<int64_t> shape{w.batch, w.rows(), w.window_numel()};
  checked_numel(op, "the column matrix", shape, Geometry{kernel_size, stride, padding, dilation},
                x.element_size());
  c10::DeviceGuard guard(x.device());
  at::Tensor cols;
  if (out.has_value()) {
    const at::IntArrayRef wanted = at::IntArrayRef(shape).slice(batched ? 0 : 1);
    cols = checked_out(op, *out, wanted, input);
    if (!batched) cols = cols.unsqueeze(0);
  } else {
    cols = at::empty(shape, x.options());
  }
  im2col_into(x, cols, w);
  return out.has_value() ? *out : batched ? cols : cols.squeeze(0);
}

// col2im, into `out` when given.
at::Tensor col2im_impl(const at::Tensor& input, at::IntArrayRef output_size,
                       at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                       at::IntArrayRef padding, at::IntArrayRef stride,
                       const std::optional<at::Tensor>& out) {
  constexpr const char* op = "col2im";
  const int dims = spatial_dims(op, "output_size", output_size);
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, op,
                    ": input must be 2-d (C*prod(kernel_size), L) or 3-d (N, C*prod(kernel_size), "
                    "L), but got a ",
                    input.dim(), "-d tensor");
  check_window_dtype(op, "input", input, /*sums=*/true);
  check_ints(op, "output_size", output_size, dims, 1);
  check_window_args(op, dims, kernel_size, stride, padding, dilation);
  const bool batched = input.dim() == 3;
  const at::Tensor cols = batched ? input : input.unsqueeze(0);
  const int64_t kernel_numel = checked_numel(op, "kernel_size", kernel_size);
  TORCH_CHECK_VALUE(cols.size(1) > 0 && cols.size(1) % kernel_numel == 0, op,
                    ": input's dimension ", batched ? 1 : 0,
                    " (C*prod(kernel_size)) must be a non-zero multiple of the product of "
                    "kernel_size=",
                    fmt(kernel_size), ", but got shape ", input.sizes());
  int64_t windows[kMaxDims];
  window_counts(op, "output_size", output_size, kernel_size, stride, padding, dilation, windows);
  const int64_t positions =
      checked_numel(op, "the windows", at::IntArrayRef(windows, dims),
                    [&] {
                      return " for output_size=" + fmt(output_size) +
                             geometry(kernel_size, stride, padding, dilation);
                    });
  TORCH_CHECK_VALUE(cols.size(2) == positions, op, ": input's dimension ", batched ? 2 : 1,
                    " (L) must equal the number of sliding windows, ",
                    fmt(at::IntArrayRef(windows, dims)), " = ", positions,
                    ", for output_size=", fmt(output_size), ", kernel_size=", fmt(kernel_size),
                    ", dilation=", fmt(dilation), ", padding=", fmt(padding), ", stride=",
                    fmt(stride), "; but got shape ", input.sizes());
  std::vector<int64_t> shape{cols.size(0), cols.size(1) / kernel_numel};
  shape.insert(shape.end(), output_size.begin(), output_size.end());
  checked_numel(op, "the output", shape, [&] { return " for output_size=" + fmt(output_size); },
                cols.element_size());
  const Window3 w = make_window(op, cols.size(0), cols.size(1) / kernel_numel, output_size,
                                windows, kernel_size, stride, padding, dilation);
  c10::DeviceGuard guard(cols.device());
  at::Tensor image;
  if (out.has_value()) {
    image = checked_out(op, *out, at::IntArrayRef(shape).slice(batched ? 0 : 1), input);
    if (!batched) image = image.unsqueeze(0);
  } else {
    image = at::empty(shape, cols.options());
  }
  col2im_into(cols, at::Tensor(), image, w);
  return out.has_value() ? *out : batched ? image : image.squeeze(0);
}

}  // namespace

at::Tensor im2col(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                  at::IntArrayRef padding, at::IntArrayRef stride) {
  return im2col_impl(input, kernel_size, dilation, padding, stride, std::nullopt);
}

void im2col_out(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                at::IntArrayRef padding, at::IntArrayRef stride, const at::Tensor& out) {
  im2col_impl(input, kernel_size, dilation, padding, stride, out);
}

at::Tensor col2im(const at::Tensor& input, at::IntArrayRef output_size,
                  at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef padding,
                  at::IntArrayRef stride) {
  return col2im_impl(input, output_size, kernel_size, dilation, padding, stride, std::nullopt);
}

void col2im_out(const at::Tensor& input, at::IntArrayRef output_size,
                at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef padding,
                at::IntArrayRef stride, const at::Tensor& out) {
  col2im_impl(input, output_size, kernel_size, dilation, padding, stride, out);
}

}  // namespace convt_ext
