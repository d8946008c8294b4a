// What the grid-style kernels share (the CUDA kernels, and their CPU
// emulation in tests/emulated/): the per-element functions of elements.h,
// and a tensor's extent and strides in the kernel's index type. The CPU
// loops (cpu/im2col_cpu.cpp) need none of it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>

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

}  // namespace convt_ext
