// CPU im2col and col2im: row loops over the relation in ../im2col.h.
//
// Both loops walk the same ranges, from taps_inside(): for a kernel offset,
// the window positions [lo, hi) that tap inside the image. Everything before
// lo and from hi on reads padding.
//
//   im2col: one task per column row (n, c, ki, kj). It writes OH*OW contiguous
//           values: zeros, a run copied from one image row, zeros. With stride
//           1 the run is a plain memcpy.
//   col2im: one task per image row (n, c, ih). The task owns that row, so the
//           split is race-free without atomics; it accumulates every tap of
//           the row in (ki, kj) order, in opmath (>= float32) precision, the
//           same order as the CUDA gather, then writes the row once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../kernels.h"

namespace convt_ext {
namespace {

// Aim for tasks of at least this many elements, so that parallel_for does not
// split work into pieces smaller than its own overhead.
constexpr int64_t kGrainElements = 32768;

template <typename scalar_t>
void im2col_rows(const at::Tensor& image, const at::Tensor& cols, const Window<2>& w) {
  const scalar_t* x = image.const_data_ptr<scalar_t>();
  scalar_t* out = cols.mutable_data_ptr<scalar_t>();
  const int64_t xs_n = image.stride(0), xs_c = image.stride(1), xs_h = image.stride(2),
                xs_w = image.stride(3);
  const int64_t cs_n = cols.stride(0), cs_r = cols.stride(1), cs_l = cols.stride(2);
  const int64_t H = w.image[0], W = w.image[1], OH = w.windows[0], OW = w.windows[1];
  const int64_t kh = w.kernel[0], kw = w.kernel[1];
  const int64_t sh = w.stride[0], sw = w.stride[1], ph = w.padding[0], pw = w.padding[1];
  const int64_t dh = w.dilation[0], dw = w.dilation[1];
  const int64_t total_rows = w.batch * w.rows();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, OH * OW));
  // A row of output positions maps onto a unit-stride run of the image row.
  const bool unit_run = sw * xs_w == 1 && cs_l == 1;

  at::parallel_for(0, total_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t kj = r % kw;
      const int64_t ki = (r / kw) % kh;
      const int64_t c = (r / (kw * kh)) % w.channels;
      const int64_t n = r / w.rows();
      const scalar_t* src = x + n * xs_n + c * xs_c;
      scalar_t* dst = out + n * cs_n + (r % w.rows()) * cs_r;
      int64_t oh_lo, oh_hi, ow_lo, ow_hi;
      taps_inside(H, OH, ki, sh, ph, dh, &oh_lo, &oh_hi);
      taps_inside(W, OW, kj, sw, pw, dw, &ow_lo, &ow_hi);
      const int64_t iw_lo = tap<int64_t>(ow_lo, kj, sw, pw, dw);
      for (int64_t oh = 0; oh < OH; ++oh) {
        scalar_t* drow = dst + oh * OW * cs_l;
        if (oh < oh_lo || oh >= oh_hi) {
          for (int64_t ow = 0; ow < OW; ++ow) drow[ow * cs_l] = scalar_t(0);
          continue;
        }
        const scalar_t* srow = src + tap<int64_t>(oh, ki, sh, ph, dh) * xs_h + iw_lo * xs_w;
        if (unit_run) {
          std::fill(drow, drow + ow_lo, scalar_t(0));
          std::memcpy(drow + ow_lo, srow, (ow_hi - ow_lo) * sizeof(scalar_t));
          std::fill(drow + ow_hi, drow + OW, scalar_t(0));
        } else {
          for (int64_t ow = 0; ow < ow_lo; ++ow) drow[ow * cs_l] = scalar_t(0);
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow)
            drow[ow * cs_l] = srow[(ow - ow_lo) * sw * xs_w];
          for (int64_t ow = ow_hi; ow < OW; ++ow) drow[ow * cs_l] = scalar_t(0);
        }
      }
    }
  });
}

template <typename scalar_t>
void col2im_rows(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window<2>& w) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = cols.const_data_ptr<scalar_t>();
  scalar_t* x = image.mutable_data_ptr<scalar_t>();
  const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  const int64_t bs = bias.defined() ? bias.stride(0) : 0;
  const int64_t xs_n = image.stride(0), xs_c = image.stride(1), xs_h = image.stride(2),
                xs_w = image.stride(3);
  const int64_t cs_n = cols.stride(0), cs_r = cols.stride(1), cs_l = cols.stride(2);
  const int64_t H = w.image[0], W = w.image[1], OH = w.windows[0], OW = w.windows[1];
  const int64_t kh = w.kernel[0], kw = w.kernel[1];
  const int64_t sh = w.stride[0], sw = w.stride[1], ph = w.padding[0], pw = w.padding[1];
  const int64_t dh = w.dilation[0], dw = w.dilation[1];
  const int64_t total_rows = w.batch * w.channels * H;
  const int64_t grain =
      std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, W * w.kernel_numel()));
  const bool unit_run = sw == 1 && cs_l == 1;

  at::parallel_for(0, total_rows, grain, [&](int64_t begin, int64_t end) {
    // Per kj, the window positions that tap inside the row, and the first tap.
    std::vector<int64_t> ow_lo(kw), ow_hi(kw), iw_lo(kw);
    for (int64_t kj = 0; kj < kw; ++kj) {
      taps_inside(W, OW, kj, sw, pw, dw, &ow_lo[kj], &ow_hi[kj]);
      iw_lo[kj] = tap<int64_t>(ow_lo[kj], kj, sw, pw, dw);
    }
    std::vector<acc_t> acc(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ih = r % H;
      const int64_t c = (r / H) % w.channels;
      const int64_t n = r / (H * w.channels);
      std::fill(acc.begin(), acc.end(), b ? static_cast<acc_t>(b[c * bs]) : acc_t(0));
      for (int64_t ki = 0; ki < kh; ++ki) {
        const int64_t oh = window_at<int64_t>(ih, ki, sh, ph, dh, OH);
        if (oh < 0) continue;
        for (int64_t kj = 0; kj < kw; ++kj) {
          const int64_t lo = ow_lo[kj], hi = ow_hi[kj];
          const scalar_t* src =
              in + n * cs_n + ((c * kh + ki) * kw + kj) * cs_r + (oh * OW + lo) * cs_l;
          acc_t* a = acc.data() + iw_lo[kj];
          if (unit_run) {
            for (int64_t t = 0; t < hi - lo; ++t) a[t] += static_cast<acc_t>(src[t]);
          } else {
            for (int64_t t = 0; t < hi - lo; ++t) a[t * sw] += static_cast<acc_t>(src[t * cs_l]);
          }
        }
      }
      scalar_t* dst = x + n * xs_n + c * xs_c + ih * xs_h;
      for (int64_t iw = 0; iw < W; ++iw) dst[iw * xs_w] = static_cast<scalar_t>(acc[iw]);
    }
  });
}

void im2col_cpu(const at::Tensor& image, const at::Tensor& cols, const Window<2>& w) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "im2col_cpu",
                                  [&] { im2col_rows<scalar_t>(image, cols, w); });
}

void col2im_cpu(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                const Window<2>& w) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cols.scalar_type(), "col2im_cpu",
                                  [&] { col2im_rows<scalar_t>(cols, bias, image, w); });
}

const bool registered = [] {
  register_window_kernels(c10::DeviceType::CPU, WindowKernels{&im2col_cpu, &col2im_cpu});
  return true;
}();

}  // namespace
}  // namespace convt_ext
