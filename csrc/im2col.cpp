// The im2col and col2im ops: argument checks, allocation, then the device's
// kernel from the WindowKernels table. The same code serves every device.
#include "ops.h"

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <array>
#include <mutex>

#include "checks.h"
#include "kernels.h"

namespace convt_ext {

namespace {
// A function-local table, so registration from other translation units'
// static initialisers cannot run before it exists.
std::array<WindowKernels, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>&
kernel_table() {
  static std::array<WindowKernels,
                    static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
      table{};
  return table;
}
}  // namespace

void register_window_kernels(c10::DeviceType type, WindowKernels kernels) {
  kernel_table()[static_cast<size_t>(type)] = kernels;
}

bool has_window_kernels(c10::DeviceType type) {
  return kernel_table()[static_cast<size_t>(type)].im2col != nullptr;
}

const WindowKernels& window_kernels(c10::DeviceType type) {
  const WindowKernels& k = kernel_table()[static_cast<size_t>(type)];
  TORCH_CHECK(k.im2col != nullptr, "convt_ext was built without support for ",
              c10::DeviceTypeName(type), " tensors.",
              type == c10::DeviceType::CUDA
                  ? " Rebuild it with the CUDA toolkit: CUDA_HOME=/path/to/cuda FORCE_CUDA=1 "
                    "pip install --no-build-isolation --force-reinstall . (see the README)"
                  : "");
  return k;
}

void im2col_into(const at::Tensor& image, const at::Tensor& cols, const Window<2>& w) {
  // An empty image still has columns to fill (with padding) when the windows
  // lie in the padding entirely, as bands of conv.cpp can.
  if (cols.numel() == 0) return;
  window_kernels(image.device().type()).im2col(image, cols, w);
}

void col2im_into(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window<2>& w) {
  if (image.numel() == 0) return;
  window_kernels(image.device().type()).col2im(cols, bias, image, w);
}

at::Tensor im2col(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                  at::IntArrayRef padding, at::IntArrayRef stride) {
  constexpr const char* op = "im2col";
  TORCH_CHECK_VALUE(input.dim() == 3 || input.dim() == 4, op,
                    ": input must be 3-d (C, H, W) or 4-d (N, C, H, W), but got a ", input.dim(),
                    "-d tensor");
  check_floating(op, "input", input);
  check_window_args(op, kernel_size, stride, padding, dilation);
  const bool batched = input.dim() == 4;
  const at::Tensor x = batched ? input : input.unsqueeze(0);
  TORCH_CHECK_VALUE(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
                    ": input must have non-zero channels, height and width (only the batch may "
                    "be empty), but got shape ",
                    input.sizes());
  int64_t windows[2];
  window_counts(op, "input", x.sizes().slice(2), kernel_size, stride, padding, dilation, windows);
  const Window<2> w = make_window(x.size(0), x.size(1), x.sizes().slice(2), windows, kernel_size,
                                  stride, padding, dilation);
  c10::DeviceGuard guard(x.device());
  at::Tensor cols = at::empty({w.batch, w.rows(), w.window_numel()}, x.options());
  im2col_into(x, cols, w);
  return batched ? cols : cols.squeeze(0);
}

at::Tensor col2im(const at::Tensor& input, at::IntArrayRef output_size,
                  at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef padding,
                  at::IntArrayRef stride) {
  constexpr const char* op = "col2im";
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, op,
                    ": input must be 2-d (C*kh*kw, L) or 3-d (N, C*kh*kw, L), but got a ",
                    input.dim(), "-d tensor");
  check_floating(op, "input", input);
  check_ints(op, "output_size", output_size, 2, 1);
  check_window_args(op, kernel_size, stride, padding, dilation);
  const bool batched = input.dim() == 3;
  const at::Tensor cols = batched ? input : input.unsqueeze(0);
  const int64_t kernel_numel = kernel_size[0] * kernel_size[1];
  TORCH_CHECK_VALUE(cols.size(1) > 0 && cols.size(1) % kernel_numel == 0, op,
                    ": input's dimension ", batched ? 1 : 0,
                    " (C*kh*kw) must be a non-zero multiple of the product of kernel_size=",
                    fmt(kernel_size), ", but got shape ", input.sizes());
  int64_t windows[2];
  window_counts(op, "output_size", output_size, kernel_size, stride, padding, dilation, windows);
  TORCH_CHECK_VALUE(cols.size(2) == windows[0] * windows[1], op, ": input's dimension ",
                    batched ? 2 : 1, " (L) must equal the number of sliding windows, ",
                    windows[0], "*", windows[1], "=", windows[0] * windows[1],
                    ", for output_size=", fmt(output_size), ", kernel_size=", fmt(kernel_size),
                    ", dilation=", fmt(dilation), ", padding=", fmt(padding), ", stride=",
                    fmt(stride), "; but got shape ", input.sizes());
  const Window<2> w = make_window(cols.size(0), cols.size(1) / kernel_numel, output_size, windows,
                                  kernel_size, stride, padding, dilation);
  c10::DeviceGuard guard(cols.device());
  at::Tensor image =
      at::empty({w.batch, w.channels, output_size[0], output_size[1]}, cols.options());
  col2im_into(cols, at::Tensor(), image, w);
  return batched ? image : image.squeeze(0);
}

}  // namespace convt_ext
