// conv, conv_transpose and the shared weight gradient, in 1, 2 and 3 spatial
// dimensions, as GEMMs around im2col/col2im. Per group g (see
// docs/relationships.md):
//
//   conv            y_g  = W_g   . im2col(x)_g  + b_g
//   conv_transpose  y    = col2im(W_g^T . x_g)  + b        (bias fused into col2im)
//   conv_weight     dW_g = sum_n dy_g . im2col(x)_g^T
//
// conv_transpose is conv's input gradient taken as an op of its own, so the
// two are adjoints. Every GEMM goes through the engine layer (gemm.h: MKL,
// oneDNN or its ukernel on the CPU, cuBLAS on CUDA); this file has no
// device-specific code. Every geometry is lifted
// to three spatial dimensions (Note [N-d by lifting] in im2col.h), and every
// call planned by plan.h (Note [Column plans and the workspace limit]).
//
// Note [Memory format]
// The output has the memory format torch's convolution would give it, asked
// of torch itself (output_format()): channels_last (channels_last_3d) when
// the input or the weight is, where the backend torch picks keeps it (not
// cuDNN in float64, not the CPU's slow 3-d kernels, which torch picks for
// float64, and for 1x1 layers on one thread). The gradients follow the
// forward's.
// convt_ext/_ops.py mirrors the rule in the fake kernels. How each op gets
// there (benchmarks/NOTES.md measures the alternatives):
//   - a 1x1 layer (stride 1, no padding) on a channels_last input needs no
//     columns: the image is the (N*L, C) matrix of its pixels' rows
//     (pixel_rows), and every op is one GEMM per group on such matrices,
//     whose output is channels_last by construction;
//   - otherwise the input is made planar (NCHW) once (planar(): read in
//     place, im2col would gather at a stride of C); conv with one group
//     stores its GEMMs through the transposed view of a channels_last
//     output; everything else is computed planar and converted once at the
//     end (in_format()).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/native/ConvUtils.h>
#include <c10/util/strides.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "gemm.h"
#include "ops.h"
#include "plan.h"

namespace convt_ext {

namespace {

// A 1x1 kernel with stride 1 and no padding: im2col is the identity, so the
// image (its window positions laid out as its pixels) is its own column matrix.
bool pointwise(at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  for (size_t i = 0; i < kernel.size(); ++i) {
    if (kernel[i] != 1 || stride[i] != 1 || padding[i] != 0) return false;
  }
  return true;
}

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
    region = region.narrow(2 + i, r0, r1 - r0);
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
// of every sample, on the task's thread (range: for_each_task's): cols (K, count) are the columns of
// sample n's window positions [first, first + count). With `direct`, the
// input (contiguous) is its own column matrix.
template <typename F>
void for_each_column_block(const at::Tensor& x, const Window3& whole, int64_t K, bool direct,
                           const F& fn, int64_t cap = INT64_MAX) {
  const int64_t L = whole.window_numel(), elem = x.element_size();
  int64_t inner[kMaxDims + 1];
  inner[kMaxDims] = 1;
  for (int i = kMaxDims - 1; i >= 0; --i) inner[i] = inner[i + 1] * whole.windows[i];
  const Blocks blocks =
      plan_blocks(whole.windows, direct ? INT64_MAX : std::min(cap, task_budget(x)), whole.batch, tasks_at_once(x),
                  [&](int dim, int64_t count) { return K * elem * inner[dim + 1] * count; });
  const int64_t max_positions = inner[blocks.dim + 1] * blocks.count;
  const at::Tensor x5 = lift(x);
  for_each_task(x, whole.batch * blocks.per_sample(), [&](int64_t range, int64_t begin, int64_t end) {
    const at::Tensor buffer = direct ? at::Tensor() : scratch(0, {K, max_positions}, x.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks.per_sample();
      int64_t lo[kMaxDims], hi[kMaxDims];
      blocks.at(t % blocks.per_sample(), lo, hi);
      const int64_t first = flat_offset(lo, whole.windows), count = box_numel(lo, hi);
      at::Tensor c;
      if (direct) {
        c = x.select(0, n).view({K, L}).narrow(1, first, count);
      } else {
        c = buffer.narrow(1, 0, count);
        im2col_box(x5.narrow(0, n, 1), c.unsqueeze(0), whole, lo, hi);
      }
      fn(range, n, first, count, c);
    }
  });
}

// The wide path's loop (Note [Column plans and the workspace limit]): for
// every chunk of `chunk` samples [n0, n0 + b) of image, fn(n0, b, cols) with
// cols (K, b*L) the columns of their windows side by side.
template <typename F>
void for_each_wide_chunk(const at::Tensor& image, const Window3& whole, int64_t chunk,
                         const F& fn) {
  const int64_t N = image.size(0), K = whole.rows(), L = whole.window_numel();
  const ColumnBuffer cols(0, chunk, K, L, image.options());
  const at::Tensor x5 = lift(image);
  const int64_t lo[kMaxDims] = {0, 0, 0};
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t b = std::min(chunk, N - n0);
    im2col_box(x5.narrow(0, n0, b), cols.samples(b), whole, lo, whole.windows);
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
void gemm_columns(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        const at::Tensor& add) {
  for_each_task(out, out.size(2), [&](int64_t, int64_t begin, int64_t end) {
    gemm(out.narrow(2, begin, end - begin), a, b.narrow(2, begin, end - begin), add);
  });
}

// One chunk of the wide path's conv: y[n0, n0 + b) = w3 . c (+ b3), where c
// holds the chunk's columns side by side; the GEMM writes the (G, C/G, b*L)
// scratch `wide`, permuted into the samples by one copy.
void wide_conv(const at::Tensor& y, int64_t n0, int64_t b, const at::Tensor& wide,
               const at::Tensor& w3, const at::Tensor& c, const at::Tensor& b3) {
  const int64_t C = y.size(1), L = y.size(2);
  const at::Tensor yw = wide.narrow(2, 0, b * L);
  gemm_columns(yw, w3, c, b3);
  y.narrow(0, n0, b).copy_(yw.view({C, b, L}).permute({1, 0, 2}));
}

// A weight gradient summed over blocks: each of for_each_task's fixed ranges
// sums into its own partial, and the partials are added in range order, so
// the result is the same for any thread count (Note [Determinism across
// thread counts]).
struct PartialSums {
  at::Tensor total;  // (G, M, N), zeros
  std::vector<at::Tensor> partial;
  PartialSums(at::Tensor zeros, const at::Tensor& like)
      : total(std::move(zeros)), partial(tasks_at_once(like)) {}
  // partial[range] += a . b, per group; only group `group`'s with one >= 0.
  void add(int64_t range, const at::Tensor& a, const at::Tensor& b, int64_t group = -1) {
    at::Tensor& acc = partial[range];
    if (!acc.defined()) acc = at::zeros_like(total);
    gemm(group < 0 ? acc : acc.narrow(0, group, 1), a, b, at::Tensor(), true);
  }
  const at::Tensor& sum() {
    for (const at::Tensor& p : partial) {
      if (p.defined()) total.add_(p);
    }
    return total;
  }
};

// sums += a . c^T over a wide chunk: the reduction over its b*L positions
// split into for_each_task's fixed ranges, each into its own partial.
void wide_weight_sum(PartialSums& sums, const at::Tensor& like, const at::Tensor& a,
                     const at::Tensor& c) {
  for_each_task(like, a.size(2), [&](int64_t range, int64_t begin, int64_t end) {
    sums.add(range, a.narrow(2, begin, end - begin), c.narrow(2, begin, end - begin).transpose(1, 2));
  });
}

const char* kDimNames[] = {"", "3-d (N, C, L)", "4-d (N, C, H, W)", "5-d (N, C, D, H, W)"};

void check_conv_tensors(const char* op, int dims, const at::Tensor& input,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        int64_t groups, bool transposed) {
  TORCH_CHECK_VALUE(input.dim() == dims + 2, op, ": input must be ", kDimNames[dims],
                    ", but got a ", input.dim(), "-d tensor of shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == dims + 2, op, ": weight must be ", dims + 2,
                    "-d, but got a ", weight.dim(), "-d tensor of shape ", weight.sizes());
  check_floating(op, "input", input);
  check_same(op, "weight", weight, "input", input);
  if (bias.has_value()) check_same(op, "bias", *bias, "input", input);
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be positive, but got groups=", groups);
  // torch's rule: at least one channel per group in weight's dimension 0
  // (out_channels, or in_channels when transposed), even where the sizes
  // divide. Zero input channels of conv_transpose stay allowed: convt_ext's
  // documented empty sum (torch rejects the empty weight).
  TORCH_CHECK_VALUE(weight.size(0) >= groups || (transposed && input.size(1) == 0), op,
                    ": groups=", groups, " needs weight to be at least ", groups,
                    " at dimension 0, but got weight of shape ", weight.sizes());
  for (int i = 0; i < dims; ++i) {
    TORCH_CHECK_VALUE(weight.size(2 + i) >= 1, op,
                      ": weight's kernel size must be positive, but got weight of shape ",
                      weight.sizes());
    // Zero channels are allowed (the sum over them is empty); zero-size
    // images are not, as in torch.
    TORCH_CHECK_VALUE(input.size(2 + i) > 0, op,
                      ": input must have non-zero spatial sizes (only the batch and the channels "
                      "may be empty), but got shape ",
                      input.sizes());
  }
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t out_channels) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_channels, op,
                    ": bias must be 1-d with out_channels=", out_channels,
                    " elements, but got shape ", bias->sizes());
}

// The bias as (G, C/G, 1), ready to broadcast over a GEMM's columns.
at::Tensor group_bias(const std::optional<at::Tensor>& bias, int64_t groups) {
  return bias.has_value() ? bias->reshape({groups, -1, 1}) : at::Tensor();
}

// The output of a convolution over no input channels: the bias, or zeros.
at::Tensor bias_only(at::Tensor out, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return out.zero_();
  std::vector<int64_t> shape(out.dim(), 1);
  shape[1] = -1;
  return out.copy_(bias->view(shape).expand_as(out));
}

// Note [Memory format]: torch's own choice for the same convolution, asked of
// torch (the backend it would select, and that backend's memory format), as
// torch's fake kernels do. `transposed` with conv_transpose's arguments.
at::MemoryFormat output_format(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                               at::IntArrayRef output_padding, int64_t groups) {
  if (weight.dim() < 4) return at::MemoryFormat::Contiguous;  // 1-d: no channels_last
  // The one shape that passes convt_ext's checks and not torch's: conv_transpose
  // over zero input channels (an empty weight), computed planar. Anything
  // else torch refuses here is an error, not a silent choice.
  if (transposed && weight.size(0) == 0) return at::MemoryFormat::Contiguous;
  const at::native::ConvBackend backend = at::native::select_conv_backend(
      input, weight, bias, c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding),
      c10::fromIntArrayRefSlow(dilation), transposed, c10::fromIntArrayRefSlow(output_padding),
      c10::SymInt(groups), std::nullopt);
  return at::native::_determine_backend_memory_format(input, weight, backend);
}

at::MemoryFormat conv_format(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const std::vector<int64_t> none(stride.size(), 0);
  return output_format(input, weight, bias, stride, padding, dilation, false, none, groups);
}

// torch.nn.grad's: that of the convolution with a new, contiguous weight
// (allocated, never written).
at::MemoryFormat conv_weight_format(const at::Tensor& input, at::IntArrayRef weight_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  return conv_format(input, at::empty(weight_size, input.options()), std::nullopt, stride,
                     padding, dilation, groups);
}

// The input in planar (NCHW) memory (Note [Memory format]).
at::Tensor planar(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::Contiguous ? input : input.contiguous();
}

// t with the strides torch gives a new tensor of format `fmt`. Not
// t.contiguous(fmt), which keeps t where two formats coincide (size-1
// dimensions) though its strides differ from torch's.
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  const bool same = fmt == at::MemoryFormat::ChannelsLast
                        ? t.strides() == at::IntArrayRef(c10::get_channels_last_strides_2d(t.sizes()))
                    : fmt == at::MemoryFormat::ChannelsLast3d
                        ? t.strides() == at::IntArrayRef(c10::get_channels_last_strides_3d(t.sizes()))
                        : t.strides() == at::IntArrayRef(c10::contiguous_strides(t.sizes()));
  return same ? t : at::empty(t.sizes(), t.options().memory_format(fmt)).copy_(t);
}

std::vector<int64_t> shape_of(int64_t n, int64_t c, const int64_t* spatial, int dims) {
  std::vector<int64_t> s{n, c};
  s.insert(s.end(), spatial, spatial + dims);
  return s;
}

}  // namespace

namespace {

// The pixels of a channels_last image (N, C, *spatial) as the rows of an
// (N*L, C) matrix: a view (Note [Memory format]).
at::Tensor pixel_rows(const at::Tensor& t) { return t.movedim(1, -1).reshape({-1, t.size(1)}); }

// A 1x1 layer (stride 1, no padding) on a channels_last input: for each group
// g, rows(out)_g = rows(a)_g . b_g (+ bias_g), over fixed ranges of rows.
// b_g(g) is the group's (C_in/G, C_out/G) matrix.
template <typename B>
at::Tensor pixel_rows_gemm(const at::Tensor& a, at::Tensor out, int64_t groups,
                           const std::optional<at::Tensor>& bias, const B& b_g) {
  if (out.numel() == 0) return out;
  const at::Tensor x = pixel_rows(a), y = pixel_rows(out);
  const int64_t ci = x.size(1) / groups, co = y.size(1) / groups;
  for_each_task(a, x.size(0), [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor yg = y.narrow(0, begin, end - begin).narrow(1, g * co, co);
      const at::Tensor xg = x.narrow(0, begin, end - begin).narrow(1, g * ci, ci);
      gemm(yg.unsqueeze(0), xg.unsqueeze(0), b_g(g).unsqueeze(0),
           bias.has_value() ? bias->narrow(0, g * co, co).view({1, 1, co}) : at::Tensor());
    }
  });
  return out;
}

// conv, conv_transpose and conv_weight: the output in planar (NCHW) memory,
// or already in the format torch would give it where they write it directly
// (Note [Memory format]). That format goes to *format_out, found right after
// the argument checks.
at::Tensor conv_impl(const char* op, int dims, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     at::MemoryFormat* format_out) {
  check_conv_tensors(op, dims, input, weight, bias, groups, false);
  const at::IntArrayRef kernel = weight.sizes().slice(2);
  check_window_args(op, dims, kernel, stride, padding, dilation);
  const int64_t N = input.size(0), C_in = input.size(1), C_out = weight.size(0);
  TORCH_CHECK_VALUE(C_out % groups == 0, op, ": weight's dimension 0 (out_channels=", C_out,
                    ") must be divisible by groups=", groups);
  const int64_t grouped_in = checked_mul(op, "in_channels (weight.size(1)*groups)", weight.size(1), groups);
  TORCH_CHECK_VALUE(C_in == grouped_in, op, ": input has ", C_in,
                    " channels, but weight of shape ", weight.sizes(), " with groups=", groups,
                    " expects weight.size(1)*groups=", grouped_in);
  check_bias(op, bias, C_out);
  int64_t windows[kMaxDims];
  window_counts(op, "input", input.sizes().slice(2), kernel, stride, padding, dilation, windows);
  const Window3 whole = make_window(op, N, C_in, input.sizes().slice(2), windows, kernel, stride,
                                    padding, dilation);
  checked_numel(op, "the output", {N, C_out, whole.window_numel()},
                geometry(kernel, stride, padding, dilation));

  c10::DeviceGuard guard(input.device());
  const at::MemoryFormat format = *format_out =
      conv_format(input, weight, bias, stride, padding, dilation, groups);
  const bool channels_last = format != at::MemoryFormat::Contiguous;
  const std::vector<int64_t> shape = shape_of(N, C_out, windows, dims);
  if (channels_last && C_in > 0 && pointwise(kernel, stride, padding) && input.is_contiguous(format)) {
    const at::Tensor w = weight.reshape({C_out, C_in / groups});
    const int64_t co = C_out / groups;
    return pixel_rows_gemm(input, at::empty(shape, input.options().memory_format(format)), groups,
                           bias, [&](int64_t g) { return w.narrow(0, g * co, co).t(); });
  }
  const at::Tensor image = planar(input);
  // With one group the GEMMs store a channels_last output through the
  // transposed view of each sample's (C_out, L) matrix; grouped (bmm) stores
  // that way are slow, so those convert at the end.
  at::Tensor out = at::empty(shape, input.options().memory_format(groups == 1 ? format : at::MemoryFormat::Contiguous));
  // Zero input channels: C_out channels of the bias (or zeros), the sum over
  // no channels, documented in the README; torch gives 0 channels here
  // (F.conv2d((2, 0, 4, 3), (3, 0, 3, 1)) is (2, 0, 2, 3)), which drops
  // the weight's out_channels.
  if (out.numel() == 0) return out;
  if (C_in == 0) return bias_only(out, bias);

  const int64_t G = groups, L = whole.window_numel();
  const int64_t K = whole.rows();
  const at::Tensor w3 = weight.reshape({G, C_out / G, K / G});
  const at::Tensor b3 = group_bias(bias, G);
  const at::Tensor y = out.view({N, C_out, L});

  const int64_t cap = forward_tile_cap(input, G, L);
  if (const int64_t chunk = wide_chunk(input, L, K, C_out, cap)) {
    const at::Tensor wide_out = scratch(1, {G, C_out / G, chunk * L}, input.options());
    for_each_wide_chunk(image, whole, chunk, [&](int64_t n0, int64_t b, const at::Tensor& cols) {
      wide_conv(y, n0, b, wide_out, w3, cols.view({G, K / G, b * L}), b3);
    });
    return out;
  }
  const bool direct = pointwise(kernel, stride, padding);
  const at::Tensor x = direct ? image.contiguous() : image;
  for_each_column_block(x, whole, K, direct, [&](int64_t, int64_t n, int64_t first, int64_t count, const at::Tensor& c) {
    gemm(y.select(0, n).narrow(1, first, count).view({G, C_out / G, count}), w3,
               c.view({G, K / G, count}), b3);
  }, cap);
  return out;
}

// conv_transpose's arguments, checked (for the op and for its backward):
// the output's spatial sizes go to image, and the result is the window
// relation of the output image whose windows are the input's pixels.
Window3 check_conv_transpose(const char* op, int dims, const at::Tensor& input,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef output_padding, int64_t groups,
                             at::IntArrayRef dilation, int64_t* image) {
  check_conv_tensors(op, dims, input, weight, bias, groups, true);
  const at::IntArrayRef kernel = weight.sizes().slice(2);
  check_window_args(op, dims, kernel, stride, padding, dilation);
  check_ints(op, "output_padding", output_padding, dims, 0);
  const int64_t C_in = input.size(1);
  TORCH_CHECK_VALUE(C_in == weight.size(0), op, ": input has ", C_in,
                    " channels, but weight of shape ", weight.sizes(),
                    " expects weight.size(0)=", weight.size(0), " (in_channels)");
  TORCH_CHECK_VALUE(C_in % groups == 0, op, ": in_channels=", C_in,
                    " must be divisible by groups=", groups);
  const int64_t C_out = checked_mul(op, "out_channels (weight.size(1)*groups)", weight.size(1), groups);
  check_bias(op, bias, C_out);
  for (int i = 0; i < dims; ++i) {
    // Why output_padding < max(stride, dilation): see docs/relationships.md.
    TORCH_CHECK_VALUE(output_padding[i] < std::max(stride[i], dilation[i]), op,
                      ": output_padding must be smaller than either stride or dilation, but got "
                      "output_padding=",
                      fmt(output_padding), ", stride=", fmt(stride), ", dilation=", fmt(dilation));
  }
  transposed_sizes(op, input.sizes().slice(2), kernel, stride, padding, output_padding, dilation,
                   image);
  // The columns cover exactly the input's windows, which with output_padding
  // >= stride is fewer than the output image has.
  return make_window(op, input.size(0), C_out, at::IntArrayRef(image, dims),
                     input.sizes().slice(2).data(), kernel, stride, padding, dilation);
}

at::Tensor conv_transpose_impl(const char* op, int dims, const at::Tensor& input,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef output_padding, int64_t groups,
                               at::IntArrayRef dilation, at::MemoryFormat* format_out) {
  int64_t image[kMaxDims];
  const Window3 whole = check_conv_transpose(op, dims, input, weight, bias, stride, padding,
                                             output_padding, groups, dilation, image);
  const at::IntArrayRef kernel = weight.sizes().slice(2);
  const int64_t N = input.size(0), C_in = input.size(1), C_out = whole.channels;
  checked_numel(op, "the output", {N, C_out, whole.image_numel()},
                geometry(kernel, stride, padding, dilation));

  c10::DeviceGuard guard(input.device());
  const at::MemoryFormat format = *format_out = output_format(
      input, weight, bias, stride, padding, dilation, true, output_padding, groups);
  at::Tensor out = at::empty(shape_of(N, C_out, image, dims), input.options());
  if (out.numel() == 0) return out;
  if (C_in == 0) return bias_only(out, bias);

  const int64_t G = groups, L = whole.window_numel();
  const int64_t K = whole.rows();
  // W_g^T: (G, C_out/G*prod(k), C_in/G), a transposed view of the stored weight.
  const at::Tensor wt3 = weight.reshape({G, C_in / G, K / G}).transpose(1, 2);
  bool no_output_padding = true;
  for (int i = 0; i < dims; ++i) no_output_padding &= output_padding[i] == 0;
  if (format != at::MemoryFormat::Contiguous && pointwise(kernel, stride, padding) &&
      no_output_padding && input.is_contiguous(format)) {
    const at::Tensor w = weight.reshape({C_in, C_out / G});
    const int64_t ci = C_in / G;
    return pixel_rows_gemm(input, at::empty(out.sizes(), input.options().memory_format(format)),
                           G, bias, [&](int64_t g) { return w.narrow(0, g * ci, ci); });
  }
  const at::Tensor x = input.contiguous();
  // col2im of a 1x1 kernel is the identity: the GEMM writes the output.
  if (pointwise(kernel, stride, padding) && no_output_padding) {
    const at::Tensor y = out.view({N, G, C_out / G, L});
    const at::Tensor b3 = group_bias(bias, G);
    if (N < tasks_at_once(input)) {  // few samples: split each one's columns
      for (int64_t i = 0; i < N; ++i) {
        gemm_columns(y.select(0, i), wt3, x.select(0, i).view({G, C_in / G, L}), b3);
      }
      return out;
    }
    for_each_task(input, N, [&](int64_t, int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        gemm(y.select(0, i), wt3, x.select(0, i).view({G, C_in / G, L}), b3);
      }
    });
    return out;
  }

  const at::Tensor bias_1d = bias.has_value() ? *bias : at::Tensor();
  if (const int64_t chunk = wide_chunk(input, L, K, C_in)) {
    const ColumnBuffer cols(0, chunk, K, L, input.options());
    const ColumnBuffer wide_x(1, chunk, C_in, L, input.options());
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t b = std::min(chunk, N - n0);
      gemm_columns(
          cols.matrix(b).view({G, K / G, b * L}), wt3,
          side_by_side(x.narrow(0, n0, b).view({b, C_in, L}), wide_x).view({G, C_in / G, b * L}),
          at::Tensor());
      Window3 w = whole;
      w.batch = b;
      col2im_into(cols.samples(b), bias_1d, out.narrow(0, n0, b), w);
    }
    return out;
  }
  // Blocks of the output, each with the columns of the input windows that
  // reach it (Note [Column plans and the workspace limit]).
  const int64_t elem = input.element_size();
  auto box_windows = [&](int i, int64_t lo, int64_t hi) {
    int64_t o_lo, o_hi;
    windows_reaching(whole, i, lo, hi, &o_lo, &o_hi);
    return o_hi - o_lo;
  };
  auto cost = [&](int dim, int64_t count) {
    int64_t positions = 1;
    for (int i = 0; i < kMaxDims; ++i) {
      // The largest box over the blocks' positions: single positions before
      // dim, `count` along it (at the worst offset: its start), whole after.
      const int64_t n = i < dim ? 1 : i == dim ? count : whole.image[i];
      int64_t most = 0;
      for (int64_t start : {int64_t(0), whole.image[i] / 2}) {
        most = std::max(most, box_windows(i, start, std::min(start + n, whole.image[i])));
      }
      positions *= std::max<int64_t>(most, 1);
    }
    return K * elem * positions;
  };
  const Blocks blocks = plan_blocks(whole.image, task_budget(input), N, tasks_at_once(input), cost);
  const at::Tensor x5 = lift(x), out5 = lift(out);
  for_each_task(input, N * blocks.per_sample(), [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks.per_sample();
      int64_t lo[kMaxDims], hi[kMaxDims];
      blocks.at(t % blocks.per_sample(), lo, hi);
      Window3 w = whole;
      w.batch = 1;
      at::Tensor xs = x5.select(0, n), ys = out5.narrow(0, n, 1);
      for (int i = 0; i < kMaxDims; ++i) {
        int64_t o_lo, o_hi;
        windows_reaching(whole, i, lo[i], hi[i], &o_lo, &o_hi);
        xs = xs.narrow(1 + i, o_lo, o_hi - o_lo);
        ys = ys.narrow(2 + i, lo[i], hi[i] - lo[i]);
        // In the block's coordinates: window o_lo + o' taps o'*s - p' + k*d.
        w.padding[i] = whole.padding[i] + lo[i] - o_lo * whole.stride[i];
        w.image[i] = hi[i] - lo[i];
        w.windows[i] = o_hi - o_lo;
      }
      const int64_t positions = w.window_numel();
      const at::Tensor cols = scratch(0, {1, K, positions}, input.options());
      gemm(cols.view({G, K / G, positions}), wt3,
                 xs.reshape({G, C_in / G, positions}), at::Tensor());
      col2im_into(cols, bias_1d, ys, w);
    }
  });
  return out;
}

at::Tensor conv_weight_impl(const char* op, int dims, const at::Tensor& input,
                            const at::Tensor& grad_output, at::IntArrayRef weight_size,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups,
                            at::MemoryFormat* format_out) {
  check_ints(op, "weight_size", weight_size, dims + 2, 0);
  const at::IntArrayRef kernel = weight_size.slice(2);
  for (int64_t k : kernel) {
    TORCH_CHECK_VALUE(k >= 1, op, ": weight_size's kernel sizes must be positive, but got weight_size=",
                      fmt(weight_size));
  }
  check_window_args(op, dims, kernel, stride, padding, dilation);
  TORCH_CHECK_VALUE(input.dim() == dims + 2 && grad_output.dim() == dims + 2, op,
                    ": input and grad_output must be ", kDimNames[dims], ", but got shapes ",
                    input.sizes(), " and ", grad_output.sizes());
  check_floating(op, "input", input);
  check_same(op, "grad_output", grad_output, "input", input);
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be positive, but got groups=", groups);
  const int64_t N = input.size(0), C_in = input.size(1), C_out = weight_size[0];
  TORCH_CHECK_VALUE(C_out >= groups, op, ": groups=", groups, " needs weight_size to be at least ",
                    groups, " at dimension 0, but got weight_size=", fmt(weight_size));
  const int64_t grouped_in =
      checked_mul(op, "in_channels (weight_size[1]*groups)", weight_size[1], groups);
  TORCH_CHECK_VALUE(C_out % groups == 0 && C_in == grouped_in, op,
                    ": weight_size=", fmt(weight_size), " with groups=", groups,
                    " does not fit input of shape ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.size(0) == N && grad_output.size(1) == C_out, op,
                    ": grad_output must have shape (", N, ", ", C_out,
                    ", *spatial), but got ", grad_output.sizes());
  for (int i = 0; i < dims; ++i) {
    TORCH_CHECK_VALUE(input.size(2 + i) > 0, op,
                      ": input must have non-zero spatial sizes, but got shape ", input.sizes());
  }
  int64_t natural[kMaxDims];
  window_counts(op, "input", input.sizes().slice(2), kernel, stride, padding, dilation, natural);
  const at::IntArrayRef windows = grad_output.sizes().slice(2);
  for (int i = 0; i < dims; ++i) {
    TORCH_CHECK_VALUE(windows[i] <= natural[i], op, ": grad_output's spatial size ",
                      fmt(windows), " exceeds the ", fmt(at::IntArrayRef(natural, dims)),
                      " windows of the input");
  }
  const Window3 whole = make_window(op, N, C_in, input.sizes().slice(2), windows.data(), kernel,
                                    stride, padding, dilation);
  checked_numel(op, "weight_size", weight_size);

  c10::DeviceGuard guard(input.device());
  const at::MemoryFormat format = *format_out =
      conv_weight_format(input, weight_size, stride, padding, dilation, groups);
  const at::Tensor image = planar(input);
  const int64_t G = groups, L = whole.window_numel();
  const int64_t K = whole.rows();
  at::Tensor grad_weight = at::zeros({G, C_out / G, K / G}, input.options());
  if (N == 0 || L == 0 || grad_weight.numel() == 0) return grad_weight.view(weight_size);

  const at::Tensor dy3 = grad_output.contiguous().view({N, C_out, L});
  PartialSums sums(grad_weight, input);
  auto sum_partials = [&] { return sums.sum().view(weight_size); };
  if (const int64_t chunk = wide_chunk(input, L, K, C_out)) {
    const ColumnBuffer wide_dy(1, chunk, C_out, L, input.options());
    for_each_wide_chunk(image, whole, chunk, [&](int64_t n0, int64_t b, const at::Tensor& cols) {
      const at::Tensor dy = side_by_side(dy3.narrow(0, n0, b), wide_dy).view({G, C_out / G, b * L});
      wide_weight_sum(sums, input, dy, cols.view({G, K / G, b * L}));
    });
    return sum_partials();
  }
  // (grad_output may be short of the input's windows: then the columns are not the input.)
  bool direct = pointwise(kernel, stride, padding);
  for (int i = 0; i < dims; ++i) direct &= windows[i] == input.size(2 + i);
  if (direct && format != at::MemoryFormat::Contiguous && input.is_contiguous(format)) {
    // dW_g = rows(dy)_g^T . rows(x)_g, the sum over pixels split into fixed ranges.
    const at::Tensor x = pixel_rows(input), dy = pixel_rows(grad_output.contiguous(format));
    const int64_t ci = C_in / G, co = C_out / G;
    for_each_task(input, x.size(0), [&](int64_t range, int64_t begin, int64_t end) {
      // One GEMM per group: the groups' columns interleave in a pixel row.
      for (int64_t g = 0; g < G; ++g) {
        sums.add(range, dy.narrow(0, begin, end - begin).narrow(1, g * co, co).t().unsqueeze(0),
                 x.narrow(0, begin, end - begin).narrow(1, g * ci, ci).unsqueeze(0), g);
      }
    });
    return sum_partials();
  }
  const at::Tensor x = direct ? image.contiguous() : image;
  for_each_column_block(x, whole, K, direct, [&](int64_t range, int64_t n, int64_t first, int64_t count, const at::Tensor& c) {
    sums.add(range, dy3.select(0, n).narrow(1, first, count).view({G, C_out / G, count}),
             c.view({G, K / G, count}).transpose(1, 2));
  });
  return sum_partials();
}

// Note [One column buffer for conv_transpose's backward]
// Both gradients of y = conv_transpose(x, W) multiply the columns of the
// upstream gradient dy, the columns of its windows that the input's pixels
// fed: dx = conv(dy, W) = W . im2col(dy) per group, and dW = x . im2col(dy)^T
// summed over samples. Taken as the two ops that state the duality, they run
// im2col(dy) twice; here each block of columns is formed once and both GEMMs
// read it while it is in cache. grad_input and the weight gradient come out
// planar (the autograd layer gives them the forward's format).
std::tuple<at::Tensor, at::Tensor> conv_transpose_backward_impl(
    const char* op, int dims, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation) {
  // The columns of the input's windows over dy: conv(dy, W) cropped to the input.
  int64_t image[kMaxDims];
  const Window3 whole = check_conv_transpose(op, dims, input, weight, std::nullopt, stride,
                                             padding, output_padding, groups, dilation, image);
  check_same(op, "grad_output", grad_output, "input", input);
  const at::IntArrayRef kernel = weight.sizes().slice(2);
  const int64_t N = input.size(0), C_in = input.size(1);
  const std::vector<int64_t> expected = shape_of(N, whole.channels, image, dims);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected), op,
                    ": grad_output must have the output's shape ", at::IntArrayRef(expected),
                    ", but got ", grad_output.sizes());

  c10::DeviceGuard guard(input.device());
  const int64_t G = groups, L = whole.window_numel(), K = whole.rows();
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_weight = at::zeros({G, C_in / G, K / G}, input.options());
  if (grad_input.numel() == 0 || K == 0) {
    return {grad_input.zero_(), grad_weight.view(weight.sizes())};
  }
  const at::Tensor dy = planar(grad_output);
  const at::Tensor x3 = input.contiguous().view({N, C_in, L});
  const at::Tensor w3 = weight.reshape({G, C_in / G, K / G});
  const at::Tensor gi = grad_input.view({N, C_in, L});
  PartialSums sums(grad_weight, input);
  auto results = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    return {grad_input, sums.sum().view(weight.sizes())};
  };
  if (const int64_t chunk = wide_chunk(input, L, K, 2 * C_in)) {
    const ColumnBuffer wide_x(1, chunk, C_in, L, input.options());
    const at::Tensor wide_out = scratch(2, {G, C_in / G, chunk * L}, input.options());
    for_each_wide_chunk(dy, whole, chunk, [&](int64_t n0, int64_t b, const at::Tensor& cols) {
      const at::Tensor c = cols.view({G, K / G, b * L});
      wide_conv(gi, n0, b, wide_out, w3, c, at::Tensor());
      wide_weight_sum(sums, input, side_by_side(x3.narrow(0, n0, b), wide_x).view({G, C_in / G, b * L}), c);
    });
    return results();
  }
  bool direct = pointwise(kernel, stride, padding);
  for (int i = 0; i < dims; ++i) direct &= output_padding[i] == 0;
  const at::Tensor image_dy = direct ? dy.contiguous() : dy;
  for_each_column_block(image_dy, whole, K, direct, [&](int64_t range, int64_t n, int64_t first, int64_t count, const at::Tensor& c) {
    const at::Tensor cg = c.view({G, K / G, count});
    gemm(gi.select(0, n).narrow(1, first, count).view({G, C_in / G, count}), w3, cg);
    sums.add(range, x3.select(0, n).narrow(1, first, count).view({G, C_in / G, count}),
             cg.transpose(1, 2));
  });
  return results();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_transpose_backward(
    const char* op, int dims, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation) {
  return conv_transpose_backward_impl(op, dims, grad_output, input, weight, stride, padding,
                                      output_padding, groups, dilation);
}

// Note [Memory format]: the output converted at the end.
at::Tensor conv(const char* op, int dims, const at::Tensor& input, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  at::MemoryFormat format;
  at::Tensor out =
      conv_impl(op, dims, input, weight, bias, stride, padding, dilation, groups, &format);
  return in_format(out, format);
}

at::Tensor conv_transpose(const char* op, int dims, const at::Tensor& input,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef output_padding, int64_t groups,
                          at::IntArrayRef dilation) {
  at::MemoryFormat format;
  at::Tensor out = conv_transpose_impl(op, dims, input, weight, bias, stride, padding,
                                       output_padding, groups, dilation, &format);
  return in_format(out, format);
}

// As torch.nn.grad.conv{1,2,3}d_weight, whose weight is contiguous: the
// format follows the input alone.
at::Tensor conv_weight(const char* op, int dims, const at::Tensor& input,
                       const at::Tensor& grad_output, at::IntArrayRef weight_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  at::MemoryFormat format;
  at::Tensor grad_weight = conv_weight_impl(op, dims, input, grad_output, weight_size, stride,
                                            padding, dilation, groups, &format);
  return in_format(grad_weight, format);
}

}  // namespace convt_ext
