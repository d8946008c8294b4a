// The convolutions' argument rules, output sizes and memory format (args.h).
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
//     whose output is channels_last by construction (converted at the end
//     where torch chooses otherwise);
//   - otherwise the input is made planar (NCHW) once (planar(): read in
//     place, im2col would gather at a stride of C); conv with one group
//     stores its GEMMs through the transposed view of a channels_last
//     output; everything else is computed planar and converted once at the
//     end (in_format()).
#include "args.h"

#include <ATen/native/ConvUtils.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/strides.h>

#include <algorithm>

namespace convt_ext {

namespace {

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

}  // namespace

bool pointwise(at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  for (size_t i = 0; i < kernel.size(); ++i) {
    if (kernel[i] != 1 || stride[i] != 1 || padding[i] != 0) return false;
  }
  return true;
}

Window3 check_conv(const char* op, int dims, const at::Tensor& input, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   int64_t* windows) {
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
  window_counts(op, "input", input.sizes().slice(2), kernel, stride, padding, dilation, windows);
  const Window3 call = make_window(op, N, C_in, input.sizes().slice(2), windows, kernel, stride,
                                   padding, dilation);
  checked_numel(op, "the output", {N, C_out, call.window_numel()},
                Geometry{kernel, stride, padding, dilation});
  return call;
}

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

Window3 check_conv_weight(const char* op, int dims, const at::Tensor& input,
                          const at::Tensor& grad_output, at::IntArrayRef weight_size,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
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
  const Window3 call = make_window(op, N, C_in, input.sizes().slice(2), windows.data(), kernel,
                                   stride, padding, dilation);
  checked_numel(op, "weight_size", weight_size);
  return call;
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

// torch.nn.grad's: that of the convolution with a new, contiguous weight.
// Torch's choice reads the weight's sizes, dtype and strides, never its
// device or data: a meta tensor stands in for it, with no allocation.
at::MemoryFormat conv_weight_format(const at::Tensor& input, at::IntArrayRef weight_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  return conv_format(input, at::empty(weight_size, input.options().device(at::kMeta)),
                     std::nullopt, stride, padding, dilation, groups);
}

at::MemoryFormat channels_last_of(int64_t dim) {
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

bool reads_pixel_rows(const at::Tensor& input, bool pointwise) {
  return pointwise && (input.dim() == 4 || input.dim() == 5) && input.size(1) > 0 &&
         input.is_contiguous(channels_last_of(input.dim()));
}

// As t.permute(0, 2, ..., 1).is_contiguous(), read off the strides without
// a view: size-1 dimensions have any stride, and an empty tensor is in
// every layout.
bool pixel_memory(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  int64_t expected = 1;
  const auto next = [&](int64_t d) {
    if (t.size(d) == 1) return true;
    if (t.stride(d) != expected) return false;
    expected *= t.size(d);
    return true;
  };
  if (!next(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!next(d)) return false;
  }
  return next(0);
}

// A new (N, C, *spatial) tensor, planar or in pixel memory (N, *spatial, C).
at::Tensor empty_output(bool planar, int64_t n, int64_t c, const int64_t* spatial, int dims,
                        const at::TensorOptions& options) {
  std::vector<int64_t> shape{n, c}, strides(2 + dims);
  shape.insert(shape.end(), spatial + kMaxDims - dims, spatial + kMaxDims);
  if (planar) return at::empty(shape, options);
  int64_t s = c;
  strides[1] = 1;
  for (int i = dims - 1; i >= 0; --i) {
    strides[2 + i] = s;
    s *= shape[2 + i];
  }
  strides[0] = s;
  return at::empty_strided(shape, strides, options);
}

at::Tensor in_pixels(const at::Tensor& t) {
  if (pixel_memory(t)) return t;
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < t.dim(); ++d) order.push_back(d);
  order.push_back(1);
  std::vector<int64_t> back(order.size());
  for (size_t i = 0; i < order.size(); ++i) back[order[i]] = static_cast<int64_t>(i);
  return t.permute(order).contiguous().permute(back);
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

}  // namespace convt_ext
