// CPU im2col and col2im: row loops over the relation in ../im2col.h.
//
// Both loops walk the same ranges, from taps_inside(): for a kernel offset,
// the window positions [lo, hi) that tap inside the image. Everything before
// lo and from hi on reads padding.
//
//   im2col: one task per column row (n, c, ki, kj). It writes OH*OW contiguous
//           values: zeros, a run copied from one image row, zeros. With stride
//           1 the run is a plain memcpy.
//   col2im: tasks own image rows (n, c, ih), so the split is race-free
//           without atomics. A task takes a band of rows of one (n, c) plane
//           into an L1-sized accumulator, walks the plane's column rows in
//           memory order and adds each run of taps into it, then writes the
//           band once. Every pixel still sums its taps in (ki, kj) order, in
//           opmath (>= float32) precision: the order of the CUDA gather.
//           (A gather per row, as on CUDA, reads the columns in short pieces
//           from all over the plane and ran at a third of this speed.)
//           Accumulator rows are split by phase (iw mod stride): the taps of
//           one kernel offset are stride apart in the image row but adjacent
//           in their phase, so every run is a contiguous, vectorisable add,
//           and the phases are interleaved once, when the band is written.
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

// col2im accumulates a band of image rows at a time; the band stays in the L1
// cache while every column row adds its runs into it.
constexpr int64_t kAccumulatorBytes = 32 << 10;

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
  const bool unit_run = cs_l == 1;
  // One accumulator row per image row, phase-major: image column iw lives at
  // [(iw % sw) * phase_len + iw / sw].
  const int64_t phase_len = (W + sw - 1) / sw;
  const int64_t row_len = sw * phase_len;
  const int64_t band_rows =
      std::clamp<int64_t>(kAccumulatorBytes / (row_len * int64_t(sizeof(acc_t))), 1, H);

  at::parallel_for(0, total_rows, grain, [&](int64_t begin, int64_t end) {
    // Per kj, the window positions that tap inside the row, and where the
    // first tap lands in an accumulator row.
    std::vector<int64_t> ow_lo(kw), ow_hi(kw), acc_lo(kw);
    for (int64_t kj = 0; kj < kw; ++kj) {
      taps_inside(W, OW, kj, sw, pw, dw, &ow_lo[kj], &ow_hi[kj]);
      if (ow_lo[kj] == ow_hi[kj]) continue;  // kj taps only padding; skipped below
      const int64_t iw = tap<int64_t>(ow_lo[kj], kj, sw, pw, dw);
      acc_lo[kj] = (iw % sw) * phase_len + iw / sw;
    }
    std::vector<acc_t> acc(std::min(band_rows, end - begin) * row_len);
    // The task's rows [begin, end), one band of one (n, c) plane at a time.
    for (int64_t plane = begin / H; plane * H < end; ++plane) {
      const int64_t c = plane % w.channels, n = plane / w.channels;
      const scalar_t* plane_cols = in + n * cs_n + c * kh * kw * cs_r;
      const int64_t first = std::max<int64_t>(begin - plane * H, 0);
      const int64_t last = std::min(end - plane * H, H);
      for (int64_t ih0 = first; ih0 < last; ih0 += band_rows) {
        const int64_t rows = std::min(band_rows, last - ih0);
        std::fill(acc.begin(), acc.begin() + rows * row_len,
                  b ? static_cast<acc_t>(b[c * bs]) : acc_t(0));
        for (int64_t ki = 0; ki < kh; ++ki) {
          // The window rows whose tap at ki lands in image rows [ih0, ih0 + rows).
          int64_t oh_lo, oh_hi;
          taps_inside(rows, OH, ki, sh, ph + ih0, dh, &oh_lo, &oh_hi);
          for (int64_t kj = 0; kj < kw; ++kj) {
            const int64_t lo = ow_lo[kj], len = ow_hi[kj] - lo;
            if (len == 0) continue;
            const scalar_t* row = plane_cols + (ki * kw + kj) * cs_r + lo * cs_l;
            for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
              const scalar_t* src = row + oh * OW * cs_l;
              acc_t* a = acc.data() + (tap<int64_t>(oh, ki, sh, ph, dh) - ih0) * row_len + acc_lo[kj];
              if (unit_run) {
                for (int64_t t = 0; t < len; ++t) a[t] += static_cast<acc_t>(src[t]);
              } else {
                for (int64_t t = 0; t < len; ++t) a[t] += static_cast<acc_t>(src[t * cs_l]);
              }
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* dst = x + n * xs_n + c * xs_c + (ih0 + r) * xs_h;
          for (int64_t phase = 0; phase < std::min(sw, W); ++phase) {
            const acc_t* a = acc.data() + r * row_len + phase * phase_len;
            scalar_t* d = dst + phase * xs_w;
            const int64_t count = (W - phase + sw - 1) / sw;
            for (int64_t j = 0; j < count; ++j) d[j * sw * xs_w] = static_cast<scalar_t>(a[j]);
          }
        }
      }
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
