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
// Column buffers are filled a chunk of samples at a time, so that one buffer
// stays under the workspace limit. With few window positions per sample, the
// chunk's columns are laid side by side, [cols_0 | cols_1 | ...], and one wide
// GEMM serves them all ("wide" below); otherwise each sample gets its own GEMM,
// writing straight into the output.
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>

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

bool use_wide(int64_t batch, int64_t positions) { return batch > 1 && positions < kWideBelow; }

// Whole samples per chunk so that their columns stay near the preferred size
// and within the workspace limit; at least one, whatever the limit.
int64_t samples_per_chunk(int64_t batch, int64_t bytes_per_sample) {
  if (bytes_per_sample <= 0) return std::max<int64_t>(batch, 1);
  const int64_t budget = std::min(workspace_limit(), preferred_chunk_bytes());
  return std::clamp<int64_t>(budget / bytes_per_sample, 1, std::max<int64_t>(batch, 1));
}

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

// Storage for the columns of up to `chunk` samples. Wide: (rows, chunk, L)
// memory, so the first b samples form one (rows, b*L) matrix. Otherwise
// (chunk, rows, L): one (rows, L) matrix per sample.
struct ColumnBuffer {
  at::Tensor data;
  bool wide;
  ColumnBuffer(int slot, int64_t chunk, int64_t rows, int64_t positions, bool wide_,
               const at::TensorOptions& options)
      : data(wide_ ? scratch(slot, {rows, chunk, positions}, options)
                   : scratch(slot, {chunk, rows, positions}, options)),
        wide(wide_) {}
  // (b, rows, L), what im2col writes and col2im reads.
  at::Tensor samples(int64_t b) const {
    return wide ? data.narrow(1, 0, b).permute({1, 0, 2}) : data.narrow(0, 0, b);
  }
  // (rows, b*L) = [cols_0 | ... | cols_{b-1}], wide only.
  at::Tensor matrix(int64_t b) const {
    return data.narrow(1, 0, b).view({data.size(0), b * data.size(2)});
  }
};

// How a convolution's columns are produced and consumed.
struct ColumnPlan {
  bool wide;      // one GEMM over the chunk's samples side by side
  bool direct;    // a 1x1, stride-1, unpadded kernel: the input is its own column matrix
  int64_t chunk;  // samples per column buffer
  int64_t band;   // window rows per im2col: all of them, unless one sample exceeds the budget
};

ColumnPlan plan_columns(int64_t batch, int64_t rows, const int64_t* windows, int64_t element_size,
                        bool pointwise) {
  ColumnPlan plan{};
  const int64_t positions = windows[0] * windows[1];
  plan.wide = use_wide(batch, positions);
  // With a wide GEMM the columns must be laid side by side anyway, so even a
  // 1x1 kernel goes through im2col (which is then a plain copy).
  plan.direct = !plan.wide && pointwise;
  const int64_t per_sample = plan.direct ? 0 : rows * positions * element_size;
  plan.chunk = samples_per_chunk(batch, per_sample);
  const int64_t budget = std::min(workspace_limit(), preferred_chunk_bytes());
  plan.band = windows[0];
  if (!plan.wide && !plan.direct && per_sample > budget) {
    plan.band = std::clamp<int64_t>(budget / (rows * windows[1] * element_size), 1, windows[0]);
  }
  return plan;
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
  w.batch = cols.size(0);
  w.padding[0] = r0 - top;
  w.image[0] = r1 - r0;
  w.windows[0] = count;
  im2col_into(image.narrow(2, r0, r1 - r0), cols, w);
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
  const bool pointwise = kernel[0] == 1 && kernel[1] == 1 && stride[0] == 1 &&
                         stride[1] == 1 && padding[0] == 0 && padding[1] == 0;
  const ColumnPlan plan = plan_columns(N, K, windows, input.element_size(), pointwise);
  const int64_t chunk = plan.chunk, OW = windows[1];
  const at::Tensor x = plan.direct ? input.contiguous() : input;
  const ColumnBuffer cols(0, plan.direct ? 0 : chunk, K, plan.band * OW, plan.wide, input.options());
  const at::Tensor wide_out =
      plan.wide ? scratch(1, {G, C_out / G, chunk * L}, input.options()) : at::Tensor();
  const Window<2> whole = make_window(N, C_in, input.sizes().slice(2), windows, kernel, stride,
                                      padding, dilation);

  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t b = std::min(chunk, N - n0);
    const at::Tensor xc = x.narrow(0, n0, b);
    const at::Tensor yc = out.narrow(0, n0, b).view({b, C_out, L});
    if (plan.wide) {
      im2col_band(xc, cols.samples(b), whole, 0, windows[0]);
      const at::Tensor y = wide_out.narrow(2, 0, b * L);
      group_gemm(y, w3, cols.matrix(b).view({G, K / G, b * L}), b3);
      yc.copy_(y.view({C_out, b, L}).permute({1, 0, 2}));
      continue;
    }
    for (int64_t oh0 = 0; oh0 < windows[0]; oh0 += plan.band) {
      const int64_t n = std::min(plan.band, windows[0] - oh0) * OW;
      const at::Tensor samples = plan.direct ? xc.reshape({b, K, L}) : cols.samples(b).narrow(2, 0, n);
      if (!plan.direct) im2col_band(xc, samples, whole, oh0, n / OW);
      for (int64_t i = 0; i < b; ++i) {
        group_gemm(yc.select(0, i).narrow(1, oh0 * OW, n).view({G, C_out / G, n}), w3,
                   samples.select(0, i).view({G, K / G, n}), b3);
      }
    }
  }
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
  const bool pointwise = kernel[0] == 1 && kernel[1] == 1 && stride[0] == 1 && stride[1] == 1 &&
                         padding[0] == 0 && padding[1] == 0 && output_padding[0] == 0 &&
                         output_padding[1] == 0;
  if (pointwise) {  // col2im of a 1x1 kernel is the identity: the GEMM writes the output.
    const at::Tensor y = out.view({N, G, C_out / G, L});
    const at::Tensor b3 = group_bias(bias, G);
    for (int64_t i = 0; i < N; ++i) {
      group_gemm(y.select(0, i), wt3, x.select(0, i).view({G, C_in / G, L}), b3);
    }
    return out;
  }

  const bool wide = use_wide(N, L);
  const int64_t chunk = samples_per_chunk(N, K * L * input.element_size());
  const ColumnBuffer cols(0, chunk, K, L, wide, input.options());
  const ColumnBuffer wide_x(1, wide ? chunk : 0, C_in, L, true, input.options());
  const at::Tensor bias_1d = bias.has_value() ? *bias : at::Tensor();
  const int64_t input_windows[2] = {input.size(2), input.size(3)};

  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t b = std::min(chunk, N - n0);
    const at::Tensor xc = x.narrow(0, n0, b).view({b, C_in, L});
    if (wide) {
      group_gemm(cols.matrix(b).view({G, K / G, b * L}), wt3,
                 side_by_side(xc, wide_x).view({G, C_in / G, b * L}), at::Tensor());
    } else {
      const at::Tensor samples = cols.samples(b);
      for (int64_t i = 0; i < b; ++i) {
        group_gemm(samples.select(0, i).view({G, K / G, L}), wt3,
                   xc.select(0, i).view({G, C_in / G, L}), at::Tensor());
      }
    }
    // The columns cover exactly the input's H x W windows, which with
    // output_padding >= stride is fewer than the output image has.
    col2im_into(cols.samples(b), bias_1d, out.narrow(0, n0, b),
                make_window(b, C_out, image, input_windows, kernel, stride, padding, dilation));
  }
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
  const bool pointwise = kernel[0] == 1 && kernel[1] == 1 && stride[0] == 1 && stride[1] == 1 &&
                         padding[0] == 0 && padding[1] == 0 && windows[0] == input.size(2) &&
                         windows[1] == input.size(3);
  const ColumnPlan plan = plan_columns(N, K, windows, input.element_size(), pointwise);
  const int64_t chunk = plan.chunk, OW = windows[1];
  const at::Tensor x = plan.direct ? input.contiguous() : input;
  const ColumnBuffer cols(0, plan.direct ? 0 : chunk, K, plan.band * OW, plan.wide, input.options());
  const ColumnBuffer wide_dy(1, plan.wide ? chunk : 0, C_out, L, true, input.options());
  const Window<2> whole = make_window(N, C_in, input.sizes().slice(2), windows, kernel, stride,
                                      padding, dilation);

  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t b = std::min(chunk, N - n0);
    const at::Tensor xc = x.narrow(0, n0, b);
    const at::Tensor dyc = dy.narrow(0, n0, b).view({b, C_out, L});
    if (plan.wide) {
      im2col_band(xc, cols.samples(b), whole, 0, windows[0]);
      group_gemm(grad_weight, side_by_side(dyc, wide_dy).view({G, C_out / G, b * L}),
                 cols.matrix(b).view({G, K / G, b * L}).transpose(1, 2), at::Tensor(), true);
      continue;
    }
    for (int64_t oh0 = 0; oh0 < windows[0]; oh0 += plan.band) {
      const int64_t n = std::min(plan.band, windows[0] - oh0) * OW;
      const at::Tensor samples = plan.direct ? xc.reshape({b, K, L}) : cols.samples(b).narrow(2, 0, n);
      if (!plan.direct) im2col_band(xc, samples, whole, oh0, n / OW);
      for (int64_t i = 0; i < b; ++i) {
        group_gemm(grad_weight, dyc.select(0, i).narrow(1, oh0 * OW, n).view({G, C_out / G, n}),
                   samples.select(0, i).view({G, K / G, n}).transpose(1, 2), at::Tensor(), true);
      }
    }
  }
  return grad_weight.view(weight_size);
}

}  // namespace convt_ext
