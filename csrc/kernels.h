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

#include <cstdlib>

#include "dtypes.h"
#include "elements.h"
#include "im2col.h"

namespace convt_ext {

struct WindowKernels {
  // cols[n, (c, k_off), o] = image[n, c, i], zero where the tap reads
  // padding. image: (N, C, I0, I1, I2), the call lifted to three spatial
  // dimensions (Note [N-d by lifting]), any strides. cols: (N, C*prod(k),
  // prod(windows)), any strides, written completely (no zero fill first).
  void (*im2col)(const at::Tensor& image, const at::Tensor& cols, const Window3& w);
  // image[n, c, i] = bias[c] (0 if bias is undefined) + the sum of its taps
  // in cols, accumulated per element in a fixed, row-major k_off order, in
  // sum_t (at least float32 for floating types; Note [Window dtypes]). image: (N, C, I0, I1, I2), any strides, written completely.
  void (*col2im)(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window3& w);
};

// Largest element offset reachable in t, plus one (0 for an empty or
// undefined tensor): what an index type must hold to address t.
inline int64_t extent(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return 0;
  int64_t e = 1;
  for (int64_t d = 0; d < t.dim(); ++d) e += (t.size(d) - 1) * std::abs(t.stride(d));
  return e;
}

// A tensor's data as T, the C++ type that dtypes.h's dispatch chose for its
// dtype (for im2col, an unsigned integer of the element's size, which typed
// data_ptr<T>() would refuse).
template <typename T>
const T* data_as(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data_as(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// A lifted image's and a column matrix's strides in a kernel's index type
// (the int32 path only after fits_index() has proven that they fit).
template <typename index_t>
ImageStrides<index_t> image_strides(const at::Tensor& t) {
  return {static_cast<index_t>(t.stride(0)), static_cast<index_t>(t.stride(1)),
          {static_cast<index_t>(t.stride(2)), static_cast<index_t>(t.stride(3)),
           static_cast<index_t>(t.stride(4))}};
}

template <typename index_t>
ColumnStrides<index_t> column_strides(const at::Tensor& t) {
  return {static_cast<index_t>(t.stride(0)), static_cast<index_t>(t.stride(1)),
          static_cast<index_t>(t.stride(2))};
}

// Called once per backend from a static initialiser.
void register_window_kernels(c10::DeviceType type, WindowKernels kernels);

// The kernels for a device; throws a clear error when this build lacks them.
const WindowKernels& window_kernels(c10::DeviceType type);

// Whether a backend registered itself (used by build_info).
bool has_window_kernels(c10::DeviceType type);

}  // namespace convt_ext
