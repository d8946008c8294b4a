// The view path's plane form (Note [The padded plane], below): conv and the
// weight gradient over a padded copy of the image in which a tap's operand
// for many output rows is one matrix; and the blocks of virtual rows that
// the phase form (view_phases.cpp) computes too.
#include "view_forms.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "args.h"

namespace convt_ext::view_forms {

namespace {

// Note [The padded plane]
// The row form's GEMMs are one output row long: M = 7 or 14 for ResNet's
// late layers, 4 to 32 for DCGAN's, too few rows for the ukernel. The plane
// form makes M as long as it likes. The image is copied once into a zeroed
// plane (N, I0, s1, rows, width, C): the padding is written out, and image
// row i1 (padded: i1 + p1) goes to phase (i1 + p1) % s1, row (i1 + p1) / s1.
// Then output row o1's tap k1 reads phase (k1 d1) % s1, row o1 + (k1 d1) / s1:
// consecutive output rows read consecutive rows of one phase. With width a
// multiple of s2 and wv = width / s2, the output's "virtual" pixel
// m = o1 wv + o2 reads plane pixel m s2 + k2 d2 of that phase from the tap's
// first row on, a single matrix of leading dimension s2 C for every m. The
// wv - O2 virtual columns past each output row are computed and dropped (or,
// in the weight gradient, meet zeros). A planar input needs one conversion
// anyway, which the plane replaces; the output is written from each task's
// block straight into its format. Rows below (k2 - 1) d2 read past a
// phase's last row: one row of zeros more per phase keeps them inside.
struct Plane {
  at::Tensor data;
  int64_t phases, rows, width, wv;
  // The first element that tap (k1, k2) of output row 0 reads, in image plane i0 of sample n.
  int64_t at(const Window3& w, int64_t n, int64_t i0, int64_t k1, int64_t k2, int64_t c) const {
    const int64_t r1 = k1 * w.dilation[1];
    return ((((n * w.image[0] + i0) * phases + r1 % phases) * rows + r1 / phases) * width +
            k2 * w.dilation[2]) * c;
  }
};

// The plane's virtual row width (make_plane's wv).
int64_t plane_wv(const Window3& w) {
  const int64_t s2 = w.stride[2];
  const int64_t span2 = (w.windows[2] - 1) * s2 + (w.kernel[2] - 1) * w.dilation[2] + 1;
  return (span2 + s2 - 1) / s2;
}

// The plane, one plane row a task: its padding zeroed, its image pixels
// copied (copy_pixels; in place of zeros() and a permuted copy_).
Plane make_plane(const at::Tensor& image, const Window3& w) {
  Plane pl;
  const int64_t s1 = w.stride[1], C = image.size(1);
  const int64_t span1 = (w.windows[1] - 1) * s1 + (w.kernel[1] - 1) * w.dilation[1] + 1;
  pl.phases = s1;
  pl.rows = (span1 + s1 - 1) / s1 + 1;  // plane_floats counts the same
  pl.wv = plane_wv(w);
  pl.width = pl.wv * w.stride[2];
  pl.data = at::empty({w.batch, w.image[0], s1, pl.rows, pl.width, C}, image.options());
  at::Tensor x = image;
  while (x.dim() < 2 + kMaxDims) x = x.unsqueeze(2);
  const int64_t sn = x.stride(0), sc = x.stride(1), sp0 = x.stride(2), sp1 = x.stride(3), sp2 = x.stride(4);
  const int64_t p1 = w.padding[1], p2 = w.padding[2], I1 = w.image[1], width = pl.width, rows = pl.rows;
  const int64_t cols = std::max<int64_t>(0, std::min(w.image[2], width - std::min(p2, width)));
  const float* src = x.const_data_ptr<float>();
  float* dst = pl.data.mutable_data_ptr<float>();
  const int64_t total = w.batch * w.image[0] * s1 * rows;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t % rows, phase = t / rows % s1, i0 = t / rows / s1 % w.image[0];
      const int64_t n = t / rows / s1 / w.image[0];
      float* d = dst + t * width * C;
      const int64_t i1 = row * s1 + phase - p1;  // the image row this plane row holds
      if (i1 < 0 || i1 >= I1 || cols == 0) {
        std::fill(d, d + width * C, 0.f);
        continue;
      }
      std::fill(d, d + p2 * C, 0.f);
      std::fill(d + (p2 + cols) * C, d + width * C, 0.f);
      copy_pixels(src + n * sn + i0 * sp0 + i1 * sp1, sp2, sc, C, cols, d + p2 * C, C);
    }
  });
  return pl;
}

}  // namespace

// A planar image's pixels by blocks of 8 channels x 8 pixels, each block's
// reads and writes 8 lines apiece, so that neither the channel stride nor
// the destination's pixel stride thrashes a cache set (8 x 64 channels at
// 32 px NCHW, benchmarks/NOTES.md item 32); a pixel-memory image's a run of
// C floats at a time.
void copy_pixels(const float* from, int64_t sp, int64_t sc, int64_t C, int64_t count, float* to,
                 int64_t step) {
  if (sc == 1) {
    for (int64_t q = 0; q < count; ++q) std::memcpy(to + q * step, from + q * sp, C * sizeof(float));
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += 8) {
    const int64_t c1 = std::min(c0 + 8, C);
    for (int64_t q0 = 0; q0 < count; q0 += 8) {
      const int64_t q1 = std::min(q0 + 8, count);
      for (int64_t q = q0; q < q1; ++q) {
        for (int64_t c = c0; c < c1; ++c) to[q * step + c] = from[c * sc + q * sp];
      }
    }
  }
}

// Whether the plane form computes conv or the weight gradient (Note [The
// padded plane]): a planar image needs a copy anyway, and short output rows
// are too few for the ukernel; a channels-last image with long rows is read
// in place by the row form.
bool plane_form(const at::Tensor& image, const Window3& call) {
  return !pixel_memory(image) || call.windows[2] < kWideRows;  // view_offer counts the same
}

// The floats of make_plane's plane of a `c`-channel image.
// (In double: a padding as large as the image's int64 bound allows makes a
// plane no tensor could be.)
double plane_floats(const Window3& w, int64_t c) {
  const int64_t s1 = w.stride[1];
  const int64_t span1 = (w.windows[1] - 1) * s1 + (w.kernel[1] - 1) * w.dilation[1] + 1;
  return double(w.batch) * w.image[0] * s1 * ((span1 + s1 - 1) / s1 + 1) * double(plane_wv(w)) *
         w.stride[2] * c;
}

// The tasks weight_plane runs.
int64_t plane_form_tasks(const Window3& call) {
  return call.batch * call.windows[0] *
         ((call.windows[1] * plane_wv(call) + kPlaneRows - 1) / kPlaneRows);
}

// For the virtual rows [m0, m1) of a plane of row width wv, the offset of
// each real one, o1 * row + o2 * col (o1 = m / wv, o2 = m % wv < O2), or -1
// for a dropped one.
void virtual_places(int64_t m0, int64_t m1, int64_t wv, int64_t O2, int64_t row, int64_t col,
                    int64_t* at) {
  int64_t o1 = m0 / wv, o2 = m0 % wv;
  for (int64_t m = 0; m < m1 - m0; ++m) {
    at[m] = o2 < O2 ? o1 * row + o2 * col : -1;
    if (++o2 == wv) {
      o2 = 0;
      ++o1;
    }
  }
}

// A block of `rows` virtual rows of O channels (row m at block + m * O),
// into sample n of an output of `plane` pixels a channel, from pixel
// `offset` on: row m to pixel offset + at[m], or nowhere where at[m] is -1.
// Pixel rows into pixel memory, or each channel's run of pixels into a
// planar output; each row's place is found once (virtual_places), not per
// channel.
void write_block(const float* block, int64_t rows, const int64_t* at, float* out, bool pixels_out,
                 int64_t n, int64_t O, int64_t plane, int64_t offset) {
  if (pixels_out) {
    for (int64_t m = 0; m < rows; ++m) {
      if (at[m] >= 0) std::memcpy(out + (n * plane + offset + at[m]) * O, block + m * O, O * sizeof(float));
    }
    return;
  }
  // By blocks of 8 channels x 8 rows, as make_plane reads (8 x 64 channels
  // at 40 px NCHW: the block is 32 KiB, which a channel at a time re-reads
  // from the L2).
  for (int64_t o0 = 0; o0 < O; o0 += 8) {
    for (int64_t m0 = 0; m0 < rows; m0 += 8) {
      for (int64_t o = o0; o < std::min(o0 + 8, O); ++o) {
        float* dst = out + (n * O + o) * plane + offset;
        for (int64_t m = m0; m < std::min(m0 + 8, rows); ++m) {
          if (at[m] >= 0) dst[at[m]] = block[m * O + o];
        }
      }
    }
  }
}

// A task's block of kPlaneRows rows of O channels, set to the bias (or zero).
float* start_block(const at::Tensor& like, int64_t rows, int64_t O, const float* bias) {
  float* pc = scratch(Slot::Product, {kPlaneRows, O}, like.options()).mutable_data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m) {
    if (bias) std::memcpy(pc + m * O, bias, O * sizeof(float)); else std::fill(pc + m * O, pc + (m + 1) * O, 0.f);
  }
  return pc;
}

// The plane form of conv: a task computes kPlaneRows virtual rows of one
// output plane (n, o0) into its block, then writes the real ones out.
void conv_plane(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                const Window3& call, int64_t groups, int64_t O, const at::Tensor& out) {
  const int64_t C = input.size(1), Cg = C / groups, Og = O / groups;
  const Plane pl = make_plane(input, call);
  const int64_t O0 = call.windows[0], O1 = call.windows[1], O2 = call.windows[2];
  const int64_t virtual_rows = O1 * pl.wv, blocks = (virtual_rows + kPlaneRows - 1) / kPlaneRows;
  const float* px = pl.data.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  // out is (N, O, *windows) in pixel memory or planar: the strides of a channel and a pixel.
  const bool pixels_out = pixel_memory(out);
  const int64_t s2 = call.stride[2];
  run_tasks(input, call.batch * O0 * blocks, [&](int64_t, int64_t task, int64_t& calls) {
    const int64_t m0 = task % blocks * kPlaneRows, m1 = std::min(m0 + kPlaneRows, virtual_rows);
    const int64_t o0 = task / blocks % O0, n = task / blocks / O0;
    float* pc = start_block(input, m1 - m0, O, pb);
    for_each_tap(call, o0, [&](int64_t t, int64_t i0, int64_t k1, int64_t k2) {
      const float* a = px + pl.at(call, n, i0, k1, k2, C) + m0 * s2 * C;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
          tap_gemm(m1 - m0, std::min(kBlockN, Og - n0), Cg, a + g * Cg, s2 * C, wt.at(g, t, n0), wt.ld,
                   pc + g * Og + n0, O);
        }
      }
    });
    int64_t at[kPlaneRows];
    virtual_places(m0, m1, pl.wv, O2, O2, 1, at);
    write_block(pc, m1 - m0, at, py, pixels_out, n, O, O0 * O1 * O2, o0 * O1 * O2);
  });
}

// The plane form of the weight gradient: grad_output's block turned onto
// the virtual rows, zero on the dropped ones, against the plane's views.
void weight_plane(const at::Tensor& input, const at::Tensor& grad_output, const Window3& call,
                  int64_t groups, const at::Tensor& partials) {
  const int64_t C = input.size(1), O = grad_output.size(1), Cg = C / groups, Og = O / groups;
  const int64_t T = call.kernel_numel();
  const Plane pl = make_plane(input, call);
  const int64_t O0 = call.windows[0], O1 = call.windows[1], O2 = call.windows[2];
  const int64_t virtual_rows = O1 * pl.wv, blocks = (virtual_rows + kPlaneRows - 1) / kPlaneRows;
  at::Tensor dy = grad_output;
  while (dy.dim() < 2 + kMaxDims) dy = dy.unsqueeze(2);
  const int64_t sn = dy.stride(0), sc = dy.stride(1), s0 = dy.stride(2), s1 = dy.stride(3), s2 = dy.stride(4);
  const float* pdy = dy.const_data_ptr<float>();
  const float* px = pl.data.const_data_ptr<float>();
  float* pp = partials.mutable_data_ptr<float>();
  const int64_t stride2 = call.stride[2];
  run_tasks(input, call.batch * O0 * blocks, [&](int64_t range, int64_t task, int64_t& calls) {
    const int64_t m0 = task % blocks * kPlaneRows, m1 = std::min(m0 + kPlaneRows, virtual_rows);
    const int64_t o0 = task / blocks % O0, n = task / blocks / O0;
    const at::Tensor turned = scratch(Slot::Operand, {O, kPlaneRows}, input.options());
    float* pt = turned.mutable_data_ptr<float>();
    int64_t at[kPlaneRows];
    virtual_places(m0, m1, pl.wv, O2, s1, s2, at);
    for (int64_t o = 0; o < O; ++o) {
      const float* src = pdy + n * sn + o * sc + o0 * s0;
      float* dst = pt + o * kPlaneRows;
      for (int64_t m = 0; m < m1 - m0; ++m) dst[m] = at[m] >= 0 ? src[at[m]] : 0.f;
    }
    float* part = pp + range * groups * T * Og * Cg;
    for_each_tap(call, o0, [&](int64_t t, int64_t i0, int64_t k1, int64_t k2) {
      const float* b = px + pl.at(call, n, i0, k1, k2, C) + m0 * stride2 * C;
      for (int64_t g = 0; g < groups; ++g) {
        float* dw_t = part + (g * T + t) * Og * Cg;
        for (int64_t n0 = 0; n0 < Cg; n0 += kBlockN, ++calls) {
          tap_gemm(Og, std::min(kBlockN, Cg - n0), m1 - m0, pt + g * Og * kPlaneRows, kPlaneRows,
                   b + g * Cg + n0, stride2 * C, dw_t + n0, Cg);
        }
      }
    });
  });
}

}  // namespace convt_ext::view_forms
