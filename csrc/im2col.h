// The one relation behind im2col, col2im, the convolutions and the matrices.
//
// A window of a D-dimensional image: kernel k, stride s, padding p and
// dilation d, per dimension. Window position o (a "column") taps the image at
//
//     i = o*s - p + k_off*d                                   (*)
//
// for each kernel offset k_off in [0, k), in every dimension independently.
// Taps that fall outside [0, image) read the zero padding.
//
//   im2col reads (*) forward:  cols[(c, k_off), o] = image[c, i]
//   col2im reads (*) backward: image[c, i] = sum of cols[(c, k_off), o] over
//                              every (k_off, o) whose tap (*) lands on i.
//
// Both directions go through the functions below (`tap`, `window_at` and
// `taps_inside`), so <im2col(x), c> == <x, col2im(c)> holds by construction:
// col2im is the adjoint (transpose) of im2col, not a separate piece of math.
//
// This header is included by the CPU loops (cpu/im2col_cpu.cpp), the CUDA
// kernels (cuda/im2col_cuda.cu), the convolutions' column path (conv/columns.cpp), the
// emulated kernels (tests/emulated/emulate.cpp) and the
// explicit matrices (matrix.cpp). Everything here assumes geometry that
// checks.h has validated: every size, and image + 2*padding, fits in int64.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CONVT_HD __host__ __device__ __forceinline__
#else
#define CONVT_HD inline
#endif

namespace convt_ext {

// The number of window positions along one dimension (the guide's
// relationship 15) is computed once, overflow-checked, by checks.h's
// window_counts; the kernels receive it in Window<D>::windows.

// (*) forward: the image position tapped by window position o at offset k_off.
template <typename index_t>
CONVT_HD index_t tap(index_t o, index_t k_off, index_t s, index_t p, index_t d) {
  return o * s - p + k_off * d;
}

// (*) backward: the window position o whose tap at offset k_off lands on
// image position i, or -1 when there is none (i + p - k_off*d is negative,
// not a multiple of s, or past the last of the `count` window positions).
template <typename index_t>
CONVT_HD index_t window_at(index_t i, index_t k_off, index_t s, index_t p, index_t d, index_t count) {
  const index_t t = i + p - k_off * d;
  if (t < 0) return -1;
  const index_t o = t / s;
  return (o * s == t && o < count) ? o : -1;
}

// The window positions o in [*lo, *hi) whose tap at offset k_off lies inside
// [0, image): solving 0 <= o*s - p + k_off*d <= image-1 for o. Positions
// before *lo and from *hi on read padding; *lo == *hi when all of them do.
// Called with p + i0 and image = n, it gives the positions that tap inside
// [i0, i0 + n): how col2im finds the taps of one band of image rows. p may
// then be negative (a band that starts after the first window's first tap).
CONVT_HD void taps_inside(int64_t image, int64_t count, int64_t k_off, int64_t s, int64_t p,
                          int64_t d, int64_t* lo, int64_t* hi) {
  const int64_t first = p - k_off * d;              // o*s >= first
  const int64_t last = image - 1 + p - k_off * d;   // o*s <= last
  int64_t l = first <= 0 ? 0 : (first + s - 1) / s;
  int64_t h = last < 0 ? 0 : last / s + 1;
  if (h > count) h = count;
  if (l > h) l = h;
  *lo = l;
  *hi = h;
}

// The geometry of one im2col/col2im call over D spatial dimensions.
// `windows` is passed explicitly rather than derived from `image`: a
// transposed convolution with output_padding >= stride (allowed when
// dilation > stride) has an image whose natural window count exceeds the
// columns it owns. PyTorch's "Note [im2col/col2im output padding]" makes the
// same point. Rows of the column matrix are channel-major, then kernel
// offsets in row-major order: row = c*prod(k) + flat(k_off), F.unfold's
// layout in any D; columns are window positions in row-major order.
template <int D>
struct Window {
  int64_t batch;
  int64_t channels;
  int64_t image[D];
  int64_t windows[D];
  int64_t kernel[D];
  int64_t stride[D];
  int64_t padding[D];
  int64_t dilation[D];

  CONVT_HD int64_t kernel_numel() const {
    int64_t n = 1;
    for (int i = 0; i < D; ++i) n *= kernel[i];
    return n;
  }
  CONVT_HD int64_t window_numel() const {
    int64_t n = 1;
    for (int i = 0; i < D; ++i) n *= windows[i];
    return n;
  }
  CONVT_HD int64_t image_numel() const {
    int64_t n = 1;
    for (int i = 0; i < D; ++i) n *= image[i];
    return n;
  }
  CONVT_HD int64_t rows() const { return channels * kernel_numel(); }
};

// Note [N-d by lifting]
// The kernels are written once, for three spatial dimensions. A 1-d or 2-d
// geometry is lifted to 3-d by leading dimensions of size 1 (image 1, one
// window, kernel 1, stride 1, no padding, dilation 1), which the relation
// maps onto themselves: i = 0*1 - 0 + 0*1 = 0. The column matrix does not
// change (its rows and columns are products over the dimensions, and the
// new factors are 1), and tensors only gain unit dimensions, so a lifted
// call is a view of the original, not a copy. One instantiation per dtype
// serves every D, which keeps compile time (and the CUDA fatbinary) flat.
// checks.h's make_window does the lifting.
constexpr int kMaxDims = 3;
using Window3 = Window<kMaxDims>;

// A conv_transpose (w: its output the image, its input the windows) as the
// direct conv the guide gives for it (relationship 14): over the input with
// inserted[d] - 1 = s - 1 zeros between its pixels, at stride 1, the kernel
// rotated 180 degrees (channels per group swapped), padding d(k - 1) - p on
// the low side, and output_padding as more on the high side, which the
// output size gives (the taps past the input read nothing). False where the
// padding would be negative.
inline bool as_direct_conv(const Window3& w, Window3* direct, int64_t* inserted) {
  *direct = w;
  for (int d = 0; d < kMaxDims; ++d) {
    inserted[d] = w.stride[d];
    direct->image[d] = (w.windows[d] - 1) * w.stride[d] + 1;
    direct->windows[d] = w.image[d];
    direct->stride[d] = 1;
    direct->padding[d] = w.dilation[d] * (w.kernel[d] - 1) - w.padding[d];
    if (direct->padding[d] < 0) return false;
  }
  return true;
}

}  // namespace convt_ext
