// The view path's folded form (Note [The folded batch]): conv on small
// images, the batch folded into each tap's GEMM rows.
#include "view_forms.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "args.h"

namespace convt_ext::view_forms {

// Note [The folded batch]
// On small images the plane form (Note [The padded plane]) computes much
// that is thrown away, and reads the weights once per sample. ResNet's
// 512-channel layer at 5 x 5 pixels computes 7 virtual columns a row for 5
// real ones, and its padding taps on zeros: 1.9x the products that count.
// Its tasks are samples, so each reads all 9 MiB of the weights' panels.
// Folded, the batch becomes the innermost pixel dimension: the image is
// copied once into (I0, I1, I2, N, C), its rows split by phase at stride
// s2 > 1 as the plane's are (pixel i2 at (i2 % s2, i2 / s2)). Output row
// (o0, o1)'s tap (k0, k1, k2) reads pixel (o2 s2 + k2 d2 - p2, n) for each
// sample n and each o2 whose tap lies inside the image (taps_inside): in one
// phase, (hi - lo) N consecutive pixels, one matrix of leading dimension C. So one
// GEMM covers the row in every sample, a tap in the padding is never
// computed, and a task (one panel of kBlockN output channels over a run of
// output rows) reads each tap's panel once for the whole batch. The taps add
// into the task's product (its rows' (o2, n) pixels) in a fixed order,
// whatever the split into tasks, and the task writes it into the output's
// format while it is in the cache.

namespace {

// The output rows (o0, o1) one task covers: enough tasks for every core
// once the panels are shared out, and no more, since each task reads every
// tap's panel; no more rows than keep its product in the L2, which every
// tap sweeps; and a task count that shares out evenly over the cores (five
// tasks on two cores cost 64 channels at 24 px 15%).
int64_t rows_per_task(const Window3& call, int64_t panels, int64_t tasks) {
  const int64_t rows = call.windows[0] * call.windows[1];
  const int64_t fit = std::max<int64_t>(1, kFoldedProductRows / (call.batch * call.windows[2]));
  int64_t chunks = std::max((2 * tasks + panels - 1) / panels, (rows + fit - 1) / fit);
  const int64_t even = (panels * chunks + tasks - 1) / tasks * tasks;  // a multiple of the cores
  chunks = std::min(rows, (even + panels - 1) / panels);
  return (rows + chunks - 1) / chunks;
}

// Whether some output position along dimension i reads image position
// b through one of its taps, for every b.
std::vector<bool> read_positions(const Window3& call, int i) {
  std::vector<bool> read(call.image[i], false);
  for (int64_t k = 0; k < call.kernel[i]; ++k) {
    int64_t lo, hi;
    taps_inside(call.image[i], call.windows[i], k, call.stride[i], call.padding[i], call.dilation[i], &lo, &hi);
    for (int64_t o = lo; o < hi; ++o) read[tap<int64_t>(o, k, call.stride[i], call.padding[i], call.dilation[i])] = true;
  }
  return read;
}

// The folded image, (I0, I1, s2, Q2 = ceil(I2 / s2), N, C): image row
// pixel i2 at (i2 % s2, i2 / s2), and only the pixels some tap reads (a 1x1
// layer at stride 2 reads a quarter of them), each run of them in one phase
// of one sample by copy_pixels, in place of a permuted copy_.
at::Tensor fold_image(const at::Tensor& input, const Window3& call) {
  const at::Tensor folded = at::empty({call.image[0], call.image[1], call.stride[2],
                                       (call.image[2] + call.stride[2] - 1) / call.stride[2], call.batch,
                                       input.size(1)}, input.options());
  float* x = folded.mutable_data_ptr<float>();
  at::Tensor in = input;
  while (in.dim() < 2 + kMaxDims) in = in.unsqueeze(2);
  const int64_t N = call.batch, C = in.size(1), I1 = call.image[1], I2 = call.image[2];
  const int64_t s2 = call.stride[2], Q2 = (I2 + s2 - 1) / s2;
  const int64_t sn = in.stride(0), sc = in.stride(1), sp0 = in.stride(2), sp1 = in.stride(3), sp2 = in.stride(4);
  const std::vector<bool> read0 = read_positions(call, 0), read1 = read_positions(call, 1),
                          read2 = read_positions(call, 2);
  const float* src = in.const_data_ptr<float>();
  at::parallel_for(0, call.image[0] * I1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (!read0[r / I1] || !read1[r % I1]) continue;
      for (int64_t ph = 0; ph < std::min(s2, I2); ++ph) {
        // The phase's pixels i2 = ph + q s2, by runs of pixels that some tap reads.
        for (int64_t q0 = 0; ph + q0 * s2 < I2;) {
          if (!read2[ph + q0 * s2]) {
            ++q0;
            continue;
          }
          int64_t q1 = q0 + 1;
          while (ph + q1 * s2 < I2 && read2[ph + q1 * s2]) ++q1;
          const int64_t i2 = ph + q0 * s2;
          for (int64_t n = 0; n < N; ++n) {
            copy_pixels(src + n * sn + r / I1 * sp0 + r % I1 * sp1 + i2 * sp2, s2 * sp2, sc, C, q1 - q0,
                        x + (((r * s2 + ph) * Q2 + q0) * N + n) * C, N * C);
          }
          q0 = q1;
        }
      }
    }
  });
  return folded;
}

// Runs fn(t, r, lo, hi, at) for every kernel tap t = (k0, k1, k2), in order,
// and every output row r in [r0, r1) that it reaches inside the image: the
// row's pixels o2 in [lo, hi) read the folded image's (hi - lo) N
// consecutive pixels from pixel `at` on (in one phase at stride s2 > 1).
template <typename F>
void for_each_folded_tap(const Window3& call, int64_t r0, int64_t r1, const F& fn) {
  const int64_t I1 = call.image[1], I2 = call.image[2], O1 = call.windows[1], O2 = call.windows[2];
  const int64_t s2 = call.stride[2], Q2 = (I2 + s2 - 1) / s2;
  for (int64_t k0 = 0, t = 0; k0 < call.kernel[0]; ++k0) {
    for (int64_t k1 = 0; k1 < call.kernel[1]; ++k1) {
      for (int64_t k2 = 0; k2 < call.kernel[2]; ++k2, ++t) {
        int64_t lo, hi;
        taps_inside(I2, O2, k2, s2, call.padding[2], call.dilation[2], &lo, &hi);
        if (lo >= hi) continue;
        const int64_t i2 = tap<int64_t>(lo, k2, s2, call.padding[2], call.dilation[2]);
        for (int64_t r = r0; r < r1; ++r) {
          int64_t i0, i1;
          if (!tap_inside(call, 0, r / O1, k0, &i0) || !tap_inside(call, 1, r % O1, k1, &i1)) continue;
          fn(t, r, lo, hi, (((i0 * I1 + i1) * s2 + i2 % s2) * Q2 + i2 / s2) * call.batch);
        }
      }
    }
  }
}

}  // namespace

// Whether the folded form computes conv: rows short enough that the plane
// form's virtual columns and padding taps weigh, and not so many of them in
// the batch that a task's rows of the image leave the L2. Measured against
// the plane form (benchmarks/NOTES.md item 32), it wins up to 28 pixels (8 x
// 128 channels at 28 px: 8.4 against 9.5 ms NCHW) and breaks even or loses
// from 32 (8 x 64 channels at 40 px channels_last: 4.6 against 4.2). A
// batch of one is no exception: its GEMMs are short (5 rows at 5 x 5
// pixels) but the ukernel runs them near its peak, and a task per panel
// keeps every core busy where the plane form has one task a sample.
bool folded_form(const Window3& call) {
  return call.windows[2] <= kFoldedWidth && call.batch * call.windows[2] <= kFoldedMaxRows;
}

// Whether the folded form computes a conv_transpose, and the direct conv it
// computes: at stride 1 the guide's direct form (relationship 14,
// as_direct_conv) inserts no zeros, so it is conv with the kernel rotated,
// over the input, at padding d(k - 1) - p.
bool folded_transpose(const Window3& call, Window3* direct) {
  for (int d = 0; d < kMaxDims; ++d) {
    if (call.stride[d] != 1) return false;
  }
  int64_t inserted[kMaxDims];
  return as_direct_conv(call, direct, inserted) && folded_form(*direct);
}

// Its buffers' floats: the folded image, its phases' rows rounded up, and
// each task's product.
double folded_floats(const Window3& w, int64_t c_image, int64_t tasks) {
  const double image = double(w.image[0]) * w.image[1] * ((w.image[2] + w.stride[2] - 1) / w.stride[2]) * w.stride[2];
  return double(w.batch) * c_image * image + double(tasks) * kFoldedProductRows * kBlockN;
}

void conv_folded(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                 const Window3& call, int64_t groups, int64_t O, const at::Tensor& out, bool rotated) {
  const int64_t N = call.batch, C = input.size(1), Cg = C / groups, Og = O / groups, O2 = call.windows[2];
  const int64_t rows = call.windows[0] * call.windows[1], plane = rows * O2, row = O2 * N;  // a row's GEMM rows
  const at::Tensor x = fold_image(input, call);
  const float* px = x.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  const bool pixels_out = pixel_memory(out);
  const int64_t panels = groups * wt.blocks;
  const int64_t per_task = rows_per_task(call, panels, tasks_at_once(input));
  const int64_t chunks = (rows + per_task - 1) / per_task;
  run_tasks(input, panels * chunks, [&](int64_t, int64_t task, int64_t& calls) {
    // Chunk-major, so that each core's range of tasks holds every panel (a
    // last panel narrower than kBlockN is less work).
    const int64_t g = task % panels / wt.blocks, n0 = task % panels % wt.blocks * kBlockN;
    const int64_t r0 = task / panels * per_task, r1 = std::min(r0 + per_task, rows);
    const int64_t c0 = g * Og + n0, nc = std::min(kBlockN, Og - n0);
    // The task's product: rows (r, o2, n) of kBlockN channels, from the bias.
    float* pc = scratch(Slot::Product, {kFoldedProductRows, kBlockN}, input.options()).mutable_data_ptr<float>();
    for (int64_t m = 0; m < (r1 - r0) * row; ++m) {
      if (pb) std::memcpy(pc + m * kBlockN, pb + c0, nc * sizeof(float)); else std::fill(pc + m * kBlockN, pc + m * kBlockN + nc, 0.f);
    }
    // Tap by tap (its panel stays in the cache), each row of the run.
    for_each_folded_tap(call, r0, r1, [&](int64_t t, int64_t r, int64_t lo, int64_t hi, int64_t at) {
      const float* a = px + at * C + g * Cg;
      const float* b = wt.at(g, rotated ? wt.T - 1 - t : t, n0);  // rotated: flat tap T - 1 - t
      float* c = pc + ((r - r0) * row + lo * N) * kBlockN;
      // At most kPlaneRows rows a GEMM, as the plane form's.
      for (int64_t m0 = 0, m = (hi - lo) * N; m0 < m; m0 += kPlaneRows, ++calls) {
        tap_gemm(std::min(kPlaneRows, m - m0), nc, Cg, a + m0 * C, C, b, wt.ld, c + m0 * kBlockN, kBlockN);
      }
    });
    // Into the output's format while the product is in the cache.
    if (pixels_out) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t m = 0; m < row; ++m) {
          std::memcpy(py + (m % N * plane + r * O2 + m / N) * O + c0, pc + ((r - r0) * row + m) * kBlockN,
                      nc * sizeof(float));
        }
      }
      return;
    }
    // Planar: each channel's pixels of the run, (r, o2), are one run of the
    // output. By blocks of 8 channels x 8 pixels: a plane of 1024 floats puts
    // every channel's run in one L1 set, which 8 lines at a time do not
    // overflow (8 x 64 channels at 32 px, NCHW: 4.9 ms unblocked, torch 2.8).
    const int64_t count = (r1 - r0) * O2;
    int64_t at[kFoldedProductRows];  // pixel m's first product row
    for (int64_t m = 0; m < count; ++m) at[m] = ((m / O2) * row + (m % O2) * N) * kBlockN;
    for (int64_t n = 0; n < N; ++n) {
      const float* src = pc + n * kBlockN;
      for (int64_t j0 = 0; j0 < nc; j0 += 8) {
        const int64_t j1 = std::min(j0 + 8, nc);
        for (int64_t m0 = 0; m0 < count; m0 += 8) {
          const int64_t m1 = std::min(m0 + 8, count);
          for (int64_t j = j0; j < j1; ++j) {
            float* to = py + (n * O + c0 + j) * plane + r0 * O2;
            for (int64_t m = m0; m < m1; ++m) to[m] = src[at[m] + j];
          }
        }
      }
    }
  });
}

// Whether the folded form computes the weight gradient: where it computes
// conv, with two panels of input channels for every core. Its tasks are the
// panels, each the sole writer of its columns of every tap's gradient, so
// there are no partial sums to add up (Note [The folded batch]); with fewer
// panels than that the plane form's tasks share the cores better (8 x 128
// channels at 16 px: 3.8 ms folded on two panels, 3.3 ms on the plane).
bool folded_weight(const Window3& call, int64_t groups, int64_t c_image, int64_t tasks) {
  return folded_form(call) && groups * ((c_image / groups + kBlockN - 1) / kBlockN) >= 2 * tasks;
}

// The folded form of the weight gradient into dw (G, T, Og, Cg):
// dw_t += dy_r^T . x_t,r over the output rows r, where dy_r^T is grad_output's
// row turned (channels x the row's (o2, n) pixels) and x_t,r the folded image's
// pixels that tap t reads for the row, conv's A operand, here the B.
void weight_folded(const at::Tensor& input, const at::Tensor& grad_output, const Window3& call,
                   int64_t groups, const at::Tensor& dw) {
  const int64_t N = call.batch, C = input.size(1), O = grad_output.size(1), Cg = C / groups, Og = O / groups;
  const int64_t O1 = call.windows[1], O2 = call.windows[2];
  const int64_t rows = call.windows[0] * O1, row = O2 * N, T = call.kernel_numel();
  const at::Tensor x = fold_image(input, call);
  // grad_output turned, row by row: (rows, O, row), pixel m = o2 N + n.
  const at::Tensor turned = at::empty({rows, O, row}, input.options());
  {
    at::Tensor dy = grad_output;
    while (dy.dim() < 2 + kMaxDims) dy = dy.unsqueeze(2);
    const int64_t sn = dy.stride(0), so = dy.stride(1), s0 = dy.stride(2), s1 = dy.stride(3), sw = dy.stride(4);
    const float* pdy = dy.const_data_ptr<float>();
    float* pt = turned.mutable_data_ptr<float>();
    at::parallel_for(0, rows * O, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / O, o = i % O;
        const float* from = pdy + o * so + r / O1 * s0 + r % O1 * s1;
        float* to = pt + i * row;
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t o2 = 0; o2 < O2; ++o2) to[o2 * N + n] = from[n * sn + o2 * sw];
        }
      }
    });
  }
  const float* px = x.const_data_ptr<float>();
  const float* pt = turned.const_data_ptr<float>();
  float* pw = dw.mutable_data_ptr<float>();
  const int64_t blocks = (Cg + kBlockN - 1) / kBlockN;
  run_tasks(input, groups * blocks, [&](int64_t, int64_t task, int64_t& calls) {
    const int64_t g = task / blocks, n0 = task % blocks * kBlockN, nc = std::min(kBlockN, Cg - n0);
    // Taps [t0, t1) that no GEMM reaches (all their windows in the padding) are zero.
    const auto zero_taps = [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t o = 0; o < Og; ++o) {
          float* at = pw + ((g * T + t) * Og + o) * Cg + n0;
          std::fill(at, at + nc, 0.f);
        }
      }
    };
    // The taps come in order; each one's first GEMM writes its block, the
    // rest add to it, so the block is never zeroed first (9.4 MB a call at
    // 512 x 512 3x3, benchmarks/NOTES.md item 38).
    int64_t last = -1;
    for_each_folded_tap(call, 0, rows, [&](int64_t t, int64_t r, int64_t lo, int64_t hi, int64_t at) {
      if (t != last) zero_taps(last + 1, t);
      const float* a = pt + (r * O + g * Og) * row + lo * N;
      tap_gemm(Og, nc, (hi - lo) * N, a, row, px + at * C + g * Cg + n0, C, pw + (g * T + t) * Og * Cg + n0, Cg,
               t == last);
      last = t;
      ++calls;
    });
    zero_taps(last + 1, T);
  });
}

}  // namespace convt_ext::view_forms
