// The device-specific part of convt_ext: two data-movement kernels per device.
//
// Everything else (argument checks, allocation, the GEMMs through ATen) is the
// same code on every device and lives in im2col.cpp and conv.cpp. Each device
// backend (cpu/im2col_cpu.cpp, cuda/im2col_cuda.cu) fills in a WindowKernels
// table at load time; a build without the CUDA path simply has no CUDA entry,
// and window_kernels() then says how to rebuild.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include "im2col.h"

namespace convt_ext {

struct WindowKernels {
  // cols[n, (c, ki, kj), (oh, ow)] = image[n, c, ih, iw], zero where the tap
  // reads padding. image: (N, C, H, W) with any strides. cols: (N, C*kh*kw,
  // OH*OW), any strides, written completely (no zero fill needed first).
  void (*im2col)(const at::Tensor& image, const at::Tensor& cols, const Window<2>& w);
  // image[n, c, ih, iw] = bias[c] (0 if bias is undefined) + the sum of its
  // taps in cols, accumulated per element in a fixed (ki, kj) order, in at
  // least float32. image: (N, C, H, W), any strides, written completely.
  void (*col2im)(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window<2>& w);
};

// Called once per backend from a static initialiser.
void register_window_kernels(c10::DeviceType type, WindowKernels kernels);

// The kernels for a device; throws a clear error when this build lacks them.
const WindowKernels& window_kernels(c10::DeviceType type);

// Whether a backend registered itself (used by build_info).
bool has_window_kernels(c10::DeviceType type);

}  // namespace convt_ext
