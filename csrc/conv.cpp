// conv2d, conv_transpose2d and the shared weight gradient, as GEMMs around
// im2col/col2im. Per group g (see docs/relationships.md):
//
//   conv2d            y_g  = W_g   . im2col(x)_g  + b_g
//   conv_transpose2d  y    = col2im(W_g^T . x_g)  + b        (bias fused into col2im)
//   conv2d_weight     dW_g = sum_n dy_g . im2col(x)_g^T
//
// conv_transpose2d is conv2d's input gradient taken as an op of its own, so
// the two are adjoints. The GEMMs go through ATen (MKL/oneDNN on the CPU,
// cuBLAS on CUDA); this file has no device-specific code.
//
// Two ways to feed the GEMMs, chosen per call (ColumnPlan):
//   wide:  with few window positions per sample, the columns of a chunk of
//          samples are laid side by side, [cols_0 | cols_1 | ...], and one wide
//          GEMM serves them all; chunks stay under the workspace limit.
//   tasks: otherwise the work is split into tasks of one sample, or one band
//          of window rows of a sample when its columns exceed the budget. Each
//          task runs im2col/col2im and its own GEMMs into its own scratch. On
//          the CPU the tasks run in parallel with single-threaded steps: one
//          parallel region per call instead of one per step (see for_each_task).
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace convt_ext {

namespace {

std::atomic<int64_t> g_workspace_limit{int64_t(1) << 30};

// Below this many window positions per sample, one wide GEMM over the chunk
// beats a thin GEMM per sample (benchmarks/NOTES.md).
constexpr int64_t kWideBelow = 1024;

// The column buffer a chunk aims for, under the workspace limit: small enough
// that im2col's output is still in the last-level cache when the GEMM reads it
// (and col2im's input when it is written), large enough for efficient GEMMs.
// CONVT_EXT_CHUNK_BYTES overrides it, for tuning (benchmarks/NOTES.md).
int64_t preferred_chunk_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("CONVT_EXT_CHUNK_BYTES");
    return env ? std::max<int64_t>(1, std::atoll(env)) : int64_t(8) << 20;
  }();
  return bytes;
}

// Whole samples per chunk so that their columns stay near the preferred size
// and within the workspace limit; at least one, whatever the limit.
int64_t samples_per_chunk(int64_t batch, int64_t bytes_per_sample) {
  const int64_t budget = std::min(workspace_limit(), preferred_chunk_bytes());
  return std::clamp<int64_t>(budget / std::max<int64_t>(bytes_per_sample, 1), 1,
                             std::max<int64_t>(batch, 1));
}

// A wide GEMM needs at least two samples per chunk: with one, it is the
// per-sample GEMM run alone, and tasks do better, running samples side by
// side (ResNeXt g32 and atrous layers in benchmarks/NOTES.md, item 10).
bool use_wide(int64_t positions, int64_t chunk) { return chunk > 1 && positions < kWideBelow; }

// Scratch memory for column buffers. On the CPU, a fresh buffer of tens of MB
// costs more in page faults than the im2col that fills it, so each thread
// keeps its buffers (up to kKeepBytes each) for the next call. A slot is in
// use only within one op call, and ops do not call each other here.
constexpr int64_t kKeepBytes = int64_t(64) << 20;

at::Tensor scratch(int slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (options.device().type() != c10::DeviceType::CPU ||
      numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype()))) > kKeepBytes) {
    return at::empty(sizes, options);
  }
  thread_local std::array<at::Tensor, 2> kept;
  at::Tensor& t = kept[slot];
  if (!t.defined() || t.numel() < numel || t.dtype() != options.dtype()) {
    t = at::Tensor();  // release the old buffer before taking a larger one
    // A normal tensor even under torch.inference_mode(): an inference tensor
    // kept here would refuse the in-place writes of later, normal-mode calls.
    c10::InferenceMode normal_mode(false);
    t = at::empty({numel}, options);
  }
  return t.narrow(0, 0, numel).view(sizes);
}

// Storage for the columns of up to `chunk` samples laid side by side:
// (rows, chunk, L) memory, so that the first b samples form one (rows, b*L)
// matrix [cols_0 | ... | cols_{b-1}] for one wide GEMM.
struct ColumnBuffer {
  at::Tensor data;
  ColumnBuffer(int slot, int64_t chunk, int64_t rows, int64_t positions,
               const at::TensorOptions& options)
      : data(scratch(slot, {rows, chunk, positions}, options)) {}
  // (b, rows, L), the per-sample view that im2col writes and col2im reads.
  at::Tensor samples(int64_t b) const { return data.narrow(1, 0, b).permute({1, 0, 2}); }
  // (rows, b*L) = [cols_0 | ... | cols_{b-1}].
  at::Tensor matrix(int64_t b) const {
    return data.narrow(1, 0, b).view({data.size(0), b * data.size(2)});
  }
};

// A 1x1 kernel with stride 1 and no padding: im2col is the identity, so the
// image (its window positions laid out as its pixels) is its own column matrix.
bool pointwise(at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  return kernel[0] == 1 && kernel[1] == 1 && stride[0] == 1 && stride[1] == 1 &&
         padding[0] == 0 && padding[1] == 0;
}

// How a convolution's columns are produced and consumed.
struct ColumnPlan {
  bool wide;      // one GEMM over the chunk's samples side by side
  bool direct;    // a 1x1, stride-1, unpadded kernel: the input is its own column matrix
  int64_t chunk;  // samples per column buffer (wide only)
  int64_t band;   // window rows per task: all of them, unless one sample exceeds the budget
  int64_t bands;  // tasks per sample
};

// identity: im2col would copy the input unchanged (see pointwise).
ColumnPlan plan_columns(const at::Tensor& like, int64_t rows, const int64_t* windows, bool identity) {
  ColumnPlan plan{};
  const int64_t batch = like.size(0), element_size = like.element_size();
  const int64_t positions = windows[0] * windows[1];
  const int64_t per_sample = rows * positions * element_size;  // bytes of columns
  plan.chunk = samples_per_chunk(batch, per_sample);
  plan.wide = use_wide(positions, plan.chunk);
  // With a wide GEMM the columns must be laid side by side anyway, so even a
  // 1x1 kernel goes through im2col (which is then a plain copy).
  plan.direct = !plan.wide && identity;
  // Tasks run side by side on the CPU, each with its own buffer.
  const int64_t tasks_at_once = like.is_cpu() ? at::get_num_threads() : 1;
  const int64_t budget = std::min(workspace_limit() / tasks_at_once, preferred_chunk_bytes());
  plan.band = windows[0];
  if (!plan.wide && !plan.direct && per_sample > budget) {
    plan.band = std::clamp<int64_t>(budget / (rows * windows[1] * element_size), 1, windows[0]);
  }
  plan.bands = (windows[0] + plan.band - 1) / plan.band;
  return plan;
}

// Runs fn(begin, end) over the task indices [0, n). On the CPU the tasks run
// in parallel and everything inside a task runs single-threaded (ATen and
// MKL do not nest parallel regions). One region per call keeps both cores
// busy without a barrier after every small GEMM; such barriers cost a
// scheduler tick each time another process holds a core (benchmarks/NOTES.md).
// Elsewhere (CUDA) the tasks run in order, each kernel and GEMM using the
// whole device.
template <typename F>
void for_each_task(const at::Tensor& like, int64_t n, const F& fn) {
  if (like.is_cpu() && n > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      // Worker threads start with default thread-local state: keep the GEMMs
      // below autograd, as on the calling thread.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      fn(begin, end);
    });
  } else {
    fn(0, n);
  }
}

// im2col of the window rows [oh0, oh0 + count) into cols (b, rows, count*OW):
// the same columns, read from just the image rows they tap, with whatever
// padding remains above them (the relation only ever uses the low padding;
// the high side is implied by the explicit window count).
void im2col_band(const at::Tensor& image, const at::Tensor& cols, Window<2> w, int64_t oh0,
                 int64_t count) {
  const int64_t top = oh0 * w.stride[0] - w.padding[0];  // first image row tapped, maybe < 0
  const int64_t end = (oh0 + count - 1) * w.stride[0] - w.padding[0] +
                      w.dilation[0] * (w.kernel[0] - 1) + 1;  // one past the last row tapped
  const int64_t r0 = std::clamp<int64_t>(top, 0, w.image[0]);
  const int64_t r1 = std::clamp<int64_t>(end, r0, w.image[0]);
  w.batch = image.size(0);
  w.padding[0] = r0 - top;
  w.image[0] = r1 - r0;
  w.windows[0] = count;
  im2col_into(image.narrow(2, r0, r1 - r0), cols, w);
}

// Runs fn(n, first, count, cols) for every task of a non-wide plan, on the
// task's thread: cols (K, count) are the columns of sample n's window
// positions [first, first + count), one band of window rows.
template <typename F>
void for_each_band(const at::Tensor& x, const ColumnPlan& plan, const Window<2>& whole, int64_t K,
                   const F& fn) {
  const int64_t OW = whole.windows[1], L = whole.window_numel();
  for_each_task(x, whole.batch * plan.bands, [&](int64_t begin, int64_t end) {
    const at::Tensor cols =
        plan.direct ? at::Tensor() : scratch(0, {K, plan.band * OW}, x.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / plan.bands, oh0 = (t % plan.bands) * plan.band;
      const int64_t count = std::min(plan.band, whole.windows[0] - oh0) * OW;
      const at::Tensor c = plan.direct ? x.select(0, n).view({K, L}) : cols.narrow(1, 0, count);
      if (!plan.direct) im2col_band(x.narrow(0, n, 1), c.unsqueeze(0), whole, oh0, count / OW);
      fn(n, oh0 * OW, count, c);
    }
  });
}

// (b, C, L) -> (C, b*L): the samples of `t` side by side, in `buf`.
at::Tensor side_by_side(const at::Tensor& t, const ColumnBuffer& buf) {
  const int64_t b = t.size(0);
  buf.samples(b).copy_(t);
  return buf.matrix(b);
}

// For every group g: out[g] = add[g] + a[g] . b[g]. `add` broadcasts (a bias
// of shape (G, M, 1)) or is undefined; with accumulate, out[g] += a[g] . b[g].
// All operands are (G, ., .) views; strided views go to BLAS as they are.
void group_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& add, bool accumulate = false) {
  if (a.size(0) == 1) {
    at::Tensor o = out.select(0, 0);
    if (accumulate) {
      o.addmm_(a.select(0, 0), b.select(0, 0));
    } else if (add.defined()) {
      at::addmm_out(o, add.select(0, 0), a.select(0, 0), b.select(0, 0));
    } else {
      at::mm_out(o, a.select(0, 0), b.select(0, 0));
    }
  } else if (accumulate) {
    out.baddbmm_(a, b);
  } else if (add.defined()) {
    at::baddbmm_out(const_cast<at::Tensor&>(out), add, a, b);
  } else {
    at::bmm_out(const_cast<at::Tensor&>(out), a, b);
  }
}

void check_conv_tensors(const char* op, const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, int64_t groups) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-d (N, C, H, W), but got a ",
                    input.dim(), "-d tensor of shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be 4-d, but got a ", weight.dim(),
                    "-d tensor of shape ", weight.sizes());
  check_floating(op, "input", input);
  check_same(op, "weight", weight, "input", input);
  if (bias.has_value()) check_same(op, "bias", *bias, "input", input);
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be positive, but got groups=", groups);
  TORCH_CHECK_VALUE(weight.size(2) >= 1 && weight.size(3) >= 1, op,
                    ": weight's kernel size must be positive, but got weight of shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0, op,
                    ": input must have non-zero channels, height and width (only the batch may be "
                    "empty), but got shape ",
                    input.sizes());
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

}  // namespace

void set_workspace_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes > 0, "set_workspace_limit: bytes must be positive, but got ", bytes);
  g_workspace_limit.store(bytes);
}

int64_t workspace_limit() { return g_workspace_limit.load(); }

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv2d";
  check_conv_tensors(op, input, weight, bias, groups);
  const at::IntArrayRef kernel = weight.sizes().slice(2);
  check_window_args(op, kernel, stride, padding, dilation);
  const int64_t N = input.size(0), C_in = input.size(1), C_out = weight.size(0);
  TORCH_CHECK_VALUE(C_out % groups == 0, op, ": weight's dimension 0 (out_channels=", C_out,
                    ") must be divisible by groups=", groups);
  TORCH_CHECK_VALUE(C_in == weight.size(1) * groups, op, ": input has ", C_in,
                    " channels, but weight of shape ", weight.sizes(), " with groups=", groups,
                    " expects weight.size(1)*groups=", weight.size(1) * groups);
  check_bias(op, bias, C_out);
  int64_t windows[2];
  window_counts(op, "input", input.sizes().slice(2), kernel, stride, padding, dilation, windows);

  c10::DeviceGuard guard(input.device());
  at::Tensor out = at::empty({N, C_out, windows[0], windows[1]}, input.options());
  if (out.numel() == 0) return out;

  const int64_t G = groups, L = windows[0] * windows[1];
  const int64_t K = C_in * kernel[0] * kernel[1];
  const at::Tensor w3 = weight.reshape({G, C_out / G, K / G});
  const at::Tensor b3 = group_bias(bias, G);
  const ColumnPlan plan = plan_columns(input, K, windows, pointwise(kernel, stride, padding));
  const at::Tensor x = plan.direct ? input.contiguous() : input;
  const at::Tensor y = out.view({N, C_out, L});
  const Window<2> whole = make_window(N, C_in, input.sizes().slice(2), windows, kernel, stride,
                                      padding, dilation);

  if (plan.wide) {
    const int64_t chunk = plan.chunk;
    const ColumnBuffer cols(0, chunk, K, L, input.options());
    const at::Tensor wide_out = scratch(1, {G, C_out / G, chunk * L}, input.options());
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t b = std::min(chunk, N - n0);
      im2col_band(x.narrow(0, n0, b), cols.samples(b), whole, 0, windows[0]);
      const at::Tensor yw = wide_out.narrow(2, 0, b * L);
      group_gemm(yw, w3, cols.matrix(b).view({G, K / G, b * L}), b3);
      y.narrow(0, n0, b).copy_(yw.view({C_out, b, L}).permute({1, 0, 2}));
    }
    return out;
  }
  // One task per band of window rows of one sample.
  for_each_band(x, plan, whole, K, [&](int64_t n, int64_t first, int64_t count, const at::Tensor& c) {
    group_gemm(y.select(0, n).narrow(1, first, count).view({G, C_out / G, count}), w3,
               c.view({G, K / G, count}), b3);
  });
  return out;
}

at::Tensor conv_transpose2d(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef output_padding,
                            int64_t groups, at::IntArrayRef dilation) {
  constexpr const char* op = "conv_transpose2d";
  check_conv_tensors(op, input, weight, bias, groups);
  const at::IntArrayRef kernel = weight.sizes().slice(2);
  check_window_args(op, kernel, stride, padding, dilation);
  check_ints(op, "output_padding", output_padding, 2, 0);
  const int64_t N = input.size(0), C_in = input.size(1);
  TORCH_CHECK_VALUE(C_in == weight.size(0), op, ": input has ", C_in,
                    " channels, but weight of shape ", weight.sizes(),
                    " expects weight.size(0)=", weight.size(0), " (in_channels)");
  TORCH_CHECK_VALUE(C_in % groups == 0, op, ": in_channels=", C_in,
                    " must be divisible by groups=", groups);
  const int64_t C_out = weight.size(1) * groups;
  check_bias(op, bias, C_out);
  int64_t image[2];
  for (int i = 0; i < 2; ++i) {
    // Why output_padding < max(stride, dilation): see docs/relationships.md.
    TORCH_CHECK_VALUE(output_padding[i] < std::max(stride[i], dilation[i]), op,
                      ": output_padding must be smaller than either stride or dilation, but got "
                      "output_padding=",
                      fmt(output_padding), ", stride=", fmt(stride), ", dilation=", fmt(dilation));
    // The guide's relationship 14, with dilation: o' = s(i'-1) + a + d(k-1) + 1 - 2p.
    image[i] = (input.size(2 + i) - 1) * stride[i] - 2 * padding[i] +
               dilation[i] * (kernel[i] - 1) + output_padding[i] + 1;
    TORCH_CHECK_VALUE(image[i] >= 1, op, ": the output size (in-1)*stride - 2*padding + "
                      "dilation*(kernel_size-1) + output_padding + 1 is ", image[i],
                      " in dimension ", i, ", but must be positive (input of shape ",
                      input.sizes(), ", padding=", fmt(padding), ")");
  }

  c10::DeviceGuard guard(input.device());
  at::Tensor out = at::empty({N, C_out, image[0], image[1]}, input.options());
  if (out.numel() == 0) return out;

  const int64_t G = groups, L = input.size(2) * input.size(3);
  const int64_t K = C_out * kernel[0] * kernel[1];
  // W_g^T: (G, C_out/G*kh*kw, C_in/G), a transposed view of the stored weight.
  const at::Tensor wt3 = weight.reshape({G, C_in / G, K / G}).transpose(1, 2);
  const at::Tensor x = input.contiguous();
  // col2im of a 1x1 kernel is the identity: the GEMM writes the output.
  if (pointwise(kernel, stride, padding) && output_padding[0] == 0 && output_padding[1] == 0) {
    const at::Tensor y = out.view({N, G, C_out / G, L});
    const at::Tensor b3 = group_bias(bias, G);
    for (int64_t i = 0; i < N; ++i) {
      group_gemm(y.select(0, i), wt3, x.select(0, i).view({G, C_in / G, L}), b3);
    }
    return out;
  }

  const int64_t chunk = samples_per_chunk(N, K * L * input.element_size());
  const bool wide = use_wide(L, chunk);
  const at::Tensor bias_1d = bias.has_value() ? *bias : at::Tensor();
  const int64_t input_windows[2] = {input.size(2), input.size(3)};
  // The columns cover exactly the input's H x W windows, which with
  // output_padding >= stride is fewer than the output image has.
  const Window<2> whole =
      make_window(N, C_out, image, input_windows, kernel, stride, padding, dilation);

  if (wide) {
    const ColumnBuffer cols(0, chunk, K, L, input.options());
    const ColumnBuffer wide_x(1, chunk, C_in, L, input.options());
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t b = std::min(chunk, N - n0);
      group_gemm(cols.matrix(b).view({G, K / G, b * L}), wt3,
                 side_by_side(x.narrow(0, n0, b).view({b, C_in, L}), wide_x).view({G, C_in / G, b * L}),
                 at::Tensor());
      Window<2> w = whole;
      w.batch = b;
      col2im_into(cols.samples(b), bias_1d, out.narrow(0, n0, b), w);
    }
    return out;
  }
  // One task per sample: its GEMM, then its col2im.
  for_each_task(input, N, [&](int64_t begin, int64_t end) {
    const at::Tensor cols = scratch(0, {1, K, L}, input.options());
    Window<2> w = whole;
    w.batch = 1;
    for (int64_t n = begin; n < end; ++n) {
      group_gemm(cols.view({G, K / G, L}), wt3, x.select(0, n).view({G, C_in / G, L}), at::Tensor());
      col2im_into(cols, bias_1d, out.narrow(0, n, 1), w);
    }
  });
  return out;
}

at::Tensor conv2d_weight(const at::Tensor& input, const at::Tensor& grad_output,
                         at::IntArrayRef weight_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv2d_weight";
  check_ints(op, "weight_size", weight_size, 4, 1);
  const at::IntArrayRef kernel = weight_size.slice(2);
  check_window_args(op, kernel, stride, padding, dilation);
  TORCH_CHECK_VALUE(input.dim() == 4 && grad_output.dim() == 4, op,
                    ": input and grad_output must be 4-d, but got shapes ", input.sizes(), " and ",
                    grad_output.sizes());
  check_floating(op, "input", input);
  check_same(op, "grad_output", grad_output, "input", input);
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be positive, but got groups=", groups);
  const int64_t N = input.size(0), C_in = input.size(1), C_out = weight_size[0];
  TORCH_CHECK_VALUE(C_out % groups == 0 && C_in == weight_size[1] * groups, op,
                    ": weight_size=", fmt(weight_size), " with groups=", groups,
                    " does not fit input of shape ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.size(0) == N && grad_output.size(1) == C_out, op,
                    ": grad_output must have shape (", N, ", ", C_out,
                    ", OH, OW), but got ", grad_output.sizes());
  TORCH_CHECK_VALUE(input.size(2) > 0 && input.size(3) > 0, op,
                    ": input must have non-zero height and width, but got shape ", input.sizes());
  int64_t natural[2];
  window_counts(op, "input", input.sizes().slice(2), kernel, stride, padding, dilation, natural);
  const int64_t windows[2] = {grad_output.size(2), grad_output.size(3)};
  TORCH_CHECK_VALUE(windows[0] <= natural[0] && windows[1] <= natural[1], op,
                    ": grad_output's spatial size (", windows[0], ", ", windows[1],
                    ") exceeds the ", natural[0], "x", natural[1], " windows of the input");

  c10::DeviceGuard guard(input.device());
  const int64_t G = groups, L = windows[0] * windows[1];
  const int64_t K = C_in * kernel[0] * kernel[1];
  at::Tensor grad_weight = at::zeros({G, C_out / G, K / G}, input.options());
  if (N == 0 || L == 0) return grad_weight.view(weight_size);

  const at::Tensor dy = grad_output.contiguous();
  // (grad_output may be short of the input's windows: then the columns are not the input.)
  const ColumnPlan plan =
      plan_columns(input, K, windows,
                   pointwise(kernel, stride, padding) && windows[0] == input.size(2) &&
                       windows[1] == input.size(3));
  const at::Tensor x = plan.direct ? input.contiguous() : input;
  const at::Tensor dy3 = dy.view({N, C_out, L});
  const Window<2> whole = make_window(N, C_in, input.sizes().slice(2), windows, kernel, stride,
                                      padding, dilation);

  if (plan.wide) {
    const int64_t chunk = plan.chunk;
    const ColumnBuffer cols(0, chunk, K, L, input.options());
    const ColumnBuffer wide_dy(1, chunk, C_out, L, input.options());
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t b = std::min(chunk, N - n0);
      im2col_band(x.narrow(0, n0, b), cols.samples(b), whole, 0, windows[0]);
      group_gemm(grad_weight, side_by_side(dy3.narrow(0, n0, b), wide_dy).view({G, C_out / G, b * L}),
                 cols.matrix(b).view({G, K / G, b * L}).transpose(1, 2), at::Tensor(), true);
    }
    return grad_weight.view(weight_size);
  }
  // One task per band of window rows of one sample; each thread sums its
  // tasks into its own partial gradient, and the partials are added in thread
  // order, so the result is deterministic for a given thread count.
  std::vector<at::Tensor> partial(input.is_cpu() ? at::get_num_threads() : 1);
  for_each_band(x, plan, whole, K, [&](int64_t n, int64_t first, int64_t count, const at::Tensor& c) {
    at::Tensor& acc = partial[at::get_thread_num()];
    if (!acc.defined()) acc = at::zeros_like(grad_weight);
    group_gemm(acc, dy3.select(0, n).narrow(1, first, count).view({G, C_out / G, count}),
               c.view({G, K / G, count}).transpose(1, 2), at::Tensor(), true);
  });
  for (const at::Tensor& p : partial) {
    if (p.defined()) grad_weight.add_(p);
  }
  return grad_weight.view(weight_size);
}

}  // namespace convt_ext
