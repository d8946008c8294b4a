// What the grid-style kernels share (the CUDA kernels, and their CPU
// emulation in tests/emulated/): the per-element functions of elements.h,
// and a tensor's extent and strides in the kernel's index type. The CPU
// loops (cpu/im2col_cpu.cpp) need none of it.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "depthwise_elements.h"
#include "elements.h"
#include "kernels.h"

namespace convt_ext {

// Largest element offset reachable in t, plus one (0 for an empty or
// undefined tensor): what an index type must hold to address t.
inline int64_t extent(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return 0;
  int64_t e = 1;
  for (int64_t d = 0; d < t.dim(); ++d) e += (t.size(d) - 1) * std::abs(t.stride(d));
  return e;
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

// The depthwise path's arguments (depthwise_elements.h) in a kernel's index
// type: `image`, `windows`, `weight` and `bias` as the op reads them
// (undefined where it does not), `out` the tensor it writes, all lifted.
template <typename scalar_t, typename index_t>
DepthwiseArgs<scalar_t, index_t> depthwise_args(const at::Tensor& image, const at::Tensor& windows,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const at::Tensor& out, int64_t groups) {
  DepthwiseArgs<scalar_t, index_t> a{};
  a.image = image.defined() ? data_as<scalar_t>(image) : nullptr;
  a.windows = windows.defined() ? data_as<scalar_t>(windows) : nullptr;
  a.weight = weight.defined() ? data_as<scalar_t>(weight) : nullptr;
  a.bias = bias.defined() ? data_as<scalar_t>(bias) : nullptr;
  a.out = mutable_data_as<scalar_t>(out);
  if (image.defined()) a.is = image_strides<index_t>(image);
  if (windows.defined()) a.ws = image_strides<index_t>(windows);
  if (weight.defined()) a.wt = image_strides<index_t>(weight);
  a.os = image_strides<index_t>(out);
  a.bias_stride = static_cast<index_t>(bias.defined() ? bias.stride(0) : 0);
  const at::Tensor& shaped = weight.defined() ? weight : out;  // the weight gradient writes it
  a.cw = static_cast<index_t>(shaped.size(0) / groups);
  a.ci = static_cast<index_t>(shaped.size(1));
  return a;
}

// Whether a depthwise call's every index fits in index_t.
template <typename index_t>
bool depthwise_fits(const Window3& w, const at::Tensor& image, const at::Tensor& windows,
                    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t limit = std::numeric_limits<index_t>::max();
  return fits_index<index_t>(w, std::max(extent(windows), extent(weight)), std::max(extent(image), extent(out))) &&
         out.numel() < limit && extent(bias) < limit;
}

}  // namespace convt_ext
