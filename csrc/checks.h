// Argument rules shared by every op, each with a message that names the
// argument and the rule it breaks. They raise ValueError (TORCH_CHECK_VALUE)
// or TypeError (TORCH_CHECK_TYPE) in Python.
//
// Note [Overflow-checked geometry]
// Sizes come from users and may be anything up to 2^63-1. Every size formula
// (window counts, transposed output sizes, element counts) is evaluated here
// in 128-bit arithmetic and must fit in int64 before it is used, and
// make_window() proves that every coordinate the kernels form with the
// relation of im2col.h fits too. So the header's int64 arithmetic never
// wraps, a huge stride cannot reach a division by a wrapped zero, and no
// shape is computed from a wrapped value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "im2col.h"

namespace convt_ext {

using wide_int = __int128;
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

inline std::string fmt(c10::IntArrayRef v) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << (v.size() == 1 ? ",)" : ")");
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

// The spatial dimensions of a call, from the length of its geometry lists.
inline int spatial_dims(const char* op, const char* name, c10::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() >= 1 && v.size() <= size_t(kMaxDims), op, ": ", name,
                    " must have 1, 2 or 3 values (one per spatial dimension), but got ", name,
                    "=", fmt(v));
  return static_cast<int>(v.size());
}

// Exactly the dtypes the convolutions' GEMMs are compiled for; anything else
// (integers, bool, complex, float8) is refused here, not deep inside a GEMM.
// im2col and col2im take more: dtypes.h.
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                       type == at::kBFloat16,
                   op, ": ", name,
                   " must be a float16, bfloat16, float32 or float64 tensor, but got ", type);
}

// `other` must match `ref` in dtype and device.
inline void check_same(const char* op, const char* name, const at::Tensor& other,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(other.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the ",
                   ref_name, "'s dtype ", ref.scalar_type(), ", but got ", other.scalar_type());
  TORCH_CHECK_VALUE(other.device() == ref.device(), op, ": ", name, " must be on the ", ref_name,
                    "'s device ", ref.device(), ", but got ", other.device());
}

// The common rules of a sliding window in D dimensions; padding may be 0,
// the rest positive.
inline void check_window_args(const char* op, size_t dims, c10::IntArrayRef kernel_size,
                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation) {
  check_ints(op, "kernel_size", kernel_size, dims, 1);
  check_ints(op, "stride", stride, dims, 1);
  check_ints(op, "padding", padding, dims, 0);
  check_ints(op, "dilation", dilation, dims, 1);
}

// a*b as an int64, or a ValueError that says what would not fit.
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  const wide_int r = wide_int(a) * b;
  TORCH_CHECK_VALUE(r <= kInt64Max, op, ": ", what, " overflows int64 (", a, " * ", b, ")");
  return static_cast<int64_t>(r);
}

// The geometry arguments, for messages about sizes they make too large.
inline std::string geometry(c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  return " (kernel_size=" + fmt(kernel_size) + ", stride=" + fmt(stride) + ", padding=" +
         fmt(padding) + ", dilation=" + fmt(dilation) + ")";
}

// A message's context, written only when a check fails (TORCH_CHECK reads
// its message arguments then): a string built on every call costs more than
// the rest of a tiny call's checks.
struct Geometry {
  c10::IntArrayRef kernel_size, stride, padding, dilation;
};
inline std::string describe(const char* s) { return s; }
inline std::string describe(const Geometry& g) {
  return geometry(g.kernel_size, g.stride, g.padding, g.dilation);
}
template <typename F, typename = decltype(std::declval<const F&>()())>
std::string describe(const F& f) {
  return f();
}

// The number of elements of a tensor of these sizes, overflow-checked;
// `context` says which arguments made them so large.
// element_bytes: 8 (float64, the widest dtype of the convolutions) unless
// the caller knows its tensor's (im2col and col2im take complex128).
template <typename Context = const char*>
int64_t checked_numel(const char* op, const char* what, c10::IntArrayRef sizes,
                      const Context& context = "", int64_t element_bytes = 8) {
  // Its bytes must fit too.
  wide_int n = 1;
  for (int64_t s : sizes) {
    n *= s;
    TORCH_CHECK_VALUE(n <= kInt64Max / element_bytes, op, ": ", what, " of shape ", fmt(sizes),
                      " would need more than 2^63-1 bytes", describe(context));
  }
  return static_cast<int64_t>(n);
}

// Window positions per dimension for an image (relationship 15, in 128-bit
// arithmetic); rejects an image that is smaller than the dilated kernel even
// after padding, and geometry whose sizes do not fit in int64.
inline void window_counts(const char* op, const char* image_name, c10::IntArrayRef image,
                          c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t* counts) {
  for (size_t i = 0; i < image.size(); ++i) {
    const wide_int padded = wide_int(image[i]) + 2 * wide_int(padding[i]);
    TORCH_CHECK_VALUE(padded <= kInt64Max, op, ": padding=", fmt(padding), " is too large: ",
                      image_name, " size + 2*padding overflows int64");
    const wide_int reach = wide_int(dilation[i]) * (kernel_size[i] - 1) + 1;
    TORCH_CHECK_VALUE(
        reach <= padded, op, ": ", image_name, " of spatial size ", fmt(image),
        " is too small for kernel_size=", fmt(kernel_size), " with dilation=", fmt(dilation),
        " and padding=", fmt(padding), ": the padded size must be at least dilation*(kernel_size-1)+1");
    counts[i] = static_cast<int64_t>((padded - reach) / stride[i] + 1);
  }
}

// The output size of a transposed convolution per dimension: the guide's
// relationship 14 with dilation, o' = s(i'-1) + a + d(k-1) + 1 - 2p, in
// 128-bit arithmetic.
inline void transposed_sizes(const char* op, c10::IntArrayRef input, c10::IntArrayRef kernel_size,
                             c10::IntArrayRef stride, c10::IntArrayRef padding,
                             c10::IntArrayRef output_padding, c10::IntArrayRef dilation,
                             int64_t* sizes) {
  for (size_t i = 0; i < input.size(); ++i) {
    const wide_int size = wide_int(input[i] - 1) * stride[i] - 2 * wide_int(padding[i]) +
                          wide_int(dilation[i]) * (kernel_size[i] - 1) + output_padding[i] + 1;
    TORCH_CHECK_VALUE(size <= kInt64Max, op, ": the output size overflows int64 in dimension ", i,
                      " (stride=", fmt(stride), ", padding=", fmt(padding), ", dilation=",
                      fmt(dilation), ", output_padding=", fmt(output_padding), ", kernel_size=",
                      fmt(kernel_size), ")");
    TORCH_CHECK_VALUE(size >= 1, op, ": the output size (in-1)*stride - 2*padding + "
                      "dilation*(kernel_size-1) + output_padding + 1 is ",
                      static_cast<int64_t>(size), " in dimension ", i,
                      ", but must be positive (input of spatial size ", fmt(input), ", padding=",
                      fmt(padding), ")");
    sizes[i] = static_cast<int64_t>(size);
  }
}

// The geometry of a call, lifted to three spatial dimensions (Note [N-d by
// lifting] in im2col.h), after proving that every coordinate the relation
// forms fits in int64: with o < windows and k_off < kernel, |o*s - p +
// k_off*d| and |i + p - k_off*d| stay below (windows-1)*s + (k-1)*d +
// image + 2p + s, which must fit (Note [Overflow-checked geometry]).
inline Window3 make_window(const char* op, int64_t batch, int64_t channels,
                           c10::IntArrayRef image, const int64_t* windows,
                           c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const int dims = static_cast<int>(image.size());
  const int lead = kMaxDims - dims;
  Window3 w{};
  w.batch = batch;
  w.channels = channels;
  for (int i = 0; i < kMaxDims; ++i) {
    const bool unit = i < lead;
    const int j = i - lead;
    w.image[i] = unit ? 1 : image[j];
    w.windows[i] = unit ? 1 : windows[j];
    w.kernel[i] = unit ? 1 : kernel_size[j];
    w.stride[i] = unit ? 1 : stride[j];
    w.padding[i] = unit ? 0 : padding[j];
    w.dilation[i] = unit ? 1 : dilation[j];
    const wide_int reach = wide_int(w.windows[i] - 1) * w.stride[i] +
                           wide_int(w.kernel[i] - 1) * w.dilation[i] + w.image[i] +
                           2 * wide_int(w.padding[i]) + w.stride[i];
    TORCH_CHECK_VALUE(reach <= kInt64Max, op, ": stride=", fmt(stride), ", padding=", fmt(padding),
                      " and dilation=", fmt(dilation),
                      " are too large: window coordinates would overflow int64");
  }
  const Geometry context{kernel_size, stride, padding, dilation};
  const int64_t kernel_numel = checked_numel(op, "kernel_size", kernel_size, context);
  const int64_t positions =
      checked_numel(op, "the windows", c10::IntArrayRef(windows, dims), context);
  const int64_t pixels = checked_numel(op, "the image", image, context);
  checked_numel(op, "the column matrix",
                {batch, checked_mul(op, "the column matrix's rows", channels, kernel_numel),
                 positions},
                context);
  checked_numel(op, "the image", {batch, channels, pixels}, context);
  return w;
}

}  // namespace convt_ext
