// The im2col selection matrix U of one channel, from the same relation the
// kernels use (im2col.h), in 1, 2 or 3 dimensions. U has a row per
// column-matrix entry (k_off, l), in the order of im2col(x).flatten() for a
// 1-channel x, and a column per pixel: in 2-d, U[(ki*kw + kj)*L + l,
// ih*W + iw] = 1 where window l taps (ih, iw) at offset (ki, kj) inside the
// image (row-major flattening in any D). Taps into the padding have no entry.
// im2col(x).flatten() == U x.flatten() and col2im(c).flatten() == U^T c.flatten().
#include <ATen/ops/empty.h>

#include <array>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace convt_ext {

at::Tensor im2col_indices(at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                          at::IntArrayRef dilation, at::IntArrayRef padding,
                          at::IntArrayRef stride) {
  constexpr const char* op = "im2col_indices";
  const int dims = spatial_dims(op, "input_size", input_size);
  check_ints(op, "input_size", input_size, dims, 1);
  check_window_args(op, dims, kernel_size, stride, padding, dilation);
  int64_t windows[kMaxDims];
  window_counts(op, "input_size", input_size, kernel_size, stride, padding, dilation, windows);
  // Lifted to three dimensions (Note [N-d by lifting]); the unit dimensions
  // change no index.
  const Window3 w = make_window(op, 1, 1, input_size, windows, kernel_size, stride, padding, dilation);
  const int64_t L = w.window_numel();
  // Per dimension and kernel offset, the window positions whose tap is
  // inside, with that tap; U's nonzeros are their products over dimensions.
  using Taps = std::vector<std::array<int64_t, 2>>;  // (o, i)
  std::vector<Taps> inside[kMaxDims];
  int64_t nnz = 1;
  for (int d = 0; d < kMaxDims; ++d) {
    int64_t count = 0;
    for (int64_t k = 0; k < w.kernel[d]; ++k) {
      int64_t lo, hi;
      taps_inside(w.image[d], w.windows[d], k, w.stride[d], w.padding[d], w.dilation[d], &lo, &hi);
      Taps taps;
      for (int64_t o = lo; o < hi; ++o) {
        taps.push_back({o, tap<int64_t>(o, k, w.stride[d], w.padding[d], w.dilation[d])});
      }
      count += hi - lo;
      inside[d].push_back(std::move(taps));
    }
    nnz = checked_mul(op, "the number of nonzeros", nnz, count);
  }
  at::Tensor indices = at::empty({2, nnz}, at::kLong);
  int64_t* row = indices.mutable_data_ptr<int64_t>();
  int64_t* col = row + nnz;
  int64_t e = 0;
  // Rows increase: k_off row-major over (k0, k1, k2), then the window
  // position row-major over (o0, o1, o2).
  for (int64_t k0 = 0; k0 < w.kernel[0]; ++k0) {
    for (int64_t k1 = 0; k1 < w.kernel[1]; ++k1) {
      for (int64_t k2 = 0; k2 < w.kernel[2]; ++k2) {
        const int64_t k_off = (k0 * w.kernel[1] + k1) * w.kernel[2] + k2;
        for (const auto& a : inside[0][k0]) {
          for (const auto& b : inside[1][k1]) {
            for (const auto& c : inside[2][k2]) {
              row[e] = k_off * L + (a[0] * w.windows[1] + b[0]) * w.windows[2] + c[0];
              col[e] = (a[1] * w.image[1] + b[1]) * w.image[2] + c[1];
              ++e;
            }
          }
        }
      }
    }
  }
  return indices;
}

}  // namespace convt_ext
