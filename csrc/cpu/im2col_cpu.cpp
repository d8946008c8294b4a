// CPU im2col and col2im: row loops over the relation in ../im2col.h, for
// geometry lifted to three spatial dimensions (Note [N-d by lifting]).
//
// Both loops walk the same ranges, from taps_inside(): for a kernel offset,
// the window positions [lo, hi) that tap inside the image. Everything before
// lo and from hi on reads padding.
//
//   im2col: one task per column row (n, c, k0, k1, k2). It writes the row's
//           window positions in order; each line of the last dimension is
//           zeros, a run copied from one image row, zeros. With stride 1 the
//           run is a plain memcpy.
//   col2im: tasks own image rows (n, c, i0, ih), so the split is race-free
//           without atomics. Along dimension 0 a row gathers its taps with
//           window_at(), as the CUDA kernel does for every dimension.
//           A task takes a band of rows of one (n, c, i0) plane
//           into an L1-sized accumulator, walks the plane's column rows in
//           memory order and adds each run of taps into it, then writes the
//           band once. Every pixel still sums its taps in (k0, ki, kj) order, in
//           sum_t (Note [Window dtypes]): the order and arithmetic of the CUDA gather.
//           (A gather per row, as on CUDA, reads the columns in short pieces
//           from all over the plane and ran at a third of this speed.)
//           Accumulator rows are split by phase (iw mod stride): the taps of
//           one kernel offset are stride apart in the image row but adjacent
//           in their phase, so every run is a contiguous, vectorisable add,
//           and the phases are interleaved once, when the band is written.
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// count values at dst, dst[stride], ... set to zero.
template <typename scalar_t>
void zero(scalar_t* dst, int64_t count, int64_t stride) {
  if (stride == 1) {
    std::fill(dst, dst + count, scalar_t(0));
  } else {
    for (int64_t j = 0; j < count; ++j) dst[j * stride] = scalar_t(0);
  }
}

template <typename scalar_t>
void im2col_rows(const at::Tensor& image, const at::Tensor& cols, const Window3& w) {
  const scalar_t* x = data_as<scalar_t>(image);
  scalar_t* out = mutable_data_as<scalar_t>(cols);
  const int64_t xs_n = image.stride(0), xs_c = image.stride(1);
  const int64_t xs[3] = {image.stride(2), image.stride(3), image.stride(4)};
  const int64_t cs_n = cols.stride(0), cs_r = cols.stride(1), cs_l = cols.stride(2);
  const int64_t* K = w.kernel;
  const int64_t* O = w.windows;
  const int64_t kernel_numel = w.kernel_numel();
  const int64_t total_rows = w.batch * w.rows();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, w.window_numel()));
  // A row of output positions maps onto a unit-stride run of the image row.
  const bool unit_run = w.stride[2] * xs[2] == 1 && cs_l == 1;
  const bool pair_run = w.stride[2] * xs[2] == 2 && cs_l == 1;

  at::parallel_for(0, total_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      // Row r is (n, c, k0, k1, k2), row-major.
      int64_t k[3];
      k[2] = r % K[2];
      k[1] = (r / K[2]) % K[1];
      k[0] = (r / (K[2] * K[1])) % K[0];
      const int64_t c = (r / kernel_numel) % w.channels;
      const int64_t n = r / w.rows();
      int64_t lo[3], hi[3];
      for (int d = 0; d < 3; ++d) {
        taps_inside(w.image[d], O[d], k[d], w.stride[d], w.padding[d], w.dilation[d], &lo[d], &hi[d]);
      }
      const scalar_t* src = x + n * xs_n + c * xs_c;
      scalar_t* dst = out + n * cs_n + (r % w.rows()) * cs_r;
      // Only windows inside [lo, hi) in every dimension tap the image; the
      // source pointer is formed for those alone.
      for (int64_t o0 = 0; o0 < O[0]; ++o0) {
        scalar_t* block = dst + o0 * O[1] * O[2] * cs_l;
        if (o0 < lo[0] || o0 >= hi[0] || lo[2] == hi[2]) {
          zero(block, O[1] * O[2], cs_l);
          continue;
        }
        const scalar_t* slab = src + tap<int64_t>(o0, k[0], w.stride[0], w.padding[0], w.dilation[0]) * xs[0];
        for (int64_t o1 = 0; o1 < O[1]; ++o1) {
          scalar_t* drow = block + o1 * O[2] * cs_l;
          if (o1 < lo[1] || o1 >= hi[1]) {
            zero(drow, O[2], cs_l);
            continue;
          }
          const scalar_t* srow =
              slab + tap<int64_t>(o1, k[1], w.stride[1], w.padding[1], w.dilation[1]) * xs[1] +
              tap<int64_t>(lo[2], k[2], w.stride[2], w.padding[2], w.dilation[2]) * xs[2];
          zero(drow, lo[2], cs_l);
          if (unit_run) {
            std::memcpy(drow + lo[2], srow, (hi[2] - lo[2]) * sizeof(scalar_t));
          } else if (pair_run) {
            // Every second pixel: a constant step, which the compiler turns
            // into vector loads and shuffles (the stride-2 stem's columns).
            scalar_t* d = drow + lo[2];
            for (int64_t j = 0; j < hi[2] - lo[2]; ++j) d[j] = srow[2 * j];
          } else {
            const int64_t step = w.stride[2] * xs[2];
            for (int64_t o2 = lo[2]; o2 < hi[2]; ++o2) drow[o2 * cs_l] = srow[(o2 - lo[2]) * step];
          }
          zero(drow + hi[2] * cs_l, O[2] - hi[2], cs_l);
        }
      }
    }
  });
}

// Writes `rows` phase-major accumulator rows (col2im_rows) to image rows
// starting at dst: image column iw is at [(iw % sw) * phase_len + iw / sw].
template <typename scalar_t, typename acc_t>
void store_band(const acc_t* acc, int64_t rows, int64_t phase_len, int64_t W, int64_t sw,
                scalar_t* dst, int64_t xs_h, int64_t xs_w) {
  const int64_t row_len = std::min(sw, W) * phase_len;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t phase = 0; phase < std::min(sw, W); ++phase) {
      const acc_t* a = acc + r * row_len + phase * phase_len;
      scalar_t* d = dst + r * xs_h + phase * xs_w;
      const int64_t count = (W - phase + sw - 1) / sw;
      for (int64_t j = 0; j < count; ++j) d[j * sw * xs_w] = static_cast<scalar_t>(a[j]);
    }
  }
}

// Adds the `len` column entries at src, `step` apart, into the accumulator
// run at a; contiguous entries (step 1) make a vectorisable add.
template <typename scalar_t, typename acc_t>
void add_run(acc_t* a, const scalar_t* src, int64_t len, int64_t step) {
  if (step == 1) {
    for (int64_t t = 0; t < len; ++t) a[t] += static_cast<acc_t>(src[t]);
  } else {
    for (int64_t t = 0; t < len; ++t) a[t] += static_cast<acc_t>(src[t * step]);
  }
}

template <typename scalar_t>
void col2im_rows(const at::Tensor& cols, const at::Tensor& bias, const at::Tensor& image,
                 const Window3& w) {
  using acc_t = sum_t<scalar_t>;
  const scalar_t* in = data_as<scalar_t>(cols);
  scalar_t* x = mutable_data_as<scalar_t>(image);
  const scalar_t* b = bias.defined() ? data_as<scalar_t>(bias) : nullptr;
  const int64_t bs = bias.defined() ? bias.stride(0) : 0;
  const int64_t xs_n = image.stride(0), xs_c = image.stride(1), xs_0 = image.stride(2),
                xs_h = image.stride(3), xs_w = image.stride(4);
  const int64_t cs_n = cols.stride(0), cs_r = cols.stride(1), cs_l = cols.stride(2);
  // Dimension 0 is gathered (window_at per image slice); dimensions 1 and 2
  // are the rows and columns of the banded, phase-split accumulator.
  const int64_t I0 = w.image[0], H = w.image[1], W = w.image[2];
  const int64_t O0 = w.windows[0], OH = w.windows[1], OW = w.windows[2];
  const int64_t k0n = w.kernel[0], kh = w.kernel[1], kw = w.kernel[2];
  const int64_t sh = w.stride[1], sw = w.stride[2], ph = w.padding[1], pw = w.padding[2];
  const int64_t dh = w.dilation[1], dw = w.dilation[2];
  const int64_t total_rows = w.batch * w.channels * I0 * H;
  const int64_t grain =
      std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, W * w.kernel_numel()));
  // One accumulator row per image row, phase-major: image column iw lives at
  // [(iw % sw) * phase_len + iw / sw].
  // Only phases below W occur (a stride larger than the row has fewer).
  const int64_t phase_len = (W + sw - 1) / sw;
  const int64_t row_len = std::min(sw, W) * phase_len;
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
    // The task's rows [begin, end), one band of one (n, c, i0) plane at a time.
    for (int64_t plane = begin / H; plane * H < end; ++plane) {
      const int64_t i0 = plane % I0, c = (plane / I0) % w.channels, n = plane / (I0 * w.channels);
      const scalar_t* plane_cols = in + n * cs_n + c * w.kernel_numel() * cs_r;
      const int64_t first = std::max<int64_t>(begin - plane * H, 0);
      const int64_t last = std::min(end - plane * H, H);
      for (int64_t ih0 = first; ih0 < last; ih0 += band_rows) {
        const int64_t rows = std::min(band_rows, last - ih0);
        std::fill(acc.begin(), acc.begin() + rows * row_len,
                  b ? static_cast<acc_t>(b[c * bs]) : acc_t(0));
        for (int64_t k0 = 0; k0 < k0n; ++k0) {
          // The window slice whose tap at k0 lands on this plane, if any.
          const int64_t o0 = window_at<int64_t>(i0, k0, w.stride[0], w.padding[0], w.dilation[0], O0);
          if (o0 < 0) continue;
          for (int64_t ki = 0; ki < kh; ++ki) {
            // The window rows whose tap at ki lands in image rows [ih0, ih0 + rows).
            int64_t oh_lo, oh_hi;
            taps_inside(rows, OH, ki, sh, ph + ih0, dh, &oh_lo, &oh_hi);
            for (int64_t kj = 0; kj < kw; ++kj) {
              const int64_t lo = ow_lo[kj], len = ow_hi[kj] - lo;
              if (len == 0) continue;
              const scalar_t* row = plane_cols + ((k0 * kh + ki) * kw + kj) * cs_r +
                                    (o0 * OH * OW + lo) * cs_l;
              for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
                const scalar_t* src = row + oh * OW * cs_l;
                acc_t* a = acc.data() + (tap<int64_t>(oh, ki, sh, ph, dh) - ih0) * row_len + acc_lo[kj];
                add_run(a, src, len, cs_l);
              }
            }
          }
        }
        store_band(acc.data(), rows, phase_len, W, sw,
                   x + n * xs_n + c * xs_c + i0 * xs_0 + ih0 * xs_h, xs_h, xs_w);
      }
    }
  });
}

// The private ops' CPU kernels (kernels.h).
void im2col_cpu(const at::Tensor& image, const at::Tensor& cols, at::IntArrayRef window) {
  dispatch_copy(image.scalar_type(), "im2col_cpu", [&](auto tag) {
    im2col_rows<typename decltype(tag)::type>(image, cols, unpack_window(window));
  });
}

void col2im_cpu(const at::Tensor& cols, const std::optional<at::Tensor>& bias,
                const at::Tensor& image, at::IntArrayRef window) {
  dispatch_sum(cols.scalar_type(), "col2im_cpu", [&](auto tag) {
    col2im_rows<typename decltype(tag)::type>(cols, bias.value_or(at::Tensor()), image,
                                              unpack_window(window));
  });
}

}  // namespace
}  // namespace convt_ext

TORCH_LIBRARY_IMPL(convt_ext, CPU, m) {
  m.impl("_im2col_into", &convt_ext::im2col_cpu);
  m.impl("_col2im_into", &convt_ext::col2im_cpu);
}
