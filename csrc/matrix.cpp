// The im2col selection matrix U of one channel, from the same relation the
// kernels use (im2col.h). U has a row per column-matrix entry (k_off, l), in
// the order of im2col(x).flatten() for a 1-channel x, and a column per pixel:
// U[(ki*kw + kj)*L + l, ih*W + iw] = 1 where window l taps (ih, iw) at
// offset (ki, kj) inside the image. Taps into the padding have no entry.
// im2col(x).flatten() == U x.flatten() and col2im(c).flatten() == U^T c.flatten().
#include <ATen/ops/empty.h>

#include "checks.h"
#include "ops.h"

namespace convt_ext {

at::Tensor im2col_indices(at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                          at::IntArrayRef dilation, at::IntArrayRef padding,
                          at::IntArrayRef stride) {
  constexpr const char* op = "im2col_indices";
  check_ints(op, "input_size", input_size, 2, 1);
  check_window_args(op, kernel_size, stride, padding, dilation);
  int64_t windows[2];
  window_counts(op, "input_size", input_size, kernel_size, stride, padding, dilation, windows);
  const int64_t L = windows[0] * windows[1];
  // Count first, then fill: each (ki, oh) and (kj, ow) tap is inside or not.
  int64_t inside[2] = {0, 0};
  for (int dim = 0; dim < 2; ++dim) {
    for (int64_t k = 0; k < kernel_size[dim]; ++k) {
      int64_t lo, hi;
      taps_inside(input_size[dim], windows[dim], k, stride[dim], padding[dim], dilation[dim], &lo, &hi);
      inside[dim] += hi - lo;
    }
  }
  at::Tensor indices = at::empty({2, inside[0] * inside[1]}, at::kLong);
  int64_t* row = indices.mutable_data_ptr<int64_t>();
  int64_t* col = row + indices.size(1);
  int64_t e = 0;
  for (int64_t ki = 0; ki < kernel_size[0]; ++ki) {
    for (int64_t kj = 0; kj < kernel_size[1]; ++kj) {
      for (int64_t oh = 0; oh < windows[0]; ++oh) {
        const int64_t ih = tap<int64_t>(oh, ki, stride[0], padding[0], dilation[0]);
        if (ih < 0 || ih >= input_size[0]) continue;
        for (int64_t ow = 0; ow < windows[1]; ++ow) {
          const int64_t iw = tap<int64_t>(ow, kj, stride[1], padding[1], dilation[1]);
          if (iw < 0 || iw >= input_size[1]) continue;
          row[e] = (ki * kernel_size[1] + kj) * L + oh * windows[1] + ow;
          col[e] = ih * input_size[1] + iw;
          ++e;
        }
      }
    }
  }
  return indices;
}

}  // namespace convt_ext
