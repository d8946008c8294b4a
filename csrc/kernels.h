// The device-specific part of convt_ext: two data-movement kernels per
// device, registered with the dispatcher as the private ops
// convt_ext::_im2col_into and convt_ext::_col2im_into, one kernel per
// dispatch key (cpu/im2col_cpu.cpp for CPU, cuda/im2col_cuda.cu for CUDA).
//
// Everything else (argument checks, allocation, the GEMMs) is the same code
// on every device and lives in im2col.cpp and conv/; it reaches the kernels
// through im2col_into and col2im_into (ops.h), which redispatch to the
// tensors' backend key. This header holds what the kernels share:
//   _im2col_into(image, cols, window): cols[n, (c, k_off), o] = image[n, c, i],
//     zero where the tap reads padding. image: (N, C, I0, I1, I2), lifted to
//     three spatial dimensions (Note [N-d by lifting]), any strides. cols:
//     (N, C*prod(k), prod(windows)), any strides, written completely.
//   _col2im_into(cols, bias, image, window): image[n, c, i] = bias[c] (0
//     without a bias) + the sum of its taps in cols, accumulated per element
//     in a fixed, row-major k_off order, in at least float32 (dtypes.h's
//     sum_t). image: lifted, any strides, written completely.
// `window` is the Window3 as a list (pack_window / unpack_window).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <array>
#include <cstdlib>

#include "dtypes.h"
#include "im2col.h"

namespace convt_ext {

// A Window3 as the int list the private ops take, and back.
constexpr size_t kPackedWindow = 2 + 6 * kMaxDims;
inline std::array<int64_t, kPackedWindow> pack_window(const Window3& w) {
  std::array<int64_t, kPackedWindow> v{};
  v[0] = w.batch;
  v[1] = w.channels;
  for (int i = 0; i < kMaxDims; ++i) {
    v[2 + i] = w.image[i];
    v[2 + kMaxDims + i] = w.windows[i];
    v[2 + 2 * kMaxDims + i] = w.kernel[i];
    v[2 + 3 * kMaxDims + i] = w.stride[i];
    v[2 + 4 * kMaxDims + i] = w.padding[i];
    v[2 + 5 * kMaxDims + i] = w.dilation[i];
  }
  return v;
}

inline Window3 unpack_window(at::IntArrayRef v) {
  TORCH_INTERNAL_ASSERT(v.size() == kPackedWindow, "a packed window has ", kPackedWindow,
                        " values, but got ", v.size());
  Window3 w{};
  w.batch = v[0];
  w.channels = v[1];
  for (int i = 0; i < kMaxDims; ++i) {
    w.image[i] = v[2 + i];
    w.windows[i] = v[2 + kMaxDims + i];
    w.kernel[i] = v[2 + 2 * kMaxDims + i];
    w.stride[i] = v[2 + 3 * kMaxDims + i];
    w.padding[i] = v[2 + 4 * kMaxDims + i];
    w.dilation[i] = v[2 + 5 * kMaxDims + i];
  }
  return w;
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

}  // namespace convt_ext
