// Argument rules shared by every op, each with a message that names the
// argument and the rule it breaks. They raise ValueError (TORCH_CHECK_VALUE)
// or TypeError (TORCH_CHECK_TYPE) in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

#include "im2col.h"

namespace convt_ext {

inline std::string fmt(c10::IntArrayRef v) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << ")";
  return s.str();
}

// `name` must hold `count` values, each >= min_value.
inline void check_ints(const char* op, const char* name, c10::IntArrayRef v, size_t count,
                       int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == count, op, ": ", name, " must have ", count, " values, but got ",
                    name, "=", fmt(v));
  for (int64_t x : v) {
    TORCH_CHECK_VALUE(x >= min_value, op, ": ", name, " must be ",
                      min_value == 0 ? "non-negative" : "positive", ", but got ", name, "=",
                      fmt(v));
  }
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                   "but got ",
                   t.scalar_type());
}

// `other` must match `ref` in dtype and device.
inline void check_same(const char* op, const char* name, const at::Tensor& other,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(other.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the ",
                   ref_name, "'s dtype ", ref.scalar_type(), ", but got ", other.scalar_type());
  TORCH_CHECK_VALUE(other.device() == ref.device(), op, ": ", name, " must be on the ", ref_name,
                    "'s device ", ref.device(), ", but got ", other.device());
}

// The common rules of a sliding window; padding may be 0, the rest positive.
inline void check_window_args(const char* op, c10::IntArrayRef kernel_size,
                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation) {
  check_ints(op, "kernel_size", kernel_size, 2, 1);
  check_ints(op, "stride", stride, 2, 1);
  check_ints(op, "padding", padding, 2, 0);
  check_ints(op, "dilation", dilation, 2, 1);
}

// Window positions per dimension for an image; rejects an image that is
// smaller than the dilated kernel even after padding.
inline void window_counts(const char* op, const char* image_name, c10::IntArrayRef image,
                          c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t* counts) {
  for (int i = 0; i < 2; ++i) {
    counts[i] = window_count(image[i], kernel_size[i], stride[i], padding[i], dilation[i]);
    TORCH_CHECK_VALUE(
        counts[i] >= 1, op, ": ", image_name, " of spatial size ", fmt(image),
        " is too small for kernel_size=", fmt(kernel_size), " with dilation=", fmt(dilation),
        " and padding=", fmt(padding), ": the padded size must be at least dilation*(kernel_size-1)+1");
  }
}

inline Window<2> make_window(int64_t batch, int64_t channels, c10::IntArrayRef image,
                             const int64_t* windows, c10::IntArrayRef kernel_size,
                             c10::IntArrayRef stride, c10::IntArrayRef padding,
                             c10::IntArrayRef dilation) {
  Window<2> w{};
  w.batch = batch;
  w.channels = channels;
  for (int i = 0; i < 2; ++i) {
    w.image[i] = image[i];
    w.windows[i] = windows[i];
    w.kernel[i] = kernel_size[i];
    w.stride[i] = stride[i];
    w.padding[i] = padding[i];
    w.dilation[i] = dilation[i];
  }
  return w;
}

}  // namespace convt_ext
