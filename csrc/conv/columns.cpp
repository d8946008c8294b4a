// The column path (columns.h): plans, blocks, wide chunks and 1x1 pixel
// rows, each convolution's GEMMs through the engine layer (../gemm.h).
#include "columns.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../gemm.h"
#include "../ops.h"
#include "../plan.h"
#include "args.h"

namespace convt_ext {

namespace {

// im2col of the window box [lo, hi) of image (b, C, I0, I1, I2) into cols
// (b, rows, box positions): the same columns, read from just the image
// region they tap, with whatever padding remains before it (the relation
// only uses the low padding; the high side is implied by the window count).
void im2col_box(const at::Tensor& image, const at::Tensor& cols, Window3 w, const int64_t* lo,
                const int64_t* hi) {
  at::Tensor region = image;
  for (int i = 0; i < kMaxDims; ++i) {
    const int64_t top = lo[i] * w.stride[i] - w.padding[i];  // first tap, maybe < 0
    const int64_t end = (hi[i] - 1) * w.stride[i] - w.padding[i] +
                        w.dilation[i] * (w.kernel[i] - 1) + 1;  // one past the last tap
    const int64_t r0 = std::clamp<int64_t>(top, 0, w.image[i]);
    const int64_t r1 = std::clamp<int64_t>(end, r0, w.image[i]);
    w.padding[i] = r0 - top;
    w.image[i] = r1 - r0;
    w.windows[i] = hi[i] - lo[i];
    region = part(region, 2 + i, r0, r1 - r0);
  }
  w.batch = image.size(0);
  im2col_into(region, cols, w);
}

// The window positions [*o_lo, *o_hi) along one dimension whose taps reach
// image positions [lo, hi): o*s - p + d(k-1) >= lo and o*s - p <= hi - 1.
void windows_reaching(const Window3& w, int i, int64_t lo, int64_t hi, int64_t* o_lo,
                      int64_t* o_hi) {
  const int64_t s = w.stride[i], p = w.padding[i], span = w.dilation[i] * (w.kernel[i] - 1);
  const int64_t first = lo + p - span;  // o*s >= first
  *o_lo = first <= 0 ? 0 : (first + s - 1) / s;
  *o_hi = std::min(w.windows[i], (hi - 1 + p) / s + 1);
  *o_lo = std::min(*o_lo, *o_hi);
}

// Runs fn(range, n, first, count, cols) for every block of window positions
// of every sample, on the task's thread (range: for_each_task's): cols (rows, count) are the columns of
// sample n's window positions [first, first + count). With
// `input_is_columns`, the input (contiguous) is its own column matrix.
template <typename F>
void for_each_column_block(const DevicePolicy& policy, const at::Tensor& x, const Window3& call,
                           int64_t rows, bool input_is_columns, const F& fn,
                           int64_t cap = INT64_MAX) {
  const int64_t L = call.window_numel(), elem = x.element_size();
  int64_t inner[kMaxDims + 1];
  inner[kMaxDims] = 1;
  for (int i = kMaxDims - 1; i >= 0; --i) inner[i] = inner[i + 1] * call.windows[i];
  const Blocks blocks =
      plan_blocks(call.windows, input_is_columns ? INT64_MAX : std::min(cap, task_budget(policy)), call.batch, policy.tasks,
                  [&](int dim, int64_t count) { return rows * elem * inner[dim + 1] * count; });
  const int64_t max_positions = inner[blocks.dim + 1] * blocks.count;
  const at::Tensor x5 = lift(x);
  for_each_task(policy, call.batch * blocks.per_sample(), [&](int64_t range, int64_t begin, int64_t end) {
    const at::Tensor buffer = input_is_columns ? at::Tensor() : scratch(policy, Slot::Columns, {rows, max_positions}, x.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks.per_sample();
      int64_t lo[kMaxDims], hi[kMaxDims];
      blocks.at(t % blocks.per_sample(), lo, hi);
      const int64_t first = flat_offset(lo, call.windows), count = box_numel(lo, hi);
      at::Tensor c;
      if (input_is_columns) {
        c = part(x.select(0, n).view({rows, L}), 1, first, count);
      } else {
        c = part(buffer, 1, 0, count);
        im2col_box(part(x5, 0, n, 1), c.unsqueeze(0), call, lo, hi);
      }
      fn(range, n, first, count, c);
    }
  });
}

// The wide path's loop (Note [Column plans and the workspace limit]): for
// every chunk of `chunk` samples [n0, n0 + b) of image, fn(n0, b, cols) with
// cols (rows, b*L) the columns of their windows side by side.
template <typename F>
void for_each_wide_chunk(const DevicePolicy& policy, const at::Tensor& image, const Window3& call,
                         int64_t chunk, const F& fn) {
  const int64_t N = image.size(0), rows = call.rows(), L = call.window_numel();
  const ColumnBuffer cols(policy, Slot::Columns, chunk, rows, L, image.options());
  const at::Tensor x5 = lift(image);
  const int64_t lo[kMaxDims] = {0, 0, 0};
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t b = std::min(chunk, N - n0);
    im2col_box(part(x5, 0, n0, b), cols.samples(b), call, lo, call.windows);
    fn(n0, b, cols.matrix(b));
  }
}

// (b, C, L) -> (C, b*L): the samples of `t` side by side, in `buf`.
at::Tensor side_by_side(const at::Tensor& t, const ColumnBuffer& buf) {
  const int64_t b = t.size(0);
  buf.samples(b).copy_(t);
  return buf.matrix(b);
}

// gemm over the columns of out and b, split into for_each_task's ranges: a
// multi-threaded GEMM with a fixed split.
void gemm_columns(const DevicePolicy& policy, const at::Tensor& out, const at::Tensor& a,
                  const at::Tensor& b, const at::Tensor& add) {
  for_each_task(policy, out.size(2), [&](int64_t, int64_t begin, int64_t end) {
    gemm(part(out, 2, begin, end - begin), a, part(b, 2, begin, end - begin), add);
  });
}

// One chunk of the wide path's conv: y[n0, n0 + b) = w3 . c (+ b3), where c
// holds the chunk's columns side by side; the GEMM writes the (G, C/G, b*L)
// scratch `wide`, permuted into the samples by one copy.
void wide_conv(const DevicePolicy& policy, const at::Tensor& y, int64_t n0, int64_t b,
               const at::Tensor& wide, const at::Tensor& w3, const at::Tensor& c,
               const at::Tensor& b3) {
  const int64_t C = y.size(1), L = y.size(2);
  const at::Tensor yw = wide.narrow(2, 0, b * L);
  gemm_columns(policy, yw, w3, c, b3);
  y.narrow(0, n0, b).copy_(yw.view({C, b, L}).permute({1, 0, 2}));
}

// A weight gradient summed over blocks: each of for_each_task's fixed ranges
// sums into its own partial, and the partials are added in range order, so
// the result is the same for any thread count (Note [Determinism across
// thread counts]). The first range sums into the total itself, which is
// zeros until then, so a call with one range (a GPU's plan, a small call)
// allocates and adds no partial.
struct PartialSums {
  at::Tensor total;  // (G, M, N), zeros
  std::vector<at::Tensor> partial;
  PartialSums(at::Tensor zeros, const DevicePolicy& policy)
      : total(std::move(zeros)), partial(policy.tasks) {}
  // partial[range] += a . b, per group.
  void add(int64_t range, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor& acc = partial[range];
    if (!acc.defined()) acc = range == 0 ? total : at::zeros_like(total);
    gemm(acc, a, b, at::Tensor(), true);
  }
  const at::Tensor& sum() {
    for (const at::Tensor& p : partial) {
      if (p.defined() && !p.is_same(total)) total.add_(p);
    }
    return total;
  }
};

// sums += a . c^T over a wide chunk: the reduction over its b*L positions
// split into for_each_task's fixed ranges, each into its own partial.
void wide_weight_sum(const DevicePolicy& policy, PartialSums& sums, const at::Tensor& a,
                     const at::Tensor& c) {
  for_each_task(policy, a.size(2), [&](int64_t range, int64_t begin, int64_t end) {
    sums.add(range, part(a, 2, begin, end - begin), part(c, 2, begin, end - begin).transpose(1, 2));
  });
}

// The bias as (G, C/G, 1), ready to broadcast over a GEMM's columns.
at::Tensor group_bias(const std::optional<at::Tensor>& bias, int64_t groups) {
  return bias.has_value() ? bias->reshape({groups, -1, 1}) : at::Tensor();
}

// The pixels of a channels_last image (N, C, *spatial) as the rows of an
// (N*L, C) matrix: a view (Note [Memory format]).
at::Tensor pixel_rows(const at::Tensor& t) { return t.movedim(1, -1).reshape({-1, t.size(1)}); }

// Rows [begin, end) of a pixel-row matrix (R, G*c) as the (G, end - begin, c)
// view of its groups' columns: the groups' columns interleave in a pixel
// row, so each group's rows are one strided matrix, and the groups one
// strided batch of them.
at::Tensor group_rows(const at::Tensor& rows, int64_t groups, int64_t begin, int64_t end) {
  return rows.narrow(0, begin, end - begin).view({end - begin, groups, rows.size(1) / groups}).transpose(0, 1);
}

// A 1x1 layer (stride 1, no padding) on a channels_last input: for every
// group g, rows(out)_g = rows(a)_g . w3[g] (+ bias_g), one GEMM batched over
// the groups per fixed range of rows. w3 is (G, C_in/G, C_out/G).
at::Tensor pixel_rows_gemm(const DevicePolicy& policy, const at::Tensor& a, at::Tensor out,
                           int64_t groups, const std::optional<at::Tensor>& bias,
                           const at::Tensor& w3) {
  if (out.numel() == 0) return out;
  const at::Tensor x = pixel_rows(a), y = pixel_rows(out);
  const at::Tensor b3 = bias.has_value() ? bias->reshape({groups, 1, -1}) : at::Tensor();
  for_each_task(policy, x.size(0), [&](int64_t, int64_t begin, int64_t end) {
    gemm(group_rows(y, groups, begin, end), group_rows(x, groups, begin, end), w3, b3);
  });
  return out;
}

}  // namespace

// ---- conv

void conv_columns(const at::Tensor& image, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups,
                  const at::Tensor& y, bool pointwise, const DevicePolicy& policy) {
  const int64_t G = groups, L = call.window_numel(), rows = call.rows(), C_out = y.size(1);
  const at::Tensor w3 = weight.reshape({G, C_out / G, rows / G});
  const at::Tensor b3 = group_bias(bias, G);
  const int64_t cap = forward_tile_cap(policy, G, L);
  if (const int64_t chunk = wide_chunk(policy, image, L, rows, C_out, pointwise, cap)) {
    const at::Tensor wide_out =
        scratch(policy, Slot::Product, {G, C_out / G, chunk * L}, image.options());
    for_each_wide_chunk(policy, image, call, chunk, [&](int64_t n0, int64_t b, const at::Tensor& cols) {
      wide_conv(policy, y, n0, b, wide_out, w3, cols.view({G, rows / G, b * L}), b3);
    });
    return;
  }
  const at::Tensor x = pointwise ? image.contiguous() : image;
  for_each_column_block(policy, x, call, rows, pointwise, [&](int64_t, int64_t n, int64_t first, int64_t count, const at::Tensor& c) {
    gemm(part(y.select(0, n), 1, first, count).view({G, C_out / G, count}), w3,
         c.view({G, rows / G, count}), b3);
  }, cap);
}

at::Tensor conv_pixel_rows(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t groups,
                           at::Tensor out, const DevicePolicy& policy) {
  // W_g^T: (G, C_in/G, C_out/G), copied row-major (O*C values) so that the
  // ukernel, which takes no transposed operand, can run the GEMM over all
  // the pixels: through a transposed view the engine fell back to MKL, which
  // scales C by beta = 0 in a pass of its own before the product (0.39x torch
  // on a 16 -> 96 layer at 80x80 px; benchmarks/NOTES.md item 33).
  const at::Tensor w3 =
      weight.reshape({groups, weight.size(0) / groups, weight.size(1)}).transpose(1, 2).contiguous();
  return pixel_rows_gemm(policy, input, std::move(out), groups, bias, w3);
}

// ---- conv_transpose

namespace {

// y[n] = wt3 . x[n] (+ b3) for every sample n, per group: y (n, G, M, L),
// x (n, G, K, L), wt3 (G, M, K), b3 (G, M, 1) or undefined. The weight is
// one strided batch over the samples (stride 0), or over the groups, not
// over both: so one GEMM batched over the samples per group, or over the
// groups per sample, whichever makes fewer calls (one without groups).
void gemm_each_sample(const at::Tensor& y, const at::Tensor& wt3, const at::Tensor& x,
                      const at::Tensor& b3) {
  const int64_t n = y.size(0), G = wt3.size(0);
  if (n < G) {
    for (int64_t i = 0; i < n; ++i) gemm(y.select(0, i), wt3, x.select(0, i), b3);
    return;
  }
  for (int64_t g = 0; g < G; ++g) {
    const at::Tensor yg = y.select(1, g), w = wt3.select(0, g);
    gemm(yg, w.expand({n, w.size(0), w.size(1)}), x.select(1, g),
         b3.defined() ? b3.select(0, g).expand({n, w.size(0), 1}) : at::Tensor());
  }
}

// A 1x1 kernel (stride 1, no padding, no output_padding): col2im is the
// identity, so the GEMM writes the output. The tasks take ranges of samples,
// or, with fewer samples than tasks, ranges of each sample's columns.
void conv_transpose_pointwise(const DevicePolicy& policy, const at::Tensor& x,
                              const at::Tensor& wt3, const at::Tensor& b3, const at::Tensor& out,
                              int64_t L) {
  const int64_t N = x.size(0), C_in = x.size(1), G = wt3.size(0);
  const at::Tensor y = out.view({N, G, out.size(1) / G, L});
  const at::Tensor x4 = x.view({N, G, C_in / G, L});
  const bool by_columns = N < policy.tasks;
  for_each_task(policy, by_columns ? L : N, [&](int64_t, int64_t begin, int64_t end) {
    const int dim = by_columns ? 3 : 0;
    gemm_each_sample(part(y, dim, begin, end - begin), wt3, part(x4, dim, begin, end - begin), b3);
  });
}

// The wide path: the columns of a chunk of samples side by side, one GEMM,
// then col2im of the chunk.
void conv_transpose_wide(const DevicePolicy& policy, const at::Tensor& x, const at::Tensor& wt3,
                         const at::Tensor& bias_1d, const Window3& call, int64_t chunk,
                         const at::Tensor& out) {
  const int64_t N = x.size(0), C_in = x.size(1), G = wt3.size(0), L = call.window_numel();
  const int64_t rows = call.rows();
  const ColumnBuffer cols(policy, Slot::Columns, chunk, rows, L, x.options());
  const ColumnBuffer wide_x(policy, Slot::Operand, chunk, C_in, L, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t b = std::min(chunk, N - n0);
    gemm_columns(
        policy, cols.matrix(b).view({G, rows / G, b * L}), wt3,
        side_by_side(x.narrow(0, n0, b).view({b, C_in, L}), wide_x).view({G, C_in / G, b * L}),
        at::Tensor());
    Window3 w = call;
    w.batch = b;
    col2im_into(cols.samples(b), bias_1d, part(out, 0, n0, b), w);
  }
}

// The most window positions whose taps reach one block of the output:
// single positions before `dim`, `count` along it, whole after, each block
// starting at a multiple of its size. Past the first blocks, which the
// padding clips, the number along a dimension depends only on the start
// modulo the stride, so one period of starts covers them all.
int64_t positions_reaching(const Window3& call, int dim, int64_t count) {
  int64_t positions = 1;
  for (int i = 0; i < kMaxDims; ++i) {
    const int64_t n = i < dim ? 1 : i == dim ? count : call.image[i];
    const int64_t s = call.stride[i], span = call.dilation[i] * (call.kernel[i] - 1);
    const int64_t clipped = (std::max<int64_t>(span - call.padding[i], 0) + n - 1) / n;
    const int64_t starts = std::min((call.image[i] + n - 1) / n, clipped + s / std::gcd(n, s));
    int64_t most = 0;
    for (int64_t q = 0; q < starts; ++q) {
      int64_t o_lo, o_hi;
      windows_reaching(call, i, q * n, std::min(q * n + n, call.image[i]), &o_lo, &o_hi);
      most = std::max(most, o_hi - o_lo);
    }
    positions *= std::max<int64_t>(most, 1);
  }
  return positions;
}

// Blocks of the output, each with the columns of the input windows that
// reach it (Note [Column plans and the workspace limit]): a task owns its
// output pixels.
void conv_transpose_blocks(const DevicePolicy& policy, const at::Tensor& x, const at::Tensor& wt3,
                           const at::Tensor& bias_1d, const Window3& call, const at::Tensor& out) {
  const int64_t N = x.size(0), C_in = x.size(1), G = wt3.size(0), rows = call.rows();
  const int64_t elem = x.element_size();
  const Blocks blocks = plan_blocks(call.image, task_budget(policy), N, policy.tasks, [&](int dim, int64_t count) {
    return rows * elem * positions_reaching(call, dim, count);
  });
  const int64_t max_positions = positions_reaching(call, blocks.dim, blocks.count);
  const at::Tensor x5 = lift(x), out5 = lift(out);
  for_each_task(policy, N * blocks.per_sample(), [&](int64_t, int64_t begin, int64_t end) {
    // One buffer per task for its every block's columns, and one for the
    // input windows of a block, which a box of x holds as a matrix only when
    // it is contiguous.
    const at::Tensor buffer = scratch(policy, Slot::Columns, {rows * max_positions}, x.options());
    const at::Tensor operand = scratch(policy, Slot::Operand, {C_in * max_positions}, x.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks.per_sample();
      int64_t lo[kMaxDims], hi[kMaxDims];
      blocks.at(t % blocks.per_sample(), lo, hi);
      Window3 w = call;
      w.batch = 1;
      at::Tensor xs = x5.select(0, n), ys = part(out5, 0, n, 1);
      for (int i = 0; i < kMaxDims; ++i) {
        int64_t o_lo, o_hi;
        windows_reaching(call, i, lo[i], hi[i], &o_lo, &o_hi);
        xs = part(xs, 1 + i, o_lo, o_hi - o_lo);
        ys = part(ys, 2 + i, lo[i], hi[i] - lo[i]);
        // In the block's coordinates: window o_lo + o' taps o'*s - p' + k*d.
        w.padding[i] = call.padding[i] + lo[i] - o_lo * call.stride[i];
        w.image[i] = hi[i] - lo[i];
        w.windows[i] = o_hi - o_lo;
      }
      const int64_t positions = w.window_numel();
      const at::Tensor cols = part(buffer, 0, 0, rows * positions).view({1, rows, positions});
      const at::Tensor xb = xs.is_contiguous()
                                ? xs
                                : part(operand, 0, 0, C_in * positions).view(xs.sizes()).copy_(xs);
      gemm(cols.view({G, rows / G, positions}), wt3, xb.view({G, C_in / G, positions}),
           at::Tensor());
      col2im_into(cols, bias_1d, ys, w);
    }
  });
}

}  // namespace

void conv_transpose_columns(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const Window3& call,
                            int64_t groups, const at::Tensor& out, bool pointwise,
                            const DevicePolicy& policy) {
  const int64_t G = groups, C_in = input.size(1), L = call.window_numel(), rows = call.rows();
  // W_g^T: (G, C_out/G*prod(k), C_in/G), a transposed view of the stored weight.
  const at::Tensor wt3 = weight.reshape({G, C_in / G, rows / G}).transpose(1, 2);
  const at::Tensor x = input.contiguous();
  if (pointwise) return conv_transpose_pointwise(policy, x, wt3, group_bias(bias, G), out, L);
  const at::Tensor bias_1d = bias.has_value() ? *bias : at::Tensor();
  if (const int64_t chunk = wide_chunk(policy, input, L, rows, C_in, pointwise)) {
    return conv_transpose_wide(policy, x, wt3, bias_1d, call, chunk, out);
  }
  conv_transpose_blocks(policy, x, wt3, bias_1d, call, out);
}

at::Tensor conv_transpose_pixel_rows(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t groups,
                                     at::Tensor out, const DevicePolicy& policy) {
  // W_g: (G, C_in/G, C_out/G), a view of the stored weight.
  const at::Tensor w3 = weight.reshape({groups, input.size(1) / groups, weight.size(1)});
  return pixel_rows_gemm(policy, input, std::move(out), groups, bias, w3);
}

// ---- the weight gradient

namespace {

// dW_g = rows(dy)_g^T . rows(x)_g over a 1x1 layer's channels_last pixels,
// the sum over pixels split into fixed ranges, one GEMM batched over the
// groups per range.
void weight_sum_of_pixel_rows(const DevicePolicy& policy, PartialSums& sums,
                              const at::Tensor& input, const at::Tensor& dy_rows, int64_t groups) {
  const at::Tensor x = pixel_rows(input);
  for_each_task(policy, x.size(0), [&](int64_t range, int64_t begin, int64_t end) {
    sums.add(range, group_rows(dy_rows, groups, begin, end).transpose(1, 2),
             group_rows(x, groups, begin, end));
  });
}

}  // namespace

at::Tensor conv_weight_columns(const at::Tensor& input, const at::Tensor& grad_output,
                               const Window3& call, int64_t groups, bool pointwise,
                               bool pixel_rows_in, const DevicePolicy& policy) {
  const int64_t N = input.size(0), C_out = grad_output.size(1), G = groups;
  const int64_t L = call.window_numel(), rows = call.rows();
  at::Tensor grad_weight = at::zeros({G, C_out / G, rows / G}, input.options());
  if (N == 0 || L == 0 || grad_weight.numel() == 0) return grad_weight;

  PartialSums sums(grad_weight, policy);
  // The pixel rows first: the other paths would copy what they read in place.
  if (pixel_rows_in) {
    const at::Tensor dy = grad_output.contiguous(channels_last_of(input.dim()));
    weight_sum_of_pixel_rows(policy, sums, input, pixel_rows(dy), G);
    return sums.sum();
  }
  const at::Tensor image = planar(input);
  const at::Tensor dy3 = grad_output.contiguous().view({N, C_out, L});
  if (const int64_t chunk = wide_chunk(policy, input, L, rows, C_out, pointwise)) {
    const ColumnBuffer wide_dy(policy, Slot::Operand, chunk, C_out, L, input.options());
    for_each_wide_chunk(policy, image, call, chunk, [&](int64_t n0, int64_t b, const at::Tensor& cols) {
      const at::Tensor dy = side_by_side(dy3.narrow(0, n0, b), wide_dy).view({G, C_out / G, b * L});
      wide_weight_sum(policy, sums, dy, cols.view({G, rows / G, b * L}));
    });
    return sums.sum();
  }
  const at::Tensor x = pointwise ? image.contiguous() : image;
  for_each_column_block(policy, x, call, rows, pointwise, [&](int64_t range, int64_t n, int64_t first, int64_t count, const at::Tensor& c) {
    sums.add(range, part(dy3.select(0, n), 1, first, count).view({G, C_out / G, count}),
             c.view({G, rows / G, count}).transpose(1, 2));
  });
  return sums.sum();
}

// ---- conv_transpose's backward

// Note [One column buffer for conv_transpose's backward]
// Both gradients of y = conv_transpose(x, W) multiply the columns of the
// upstream gradient dy, the columns of its windows that the input's pixels
// fed: dx = conv(dy, W) = W . im2col(dy) per group, and dW = x . im2col(dy)^T
// summed over samples. Taken as the two ops that state the duality, they run
// im2col(dy) twice; here each block of columns is formed once and both GEMMs
// read it while it is in cache. grad_input and the weight gradient come out
// planar (the autograd layer gives them the forward's format).
std::tuple<at::Tensor, at::Tensor> conv_transpose_backward_columns(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const Window3& call, int64_t groups, bool pointwise, const DevicePolicy& policy) {
  const int64_t N = input.size(0), C_in = input.size(1), G = groups;
  const int64_t L = call.window_numel(), rows = call.rows();
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_weight = at::zeros({G, C_in / G, rows / G}, input.options());
  if (grad_input.numel() == 0 || rows == 0) return {grad_input.zero_(), grad_weight};
  const at::Tensor dy = planar(grad_output);
  const at::Tensor x3 = input.contiguous().view({N, C_in, L});
  const at::Tensor w3 = weight.reshape({G, C_in / G, rows / G});
  const at::Tensor gi = grad_input.view({N, C_in, L});
  PartialSums sums(grad_weight, policy);
  if (const int64_t chunk = wide_chunk(policy, input, L, rows, 2 * C_in, pointwise)) {
    const ColumnBuffer wide_x(policy, Slot::Operand, chunk, C_in, L, input.options());
    const at::Tensor wide_out =
        scratch(policy, Slot::Product, {G, C_in / G, chunk * L}, input.options());
    for_each_wide_chunk(policy, dy, call, chunk, [&](int64_t n0, int64_t b, const at::Tensor& cols) {
      const at::Tensor c = cols.view({G, rows / G, b * L});
      wide_conv(policy, gi, n0, b, wide_out, w3, c, at::Tensor());
      wide_weight_sum(policy, sums, side_by_side(x3.narrow(0, n0, b), wide_x).view({G, C_in / G, b * L}), c);
    });
    return {grad_input, sums.sum()};
  }
  const at::Tensor image_dy = pointwise ? dy.contiguous() : dy;
  for_each_column_block(policy, image_dy, call, rows, pointwise, [&](int64_t range, int64_t n, int64_t first, int64_t count, const at::Tensor& c) {
    const at::Tensor cg = c.view({G, rows / G, count});
    gemm(part(gi.select(0, n), 1, first, count).view({G, C_in / G, count}), w3, cg);
    sums.add(range, part(x3.select(0, n), 1, first, count).view({G, C_in / G, count}),
             cg.transpose(1, 2));
  });
  return {grad_input, sums.sum()};
}

}  // namespace convt_ext
