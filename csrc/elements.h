// The per-element work of the CUDA kernels, as __host__ __device__ functions.
//
// The __global__ kernels in cuda/im2col_cuda.cu are thin grid-stride loops
// around these; tests/emulated/emulate.cpp runs the very same functions over the whole grid
// on the CPU, so CI (which has no GPU) tests the device logic: the index
// decomposition, the offsets, the bounds and the gather, in both index types.
//
//   im2col_element: one element per (n, c, o0, o1, o2) window position; it
//                   writes the prod(k) column entries of its window.
//   col2im_element: a gather. One element per image position (n, c, i0, i1,
//                   i2) inverts the relation with window_at() and sums its
//                   own taps in row-major k_off order, in sum_t (dtypes.h). No atomics:
//                   results are deterministic and match the CPU loops' order.
#pragma once

#include <limits>

#include "im2col.h"

namespace convt_ext {

// Strides of an image lifted to (N, C, I0, I1, I2), and of a column matrix
// (N, rows, positions), in the kernel's index type.
template <typename index_t>
struct ImageStrides {
  index_t n, c, d[3];
};

template <typename index_t>
struct ColumnStrides {
  index_t n, r, l;
};

template <typename scalar_t, typename index_t>
CONVT_HD void im2col_element(const scalar_t* __restrict__ x, scalar_t* __restrict__ cols,
                             const Window3& w, ImageStrides<index_t> xs, ColumnStrides<index_t> cs,
                             index_t idx) {
  index_t o[3];
  for (int d = 2; d >= 0; --d) {
    o[d] = idx % static_cast<index_t>(w.windows[d]);
    idx /= static_cast<index_t>(w.windows[d]);
  }
  const index_t c = idx % static_cast<index_t>(w.channels);
  const index_t n = idx / static_cast<index_t>(w.channels);
  const index_t position =
      (o[0] * static_cast<index_t>(w.windows[1]) + o[1]) * static_cast<index_t>(w.windows[2]) + o[2];
  const index_t kernel_numel = static_cast<index_t>(w.kernel_numel());
  const scalar_t* src = x + n * xs.n + c * xs.c;
  scalar_t* dst = cols + n * cs.n + c * kernel_numel * cs.r + position * cs.l;
  index_t row = 0;
  for (index_t k0 = 0; k0 < static_cast<index_t>(w.kernel[0]); ++k0) {
    const index_t i0 = tap<index_t>(o[0], k0, w.stride[0], w.padding[0], w.dilation[0]);
    const bool in0 = i0 >= 0 && i0 < static_cast<index_t>(w.image[0]);
    for (index_t k1 = 0; k1 < static_cast<index_t>(w.kernel[1]); ++k1) {
      const index_t i1 = tap<index_t>(o[1], k1, w.stride[1], w.padding[1], w.dilation[1]);
      const bool in1 = in0 && i1 >= 0 && i1 < static_cast<index_t>(w.image[1]);
      for (index_t k2 = 0; k2 < static_cast<index_t>(w.kernel[2]); ++k2, ++row) {
        const index_t i2 = tap<index_t>(o[2], k2, w.stride[2], w.padding[2], w.dilation[2]);
        const bool inside = in1 && i2 >= 0 && i2 < static_cast<index_t>(w.image[2]);
        // The source offset is formed only for taps inside the image.
        dst[row * cs.r] = inside ? src[i0 * xs.d[0] + i1 * xs.d[1] + i2 * xs.d[2]] : scalar_t(0);
      }
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
CONVT_HD void col2im_element(const scalar_t* __restrict__ cols, const scalar_t* __restrict__ bias,
                             index_t bias_stride, scalar_t* __restrict__ x, const Window3& w,
                             ColumnStrides<index_t> cs, ImageStrides<index_t> xs, index_t idx) {
  index_t i[3];
  for (int d = 2; d >= 0; --d) {
    i[d] = idx % static_cast<index_t>(w.image[d]);
    idx /= static_cast<index_t>(w.image[d]);
  }
  const index_t c = idx % static_cast<index_t>(w.channels);
  const index_t n = idx / static_cast<index_t>(w.channels);
  acc_t acc = bias ? static_cast<acc_t>(bias[c * bias_stride]) : acc_t(0);
  const index_t kernel_numel = static_cast<index_t>(w.kernel_numel());
  const scalar_t* src = cols + n * cs.n + c * kernel_numel * cs.r;
  const index_t W1 = static_cast<index_t>(w.windows[1]), W2 = static_cast<index_t>(w.windows[2]);
  const index_t K1 = static_cast<index_t>(w.kernel[1]), K2 = static_cast<index_t>(w.kernel[2]);
  for (index_t k0 = 0; k0 < static_cast<index_t>(w.kernel[0]); ++k0) {
    const index_t o0 = window_at<index_t>(i[0], k0, w.stride[0], w.padding[0], w.dilation[0], w.windows[0]);
    if (o0 < 0) continue;
    for (index_t k1 = 0; k1 < K1; ++k1) {
      const index_t o1 = window_at<index_t>(i[1], k1, w.stride[1], w.padding[1], w.dilation[1], W1);
      if (o1 < 0) continue;
      for (index_t k2 = 0; k2 < K2; ++k2) {
        const index_t o2 = window_at<index_t>(i[2], k2, w.stride[2], w.padding[2], w.dilation[2], W2);
        if (o2 < 0) continue;
        const index_t row = (k0 * K1 + k1) * K2 + k2;
        const index_t position = (o0 * W1 + o1) * W2 + o2;
        acc += static_cast<acc_t>(src[row * cs.r + position * cs.l]);
      }
    }
  }
  x[n * xs.n + c * xs.c + i[0] * xs.d[0] + i[1] * xs.d[1] + i[2] * xs.d[2]] =
      static_cast<scalar_t>(acc);
}

// Whether every index and offset that the two functions above form fits in
// index_t, given the largest element offset (plus one) reachable in each
// tensor. Besides the tensors' own extents, the elements form the relation's
// coordinates, o*s - p + k*d and i + p - k*d, whose magnitudes stay below
// (windows-1)*s + (kernel-1)*d + image + 2p + s (Note [Overflow-checked
// geometry] in checks.h), and element counts of the image and the columns.
template <typename index_t>
inline bool fits_index(const Window3& w, int64_t cols_extent, int64_t image_extent) {
  using wide = __int128;
  const wide limit = std::numeric_limits<index_t>::max();
  wide image_elems = wide(w.batch) * w.channels, window_elems = wide(w.batch) * w.channels;
  for (int d = 0; d < 3; ++d) {
    const wide reach = wide(w.windows[d] - 1) * w.stride[d] + wide(w.kernel[d] - 1) * w.dilation[d] +
                       w.image[d] + 2 * wide(w.padding[d]) + w.stride[d];
    if (reach >= limit) return false;
    image_elems *= w.image[d];
    window_elems *= w.windows[d];
  }
  return image_elems < limit && window_elems < limit && wide(w.rows()) < limit &&
         wide(cols_extent) < limit && wide(image_extent) < limit;
}

}  // namespace convt_ext
